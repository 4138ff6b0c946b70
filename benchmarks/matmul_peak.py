"""This machine's measured matmul peak in fp32 and bf16: the denominator of model FLOPs utilisation (MFU).

    python -m benchmarks.matmul_peak [--threads 1] [--size 2048] [--reps 5] [--device cpu]

Large square GEMMs (2·n³ FLOPs each), timed after a warm-up; the peak of a dtype is the median over
repetitions of the best size's rate. Results: benchmarks/results/matmul_peak.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
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
    """{"fp32": {"flops": median FLOP/s at the best size, "by_size": {...}}, "bf16": {...}}."""
    out: dict[str, Any] = {}
    for name, dtype in DTYPES.items():
        runs = {n: gemm_rate(n, dtype, device, reps) for n in sizes}
        by_size = {n: statistics.median(r[0] for r in runs[n]) for n in sizes}
        by_size_cpu = {n: statistics.median(r[1] for r in runs[n]) for n in sizes}
        best = max(by_size, key=lambda n: by_size[n])
        out[name] = {"flops": by_size[best], "flops_cpu": max(by_size_cpu.values()), "best_size": best,
                     "by_size": {str(n): r for n, r in by_size.items()}}  # fmt: skip
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
    result = {"command": "python -m benchmarks.matmul_peak " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device, "machine": machine(args.threads),
              **peak}  # fmt: skip
    path = RESULTS.with_name("matmul_peak.quick.json") if args.quick else RESULTS  # keep the real results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    for name in DTYPES:
        print(f"{name}: {peak[name]['flops'] / 1e9:.1f} GFLOP/s wall, {peak[name]['flops_cpu'] / 1e9:.1f} per CPU-second "
              f"(n={peak[name]['best_size']})")  # fmt: skip


if __name__ == "__main__":
    main()
