"""PPO and GRPO scored by Python reward functions alone (no reward model): each answer reaches the function
with its own prompt's row, and the score PPO trains on is the function's value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf.models.loading import load_causal_lm
from rlhf.runs import read_metrics
from rlhf.stages import ppo
from tests.smoke.test_ppo import capture_models, max_change, tiny_ppo

REWARDS = """
import json
def length(prompts, completions, key, **kwargs):
    with open(LOG, "a") as f:
        f.write(json.dumps([prompts, key]) + "\\n")
    return [float(len(c)) for c in completions]
"""


def with_key(source: Path, out: Path) -> Path:
    """The prompts of `source` with a `key` column: each prompt in capitals."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    out.write_text("".join(json.dumps(r | {"key": r["prompt"].upper()}) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_reward_functions_alone_score_the_answers_each_with_its_prompts_row(
    estimator: str, tmp_path: Path, tiny_sft_model: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = capture_models(monkeypatch)
    log = tmp_path / "calls.jsonl"
    rewards = tmp_path / "rewards.py"
    rewards.write_text(f"LOG = {str(log)!r}\n" + REWARDS)
    prompts = with_key(demo_data / "rl_prompts.jsonl", tmp_path / "rl.jsonl")
    held_out = with_key(demo_data / "eval_prompts.jsonl", tmp_path / "eval.jsonl")
    cfg = tiny_ppo(
        tmp_path / "run", tiny_sft_model, tmp_path / "unused", demo_data, reward_model=None,
        reward_functions=[f"{rewards}:length"], reward_function_weights=[0.5], prompts_file=str(prompts),
        eval_prompts_file=str(held_out), guard_every=2, guard_prompts=8, no_eos_penalty=None,
        advantage_estimator=estimator, samples_per_prompt=2 if estimator == "grpo" else 1,
    )  # fmt: skip
    result = ppo.run(cfg, quiet=True)

    assert result["stop_reason"] == "completed"
    assert seen["reward_model"] is None
    assert (seen["critic"] is None) == (estimator == "grpo")  # PPO's critic starts from the policy
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2 + 2  # two iterations, the guard at 0 and 2
    for prompts_seen, keys in calls:  # every answer came with its own prompt's row
        assert keys == [p.upper() for p in prompts_seen]
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "ppo/score" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:  # no reward model: the score is the function's value times its weight
        assert row["ppo/reward_fn/length"] > 0
        assert row["ppo/score"] == pytest.approx(0.5 * row["ppo/reward_fn/length"], rel=1e-5)
    final = load_causal_lm(str(tmp_path / "run" / "final"))
    assert max_change(final, load_causal_lm(str(tiny_sft_model))) > 1e-4
