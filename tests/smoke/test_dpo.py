"""`rlhf dpo` on a tiny model: each loss trains the policy from pairs and rankings, the reference's log-probs are
cached once, LoRA keeps one copy, and a killed run resumes to the same result."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel

from rlhf.config import DPOConfig
from rlhf.errors import DataError, RlhfError
from rlhf.models import lora as lora_module
from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.models.wrappers import Actor
from rlhf.runs import read_metrics
from rlhf.stages import dpo
from tests.cli import launch_two, run_cli
from tests.smoke.test_ppo import max_change

REPO = Path(__file__).resolve().parents[2]
METRICS = [
    "dpo/loss",
    "dpo/accuracy",
    "dpo/margin",
    "dpo/chosen_reward",
    "dpo/rejected_reward",
    "dpo/grad_norm",
]


@pytest.fixture(scope="module")
def preferences(tmp_path_factory: pytest.TempPathFactory, demo_candidates: list[dict[str, Any]]) -> Path:
    """Pairs (the answer that ends over the one that rambles on) and, for every fourth prompt, a ranking of 3."""
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    rows = []
    distinct = [r for r in demo_candidates if len({c["text"] for c in r["completions"][:3]}) == 3]
    for n, row in enumerate(distinct[:48]):
        texts = [c["text"] for c in row["completions"]]
        if n % 4 == 0:
            rows.append({"prompt": row["prompt"], "completions": texts[:3], "ranking": [1, 2, 3]})
        else:
            rows.append({"prompt": row["prompt"], "chosen": texts[0], "rejected": texts[1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_dpo(out: Path, sft: Path, data: Path, **overrides: Any) -> DPOConfig:
    base: dict[str, Any] = dict(
        out_dir=str(out), policy=str(sft), train_file=str(data), max_seq_len=64, batch_size=8,
        micro_batch_size=4, lr=1e-3, warmup_steps=0, max_steps=2, precision="fp32", eval_fraction=0.2,
        eval_every=2, save_every=1, log_every=1, seed=0, beta=0.5,
    )  # fmt: skip
    return DPOConfig(**(base | overrides))


@pytest.mark.parametrize(
    "settings",
    [
        {"loss": "sigmoid"},
        {"loss": "sigmoid", "label_smoothing": 0.1},
        {"loss": "ipo"},
        {"loss": "simpo"},
        {"loss": "orpo"},
    ],
    ids=["dpo", "cdpo", "ipo", "simpo", "orpo"],
)
def test_two_steps_train_the_policy(
    settings: dict[str, Any], tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    # wide enough that no two answers are cut to the same tokens (such a pair is left out)
    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, preferences, max_seq_len=128, **settings)
    result = dpo.run(cfg, quiet=True)

    # 36 pairs + 12 rankings of 3 answers (3 pairs each), minus the held-out prompts
    assert result["train_pairs"] + result["held_out_pairs"] == 36 + 12 * 3
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "dpo/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in METRICS:
            assert math.isfinite(row[key]), (key, row[key])
    if settings["loss"] == "orpo":  # the chosen answers' NLL is part of the loss, and no reference is run
        assert all(0 < r["dpo/nll"] < r["dpo/loss"] for r in rows)
        assert not (tmp_path / "run" / dpo.REFERENCE_CACHE).exists()
    if settings["loss"] not in ("simpo", "orpo"):
        # the first step starts at the reference: every implicit reward is 0, the DPO loss log 2
        assert rows[0]["dpo/margin"] == pytest.approx(0.0, abs=1e-5)
        if settings == {"loss": "sigmoid"}:
            assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert (tmp_path / "run" / dpo.REFERENCE_CACHE).exists()
    assert math.isfinite(result["dpo/eval_accuracy"])
    assert (
        max_change(load_causal_lm(str(tmp_path / "run" / "final")), load_causal_lm(str(tiny_sft_model)))
        > 1e-4
    )


def test_kto_trains_on_answers_judged_alone_and_on_comparisons(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    """KTO reads feedback rows (one answer, good or bad) beside the comparisons' winners and losers (a ranking's
    middle answer is neither), and estimates its reference point from another prompt's answer."""
    rows = [json.loads(line) for line in preferences.read_text().splitlines()]
    feedback = [{"prompt": r["prompt"], "completion": r["chosen"], "label": n % 3 != 0}
                for n, r in enumerate(rows) if "chosen" in r]  # fmt: skip
    data = tmp_path / "kto.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [*feedback, *rows]))
    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, data, max_seq_len=128, loss="kto", eval_fraction=0.0)
    items, _ = dpo.read_judgements(str(data), cfg, load_tokenizer(str(tiny_sft_model)), 128)
    # a feedback row: 1 judged answer; a pair: chosen desirable, rejected undesirable; a ranking of 3: best, worst
    n_pairs, n_rankings = sum("chosen" in r for r in rows), sum("ranking" in r for r in rows)
    assert len(items) == len(feedback) + n_pairs + n_rankings
    assert [j.labels for j in items[: len(feedback)]] == [[f["label"]] for f in feedback]
    assert all(j.labels == [True, False] for j in items if len(j.answers) == 2)
    result = dpo.run(cfg, quiet=True)

    assert result["train_pairs"] == len(feedback) + 2 * n_pairs + 2 * n_rankings  # the judged answers
    rows_logged = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "dpo/loss" in r]
    assert [r["step"] for r in rows_logged] == [1, 2]
    for row in rows_logged:
        for key in [*METRICS, "dpo/kl"]:
            assert math.isfinite(row[key]), (key, row[key])
    # the first step is at the reference: every log-ratio and the reference point are 0, each term 1 - sigmoid(0)
    assert rows_logged[0]["dpo/loss"] == pytest.approx(0.5, abs=1e-5)
    assert (tmp_path / "run" / dpo.REFERENCE_CACHE).exists()
    assert (
        max_change(load_causal_lm(str(tmp_path / "run" / "final")), load_causal_lm(str(tiny_sft_model)))
        > 1e-4
    )


def test_kto_reads_each_judgements_kl_answer_from_the_next() -> None:
    items = [dpo.Judgement("p", [1, 2], [[5, 6, 7]], [], labels=[True]),
             dpo.Judgement("q", [3], [[8, 9], [4]], [], labels=[None, False])]  # fmt: skip
    dpo.add_kl_answers(items, max_len=3)
    assert items[0].answers[-1] == [4] and items[0].kl_answers == 1  # q's first judged answer
    assert items[1].answers[-1] == [5, 6]  # p's judged answer, cut to fit its window: 3 - 1 tokens
    assert items[1].labels == [None, False, None]
    batch = dpo.collate(items, pad_id=0)
    assert batch.labels.tolist() == [1, -1, -1, 0, -1] and batch.kl_answers.tolist() == [0, 1, 0, 0, 1]
    assert batch.n_terms == 2
    # answers judged in turn on one prompt read the next judgement on another prompt, never their own prompt's
    same = [dpo.Judgement(p, [1], [[10 + n]], [], labels=[True]) for n, p in enumerate("aab")]
    dpo.add_kl_answers(same, max_len=8)
    assert [j.answers[-1] for j in same] == [[12], [12], [10]]
    alone = [dpo.Judgement("a", [1], [[n]], [], labels=[False]) for n in range(2)]
    dpo.add_kl_answers(alone, max_len=8)  # no other prompt: no KL answer, the reference point stays 0
    assert all(j.kl_answers == 0 and len(j.answers) == 1 for j in alone)


def test_kto_leaves_out_feedback_on_gold_items_as_comparisons_are() -> None:
    from rlhf.data.preferences import Feedback, PairwiseVote

    records = [Feedback("p", "a", True, meta={"is_gold": True}), Feedback("q", "b", False),
               PairwiseVote("r", "c", "d", "A", meta={"is_gold": True})]  # fmt: skip
    groups, labels = dpo.kto_labels(records, None)
    assert [(g.prompt, g.completions) for g in groups] == [("q", ["b"])] and labels == [[False]]


def test_kto_held_out_margin_is_the_desirable_answers_mean_reward_minus_the_undesirable_ones(
    tiny_sft_model: Path, preferences: Path
) -> None:
    """A held-out micro-batch may hold no desirable (or no undesirable) answer: the margin is still the mean
    implicit reward of every desirable answer minus that of every undesirable one, however they are batched."""
    tokenizer = load_tokenizer(str(tiny_sft_model))
    rows = [json.loads(line) for line in preferences.read_text().splitlines() if "chosen" in line][:6]
    data = Path(preferences).with_name("kto_eval.jsonl")
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"], "label": n < 2}) + "\n"
                            for n, r in enumerate(rows)))  # fmt: skip
    cfg = tiny_dpo(Path("unused"), tiny_sft_model, data, loss="kto", beta=0.5)
    items = dpo.read_judgements(str(data), cfg, tokenizer, 64)[0]
    for j in items:
        j.ref_logps = [0.0] * len(j.answers)  # the log-ratio is then the policy's log-prob
    policy = Actor(load_causal_lm(str(tiny_sft_model)))
    collate_fn: dpo.CollateFn = lambda chunk: dpo.collate(chunk, tokenizer.pad_token_id)  # noqa: E731
    with torch.no_grad():
        logps = dpo.answer_logps(policy, collate_fn(items))[0]  # (6,)
    expected = 0.5 * (float(logps[:2].mean()) - float(logps[2:].mean()))
    for size in (1, 2, 6):
        ev = dpo.evaluate(
            policy, items, cfg.model_copy(update={"micro_batch_size": size}), collate_fn, nullcontext
        )
        assert ev["dpo/eval_margin"] == pytest.approx(expected, rel=1e-4), size


def optimizer_steps(checkpoint: Path) -> set[int]:
    """The step count AdamW holds for each parameter in a checkpoint: the optimiser steps taken."""
    state = torch.load(checkpoint / "trainer_state.pt", map_location="cpu", weights_only=False)
    return {int(p["step"]) for p in state["optimizer"]["state"].values()}


def test_max_steps_takes_that_many_steps_past_the_epochs(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    """A training set of one batch of 32 (two micro-batches of 16) holds one step per epoch: max_steps 2 still
    takes 2 optimiser steps, and a resume with max_steps 3 a third."""
    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, preferences, batch_size=32, micro_batch_size=16)
    result = dpo.run(cfg, quiet=True)
    assert result["train_judgements"] < 2 * 32  # one epoch is one step
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "dpo/loss" in r] == [1, 2]
    assert rows[-1]["step"] == 2 and result["steps"] == 2
    assert optimizer_steps(tmp_path / "run" / "checkpoints" / "step-0000002") == {2}

    dpo.run(cfg.model_copy(update={"max_steps": 3}), resume=True, quiet=True)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "dpo/loss" in r] == [1, 2, 3]
    assert rows[-1]["step"] == 3
    assert optimizer_steps(tmp_path / "run" / "checkpoints" / "step-0000003") == {3}

    # resumed once more with no step left: the last step's metrics, held-out ones included, as they were logged
    again = dpo.run(cfg.model_copy(update={"max_steps": 3}), resume=True, quiet=True)
    last = {k: v for r in rows if r["step"] == 3 for k, v in r.items() if k != "step"}
    assert "dpo/eval_accuracy" in last and all(again[k] == v for k, v in last.items())


def test_lora_reference_is_the_adapter_off_policy(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}
    original = dpo.trainable_causal_lm

    def spy(*args: Any) -> Any:
        seen["policy"] = original(*args)
        return seen["policy"]

    monkeypatch.setattr(dpo, "trainable_causal_lm", spy)
    loads: list[str] = []
    load = dpo.load_causal_lm
    for module in (dpo, lora_module):  # the reference's load, and the policy's
        monkeypatch.setattr(
            module,
            "load_causal_lm",
            lambda path, tokenizer: loads.append(path) or load(path, tokenizer=tokenizer),
        )
    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, preferences, lora={"r": 4}, lr=1e-2)
    dpo.run(cfg, quiet=True)

    assert loads == [cfg.policy]  # the policy once; no second copy for the reference
    assert isinstance(seen["policy"], PeftModel)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "dpo/loss" in r]
    assert rows[0]["dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)  # the adapter starts as a no-op
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "policy" / "adapter_config.json").exists()
    final = tmp_path / "run" / "final"
    assert not (final / "adapter_config.json").exists()  # merged into a plain checkpoint
    assert max_change(load_causal_lm(str(final)), load_causal_lm(str(tiny_sft_model))) > 1e-5


def test_cached_reference_log_probs_are_the_sft_models(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, preferences, max_steps=1)
    dpo.run(cfg, quiet=True)
    cached = torch.load(tmp_path / "run" / dpo.REFERENCE_CACHE, weights_only=True)["logps"]
    # every answer of the first judgements (a ranking of 3 among them), by a plain forward of prompt + answer
    tokenizer, model = load_tokenizer(str(tiny_sft_model)), load_causal_lm(str(tiny_sft_model))
    items, _ = dpo.read_judgements(str(preferences), cfg, tokenizer, 64)
    train, held = dpo.split_by_prompt(items, cfg.eval_fraction, cfg.seed)
    assert any(len(j.answers) == 3 for j in train[:4])
    for j, judgement in enumerate(train[:4]):
        for k, answer in enumerate(judgement.answers):
            ids = torch.tensor([judgement.prompt_ids + answer])
            with torch.no_grad():
                logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            n = len(judgement.prompt_ids)
            expected = sum(float(logps[n - 1 + t, tok]) for t, tok in enumerate(answer))
            assert cached[j][k] == pytest.approx(expected, abs=1e-4), (j, k)
    assert len(cached) == len(train) + len(held)


def test_resume_with_other_lengths_computes_the_reference_again(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    # pairs only: every judgement has two answers, so the cache's shape fits any length
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(line + "\n" for line in preferences.read_text().splitlines() if "chosen" in line)
    )
    dpo.run(tiny_dpo(tmp_path / "run", tiny_sft_model, pairs, max_steps=1), quiet=True)
    before = torch.load(tmp_path / "run" / dpo.REFERENCE_CACHE, weights_only=True)["logps"]
    dpo.run(tiny_dpo(tmp_path / "fresh", tiny_sft_model, pairs, max_steps=1, max_seq_len=24), quiet=True)
    # answers cut shorter: the cached log-probs are of other tokens
    dpo.run(
        tiny_dpo(tmp_path / "run", tiny_sft_model, pairs, max_steps=2, max_seq_len=24),
        resume=True,
        quiet=True,
    )
    # another seed would hold out other prompts, some of which the run trained on: refused
    with pytest.raises(
        RlhfError, match="was started with other settings of what it trains on \\(seed 0 -> 1\\)"
    ):
        dpo.run(
            tiny_dpo(tmp_path / "run", tiny_sft_model, pairs, max_steps=3, seed=1), resume=True, quiet=True
        )

    resumed = torch.load(tmp_path / "run" / dpo.REFERENCE_CACHE, weights_only=True)["logps"]
    fresh = torch.load(tmp_path / "fresh" / dpo.REFERENCE_CACHE, weights_only=True)["logps"]
    assert len(resumed) == len(fresh)
    # shorter answers: other log-probs, and pairs cut to the same tokens left out
    assert len(fresh) < len(before) or any(
        got != pytest.approx(want, rel=1e-6, abs=1e-5) for got, want in zip(before, fresh, strict=True)
    )
    for got, want in zip(resumed, fresh, strict=True):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-5)  # sums of ~100 log-probs: fp32's rounding


def test_bad_row_is_one_clear_error(tmp_path: Path, tiny_sft_model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "hi", "chosen": 3, "rejected": "b"}\n'
    )
    with pytest.raises(DataError, match="bad.jsonl:2"):
        dpo.run(tiny_dpo(tmp_path / "run", tiny_sft_model, bad), quiet=True)
    assert not (tmp_path / "run").exists()


def test_empty_prompt_is_an_error_naming_the_file(tmp_path: Path, tiny_sft_model: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"prompt": "", "chosen": "a", "rejected": "b"}\n'
    )
    with pytest.raises(DataError, match=rf"^{bad}: a judgement with an empty prompt"):
        dpo.run(tiny_dpo(tmp_path / "run", tiny_sft_model, bad), quiet=True)
    assert not (tmp_path / "run").exists()


def test_killed_run_resumes_to_the_same_result(
    tmp_path: Path, tiny_sft_model: Path, preferences: Path
) -> None:
    settings = dict(max_steps=4, eval_every=100)
    whole = tiny_dpo(tmp_path / "whole", tiny_sft_model, preferences, **settings)
    dpo.run(whole, quiet=True)
    expected = read_metrics(tmp_path / "whole" / "metrics.jsonl")

    cfg = tiny_dpo(tmp_path / "run", tiny_sft_model, preferences, **settings)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"dpo": cfg.model_dump(mode="json")}))
    env = os.environ | {"PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "rlhf.cli", "dpo", "-q", "-c", str(config_file)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "run" / "checkpoints" / "step-0000001" / "trainer_state.pt"
    deadline = time.monotonic() + 300
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "run" / "final").exists()

    result = run_cli("dpo", "-q", "-c", str(config_file), "--resume")  # in this process: no second start-up
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for key in want:
            if key != "dpo/pairs_per_s":
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)


def test_two_processes_take_the_steps_of_one(tmp_path: Path, tiny_sft_model: Path, preferences: Path) -> None:
    """A ranking of 3 holds three pairs and a vote one, so the two processes' shares of a step hold different
    numbers of pairs: every pair of the global batch still weighs the same, as on one process."""
    settings = dict(max_steps=3, eval_every=1)
    dpo.run(tiny_dpo(tmp_path / "one", tiny_sft_model, preferences, **settings), quiet=True)
    two = tiny_dpo(tmp_path / "two", tiny_sft_model, preferences, **settings)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps([["dpo", two.model_dump(mode="json")]]))
    cmd = launch_two("-m", "tests.smoke.stages_main", str(spec))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = read_metrics(tmp_path / "one" / "metrics.jsonl")
    rows = read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected, strict=True):
        for key in want:
            if key != "dpo/pairs_per_s":
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), (got["step"], key)


def test_shared_prefix_and_padded_rows_give_the_same_log_probs(
    tiny_sft_model: Path, preferences: Path
) -> None:
    tokenizer, model = load_tokenizer(str(tiny_sft_model)), load_causal_lm(str(tiny_sft_model))
    cfg = tiny_dpo(Path("unused"), tiny_sft_model, preferences)
    items = dpo.read_judgements(str(preferences), cfg, tokenizer, 64)[0][:8]
    policy = Actor(model)
    with torch.no_grad():
        shared = dpo.answer_logps(policy, dpo.collate(items, tokenizer.pad_token_id, shared_prefix=True))
        padded = dpo.answer_logps(policy, dpo.collate(items, tokenizer.pad_token_id, shared_prefix=False))
    assert shared[0].shape == (sum(len(j.answers) for j in items),)
    torch.testing.assert_close(shared[0], padded[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(shared[1], padded[1], atol=1e-5, rtol=0)
