"""`make bench`: every benchmark in sequence, each writing its JSON into benchmarks/results/.

    python -m benchmarks.run            # the full suite (tens of minutes on a 2-core CPU)
    python -m benchmarks.run --quick    # a smoke pass of each (minutes); results go to NAME.quick.json
    python -m benchmarks.run --only generation ppo_bench targets

Benchmarks run one after another, never in parallel (they would measure each other). A benchmark that fails
is reported and the others still run; the exit status is 1 if any failed. Not part of `make test`.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# (module, full-run arguments, quick-run arguments); modules other branches add are run when present
SUITE: list[tuple[str, list[str], list[str]]] = [
    ("matmul_peak", [], ["--quick"]),
    ("attention_backends", [], ["--quick"]),
    ("decode_attention", [], ["--quick"]),
    ("lean_training", [], ["--quick"]),
    ("sft_packing", [], ["--quick"]),
    ("generation", [], ["--quick"]),
    ("ppo_bench", [], ["--quick"]),
    ("reward_throughput", [], ["--reps", "1", "--groups", "40", "--no-doc"]),
    ("architectures", [], ["--quick"]),
    ("dpo_throughput", [], ["--reps", "1", "--pairs", "64", "--no-doc"]),
    ("serve_load", [], ["--seconds", "3", "--clients", "1,8"]),
    ("feedback_load", [], ["--quick"]),
    ("gateway_latency", [], ["--quick"]),
    ("feedback_startup", [], ["--reps", "2", "--no-doc"]),
    ("label_queue", [], ["--backends", "sqlite", "--prompts", "60", "--repeat", "1"]),
    # last: the targets table of docs/performance.md from every results file, those just written included
    ("targets", [], ["--no-doc"]),
]


def keep_real_results(before: dict[Path, bytes]) -> None:
    """After a smoke pass: its JSON goes to NAME.quick.json and the full run's NAME.json is put back."""
    for f in RESULTS.glob("*.json"):
        if f.name.endswith(".quick.json") or before.get(f) == f.read_bytes():
            continue
        f.replace(f.with_suffix(".quick.json"))
        if f in before:
            f.write_bytes(before[f])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke pass of every benchmark")
    parser.add_argument("--only", nargs="*", help="run only these benchmarks (module names)")
    args = parser.parse_args()
    failed = []
    for name, full, quick in SUITE:
        if args.only and name not in args.only:
            continue
        if importlib.util.find_spec(f"benchmarks.{name}") is None:
            print(f"== {name}: not in this checkout, skipped", flush=True)
            continue
        cmd = [sys.executable, "-m", f"benchmarks.{name}", *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        before = {f: f.read_bytes() for f in RESULTS.glob("*.json")}
        code = subprocess.run(cmd, cwd=ROOT).returncode
        if args.quick:
            keep_real_results(before)
        print(f"== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {time.perf_counter() - t0:.0f} s",
              flush=True)  # fmt: skip
        if code:
            failed.append(name)
    print(
        f"results in {ROOT / 'benchmarks' / 'results'}" + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
