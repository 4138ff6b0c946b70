"""SFT training steps on demonstrations packed end to end into rows against the same micro-batches right-padded.

    python -m benchmarks.sft_packing [--reps 5] [--quick]

The demo's demonstrations (`rlhf data demo`), tokenized as `rlhf sft` does (max 96 tokens), in micro-batches of 32
drawn at random; the demo-size Llama (random weights) takes a forward, backward and AdamW step on each, in the
precision `precision: auto` chooses here, through the forward the loop takes (the lean one for a plain Llama).
The two layouts alternate step set by step set; the median over repetitions is reported, with the positions each
layout computes per real token and the difference of their summed losses on the same micro-batches (the same up
to float rounding: packing changes only where the tokens sit). Results: benchmarks/results/sft_packing.json and a
section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import SIZES, alternating_medians, capabilities, machine, save_result, update_doc
from rlhf.data import demo_task
from rlhf.models.loading import build_causal_lm, load_tokenizer
from rlhf.models.tokenizer import train_bpe_tokenizer
from rlhf.train.common import resolve_precision
from rlhf.train.demonstrations import read_demonstrations, tokenize_demonstrations
from rlhf.train.lm_loop import Batch, Example, NextTokenLoss, collate, collate_packed, packs

MICRO, MAX_LEN, STEPS = 32, 96, 8


def prepare(work: Path, n_sft: int) -> tuple[Any, list[Example], int]:
    """(model, demonstrations, PAD id): the demo world's demonstrations and a new demo-size model."""
    demo_task.generate(
        work / "data", seed=0, n_pretrain=2000, n_sft=n_sft, n_rl_prompts=10, n_eval_prompts=10
    )
    corpus = (work / "data" / "pretrain.txt").read_text().split("\n\n")
    train_bpe_tokenizer(corpus, vocab_size=512).save_pretrained(work / "tok")
    tokenizer = load_tokenizer(str(work / "tok"))
    rows = read_demonstrations(work / "data" / "sft.jsonl", tokenizer)
    examples, _, _ = tokenize_demonstrations(rows, tokenizer, MAX_LEN)
    return build_causal_lm(SIZES["tiny"], tokenizer, seed=0), examples, int(tokenizer.pad_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reps", type=int, default=5, help="timed repetitions of each layout (median reported)"
    )
    parser.add_argument("--quick", action="store_true", help="one repetition, results to sft_packing.quick")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    reps = 1 if args.quick else args.reps
    torch.set_num_threads(
        1
    )  # as every benchmark here: a second thread on a small shared machine times the neighbours
    model, examples, pad_id = prepare(Path(tempfile.mkdtemp(prefix="sft-packing-")), 600)
    half = resolve_precision("auto") == "bf16"
    loss_fn = NextTokenLoss(model, lean=True).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rng = random.Random(0)
    micro = [rng.sample(examples, MICRO) for _ in range(STEPS)]
    packed_ok, additive = packs(model, examples)
    if not packed_ok:
        sys.exit("sft_packing: this model's attention takes no custom 4-D mask")
    hidden = model.config.hidden_size
    layouts: dict[bool, list[Batch]] = {
        False: [collate(mb, pad_id) for mb in micro],
        True: [collate_packed(mb, pad_id, additive, hidden) for mb in micro],
    }

    def loss_of(batch: Batch) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            return loss_fn(
                batch["input_ids"], batch["attention_mask"], batch["labels"], batch["position_ids"]
            )

    def steps(packed: bool) -> float:
        start = time.perf_counter()
        for batch in layouts[packed]:
            loss_of(batch).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) * 1000

    with torch.no_grad():
        sums = {k: sum(float(loss_of(b)) for b in batches) for k, batches in layouts.items()}
    packed_ms, padded_ms = alternating_medians(steps, reps)
    real = sum(int(b["real"].sum()) for b in layouts[False])
    positions = {k: sum(b["input_ids"].numel() for b in batches) for k, batches in layouts.items()}
    result: dict[str, Any] = {
        "command": " ".join(["python -m benchmarks.sft_packing", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(torch.get_num_threads()),
        "capabilities": capabilities(),
        "precision": "bf16 autocast" if half else "fp32",
        "reps": reps, "micro_batch": MICRO, "steps": STEPS, "max_len": MAX_LEN,
        "real_tokens": real,
        "positions_padded": positions[False], "positions_packed": positions[True],
        "padded_ms": padded_ms, "packed_ms": packed_ms,
        "padded_tokens_per_s": real / padded_ms * 1000, "packed_tokens_per_s": real / packed_ms * 1000,
        "speedup": padded_ms / packed_ms,
        "loss_sum_padded": sums[False], "loss_sum_packed": sums[True],
        "loss_relative_difference": abs(sums[True] - sums[False]) / abs(sums[False]),
    }  # fmt: skip
    print(f"padded {padded_ms:.0f} ms, packed {packed_ms:.0f} ms for {STEPS} steps: {result['speedup']:.2f}x; "
          f"positions per real token {positions[False] / real:.2f} -> {positions[True] / real:.2f}; "
          f"loss sums differ by {result['loss_relative_difference']:.1e}", flush=True)  # fmt: skip
    name = "sft_packing.quick" if args.quick else "sft_packing"
    save_result(name, result)
    if not args.no_doc and not args.quick:
        r, c = result, result["capabilities"]
        update_doc("sft_packing", "SFT on packed demonstrations", result, [
            f"CPU capabilities: torch `{c['torch_cpu_capability']}`, flags {', '.join(c['flags'])}; "
            f"{r['precision']}, the precision `precision: auto` chooses here.", "",
            f"{r['steps']} training steps (forward, backward, AdamW) of {r['micro_batch']} demo demonstrations each, "
            f"drawn at random, on the demo-size Llama through the lean forward; {r['reps']} alternating "
            "repetitions, median.", "",
            "| layout | positions computed per real token | ms per step | real tokens/s |",
            "|---|---|---|---|",
            f"| right-padded rows | {r['positions_padded'] / r['real_tokens']:.2f} | "
            f"{r['padded_ms'] / r['steps']:.1f} | {r['padded_tokens_per_s']:.0f} |",
            f"| packed rows (`sft.pack_sequences`, the default) | {r['positions_packed'] / r['real_tokens']:.2f} | "
            f"{r['packed_ms'] / r['steps']:.1f} | {r['packed_tokens_per_s']:.0f} |", "",
            f"Packed: **{r['speedup']:.2f}x** the padded steps' speed. Their summed losses on the same micro-batches "
            f"differ by {r['loss_relative_difference']:.1e} of their value (float rounding).",
        ])  # fmt: skip


if __name__ == "__main__":
    main()
