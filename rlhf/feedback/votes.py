"""Recording votes, idempotent by a client-supplied key; undo; listing.

A vote is acknowledged only after the transaction holding it commits. A retry with the same idempotency
key returns the original vote: the UNIQUE index on the key makes the retry's INSERT fail (or, when the
original already marked the task done, the retry meets that), and `settle` answers with the original row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, Forbidden, InvalidInput, NotFound
from rlhf.feedback.models import Assignment, Project, Task, User, Vote, utcnow
from rlhf.feedback.queue import claim
from rlhf.feedback.schemas import VoteIn, VoteOut
from rlhf.feedback.security import RateLimiter

log = logging.getLogger(__name__)


@dataclass
class Recorded:
    vote: Vote
    created: bool  # False when this was a replay of an earlier request with the same key


# The hot path runs prebuilt Core statements with bound parameters: building SQLAlchemy statements per call
# (and the ORM's unit of work) cost more CPU than SQLite spends on the vote itself.
_tasks, _projects, _assignments, _votes, _users = (
    cast(Table, m.__table__) for m in (Task, Project, Assignment, Vote, User)
)
_SELECT_TASK = (
    select(
        _tasks.c.kind,
        _tasks.c.n_completions,
        _tasks.c.is_gold,
        _tasks.c.project_id,
        _projects.c.name,
        _projects.c.overlap,
        _projects.c.production,
        _projects.c.axes,
        _assignments.c.id,
        _assignments.c.status,
        # checked here too: the labeler may have been disabled since their token was cached
        select(_users.c.disabled).where(_users.c.id == bindparam("b_user")).scalar_subquery(),
    )
    .select_from(
        _tasks.join(_projects, _projects.c.id == _tasks.c.project_id).outerjoin(
            _assignments,
            (_assignments.c.task_id == _tasks.c.id) & (_assignments.c.user_id == bindparam("b_user")),
        )
    )
    .where(_tasks.c.id == bindparam("b_task"))
)
_MARK_DONE = update(_assignments).where(_assignments.c.id == bindparam("b_assignment")).values(status="done")
_INSERT_ASSIGNMENT = insert(_assignments)
_INSERT_VOTE = insert(_votes).returning(_votes.c.id)


def write_vote(
    session: Session, user: User, data: VoteIn, source: str, conn: Connection | None = None
) -> Recorded:
    """Insert one vote within the session's open write transaction (see record_vote and VoteWriter; many at once: rlhf.feedback.vote_batch).

    Raises NotFound, Forbidden, InvalidInput or Conflict before anything is written (VoteWriter relies on
    it), or IntegrityError when the idempotency key or the one-live-vote-per-task rule is already taken;
    `settle` turns those into the right answer.
    """
    fields = vote_fields(user, data, source)
    conn = conn or session.connection()
    row = conn.execute(_SELECT_TASK, {"b_task": data.task_id, "b_user": user.id}).first()
    if row is None:
        raise NotFound(f"no task {data.task_id}")
    (kind, n_completions, is_gold, project_id, project, overlap, production, axes, assignment_id, status,
     disabled) = row  # fmt: skip
    check_vote(data, source, project, kind, n_completions, production, axes, bool(disabled), status)
    if status in (None, "skipped", "expired"):  # a slot to claim
        # Voting straight on a task (API clients, production A/B) claims a slot like next_task does.
        if not claim(session, data.task_id, is_gold, overlap, conn):
            raise Conflict(f"task {data.task_id} already has its {overlap} labelers")
    if assignment_id is None:
        assignment = {"task_id": data.task_id, "user_id": user.id, "project_id": project_id}
        conn.execute(_INSERT_ASSIGNMENT, {**assignment, "status": "done", "created_at": fields["created_at"]})
    else:
        conn.execute(_MARK_DONE, {"b_assignment": assignment_id})
    vote_id = conn.execute(_INSERT_VOTE, fields).scalar_one()
    return Recorded(Vote(id=vote_id, **fields), created=True)


def vote_fields(user: User, data: VoteIn, source: str) -> dict[str, object]:
    return {
        "task_id": data.task_id,
        "user_id": user.id,
        "choice": data.choice,
        "ranking": data.ranking,
        "rating": data.rating,
        "margin": data.margin,
        "confidence": data.confidence,
        "note": data.note or None,
        "axes": data.axes or None,
        "rewrite": data.rewrite,
        "display_order": data.display_order,
        "time_to_vote_ms": data.time_to_vote_ms,
        "idempotency_key": data.idempotency_key,
        "source": source,
        "created_at": utcnow(),
        "retracted_at": None,
    }


def check_vote(
    data: VoteIn,
    source: str,
    project: str,
    kind: str,
    n_completions: int,
    production: bool,
    axes: list[str] | None,
    disabled: bool,
    status: str | None,
) -> None:
    """The refusals of a vote, in the order they are reported, given its task and its labeler's assignment."""
    if disabled:
        raise Forbidden("this account is disabled")
    if data.project is not None and data.project != project:
        raise NotFound(f"no task {data.task_id} in project {data.project!r}")
    if production and source != "production":
        raise Forbidden(f"task {data.task_id} is a production A/B pair; only its end user answers it")
    _check_answer(kind, n_completions, data)
    if data.axes and (kind != "pairwise" or not set(data.axes) <= set(axes or ())):
        asked = ", ".join(axes or ()) if kind == "pairwise" else "none (not a pairwise task)"
        raise InvalidInput(f"axes must be among this project's judgement axes: {asked or 'none'}")
    if status == "done":
        raise Conflict(f"you already voted on task {data.task_id}; undo that vote first")


def settle(session: Session, user: User, data: VoteIn, error: IntegrityError | Conflict) -> Recorded:
    """The answer to a vote that hit a conflict: the earlier vote with the same key if there is one (a
    retry, or a retry racing its original), else the conflict itself (a second vote on the task)."""
    earlier = session.scalar(select(Vote).where(Vote.idempotency_key == data.idempotency_key))
    if earlier is not None:
        return replay(earlier, user, data)
    if isinstance(error, Conflict):
        raise error
    raise Conflict(f"you already voted on task {data.task_id}") from None


def record_vote(
    session: Session, user: User, data: VoteIn, source: str, limiter: RateLimiter | None = None
) -> Recorded:
    """Store one vote in a transaction of its own, or return the earlier vote made with the same key.

    (The server batches votes through VoteWriter instead; this is the same logic, one at a time.)
    """
    if limiter is not None:
        limiter.check(user.id)
    try:
        with db_of(session).write(session):
            recorded = write_vote(session, user, data, source)
    except (IntegrityError, Conflict) as e:
        return settle(session, user, data, e)
    if limiter is not None:
        limiter.record(user.id)
    return recorded


REPLAYED_FIELDS = (
    "task_id",
    "choice",
    "ranking",
    "rating",
    "margin",
    "confidence",
    "display_order",
    "rewrite",
)


def replay(earlier: Vote, user: User, data: VoteIn) -> Recorded:
    """The earlier vote, if `data` is a retry of it: the same key with another body is a client's mistake
    (a key reused for a new vote), answered 422 rather than with a vote it did not ask for."""
    if earlier.user_id != user.id:
        raise Conflict("this idempotency key was used by another labeler")
    differ = [f for f in REPLAYED_FIELDS if getattr(earlier, f) != getattr(data, f)]
    if (earlier.note or None) != (data.note or None):
        differ.append("note")
    if (earlier.axes or None) != (data.axes or None):
        differ.append("axes")
    if differ:
        raise InvalidInput(
            f"idempotency key {data.idempotency_key!r} was used for a different vote ({', '.join(differ)} "
            "differ); use a new key for a new vote"
        )
    return Recorded(earlier, created=False)


def _check_answer(kind: str, k: int, data: VoteIn) -> None:
    """The answer fields must fit the task kind: choice for pairwise, ranking for ranking, rating for rating."""
    given = {name for name in ("choice", "ranking", "rating") if getattr(data, name) is not None}
    wanted = {"pairwise": "choice", "ranking": "ranking", "rating": "rating"}[kind]
    if given != {wanted}:
        raise InvalidInput(f"a {kind} task takes `{wanted}` (and none of the other answer fields)")
    if data.ranking is not None and (len(data.ranking) != k or max(data.ranking) > k):
        raise InvalidInput(f"ranking must give each of the {k} completions a rank from 1 to {k}")
    if data.display_order is not None and sorted(data.display_order) != list(range(k)):
        raise InvalidInput(f"display_order must be a permutation of 0..{k - 1}")


def undo(
    session: Session, user: User, window_s: float, vote_id: int | None = None, project: Project | None = None
) -> Vote:
    """Retract `user`'s vote (`vote_id`, or their latest, in `project` if given) if it is younger than
    `window_s` seconds.

    The row is kept with `retracted_at` set; the task reopens for this labeler.
    """
    with db_of(session).write(session):
        stmt = select(Vote).where(Vote.user_id == user.id, Vote.retracted_at.is_(None))
        if vote_id is not None:
            stmt = stmt.where(Vote.id == vote_id)
        if project is not None:
            stmt = stmt.join(Task, Task.id == Vote.task_id).where(Task.project_id == project.id)
        vote = session.scalar(stmt.order_by(Vote.created_at.desc(), Vote.id.desc()).limit(1))
        if vote is None:
            where = "" if project is None else f" in project {project.name!r}"
            raise NotFound(
                f"no vote of yours to undo{where}"
                if vote_id is None
                else f"no live vote {vote_id} of yours{where}"
            )
        if vote.source == "simulated":  # `rlhf loop` trains on a simulated vote at once, not after the window
            raise Conflict(f"vote {vote.id} is a simulated labeler's, final once cast: it cannot be undone")
        now = datetime.now(timezone.utc)
        if now - vote.created_at > timedelta(seconds=window_s):
            raise Conflict(f"votes can be undone only within {window_s:g} s")
        # The task's row first (the order a vote and a skip take their locks in), then the vote read again under
        # its lock: an undo of the same vote that committed meanwhile (a double press, a retried request) leaves
        # it retracted, and this one must not reopen the task beside a vote cast since.
        session.execute(select(Task.id).where(Task.id == vote.task_id).with_for_update())
        session.refresh(vote, with_for_update=True)
        if vote.retracted_at is not None:
            raise NotFound(f"vote {vote.id} is already undone")
        vote.retracted_at = now
        assignment = session.scalar(
            select(Assignment).where(Assignment.task_id == vote.task_id, Assignment.user_id == user.id)
        )
        if assignment is not None:
            assignment.status = "open"
    return vote


def get_vote(session: Session, user: User, vote_id: int) -> Vote:
    """A vote by id; labelers see only their own (another's is reported as absent)."""
    vote = session.get(Vote, vote_id)
    if vote is None or (user.role != "admin" and vote.user_id != user.id):
        raise NotFound(f"no vote {vote_id}")
    return vote


def list_votes(
    session: Session, user: User, project: Project | None, labeler: User | None, limit: int, offset: int
) -> list[Vote]:
    """Votes, newest first. Labelers get only their own, whatever they ask for."""
    stmt = select(Vote).order_by(Vote.id.desc())
    if user.role != "admin":
        stmt = stmt.where(Vote.user_id == user.id)
    elif labeler is not None:
        stmt = stmt.where(Vote.user_id == labeler.id)
    if project is not None:
        stmt = stmt.join(Task, Task.id == Vote.task_id).where(Task.project_id == project.id)
    return list(session.scalars(stmt.limit(limit).offset(offset)))


def vote_out(vote: Vote, labeler: str) -> VoteOut:
    return VoteOut(
        id=vote.id,
        task_id=vote.task_id,
        labeler=labeler,
        choice=vote.choice,
        ranking=vote.ranking,
        rating=vote.rating,
        margin=vote.margin,
        confidence=vote.confidence,
        note=vote.note,
        display_order=vote.display_order,
        time_to_vote_ms=vote.time_to_vote_ms,
        axes=vote.axes,
        rewrite=vote.rewrite,
        source=vote.source,
        idempotency_key=vote.idempotency_key,
        created_at=vote.created_at,
        retracted=vote.retracted_at is not None,
    )
