"""rlhf/feedback/cli.py: the `rlhf label` commands."""

from __future__ import annotations

import json
import sqlite3

import httpx
from typer.testing import CliRunner

from rlhf.errors import ConfigError
from rlhf.feedback.cli import app
from rlhf.feedback.db import Database, current_revision, head_revision
from rlhf.feedback.testing import run_server

runner = CliRunner()


def invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_upgrade_import_users_tokens_export(db_url: str, tmp_path, make_rows) -> None:
    invoke("db", "upgrade", "--db", db_url)
    db = Database(db_url)
    assert current_revision(db) == head_revision()
    db.dispose()
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text("".join(json.dumps(r) + "\n" for r in make_rows(3, 3)))
    gold = tmp_path / "gold.jsonl"
    gold.write_text(
        json.dumps({"prompt": "2+2?", "completion_a": "4", "completion_b": "5", "choice": "A"}) + "\n"
    )
    out = invoke(
        "import",
        "--db",
        db_url,
        "--project",
        "demo",
        "--candidates",
        str(candidates),
        "--gold",
        str(gold),
        "--overlap",
        "2",
        "--gold-rate",
        "0.1",
    )
    assert "4 prompts" in out and "9 pairwise tasks" in out and "1 gold" in out
    invoke(
        "user", "add", "--db", db_url, "--name", "admin", "--role", "admin", "--password", "admin-password"
    )
    invoke("user", "add", "--db", db_url, "--name", "ann", "--password", "")
    token = invoke("token", "create", "--db", db_url, "--name", "ann").strip()
    assert token.startswith("rlhf_")
    with run_server(db_url) as url:
        r = httpx.post(f"{url}/api/tasks/next", headers={"Authorization": f"Bearer {token}"})
        task = r.json()["task"]
        r = httpx.post(
            f"{url}/api/votes",
            headers={"Authorization": f"Bearer {token}"},
            json={"task_id": task["id"], "choice": "tie", "idempotency_key": "cli-test-1"},
        )
        assert r.status_code == 201
    target = tmp_path / "votes.jsonl"
    result = runner.invoke(
        app, ["export", "--db", db_url, "--project", "demo", "--format", "votes", "--out", str(target)]
    )
    # the summary goes to stderr: with --out /dev/stdout, stdout carries the records alone
    assert result.exit_code == 0 and "wrote 1 votes" in result.stderr and result.stdout == ""
    assert json.loads(target.read_text())["choice"] == "tie"


def test_user_errors_are_one_line(tmp_path) -> None:
    db_url = f"sqlite:///{tmp_path}/x.db"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}\n{oops\n')
    result = runner.invoke(app, ["import", "--db", db_url, "--project", "demo", "--candidates", str(bad)])
    assert result.exit_code != 0 and "bad.jsonl:2: not valid JSON" in str(result.exception)
    bad.write_text('{"prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}\n'
                   '{"prompt": "q", "completions": [{"text": "a"}]}\n')  # fmt: skip
    result = runner.invoke(app, ["import", "--db", db_url, "--project", "demo", "--candidates", str(bad)])
    assert f"{bad}: record 2: a pairwise task needs at least 2 completions" in str(result.exception)
    result = runner.invoke(
        app, ["export", "--db", db_url, "--project", "nope", "--out", str(tmp_path / "o.jsonl")]
    )
    assert "no project named 'nope'" in str(result.exception)
    missing = tmp_path / "nothere.db"  # a mistyped store: said, and no new empty store left there
    result = runner.invoke(
        app, ["export", "--db", f"sqlite:///{missing}", "--project", "p", "--out", str(tmp_path / "o.jsonl")]
    )
    assert str(result.exception) == f"no feedback store at sqlite:///{missing}" and not missing.exists()
    # a file that is there but no store (another app's database, or no database at all): said, and left as it was
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (a INTEGER)").connection.commit()
    result = runner.invoke(
        app, ["export", "--db", f"sqlite:///{other}", "--project", "p", "--out", str(tmp_path / "o.jsonl")]
    )
    assert str(result.exception) == f"sqlite:///{other} is not a feedback store (it holds none of its tables)"
    assert [r[0] for r in sqlite3.connect(other).execute("SELECT name FROM sqlite_master")] == ["x"]
    text_file = tmp_path / "votes.jsonl"
    text_file.write_text('{"prompt": "q"}\n' * 100)
    result = runner.invoke(
        app,
        ["export", "--db", f"sqlite:///{text_file}", "--project", "p", "--out", str(tmp_path / "o.jsonl")],
    )
    assert str(result.exception).startswith(
        f"cannot open the database sqlite:///{text_file}: file is not a database"
    )
    # an --out that cannot be written: said before the store is read (it was an IsADirectoryError traceback)
    result = runner.invoke(app, ["export", "--db", db_url, "--project", "demo", "--out", str(tmp_path)])
    assert str(result.exception) == f"--out: {tmp_path} is a directory; name the file to write"
    result = runner.invoke(
        app, ["export", "--db", db_url, "--project", "demo", "--out", str(text_file / "o.jsonl")]
    )
    assert (
        str(result.exception) == f"--out: {text_file} is a file, so {text_file / 'o.jsonl'} cannot be written"
    )
    result = runner.invoke(app, ["user", "add", "--db", db_url, "--name", "x y", "--password", ""])
    assert "user name 'x y'" in str(result.exception)
    result = runner.invoke(app, ["db", "upgrade", "--db", "postgresql://nobody@127.0.0.1:1/none"])
    assert isinstance(result.exception, ConfigError) and "cannot open the database" in str(result.exception)
    # a Redis nobody listens on: said before the server starts (it was each worker's start-up traceback)
    result = runner.invoke(app, ["serve", "--db", db_url, "--redis-url", "redis://127.0.0.1:1/0"])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception).startswith("cannot reach Redis at redis://127.0.0.1:1/0")
