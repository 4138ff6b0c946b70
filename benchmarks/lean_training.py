"""Training steps of pretraining, SFT and the reward model: the lean Llama forward against transformers' forward,
side by side in one process.

    python -m benchmarks.lean_training [--reps 9] [--quick]

For the tiny (demo) and small models (benchmarks.common.SIZES), under bf16 autocast, one torch thread, one
training step as the loops run it: forward, backward, gradient clipping and the fused AdamW step, through the
loops' own modules (rlhf.train.lm_loop.NextTokenLoss, rlhf.stages.reward.RewardForward) with `lean` on and
off. The transformers path runs SDPA's math backend for these short rows, as the loops choose
(rlhf.train.common.short_attention). Micro-batches:
- pretraining: 32 rows of 128 tokens, every token labelled (configs/demo.yaml's block size and batch);
- SFT: 32 right-padded demonstrations of 24-96 tokens whose first third (the prompt) carries no loss;
- reward: 16 groups of 4 completions (a prompt of 12-24 tokens, answers of 4-48), each group's prompt once and
  its answers as branches (the shared-prefix rows `rlhf reward` trains on).
The two paths alternate step by step; each reports its median milliseconds over `--reps` steps after warm-up
steps, and the ratio of the medians. Results: benchmarks/results/lean_training.json and a section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import SIZES, alternating_medians, build_model, machine, save_result, update_doc
from rlhf.config import RewardConfig, TrainConfig
from rlhf.losses import grouped_bt_loss
from rlhf.models.heads import build_scalar_model
from rlhf.stages.reward import GroupExample, RewardForward, forward_rewards
from rlhf.stages.reward import collate as reward_collate
from rlhf.train.common import make_optimizer, short_attention
from rlhf.train.lm_loop import IGNORE, NextTokenLoss, collate

LOOPS = ("pretraining", "SFT", "reward")


def lm_batch(loop: str, vocab: int, rng: random.Random) -> dict[str, torch.Tensor]:
    if loop == "pretraining":
        examples = [[rng.randrange(3, vocab) for _ in range(128)] for _ in range(32)]
        return collate([{"input_ids": e, "labels": e} for e in examples], pad_id=0)
    rows = []
    for _ in range(32):
        ids = [rng.randrange(3, vocab) for _ in range(rng.randint(24, 96))]
        rows.append({"input_ids": ids, "labels": [IGNORE] * (len(ids) // 3) + ids[len(ids) // 3 :]})
    return collate(rows, pad_id=0)


def reward_batch(vocab: int, rng: random.Random) -> Any:
    groups = []
    for _ in range(16):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(12, 24))]
        answers = [
            [*prompt, *(rng.randrange(3, vocab) for _ in range(rng.randint(4, 48))), 2] for _ in range(4)
        ]
        pairs = [(i, j) for i in range(4) for j in range(i + 1, 4)]
        groups.append(GroupExample("", [""] * 4, answers, pairs, [None] * len(pairs), 1.0, None))
    return reward_collate(groups, pad_id=0, shared_prefix=True)


def step_fn(size: str, loop: str, arch: str = "llama") -> tuple[Callable[[bool], float], int]:
    """(a function that runs one training step, lean or not, and returns its milliseconds; real tokens)."""
    model, _ = build_model(size, arch=arch)
    rng = random.Random(0)
    if loop == "reward":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            model = build_scalar_model(tmp)
        model.config.pad_token_id = 0
        batch = reward_batch(model.config.vocab_size, rng)
        tokens, width = batch.n_tokens, batch.input_ids.size(1)
        modules = {lean: RewardForward(model, lean) for lean in (False, True)}
        cfg: TrainConfig = RewardConfig()

        def loss_of(lean: bool) -> torch.Tensor:
            rewards = forward_rewards(modules[lean], batch)
            return grouped_bt_loss(rewards, batch.chosen_idx, batch.rejected_idx, batch.group_idx,
                                   batch.num_groups, batch.margins, batch.weights)[0]  # fmt: skip
    else:
        lm = lm_batch(loop, model.config.vocab_size, rng)
        tokens, width = int(lm["attention_mask"].sum()), lm["input_ids"].size(1)
        losses = {lean: NextTokenLoss(model, lean) for lean in (False, True)}
        cfg = TrainConfig()

        def loss_of(lean: bool) -> torch.Tensor:
            return losses[lean](lm["input_ids"], lm["attention_mask"], lm["labels"]) / tokens

    model.train()
    optimizer = make_optimizer(model, cfg)

    def step(lean: bool) -> float:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16), short_attention(width, torch.device("cpu"), True):
            loss = loss_of(lean)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) * 1000

    return step, tokens


def measure(size: str, reps: int, arch: str = "llama") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for loop in LOOPS:
        step, tokens = step_fn(size, loop, arch)
        lean_ms, hf_ms = alternating_medians(step, reps)
        out[loop] = {"tokens": tokens, "lean_ms": round(lean_ms, 2), "transformers_ms": round(hf_ms, 2),
                     "speedup": round(hf_ms / lean_ms, 3)}  # fmt: skip
        print(f"{arch} {size} {loop}: lean {lean_ms:.1f} ms, transformers {hf_ms:.1f} ms, {hf_ms / lean_ms:.2f}x",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=9, help="steps per path (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny model, 3 steps")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument("--arch", default="llama", choices=["llama", "qwen2"],
                        help="the model type (the lean forward serves both); results NAME.ARCH for other than llama")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    reps = 3 if args.quick else args.reps
    sizes = ["tiny"] if args.quick else list(SIZES)
    result = {"command": " ".join(["python -m benchmarks.lean_training", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(1), "reps": reps,
              "arch": args.arch, "sizes": {size: measure(size, reps, args.arch) for size in sizes}}  # fmt: skip
    name = "lean_training" + ("" if args.arch == "llama" else f".{args.arch}")
    save_result(name + (".quick" if args.quick else ""), result)
    if args.quick or args.no_doc:
        return
    body = ["One training step (forward, backward, clipping, fused AdamW) under bf16 autocast, one torch thread, "
            "through the loops' own modules with the lean forward on and off; the two alternate step by step, "
            f"median of {reps} steps each. Micro-batches: pretraining 32 x 128 tokens; SFT 32 demonstrations of "
            "24-96 tokens, the first third without loss; reward 16 groups of 4 answers in shared-prefix rows.", "",
            f"Model type: {args.arch}.", "",
            "| model | loop | real tokens | lean ms | transformers ms | **speed-up** |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in result["sizes"].items():
        for loop in LOOPS:
            body.append(f"| {size} | {loop} | {r[loop]['tokens']} | {r[loop]['lean_ms']} | "
                        f"{r[loop]['transformers_ms']} | **{r[loop]['speedup']:.2f}x** |")  # fmt: skip
    update_doc(name.replace(".", "_"), f"Pretraining, SFT and reward-model steps: lean forward vs transformers' ({args.arch})",
               result, body)  # fmt: skip


if __name__ == "__main__":
    main()
