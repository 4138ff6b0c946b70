"""Load test of the labeling server: concurrent API clients, retries, and a SIGKILL of the server midway.

    python -m benchmarks.feedback_load                     # SQLite and PostgreSQL, 1 and 3 workers
    python -m benchmarks.feedback_load --backends sqlite --workers 1 --votes 2000
    python -m benchmarks.feedback_load --quick             # a smoke pass: 1,000 votes each, once

For each backend and worker count: a fresh store with one pairwise task per vote and one labeler per
client; the server runs as `python -m rlhf.feedback serve --workers N` (with several workers, sharing
through Redis at --redis-url). 64 client threads post votes with retries; when half are in, the server
(one worker) is killed with SIGKILL. At the end the database must hold every acknowledged vote exactly
once (rlhf/feedback/loadtest.py does all of it). Every configuration runs --repeat times, the configurations
taking turns; the table gives the median of each figure over the repetitions (the JSON keeps every run).
Prints the table and writes benchmarks/results/feedback_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import machine, replace_doc_section
from rlhf.feedback.loadtest import drop_pg_schema, pg_schema, run_load

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = str(ROOT / "benchmarks" / "results" / "feedback_load.json")
MARKERS = ("<!-- feedback_load:start -->", "<!-- feedback_load:end -->")
PG_URL = os.environ.get("RLHF_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def run_backend(backend: str, workers: int, args: argparse.Namespace) -> dict[str, Any]:
    redis_url = args.redis_url if workers > 1 else None
    kwargs = dict(
        n_votes=args.votes, n_clients=args.clients, retry_rate=args.retry_rate, kill=not args.no_kill
    )
    if backend == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            result = run_load(f"sqlite:///{tmp}/bench.db", workers=workers, redis_url=redis_url, **kwargs)
    else:
        schema, url = pg_schema(PG_URL, "rlhf_bench")
        try:
            result = run_load(url, workers=workers, redis_url=redis_url, **kwargs)
        finally:
            drop_pg_schema(PG_URL, schema)
    return {"backend": backend, "shared_through": "redis" if redis_url else "memory", **result}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's figures, each the median over its repetitions; every run kept under "runs"."""

    def med(*keys: str) -> float:
        values = []
        for r in runs:
            value: Any = r
            for key in keys:
                value = value[key]
            values.append(value)
        return round(statistics.median(values), 2)

    return {
        "backend": runs[0]["backend"],
        "workers": runs[0]["workers"],
        "repeats": len(runs),
        "votes_acknowledged": min(r["votes_acknowledged"] for r in runs),
        "votes_per_s": med("votes_per_s"),
        "votes_per_s_excluding_restart": med("votes_per_s_excluding_restart"),
        "latency_ms": {
            "p50": med("latency_ms", "p50"),
            "p99": med("latency_ms", "p99"),
            "p99_of_each_run": [r["latency_ms"]["p99"] for r in runs],
        },  # fmt: skip
        "latency_ms_steady": {"p99": med("latency_ms_steady", "p99")},
        "server_cpu_ms_per_request": med("server_cpu_ms_per_request"),
        "client_cpu_ms_per_request": med("client_cpu_ms_per_request"),
        "restart_downtime_s": med("restart_downtime_s"),
        "ok": all(r["ok"] for r in runs),
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--workers", default="1,3", help="comma-separated server process counts")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for several workers")
    parser.add_argument("--votes", type=int, default=10_000, help="votes to post in total")
    parser.add_argument("--clients", type=int, default=64, help="concurrent API clients (threads)")
    parser.add_argument("--retry-rate", type=float, default=0.05, help="share of votes re-sent on purpose")
    parser.add_argument("--no-kill", action="store_true", help="do not SIGKILL the server midway")
    parser.add_argument("--quick", action="store_true", help="a smoke pass: 1,000 votes per run")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="result JSON (the default also updates docs/scaling.md)"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each configuration (the table: medians)"
    )
    args = parser.parse_args()
    if args.quick:
        args.votes, args.repeat = min(args.votes, 1000), 1

    load_at_start = os.getloadavg()
    configs = [(b, int(w)) for b in args.backends.split(",") for w in args.workers.split(",")]
    for backend, _ in configs:
        if backend not in ("sqlite", "postgres"):
            parser.error(f"unknown backend {backend!r}")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {config: [] for config in configs}
    for _ in range(args.repeat):  # the configurations take turns, so a change in load touches them all
        for backend, workers in configs:
            runs[backend, workers].append(run_backend(backend, workers, args))
    results = [median_run(runs[config]) for config in configs]

    header = (
        f"{'backend':<9} {'workers':>7} {'votes':>6} {'votes/s':>8} {'(no restart)':>12} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'p99 steady':>10} {'srv CPU ms':>10} {'restart s':>9}  exactly-once"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['backend']:<9} {r['workers']:>7} {r['votes_acknowledged']:>6} {r['votes_per_s']:>8} {r['votes_per_s_excluding_restart']:>12}"
            f" {r['latency_ms']['p50']:>7} {r['latency_ms']['p99']:>7} {r['latency_ms_steady']['p99']:>10}"
            f" {r['server_cpu_ms_per_request']:>10} {r['restart_downtime_s']:>9}  "
            f"{'yes' if r['ok'] else 'NO: ' + json.dumps({k: r[k] for k in ('missing', 'duplicated', 'mismatched_ids', 'errors')})}"
        )
    out = {
        "benchmark": "feedback_load",
        "command": "python -m benchmarks.feedback_load " + " ".join(sys.argv[1:]),
        "machine": machine(threads=1),
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not args.quick and not args.no_kill and args.out == DEFAULT_OUT:
        update_doc(out)
    if not all(r["ok"] for r in results):
        sys.exit(1)


def update_doc(out: dict[str, Any]) -> None:
    """docs/scaling.md's table of this run, between its markers."""
    m, (start, end) = out["machine"], MARKERS
    rows = [
        f"| {'SQLite' if r['backend'] == 'sqlite' else 'PostgreSQL'} | {r['workers']} | {r['votes_per_s']:.0f} "
        f"| {r['latency_ms']['p50']:.0f} / {r['latency_ms']['p99']:.0f} "
        f"({', '.join(f'{p:.0f}' for p in r['latency_ms']['p99_of_each_run'])}) | {r['latency_ms_steady']['p99']:.0f} "
        f"| {r['server_cpu_ms_per_request']:.2f} | {r['restart_downtime_s']:.1f} | {'yes' if r['ok'] else 'NO'} |"
        for r in out["results"]
    ]
    section = "\n".join([
        start, f"`{out['command'].strip()}` on {m['cpu']} ({m['cores']} cores), load average "
        f"{out['load_average_at_start'][0]:.1f} at the start and {out['load_average_at_end'][0]:.1f} at the end; "
        f"{out['results'][0]['votes_acknowledged']} votes per run; each figure the median of "
        f"{out['results'][0]['repeats']} runs, the configurations taking turns (the p99 of each run in brackets); "
        "`benchmarks/results/feedback_load.json`.", "",
        "| store | workers | votes/s | p50 / p99 ms | p99 ms without the kill | server CPU per vote ms "
        "| downtime s | exactly once |", "|---|---|---|---|---|---|---|---|", *rows, end,
    ])  # fmt: skip
    replace_doc_section(start, end, section, ROOT / "docs" / "scaling.md")


if __name__ == "__main__":
    main()
