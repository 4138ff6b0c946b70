"""The labeler's queue: which task comes next, skipping, progress, and how a task is shown.

A labeler first gets back any task they opened and have not answered. Otherwise they claim a new one:
a task they have never been assigned (so never one they voted on or skipped) that has fewer than
`overlap` live assignments, fullest first so tasks reach their overlap early. With probability
`gold_rate` a gold task is tried first, else the real ones (gold comes when no real task is left);
gold tasks go to every labeler, outside the overlap count, and count in their progress like any task.
A claim is a conditional UPDATE (n_assigned < overlap), so two labelers racing cannot exceed the overlap,
whichever server processes they reach (the row lock makes the second UPDATE re-read the count).

A task someone opened and left holds its slot; a labeler with nothing else left takes over such a slot once it
is `stale_after_s` old, or at once where its labeler's account was disabled: the old assignment becomes
"expired" (its labeler may still vote on the task while a slot is free, as on a skipped one).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Select,
    Table,
    bindparam,
    exists,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, Forbidden, NotFound
from rlhf.feedback.models import Assignment, Completion, Project, Prompt, Task, TaskCompletion, User, utcnow
from rlhf.feedback.schemas import CompletionOut, ProgressOut, TaskAdminOut, TaskOut

CANDIDATES_PER_TRY = 8


_tasks = cast(Table, Task.__table__)
_CLAIM = (
    update(_tasks)
    .where(_tasks.c.id == bindparam("b_task"), _tasks.c.n_assigned < bindparam("b_limit"))
    .values(n_assigned=_tasks.c.n_assigned + 1)
)
GOLD_LIMIT = 2**31 - 1  # gold tasks go to every labeler: no overlap limit


def claim(
    session: Session, task_id: int, is_gold: bool, overlap: int, conn: Connection | None = None
) -> bool:
    """Take one slot of a task for a new assignment; False when it already has `overlap` labelers."""
    limit = GOLD_LIMIT if is_gold else overlap
    return (conn or session.connection()).execute(_CLAIM, {"b_task": task_id, "b_limit": limit}).rowcount == 1


@dataclass(frozen=True)
class QueuedTask:
    """The columns of a task that the queue hands on to `task_view` (read without building ORM objects)."""

    id: int
    prompt_id: int
    kind: str
    is_gold: bool
    gold_choice: str | None
    n_assigned: int


_assignments = cast(Table, Assignment.__table__)
_users = cast(Table, User.__table__)
_TASK_COLUMNS = [
    _tasks.c[name] for name in ("id", "prompt_id", "kind", "is_gold", "gold_choice", "n_assigned")
]
_OPEN_TASK = (
    select(*_TASK_COLUMNS)
    .join(_assignments, _assignments.c.task_id == _tasks.c.id)
    .where(
        _assignments.c.user_id == bindparam("b_user"),
        _assignments.c.project_id == bindparam("b_project"),
        _assignments.c.status == "open",
    )
    .order_by(_assignments.c.id)
    .limit(1)
)
_INSERT_ASSIGNMENT = insert(_assignments)


def next_task(
    session: Session, user: User, project: Project, rng: random.Random | None = None, stale_after_s: float = 0
) -> QueuedTask | None:
    """The task `user` should label next in `project` (assigning it to them), or None when nothing is left;
    with `stale_after_s` > 0, a slot another labeler left open that long (see the module's docstring).

    Production projects hold end users' A/B pairs: only the user who got a pair answers it, never a labeler.
    """
    if project.production:
        raise Forbidden(
            f"project {project.name!r} holds production A/B pairs; only their end users answer them"
        )
    rng = rng or random.Random()
    row = session.connection().execute(_OPEN_TASK, {"b_user": user.id, "b_project": project.id}).first()
    if row is not None:
        return QueuedTask(*row)
    # Gold first with probability gold_rate, else after the real tasks: every gold task counts in the
    # labeler's progress total from the start (see `progress`), so each one is shown before they are done.
    if project.gold_rate <= 0:
        order = [False]
    else:
        order = [True, False] if rng.random() < project.gold_rate else [False, True]
    with db_of(session).write(session):
        conn = session.connection()
        # One claim at a time per labeler: two of their requests at once (two tabs, a retried request) would
        # each find no open task above and claim one each. The second waits here, then finds the first's.
        if conn.dialect.name != "sqlite":  # (SQLite's write transaction already runs one at a time)
            conn.execute(select(_users.c.id).where(_users.c.id == user.id).with_for_update())
        row = conn.execute(_OPEN_TASK, {"b_user": user.id, "b_project": project.id}).first()
        if row is not None:
            return QueuedTask(*row)
        for gold in order:
            for task in _candidates(conn, user, project, gold):
                if claim(session, task.id, task.is_gold, project.overlap, conn):
                    values = {"task_id": task.id, "user_id": user.id, "project_id": project.id,
                              "status": "open", "created_at": utcnow()}  # fmt: skip
                    conn.execute(_INSERT_ASSIGNMENT, values)
                    return task
        if stale_after_s > 0:
            return _take_over(conn, user, project, stale_after_s)
    return None


_theirs = _assignments.alias("theirs")
_STALE = (
    select(_assignments.c.id, *_TASK_COLUMNS)
    .join(_tasks, _tasks.c.id == _assignments.c.task_id)
    .join(_users, _users.c.id == _assignments.c.user_id)
    .where(
        _assignments.c.project_id == bindparam("b_project"),
        _assignments.c.status == "open",
        _tasks.c.is_gold.is_(false()),  # a gold task holds no slot another labeler could want
        or_(
            _assignments.c.created_at < bindparam("b_before", type_=_assignments.c.created_at.type),
            _users.c.disabled.is_(true()),
        ),
        ~exists().where(_theirs.c.task_id == _tasks.c.id, _theirs.c.user_id == bindparam("b_user")),
    )
    .order_by(_assignments.c.id)
    .limit(1)
)
_EXPIRE = (
    update(_assignments)
    .where(_assignments.c.id == bindparam("b_assignment"), _assignments.c.status == "open")
    .values(status="expired")
)


def _take_over(conn: Connection, user: User, project: Project, stale_after_s: float) -> QueuedTask | None:
    """A slot of a task that its labeler opened over `stale_after_s` ago, or whose labeler is disabled, made
    `user`'s (the task keeps its count of labelers); None if there is none. Within next_task's transaction."""
    stale = (
        _STALE.with_for_update(skip_locked=True, of=_assignments) if conn.dialect.name != "sqlite" else _STALE
    )
    params = {
        "b_project": project.id,
        "b_user": user.id,
        "b_before": utcnow() - timedelta(seconds=stale_after_s),
    }
    for _ in range(CANDIDATES_PER_TRY):  # another labeler may take the same one first
        row = conn.execute(stale, params).first()
        if row is None:
            return None
        if conn.execute(_EXPIRE, {"b_assignment": row[0]}).rowcount == 1:
            conn.execute(_INSERT_ASSIGNMENT, {"task_id": row[1], "user_id": user.id, "project_id": project.id,
                                              "status": "open", "created_at": utcnow()})  # fmt: skip
            return QueuedTask(*row[1:])
    return None


def _candidates(conn: Connection, user: User, project: Project, gold: bool) -> list[QueuedTask]:
    """Tasks `user` may take next: gold in id order; others those started by more labelers first (so the
    overlap fills), then in id order, one assignment count at a time.

    On PostgreSQL one candidate at a time is taken FOR UPDATE SKIP LOCKED: labelers served by other workers
    at the same moment get other tasks instead of queueing on the same rows, or finding every one of a
    shared list of candidates claimed by the time they try it. Where that finds none, the tasks left may only
    be locked for a moment (a vote being written on one, another labeler claiming it): the plain list then,
    whose claims wait for those locks. (SQLite runs one write transaction at a time, so its list is fresh.)"""
    params: dict[str, Any] = {"b_user": user.id, "b_project": project.id}
    counts = [None] if gold else range(project.overlap - 1, -1, -1)
    for one_at_a_time in (True, False) if conn.dialect.name != "sqlite" else (False,):
        for n in counts:
            query = _candidates_template(gold, n is not None, one_at_a_time)
            if rows := conn.execute(query, {**params, "b_n_assigned": n}).all():
                return [QueuedTask(*row) for row in rows]
    return []


@functools.cache
def _candidates_template(gold: bool, by_count: bool, one_at_a_time: bool) -> Select[Any]:
    """The candidates query with its values left as parameters (b_user, b_project, b_n_assigned), built once."""
    mine = exists().where(
        _assignments.c.task_id == _tasks.c.id, _assignments.c.user_id == bindparam("b_user")
    )
    stmt = select(*_TASK_COLUMNS).where(
        _tasks.c.project_id == bindparam("b_project"),
        _tasks.c.is_gold.is_(true() if gold else false()),
        ~mine,
    )
    if by_count:
        stmt = stmt.where(_tasks.c.n_assigned == bindparam("b_n_assigned"))
    stmt = stmt.order_by(_tasks.c.id).limit(CANDIDATES_PER_TRY)
    if one_at_a_time:
        stmt = stmt.limit(1).with_for_update(skip_locked=True, of=_tasks)
    return stmt


def candidates_query(user_id: int, project_id: int, gold: bool, n_assigned: int | None = None) -> Select[Any]:
    """Up to CANDIDATES_PER_TRY tasks of the project not yet `user_id`'s, in id order (of one assignment count
    for non-gold tasks): an index range of ix_tasks_queue already in that order, so no sort of every open task
    and a cost that does not grow with the project."""
    values: dict[str, Any] = {"b_user": user_id, "b_project": project_id}
    if n_assigned is not None:
        values["b_n_assigned"] = n_assigned
    return _candidates_template(gold, n_assigned is not None, False).params(values)


def skip(session: Session, user: User, task_id: int) -> None:
    """Give up an open assignment: the slot goes back to others and the task never comes back to `user`."""
    with db_of(session).write(session):
        # the task's row first, then the assignment: the order a vote takes its locks in (rlhf.feedback.votes),
        # so a skip and a vote on the same task wait for each other instead of deadlocking on PostgreSQL
        session.execute(select(Task.id).where(Task.id == task_id).with_for_update())
        assignment = session.scalar(
            select(Assignment).where(Assignment.task_id == task_id, Assignment.user_id == user.id)
        )
        if assignment is None or assignment.status != "open":
            raise NotFound(f"task {task_id} is not open for you")
        assignment.status = "skipped"
        session.execute(update(Task).where(Task.id == task_id).values(n_assigned=Task.n_assigned - 1))


def unskip(session: Session, user: User, task_id: int) -> None:
    """Take back a skip: the assignment is open again, if the task still has a slot (Conflict if not)."""
    with db_of(session).write(session):
        assignment = session.scalar(
            select(Assignment).where(Assignment.task_id == task_id, Assignment.user_id == user.id)
        )
        if assignment is None or assignment.status != "skipped":
            raise NotFound(f"task {task_id} is not skipped by you")
        task = session.get(Task, task_id)
        project = session.get(Project, assignment.project_id)
        assert task is not None and project is not None
        if not claim(session, task_id, task.is_gold, project.overlap):
            raise Conflict(f"task {task_id} already has its {project.overlap} labelers")
        assignment.status = "open"  # the older open assignment: next_task gives it back first


# One statement for the three terms of `progress`. Rather than test every task of the project for an
# assignment of the user's (a NOT EXISTS per task, so a cost that grows with the project), it counts two
# ranges of ix_tasks_queue (index only) and takes away the user's own assignments among them: a task has
# at most one assignment per user, and an assignment is in its task's project.
_mine = (
    select(_assignments.c.status, _tasks.c.is_gold, _tasks.c.n_assigned)
    .join(_tasks, _tasks.c.id == _assignments.c.task_id)
    .where(_assignments.c.user_id == bindparam("b_user"), _assignments.c.project_id == bindparam("b_project"))
    .subquery()
)
_in_project = _tasks.c.project_id == bindparam("b_project")
_PROGRESS = select(
    func.count().filter(_mine.c.status == "done"),
    func.count().filter(_mine.c.status == "open"),
    func.count().filter(_mine.c.is_gold.is_(false()), _mine.c.n_assigned < bindparam("b_overlap")),
    func.count().filter(_mine.c.is_gold.is_(true())),
    select(func.count())
    .where(_in_project, _tasks.c.is_gold.is_(false()), _tasks.c.n_assigned < bindparam("b_overlap"))
    .scalar_subquery(),
    select(func.count()).where(_in_project, _tasks.c.is_gold.is_(true())).scalar_subquery(),
).select_from(_mine)


def progress(session: Session, user: User, project: Project) -> ProgressOut:
    """done = tasks `user` answered; total = done + open + tasks still available to them.

    Gold tasks count like any other, in all three terms (a gold task is available to every labeler until
    shown to them), so the total does not move when a gold task is shown: labelers cannot tell gold from
    real tasks by watching their progress. Available: real tasks with fewer than `overlap` live assignments
    and every gold task (when the project serves gold), less those ever assigned to `user`.
    """
    params = {"b_user": user.id, "b_project": project.id, "b_overlap": project.overlap}
    row = session.connection().execute(_PROGRESS, params).one()
    done, open_, mine_real, mine_gold, real, gold = (int(n or 0) for n in row)
    available = real - mine_real + (gold - mine_gold if project.gold_rate > 0 else 0)
    return ProgressOut(done=done, total=done + open_ + available)


_prompts, _completions, _task_completions = (
    cast(Table, m.__table__) for m in (Prompt, Completion, TaskCompletion)
)
_VIEW = (
    select(_prompts.c.text, _task_completions.c.position, _completions.c.text, _completions.c.policy)
    .select_from(_task_completions)
    .join(_completions, _completions.c.id == _task_completions.c.completion_id)
    .join(_prompts, _prompts.c.id == bindparam("b_prompt"))
    .where(_task_completions.c.task_id == bindparam("b_task"))
    .order_by(_task_completions.c.position)
)


def task_view(
    session: Session,
    task: Task | QueuedTask,
    project_name: str,
    admin: bool = False,
    rng: random.Random | None = None,
) -> TaskOut:
    """The task as shown: prompt, completions by position, and a fresh random display order.

    Labelers never see policy versions or gold fields; admins get them in TaskAdminOut.
    """
    rng = rng or random.Random()
    conn = session.connection()
    rows = conn.execute(_VIEW, {"b_prompt": task.prompt_id, "b_task": task.id}).all()
    prompt = (
        rows[0][0] if rows else conn.scalar(select(_prompts.c.text).where(_prompts.c.id == task.prompt_id))
    )
    order = [int(row[1]) for row in rows]
    rng.shuffle(order)
    fields: dict[str, Any] = {
        "id": task.id,
        "project": project_name,
        "kind": task.kind,
        "prompt": prompt,
        "completions": [CompletionOut(position=pos, text=text) for _, pos, text, _ in rows],
        "display_order": order,
    }
    if admin:
        return TaskAdminOut(
            **fields,
            is_gold=task.is_gold,
            gold_choice=task.gold_choice,
            policies=[policy for *_, policy in rows],
            n_assigned=task.n_assigned,
        )
    return TaskOut(**fields)
