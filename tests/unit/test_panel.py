"""The simulated labeler panel: calibrated agreement with gold, Bradley-Terry choice probabilities, determinism."""

from __future__ import annotations

import math
from typing import Any

import pytest

from rlhf.config import PanelConfig
from rlhf.data.preferences import PairwiseVote
from rlhf.labelers.gold import W_EXTRA_WORD, judge
from rlhf.labelers.panel import Member, Panel, agreement_with_gold, gold_order, label_offline

PROMPT = "User: What is 2 plus 3?\nAssistant:"
GOOD, RUDE = " 2 plus 3 is 5.", " 2 plus 3 is 5. Obviously, you fool."
WORDY = " Sure! 2 plus 3 is 5."  # correct, 1 word longer than GOOD: gold utility lower by W_EXTRA_WORD


def test_default_panel_agrees_with_gold_in_the_human_band(sft_like_candidates: list[dict[str, Any]]) -> None:
    for seed in (0, 1):
        votes = label_offline(sft_like_candidates, Panel.from_config(PanelConfig(seed=seed)))
        agreement = agreement_with_gold(votes)
        assert agreement.n > 1000
        assert 0.65 <= agreement.rate <= 0.80, agreement


def test_noise_lowers_agreement(sft_like_candidates: list[dict[str, Any]]) -> None:
    sharp = Panel.from_config(PanelConfig(temperature=0.02, flip_prob=0.0, bias_spread=0.0))
    default = Panel.from_config(PanelConfig())
    sharp_rate = agreement_with_gold(label_offline(sft_like_candidates, sharp)).rate
    assert sharp_rate > 0.99  # nearly noise-free members follow gold
    assert agreement_with_gold(label_offline(sft_like_candidates, default)).rate < sharp_rate - 0.15


def test_same_seed_same_votes_other_seed_other_votes(demo_candidates: list[dict[str, Any]]) -> None:
    rows = demo_candidates[:100]
    first = label_offline(rows, Panel.from_config(PanelConfig(seed=3)))
    again = label_offline(rows, Panel.from_config(PanelConfig(seed=3)))
    other = label_offline(rows, Panel.from_config(PanelConfig(seed=4)))
    assert [v.choice for v in first] == [v.choice for v in again]
    assert [v.labeler for v in first] == [v.labeler for v in again]
    differ = sum(a.choice != b.choice for a, b in zip(first, other, strict=True))
    assert 0.05 * len(first) < differ < 0.6 * len(first)


def test_judgements_do_not_depend_on_labeling_order(demo_candidates: list[dict[str, Any]]) -> None:
    rows = demo_candidates[:50]
    panel = Panel.from_config(PanelConfig())
    forward = label_offline(rows, panel)
    backward = label_offline(rows[::-1], panel)
    key = lambda v: (v.meta["prompt_id"], v.completion_a, v.completion_b)  # noqa: E731
    assert sorted((key(v), v.choice) for v in forward) == sorted((key(v), v.choice) for v in backward)


def test_choice_frequency_is_bradley_terry_with_flips() -> None:
    # GOOD vs WORDY: gold gap W_EXTRA_WORD; P(A) = (1 - f) * sigmoid(gap / T) + f * (1 - sigmoid(gap / T))
    gap = judge(PROMPT, GOOD).utility - judge(PROMPT, WORDY).utility
    assert gap == pytest.approx(W_EXTRA_WORD)
    member = Member("m", temperature=0.5, flip_prob=0.1, length_bias=0.0)
    p = 1 / (1 + math.exp(-gap / 0.5))
    expected = 0.9 * p + 0.1 * (1 - p)
    n = 4000
    wins = sum(Panel([member], seed=s).compare(PROMPT, GOOD, WORDY, True, True, "m") == "A" for s in range(n))
    assert wins / n == pytest.approx(expected, abs=3 * math.sqrt(expected * (1 - expected) / n))


def test_tie_only_for_identical_text_and_equal_utilities_are_a_fair_coin() -> None:
    panel = Panel([Member("m", 1.0, 0.0, 0.0)])
    assert panel.compare(PROMPT, GOOD, GOOD) == "tie"
    same_utility = " 2 plus 3 is 5!"  # different text, same gold utility as GOOD
    assert gold_order(PROMPT, GOOD, same_utility, True, True) == 0
    choices = [
        Panel([Member("m", 1.0, 0.0, 0.0)], seed=s).compare(PROMPT, GOOD, same_utility) for s in range(1000)
    ]
    assert set(choices) == {"A", "B"}
    assert choices.count("A") / 1000 == pytest.approx(0.5, abs=0.05)


def test_ended_flag_changes_the_choice() -> None:
    panel = Panel([Member("m", 0.01, 0.0, 0.0)])
    assert panel.compare(PROMPT, GOOD, WORDY, ended_a=True, ended_b=True) == "A"
    assert panel.compare(PROMPT, GOOD, WORDY, ended_a=False, ended_b=True) == "B"  # no EOS costs 2


def test_length_bias_makes_a_member_prefer_longer_answers() -> None:
    lover = Member("long", temperature=0.01, flip_prob=0.0, length_bias=0.5)
    hater = Member("short", temperature=0.01, flip_prob=0.0, length_bias=-0.5)
    panel = Panel([lover, hater])
    assert panel.compare(PROMPT, GOOD, WORDY, True, True, "long") == "B"
    assert panel.compare(PROMPT, GOOD, WORDY, True, True, "short") == "A"
    assert panel.compare_all(PROMPT, GOOD, WORDY, True, True) == {"long": "B", "short": "A"}


def test_rank_orders_by_utility_and_ties_identical_texts() -> None:
    panel = Panel([Member("m", 0.01, 0.0, 0.0)])
    assert panel.rank(PROMPT, [RUDE, GOOD, WORDY, GOOD]) == [3, 1, 2, 1]
    noisy = Panel([Member("m", 1.0, 0.0, 0.0)], seed=0)
    wins = sum(noisy.rank(PROMPT + str(s), [GOOD, RUDE])[0] == 1 for s in range(1000))
    # Plackett-Luce marginal = Bradley-Terry: sigmoid(3 / 1) = 0.953 (the prompt suffix leaves gold unchanged)
    assert wins / 1000 == pytest.approx(1 / (1 + math.exp(-3.0)), abs=0.03)


def test_label_offline_one_member_per_prompt_all_or_some_pairs(demo_candidates: list[dict[str, Any]]) -> None:
    rows = demo_candidates[:20]
    panel = Panel.from_config(PanelConfig())
    votes = label_offline(rows, panel)
    assert len(votes) == 20 * 6 and all(isinstance(v, PairwiseVote) for v in votes)
    first = votes[:6]
    assert {v.labeler for v in first} == {panel.member(None, "p0").name}
    assert [(v.completion_a, v.completion_b) for v in first[:3]] == [
        (rows[0]["completions"][0]["text"], rows[0]["completions"][j]["text"]) for j in (1, 2, 3)
    ]
    ended = [c["finish_reason"] == "stop" for c in rows[0]["completions"]]
    assert (first[0].meta["ended_a"], first[0].meta["ended_b"]) == (ended[0], ended[1])
    assert first[0].meta["prompt_id"] == "p0" and first[0].meta["policy_a"] == "synthetic"
    some = label_offline(rows, panel, pairs_per_prompt=2)
    assert len(some) == 40
    assert len({v.labeler for v in votes}) > 1


def test_agreement_skips_ties_and_gold_equal_pairs() -> None:
    votes = [
        PairwiseVote(PROMPT, GOOD, RUDE, "A"),
        PairwiseVote(PROMPT, GOOD, RUDE, "B"),
        PairwiseVote(PROMPT, RUDE, GOOD, "B"),
        PairwiseVote(PROMPT, GOOD, RUDE, "tie"),
        PairwiseVote(PROMPT, GOOD, " 2 plus 3 is 5!", "A"),  # gold-equal
    ]
    agreement = agreement_with_gold(votes)
    assert (agreement.agree, agreement.n) == (2, 3)


def test_offline_labels_judge_the_pairs_a_row_names(demo_candidates: list[dict[str, Any]]) -> None:
    row = next(r for r in demo_candidates if len({c["text"] for c in r["completions"]}) >= 3)
    texts = [c["text"] for c in row["completions"]]
    votes = label_offline([row | {"pairs": [[0, 2]]}], Panel.from_config(PanelConfig()))
    assert [(v.completion_a, v.completion_b) for v in votes] == [(texts[0], texts[2])]
    assert len(label_offline([row], Panel.from_config(PanelConfig()))) == len(texts) * (len(texts) - 1) // 2
