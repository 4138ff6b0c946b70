"""Attention of one new token over a KV cache on a CPU: SDPA's fused kernel against matmul-softmax-matmul.

    python -m benchmarks.decode_attention [--reps 5] [--quick] [--no-doc] [--name NAME]

A decoding step's attention (rlhf.engine.decode_cache: `fused_attention` and `matmul_attention`, the two forms
`decode_attention` chooses between) for three head shapes (batch, query heads, KV heads, head dim) at cache
lengths of 32 to 256 slots, in bf16 and fp32, under an additive mask as a decoding step passes it. Each call
runs 9 layers, each over its own cache, so that the keys and values come from memory as they do in a step,
not from a cache the previous call left warm. Median microseconds per layer over `--reps` timings of 20
calls, after warm-up, one torch thread. Results: benchmarks/results/decode_attention.json and a table in
docs/performance.md; `decode_cache._fused_in` chooses by what they show.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import capabilities, machine, save_result, shape_sweep, update_doc
from rlhf.engine.decode_cache import _fused_in, fused_attention, matmul_attention

# (batch, query heads, KV heads, head dim): the 30M benchmark model, the same with grouped queries, 7B-like
SHAPES = [(64, 8, 8, 64), (64, 8, 2, 64), (16, 32, 8, 128)]
LENGTHS = [32, 64, 128, 256]
LAYERS = 9
FORMS: dict[str, Callable[..., torch.Tensor]] = {"fused": fused_attention, "matmul": matmul_attention}


def time_us(shape: tuple[int, int, int, int], length: int, dtype: torch.dtype, reps: int) -> dict[str, float]:
    """Median µs per layer of each form, the forms alternating."""
    batch, heads, kv_heads, dim = shape
    g = torch.Generator().manual_seed(0)
    caches = [tuple(torch.randn(batch, kv_heads, length, dim, generator=g).to(dtype) for _ in range(2))
              for _ in range(LAYERS)]  # fmt: skip
    q = torch.randn(batch, kv_heads, heads // kv_heads, dim, generator=g).to(dtype)  # query heads as rows
    mask = torch.zeros(batch, 1, 1, length)
    mask[:, :, :, : length // 4] = float("-inf")  # left padding and unwritten slots
    times: dict[str, list[float]] = {name: [] for name in FORMS}
    for rep in range(reps + 1):
        for name, attend in FORMS.items():
            t0 = time.perf_counter()
            for _ in range(20):
                for k, v in caches:
                    attend(q, k, v, mask, dim**-0.5)
            if rep:  # the first round warms up
                times[name].append((time.perf_counter() - t0) / (20 * LAYERS) * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def doc_section(result: dict[str, Any]) -> list[str]:
    rows = ["| batch, heads, KV heads, head dim | slots | bf16 fused; matmul µs | **bf16 matmul / fused** | "
            "fp32 fused; matmul µs | **fp32 matmul / fused** |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        b, f = r["bf16"], r["fp32"]
        rows.append(f"| {', '.join(map(str, r['shape']))} | {r['length']} | {b['fused']:.0f}; {b['matmul']:.0f} | "
                    f"**{b['matmul'] / b['fused']:.2f}x** | {f['fused']:.0f}; {f['matmul']:.0f} | "
                    f"**{f['matmul'] / f['fused']:.2f}x** |")  # fmt: skip
    caps = result["capabilities"]
    chosen = ", ".join(f"{k}: {'fused' if v else 'matmul'}" for k, v in result["chosen"].items())
    return [
        f"CPU capabilities: torch kernels {caps['torch_cpu_capability']}, flags {', '.join(caps['flags'])}. "
        f"What a decoding step uses on this machine (`decode_cache._fused_in`): {chosen}.",
        "",
        "A new token's query heads (those that share a KV head stacked as rows) over a cache of `slots` keys "
        "and values, a quarter of them masked, 9 layers each over its own cache; µs per layer, median of the "
        "repetitions; a ratio above 1: the fused kernel is the faster.",
        "", *rows,
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="smoke pass: one shape, two lengths, 1 repetition"
    )
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument(
        "--name", default="decode_attention", help="results file: benchmarks/results/NAME.json"
    )
    args = parser.parse_args()
    dtypes = (("bf16", torch.bfloat16), ("fp32", torch.float32))
    rows, reps = shape_sweep(
        SHAPES, LENGTHS, args.reps, args.quick,
        lambda shape, length, reps: {label: time_us(shape, length, dtype, reps) for label, dtype in dtypes},
        lambda row: str({k: f"fused {v['fused']:.0f} matmul {v['matmul']:.0f} µs" for k, v in row.items()
                         if isinstance(v, dict)}),
    )  # fmt: skip
    result = {"command": " ".join(["python -m benchmarks.decode_attention", *sys.argv[1:]]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(1), "capabilities": capabilities(),
              "reps": reps, "rows": rows,
              "chosen": {f"{label}, {rows} query row(s) per KV head":
                         _fused_in(torch.empty(1, 1, rows, 1), torch.empty(0, dtype=dtype))
                         for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)) for rows in (1, 4)}}  # fmt: skip
    save_result(f"{args.name}.quick" if args.quick else args.name, result)
    if not args.no_doc and not args.quick:
        cpu = result["machine"]
        title = "Attention of one new token: SDPA's fused kernel vs matmul-softmax-matmul"
        title += f" ({cpu['cpu']}, family {cpu['cpu_family']} model {cpu['cpu_model']})"
        update_doc(args.name.replace(".", "_"), title, result, doc_section(result))


if __name__ == "__main__":
    main()
