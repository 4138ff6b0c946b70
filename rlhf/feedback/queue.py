"""The labeler's queue: which task comes next, skipping, progress, and how a task is shown.

A labeler first gets back any task they opened and have not answered. Otherwise they claim a new one:
a task they have never been assigned (so never one they voted on or skipped) that has fewer than
`overlap` live assignments, fullest first so tasks reach their overlap early. With probability
`gold_rate` a gold task is tried first, else the real ones (gold comes when no real task is left);
gold tasks go to every labeler, outside the overlap count, and count in their progress like any task.
A claim is a conditional UPDATE (n_assigned < overlap), so two labelers racing cannot exceed the overlap,
whichever server processes they reach (the row lock makes the second UPDATE re-read the count).
"""

from __future__ import annotations

import random
from typing import Any, cast

from sqlalchemy import Connection, Select, Table, and_, bindparam, exists, func, select, update
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, Forbidden, NotFound
from rlhf.feedback.models import Assignment, Completion, Project, Prompt, Task, TaskCompletion, User
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


def next_task(
    session: Session, user: User, project: Project, rng: random.Random | None = None
) -> Task | None:
    """The task `user` should label next in `project` (assigning it to them), or None when nothing is left.

    Production projects hold end users' A/B pairs: only the user who got a pair answers it, never a labeler.
    """
    if project.production:
        raise Forbidden(
            f"project {project.name!r} holds production A/B pairs; only their end users answer them"
        )
    rng = rng or random.Random()
    open_task = session.scalar(
        select(Task)
        .join(Assignment, Assignment.task_id == Task.id)
        .where(
            Assignment.user_id == user.id, Assignment.project_id == project.id, Assignment.status == "open"
        )
        .order_by(Assignment.id)
        .limit(1)
    )
    if open_task is not None:
        return open_task
    # Gold first with probability gold_rate, else after the real tasks: every gold task counts in the
    # labeler's progress total from the start (see `progress`), so each one is shown before they are done.
    if project.gold_rate <= 0:
        order = [False]
    else:
        order = [True, False] if rng.random() < project.gold_rate else [False, True]
    with db_of(session).write(session):
        for gold in order:
            for task in _candidates(session, user, project, gold):
                if claim(session, task.id, task.is_gold, project.overlap):
                    session.add(Assignment(task_id=task.id, user_id=user.id, project_id=project.id))
                    return task
    return None


def _candidates(session: Session, user: User, project: Project, gold: bool) -> list[Task]:
    """Tasks `user` may take next: gold in id order; others those started by more labelers first (so the
    overlap fills), then in id order, one assignment count at a time.

    On PostgreSQL one candidate at a time is taken FOR UPDATE SKIP LOCKED: labelers served by other workers
    at the same moment get other tasks instead of queueing on the same rows, or finding every one of a
    shared list of candidates claimed by the time they try it. (SQLite runs one write transaction at a
    time, so its list is fresh.)"""
    one_at_a_time = not db_of(session).is_sqlite
    queries = (
        [candidates_query(user.id, project.id, gold=True)]
        if gold
        else [
            candidates_query(user.id, project.id, gold=False, n_assigned=n)
            for n in range(project.overlap - 1, -1, -1)
        ]
    )
    for query in queries:
        if one_at_a_time:
            query = query.limit(1).with_for_update(skip_locked=True, of=Task)
        if tasks := list(session.scalars(query)):
            return tasks
    return []


def candidates_query(
    user_id: int, project_id: int, gold: bool, n_assigned: int | None = None
) -> Select[Task]:
    """Up to CANDIDATES_PER_TRY tasks of the project not yet `user_id`'s, in id order (of one assignment count
    for non-gold tasks): an index range of ix_tasks_queue already in that order, so no sort of every open task
    and a cost that does not grow with the project."""
    mine = exists().where(Assignment.task_id == Task.id, Assignment.user_id == user_id)
    stmt = select(Task).where(Task.project_id == project_id, Task.is_gold.is_(gold), ~mine)
    if n_assigned is not None:
        stmt = stmt.where(Task.n_assigned == n_assigned)
    return stmt.order_by(Task.id).limit(CANDIDATES_PER_TRY)


def skip(session: Session, user: User, task_id: int) -> None:
    """Give up an open assignment: the slot goes back to others and the task never comes back to `user`."""
    with db_of(session).write(session):
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


def progress(session: Session, user: User, project: Project) -> ProgressOut:
    """done = tasks `user` answered; total = done + open + tasks still available to them.

    Gold tasks count like any other, in all three terms (a gold task is available to every labeler until
    shown to them), so the total does not move when a gold task is shown: labelers cannot tell gold from
    real tasks by watching their progress.
    """
    by_status = dict(
        session.execute(
            select(Assignment.status, func.count())
            .where(Assignment.user_id == user.id, Assignment.project_id == project.id)
            .group_by(Assignment.status)
        ).all()
    )
    mine = exists().where(and_(Assignment.task_id == Task.id, Assignment.user_id == user.id))
    available_real = session.scalar(
        select(func.count())
        .select_from(Task)
        .where(
            Task.project_id == project.id, Task.is_gold.is_(False), Task.n_assigned < project.overlap, ~mine
        )
    )
    available_gold: int | None = 0
    if project.gold_rate > 0:
        available_gold = session.scalar(
            select(func.count()).select_from(Task).where(Task.project_id == project.id, Task.is_gold, ~mine)
        )
    done = int(by_status.get("done", 0))
    left = int(by_status.get("open", 0)) + int(available_real or 0) + int(available_gold or 0)
    return ProgressOut(done=done, total=done + left)


def task_completions(session: Session, task_id: int) -> list[tuple[int, Completion]]:
    rows = session.execute(
        select(TaskCompletion.position, Completion)
        .join(Completion, Completion.id == TaskCompletion.completion_id)
        .where(TaskCompletion.task_id == task_id)
        .order_by(TaskCompletion.position)
    ).all()
    return [(int(pos), comp) for pos, comp in rows]


def task_view(
    session: Session, task: Task, project_name: str, admin: bool = False, rng: random.Random | None = None
) -> TaskOut:
    """The task as shown: prompt, completions by position, and a fresh random display order.

    Labelers never see policy versions or gold fields; admins get them in TaskAdminOut.
    """
    rng = rng or random.Random()
    prompt = session.get(Prompt, task.prompt_id)
    assert prompt is not None
    comps = task_completions(session, task.id)
    order = [pos for pos, _ in comps]
    rng.shuffle(order)
    fields: dict[str, Any] = {
        "id": task.id,
        "project": project_name,
        "kind": task.kind,
        "prompt": prompt.text,
        "completions": [CompletionOut(position=pos, text=c.text) for pos, c in comps],
        "display_order": order,
    }
    if admin:
        return TaskAdminOut(
            **fields,
            is_gold=task.is_gold,
            gold_choice=task.gold_choice,
            policies=[c.policy for _, c in comps],
            n_assigned=task.n_assigned,
        )
    return TaskOut(**fields)
