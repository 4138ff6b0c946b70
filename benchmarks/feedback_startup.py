"""Start-up of the labeling server: from `python -m rlhf.feedback serve` to its first 200 on /healthz.

    python -m benchmarks.feedback_startup                    # SQLite and PostgreSQL, 5 starts each
    python -m benchmarks.feedback_startup --backends sqlite --reps 3

Cold: a fresh, empty database (the migrations run). Warm: a database already at the newest schema (the
server checks the revision and skips Alembic). Cold and warm starts alternate, each going first every other
round; the table gives the median wall time and the median CPU time the server process had spent when it
first answered. Where the CPU time goes is measured apart, each phase in a fresh interpreter: Python's own
start, importing the app, building it, migrating a fresh database, checking a migrated one.
Writes benchmarks/results/feedback_startup.json and its section of docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS, replace_doc_section
from rlhf.feedback.loadtest import cpu_seconds, drop_pg_schema, free_port, pg_schema

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
PG_URL = os.environ.get("RLHF_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")

# Each phase runs in a fresh interpreter and prints the CPU seconds it took; {db} is a database URL. The import
# runs as `rlhf label serve` runs it: the cyclic collector off, pydantic's plugin discovery skipped.
PHASES = {
    "import the app": "import gc, os; gc.disable(); os.environ.setdefault('PYDANTIC_DISABLE_PLUGINS', '__all__'); "
    "t = time.process_time(); import rlhf.feedback.main",
    "build the app": "import rlhf.feedback.main as m; t = time.process_time(); m.create_app()",
    "migrate a fresh database": "from rlhf.feedback.db import Database, upgrade; t = time.process_time(); "
    "upgrade(Database({db!r}))",
    "check a migrated database": "from rlhf.feedback.db import Database, upgrade; t = time.process_time(); "
    "upgrade(Database({db!r})); assert 'alembic' not in sys.modules",
}


def time_to_healthz(db: str, limit_s: float = 60.0) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) from starting the server to its first 200 on /healthz."""
    port = free_port()
    cmd = [sys.executable, "-m", "rlhf.feedback", "serve", "--db", db, "--port", str(port)]
    start = time.monotonic()
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"],
        env=ENV,
        cwd=ENV["PYTHONPATH"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        with httpx.Client(timeout=0.5) as http:
            while time.monotonic() - start < limit_s:
                if proc.poll() is not None:
                    raise RuntimeError(proc.stdout.read().decode() if proc.stdout else "server exited")
                try:
                    if http.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        return time.monotonic() - start, cpu_seconds(proc.pid)
                except httpx.TransportError:
                    time.sleep(0.005)
        raise RuntimeError(f"no /healthz answer within {limit_s} s")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def phase_cpu(code: str) -> float:
    """CPU seconds of one phase, measured inside a fresh interpreter (from `t` on, or from its start)."""
    script = f"import sys, time\nt = time.process_time()\n{code}\nprint(time.process_time() - t)"
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=ENV,
        cwd=ENV["PYTHONPATH"],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def interpreter_cpu() -> float:
    """CPU seconds of `python -c pass` in this environment (site-packages' .pth files included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "pass"], env=ENV, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def fresh_databases(backend: str, work: Path, n: int) -> tuple[list[str], list[str]]:
    """`n` URLs of empty databases, and the PostgreSQL schemas to drop afterwards."""
    if backend == "sqlite":
        return [f"sqlite:///{work}/fresh{i}.db" for i in range(n)], []
    made = [pg_schema(PG_URL, "rlhf_bench") for _ in range(n)]
    return [url for _, url in made], [schema for schema, _ in made]


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def run_backend(backend: str, reps: int, work: Path) -> dict[str, Any]:
    urls, schemas = fresh_databases(backend, work, 2 * reps + 1)
    warm_db = urls.pop()
    try:
        time_to_healthz(warm_db)  # migrates it, and fills the OS's file cache for both kinds of start
        cold: list[tuple[float, float]] = []
        warm: list[tuple[float, float]] = []
        for i in range(reps):
            for kind in ("cold", "warm") if i % 2 == 0 else ("warm", "cold"):
                if kind == "cold":
                    cold.append(time_to_healthz(urls.pop()))
                else:
                    warm.append(time_to_healthz(warm_db))
        phases = {"start Python": median([interpreter_cpu() for _ in range(reps)])}
        for name, code in PHASES.items():
            fresh = name.startswith("migrate")
            phases[name] = median(
                [phase_cpu(code.format(db=urls.pop() if fresh else warm_db)) for _ in range(reps)]
            )
    finally:
        for schema in schemas:
            drop_pg_schema(PG_URL, schema)
    return {
        "backend": backend,
        "cold": {"wall_s": median([w for w, _ in cold]), "cpu_s": median([c for _, c in cold])},
        "warm": {"wall_s": median([w for w, _ in warm]), "cpu_s": median([c for _, c in warm])},
        "cold_runs": cold,
        "warm_runs": warm,
        "phases_cpu_s": phases,
    }


def cpu_flags() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {
        "cpu": model or platform.processor(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "load_average_at_start": round(os.getloadavg()[0], 1),
    }


def yes(flag: bool) -> str:
    return "yes" if flag else "no"


def doc_section(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "<!-- feedback_startup:start -->",
        "## Labeling server start-up",
        "",
        f"Command: `{result['command'].strip()}` ({result['date']}). Machine: {m['cpu']}, {m['cores']} cores "
        f"(AVX-512 {yes(m['avx512f'])}, AVX512-BF16 {yes(m['avx512_bf16'])}, AMX {yes(m['amx_bf16'])}), Python "
        f"{m['python']}, load average {m['load_average_at_start']} at the start. Median of {result['reps']} starts "
        "each, cold (fresh database: the migrations run) and warm (schema already at head: Alembic is not "
        "imported) alternating; CPU is the server process's own time when it first answered /healthz.",
        "",
        "| backend | cold wall s | cold CPU s | warm wall s | warm CPU s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['backend']} | {r['cold']['wall_s']} | {r['cold']['cpu_s']} | {r['warm']['wall_s']} "
            f"| {r['warm']['cpu_s']} |"
        )
    lines += ["", "Where the CPU time goes (each phase in a fresh interpreter, median, seconds):", ""]
    names = list(result["results"][0]["phases_cpu_s"])
    lines.append("| phase | " + " | ".join(r["backend"] for r in result["results"]) + " |")
    lines.append("|---|" + "---:|" * len(result["results"]))
    for name in names:
        lines.append(
            f"| {name} | " + " | ".join(str(r["phases_cpu_s"][name]) for r in result["results"]) + " |"
        )
    lines.append("<!-- feedback_startup:end -->")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--reps", type=int, default=5, help="starts of each kind (the median is reported)")
    parser.add_argument("--no-doc", action="store_true", help="do not update docs/performance.md")
    parser.add_argument(
        "--source", help="start the server from this checkout instead (e.g. a worktree of an older commit)"
    )
    args = parser.parse_args()
    if args.source:
        ENV["PYTHONPATH"] = str(Path(args.source).resolve())
    machine = cpu_flags()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            if backend not in ("sqlite", "postgres"):
                parser.error(f"unknown backend {backend!r}")
            results.append(run_backend(backend, args.reps, Path(tmp)))
    print(f"{'backend':<9} {'cold wall':>9} {'cold CPU':>9} {'warm wall':>9} {'warm CPU':>9}")
    for r in results:
        print(
            f"{r['backend']:<9} {r['cold']['wall_s']:>9} {r['cold']['cpu_s']:>9} {r['warm']['wall_s']:>9} "
            f"{r['warm']['cpu_s']:>9}"
        )
        for name, cpu in r["phases_cpu_s"].items():
            print(f"    {name:<28} {cpu:>6} s CPU")
    result = {
        "benchmark": "feedback_startup",
        "command": "python -m benchmarks.feedback_startup " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
        "reps": args.reps,
        "source": args.source or "this checkout",
        "machine": machine,
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "feedback_startup.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    if not args.no_doc:
        replace_doc_section(
            "<!-- feedback_startup:start -->", "<!-- feedback_startup:end -->", doc_section(result)
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
