"""The server stays light: no torch, and it answers /healthz within 2 seconds of being started."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def test_app_module_does_not_import_torch() -> None:
    code = (
        "import sys, rlhf.feedback.main, rlhf.feedback.cli, rlhf.feedback.client, rlhf.feedback.testing;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def time_to_healthz(db: str, limit_s: float = 20.0) -> tuple[float, float]:
    """(wall seconds, server CPU seconds) from starting `python -m rlhf.feedback serve` to its first
    200 on /healthz."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "rlhf.feedback",
        "serve",
        "--db",
        db,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        while time.monotonic() - start < limit_s:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=0.5)
                if r.status_code == 200 and r.json() == {"status": "ok"}:
                    return time.monotonic() - start, cpu_seconds(proc.pid)
            except httpx.TransportError:
                time.sleep(0.02)
        raise AssertionError(f"no /healthz answer within {limit_s} s")
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_server_answers_healthz_within_two_seconds(tmp_path) -> None:
    """Start on a fresh database (so the migrations run too); best of three starts.

    On a machine busier than its CPU count (other jobs running), wall time says little about the server;
    there the test checks that the start-up needed under 2 s of CPU, i.e. would answer within 2 s given
    one free core, and warns with the wall times it saw.
    """
    runs = []
    for attempt in range(3):
        runs.append(time_to_healthz(f"sqlite:///{tmp_path}/fresh{attempt}.db"))
        if runs[-1][0] < 2.0:
            return
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    load = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    assert load > cores, f"start-up wall times {walls} s (CPU {cpus} s) on a machine with load {load:.1f}"
    assert min(cpus) < 2.0, f"start-up CPU times {cpus} s"
    warnings.warn(
        f"machine busy (load {load:.1f} on {cores} CPUs): start-up took {min(walls):.2f} s wall, "
        f"{min(cpus):.2f} s CPU",
        stacklevel=1,
    )
