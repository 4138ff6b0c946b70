"""Production A/B feedback, written through the feedback store's own layer (`rlhf.feedback`).

An A/B response becomes a pairwise task of the store's production project at once: the prompt the policy
saw (its `external_id` is the feedback id), and both answers as completions carrying their policy version
and sampling parameters; answer A is position 0. A user's choice then becomes a vote on that task through
`rlhf.feedback.votes.record_vote` with source "production": one transaction, idempotent by key, one vote
per A/B pair. End users are store users named "prod.<user>" ("prod.anonymous" without one), so they never
mix with labelers. The loop exports the project like any other: `export_records(session, "production", ...)`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from rlhf.feedback.db import Database, upgrade
from rlhf.feedback.errors import Conflict, NotFound
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.models import Project, Prompt, Task, User, Vote
from rlhf.feedback.schemas import CandidateRow, Choice, CompletionIn, SamplingIn, VoteIn
from rlhf.feedback.security import RateLimiter
from rlhf.feedback.users import create_user, get_user
from rlhf.feedback.votes import Recorded, record_vote

USER_PREFIX = "prod."
ANONYMOUS = "anonymous"


@dataclass
class Answer:
    """One side of an A/B pair, with its lineage."""

    text: str
    policy: str  # the policy version that wrote it
    sampling: dict[str, Any]


class FeedbackStore:
    """The feedback store as the model server uses it: a migrated database, a project, a vote rate limit."""

    def __init__(self, url: str, project: str, votes_per_minute: int) -> None:
        self.db = Database(url)
        upgrade(self.db)
        self.project = project
        self.limiter = RateLimiter(votes_per_minute)

    def close(self) -> None:
        self.db.dispose()


def save_ab_pair(
    store: FeedbackStore, feedback_id: str, prompt: str, answers: tuple[Answer, Answer], meta: dict[str, Any]
) -> bool:
    """Store the prompt and both answers as one pairwise task; False when the answers are identical
    (the importer makes no task of them: there is nothing to choose between)."""
    row = CandidateRow(
        prompt=_storable(prompt),
        prompt_id=feedback_id,
        completions=[
            CompletionIn(text=_storable(a.text), policy=a.policy, sampling=SamplingIn(**a.sampling))
            for a in answers
        ],
        meta=_storable(meta),
    )
    with store.db.session() as session:
        result = import_candidates(session, store.project, [row])
    return result.tasks == 1


def record_ab_vote(
    store: FeedbackStore,
    feedback_id: str,
    choice: Choice,
    idempotency_key: str,
    user: str | None = None,
    client: str = "",
) -> Recorded:
    """Record a production user's choice on the A/B pair `feedback_id`, in one transaction.

    A retry with the same key returns the first vote and is not rate limited. New votes are limited per
    user, or per client address for anonymous ones (RateLimited, a 429). Raises NotFound for an unknown
    feedback id and Conflict when the pair already has its vote.
    """
    with store.db.session() as session:
        task_id = _task_of(session, store.project, feedback_id)
        account = _production_user(session, user or ANONYMOUS)
        replay = session.scalar(select(Vote.id).where(Vote.idempotency_key == idempotency_key))
        limit_key = account.id if user else _anonymous_key(client)
        if replay is None:
            store.limiter.check(limit_key)
        vote = VoteIn(task_id=task_id, choice=choice, idempotency_key=idempotency_key, source="production")
        recorded = record_vote(session, account, vote, source="production")
        if recorded.created:
            store.limiter.record(limit_key)
        return recorded


def _storable(value: Any) -> Any:
    """NUL characters (a byte-level model can sample one) as U+FFFD, in strings however deep: PostgreSQL
    stores no NUL, and the store's schemas refuse them."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value


def _task_of(session: Session, project: str, feedback_id: str) -> int:
    task_id = session.scalar(
        select(Task.id)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(Project, Project.id == Prompt.project_id)
        .where(Project.name == project, Prompt.external_id == feedback_id)
    )
    if task_id is None:
        raise NotFound(f"no A/B pair with feedback_id {feedback_id!r}")
    return int(task_id)


def _production_user(session: Session, name: str) -> User:
    full = USER_PREFIX + name
    try:
        return get_user(session, full)
    except NotFound:
        try:
            return create_user(session, full, "labeler")  # no password: it can never log in
        except Conflict:  # created by a concurrent request
            return get_user(session, full)


def _anonymous_key(client: str) -> int:
    """A rate-limit key for an anonymous client address; negative, so it never equals a user id."""
    return -1 - zlib.crc32(client.encode())
