"""A batch of votes written in a constant number of statements (`write_votes`): what the group-commit writer
(rlhf.feedback.writer) runs for each batch, with the checks of `rlhf.feedback.votes.write_vote` for each vote."""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import Connection, Row, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session
from typing_extensions import Unpack

from rlhf.feedback.errors import Conflict, FeedbackError, NotFound
from rlhf.feedback.models import Assignment, Project, Task, User, Vote, utcnow
from rlhf.feedback.queue import GOLD_LIMIT
from rlhf.feedback.schemas import VoteIn
from rlhf.feedback.votes import Recorded, check_vote, replay, vote_fields

_tasks, _projects, _assignments, _votes, _users = (
    cast(Table, m.__table__) for m in (Task, Project, Assignment, Vote, User)
)
_INSERT_ASSIGNMENT = insert(_assignments)

# A batch's statements (write_votes): its tasks, locked in id order (so two batches on PostgreSQL cannot
# deadlock on them; the claims below then need no condition); its labelers with their assignments to those
# tasks; then one statement per kind of write.
_LOCK_TASKS = (
    select(
        _tasks.c.id,
        _tasks.c.kind,
        _tasks.c.n_completions,
        _tasks.c.is_gold,
        _tasks.c.n_assigned,
        _tasks.c.project_id,
        _projects.c.name.label("project"),
        _projects.c.overlap,
        _projects.c.production,
        _projects.c.axes,
    )
    .select_from(_tasks.join(_projects, _projects.c.id == _tasks.c.project_id))
    .where(_tasks.c.id.in_(bindparam("b_tasks", expanding=True)))
    .order_by(_tasks.c.id)
    .with_for_update(of=_tasks)
)
_SELECT_LABELERS = (
    select(_users.c.id, _users.c.disabled, _assignments.c.task_id, _assignments.c.id, _assignments.c.status)
    .select_from(
        _users.outerjoin(
            _assignments,
            (_assignments.c.user_id == _users.c.id)
            & _assignments.c.task_id.in_(bindparam("b_tasks", expanding=True)),
        )
    )
    .where(_users.c.id.in_(bindparam("b_users", expanding=True)))
)
_ADD_CLAIMS = (
    update(_tasks)
    .where(_tasks.c.id == bindparam("b_task"))
    .values(n_assigned=_tasks.c.n_assigned + bindparam("b_n"))
)
_MARK_ALL_DONE = (
    update(_assignments)
    .where(_assignments.c.id.in_(bindparam("b_assignments", expanding=True)))
    .values(status="done")
)
_INSERT_VOTES = insert(_votes).returning(_votes.c.id, sort_by_parameter_order=True)


def write_votes(
    session: Session, votes: list[tuple[User, VoteIn, str]], conn: Connection | None = None
) -> list[Recorded | FeedbackError]:
    """`write_vote` for many votes in one go, in the session's open write transaction: what each vote is
    answered with (a refusal, a replay of an earlier vote with its key, or the new vote), in order.

    The same checks, in the same order, as one `write_vote` per vote, but a constant number of statements
    per batch (two reads, a claim, an insert of assignments, an update of assignments, an insert of votes,
    and a read of earlier votes for any conflicts) instead of four per vote: on PostgreSQL each statement
    is a round trip, and one writer waiting on round trips caps the throughput. Refused votes write nothing.
    Raises IntegrityError (after writing) when a constraint is hit anyway (a key reused on another task, a
    vote racing on a task whose lock it did not need): the caller rolls back and writes vote by vote.
    """
    conn = conn or session.connection()
    task_ids = sorted({data.task_id for _, data, _ in votes})
    user_ids = sorted({user.id for user, _, _ in votes})
    tasks = {row[0]: row for row in conn.execute(_LOCK_TASKS, {"b_tasks": task_ids})}
    disabled: dict[int, bool] = {}
    assignments: dict[tuple[int, int], tuple[int | None, str]] = {}  # (task, user) -> (id, status)
    for uid, off, task_id, assignment_id, status in conn.execute(
        _SELECT_LABELERS, {"b_tasks": task_ids, "b_users": user_ids}
    ):
        disabled[uid] = bool(off)
        if task_id is not None:
            assignments[(task_id, uid)] = (assignment_id, status)
    n_assigned = {task_id: row.n_assigned for task_id, row in tasks.items()}
    outcomes: list[Recorded | FeedbackError | None] = [None] * len(votes)
    claims: dict[int, int] = {}
    new_assignments: list[dict[str, object]] = []
    done: list[int] = []
    new_votes: list[tuple[int, dict[str, object]]] = []  # (position in votes, fields)
    conflicts: dict[int, Conflict] = {}
    for i, (user, data, source) in enumerate(votes):
        try:
            _take_slot(user, data, source, tasks.get(data.task_id), disabled.get(user.id, False),
                       assignments, n_assigned, claims, new_assignments, done)  # fmt: skip
        except Conflict as e:
            conflicts[i] = e
        except FeedbackError as e:
            outcomes[i] = e
        else:
            new_votes.append((i, vote_fields(user, data, source)))
    if claims:
        conn.execute(_ADD_CLAIMS, [{"b_task": t, "b_n": n} for t, n in sorted(claims.items())])
    if new_assignments:
        conn.execute(_INSERT_ASSIGNMENT, new_assignments)
    if done:
        conn.execute(_MARK_ALL_DONE, {"b_assignments": done})
    if new_votes:
        ids = conn.execute(_INSERT_VOTES, [fields for _, fields in new_votes]).scalars().all()
        for (i, fields), vote_id in zip(new_votes, ids, strict=True):
            outcomes[i] = Recorded(Vote(id=vote_id, **fields), created=True)
    if conflicts:  # retries (the key's earlier vote is in the store, perhaps from this very batch) or not
        keys = [votes[i][1].idempotency_key for i in conflicts]
        earlier = {
            v.idempotency_key: v for v in session.scalars(select(Vote).where(Vote.idempotency_key.in_(keys)))
        }
        for i, conflict in conflicts.items():
            user, data, _ = votes[i]
            found = earlier.get(data.idempotency_key)
            try:
                outcomes[i] = replay(found, user, data) if found is not None else conflict
            except FeedbackError as e:
                outcomes[i] = e
    return cast(list[Recorded | FeedbackError], outcomes)  # every vote has its outcome now


def _take_slot(
    user: User,
    data: VoteIn,
    source: str,
    task: Row[Unpack[tuple[Any, ...]]] | None,
    disabled: bool,
    assignments: dict[tuple[int, int], tuple[int | None, str]],
    n_assigned: dict[int, int],
    claims: dict[int, int],
    new_assignments: list[dict[str, object]],
    done: list[int],
) -> None:
    """One vote of write_votes: its checks against the batch's reads and the batch's votes before it, then
    its claim and assignment noted in `claims`, `new_assignments` and `done` (and in the batch's state)."""
    if task is None:
        raise NotFound(f"no task {data.task_id}")
    key = (data.task_id, user.id)
    assignment_id, status = assignments.get(key, (None, None))
    check_vote(
        data,
        source,
        task.project,
        task.kind,
        task.n_completions,
        task.production,
        task.axes,
        disabled,
        status,
    )
    if status in (None, "skipped", "expired"):  # a slot to claim
        limit = GOLD_LIMIT if task.is_gold else task.overlap
        if n_assigned[data.task_id] >= limit:
            raise Conflict(f"task {data.task_id} already has its {task.overlap} labelers")
        n_assigned[data.task_id] += 1
        claims[data.task_id] = claims.get(data.task_id, 0) + 1
    if assignment_id is None:
        new_assignments.append({"task_id": data.task_id, "user_id": user.id, "project_id": task.project_id,
                                "status": "done", "created_at": utcnow()})  # fmt: skip
    else:
        done.append(assignment_id)
    assignments[key] = (assignment_id, "done")
