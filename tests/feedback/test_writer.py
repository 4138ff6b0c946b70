"""rlhf/feedback/writer.py (group commit) and the one-at-a-time record_vote under racing transactions."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from rlhf.feedback import users
from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict, InvalidInput, NotFound
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.models import Assignment, Task, Vote
from rlhf.feedback.schemas import CandidateRow, VoteIn
from rlhf.feedback.votes import record_vote
from rlhf.feedback.writer import VoteWriter


@pytest.fixture
def seeded(db: Database, make_rows: Any) -> dict[str, Any]:
    with db.session() as s:
        import_candidates(s, "demo", [CandidateRow.model_validate(r) for r in make_rows(6)], overlap=1)
        ann = users.create_user(s, "ann", "labeler")
        bob = users.create_user(s, "bob", "labeler")
    return {"ann": ann, "bob": bob}


def n_votes(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Vote)) or 0)


def test_one_batch_answers_each_vote_on_its_own(db: Database, seeded: dict[str, Any]) -> None:
    ann, bob = seeded["ann"], seeded["bob"]
    writer = VoteWriter(db, group_commit=True)  # not started yet: everything below lands in one batch
    futures = [
        writer.submit(ann, VoteIn(task_id=1, choice="A", idempotency_key="batch-key-1"), "api"),
        writer.submit(ann, VoteIn(task_id=1, choice="A", idempotency_key="batch-key-1"), "api"),  # retry
        writer.submit(ann, VoteIn(task_id=2, ranking=[1, 2], idempotency_key="batch-key-2"), "api"),  # bad
        writer.submit(bob, VoteIn(task_id=3, choice="tie", idempotency_key="batch-key-3"), "api"),
        writer.submit(bob, VoteIn(task_id=3, choice="A", idempotency_key="batch-key-4"), "api"),  # twice
        writer.submit(bob, VoteIn(task_id=99, choice="A", idempotency_key="batch-key-5"), "api"),  # no task
        writer.submit(ann, VoteIn(task_id=4, choice="A", idempotency_key="batch-key-6"), "api"),  # full
    ]
    late = writer.submit(bob, VoteIn(task_id=4, choice="B", idempotency_key="batch-key-7"), "api")  # full
    writer.start()
    writer.stop()
    first, retry = futures[0].result(), futures[1].result()
    assert first.created and not retry.created and retry.vote.id == first.vote.id and retry.vote.choice == "A"
    with pytest.raises(InvalidInput):
        futures[2].result()
    assert futures[3].result().vote.choice == "tie"
    with pytest.raises(Conflict):
        futures[4].result()
    with pytest.raises(NotFound):
        futures[5].result()
    assert futures[6].result().created
    with pytest.raises(Conflict, match="already has its 1 labelers"):
        late.result()
    assert n_votes(db) == 3  # tasks 1 (ann), 3 (bob), 4 (ann): the failures left nothing behind
    with pytest.raises(RuntimeError):
        writer.submit(ann, VoteIn(task_id=5, choice="A", idempotency_key="batch-key-8"), "api")


def test_racing_transactions_store_one_vote(db: Database, db_url: str, seeded: dict[str, Any]) -> None:
    """record_vote from threads with separate engines (as separate server processes would be): one row per
    key, every caller gets the same vote."""
    ann = seeded["ann"]
    databases = [Database(db_url) for _ in range(6)]
    results: list[int] = []
    barrier = threading.Barrier(len(databases))

    def vote(database: Database) -> None:
        barrier.wait()
        with database.session() as s:
            recorded = record_vote(
                s, ann, VoteIn(task_id=5, choice="A", idempotency_key="race-key-xx"), "api"
            )
            results.append(recorded.vote.id)

    threads = [threading.Thread(target=vote, args=(d,)) for d in databases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in databases:
        d.dispose()
    assert len(results) == len(databases) and len(set(results)) == 1
    assert n_votes(db) == 1


def test_a_constraint_hit_after_writing_rewrites_the_batch_with_savepoints(
    db: Database, seeded: dict[str, Any]
) -> None:
    ann, bob = seeded["ann"], seeded["bob"]
    writer = VoteWriter(db, group_commit=True)
    futures = [
        writer.submit(ann, VoteIn(task_id=1, choice="A", idempotency_key="reused-key-1"), "api"),
        writer.submit(bob, VoteIn(task_id=2, choice="B", idempotency_key="other-key-2"), "api"),
        # the same key on another task: the task is claimed and assigned before the vote's insert fails
        writer.submit(ann, VoteIn(task_id=3, choice="A", idempotency_key="reused-key-1"), "api"),
        writer.submit(bob, VoteIn(task_id=4, choice="tie", idempotency_key="other-key-4"), "api"),
    ]
    writer.start()
    writer.stop()
    first, second, fourth = (futures[i].result() for i in (0, 1, 3))
    assert first.created and second.created and fourth.created
    with pytest.raises(InvalidInput, match="different vote"):  # a key reused for another vote: 422
        futures[2].result()
    assert n_votes(db) == 3
    with db.session() as s:  # the failed vote's claim and assignment were rolled back with it
        assert s.scalar(select(Task.n_assigned).where(Task.id == 3)) == 0
        assert s.scalar(select(func.count()).select_from(Assignment).where(Assignment.task_id == 3)) == 0
