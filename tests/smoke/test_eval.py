"""`rlhf eval` on tiny models: a policy against itself, through the CLI, with a JSON summary."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rlhf.cli import app


def test_a_policy_against_itself_wins_half_the_time(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    args = ["eval", sft, sft, "--reference", sft, "--out", str(out), "--quiet",  # as every stage takes it
            "--set", f"eval.prompts_file={demo_data / 'rl_prompts.jsonl'}", "--set", "eval.n_prompts=64",
            "--set", "eval.max_new_tokens=12", "--set", "eval.precision=fp32", "--set", "eval.bootstrap=500"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["n_prompts"] == 64 and summary["judge"] == "gold"
    assert summary["wins_a"] + summary["ties"] + summary["losses_a"] == 64
    low, high = summary["ci95"]
    assert low <= 0.5 <= high and low <= summary["win_rate_a"] <= high
    for side in ("a", "b"):
        metrics = summary[side]
        assert abs(metrics["kl_to_reference"]) < 1e-5  # the reference is the same model
        assert 0 < metrics["mean_tokens"] <= 12
        for key in (
            "eos_rate",
            "correct_rate",
            "toxic_rate",
            "hallucinated_rate",
            "harmful_rate",
            "non_responsive_rate",
            "repetitive_rate",
            "mean_words",
            "gold_utility",
        ):
            assert key in metrics
    assert len(summary["samples"]) == 20 and {"prompt", "a", "b", "a_first", "outcome_a"} <= set(
        summary["samples"][0]
    )
    assert "win rate of A over B" in result.output and "kl_to_reference" in result.output


def test_the_answers_do_not_depend_on_how_many_prompts_are_sampled_together(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    sft = str(tiny_sft_model)
    rows = []
    for batch in (5, 64):  # 24 prompts: five batches and a short one, or one
        out = tmp_path / f"eval{batch}.json"
        args = ["eval", sft, sft, "--out", str(out), "--quiet", "--set", f"eval.prompts_file={demo_data / 'rl_prompts.jsonl'}",
                "--set", "eval.n_prompts=24", "--set", "eval.max_new_tokens=12", "--set", "eval.precision=fp32",
                "--set", "eval.bootstrap=100", "--set", f"eval.batch_size={batch}"]  # fmt: skip
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        rows.append(json.loads(out.read_text())["rows"])
    assert rows[0] == rows[1] and len({r["a"] for r in rows[0]}) > 1


def test_a_policy_compared_twice_in_one_run_answers_once(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The demo compares PPO and the pretrained model each with SFT: with one `answered`, B's answers (prompts
    and red-team attacks) are sampled in the first comparison only, and are those a comparison of its own gets."""
    from rlhf.config import EvalConfig
    from rlhf.eval.judges import make_judge
    from rlhf.stages import eval as eval_stage

    sft, other = str(tiny_sft_model), tmp_path / "other"
    shutil.copytree(tiny_sft_model, other)
    cfg = EvalConfig(prompts_file=str(demo_data / "eval_prompts.jsonl"), n_prompts=16, max_new_tokens=8,
                     precision="fp32", bootstrap=100, redteam_samples=1, reference=sft)  # fmt: skip
    alone = eval_stage.compare(sft, sft, cfg, make_judge(cfg))
    sampled: list[int] = []
    answer = eval_stage.answer
    monkeypatch.setattr(eval_stage, "answer", lambda policy, tok, prompts, *args: sampled.append(len(prompts))
                        or answer(policy, tok, prompts, *args))  # fmt: skip
    answered: eval_stage.Answered = {}
    first = eval_stage.compare(str(other), sft, cfg, make_judge(cfg), answered)
    assert len(sampled) == 6  # A and B: the prompts, the held-out attacks and their mutations
    second = eval_stage.compare(sft, sft, cfg, make_judge(cfg), answered)
    assert len(sampled) == 9  # A alone
    assert second["b"] == first["b"] == alone["b"] and second["redteam"]["b"] == alone["redteam"]["b"]
    assert [r["b"] for r in second["rows"]] == [r["b"] for r in alone["rows"]]
    assert second["a"] == alone["a"]  # A (seed 0) is not B (seed 1) though the policy is the same


def best_of_4_eval(a: str, b: str, out: Path, data: Path, rm: Path, prompts: int, tokens: int) -> list[str]:
    """`rlhf eval A B` with A answering best-of-4 under `rm`, B's policy as the reference, in fp32."""
    sets = [f"eval.prompts_file={data / 'eval_prompts.jsonl'}", f"eval.n_prompts={prompts}",
            f"eval.max_new_tokens={tokens}", "eval.precision=fp32", "eval.bootstrap=100", "eval.best_of_n=4",
            f"eval.reward_model={rm}"]  # fmt: skip
    return ["eval", a, b, "--reference", b, "--out", str(out), *[x for s in sets for x in ("--set", s)]]


def test_best_of_n_answers_for_policy_a(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    result = CliRunner().invoke(app, best_of_4_eval(sft, sft, out, demo_data, tiny_reward_model, 8, 12))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["best_of_n_a"] == 4
    # A's KL is best-of-4's bound log 4 - 3/4; B samples the reference itself
    assert abs(summary["a"]["kl_to_reference"] - (math.log(4) - 0.75)) < 1e-9
    assert abs(summary["b"]["kl_to_reference"]) < 1e-5
    assert (
        "(best of 4)" in result.output
        and "(A's KL is best-of-n's bound, log n - (n - 1) / n, not" in result.output
    )


def test_best_of_n_answers_the_red_team_attacks_too(
    tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A's red-team rates are measured on answers chosen as its answers to the prompts are: best of n."""
    from rlhf.config import EvalConfig
    from rlhf.eval.judges import make_judge
    from rlhf.stages import eval as eval_stage

    sft = str(tiny_sft_model)
    cfg = EvalConfig(prompts_file=str(demo_data / "eval_prompts.jsonl"), n_prompts=4, max_new_tokens=8,
                     precision="fp32", bootstrap=100, redteam_samples=1, best_of_n=2,
                     reward_model=str(tiny_reward_model))  # fmt: skip
    picked: list[tuple[int, bool]] = []  # (prompts, best of n) per call
    answer = eval_stage.answer
    monkeypatch.setattr(eval_stage, "answer", lambda policy, tok, prompts, *args: picked.append(
        (len(prompts), len(args) > 4 and args[4] is not None)) or answer(policy, tok, prompts, *args))  # fmt: skip
    summary = eval_stage.compare(sft, sft, cfg, make_judge(cfg))
    assert "redteam" in summary and len(picked) == 6  # A and B: the prompts, the attacks, their mutations
    assert [best for _, best in picked] == [True, False, True, True, False, False]


def test_best_of_n_of_another_policy_than_the_reference_has_no_kl_to_it(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """The bound log n - (n - 1)/n is best-of-n's KL to the policy it samples, not to a reference A is not."""
    other = tmp_path / "other"  # another policy (here a copy: what counts is that A is not the reference)
    shutil.copytree(tiny_sft_model, other)
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    result = CliRunner().invoke(app, best_of_4_eval(str(other), sft, out, demo_data, tiny_reward_model, 4, 8))
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["a"]["kl_to_reference"] is None and abs(summary["b"]["kl_to_reference"]) < 1e-5


def test_best_of_n_without_a_reward_model_is_a_config_error(tiny_sft_model: Path) -> None:
    sft = str(tiny_sft_model)
    result = CliRunner().invoke(app, ["eval", sft, sft, "--set", "eval.best_of_n=4"])
    assert result.exit_code != 0
    assert "best_of_n > 1 needs reward_model" in str(result.exception) + result.output


def test_own_prompts_with_a_reward_model_judge_print_no_gold_metrics(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"User: Tell me about topic {i}.\nAssistant:"}) + "\n"
                               for i in range(10)))  # fmt: skip
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    args = ["eval", sft, sft, "--out", str(out), "--set", f"eval.prompts_file={prompts}",
            "--set", "eval.max_new_tokens=8", "--set", "eval.precision=fp32", "--set", "eval.bootstrap=200",
            "--set", "eval.judge=reward_model", "--set", f"eval.judge_model={tiny_reward_model}",
            "--set", "eval.redteam_samples=2"]  # fmt: skip
    with caplog.at_level("WARNING", logger="rlhf.stages.eval"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["judge"] == "reward_model" and summary["demo_prompts"] is False
    assert "redteam" not in summary and "redteam_samples is left out" in caplog.text  # said, not dropped
    assert 0 <= summary["win_rate_a"] <= 1 and len(summary["ci95"]) == 2
    for side in ("a", "b"):
        assert {"mean_tokens", "eos_rate"} <= set(summary[side])
        assert not {"correct_rate", "toxic_rate", "gold_utility", "mean_words"} & set(summary[side])
    assert "win rate of A over B (reward_model judge, 10 prompts" in result.output
    for gold_only in ("correct_rate", "toxic_rate", "gold_utility", "hallucinated_rate"):
        assert gold_only not in result.output
    assert "not the demo task's prompts" in result.output


def test_demo_prompts_are_recognised(demo_data: Path) -> None:
    from rlhf.eval.judges import is_demo_prompt

    demo = [
        json.loads(line)["prompt"] for line in (demo_data / "eval_prompts.jsonl").read_text().splitlines()
    ]
    assert all(is_demo_prompt(p) for p in demo)
    assert not is_demo_prompt("User: Tell me a joke about cats.\nAssistant:")
    assert not is_demo_prompt("Summarise this article: ...")


def test_a_judge_without_its_model_is_a_one_line_config_error(tiny_sft_model: Path) -> None:
    sft = str(tiny_sft_model)
    result = CliRunner().invoke(
        app, ["eval", sft, sft, "--set", "eval.judge=endpoint", "--set", "eval.judge_model=m"]
    )
    assert result.exit_code != 0 and "judge=endpoint needs judge_url" in str(result.exception) + result.output


def test_judge_choices_are_text_and_must_differ() -> None:
    from rlhf.config import load_config
    from rlhf.errors import ConfigError

    assert load_config(None, ["eval.judge_choices=[1,2]"]).eval.judge_choices == ("1", "2")
    with pytest.raises(ConfigError, match="judge_choices must be two different tokens"):
        load_config(None, ["eval.judge_choices=[A,A]"])
    with pytest.raises(ConfigError, match="judge_template lacks {second}"):
        load_config(None, ["eval.judge_template={prompt} {first}"])


def test_the_people_judge_cannot_judge_on_the_spot() -> None:
    from rlhf.config import load_config
    from rlhf.errors import ConfigError
    from rlhf.eval.judges import make_judge

    cfg = load_config(None, ["eval.judge=people", "eval.judge_db=sqlite:///x.db"]).eval
    with pytest.raises(ConfigError, match="rlhf eval --collect"):
        make_judge(cfg)


def test_a_local_judge_too_small_for_the_answers_is_found_before_any_answer_is_sampled(
    tiny_sft_model: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The tiny model as its own judge (a context of 128 tokens): a short template leaves room for answers of
    fewer than 100 tokens, a warning before sampling; the default template alone fills the context, an error
    before sampling (it used to come after both policies had answered every prompt)."""
    from rlhf.config import load_config
    from rlhf.errors import RlhfError
    from rlhf.eval.judges import make_judge
    from rlhf.stages import eval as eval_stage

    sampled: list[str] = []

    def answer_both(policy_a: str, *_: object) -> None:
        sampled.append(policy_a)
        raise RuntimeError("sampled")

    monkeypatch.setattr(eval_stage, "answer_both", answer_both)
    sft = str(tiny_sft_model)
    sets = [f"eval.prompts_file={demo_data / 'rl_prompts.jsonl'}", "eval.n_prompts=8", "eval.judge=local",
            f"eval.judge_model={sft}"]  # fmt: skip
    short = "eval.judge_template={prompt} A:{first} B:{second} Better:"
    cfg = load_config(None, [*sets, short, "eval.max_new_tokens=100"]).eval
    with caplog.at_level("WARNING", logger="rlhf.stages.eval"), pytest.raises(RuntimeError, match="sampled"):
        eval_stage.compare(sft, sft, cfg, make_judge(cfg))
    assert "answers may reach eval.max_new_tokens (100)" in caplog.text and sampled == [sft]

    caplog.clear()
    cfg = load_config(None, [*sets, short, "eval.max_new_tokens=12"]).eval
    with caplog.at_level("WARNING", logger="rlhf.stages.eval"), pytest.raises(RuntimeError, match="sampled"):
        eval_stage.compare(sft, sft, cfg, make_judge(cfg))
    assert "max_new_tokens" not in caplog.text  # room for answers of 12 tokens: nothing to say

    cfg = load_config(None, sets).eval
    with pytest.raises(RlhfError, match=r"the judging prompts fill the local judge's context"):
        eval_stage.compare(sft, sft, cfg, make_judge(cfg))
    assert len(sampled) == 2
