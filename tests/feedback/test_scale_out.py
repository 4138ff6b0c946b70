"""Several server processes on one store behave as one app: votes exactly once through a killed worker,
one rate limit for all of them, a logout seen by every one (rlhf/feedback/shared.py, loadtest.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
import redis

from rlhf.feedback.db import Database
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.loadtest import drop_pg_schema, pg_schema, run_load
from rlhf.feedback.schemas import CandidateRow
from rlhf.feedback.shared import RedisShared, redis_namespace
from rlhf.feedback.testing import make_user, run_server
from rlhf.feedback.users import app_secret
from tests import aio
from tests.feedback.conftest import PG_URL, candidate_rows

REDIS_URL = "redis://127.0.0.1:6379/0"
WORKERS = 3


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema for this test alone (its servers and clients run in other processes)."""
    schema, url = pg_schema(PG_URL, "rlhf_scale_test")
    try:
        yield url + "%20-csynchronous_commit%3Doff"
    finally:
        drop_pg_schema(PG_URL, schema)


@pytest.mark.postgres
def test_three_workers_keep_every_acknowledged_vote_exactly_once_through_a_sigkill(pg_url: str) -> None:
    """64 clients, 5,000 votes with deliberate retries, one of 3 workers killed with SIGKILL midway."""
    result = run_load(pg_url, n_votes=5000, n_clients=64, kill=True, workers=WORKERS, redis_url=REDIS_URL)
    assert result["killed_after_votes"] is not None and result["killed_after_votes"] < 5000
    assert result["deliberate_retries"] > 0
    assert result["errors"] == []
    assert (result["missing"], result["duplicated"], result["mismatched_ids"]) == (0, 0, 0)
    assert result["votes_acknowledged"] == result["votes_in_db"] == 5000
    assert result["ok"]


@pytest.fixture(params=["redis", "database"])
def sharing(request: pytest.FixtureRequest, db_url: str) -> Iterator[dict[str, Any]]:
    """Settings of servers that share through Redis, or (no Redis) through the database."""
    if request.param == "database":
        yield {"workers": WORKERS}
        return
    yield {"redis_url": REDIS_URL, "workers": WORKERS}
    # the PostgreSQL test store is reused by later tests: forget what this one counted
    client = redis.Redis.from_url(REDIS_URL)
    db = Database(db_url)
    with db.session() as session:
        secret = app_secret(session)
    keys = list(client.scan_iter(f"{RedisShared.PREFIX}{redis_namespace(secret)}:*"))
    db.dispose()
    if keys:
        client.delete(*keys)


def _servers(stack: ExitStack, db_url: str, **settings: Any) -> list[str]:
    """WORKERS servers on one store, each with its own memory: as separate processes or hosts would be."""
    return [stack.enter_context(run_server(db_url, **settings)) for _ in range(WORKERS)]


def _seed(db_url: str, n_tasks: int) -> None:
    db = Database(db_url)
    rows = [CandidateRow.model_validate(r) for r in candidate_rows(n_tasks, prefix=uuid.uuid4().hex[:6])]
    with db.session() as session:
        import_candidates(session, "demo", rows, overlap=1)
    db.dispose()


def test_a_rate_limit_holds_for_the_sum_over_workers(db_url: str, sharing: dict[str, Any]) -> None:
    limit, attempts = 6, 18
    token = make_user(db_url, "ann")
    _seed(db_url, attempts)
    with ExitStack() as stack:
        urls = _servers(stack, db_url, votes_per_minute=limit, **sharing)

        def vote(i: int) -> int:
            body = {"task_id": i + 1, "choice": "A", "idempotency_key": f"rate-{i:04d}"}
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.post(
                f"{urls[i % WORKERS]}/api/votes", json=body, headers=headers, timeout=30
            ).status_code

        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(vote, range(attempts)))
    assert sorted(codes).count(201) == limit, codes  # each worker alone would have let `limit` through
    assert sorted(codes).count(429) == attempts - limit, codes


def test_a_logout_on_one_worker_is_refused_by_every_worker(db_url: str, sharing: dict[str, Any]) -> None:
    token = make_user(db_url, "ann")
    other = make_user(db_url, "bob")
    with ExitStack() as stack:
        urls = _servers(stack, db_url, auth_cache_s=60, **sharing)
        mine, theirs = {"Authorization": f"Bearer {token}"}, {"Authorization": f"Bearer {other}"}
        for url in urls:  # every worker has the token in its cache now
            assert httpx.get(f"{url}/api/me", headers=mine).json()["name"] == "ann"
        assert httpx.post(f"{urls[0]}/api/logout", headers=mine).status_code == 204
        after = [httpx.get(f"{url}/api/me", headers=mine).status_code for url in urls]
        still = [httpx.get(f"{url}/api/me", headers=theirs).status_code for url in urls]
    assert after == [401] * WORKERS
    assert still == [200] * WORKERS  # only the token that logged out is refused


def test_queue_hands_each_task_to_one_labeler_across_workers(db_url: str) -> None:
    """12 labelers ask 3 workers for their next task at once (overlap 1, 12 tasks): each task goes to
    exactly one of them, and nobody is left without one."""
    n = 12
    tokens = [make_user(db_url, f"lab{i}") for i in range(n)]
    _seed(db_url, n)
    with ExitStack() as stack:
        urls = _servers(stack, db_url, workers=WORKERS)

        def take(i: int) -> int | None:
            headers = {"Authorization": f"Bearer {tokens[i]}"}
            r = httpx.post(f"{urls[i % WORKERS]}/api/tasks/next", params={"project": "demo"}, headers=headers)
            assert r.status_code == 200, r.text
            task = r.json()["task"]
            return None if task is None else int(task["id"])

        with ThreadPoolExecutor(n) as pool:
            got = list(pool.map(take, range(n)))
    assert None not in got and sorted(got) == list(range(1, n + 1)), got  # type: ignore[type-var]


def test_redis_keys_of_two_stores_do_not_mix(tmp_path: Any) -> None:
    """Two apps on one Redis but different stores keep separate limits (keys are namespaced by store)."""
    limit = 2
    counts = []
    for name in ("one", "two"):
        db_url = f"sqlite:///{tmp_path}/{name}.db"
        token = make_user(db_url, "ann")
        _seed(db_url, 3)
        with run_server(db_url, votes_per_minute=limit, redis_url=REDIS_URL) as url:
            codes = [
                httpx.post(
                    f"{url}/api/votes",
                    json={"task_id": i + 1, "choice": "B", "idempotency_key": f"ns-{name}-{i:03d}"},
                    headers={"Authorization": f"Bearer {token}"},
                ).status_code
                for i in range(3)
            ]
        counts.append(codes)
    assert counts == [[201, 201, 429], [201, 201, 429]]


def test_concurrent_auth_epoch_reads_share_a_get_sent_after_each_asked() -> None:
    """Requests asking for the auth epoch at once share one Redis GET, and a change made before a request
    asks is always seen (the shared GET is sent after every one of them asked)."""
    shared = RedisShared(REDIS_URL, namespace=f"test-{uuid.uuid4().hex[:8]}")
    sent: list[str] = []
    get = shared.aclient.get

    async def counted_get(key: str) -> Any:
        sent.append(key)
        return await get(key)

    shared.aclient.get = counted_get  # type: ignore[method-assign]

    async def scenario() -> tuple[int | None, list[int | None], int | None]:
        before = await shared.auth_epoch_async()
        shared.bump_auth_epoch()
        together = await asyncio.gather(*(shared.auth_epoch_async() for _ in range(20)))
        shared.bump_auth_epoch()
        after = await shared.auth_epoch_async()
        await shared.aclose()
        return before, list(together), after

    try:
        before, together, after = aio.run(scenario())
    finally:
        shared.client.delete(shared.prefix + "auth_epoch")
    assert before == 0 and together == [1] * 20 and after == 2
    assert len(sent) == 3  # one GET for the 20 callers that asked together
