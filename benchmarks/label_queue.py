"""The labeler's queue under the demo's load: the simulated panel labels a demo-shaped project over HTTP.

    python -m benchmarks.label_queue                        # SQLite and PostgreSQL, 3 repetitions
    python -m benchmarks.label_queue --backends sqlite --repeat 1 --prompts 100
    python -m benchmarks.label_queue --no-save              # print only; results JSON left as it is

A fresh store gets demo-shaped candidates (--prompts prompts of the demo task, --k answers each, imported
as pairwise tasks with overlap 1, as the demo's `label` stage does); the server runs in this process (a
uvicorn thread, as in the demo). Two kinds of run, taking turns:

- `panel`: the demo's path as it is, `label_through_api` (its client, its turns, its judgements), timed end
  to end: wall seconds and this process's CPU seconds (server and clients together).
- `queue`: the same turns and judgements over keep-alive stdlib connections that read each answer's
  Server-Timing header: the server's milliseconds per next-task and per vote, medians over the first and
  the last tenth of the queue (a cost that grows as labelers answer more tasks shows as start < end).

Every figure is the median over --repeat runs (the JSON keeps every run). Writes
benchmarks/results/label_queue.json unless --no-save.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchmarks.common import machine
from rlhf.config import PanelConfig
from rlhf.data.demo_task import make_response, render_prompt, sample_question
from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.loadtest import drop_pg_schema, pg_schema
from rlhf.feedback.schemas import CandidateRow
from rlhf.feedback.testing import run_server
from rlhf.labelers.api_panel import _judge_task, label_through_api, panel_tokens
from rlhf.labelers.panel import Panel

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "label_queue.json"
PG_URL = os.environ.get("RLHF_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
PROJECT = "demo"


def demo_candidates(n_prompts: int, k: int, seed: int = 0) -> list[CandidateRow]:
    """Prompts of the demo task with `k` answers each, some of them flawed, like a tiny policy's samples."""
    rng = random.Random(seed)
    rows = []
    for i in range(n_prompts):
        q = sample_question(rng)
        answers = [
            make_response(
                q, rng, wrong=rng.random() < 0.4, rude=rng.random() < 0.1, ramble=rng.random() < 0.2
            )
            for _ in range(k)
        ]
        rows.append(
            CandidateRow.model_validate(
                {
                    "prompt": render_prompt(q.text),
                    "prompt_id": f"p{i}",
                    "completions": [{"text": a, "policy": "sft"} for a in answers],
                }
            )
        )
    return rows


@contextmanager
def fresh_store(backend: str, work: Path, name: str) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{work}/{name}.db"
        return
    schema, url = pg_schema(PG_URL, "rlhf_bench")
    try:
        yield url
    finally:
        drop_pg_schema(PG_URL, schema)


def prepare(db_url: str, rows: list[CandidateRow], panel: Panel) -> tuple[int, dict[str, str]]:
    db = Database(db_url)
    try:
        upgrade(db)
        with db.session() as session:
            tasks = import_candidates(session, PROJECT, rows, task_kind="pairwise", overlap=1).tasks
        return tasks, panel_tokens(db, panel, "bench panel")
    finally:
        db.dispose()


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def queue_run(base_url: str, tokens: dict[str, str], panel: Panel) -> list[tuple[float, float]]:
    """label_through_api's turns over stdlib connections; (next-task ms, vote ms) of the server per vote."""
    port = urlsplit(base_url).port
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=30) for name in tokens}
    headers = {
        name: {"Authorization": f"Bearer {t}", "Content-Type": "application/json"}
        for name, t in tokens.items()
    }

    def post(name: str, path: str, body: dict[str, Any] | None) -> tuple[float, Any]:
        conns[name].request("POST", path, body=json.dumps(body) if body else None, headers=headers[name])
        response = conns[name].getresponse()
        data = json.loads(response.read())
        if response.status >= 400:
            raise RuntimeError(f"{path}: {response.status} {data}")
        return float(response.getheader("server-timing", "").split("dur=")[1]), data

    samples = []
    active = set(tokens)
    while active:
        for name in sorted(active):
            next_ms, data = post(name, f"/api/tasks/next?project={PROJECT}", None)
            task = data["task"]
            if task is None:
                active.discard(name)
                continue
            vote = {"task_id": task["id"], "display_order": task["display_order"], "source": "simulated",
                    "idempotency_key": f"sim-{name}-{task['id']}", **_judge_task(panel, name, task)}  # fmt: skip
            vote_ms, _ = post(name, "/api/votes", vote)
            samples.append((next_ms, vote_ms))
    for conn in conns.values():
        conn.close()
    return samples


def one_run(kind: str, backend: str, rows: list[CandidateRow], panel: Panel, work: Path) -> dict[str, Any]:
    with fresh_store(backend, work, f"{kind}{time.monotonic_ns()}") as db_url:
        tasks, tokens = prepare(db_url, rows, panel)
        with run_server(db_url, votes_per_minute=0) as base_url:
            if kind == "panel":
                counts, wall, cpu = timed(lambda: label_through_api(base_url, tokens, panel, PROJECT))
                return {"tasks": tasks, "votes": sum(counts.values()), "wall_s": wall, "cpu_s": cpu}
            samples, wall, cpu = timed(lambda: queue_run(base_url, tokens, panel))
    tenth = max(1, len(samples) // 10)
    med = statistics.median
    return {
        "tasks": tasks,
        "votes": len(samples),
        "wall_s": wall,
        "cpu_s": cpu,
        "next_ms": {"start": med(s[0] for s in samples[:tenth]), "end": med(s[0] for s in samples[-tenth:])},
        "vote_ms": {"start": med(s[1] for s in samples[:tenth]), "end": med(s[1] for s in samples[-tenth:])},
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure the median over the runs."""
    out: dict[str, Any] = {"tasks": runs[0]["tasks"], "votes": runs[0]["votes"]}
    for key in ("wall_s", "cpu_s"):
        out[key] = round(statistics.median(r[key] for r in runs), 2)
    for key in ("next_ms", "vote_ms"):
        if key in runs[0]:
            out[key] = {e: round(statistics.median(r[key][e] for r in runs), 2) for e in ("start", "end")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--kinds", default="panel,queue", help="comma-separated: panel, queue")
    parser.add_argument("--prompts", type=int, default=600, help="prompts of the demo-shaped project")
    parser.add_argument("--k", type=int, default=6, help="answers per prompt")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each configuration (medians reported)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the results JSON")
    args = parser.parse_args()

    rows = demo_candidates(args.prompts, args.k)
    panel = Panel.from_config(PanelConfig())
    configs = [(b, k) for b in args.backends.split(",") for k in args.kinds.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {f"{b}/{k}": [] for b, k in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            for backend, kind in configs if rep % 2 == 0 else configs[::-1]:
                run = one_run(kind, backend, rows, panel, Path(tmp))
                runs[f"{backend}/{kind}"].append(run)
                print(f"{backend:9} {kind:6} rep {rep}: {json.dumps(run)}", file=sys.stderr, flush=True)
    result = {
        "command": "python -m benchmarks.label_queue " + " ".join(sys.argv[1:]),
        "machine": machine(threads=1),
        "prompts": args.prompts,
        "k": args.k,
        "repeat": args.repeat,
        "results": {name: {**summarise(rs), "runs": rs} for name, rs in runs.items()},
    }
    for name, r in result["results"].items():
        print(name, json.dumps({k: v for k, v in r.items() if k != "runs"}))
    if not args.no_save:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
