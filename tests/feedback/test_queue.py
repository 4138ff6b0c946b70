"""rlhf/feedback/queue.py: overlap, never a task twice, skip, progress, gold rate, what labelers see."""

from __future__ import annotations

import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, text, update
from sqlalchemy.orm import Session

from rlhf.feedback import queue
from rlhf.feedback.db import Database
from rlhf.feedback.errors import Conflict, NotFound
from rlhf.feedback.models import Assignment, Project, Task, User, utcnow
from rlhf.feedback.queue import candidates_query
from tests.feedback.conftest import LABELERS


def drain(api, who: str, project: str = "demo") -> list[int]:
    """Vote A on every task `who` is given; return the task ids in order."""
    seen = []
    while (task := api.next(who, project)) is not None:
        assert api.vote(who, task["id"]).status_code == 201
        seen.append(task["id"])
    return seen


def test_overlap_is_honoured(api, db: Database) -> None:
    api.seed(n_prompts=4, overlap=2)
    done = {name: drain(api, name) for name in ("ann", "bob", "cat")}
    per_task = Counter(t for ids in done.values() for t in ids)
    assert sorted(per_task.values()) == [2, 2, 2, 2]  # every task exactly `overlap` labelers
    assert all(len(ids) == len(set(ids)) for ids in done.values())  # nobody saw a task twice
    assert len(done["ann"]) == 4 and len(done["bob"]) == 4 and done["cat"] == []
    with db.session() as s:
        assert {t.n_assigned for t in s.scalars(select(Task))} == {2}


def test_open_task_comes_back_until_answered(api) -> None:
    api.seed(n_prompts=2)
    first = api.next("ann")
    assert api.next("ann")["id"] == first["id"]
    assert api.vote("ann", first["id"]).status_code == 201
    assert api.next("ann")["id"] != first["id"]


def test_skip_gives_the_slot_to_others_and_never_returns(api, db: Database) -> None:
    api.seed(n_prompts=1, overlap=1)
    task = api.next("ann")
    assert api.next("bob") is None  # the only slot is taken
    assert api.post("ann", f"/api/tasks/{task['id']}/skip").status_code == 204
    assert api.next("ann") is None  # skipped tasks never come back
    assert api.next("bob")["id"] == task["id"]
    with db.session() as s:
        statuses = dict(s.execute(select(Assignment.user_id, Assignment.status)).all())
    assert sorted(statuses.values()) == ["open", "skipped"]
    assert api.post("ann", f"/api/tasks/{task['id']}/skip").status_code == 404


def test_a_slot_left_open_goes_to_a_labeler_with_nothing_else(api, db: Database) -> None:
    """A task its labeler opened and left holds its slot for `stale_assignment_s` (an hour); after that, or at once
    where the labeler is disabled, a labeler who has nothing else takes it over, and the count stays."""
    api.seed(n_prompts=2, overlap=1)
    first, second = api.next("ann"), api.next("bob")
    assert api.next("cat") is None  # both slots held, not yet stale
    with db.session() as s, s.begin():  # ann opened hers an hour and a minute ago
        s.execute(update(Assignment).values(created_at=utcnow() - timedelta(seconds=3660))
                  .where(Assignment.task_id == first["id"]))  # fmt: skip
    assert api.next("cat")["id"] == first["id"]
    assert api.next("ann") is None  # hers went to cat; the other task is bob's, and fresh
    assert api.vote("ann", first["id"]).status_code == 409  # one labeler a task, and cat has it
    assert (
        api.client.patch("/api/users/bob", json={"disabled": True}, headers=api.team["admin"]).status_code
        == 200
    )
    assert api.next("ann")["id"] == second["id"]  # a disabled labeler's slot, at once
    assert (
        api.vote("cat", first["id"]).status_code == 201 and api.vote("ann", second["id"]).status_code == 201
    )
    with db.session() as s:
        statuses = sorted(s.execute(select(Assignment.status)).scalars())
        assert statuses == ["done", "done", "expired", "expired"]
        assert {t.n_assigned for t in s.scalars(select(Task))} == {1}


def test_a_labelers_requests_at_once_get_one_task(api, db: Database) -> None:
    """Two tabs (or a retried request) asking at the same moment get the same task, not one each."""
    api.seed(n_prompts=8, overlap=1)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: api.next("ann")["id"], range(8)))
    assert len(set(got)) == 1, got
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Assignment)) == 1


def hold_task_lock(db: Database, task_id: int, then: Any, meanwhile: Any = None) -> dict[str, Any]:
    """Lock a task's row as a vote being written does (on SQLite: the database's write lock), run `then()` in a
    thread, give it time to reach the lock, run `meanwhile(conn)` in the locking transaction and commit;
    `then`'s result."""
    result: dict[str, Any] = {}
    with db.engine.connect().execution_options(sqlite_immediate=True) as conn:
        trans = conn.begin()
        conn.execute(select(Task.id).where(Task.id == task_id).with_for_update())
        thread = threading.Thread(target=lambda: result.update(out=then()))
        thread.start()
        thread.join(0.5)
        if meanwhile is not None:
            meanwhile(conn)
        trans.commit()
        thread.join(60)
    return result


def test_a_task_locked_for_a_moment_is_still_served(api, db: Database) -> None:
    """SKIP LOCKED passes over a task whose row another request holds; the task is not gone for that."""
    api.seed(n_prompts=1, overlap=2)
    task = api.next("ann")
    assert hold_task_lock(db, task["id"], lambda: api.next("bob"))["out"]["id"] == task["id"]


def test_a_skip_waits_for_a_vote_on_its_task_instead_of_deadlocking(api, db: Database) -> None:
    """A vote locks the task, then the assignment; a skip of the same task at the same moment takes them in
    that order too, so it waits, then finds the task answered (404) instead of a deadlock (a 500)."""
    api.seed(n_prompts=1, overlap=2)
    task = api.next("ann")

    def vote_lands(conn: Any) -> None:
        conn.execute(update(Assignment).where(Assignment.task_id == task["id"]).values(status="done"))

    skip = lambda: api.post("ann", f"/api/tasks/{task['id']}/skip").status_code  # noqa: E731
    assert hold_task_lock(db, task["id"], skip, vote_lands)["out"] == 404


def test_progress(api) -> None:
    api.seed(n_prompts=3, overlap=1)
    r = api.post("ann", "/api/tasks/next", params={"project": "demo"}).json()
    assert r["progress"] == {"done": 0, "total": 3}
    api.vote("ann", r["task"]["id"])
    api.next("bob")  # bob takes one of the two left
    r = api.post("ann", "/api/tasks/next", params={"project": "demo"}).json()
    assert r["progress"] == {"done": 1, "total": 2}


def test_gold_rate_one_serves_gold_first_to_everyone(api) -> None:
    gold = [{"prompt": "2+2?", "completion_a": "4", "completion_b": "5", "choice": "A"}]
    api.seed(n_prompts=2, gold=gold, gold_rate=1.0, overlap=1)
    tasks = {name: api.next(name) for name in ("ann", "bob")}
    assert tasks["ann"]["id"] == tasks["bob"]["id"]  # gold is outside the overlap count
    assert tasks["ann"]["prompt"] == "2+2?"


def test_labelers_never_see_gold_answers_or_policies(api) -> None:
    gold = [{"prompt": "2+2?", "completion_a": "4", "completion_b": "5", "choice": "A"}]
    api.seed(n_prompts=1, gold=gold, gold_rate=1.0)
    task = api.next("ann")
    as_labeler = api.get("ann", f"/api/tasks/{task['id']}").json()
    for body in (task, as_labeler):
        assert not {"is_gold", "gold_choice", "policies", "n_assigned"} & set(body)
        assert all(set(c) == {"position", "text"} for c in body["completions"])
        assert "policy" not in str(body)
    as_admin = api.get("admin", f"/api/tasks/{task['id']}").json()
    assert as_admin["is_gold"] is True and as_admin["gold_choice"] == "A"
    assert api.get("bob", f"/api/tasks/{task['id']}").status_code == 404  # not assigned to bob


def test_display_order_is_random(api) -> None:
    api.seed(n_prompts=1)
    task = api.next("ann")
    orders = {tuple(api.get("ann", f"/api/tasks/{task['id']}").json()["display_order"]) for _ in range(40)}
    assert orders == {(0, 1), (1, 0)}


def test_the_next_task_query_reads_an_index_range_without_sorting(db: Database) -> None:
    """The queue's query must not sort every open task of the project (it ran on each `next`)."""
    stmt = candidates_query(user_id=1, project_id=1, gold=False, n_assigned=0)
    sql = str(stmt.compile(db.engine, compile_kwargs={"literal_binds": True}))
    with db.engine.connect() as conn:
        if db.engine.dialect.name == "sqlite":
            plan = " ".join(str(row[-1]) for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
            assert "ix_tasks_queue" in plan and "TEMP B-TREE" not in plan, plan
        else:
            conn.execute(text("SET enable_seqscan = off"))  # an empty table: ask for the plan the index gives
            plan = " ".join(row[0] for row in conn.execute(text(f"EXPLAIN {sql}")))
            assert "ix_tasks_queue" in plan and "Sort" not in plan, plan


def test_progress_does_not_tell_gold_from_real_tasks(api) -> None:
    """The total stays put whichever kind of task is shown, and every vote moves done by one."""
    gold = [
        {"prompt": f"{i}+{i}?", "completion_a": str(2 * i), "completion_b": "5", "choice": "A"}
        for i in range(3)
    ]
    api.seed(n_prompts=4, gold=gold, gold_rate=0.5, overlap=1)
    first = api.post("ann", "/api/tasks/next", params={"project": "demo"}).json()
    total = first["progress"]["total"]
    assert total == 7
    shown, done = [first["task"]["prompt"]], 0
    task = first["task"]
    while task is not None:
        assert api.vote("ann", task["id"]).status_code == 201
        done += 1
        r = api.post("ann", "/api/tasks/next", params={"project": "demo"}).json()
        assert r["progress"] == {"done": done, "total": total}
        task = r["task"]
        if task is not None:
            shown.append(task["prompt"])
    assert done == 7 and sum("+" in p for p in shown) == 3  # every gold task shown before the end


def progress_by_scan(session: Session, user: User, project: Project) -> tuple[int, int]:
    """(done, total) as `queue.progress` defines them, counted the slow way: every task of the project
    tested for an assignment of the user's."""
    by_status = dict(
        session.execute(
            select(Assignment.status, func.count())
            .where(Assignment.user_id == user.id, Assignment.project_id == project.id)
            .group_by(Assignment.status)
        ).all()
    )
    mine = exists().where(and_(Assignment.task_id == Task.id, Assignment.user_id == user.id))
    real = session.scalar(
        select(func.count()).where(
            Task.project_id == project.id, Task.is_gold.is_(False), Task.n_assigned < project.overlap, ~mine
        )
    )
    gold = session.scalar(select(func.count()).where(Task.project_id == project.id, Task.is_gold, ~mine))
    done = by_status.get("done", 0)
    left = by_status.get("open", 0) + real + (gold if project.gold_rate > 0 else 0)
    return done, done + left


def test_progress_equals_a_scan_of_every_task_on_random_states(api, db: Database) -> None:
    """Votes, skips, unskips, and changes of overlap and gold rate in a random order: after every step each
    labeler's progress is the scan's count."""
    gold = [
        {"prompt": f"{i}+{i}?", "completion_a": str(2 * i), "completion_b": "5", "choice": "A"}
        for i in range(3)
    ]
    api.seed(n_prompts=10, gold=gold, gold_rate=0.3, overlap=2)
    rng = random.Random(0)
    seen: Counter[str] = Counter()
    for _ in range(80):
        who, action = rng.choice(LABELERS), rng.random()
        if action < 0.6 and (task := api.next(who)) is not None:
            assert api.vote(who, task["id"]).status_code == 201
        elif action < 0.75 and (task := api.next(who)) is not None:
            assert api.post(who, f"/api/tasks/{task['id']}/skip").status_code == 204
        elif action < 0.85:
            with db.session() as session:
                user = session.scalar(select(User).where(User.name == who))
                skipped = session.scalar(
                    select(Assignment.task_id).where(
                        Assignment.user_id == user.id, Assignment.status == "skipped"
                    )
                )
                if skipped is not None:
                    try:
                        queue.unskip(session, user, skipped)
                    except (Conflict, NotFound):
                        pass
        else:
            change = (
                {"overlap": rng.choice([1, 2, 3])}
                if rng.random() < 0.5
                else {"gold_rate": rng.choice([0.0, 0.5])}
            )
            assert (
                api.client.patch("/api/projects/demo", json=change, headers=api.team["admin"]).status_code
                == 200
            )
        with db.session() as session:
            project = session.scalar(select(Project).where(Project.name == "demo"))
            for user in session.scalars(select(User).where(User.name.in_(LABELERS))):
                fast = queue.progress(session, user, project)
                assert (fast.done, fast.total) == progress_by_scan(session, user, project)
            seen.update(session.scalars(select(Assignment.status)))
            seen["gold"] += session.scalar(
                select(func.count()).where(Assignment.task_id == Task.id, Task.is_gold)
            )
    assert (
        seen["done"] and seen["open"] and seen["skipped"] and seen["gold"]
    )  # every kind of state was checked
