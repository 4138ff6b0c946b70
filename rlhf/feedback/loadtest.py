"""A load test of the labeling server: concurrent API clients, retries, and a SIGKILL midway.

Used by benchmarks/feedback_load.py (numbers) and tests/feedback/test_scale_out.py (correctness):

    result = run_load("postgresql://...", n_votes=5000, n_clients=64, workers=3, redis_url="redis://...")
    assert result["ok"]

A fresh store gets one pairwise task per vote and one labeler per client; the server runs as a subprocess
(`python -m rlhf.feedback serve --workers N`). Each client thread posts its votes with its own idempotency
keys, re-sends some acknowledged votes on purpose (they must come back as the same vote), and on a
connection error retries with the same key. When half the votes are in, the server (one worker) is killed
with SIGKILL; with one worker it is started again, with several the supervisor starts a new worker. At the
end the database must hold every acknowledged vote exactly once, with the id its client was given.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import socket
import subprocess
import sys
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


class Connection:
    """One client's keep-alive HTTP/1.1 connection, from the standard library: a small share of httpx's CPU per
    request, so that on a machine the server shares, the clients are not what the measured latency waits on.
    A request whose connection broke raises OSError or HTTPException; the next request opens a new one."""

    def __init__(self, port: int, token: str) -> None:
        self.port = port
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn: http.client.HTTPConnection | None = None

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
        """(status, the Server-Timing header, the body)."""
        if self.conn is None:
            self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            self.conn.request("POST", path, body=json.dumps(body), headers=self.headers)
            response = self.conn.getresponse()
            return response.status, response.getheader("server-timing", ""), response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class Tally:
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


def start_server(
    db_url: str, port: int, env: dict[str, str], workers: int = 1, redis_url: str | None = None
) -> subprocess.Popen[bytes]:
    """`rlhf label serve` in a subprocess, returned once /healthz answers."""
    cmd = [sys.executable, "-m", "rlhf.feedback", "serve", "--db", db_url, "--port", str(port)]
    cmd += ["--log-level", "warning"] + (["--workers", str(workers)] if workers > 1 else [])
    if redis_url:
        cmd += ["--redis-url", redis_url]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_healthy(proc, port)
    return proc


def wait_healthy(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not start within {timeout_s:g} s")


def worker_pids(pid: int) -> list[int]:
    """The uvicorn worker processes under a `--workers N` supervisor (Linux /proc)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its children it has reaped (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a server: the process, its live children and the children it has reaped."""
    total = cpu_seconds(pid)
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            total += cpu_seconds(int(child))
        except FileNotFoundError:  # it ended meanwhile
            pass
    return total


def prepare(db_url: str, n_votes: int, n_clients: int) -> list[str]:
    """Migrate, create one labeler per client (tokens returned) and one pairwise task per vote."""
    db = Database(db_url)
    upgrade(db)
    rows = [
        CandidateRow.model_validate(
            {
                "prompt": f"load prompt {i}",
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
        import_candidates(session, "load", rows, overlap=1)
        for c in range(n_clients):
            create_user(session, f"load{c}", "labeler")
            tokens.append(create_token(session, f"load{c}"))
    db.dispose()
    return tokens


def client_loop(
    conn: Connection, task_ids: list[int], tag: str, retry_rate: float, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)
    try:
        for task_id in task_ids:
            key = f"load-{tag}-{task_id}"
            body = {
                "task_id": task_id,
                "choice": rng.choice("AB"),
                "idempotency_key": key,
                "source": "simulated",
            }
            vote_id = send(conn, body, tally)
            with tally.lock:
                tally.acked[key] = vote_id
            if rng.random() < retry_rate:  # a client that did not trust the first answer
                again = send(conn, body, tally, expect_replay=True)
                with tally.lock:
                    tally.deliberate_retries += 1
                    if again != vote_id:
                        tally.errors.append(f"{key}: retry gave vote {again}, first answer was {vote_id}")
    finally:
        conn.close()


def send(conn: Connection, body: dict[str, Any], tally: Tally, expect_replay: bool = False) -> int:
    """POST until acknowledged; connection errors (the server was killed) are retried with the same key."""
    deadline = time.monotonic() + 120
    while True:
        start = time.perf_counter()
        try:
            status, timing, data = conn.post("/api/votes", body)
        except (OSError, http.client.HTTPException):
            with tally.lock:
                tally.connection_retries += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        elapsed_ms = (time.perf_counter() - start) * 1000
        if status in (200, 201):
            if expect_replay and status != 200:
                with tally.lock:
                    tally.errors.append(f"{body['idempotency_key']}: a retry got {status}, not 200")
            server_ms = float(timing.split("dur=")[1]) if "dur=" in timing else float("nan")
            with tally.lock:
                tally.samples.append((start, elapsed_ms, server_ms))
            return int(json.loads(data)["id"])
        text = data[:200].decode(errors="replace")
        with tally.lock:
            tally.errors.append(f"{body['idempotency_key']}: HTTP {status} {text}")
        if status < 500 or time.monotonic() > deadline:
            raise RuntimeError(f"vote refused: {status} {text}")
        time.sleep(0.05)


def run_load(
    db_url: str,
    n_votes: int,
    n_clients: int = 64,
    retry_rate: float = 0.05,
    kill: bool = True,
    workers: int = 1,
    redis_url: str | None = None,
) -> dict[str, Any]:
    """Prepare a store, serve it, run the clients (killing the server or one worker midway), verify."""
    tokens = prepare(db_url, n_votes, n_clients)
    port = free_port()
    env = {"RLHF_LABEL_VOTES_PER_MINUTE": "0"}
    server = start_server(db_url, port, env, workers, redis_url)
    tally = Tally()
    tag = uuid.uuid4().hex[:8]
    task_ids = list(range(1, n_votes + 1))
    clients = [Connection(port, token) for token in tokens]
    threads = [
        threading.Thread(
            target=client_loop,
            args=(clients[c], task_ids[c::n_clients], tag, retry_rate, tally, c),
            daemon=True,
        )
        for c in range(n_clients)
    ]
    killed_at = None
    t_kill = t_ready = 0.0
    server_cpu = -tree_cpu(server.pid)
    client_cpu = -time.process_time()
    start = time.perf_counter()
    for t in threads:
        t.start()
    if kill:
        while len(tally.acked) < n_votes // 2 and any(t.is_alive() for t in threads):
            time.sleep(0.01)
        killed_at = len(tally.acked)
        t_kill = time.perf_counter()
        if workers == 1:  # the whole server dies and is started again
            server_cpu += tree_cpu(server.pid)
            server.send_signal(signal.SIGKILL)
            server.wait()
            server = start_server(db_url, port, env, workers, redis_url)
            server_cpu -= tree_cpu(server.pid)
        else:  # one worker dies; the others carry on, and the supervisor starts a new one
            # (its CPU time stays counted: the supervisor reaps it, adding it to its children's time)
            os.kill(worker_pids(server.pid)[0], signal.SIGKILL)
        t_ready = time.perf_counter()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - start
    client_cpu += time.process_time()
    server_cpu += tree_cpu(server.pid)
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=30)
    return summarize(db_url, n_votes, n_clients, workers, tally, wall_s, server_cpu, client_cpu, killed_at,
                     (t_kill, t_ready))  # fmt: skip


def summarize(
    db_url: str,
    n_votes: int,
    n_clients: int,
    workers: int,
    tally: Tally,
    wall_s: float,
    server_cpu: float,
    client_cpu: float,
    killed_at: int | None,
    kill_window: tuple[float, float],
) -> dict[str, Any]:
    """Check the store against what was acknowledged, and the latency and CPU figures."""
    db = Database(db_url)
    with db.session() as session:
        rows = session.execute(select(Vote.idempotency_key, Vote.id)).all()
        total = session.scalar(select(func.count()).select_from(Vote))
    db.dispose()
    stored: dict[str, list[int]] = {}
    for key, vote_id in rows:
        stored.setdefault(key, []).append(vote_id)
    missing = [k for k in tally.acked if k not in stored]
    duplicated = [k for k, ids in stored.items() if len(ids) > 1]
    mismatched = [k for k, vid in tally.acked.items() if k in stored and stored[k] != [vid]]
    lat = sorted(ms for _, ms, _ in tally.samples)
    srv = sorted(ms for _, _, ms in tally.samples)
    # steady state: leave out requests sent from the kill until 2 s after the server was whole again
    t_kill, t_ready = kill_window
    steady = sorted(ms for t, ms, _ in tally.samples if killed_at is None or not t_kill <= t <= t_ready + 2.0)
    downtime_s = t_ready - t_kill
    return {
        "workers": workers,
        "clients": n_clients,
        "votes_acknowledged": len(tally.acked),
        "votes_in_db": total,
        "missing": len(missing),
        "duplicated": len(duplicated),
        "mismatched_ids": len(mismatched),
        "errors": tally.errors[:20],
        "deliberate_retries": tally.deliberate_retries,
        "connection_retries": tally.connection_retries,
        "killed_after_votes": killed_at,
        "restart_downtime_s": round(downtime_s, 3),
        "wall_s": round(wall_s, 2),
        "votes_per_s": round(len(tally.acked) / wall_s, 1),
        "votes_per_s_excluding_restart": round(len(tally.acked) / max(wall_s - downtime_s, 1e-9), 1),
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
        "ok": not (missing or duplicated or mismatched or tally.errors) and total == n_votes,
    }


def pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile (nearest rank below) of already sorted values, rounded to 0.1."""
    if not sorted_values:
        return float("nan")
    return round(sorted_values[int(q * (len(sorted_values) - 1))], 1)


def pg_schema(pg_url: str, prefix: str = "rlhf_load") -> tuple[str, str]:
    """A fresh schema in the PostgreSQL database at `pg_url`: (its name, a URL whose search_path is it)."""
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema, f"{pg_url}?options=-csearch_path%3D{schema}"


def drop_pg_schema(pg_url: str, schema: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
