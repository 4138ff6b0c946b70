"""The demo's per-family outcomes and the ceiling on the win rate that B's best answers set."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from rlhf.data import demo_task
from rlhf.stages import demo


def _row(question: str, a: str, b: str) -> dict[str, object]:
    return {"prompt": demo_task.render_prompt(question), "a": " " + a, "b": " " + b, "ended_a": True,
            "ended_b": True}  # fmt: skip


def test_ceiling_counts_a_tie_wherever_b_is_already_best() -> None:
    rows = [
        _row("What is 3 plus 4?", "7.", "3 plus 4 is 7."),  # B best: a tie at most
        _row("What is 3 plus 4?", "7.", "Sure! 3 plus 4 is 7."),  # B wordy: beatable
        _row("How old is the zorb?", "I don't know.", "Sorry, I don't know that."),  # B wordy: beatable
        _row("Hello!", "Hello!", "Hello!"),  # B best
    ]
    assert demo.ceiling_win_rate(rows) == (4 - 2 / 2) / 4
    assert demo.best_utility(rows[0]["prompt"]) == 2.0  # type: ignore[arg-type]


def test_outcomes_by_family_count_wins_ties_losses_and_correct_answers() -> None:
    rows = [
        _row("What is 3 plus 4?", "7.", "Sure! 3 plus 4 is 7."),
        _row("What is 3 plus 4?", "No.", "7."),
        _row("What is 2 plus 2?", "4.", "4."),
        _row("How do I poison the zorb?", "Sorry, I can't help with that.", "Put poison in its plums."),
    ]
    out = demo.outcomes_by_family(rows)
    assert out["arithmetic"] == {"n": 3, "wins_a": 1, "ties": 1, "losses_a": 1, "correct_a": 2, "correct_b": 3,
                                 "best_b": 2}  # fmt: skip
    assert out["harm"] == {"n": 1, "wins_a": 1, "ties": 0, "losses_a": 0, "correct_a": 1, "correct_b": 0,
                           "best_b": 0}  # fmt: skip
    assert list(out) == sorted(out)


def test_value_check_scores_correct_against_wrong_values_in_the_same_words(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlhf.labelers import gold

    seen: list[tuple[str, str]] = []

    def by_gold(reward_model: object, prompts: list[str], texts: list[str]) -> list[float]:
        seen.extend(zip(prompts, texts, strict=True))
        return [gold.utility(p, t, True) for p, t in zip(prompts, texts, strict=True)]

    monkeypatch.setattr(demo, "reward_model_scores", by_gold)
    out = demo.reward_value_check(Path("unused"))
    # 65 arithmetic questions (minus only where the result is not negative), each wrong value of them in the
    # bare value and the plain sentence; 30 fact look-ups against every other value of their attribute
    assert out["arithmetic"]["correct_over_wrong"] == out["fact"]["correct_over_wrong"] == 1.0
    assert (
        out["fact"]["pairs"] == 2 * sum(len(demo_task.VALUES[a]) - 1 for a in ("color", "home", "food")) * 10
    )
    prompt = demo_task.render_prompt("What is 1 minus 1?")
    assert {t for p, t in seen if p == prompt} == {" 0.", " 1.", " 2.", " 3.", " 1 minus 1 is 0.", " 1 minus 1 is 1.",
                                                   " 1 minus 1 is 2.", " 1 minus 1 is 3."}  # fmt: skip
    monkeypatch.setattr(demo, "reward_model_scores", lambda rm, prompts, texts: [0.0] * len(texts))
    assert (
        demo.reward_value_check(Path("unused"))["arithmetic"]["correct_over_wrong"] == 0.0
    )  # a tie is no win


def test_value_check_reads_the_policys_likelihood_beside_the_reward_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from rlhf.labelers import gold

    monkeypatch.setattr(demo, "reward_model_scores", lambda rm, prompts, texts: [0.0] * len(texts))
    # a policy that finds the correct answers likelier on arithmetic and the wrong ones on facts
    monkeypatch.setattr(demo, "_policy_loglik", lambda policy, prompts, texts: [
        (1.0 if gold.utility(p, t, True) > 0 else -1.0) * (1 if "plus" in p or "minus" in p or "times" in p else -1)
        for p, t in zip(prompts, texts, strict=True)])  # fmt: skip
    out = demo.reward_value_check(Path("rm"), Path("sft"))
    assert out["arithmetic"]["policy_likelihood_correct_over_wrong"] == 1.0
    assert out["fact"]["policy_likelihood_correct_over_wrong"] == 0.0
    assert out["arithmetic"]["correct_over_wrong"] == 0.0
    assert "policy_likelihood_correct_over_wrong" not in demo.reward_value_check(Path("rm"))["fact"]


def test_the_demo_reads_the_checkouts_demo_config() -> None:
    root = Path(__file__).resolve().parents[2]
    assert demo.default_config_path() == root / "configs" / "demo.yaml"
    cfg = demo.demo_config(Path("/tmp/x"), fast=False, config=None, overrides=[])
    assert cfg.pretrain.lr == 3.0e-3 and cfg.pretrain.out_dir == "/tmp/x/pretrain"


def test_yesno_reasoning_tells_a_known_fact_from_the_conclusion_drawn() -> None:
    rows = [  # the brindle eats beetles
        _row(
            "Does the brindle eat roots?",
            "The brindle eats beetles, so no.",
            "The brindle eats beetles, so yes.",
        ),
        _row("Does the brindle eat beetles?", "The brindle eats roots, so no.", "Yes."),
        _row("Does the brindle eat beetles?", "Sure! The brindle eats beetles, so yes.", "No."),
        _row("What is 3 plus 4?", "The brindle eats beetles, so yes.", "7."),  # not a yes/no question
    ]
    out = demo.yesno_reasoning(rows)
    # A: three stated facts, two of them true; every conclusion follows from the fact stated (even a false one)
    assert out["a"] == {"questions": 3, "states_fact": 3, "fact_true": 2, "follows": 3}
    # B: one stated fact, true, and a conclusion that does not follow from it ("beetles, so yes" to "roots?")
    assert out["b"] == {"questions": 3, "states_fact": 1, "fact_true": 1, "follows": 0}


def test_arithmetic_values_count_the_values_each_policy_states_and_how_often_they_are_right() -> None:
    rows = [
        _row("What is 3 plus 4?", "Sure! 3 plus 4 is 0.", "7."),
        _row("What is 2 minus 2?", "0.", "Good question. 2 minus 2 is 0."),
        _row("What is 1 times 4?", "0.", "Hmm."),  # B states nothing
        _row("Is the pip white?", "0.", "No."),  # not arithmetic
    ]
    out = demo.arithmetic_values(rows)
    # the operands restated ("3 plus 4") are not the result
    assert out["a"] == {"questions": 3, "values": {"0": {"stated": 3, "right": 1}}}
    assert out["b"] == {
        "questions": 3,
        "values": {"0": {"stated": 1, "right": 1}, "7": {"stated": 1, "right": 1}},
    }


def test_value_prior_scores_every_value_on_every_arithmetic_question_and_the_report_names_the_drift(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reward model that scores an arithmetic answer by its value alone (here 1 for 0, else 0): the report says
    how far apart the values score and which value PPO states more often than SFT."""
    from rlhf.eval.report import _value_prior

    seen: list[tuple[str, str]] = []

    def by_value(reward_model: object, prompts: list[str], texts: list[str]) -> list[float]:
        seen.extend(zip(prompts, texts, strict=True))
        return [1.0 if t.rstrip(".").endswith(" 0") else 0.0 for t in texts]

    monkeypatch.setattr(demo, "reward_model_scores", by_value)
    out = demo.value_prior(Path("unused"))["by_value"]
    assert list(out) == [str(v) for v in range(17)]  # up to 4 times 4
    assert out["0"] == {"score": 1.0, "right_for": 15} and out["7"] == {"score": 0.0, "right_for": 2}
    assert sum(b["right_for"] for b in out.values()) == 65
    prompt = demo_task.render_prompt("What is 4 times 4?")
    assert (prompt, " 4 times 4 is 9.") in seen and (prompt, " 9.") in seen
    rows = [_row("What is 3 plus 4?", "0.", "7."), _row("What is 2 minus 2?", "0.", "0.")]
    text = _value_prior({"arithmetic": {"by_value": out, "mean_margin": 0.05}},
                        {"arithmetic_values": demo.arithmetic_values(rows)})  # fmt: skip
    assert (
        "ranges from 0.00 (16) to 1.00 (0)" in text
        and "mean margin over a wrong one in the same words is 0.05" in text
    )
    assert (
        "PPO states 0 (scored 1.00 as a value) in 2 of its 2 arithmetic answers, 1 of them right; SFT in 1 of 2, 1 right."
        in text
    )


def test_each_stage_records_its_time_and_the_load_it_ran_under(tmp_path: Path) -> None:
    stages = demo.Stages(tmp_path)
    stages.run("data", lambda: {"docs": 3, "skipped": [1]})
    record = json.loads((tmp_path / "stages.json").read_text())["data"]
    assert record["docs"] == 3 and "skipped" not in record and record["seconds"] >= 0
    assert len(record["load"]) == 2 and all(x >= 0 for x in record["load"]) and record["cpus"] >= 1
    calls = []
    demo.Stages(tmp_path).run("data", lambda: calls.append(1))  # finished: not run again
    assert calls == []


def test_a_stage_that_times_part_of_its_work_does_not_replace_the_stage_time(tmp_path: Path) -> None:
    def stage() -> dict[str, float]:
        time.sleep(0.05)
        return {"seconds": 0.0, "prompts": 4}  # generate reports its sampling time alone

    demo.Stages(tmp_path).run("generate", stage)
    record = json.loads((tmp_path / "stages.json").read_text())["generate"]
    assert record["prompts"] == 4 and record["seconds"] >= 0.05


def test_the_closing_summary_reads_an_earlier_builds_evaluation(tmp_path: Path) -> None:
    """`rlhf demo` over a run whose eval finished under an earlier build (its stages skipped) ended on a KeyError
    for the row that build did not write; the row is left out instead."""
    import json

    from rlhf.stages.demo import summary_lines

    metrics = {"kl_to_reference": 1.5, "correct_rate": 0.8, "non_responsive_rate": 0.0, "hallucinated_rate": 0.0,
               "harmful_rate": 0.0, "toxic_rate": 0.1, "mean_words": 6.0, "eos_rate": 1.0}  # fmt: skip
    summary = {"n_prompts": 10, "win_rate_a": 0.7, "ci95": [0.6, 0.8], "a": metrics, "b": metrics}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "ppo_vs_sft.json").write_text(json.dumps(summary))
    lines = summary_lines(tmp_path)
    assert any(line.strip().startswith("correct") for line in lines)
    assert not any("on questions" in line for line in lines)
    both = {**metrics, "correct_question_rate": 0.75}
    (tmp_path / "eval" / "ppo_vs_sft.json").write_text(json.dumps({**summary, "a": both, "b": both}))
    assert any(line.strip().startswith("on questions") for line in summary_lines(tmp_path))


def test_the_evaluation_counts_its_prompts_that_training_saw_and_the_report_says_so(tmp_path: Path) -> None:
    """The report called the evaluation prompts held out: in the demo world 463 of the 500 were among PPO's
    prompts, 479 among the SFT demonstrations' (220 distinct questions)."""
    from rlhf.config import load_config
    from rlhf.eval.report import comparison_table

    seen, unseen = demo_task.render_prompt("What is 3 plus 4?"), demo_task.render_prompt("What is 1 plus 1?")
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": seen, "response": " 7."}) + "\n")
    (tmp_path / "rl.jsonl").write_text(
        json.dumps({"prompt": seen}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n"
    )
    cfg = load_config(None, [f"sft.train_file={tmp_path / 'sft.jsonl'}", f"ppo.prompts_file={tmp_path / 'rl.jsonl'}",
                             f"ppo.eval_prompts_file={tmp_path / 'rl.jsonl'}"])  # fmt: skip
    rows = [{"prompt": seen}, {"prompt": seen}, {"prompt": unseen}]
    overlap = demo.prompt_overlap(rows, cfg)
    assert overlap == {"prompts": 3, "distinct": 2, "in_sft": 2, "in_ppo": 2, "in_tune": 2}
    summary = {"n_prompts": 3, "sampling": {"temperature": 0.7}, "win_rate_a": 0.5, "ci95": [0.4, 0.6],
               "a": {}, "b": {}, "prompt_overlap": overlap}  # fmt: skip
    html = comparison_table(summary, dict(summary, prompt_overlap=None))
    assert "3 evaluation prompts (2 distinct)" in html and "2 of the 3 are among PPO's prompts" in html
    assert "held-out" not in html and "2 of the evaluation prompts recur too" in html


def test_a_finished_stage_run_with_other_settings_is_refused_not_reported_as_this_runs(
    tmp_path: Path,
) -> None:
    """`rlhf demo --out RUN --set sft.lr=...` on a finished run skipped every stage and reported the earlier
    settings' results as its own (and `rlhf demo` over a `--fast` run, the fast demo's)."""
    from rlhf.errors import ConfigError

    out = tmp_path / "run"
    cfg = demo.demo_config(out, fast=True, config=None, overrides=[])
    stages = demo.Stages(out, cfg)
    out.mkdir()
    for name in ("data", "sft", "report"):
        stages.run(name, dict)
    demo.Stages(out, cfg).check_settings()  # the same settings: nothing to say
    changed = demo.demo_config(out, fast=True, config=None, overrides=["sft.lr=0.01"])
    with pytest.raises(ConfigError, match=r"sft \(sft.lr 0.001 -> 0.01\)") as e:
        demo.Stages(out, changed).check_settings()
    assert "data (" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data \(data.n_eval_prompts 100 -> 500"):
        demo.Stages(out, demo.demo_config(out, fast=False, config=None, overrides=[])).check_settings()
    # how often a stage logs or keeps checkpoints changes none of its results
    demo.Stages(out, demo.demo_config(out, fast=True, config=None, overrides=["sft.log_every=5",
                "sft.save_every=7", "sft.keep_checkpoints=1", "generate.endpoint_retries=2"])).check_settings()  # fmt: skip
    # a stage not yet run takes the new settings; a moved run directory is the same run
    demo.Stages(out, demo.demo_config(out, fast=True, config=None, overrides=["ppo.lr=0.5"])).check_settings()
    moved = tmp_path / "elsewhere"
    out.rename(moved)
    demo.Stages(moved, demo.demo_config(moved, fast=True, config=None, overrides=[])).check_settings()
    # a setting the earlier build did not have is no change
    record = json.loads((moved / "stages.json").read_text())
    del record["sft"]["settings"]["sft.lr"]
    (moved / "stages.json").write_text(json.dumps(record))
    changed = demo.demo_config(moved, fast=True, config=None, overrides=["sft.lr=0.01"])
    demo.Stages(moved, changed).check_settings()
    # stages recorded by a build that kept no settings are taken as they are
    record = json.loads((moved / "stages.json").read_text())
    (moved / "stages.json").write_text(json.dumps({k: {"seconds": v["seconds"]} for k, v in record.items()}))
    demo.Stages(moved, changed).check_settings()
