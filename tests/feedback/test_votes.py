"""rlhf/feedback/votes.py: idempotent votes (also under racing threads), undo, limits, disabled labelers."""

from __future__ import annotations

import threading
import time

import httpx
from sqlalchemy import func, select

from rlhf.feedback.db import Database
from rlhf.feedback.models import Vote
from rlhf.feedback.testing import run_server


def count_votes(db: Database, key: str | None = None) -> int:
    stmt = select(func.count()).select_from(Vote)
    if key is not None:
        stmt = stmt.where(Vote.idempotency_key == key)
    with db.session() as s:
        return int(s.scalar(stmt) or 0)


def test_same_key_twice_is_one_vote(api, db: Database) -> None:
    api.seed(n_prompts=1)
    task = api.next("ann")
    body = {"choice": "A", "display_order": [1, 0], "note": "ok"}
    first = api.vote("ann", task["id"], key="retry-key-1", **body)
    again = api.vote("ann", task["id"], key="retry-key-1", **body, time_to_vote_ms=5)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()  # the original vote
    assert first.json()["choice"] == "A" and first.json()["display_order"] == [1, 0]
    # the same key with another answer is a key reused by mistake, not a retry
    changed = api.vote("ann", task["id"], key="retry-key-1", **{**body, "choice": "B"})
    assert changed.status_code == 422 and "choice" in changed.text
    assert count_votes(db, "retry-key-1") == 1
    # another labeler reusing the key is refused
    assert api.vote("bob", task["id"], key="retry-key-1").status_code == 409


def test_racing_requests_with_one_key_make_one_row(db: Database, db_url: str, team) -> None:
    """16 threads send the same vote at once through a real server: one row, every answer 200/201."""
    with run_server(db_url, votes_per_minute=0) as url:
        admin = httpx.Client(base_url=url, headers=team["admin"])
        body = {
            "candidates": [
                {"prompt": f"p{i}", "completions": [{"text": "a"}, {"text": "b"}]} for i in range(4)
            ]
        }
        assert admin.post("/api/projects/demo/import", json=body).status_code == 201
        task_ids = [t["id"] for t in _admin_tasks(admin)]
        results: list[tuple[int, int]] = []
        barrier = threading.Barrier(16)
        clients = [httpx.Client(base_url=url, headers=team["ann"], timeout=30) for _ in range(16)]

        def send(c: httpx.Client, task_id: int, key: str) -> None:
            barrier.wait()
            r = c.post("/api/votes", json={"task_id": task_id, "choice": "A", "idempotency_key": key})
            results.append((r.status_code, r.json().get("id", r.text)))

        for task_id in task_ids:
            barrier.reset()
            threads = [
                threading.Thread(target=send, args=(c, task_id, f"race-key-{task_id}")) for c in clients
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for c in [admin, *clients]:
            c.close()
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == len(task_ids) and set(statuses) == {200, 201}
    assert len({vote_id for _, vote_id in results}) == len(task_ids)
    for task_id in task_ids:
        assert count_votes(db, f"race-key-{task_id}") == 1
    assert count_votes(db) == len(task_ids)


def _admin_tasks(admin: httpx.Client) -> list[dict]:
    tasks, task_id = [], 1
    while (r := admin.get(f"/api/tasks/{task_id}")).status_code == 200:
        tasks.append(r.json())
        task_id += 1
    return tasks


def test_second_vote_on_a_task_is_a_conflict(api, db: Database) -> None:
    api.seed(n_prompts=1)
    task = api.next("ann")
    assert api.vote("ann", task["id"]).status_code == 201
    assert api.vote("ann", task["id"]).status_code == 409
    assert count_votes(db) == 1


def test_voting_directly_claims_a_slot_within_overlap(api) -> None:
    api.seed(n_prompts=1, overlap=1)
    assert api.vote("ann", 1).status_code == 201  # no next_task first: the vote claims the slot
    assert api.vote("bob", 1).status_code == 409  # overlap 1 is used up
    assert api.next("bob") is None


def test_answer_must_fit_the_task(api) -> None:
    api.seed(n_prompts=1, k=3, task_kind="ranking")
    task = api.next("ann")
    assert api.vote("ann", task["id"], choice="A").status_code == 422
    assert api.vote("ann", task["id"], ranking=[1, 2]).status_code == 422  # wrong length
    assert api.vote("ann", task["id"], ranking=[1, 2, 4]).status_code == 422  # rank out of range
    assert api.vote("ann", task["id"], ranking=[1, 1, 3], display_order=[0, 0, 1]).status_code == 422
    assert api.vote("ann", task["id"], ranking=[2, 1, 2], display_order=[2, 0, 1]).status_code == 201


def test_a_vote_body_takes_json_numbers_and_no_unknown_key(api) -> None:
    """A misspelt key is a 422, not a vote without what it meant; a number sent as text or a boolean is refused."""
    api.seed(n_prompts=1, task_kind="rating")
    task = api.next("ann")
    for fields in (
        {"rating": 5, "ratting": 3},
        {"rating": "5"},
        {"rating": True},
        {"rating": 5, "margin": "1"},
    ):
        r = api.vote("ann", task["id"], **fields)
        assert r.status_code == 422, fields
    assert api.vote("ann", str(task["id"]), rating=5).status_code == 422  # the task id too
    assert api.vote("ann", task["id"], rating=5).status_code == 201


def test_a_simulated_vote_is_final(api) -> None:
    """`rlhf loop` counts a simulated panel's vote at once, without the undo window: taken back, it would have
    trained the reward model all the same."""
    api.seed(n_prompts=1)
    task = api.next("ann")
    assert api.vote("ann", task["id"], source="simulated").status_code == 201
    undone = api.post("ann", "/api/votes/undo")
    assert undone.status_code == 409 and "cannot be undone" in undone.text


def test_undo_within_the_window_reopens_the_task(api, db: Database) -> None:
    api.seed(n_prompts=2)
    task = api.next("ann")
    vote = api.vote("ann", task["id"]).json()
    assert api.post("bob", f"/api/votes/{vote['id']}/undo").status_code == 404  # not bob's
    undone = api.post("ann", "/api/votes/undo")
    assert undone.status_code == 200 and undone.json()["retracted"] is True
    assert api.post("ann", "/api/votes/undo").status_code == 404  # nothing left to undo
    assert api.next("ann")["id"] == task["id"]  # the task is open again
    assert api.vote("ann", task["id"], choice="B").status_code == 201
    export = api.get("admin", "/api/projects/demo/export", params={"format": "votes"}).text.splitlines()
    assert len(export) == 1 and '"choice": "B"' in export[0]  # the retracted row is kept, not exported
    assert count_votes(db) == 2


def test_two_undos_of_one_vote_racing_a_new_vote_leave_the_task_done(
    api, db: Database, backend: str, monkeypatch
) -> None:
    """On PostgreSQL, an undo sent twice (a double press, a retried request) could both succeed: the later one,
    having read the vote before the first committed, reopened the task after the labeler had voted on it again.
    The task was then served to them forever (every vote a 409), and a skip of it freed its slot for another
    labeler: an overlap-1 task with two live votes. Here the first undo reads the vote, then waits while a
    second undo and a new vote go through; it must then find the vote undone."""
    import pytest

    from rlhf.feedback import votes
    from rlhf.feedback.models import Assignment, User

    if backend == "sqlite":
        pytest.skip("SQLite runs one write transaction at a time: two undos cannot interleave there")
    api.seed(n_prompts=1)
    task = api.next("ann")
    first = api.vote("ann", task["id"]).json()
    read, go_on = threading.Event(), threading.Event()

    class PausedClock(votes.datetime):  # type: ignore[name-defined,misc]
        @classmethod
        def now(cls, tz=None):  # type: ignore[no-untyped-def]
            if threading.current_thread().name == "late-undo":
                read.set()
                go_on.wait(10)
            return super().now(tz)

    monkeypatch.setattr(votes, "datetime", PausedClock)
    outcome: list[object] = []

    def late_undo() -> None:
        with db.session() as session:
            ann = session.scalar(select(User).where(User.name == "ann"))
            try:
                outcome.append(votes.undo(session, ann, 600.0, first["id"]).id)
            except Exception as e:  # what the API would answer
                outcome.append(e)

    late = threading.Thread(target=late_undo, name="late-undo")
    late.start()
    assert read.wait(10)  # the late undo has read the vote, still live
    assert api.post("ann", f"/api/votes/{first['id']}/undo").status_code == 200
    again = api.vote("ann", task["id"], choice="B")
    assert again.status_code == 201
    go_on.set()
    late.join(10)
    assert len(outcome) == 1 and type(outcome[0]).__name__ == "NotFound"
    with db.session() as session:
        status = session.scalar(select(Assignment.status).where(Assignment.task_id == task["id"]))
    assert status == "done"
    assert api.next("ann") is None  # nothing left for ann


def test_votes_and_undo_scoped_to_a_project(api, db: Database) -> None:
    """A vote naming its project is refused on another project's task; an undo naming a project retracts the
    labeler's latest vote there, not a later one elsewhere."""
    api.seed(n_prompts=1)
    api.seed(name="other", n_prompts=1)
    here, there = api.next("ann"), api.next("ann", project="other")
    assert api.vote("ann", there["id"], project="demo").status_code == 404
    assert count_votes(db) == 0
    first = api.vote("ann", here["id"], project="demo").json()
    later = api.vote("ann", there["id"], project="other").json()
    undone = api.post("ann", "/api/votes/undo", params={"project": "demo"})
    assert undone.status_code == 200 and undone.json()["id"] == first["id"]
    assert api.post("ann", "/api/votes/undo", params={"project": "demo"}).status_code == 404
    assert api.post("ann", "/api/votes/undo", params={"project": "nope"}).status_code == 404
    mine = {v["id"]: v["retracted"] for v in api.get("ann", "/api/votes").json()}
    assert mine == {first["id"]: True, later["id"]: False}


def test_undo_after_the_window_is_refused(make_client, team) -> None:
    client = make_client(undo_window_s=0.2)
    body = {"candidates": [{"prompt": "p", "completions": [{"text": "a"}, {"text": "b"}]}]}
    client.post("/api/projects/demo/import", json=body, headers=team["admin"])
    vote = client.post(
        "/api/votes",
        json={"task_id": 1, "choice": "A", "idempotency_key": "late-undo-1"},
        headers=team["ann"],
    ).json()
    time.sleep(0.3)
    response = client.post(f"/api/votes/{vote['id']}/undo", headers=team["ann"])
    assert response.status_code == 409 and "within 0.2 s" in response.json()["detail"]


def test_disabled_labeler_cannot_vote(api) -> None:
    api.seed(n_prompts=2)
    task = api.next("ann")
    assert (
        api.client.patch("/api/users/ann", json={"disabled": True}, headers=api.team["admin"]).status_code
        == 200
    )
    assert api.vote("ann", task["id"]).status_code == 403
    assert api.post("ann", "/api/tasks/next").status_code == 403
    assert (
        api.client.patch("/api/users/ann", json={"disabled": False}, headers=api.team["admin"]).status_code
        == 200
    )
    assert api.vote("ann", task["id"]).status_code == 201


def test_rate_limit_answers_429(make_client, team) -> None:
    client = make_client(votes_per_minute=3)
    rows = [{"prompt": f"p{i}", "completions": [{"text": "a"}, {"text": "b"}]} for i in range(5)]
    client.post("/api/projects/demo/import", json={"candidates": rows}, headers=team["admin"])
    codes = [
        client.post(
            "/api/votes",
            json={"task_id": i, "choice": "A", "idempotency_key": f"rate-{i}-xx"},
            headers=team["ann"],
        ).status_code
        for i in range(1, 5)
    ]
    assert codes == [201, 201, 201, 429]
    limited = client.post(
        "/api/votes", json={"task_id": 4, "choice": "A", "idempotency_key": "rate-4-xx"}, headers=team["ann"]
    )
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    # the limit is per labeler
    ok = client.post(
        "/api/votes", json={"task_id": 5, "choice": "A", "idempotency_key": "rate-5-bob"}, headers=team["bob"]
    )
    assert ok.status_code == 201


def test_retry_of_a_stored_vote_is_answered_at_the_rate_limit(make_client, team) -> None:
    """A retry (same key, same answer) of an acknowledged vote gets the original back (200) even when its
    labeler is at the limit: it is no new vote. A new vote, or the key with another answer, is not."""
    client = make_client(votes_per_minute=2)
    rows = [{"prompt": f"p{i}", "completions": [{"text": "a"}, {"text": "b"}]} for i in range(3)]
    client.post("/api/projects/demo/import", json={"candidates": rows}, headers=team["admin"])

    def vote(task_id: int, key: str, choice: str = "A") -> httpx.Response:
        body = {"task_id": task_id, "choice": choice, "idempotency_key": key}
        return client.post("/api/votes", json=body, headers=team["ann"])

    first, second = vote(1, "limit-retry-1"), vote(2, "limit-retry-2")
    assert (first.status_code, second.status_code) == (201, 201)
    assert vote(3, "limit-retry-3").status_code == 429  # a new vote over the limit
    again = vote(1, "limit-retry-1")
    assert again.status_code == 200 and again.json() == first.json()
    assert vote(1, "limit-retry-1", choice="B").status_code == 422  # the key reused for another answer
    assert vote(3, "limit-retry-3").status_code == 429  # still limited
