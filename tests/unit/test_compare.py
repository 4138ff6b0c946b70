"""Win rate, bootstrap interval and randomised A/B order of rlhf.stages.eval, with judges made by hand."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pytest

from rlhf.eval.judges import Answer, GoldJudge
from rlhf.judges.base import JudgeBase, Pair
from rlhf.stages.eval import PolicyAnswers, judge_pairs, win_rate


class FirstAlwaysWins(JudgeBase):
    """A judge with a pure position bias."""

    name = "first"

    def compare_all(self, pairs: Sequence[Pair], principle: str | None = None) -> list[float]:
        return [1.0] * len(pairs)


def answers(texts: list[str], ended: bool = True) -> PolicyAnswers:
    return PolicyAnswers(texts, [ended] * len(texts), [len(t.split()) for t in texts], None)


def test_win_rate_counts_ties_as_half_and_brackets_the_mean() -> None:
    outcomes = np.array([1.0, 1.0, 0.5, 0.0])
    rate, low, high = win_rate(outcomes, n_boot=2000, seed=0)
    assert rate == 0.625
    assert 0.0 <= low < rate < high <= 1.0
    assert win_rate(np.full(50, 0.5), 500, 0) == (0.5, 0.5, 0.5)


def test_random_order_cancels_a_position_bias() -> None:
    prompts = [f"User: What is {i % 10} plus 1?\nAssistant:" for i in range(400)]
    a, b = answers(["Yes."] * 400), answers(["No."] * 400)
    outcomes, a_first = judge_pairs(FirstAlwaysWins(), prompts, a, b, seed=0)
    assert 150 < sum(a_first) < 250  # both orders occur
    assert list(outcomes) == [1.0 if f else 0.0 for f in a_first]
    rate, low, high = win_rate(outcomes, 1000, 0)
    assert low < 0.5 < high


def test_one_answer_given_by_both_policies_is_a_tie_whatever_the_judge_says() -> None:
    """A reward model scores one text a little differently in another batch row: identical answers counted as
    wins and losses (W/T/L 9/0/3 where 4 of the 12 answers were the same)."""
    prompts = ["User: Hi\nAssistant:"] * 3
    a = PolicyAnswers([" Hello!", " Hello!", " Hello!"], [True, False, True], [1, 1, 1], None)
    b = PolicyAnswers([" Hello!", " Hello!", " Hey."], [True, True, True], [1, 1, 1], None)
    outcomes, a_first = judge_pairs(FirstAlwaysWins(), prompts, a, b, seed=0)
    assert outcomes[0] == 0.5  # the same answer
    assert outcomes[1:].tolist() == [1.0 if f else 0.0 for f in a_first[1:]]  # cut off once; other words


def test_gold_judge_prefers_polite_concise_and_ties_equal_answers() -> None:
    prompt = "User: What is 2 plus 3?\nAssistant:"
    polite, rude, wordy = (
        Answer(" 5.", True),
        Answer(" Ugh, you fool. 5.", True),
        Answer(" Sure! 2 plus 3 is 5.", True),
    )
    judge = GoldJudge()
    assert judge.compare(prompt, polite, rude) == 1.0
    assert judge.compare(prompt, wordy, polite) == 0.0
    assert judge.compare(prompt, polite, Answer(" 5.", True)) == 0.5
    assert judge.compare(prompt, polite, Answer(" 5.", False)) == 1.0  # no EOS: did not end cleanly


def test_gold_metrics_only_on_demo_prompts_or_when_gold_judges(caplog: pytest.LogCaptureFixture) -> None:
    from rlhf.stages.eval import gold_metrics_apply

    with caplog.at_level(logging.WARNING, logger="rlhf.stages.eval"):
        assert gold_metrics_apply(demo=True, judge="reward_model") and not caplog.records
        assert not gold_metrics_apply(demo=False, judge="endpoint")
        assert "left out" in caplog.records[-1].getMessage()
        assert gold_metrics_apply(demo=False, judge="gold")
        assert "measure the demo's criteria only" in caplog.records[-1].getMessage()


def test_demo_metrics_of_prompts_without_a_family_are_null_and_questions_have_their_own_rate() -> None:
    """Own prompts of the demo world without unknowable questions: that rate is None (JSON null, not NaN);
    greetings count among the knowable prompts, not among the questions; a mean-words interval stays >= 0."""
    from rlhf.data.demo_task import render_prompt
    from rlhf.eval.judges import demo_metrics

    prompts = [render_prompt(q) for q in ("What is 2 plus 3?", "What is 4 minus 1?", "Hi!")]
    metrics = demo_metrics(
        prompts, [" 5.", " 7.", " Hello! How can I help you today with anything at all?"], [True] * 3
    )
    assert metrics["idk_on_unknowable_rate"] is None and metrics["ci95"]["idk_on_unknowable_rate"] is None
    assert metrics["correct_question_rate"] == pytest.approx(1 / 2) and metrics["correct_question_n"] == 2
    assert metrics["correct_knowable_rate"] == pytest.approx(2 / 3) and metrics["correct_knowable_n"] == 3
    assert metrics["ci95"]["mean_words"][0] == 0.0  # 4.3 words: the normal interval would start at -2.2


def test_the_summary_names_only_settings_its_judge_read() -> None:
    """A judge_model or both_orders left in a config that a gold judge never read is not its provenance."""
    from rlhf.config import EvalConfig
    from rlhf.stages.eval import summarise

    prompts = ["User: Hi!\nAssistant:"]
    gold = EvalConfig(judge="gold", judge_model="runs/demo/reward/final")
    summary = summarise("A", "B", gold, prompts, answers([" Hello!"]), answers([" Hi."]), [True])
    assert (summary["judge"], summary["judge_model"], summary["both_orders"]) == ("gold", None, None)
    local = EvalConfig(judge="local", judge_model="runs/demo/sft/final", judge_both_orders=False)
    summary = summarise("A", "B", local, prompts, answers([" Hello!"]), answers([" Hi."]), [True])
    assert (summary["judge_model"], summary["both_orders"]) == ("runs/demo/sft/final", False)
