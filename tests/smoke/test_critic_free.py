"""The RL stage's critic-free estimators (RLOO, GRPO, REINFORCE++) on tiny models: no critic is built or saved,
the policy trains, every metric stays finite, and a resumed run continues like an uninterrupted one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from rlhf.models.loading import load_causal_lm
from rlhf.runs import read_metrics
from rlhf.stages import ppo
from tests.smoke.test_ppo import assert_same_metrics, capture_models, max_change, tiny_ppo

VARIANTS: dict[str, dict[str, Any]] = {
    "rloo": dict(advantage_estimator="rloo", samples_per_prompt=4),
    # Dr. GRPO with DAPO's corrections and the KL as a k3 loss term
    "grpo": dict(
        advantage_estimator="grpo",
        samples_per_prompt=4,
        grpo_scale_by_std=False,
        kl_in="loss",
        kl_estimator="k3",
        clip_eps_high=0.28,
        loss_aggregation="seq_mean_token_sum_norm",
    ),  # fmt: skip
    "reinforce_pp": dict(advantage_estimator="reinforce_pp", samples_per_prompt=2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_iterations_train_the_policy_without_a_critic(
    variant: str, tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    seen = capture_models(monkeypatch)
    guard = dict(eval_prompts_file=str(demo_data / "eval_prompts.jsonl"), guard_every=2, guard_prompts=8)
    # seed 1: a draw where some first-iteration answer ends (with none, every reward is the no-EOS penalty, every
    # critic-free advantage 0 and the first update empty)
    cfg = tiny_ppo(
        tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, **VARIANTS[variant], **guard, seed=1
    )
    result = ppo.run(cfg, quiet=True)

    assert result["stop_reason"] == "completed"
    assert seen["critic"] is None
    all_rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # the reward-hacking guard runs without a critic too: the baseline at 0, then after iteration 2
    assert [r["step"] for r in all_rows if "ppo/guard_kl" in r] == [0, 2]
    assert (tmp_path / "run" / "best" / "guard.json").exists()
    rows = [r for r in all_rows if "ppo/score" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert "ppo/value_loss" not in row
        for key in (
            "ppo/score",
            "ppo/kl",
            "ppo/policy_loss",
            "ppo/clipfrac",
            "ppo/approx_kl",
            "ppo/grad_norm",
        ):
            assert math.isfinite(row[key]), (key, row[key])
        assert row["ppo/grad_norm"] > 0
    if variant == "grpo":
        assert all(math.isfinite(r["ppo/kl_loss"]) for r in rows)
    final = load_causal_lm(str(tmp_path / "run" / "final"))
    assert max_change(final, load_causal_lm(str(tiny_sft_model))) > 1e-4
    assert not (tmp_path / "run" / "checkpoints" / "step-0000002" / "critic").exists()


def test_critic_free_run_resumes_like_an_uninterrupted_one(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    settings = VARIANTS["grpo"] | {"iterations": 3, "save_every": 1}
    whole = tiny_ppo(tmp_path / "whole", tiny_sft_model, tiny_reward_model, demo_data, **settings)
    ppo.run(whole, quiet=True)
    cut = tiny_ppo(tmp_path / "cut", tiny_sft_model, tiny_reward_model, demo_data, **settings, max_steps=2)
    ppo.run(cut, quiet=True)
    ppo.run(cut.model_copy(update={"max_steps": 0}), resume=True, quiet=True)
    assert_same_metrics(
        read_metrics(tmp_path / "cut" / "metrics.jsonl"), read_metrics(tmp_path / "whole" / "metrics.jsonl")
    )
