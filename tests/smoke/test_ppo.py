"""`rlhf ppo` on tiny models: a few iterations change the policy and critic, never the reference or the RM."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel

from rlhf.config import PPOConfig
from rlhf.engine.decoding import left_pad
from rlhf.models.heads import build_scalar_model, load_scalar_model, sequence_rewards, set_normalisation
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.runs import read_metrics
from rlhf.stages import ppo
from tests.cli import launch_two, run_cli

REPO = Path(__file__).resolve().parents[2]
METRICS = ["ppo/score", "ppo/kl", "ppo/kl_coef", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/value_error",
           "ppo/vf_clipfrac", "ppo/response_length", "ppo/eos_rate", "ppo/policy_loss", "ppo/value_loss"]  # fmt: skip


def tiny_ppo(out: Path, sft: Path, rm: Path, data: Path, **overrides: Any) -> PPOConfig:
    """A PPO config that runs in about a second per iteration on tiny models."""
    base: dict[str, Any] = dict(
        out_dir=str(out), policy=str(sft), reward_model=str(rm), prompts_file=str(data / "rl_prompts.jsonl"),
        iterations=2, batch_size=8, minibatch_size=4, micro_batch_size=2, epochs=2, max_new_tokens=12,
        lr=1e-3, critic_lr=1e-3, precision="fp32", save_every=1, log_every=1, seed=0,
    )  # fmt: skip
    return PPOConfig(**(base | overrides))


def capture_models(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Keep the models that ppo.run builds, to inspect them after the run."""
    seen: dict[str, Any] = {}
    original = ppo.load_models

    def spy(cfg: PPOConfig, checkpoint: Path | None, tokenizer: Any) -> Any:
        models = original(cfg, checkpoint, tokenizer)
        seen.update(zip(["policy", "reference", "critic", "reward_model"], models, strict=True))
        return models

    monkeypatch.setattr(ppo, "load_models", spy)
    return seen


def max_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float().cpu() - sb[k].float().cpu()).abs().max()) for k in sa)


def test_two_iterations_train_policy_and_critic_only(
    tmp_path: Path,
    tiny_sft_model: Path,
    tiny_reward_model: Path,
    demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = capture_models(monkeypatch)
    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data)
    result = ppo.run(cfg, quiet=True)

    assert result["stop_reason"] == "completed"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in METRICS:
            assert math.isfinite(row[key]), (key, row[key])
    assert rows[0]["ppo/kl_coef"] == cfg.kl_coef
    assert 0 < rows[0]["ppo/response_length"] <= cfg.max_new_tokens
    # the first minibatch sees ratio 1 exactly; later ones moved, so the policy changed during the update
    assert rows[0]["ppo/approx_kl"] > 0

    sft, rm = load_causal_lm(str(tiny_sft_model)), load_scalar_model(str(tiny_reward_model))
    assert max_change(load_causal_lm(str(tmp_path / "run" / "final")), sft) > 1e-4
    critic = load_scalar_model(str(tmp_path / "run" / "checkpoints" / "step-0000002" / "critic"))
    assert max_change(critic, rm) > 1e-4
    assert max_change(seen["reference"], sft) == 0.0
    assert max_change(seen["reward_model"], rm) == 0.0
    assert not any(p.requires_grad for p in seen["reference"].parameters())
    assert all(m.p == 0.0 for m in seen["policy"].modules() if isinstance(m, torch.nn.Dropout))
    summary = (tmp_path / "run" / "summary.json").read_text()
    assert '"iterations": 2' in summary


def test_lora_keeps_one_copy_and_merges_at_the_end(
    tmp_path: Path,
    tiny_sft_model: Path,
    tiny_reward_model: Path,
    demo_data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = capture_models(monkeypatch)
    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, lora={"r": 4}, lr=1e-2)
    ppo.run(cfg, quiet=True)

    # the policy as it trained (on the GPU where there is one), compared on the CPU
    policy, sft = seen["policy"].cpu(), load_causal_lm(str(tiny_sft_model))
    assert seen["reference"] is None  # the reference is the policy itself with its adapter disabled
    assert isinstance(policy, PeftModel)
    n_base = sum(p.numel() for p in sft.parameters())
    n_policy = sum(p.numel() for p in policy.parameters())
    n_trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
    assert n_base < n_policy < 1.5 * n_base  # base weights plus small adapters, not a second model
    assert 0 < n_trainable < 0.5 * n_base
    ids = torch.tensor([[5, 17, 42, 9, 23]])
    with torch.no_grad():
        assert not torch.allclose(policy(input_ids=ids).logits, sft(input_ids=ids).logits)
        with policy.disable_adapter():  # the frozen base weights are the SFT model's, untouched
            torch.testing.assert_close(policy(input_ids=ids).logits, sft(input_ids=ids).logits)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert (checkpoint / "policy" / "adapter_config.json").exists()
    assert (checkpoint / "critic" / "adapter_config.json").exists()
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged into a plain Hugging Face checkpoint
    assert max_change(load_causal_lm(str(final)), sft) > 1e-5


# --- resume -------------------------------------------------------------------------------------------

TIMING = ("ppo/rollout_s", "ppo/iteration_s")


def assert_same_metrics(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    assert [r["step"] for r in actual] == [r["step"] for r in expected]
    for got, want in zip(actual, expected, strict=True):
        for key in want:
            if key not in TIMING:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, tiny_sft_model: Path, tiny_reward_model: Path,
                  demo_data: Path) -> list[dict[str, Any]]:  # fmt: skip
    """Metrics of a 4-iteration run that nothing interrupts (adaptive KL, so its state must resume too)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    ppo.run(tiny_ppo(out, tiny_sft_model, tiny_reward_model, demo_data, **RESUMABLE), quiet=True)
    return read_metrics(out / "metrics.jsonl")


RESUMABLE: dict[str, Any] = dict(iterations=4, adaptive_kl=True, kl_target=0.5, kl_horizon=50, save_every=2)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_micro_batch_size_does_not_change_the_update(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path, aggregation: str
) -> None:
    """Micro-batches only bound memory: minibatches of 4 answers of different lengths in one micro-batch or in
    micro-batches of 1 (48 new tokens: some answers end sooner) give the same gradients (norms before clipping) and so the same policy."""
    runs = []
    for micro in (4, 1):
        cfg = tiny_ppo(tmp_path / f"micro{micro}", tiny_sft_model, tiny_reward_model, demo_data, iterations=1,
                       epochs=1, micro_batch_size=micro, loss_aggregation=aggregation, max_new_tokens=48)  # fmt: skip
        ppo.run(cfg, quiet=True)
        runs.append(read_metrics(tmp_path / f"micro{micro}" / "metrics.jsonl")[0])
    one, many = runs
    assert (
        one["ppo/response_length"] == many["ppo/response_length"] < 48
    )  # the same rollout, lengths that differ
    for key in ("ppo/grad_norm", "ppo/critic_grad_norm"):
        assert many[key] == pytest.approx(one[key], rel=1e-4), key


def test_resume_continues_like_an_uninterrupted_run(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path,
    uninterrupted: list[dict[str, Any]],
) -> None:  # fmt: skip
    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, **RESUMABLE, max_steps=2)
    ppo.run(cfg, quiet=True)  # stops after 2 of 4 iterations, with a checkpoint
    assert len(read_metrics(tmp_path / "run" / "metrics.jsonl")) == 2
    ppo.run(cfg.model_copy(update={"max_steps": 0}), resume=True, quiet=True)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert_same_metrics(rows, uninterrupted)
    assert rows[-1]["ppo/kl_coef"] != cfg.kl_coef  # the adaptive controller moved, and resumed where it was
    # resumed with nothing left to train (killed while saving the final policy): that iteration's metrics
    again = ppo.run(cfg.model_copy(update={"max_steps": 0}), resume=True, quiet=True)
    assert again["ppo/kl"] == rows[-1]["ppo/kl"] and again["ppo/score"] == rows[-1]["ppo/score"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["ppo/kl"] == rows[-1]["ppo/kl"]


def test_killed_run_resumes_to_the_same_result(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path,
    uninterrupted: list[dict[str, Any]],
) -> None:  # fmt: skip
    cfg = tiny_ppo(
        tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, **(RESUMABLE | {"save_every": 1})
    )
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"ppo": cfg.model_dump(mode="json")}))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "rlhf.cli", "ppo", "-q", "-c", str(config_file)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer_state.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists()

    result = run_cli("ppo", "-q", "-c", str(config_file), "--resume")  # in this process: no second start-up
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert_same_metrics(rows, uninterrupted)
    assert '"iterations": 4' in (tmp_path / "run" / "summary.json").read_text()


# --- reward-hacking guard -------------------------------------------------------------------------------


def test_guard_stops_a_hacked_run_and_keeps_the_best_policy(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    # A deliberately hackable proxy: gold is minus the reward model's score, so with no KL penalty every proxy
    # gain PPO makes is a gold loss.
    tokenizer, rm = load_tokenizer(str(tiny_sft_model)), load_scalar_model(str(tiny_reward_model))

    def gold_fn(prompts: list[str], responses: list[str], ended: list[bool]) -> list[float]:
        seqs = [tokenizer(p + r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] * e
                for p, r, e in zip(prompts, responses, ended, strict=True)]  # fmt: skip
        with torch.no_grad():
            return (-sequence_rewards(rm, *left_pad(seqs, tokenizer.pad_token_id))).tolist()

    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, kl_coef=0.0,
                   no_eos_penalty=None, iterations=12, lr=3e-3, eval_prompts_file=str(demo_data / "eval_prompts.jsonl"),
                   guard_every=1, guard_prompts=16, guard_patience=2, save_every=100)  # fmt: skip
    result = ppo.run(cfg, quiet=True, gold_fn=gold_fn)

    assert result["stop_reason"].startswith("reward hacking")
    guard_rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "ppo/guard_gold" in r]
    assert [r["step"] for r in guard_rows] == list(range(len(guard_rows)))  # iteration 0 is the baseline
    # the exact KL over the vocabulary: 0 while the policy is the reference, never below 0 (k1 can be)
    assert guard_rows[0]["ppo/guard_kl"] == pytest.approx(0.0, abs=1e-6)
    assert all(r["ppo/guard_kl"] >= 0 for r in guard_rows) and guard_rows[-1]["ppo/guard_kl"] > 0
    stopped_at = guard_rows[-1]["step"]
    assert 2 <= stopped_at < cfg.iterations
    last = guard_rows[-3:]
    assert last[0]["ppo/guard_proxy"] < last[1]["ppo/guard_proxy"] < last[2]["ppo/guard_proxy"]
    assert last[0]["ppo/guard_gold"] > last[1]["ppo/guard_gold"] > last[2]["ppo/guard_gold"]
    best = max(guard_rows, key=lambda r: r["ppo/guard_gold"])
    kept = json.loads((tmp_path / "run" / "best" / "guard.json").read_text())
    assert kept["iteration"] == best["step"] and kept["ppo/guard_gold"] == pytest.approx(
        best["ppo/guard_gold"]
    )
    assert load_causal_lm(str(tmp_path / "run" / "best")) is not None
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stop_reason"] == result["stop_reason"] and summary["iterations"] == stopped_at


def test_kl_budget_stops_the_run(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data, iterations=4, lr=3e-3,
                   kl_estimator="k3", kl_budget=1e-6, eval_prompts_file=str(demo_data / "eval_prompts.jsonl"),
                   guard_every=1, guard_prompts=8)  # fmt: skip
    result = ppo.run(cfg, quiet=True)  # no gold: the best is by proxy
    assert result["stop_reason"].startswith("KL budget")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 1 and summary["best_iteration"] in (0, 1)
    assert "ppo/guard_gold" not in read_metrics(tmp_path / "run" / "metrics.jsonl")[0]


def test_a_colder_reference_is_what_the_penalty_reads_and_the_guard_does_not(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """At the first iteration the policy is the reference: its penalty is 0 unless the reference is read at
    another temperature; the guard's KL, to the reference at the sampling temperature, is 0 either way."""
    kls = {}
    for ref_temperature in (None, 0.3):
        out = tmp_path / str(ref_temperature)
        cfg = tiny_ppo(out, tiny_sft_model, tiny_reward_model, demo_data, iterations=1, temperature=0.7,
                       ref_temperature=ref_temperature, eval_prompts_file=str(demo_data / "eval_prompts.jsonl"),
                       guard_every=1, guard_prompts=8)  # fmt: skip
        ppo.run(cfg, quiet=True)
        rows = read_metrics(out / "metrics.jsonl")
        assert rows[0]["step"] == 0 and rows[0]["ppo/guard_kl"] == pytest.approx(0, abs=1e-5)
        kls[ref_temperature] = next(r["ppo/kl"] for r in rows if r["step"] == 1)
    assert kls[None] == pytest.approx(0, abs=1e-5)
    assert kls[0.3] > 0.05


def test_fewer_guard_prompts_than_processes_is_one_line_on_every_process(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """Two processes share one held-out prompt: the one without a prompt would skip the guard while the other
    waited for it in the guard's all-reduce (the run hung); both stop at once instead."""
    cfg = tiny_ppo(tmp_path / "run", tiny_sft_model, tiny_reward_model, demo_data,
                   eval_prompts_file=str(demo_data / "eval_prompts.jsonl"), guard_prompts=1)  # fmt: skip
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"ppo": cfg.model_dump(mode="json")}))
    cmd = launch_two("-m", "rlhf.cli", "ppo", "-q", "-c", str(config_file))
    proc = subprocess.run(cmd, cwd=REPO, env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: ppo: 1 held-out prompts for the guard "
                      f"({demo_data / 'eval_prompts.jsonl'}) are fewer than the 2 processes that share them"] * 2  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_the_guard_on_two_processes_evaluates_every_held_out_prompt(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """Three held-out prompts on two processes (DDP): the guard's first evaluation, of the SFT policy, is the one
    process's, over all three (it dropped the third, so the process count chose the checkpoint's prompts)."""
    fields = dict(eval_prompts_file=str(demo_data / "eval_prompts.jsonl"), guard_prompts=3, guard_every=1,
                  iterations=1, no_eos_penalty=None)  # fmt: skip
    ppo.run(tiny_ppo(tmp_path / "one", tiny_sft_model, tiny_reward_model, demo_data, **fields), quiet=True)
    cfg = tiny_ppo(tmp_path / "two", tiny_sft_model, tiny_reward_model, demo_data, **fields)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"ppo": cfg.model_dump(mode="json")}))
    proc = subprocess.run(launch_two("-m", "rlhf.cli", "ppo", "-q", "-c", str(config_file)), cwd=REPO,
                          env=os.environ | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = {run: next(r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "ppo/guard_proxy" in r)
             for run in ("one", "two")}  # fmt: skip
    for key in ("ppo/guard_proxy", "ppo/guard_kl"):
        assert first["two"][key] == pytest.approx(first["one"][key], abs=1e-5), key


def test_an_ensemble_of_one_reward_model_twice_trains_as_that_model_alone(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    # scores read from the reward models even where an answer never ends (the tiny policy rarely ends)
    # the members agree everywhere: their std is 0, so any penalty leaves the score, and the run, unchanged
    ppo.run(
        tiny_ppo(tmp_path / "one", tiny_sft_model, tiny_reward_model, demo_data, no_eos_penalty=None),
        quiet=True,
    )
    ppo.run(tiny_ppo(tmp_path / "two", tiny_sft_model, tiny_reward_model, demo_data,
                     reward_ensemble=[str(tiny_reward_model)], ensemble_penalty=2.0, no_eos_penalty=None), quiet=True)  # fmt: skip
    one, two = (read_metrics(tmp_path / name / "metrics.jsonl") for name in ("one", "two"))
    assert [r["ppo/score"] for r in one] == pytest.approx([r["ppo/score"] for r in two], abs=1e-5)
    assert [r["ppo/kl"] for r in one] == pytest.approx([r["ppo/kl"] for r in two], abs=1e-5)
    policy = lambda name: load_causal_lm(str(tmp_path / name / "final"))  # noqa: E731
    assert max_change(policy("one"), policy("two")) < 1e-4
    # a member that scores otherwise: the first iteration's score is the members' mean, less their std
    other = tmp_path / "other_rm"
    model = build_scalar_model(str(tiny_sft_model), seed=1)
    set_normalisation(model, 0.0, 1.0)
    model.save_pretrained(other)
    load_tokenizer(str(tiny_sft_model)).save_pretrained(other)
    cfg = tiny_ppo(tmp_path / "mixed", tiny_sft_model, tiny_reward_model, demo_data, iterations=1,
                   reward_ensemble=[str(other)], ensemble_penalty=1.0, no_eos_penalty=None)  # fmt: skip
    ppo.run(cfg, quiet=True)
    mixed = read_metrics(tmp_path / "mixed" / "metrics.jsonl")[0]["ppo/score"]
    ppo.run(
        tiny_ppo(tmp_path / "other", tiny_sft_model, other, demo_data, iterations=1, no_eos_penalty=None),
        quiet=True,
    )
    other_score = read_metrics(tmp_path / "other" / "metrics.jsonl")[0]["ppo/score"]
    # the same first rollouts (same seed, same policy): mean of the two scores minus std <= their mean
    assert mixed < (one[0]["ppo/score"] + other_score) / 2 - 1e-4


def test_a_safety_reward_model_scores_the_prompts_it_is_given(
    tmp_path: Path, tiny_sft_model: Path, tiny_reward_model: Path, demo_data: Path
) -> None:
    """The safety model is the reward model shifted by +100: each routed answer's score rises by exactly 100,
    in the rollouts and in the guard's proxy score, and an answer not routed keeps its score."""
    safety = tmp_path / "safety_rm"
    model = load_scalar_model(str(tiny_reward_model))
    set_normalisation(model, -100.0, 1.0)
    model.save_pretrained(safety)
    load_tokenizer(str(tiny_reward_model)).save_pretrained(safety)
    common = dict(iterations=1, no_eos_penalty=None, eval_prompts_file=str(demo_data / "eval_prompts.jsonl"),
                  guard_prompts=4, guard_every=1)  # fmt: skip
    runs = {
        "plain": {},
        "none": dict(
            safety_reward_model=str(safety), safety_prompts=["(?!)"]
        ),  # a pattern that never matches
        "all": dict(safety_reward_model=str(safety), safety_prompts=["."]),
        "below": dict(safety_reward_model=str(safety), safety_threshold=1000.0),  # every score is below it
    }
    rows = {}
    for name, extra in runs.items():
        ppo.run(tiny_ppo(tmp_path / name, tiny_sft_model, tiny_reward_model, demo_data, **common, **extra),
                quiet=True)  # fmt: skip
        rows[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    for key in ("ppo/score", "ppo/guard_proxy"):
        plain = next(r[key] for r in rows["plain"] if key in r)  # the first rollouts, or the initial guard
        for name, offset in (("none", 0.0), ("all", 100.0), ("below", 100.0)):
            got = next(r[key] for r in rows[name] if key in r)
            assert got == pytest.approx(plain + offset, abs=1e-3), (name, key)


def test_a_causal_lm_as_the_reward_model_fails_before_a_critic_is_made_from_it(
    tmp_path: Path, tiny_sft_model: Path, demo_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-line error comes first: no critic is loaded from that path (it would get a new, random value
    head and print transformers' missing-weights report before the error)."""
    from rlhf.errors import RlhfError
    from rlhf.models import wrappers

    critics: list[str] = []
    original = wrappers.load_scalar_model

    def spy(path: str, *args: Any, **kwargs: Any) -> Any:
        critics.append(path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(wrappers, "load_scalar_model", spy)
    cfg = tiny_ppo(tmp_path / "ppo", tiny_sft_model, tiny_sft_model, demo_data)
    with pytest.raises(RlhfError, match=r"is not a reward model \(\w+ForCausalLM\)"):
        ppo.run(cfg, quiet=True)
    assert critics == []
