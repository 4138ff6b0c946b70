"""The lean Llama forward with the fused CPU kernels (rlhf/engine/cpu_kernels.c) against the same forward on
torch's ops, side by side in one process.

    python -m benchmarks.fused_kernels [--reps 15] [--quick]

For the tiny and small models (benchmarks.common.SIZES), under bf16 autocast, one torch thread: the forward
and backward of a packed micro-batch as PPO's update runs it, the forward alone as its scoring runs it, and
a generation of 48 tokens for 64 prompts by the lean decoder (rlhf.engine.fast_decode) as its rollouts run it.
The two paths alternate call by call; each reports its median milliseconds over `--reps` calls (a third as
many generations) after warm-up calls, and the ratio of the medians. Results: benchmarks/results/fused_kernels.json and a section of
docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from typing import Any

import torch

from benchmarks.common import SIZES, alternating_medians, build_model, machine, save_result, update_doc
from benchmarks.generation import prompts, run_ours
from rlhf.engine import cpu_kernels, lean_llama

# (rows, width) of a packed micro-batch: 32 rollouts of up to 48 + 24 tokens, one per row in the small model's
# case, and the tiny model's shorter answers two or three to a row
BATCHES = {"tiny": (16, 64), "small": (32, 80)}
MODES = ("forward+backward", "forward", "generation")


def timed_call(model: Any, inputs: tuple[torch.Tensor, ...], fused: bool, mode: str) -> float:
    real = cpu_kernels.applies
    if not fused:
        cpu_kernels.applies = lambda x, dtype: False  # type: ignore[assignment]
    try:
        model.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        if mode == "generation":
            ids = prompts(64, model.config.vocab_size, 0)
            run_ours(model, ids, 48, model.config.pad_token_id or 0, True, "cpu")
            return (time.perf_counter() - t0) * 1000
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(mode == "forward+backward"):
            hidden = lean_llama.hidden_states(model, *inputs)
            if mode == "forward+backward":
                hidden.float().square().mean().backward()
        return (time.perf_counter() - t0) * 1000
    finally:
        cpu_kernels.applies = real  # type: ignore[assignment]


def measure(size: str, reps: int) -> dict[str, Any]:
    model, _ = build_model(size)
    rows, width = BATCHES[size]
    ids = torch.randint(3, model.config.vocab_size, (rows, width), generator=torch.Generator().manual_seed(0))
    inputs = (ids, torch.ones_like(ids), torch.arange(width).expand(rows, width))
    out: dict[str, Any] = {"rows": rows, "width": width}
    for name in MODES:
        calls = max(reps // 3, 3) if name == "generation" else reps
        fused_ms, torch_ms = alternating_medians(
            functools.partial(timed_call, model, inputs, mode=name), calls
        )
        out[name] = {"fused_ms": round(fused_ms, 2), "torch_ops_ms": round(torch_ms, 2),
                     "speedup": round(torch_ms / fused_ms, 3)}  # fmt: skip
        print(f"{size} {name}: fused {fused_ms:.1f} ms, torch ops {torch_ms:.1f} ms, {torch_ms / fused_ms:.2f}x",
              flush=True)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=15, help="calls per path (median reported)")
    parser.add_argument("--quick", action="store_true", help="smoke pass: tiny model, 3 calls")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    args = parser.parse_args()
    if cpu_kernels.library() is None:
        sys.exit("the fused CPU kernels could not be built here (no C compiler?): nothing to compare")
    torch.set_num_threads(1)
    sizes = ["tiny"] if args.quick else list(SIZES)
    result = {"command": " ".join(["python -m benchmarks.fused_kernels", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(1), "reps": 3 if args.quick else args.reps,
              "sizes": {size: measure(size, 3 if args.quick else args.reps) for size in sizes}}  # fmt: skip
    save_result("fused_kernels" + (".quick" if args.quick else ""), result)
    if args.quick or args.no_doc:
        return
    body = ["Lean Llama forward under bf16 autocast, one torch thread, a packed micro-batch of (rows, width); "
            f"the two paths alternate, median of {result['reps']} calls each. Generation: the lean decoder, "
            f"64 prompts of 8-24 tokens, 48 new tokens each, median of {max(result['reps'] // 3, 3)} runs.", "",
            "| model | rows x width | pass | fused kernels ms | torch ops ms | **speed-up** |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for size, r in result["sizes"].items():
        for name in MODES:
            shape = "64 x (8-24 + 48)" if name == "generation" else f"{r['rows']} x {r['width']}"
            body.append(f"| {size} | {shape} | {name} | {r[name]['fused_ms']} | {r[name]['torch_ops_ms']} | "
                        f"**{r[name]['speedup']:.2f}x** |")  # fmt: skip
    update_doc(
        "fused_kernels", "Fused CPU kernels, training forward and decoder: with and without", result, body
    )


if __name__ == "__main__":
    main()
