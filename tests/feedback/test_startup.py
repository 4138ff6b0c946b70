"""The server stays light: no torch, no Alembic on an up-to-date database, no Jinja2 before a page, and it starts.

How fast it starts is a benchmark figure (`python -m benchmarks.feedback_startup`), not a test.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_app_module_does_not_import_torch_or_page_templates() -> None:
    code = (
        "import sys, rlhf.feedback.main, rlhf.feedback.cli, rlhf.feedback.client, rlhf.feedback.testing;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'transformers', 'numpy', 'alembic', 'jinja2'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr


def test_up_to_date_schema_is_checked_without_alembic(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/store.db"
    code = (
        "import sys; from rlhf.feedback.db import Database, upgrade, current_revision, SCHEMA_HEAD;"
        f"db = Database({url!r}); upgrade(db); fresh = 'alembic' in sys.modules;"
        "assert current_revision(db) == SCHEMA_HEAD;"
        "[sys.modules.pop(m) for m in list(sys.modules) if m.split('.')[0] == 'alembic'];"
        f"upgrade(Database({url!r})); print(fresh, 'alembic' in sys.modules)"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]  # migrated with Alembic, then checked without it


def test_module_app_is_built_on_first_access() -> None:
    code = (
        "import rlhf.feedback.main as m; assert 'app' not in vars(m); app = m.app;"
        "print(sorted(p for p in app.openapi()['paths'] if p in ('/healthz', '/api/votes')))"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['/api/votes', '/healthz']"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_server_starts_on_a_fresh_database_and_answers_healthz(tmp_path) -> None:
    port = free_port()
    db = tmp_path / "fresh.db"
    cmd = [sys.executable, "-m", "rlhf.feedback", "serve", "--db", f"sqlite:///{db}", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--log-level", "warning"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120  # a hang guard only: start-up takes about a second
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "server never answered /healthz"
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert db.exists()
    finally:
        proc.kill()
        proc.wait(timeout=10)
