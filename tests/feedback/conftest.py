"""Fixtures: every app test runs on SQLite and on the PostgreSQL server at 127.0.0.1:5432/test.

PostgreSQL tests use a schema of their own per test session (dropped at the end) and empty its tables
after each test. If the server is unreachable they fail: they are never skipped.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient

from rlhf.feedback import users
from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.main import create_app
from rlhf.feedback.models import Base
from rlhf.feedback.settings import Settings

PG_URL = os.environ.get("RLHF_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
LABELERS = ("ann", "bob", "cat")


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """'sqlite', or the URL of a fresh, migrated PostgreSQL schema for this test session."""
    if request.param == "sqlite":
        yield "sqlite"
        return
    schema = f"rlhf_fb_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    # synchronous_commit=off: test data need no fsync per commit (locking and visibility are unchanged).
    url = f"{PG_URL}?options=-csearch_path%3D{schema}%20-csynchronous_commit%3Doff"
    try:
        db = Database(url)
        upgrade(db)
        db.dispose()
        yield url
    finally:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def db_url(backend: str, tmp_path: Any) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path}/feedback.db"
        return
    yield backend
    # DELETE and restart the id sequences: much quicker than TRUNCATE on tables this small.
    schema = backend.split("search_path%3D", 1)[1].split("%20", 1)[0]
    with psycopg.connect(PG_URL, options=f"-csearch_path={schema} -csynchronous_commit=off") as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(f'DELETE FROM "{table.name}"')
            if "id" in table.c:
                conn.execute(f"SELECT setval(pg_get_serial_sequence('\"{table.name}\"', 'id'), 1, false)")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    database = Database(db_url)
    upgrade(database)
    yield database
    database.dispose()


@pytest.fixture
def make_client(db: Database, db_url: str) -> Iterator[Callable[..., TestClient]]:
    """make_client(**settings) -> a TestClient of an app on this test's database (lifespan running)."""
    opened: list[TestClient] = []

    def make(**overrides: Any) -> TestClient:
        client = TestClient(create_app(Settings(db=db_url, **overrides)))
        client.__enter__()
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client()


@pytest.fixture
def team(db: Database) -> dict[str, dict[str, str]]:
    """An admin and three labelers with API tokens (no passwords: argon2 is slow on purpose);
    name -> Authorization header."""
    headers = {}
    with db.session() as session:
        for name in ("admin", *LABELERS):
            users.create_user(session, name, "admin" if name == "admin" else "labeler")
            headers[name] = {"Authorization": f"Bearer {users.create_token(session, name)}"}
    return headers


def candidate_rows(n_prompts: int, k: int = 2, prefix: str = "p") -> list[dict[str, Any]]:
    """Candidate-generation rows: n prompts with k completions each, from two policy versions."""
    return [
        {
            "prompt": f"prompt {i}",
            "prompt_id": f"{prefix}{i}",
            "completions": [
                {
                    "text": f"answer {i}.{j}",
                    "policy": f"policy-v{j % 2}",
                    "sampling": {
                        "temperature": 0.7,
                        "top_p": 0.9,
                        "top_k": 0,
                        "max_new_tokens": 32,
                        "seed": j,
                    },
                }
                for j in range(k)
            ],
        }
        for i in range(n_prompts)
    ]


class Api:
    """Shorthands over a TestClient: seed a project, take the next task, vote. `as_` names a team member."""

    def __init__(self, client: TestClient, team: dict[str, dict[str, str]]) -> None:
        self.client = client
        self.team = team

    def seed(
        self,
        name: str = "demo",
        n_prompts: int = 3,
        k: int = 2,
        task_kind: str = "pairwise",
        gold: list[dict[str, Any]] | None = None,
        **settings: Any,
    ) -> dict[str, Any]:
        body = {
            "task_kind": task_kind,
            "candidates": candidate_rows(n_prompts, k),
            "gold": gold or [],
            **settings,
        }
        response = self.client.post(f"/api/projects/{name}/import", json=body, headers=self.team["admin"])
        assert response.status_code == 201, response.text
        out: dict[str, Any] = response.json()
        return out

    def next(self, as_: str, project: str = "demo") -> dict[str, Any] | None:
        response = self.client.post("/api/tasks/next", params={"project": project}, headers=self.team[as_])
        assert response.status_code == 200, response.text
        task: dict[str, Any] | None = response.json()["task"]
        return task

    def vote(self, as_: str, task_id: int, key: str | None = None, **fields: Any) -> Any:
        body = {"task_id": task_id, "idempotency_key": key or f"k-{uuid.uuid4().hex}", **fields}
        if not any(f in fields for f in ("choice", "ranking", "rating")):
            body["choice"] = "A"
        return self.client.post("/api/votes", json=body, headers=self.team[as_])

    def get(self, as_: str, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.team[as_], **kwargs)

    def post(self, as_: str, path: str, **kwargs: Any) -> Any:
        return self.client.post(path, headers=self.team[as_], **kwargs)


@pytest.fixture
def api(client: TestClient, team: dict[str, dict[str, str]]) -> Api:
    return Api(client, team)


@pytest.fixture
def make_rows() -> Callable[..., list[dict[str, Any]]]:
    """candidate_rows(n_prompts, k=2, prefix="p") -> rows of the candidate-generation file."""
    return candidate_rows
