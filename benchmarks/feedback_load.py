"""Load test of the labeling server: concurrent API clients, retries, and a SIGKILL of the server midway.

    python -m benchmarks.feedback_load                     # SQLite and PostgreSQL, 64 clients, 10,000 votes
    python -m benchmarks.feedback_load --backends sqlite --votes 2000

For each backend: a fresh store with one pairwise task per vote and one labeler per client; the server runs
as a uvicorn subprocess (`python -m rlhf.feedback serve`). Each client thread posts its votes with its own
idempotency keys, re-sends some acknowledged votes on purpose (they must come back as the same vote), and
on a connection error retries with the same key. When half the votes are in, the server is killed with
SIGKILL and started again. At the end the database must hold every acknowledged vote exactly once.
Prints a table and writes benchmarks/results/feedback_load.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from sqlalchemy import func, select

from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.models import Vote
from rlhf.feedback.schemas import CandidateRow
from rlhf.feedback.users import create_token, create_user

ROOT = Path(__file__).resolve().parents[1]
PG_URL = os.environ.get("RLHF_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@dataclass
class Shared:
    """What the client threads report back."""

    acked: dict[str, int] = field(default_factory=dict)  # idempotency key -> vote id
    # per acknowledged request: (start time, latency ms, the server's own ms from its Server-Timing header)
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    connection_retries: int = 0
    deliberate_retries: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(db_url: str, port: int, workers_env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "rlhf.feedback",
        "serve",
        "--db",
        db_url,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **workers_env}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError("server did not start within 60 s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to report server CPU per vote."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def prepare(db_url: str, n_votes: int, n_clients: int) -> list[str]:
    """Migrate, create one labeler per client (tokens returned) and one pairwise task per vote."""
    db = Database(db_url)
    upgrade(db)
    rows = [
        CandidateRow.model_validate(
            {
                "prompt": f"bench prompt {i}",
                "prompt_id": f"b{i}",
                "completions": [
                    {"text": f"answer {i} a", "policy": "v1"},
                    {"text": f"answer {i} b", "policy": "v2"},
                ],
            }
        )
        for i in range(n_votes)
    ]
    tokens = []
    with db.session() as session:
        import_candidates(session, "bench", rows, overlap=1)
        for c in range(n_clients):
            create_user(session, f"bench{c}", "labeler")
            tokens.append(create_token(session, f"bench{c}"))
    db.dispose()
    return tokens


def client_loop(
    base_url: str, token: str, task_ids: list[int], tag: str, retry_rate: float, shared: Shared, seed: int
) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
        for task_id in task_ids:
            key = f"bench-{tag}-{task_id}"
            body = {
                "task_id": task_id,
                "choice": rng.choice("AB"),
                "idempotency_key": key,
                "source": "simulated",
            }
            vote_id = send(http, body, shared)
            with shared.lock:
                shared.acked[key] = vote_id
            if rng.random() < retry_rate:  # a client that did not trust the first answer
                again = send(http, body, shared, expect_replay=True)
                with shared.lock:
                    shared.deliberate_retries += 1
                    if again != vote_id:
                        shared.errors.append(f"{key}: retry gave vote {again}, first answer was {vote_id}")


def send(http: httpx.Client, body: dict[str, Any], shared: Shared, expect_replay: bool = False) -> int:
    """POST until acknowledged; connection errors (the server was killed) are retried with the same key."""
    deadline = time.monotonic() + 120
    while True:
        start = time.perf_counter()
        try:
            r = http.post("/api/votes", json=body)
        except httpx.TransportError:
            with shared.lock:
                shared.connection_retries += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        elapsed_ms = (time.perf_counter() - start) * 1000
        if r.status_code in (200, 201):
            if expect_replay and r.status_code != 200:
                with shared.lock:
                    shared.errors.append(f"{body['idempotency_key']}: a retry got {r.status_code}, not 200")
            timing = r.headers.get("server-timing", "dur=nan").split("dur=")[1]
            with shared.lock:
                shared.samples.append((start, elapsed_ms, float(timing)))
            return int(r.json()["id"])
        with shared.lock:
            shared.errors.append(f"{body['idempotency_key']}: HTTP {r.status_code} {r.text[:200]}")
        if r.status_code < 500 or time.monotonic() > deadline:
            raise RuntimeError(f"vote refused: {r.status_code} {r.text[:200]}")
        time.sleep(0.05)


def run_backend(
    name: str, db_url: str, n_votes: int, n_clients: int, retry_rate: float, kill: bool
) -> dict[str, Any]:
    tokens = prepare(db_url, n_votes, n_clients)
    port = free_port()
    env = {"RLHF_LABEL_VOTES_PER_MINUTE": "0"}
    server = start_server(db_url, port, env)
    base_url = f"http://127.0.0.1:{port}"
    shared = Shared()
    tag = uuid.uuid4().hex[:8]
    task_ids = list(range(1, n_votes + 1))
    threads = [
        threading.Thread(
            target=client_loop,
            args=(base_url, tokens[c], task_ids[c::n_clients], tag, retry_rate, shared, c),
            daemon=True,
        )
        for c in range(n_clients)
    ]
    downtime_s = 0.0
    killed_at = None
    t_kill = t_ready = 0.0
    server_cpu = -cpu_seconds(server.pid)
    client_cpu = -time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    if kill:
        while len(shared.acked) < n_votes // 2 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        killed_at = len(shared.acked)
        t_kill = time.perf_counter()
        server_cpu += cpu_seconds(server.pid)
        server.send_signal(signal.SIGKILL)
        server.wait()
        server = start_server(db_url, port, env)
        server_cpu -= cpu_seconds(server.pid)
        t_ready = time.perf_counter()
        downtime_s = t_ready - t_kill
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - start
    client_cpu += time.process_time()
    server_cpu += cpu_seconds(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)

    # Every acknowledged vote is in the store exactly once, with the id the client was given.
    db = Database(db_url)
    with db.session() as session:
        rows = session.execute(select(Vote.idempotency_key, Vote.id)).all()
        total = session.scalar(select(func.count()).select_from(Vote))
    db.dispose()
    stored: dict[str, list[int]] = {}
    for key, vote_id in rows:
        stored.setdefault(key, []).append(vote_id)
    missing = [k for k in shared.acked if k not in stored]
    duplicated = [k for k, ids in stored.items() if len(ids) > 1]
    mismatched = [k for k, vid in shared.acked.items() if k in stored and stored[k] != [vid]]
    lat = sorted(ms for _, ms, _ in shared.samples)
    srv = sorted(ms for _, _, ms in shared.samples)
    # steady state: leave out requests sent from the kill until 2 s after the new server was ready
    # (a cold server meeting 64 clients retrying at once)
    window = (t_kill, t_ready + 2.0) if kill else (0.0, 0.0)
    steady = sorted(ms for t, ms, _ in shared.samples if not window[0] <= t <= window[1])
    return {
        "backend": name,
        "clients": n_clients,
        "votes_acknowledged": len(shared.acked),
        "votes_in_db": total,
        "missing": len(missing),
        "duplicated": len(duplicated),
        "mismatched_ids": len(mismatched),
        "errors": shared.errors[:20],
        "deliberate_retries": shared.deliberate_retries,
        "connection_retries": shared.connection_retries,
        "killed_after_votes": killed_at,
        "restart_downtime_s": round(downtime_s, 3),
        "wall_s": round(wall_s, 2),
        "votes_per_s": round(len(shared.acked) / wall_s, 1),
        "votes_per_s_excluding_restart": round(len(shared.acked) / max(wall_s - downtime_s, 1e-9), 1),
        "server_cpu_ms_per_request": round(1000 * server_cpu / max(len(lat), 1), 2),
        "client_cpu_ms_per_request": round(1000 * client_cpu / max(len(lat), 1), 2),
        "latency_ms": {
            "p50": pct(lat, 0.5),
            "p90": pct(lat, 0.9),
            "p99": pct(lat, 0.99),
            "max": pct(lat, 1.0),
            "requests": len(lat),
        },
        "latency_ms_steady": {"p50": pct(steady, 0.5), "p99": pct(steady, 0.99), "requests": len(steady)},
        "server_side_ms": {"p50": pct(srv, 0.5), "p99": pct(srv, 0.99)},
        "ok": not (missing or duplicated or mismatched or shared.errors) and total == n_votes,
    }


def pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile (nearest rank below) of already sorted values, rounded to 0.1."""
    return round(sorted_values[int(q * (len(sorted_values) - 1))], 1)


def pg_schema() -> tuple[str, str]:
    schema = f"rlhf_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema, f"{PG_URL}?options=-csearch_path%3D{schema}"


def drop_pg_schema(schema: str) -> None:
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--votes", type=int, default=10_000, help="votes to post in total")
    parser.add_argument("--clients", type=int, default=64, help="concurrent API clients (threads)")
    parser.add_argument("--retry-rate", type=float, default=0.05, help="share of votes re-sent on purpose")
    parser.add_argument("--no-kill", action="store_true", help="do not SIGKILL the server midway")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "feedback_load.json"))
    args = parser.parse_args()

    load_at_start = os.getloadavg()
    results = []
    for backend in args.backends.split(","):
        if backend == "sqlite":
            with tempfile.TemporaryDirectory() as tmp:
                results.append(
                    run_backend(
                        "sqlite",
                        f"sqlite:///{tmp}/bench.db",
                        args.votes,
                        args.clients,
                        args.retry_rate,
                        not args.no_kill,
                    )
                )
        elif backend == "postgres":
            schema, url = pg_schema()
            try:
                results.append(
                    run_backend("postgres", url, args.votes, args.clients, args.retry_rate, not args.no_kill)
                )
            finally:
                drop_pg_schema(schema)
        else:
            parser.error(f"unknown backend {backend!r}")

    header = (
        f"{'backend':<9} {'votes':>6} {'votes/s':>8} {'(no restart)':>12} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'p99 steady':>10} {'srv CPU ms':>10} {'restart s':>9}  exactly-once"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['backend']:<9} {r['votes_acknowledged']:>6} {r['votes_per_s']:>8} {r['votes_per_s_excluding_restart']:>12}"
            f" {r['latency_ms']['p50']:>7} {r['latency_ms']['p99']:>7} {r['latency_ms_steady']['p99']:>10}"
            f" {r['server_cpu_ms_per_request']:>10} {r['restart_downtime_s']:>9}  "
            f"{'yes' if r['ok'] else 'NO: ' + json.dumps({k: r[k] for k in ('missing', 'duplicated', 'mismatched_ids', 'errors')})}"
        )
    out = {
        "benchmark": "feedback_load",
        "command": "python -m benchmarks.feedback_load " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
