"""Production A/B feedback, written through the feedback store's own layer (`rlhf.feedback`).

An A/B response becomes a pairwise task of the store's production project at once: the prompt the policy
saw (its `external_id` is the feedback id), and both answers as completions carrying their policy version
and sampling parameters; answer A is position 0. A user's choice then becomes a vote on that task through
`rlhf.feedback.votes.record_vote` with source "production": one transaction, idempotent by key, one vote
per A/B pair. The project is marked `production`: labelers never see it nor take its tasks.

Only whoever got the response can vote on it: the response carries a `feedback_token`, an HMAC of the
feedback id under the store's secret, which the vote must bring back. The vote is the end user's the
completion request named (its `user` field), stored as user "prod.<user>" ("prod.anonymous" without one)
so they never mix with labelers, and created only when a vote of theirs is accepted. New votes are rate
limited per client address and per end user, so a client cannot sidestep the limit by renaming its user.
`rlhf loop` trains its reward model on the project's votes with `loop.extra_projects: [production]`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhf.feedback.db import db_of, open_database
from rlhf.feedback.errors import Conflict, Forbidden, InvalidInput, NotFound
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.models import Project, Prompt, Task, User, Vote
from rlhf.feedback.schemas import NAME_PATTERN, CandidateRow, Choice, CompletionIn, SamplingIn, VoteIn
from rlhf.feedback.security import RateLimiter
from rlhf.feedback.users import app_secret, create_user, get_user
from rlhf.feedback.votes import Recorded, record_vote

AB_HEADER = "x-rlhf-ab"  # a request opts in to A/B pairs with this header (or `"ab": true` in its body)
log = logging.getLogger(__name__)

USER_PREFIX = "prod."
ANONYMOUS = "anonymous"


@dataclass(frozen=True)
class AB:
    """What an A/B response carries: the pair's id, and the token that lets its receiver vote on it."""

    feedback_id: str
    feedback_token: str

    def fields(self) -> dict[str, str]:
        return {"feedback_id": self.feedback_id, "feedback_token": self.feedback_token}


@dataclass
class Answer:
    """One side of an A/B pair, with its lineage."""

    text: str
    policy: str  # the policy version that wrote it
    sampling: dict[str, Any]


class FeedbackStore:
    """The feedback store as the model server uses it: a migrated database, a project, a vote rate limit."""

    def __init__(self, url: str, project: str, votes_per_minute: int) -> None:
        self.db = open_database(url)  # migrated; one that cannot be opened is a one-line error
        self.project = project
        self.limiter = RateLimiter(votes_per_minute)  # keyed by end user (ids >= 0) and address (< 0)
        with self.db.session() as session:
            self._secret = app_secret(session).encode()
            with self.db.write(session):
                found = session.scalar(select(Project).where(Project.name == project))
                if found is None:
                    session.add(Project(name=project, production=True))
                else:
                    found.production = True

    def token(self, feedback_id: str) -> str:
        """The proof of having received the A/B response `feedback_id`, sent with it."""
        mac = hmac.new(self._secret, b"rlhf-ab-feedback:" + feedback_id.encode(), hashlib.sha256)
        return mac.hexdigest()

    def check_token(self, feedback_id: str, token: str) -> None:
        if not hmac.compare_digest(self.token(feedback_id), token):
            raise Forbidden(
                "feedback_token does not match feedback_id: vote with the token sent with the response"
            )

    def close(self) -> None:
        self.db.dispose()


def save_ab_pair(
    store: FeedbackStore, feedback_id: str, prompt: str, answers: tuple[Answer, Answer], meta: dict[str, Any]
) -> bool:
    """Store the prompt and both answers as one pairwise task; False, storing nothing, when the answers are
    identical (there is nothing to choose between, and a prompt without a task would only keep the user's
    words)."""
    if _storable(answers[0].text) == _storable(answers[1].text):
        return False
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


async def save_ab_async(
    store: FeedbackStore, prompt: str, answers: tuple[Answer, Answer], meta: dict[str, Any]
) -> AB | None:
    """Write an A/B pair under a new feedback id (in the thread pool); its id and token, or None (identical
    answers, or the store failed: the user still gets the answers, only the vote is lost)."""
    feedback_id = "ab-" + secrets.token_hex(12)
    try:
        saved = await run_in_threadpool(
            save_ab_pair, store, feedback_id, prompt, answers, {"source": "production", **meta}
        )
    except Exception:
        log.exception("could not write an A/B pair to the feedback store")
        return None
    return AB(feedback_id, store.token(feedback_id)) if saved else None


def record_ab_vote(
    store: FeedbackStore,
    feedback_id: str,
    feedback_token: str,
    choice: Choice,
    idempotency_key: str,
    user: str | None = None,
    client: str = "",
) -> Recorded:
    """Record a production user's choice on the A/B pair `feedback_id`, in one transaction.

    Raises Forbidden for a wrong token or a `user` other than the one the response was made for, NotFound
    for an unknown feedback id, Conflict when the pair already has its vote, RateLimited (a 429) over the
    limit per client address or per end user. A retry with the same key returns the first vote and is not
    rate limited. The end user's store account is made only with the first vote of theirs that is accepted.
    """
    store.check_token(feedback_id, feedback_token)
    with store.db.session() as session:
        task_id, owner = _pair(session, store.project, feedback_id)
        if user is not None and user != (owner or ANONYMOUS):
            raise Forbidden("this A/B response was made for another user")
        name = _account_name(owner or ANONYMOUS)
        replay = session.scalar(select(Vote).where(Vote.idempotency_key == idempotency_key))
        if replay is not None:
            if replay.task_id != task_id or replay.choice != choice:
                raise InvalidInput(
                    f"idempotency key {idempotency_key!r} was used for a different vote; use a new key"
                )
            return Recorded(replay, created=False)
        account = session.scalar(select(User).where(User.name == name))
        keys = [_anonymous_key(client)] + ([account.id] if account is not None and owner else [])
        # counted before the vote and given back if it makes none: votes sent together cannot all pass the
        # limit before any of them is counted
        taken: list[int] = []
        try:
            for key in keys:
                store.limiter.take(key)
                taken.append(key)
            if session.scalar(select(Vote.id).where(Vote.task_id == task_id, Vote.retracted_at.is_(None))):
                raise Conflict(f"the A/B pair {feedback_id!r} already has its vote")
            made = False
            if account is None:
                account, made = _production_user(session, name)
            user_id = account.id
            vote = VoteIn(task_id=task_id, choice=choice, idempotency_key=idempotency_key)
            try:
                recorded = record_vote(session, account, vote, source="production")
            except Exception:
                if made:  # a refused vote leaves no user behind (a concurrent vote took the pair)
                    _drop_unused_user(session, user_id)
                raise
        except BaseException:
            for key in taken:
                store.limiter.give_back(key)
            raise
        if not recorded.created:
            for key in taken:
                store.limiter.give_back(key)
        elif owner and account.id not in taken:  # the end user's account, made by this vote
            store.limiter.record(account.id)
        return recorded


def _pair(session: Session, project: str, feedback_id: str) -> tuple[int, str | None]:
    """The task of an A/B pair and the end user its request named (None: anonymous)."""
    row = session.execute(
        select(Task.id, Prompt.meta)
        .join(Prompt, Prompt.id == Task.prompt_id)
        .join(Project, Project.id == Prompt.project_id)
        .where(Project.name == project, Prompt.external_id == feedback_id)
    ).first()
    if row is None:
        raise NotFound(f"no A/B pair with feedback_id {feedback_id!r}")
    owner = (row[1] or {}).get("request_user")
    return int(row[0]), owner if isinstance(owner, str) and owner else None


def _drop_unused_user(session: Session, user_id: int) -> None:
    """Delete an account this request made, unless it holds a vote by now: a concurrent request of the same
    user may have found it and voted with it (a delete would take that acknowledged vote with it)."""
    with db_of(session).write(session):
        session.execute(delete(User).where(User.id == user_id, ~exists().where(Vote.user_id == user_id)))


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


def _production_user(session: Session, full: str) -> tuple[User, bool]:
    """The end user's store account, and whether this call made it (not a concurrent request)."""
    try:
        return create_user(session, full, "labeler"), True  # no password: it can never log in
    except Conflict:  # made by a concurrent request
        return get_user(session, full), False


def _account_name(user: str) -> str:
    """The store account of an end user: "prod.<user>", or, for a name the store's names cannot hold (longer
    than 64 characters in all, or other characters), "prod.u-" and a digest of it: the same user, the same
    account, whatever the client sends."""
    name = USER_PREFIX + user
    if re.fullmatch(NAME_PATTERN, name):
        return name
    return USER_PREFIX + "u-" + hashlib.sha256(user.encode()).hexdigest()[:32]


def _anonymous_key(client: str) -> int:
    """A rate-limit key for an anonymous client address; negative, so it never equals a user id."""
    return -1 - zlib.crc32(client.encode())
