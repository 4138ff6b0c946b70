"""Where a generation's time goes: prefill, decoding steps (their linears, their attention, the rest) and
sampling, by wall clock; and whether one product for sibling linears (q/k/v, gate/up) would be faster.

    python -m benchmarks.decode_split [--archs llama gpt_neox] [--size 30M] [--reps 5]

The workload of benchmarks.generation (batch 64, 48 new tokens, one torch thread, bf16 autocast where the CPU
has AVX512-BF16 or AMX, else fp32) through `rlhf.engine.decoding.generate`, with the pieces wrapped in timers:
`DecodeBatch.prefill`, `DecodeBatch.step`, the packed linears' forward and the decoding attention inside a step,
and `sample`. A second run without the timers gives the rate. The products: one layer's q, k, v, gate and up
products of the model's width at batch 64, as oneDNN-packed weights (`decode_cache.packer`), separate against
one product per input (q/k/v stacked, gate/up stacked), alternating, median µs per layer; whether their outputs
are the same bits. Prints; nothing is written.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import rlhf.engine.decode_cache as decode_cache
import rlhf.engine.decoding as decoding
from benchmarks.common import ARCHS, SIZES, build_model, capabilities
from benchmarks.generation import prompts, run_ours
from rlhf.train.common import cpu_has_bf16


def split(arch: str, size: str) -> dict[str, float]:
    """Seconds in each piece of one generation, after a warm-up one."""
    model, tokenizer = build_model(size, "cpu", arch=arch)
    model.eval()
    ids, pad, amp = prompts(64, len(tokenizer)), tokenizer.pad_token_id, cpu_has_bf16()
    run_ours(model, ids, 48, pad, amp, "cpu")
    rate = run_ours(model, ids, 48, pad, amp, "cpu")[0]
    seconds = dict.fromkeys(("prefill", "steps", "linears in steps", "attention in steps", "sampling"), 0.0)
    in_step = [False]

    def timed(name: str, fn: Callable[..., Any], only_in_step: bool = False) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if in_step[0] or not only_in_step:
                seconds[name] += time.perf_counter() - t0
            return out

        return wrapper

    def step(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            in_step[0] = True
            try:
                return fn(*args, **kwargs)
            finally:
                in_step[0] = False

        return wrapper

    saved = (decoding.DecodeBatch.prefill, decoding.DecodeBatch.step, decoding.sample,
             decode_cache._packed_forward, ALL_ATTENTION_FUNCTIONS[decode_cache.DECODE_ATTENTION])  # fmt: skip
    decoding.DecodeBatch.prefill = timed("prefill", saved[0])  # type: ignore[method-assign]
    decoding.DecodeBatch.step = step(timed("steps", saved[1]))  # type: ignore[method-assign]
    decoding.sample = timed("sampling", saved[2])
    decode_cache._packed_forward = timed("linears in steps", saved[3], only_in_step=True)
    ALL_ATTENTION_FUNCTIONS[decode_cache.DECODE_ATTENTION] = timed("attention in steps", saved[4], True)
    try:
        t0 = time.perf_counter()
        run_ours(model, ids, 48, pad, amp, "cpu")
        seconds["total"] = time.perf_counter() - t0
    finally:
        decoding.DecodeBatch.prefill, decoding.DecodeBatch.step, decoding.sample = saved[:3]  # type: ignore[method-assign]
        decode_cache._packed_forward = saved[3]
        ALL_ATTENTION_FUNCTIONS[decode_cache.DECODE_ATTENTION] = saved[4]
    seconds["rest of steps"] = seconds["steps"] - seconds["linears in steps"] - seconds["attention in steps"]
    seconds["tokens/s untimed"] = rate
    return seconds


def sibling_products(size: str, reps: int) -> dict[str, Any]:
    """One layer's q/k/v and gate/up products at batch 64: separate against stacked, µs per layer."""
    width, inner = SIZES[size].hidden_size, SIZES[size].intermediate_size
    dtype = torch.bfloat16 if cpu_has_bf16() else torch.float32
    pack = decode_cache.packer(torch.device("cpu"), dtype, 64)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, width, generator=g).to(dtype)
    q, k, v = (0.05 * torch.randn(width, width, generator=g).to(dtype) for _ in range(3))
    gate, up = (0.05 * torch.randn(inner, width, generator=g).to(dtype) for _ in range(2))
    apart = [pack(w) for w in (q, k, v, gate, up)]
    qkv, gate_up = pack(torch.cat([q, k, v])), pack(torch.cat([gate, up]))

    def separate() -> list[torch.Tensor]:
        return [decode_cache.packed_linear(x, w) for w in apart]

    def stacked() -> list[torch.Tensor]:
        a, b = decode_cache.packed_linear(x, qkv), decode_cache.packed_linear(x, gate_up)
        return [*a.split(width, dim=1), *b.split(inner, dim=1)]

    same = all(torch.equal(a, b) for a, b in zip(separate(), stacked(), strict=True))
    times: dict[str, list[float]] = {"separate": [], "stacked": []}
    for _ in range(reps):
        for name, fn in (("separate", separate), ("stacked", stacked)):
            t0 = time.perf_counter()
            for _ in range(100):
                fn()
            times[name].append((time.perf_counter() - t0) / 100 * 1e6)
    us = {name: statistics.median(t) for name, t in times.items()}
    flops = 2 * 64 * width * (3 * width + 2 * inner)
    return {"same bits": same, **us, "ratio": us["separate"] / us["stacked"],
            "GFLOP/s separate": flops / us["separate"] / 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["llama", "gpt_neox"], choices=ARCHS)
    parser.add_argument("--size", default="30M", choices=sorted(SIZES))
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be 1 or more")
    torch.set_num_threads(1)
    print(f"CPU: {capabilities()}")
    for arch in args.archs:
        s = split(arch, args.size)
        print(f"{arch} {args.size}: " + ", ".join(f"{k} {v:.3f}" if k != "tokens/s untimed" else f"{k} {v:.0f}"
                                                  for k, v in s.items()))  # fmt: skip
    p = sibling_products(args.size, args.reps)
    print(f"one layer's q/k/v and gate/up products, batch 64: separate {p['separate']:.0f} µs "
          f"({p['GFLOP/s separate']:.0f} GFLOP/s), stacked {p['stacked']:.0f} µs, ratio {p['ratio']:.3f}, "
          f"same bits: {p['same bits']}")  # fmt: skip


if __name__ == "__main__":
    main()
