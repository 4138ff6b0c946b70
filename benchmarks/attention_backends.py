"""SDPA on a CPU: the flash kernel against the math backend (matmul, softmax, matmul), by sequence length.

    python -m benchmarks.attention_backends [--reps 5] [--quick]

One causal self-attention with a boolean mask, as the trainers run it, for three head shapes (batch, heads,
head dim): forward + backward in bf16 and in fp32, and forward alone in bf16. Median milliseconds over
`--reps` calls after two warm-up calls, one torch thread. rlhf.train.common.short_attention picks the math
backend where this shows it faster (bf16 training forwards up to MATH_ATTENTION_MAX_LEN tokens).
Results: benchmarks/results/attention_backends.json.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import machine, save_result, shape_sweep

SHAPES = [(32, 4, 32), (8, 8, 64), (4, 32, 128)]  # (batch, heads, head dim): demo model, small, 7B-like
LENGTHS = [52, 128, 160, 192, 256, 512]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def time_ms(shape: tuple[int, int, int], length: int, backend: SDPBackend, dtype: torch.dtype, backward: bool,
            reps: int) -> float:  # fmt: skip
    batch, heads, dim = shape
    q, k, v = (torch.randn(batch, heads, length, dim, dtype=dtype, requires_grad=backward) for _ in range(3))
    mask = torch.ones(length, length, dtype=torch.bool).tril()

    def call() -> None:
        with sdpa_kernel([backend]), torch.set_grad_enabled(backward):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if backward:
            out.float().sum().backward()

    for _ in range(2):
        call()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--quick", action="store_true", help="smoke pass: one shape, two lengths, 1 repetition"
    )
    args = parser.parse_args()
    passes = (("bf16 fwd+bwd", torch.bfloat16, True), ("fp32 fwd+bwd", torch.float32, True),
              ("bf16 fwd", torch.bfloat16, False))  # fmt: skip

    def measure(shape: Any, length: int, reps: int) -> dict[str, Any]:
        row = {}
        for label, dtype, backward in passes:
            ms = {name: time_ms(shape, length, be, dtype, backward, reps) for name, be in BACKENDS.items()}
            row[label] = {**ms, "math_speedup": ms["flash"] / ms["math"]}
        return row

    rows, reps = shape_sweep(SHAPES, LENGTHS, args.reps, args.quick, measure,
                             lambda row: str({k: f"{v['flash']:.1f}/{v['math']:.1f} ms" for k, v in row.items()
                                              if isinstance(v, dict)}))  # fmt: skip
    name = "attention_backends.quick" if args.quick else "attention_backends"
    save_result(name, {"command": "python -m benchmarks.attention_backends", "machine": machine(1),
                       "reps": reps, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
