"""This machine's measured matmul peak in fp32 and bf16: the denominator of model FLOPs utilisation (MFU).

    python -m benchmarks.matmul_peak [--threads 1] [--size 2048] [--reps 5] [--device cpu]

Large square GEMMs (2·n³ FLOPs each), timed after a warm-up; the peak of a dtype is the median over
repetitions of the best size's rate. A full run (not --quick) also times what a training step of the PPO
benchmark's small model is made of: its own bf16 products, forward and backward, against that peak, and the
bandwidth of an elementwise product in and out of cache (`model_shapes`). Results:
benchmarks/results/matmul_peak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "matmul_peak.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_rate(
    n: int, dtype: torch.dtype, device: str, reps: int, min_seconds: float = 0.3
) -> list[tuple[float, float]]:
    """FLOP/s of an (n, n) @ (n, n) product per repetition (each at least `min_seconds`): over wall-clock time,
    and over this process's CPU time divided by its threads (what the cores delivered while they ran it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.matmul(a, b, out=out)  # warm-up: oneDNN/cuBLAS picks its kernel
    sync(device)
    rates = []
    for _ in range(reps):
        calls, t0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            torch.matmul(a, b, out=out)
            calls += 1
            sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                break
        cpu = (time.process_time() - c0) / (torch.get_num_threads() if device == "cpu" else 1)
        rates.append((2 * n**3 * calls / elapsed, 2 * n**3 * calls / max(cpu, 1e-9)))
    return rates


def machine(threads: int) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())  # fmt: skip
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "avx512_bf16": "avx512_bf16" in cpuinfo, "amx_bf16": "amx_bf16" in cpuinfo,
            "load_average_at_start": os.getloadavg()[0]}  # fmt: skip


def measure(device: str = "cpu", sizes: tuple[int, ...] = (1024, 2048), reps: int = 5) -> dict[str, Any]:
    """{"fp32": {"flops": median FLOP/s at the best size, "by_size": {...}}, "bf16": {...}}. On a CPU without
    native bf16 (AVX2 only), bf16 is emulated below 1 GFLOP/s: a 2048-square product would take a minute, and
    MFU there is against fp32 (the precision `auto` trains in), so bf16 is timed at 256 only, marked emulated."""
    from rlhf.train.common import cpu_has_bf16

    emulated = device == "cpu" and not cpu_has_bf16()
    out: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        slow = emulated and dtype == torch.bfloat16
        runs = {n: gemm_rate(n, dtype, device, 1 if slow else reps) for n in ((256,) if slow else sizes)}
        sizes_run = tuple(runs)
        by_size = {n: statistics.median(r[0] for r in runs[n]) for n in sizes_run}
        by_size_cpu = {n: statistics.median(r[1] for r in runs[n]) for n in sizes_run}
        best = max(by_size, key=lambda n: by_size[n])
        out[name] = {"flops": by_size[best], "flops_cpu": max(by_size_cpu.values()), "best_size": best,
                     "by_size": {str(n): r for n, r in by_size.items()}} | ({"emulated": True} if slow else {})  # fmt: skip
    return out


def product(op: Any, a: torch.Tensor, b: torch.Tensor, device: str) -> None:
    op(a, b)
    sync(device)


def timed(fn: Any, min_seconds: float = 0.3) -> float:
    """Median seconds per call of `fn` over 5 runs of at least `min_seconds` each, after a warm-up call."""
    fn()
    runs = []
    for _ in range(5):
        calls, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < min_seconds:
            fn()
            calls += 1
        runs.append((time.perf_counter() - t0) / calls)
    return statistics.median(runs)


def model_shapes(device: str, tokens: int = 2560) -> dict[str, Any]:
    """What the peak means for a training step of the PPO benchmark's small model (hidden 512, MLP 1536): the
    bf16 rate of its own products at `tokens` rows, forward (x W^T) and backward (g W, and g^T x for the
    weight's gradient); and the bandwidth of an fp32 elementwise product, in cache and out of it, which bounds
    the norms, rotary embedding, activations and casts between the products."""
    out: dict[str, Any] = {"tokens": tokens, "bf16_flops": {}, "elementwise_gb_s": {}}
    for name, (n_out, n_in) in {"qkv": (1536, 512), "gate_up": (3072, 512), "down": (512, 1536)}.items():
        x = torch.randn(tokens, n_in, device=device).bfloat16()
        w = torch.randn(n_out, n_in, device=device).bfloat16()
        g = torch.randn(tokens, n_out, device=device).bfloat16()
        flops = 2 * tokens * n_in * n_out
        for kind, (a, b) in {"forward": (x, w.T), "grad_input": (g, w), "grad_weight": (g.T, x)}.items():
            out["bf16_flops"][f"{name} {kind}"] = flops / timed(partial(product, torch.matmul, a, b, device))
    for n in (1 << 16, 1 << 22):
        a, b = torch.randn(n, device=device), torch.randn(n, device=device)
        out["elementwise_gb_s"][f"{n} floats"] = (
            3 * 4 * n / timed(partial(product, torch.mul, a, b, device)) / 1e9
        )
    return out


def load_or_measure(device: str, threads: int, quick: bool = False) -> dict[str, Any]:
    """The peak measured now (quick: one size, fewer repetitions) — a stale file would mislead MFU."""
    torch.set_num_threads(threads)
    return measure(device, (1024,) if quick else (1024, 2048), 3 if quick else 5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (match the other benchmarks)")
    parser.add_argument("--size", type=int, nargs="*", default=[1024, 2048], help="square sizes tried")
    parser.add_argument("--reps", type=int, default=5, help="repetitions per size (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one size, three repetitions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = (1024,) if args.quick else tuple(args.size)
    peak = measure(args.device, sizes, 3 if args.quick else args.reps)
    shapes = None if args.quick else model_shapes(args.device)
    result = {"command": "python -m benchmarks.matmul_peak " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "machine": machine(args.threads),
              **peak, "model_shapes": shapes}  # fmt: skip
    path = RESULTS.with_name("matmul_peak.quick.json") if args.quick else RESULTS  # keep the real results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name in DTYPES:
        print(f"{name}: {peak[name]['flops'] / 1e9:.1f} GFLOP/s wall, {peak[name]['flops_cpu'] / 1e9:.1f} per CPU-second "
              f"(n={peak[name]['best_size']})")  # fmt: skip
    if shapes:
        for name, rate in shapes["bf16_flops"].items():
            print(f"  {name} ({shapes['tokens']} tokens): {rate / 1e9:.0f} GFLOP/s, "
                  f"{rate / peak['bf16']['flops']:.0%} of the bf16 peak")  # fmt: skip
        for name, rate in shapes["elementwise_gb_s"].items():
            print(f"  fp32 elementwise product of {name}: {rate:.1f} GB/s")


if __name__ == "__main__":
    main()
