"""`rlhf eval` on tiny models: a policy against itself, through the CLI, with a JSON summary."""

from __future__ import annotations

import json
import math
from pathlib import Path

from typer.testing import CliRunner

from rlhf.cli import app


def test_a_policy_against_itself_wins_half_the_time(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path
) -> None:
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    args = ["eval", sft, sft, "--reference", sft, "--out", str(out),
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


def test_best_of_n_answers_for_policy_a(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    out = tmp_path / "eval.json"
    sft = str(tiny_sft_model)
    args = ["eval", sft, sft, "--reference", sft, "--out", str(out),
            "--set", f"eval.prompts_file={demo_data / 'eval_prompts.jsonl'}", "--set", "eval.n_prompts=8",
            "--set", "eval.max_new_tokens=12", "--set", "eval.precision=fp32", "--set", "eval.bootstrap=100",
            "--set", "eval.best_of_n=4", "--set", f"eval.reward_model={tiny_reward_model}"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.read_text())
    assert summary["best_of_n_a"] == 4
    # A's KL is best-of-4's bound log 4 - 3/4; B samples the reference itself
    assert abs(summary["a"]["kl_to_reference"] - (math.log(4) - 0.75)) < 1e-9
    assert abs(summary["b"]["kl_to_reference"]) < 1e-5
    assert "(best of 4)" in result.output


def test_best_of_n_without_a_reward_model_is_a_config_error(tiny_sft_model: Path) -> None:
    sft = str(tiny_sft_model)
    result = CliRunner().invoke(app, ["eval", sft, sft, "--set", "eval.best_of_n=4"])
    assert result.exit_code != 0
    assert "best_of_n > 1 needs reward_model" in str(result.exception) + result.output
