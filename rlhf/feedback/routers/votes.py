"""Votes over the API: record (idempotent), list your own, undo."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from rlhf.feedback import projects
from rlhf.feedback import votes as store
from rlhf.feedback.db import Database
from rlhf.feedback.deps import CurrentUser, SessionDep, SettingsDep
from rlhf.feedback.errors import RateLimited
from rlhf.feedback.metrics import VOTE_REPLAYS, VOTE_SECONDS, VOTES
from rlhf.feedback.models import User, Vote
from rlhf.feedback.schemas import API_ERRORS, MAX_INT32, NAME_PATTERN, PROJECT_PATTERN, VoteIn, VoteOut
from rlhf.feedback.security import RateLimiter
from rlhf.feedback.users import get_user
from rlhf.feedback.writer import VoteWriter

router = APIRouter(prefix="/api/votes", tags=["votes"], responses=API_ERRORS)
VoteId = Annotated[int, Path(ge=1, le=MAX_INT32)]


@router.post(
    "",
    status_code=201,
    response_model=VoteOut,
    responses={200: {"model": VoteOut, "description": "a replay: the original vote"}},
)
async def create_vote(request: Request, body: VoteIn, user: CurrentUser) -> Response:
    """Record a vote; answered once it is committed. 201 with the new vote; 200 with the original one
    when the idempotency key was seen before (a retry). 409 if you already voted on the task, 429 over
    the rate limit. (Runs on the event loop: the group-commit writer thread stores the vote.)"""
    start = time.perf_counter()
    # the app state read directly: as dependencies, writer and limiter cost time on every vote
    writer: VoteWriter = request.app.state.writer
    limiter: RateLimiter = request.app.state.limiter
    try:
        await limiter.take_async(user.id)  # counted up front, so workers together keep to the limit
    except RateLimited:
        # a retry of a vote already stored is no new vote: it gets its original back, even at the limit
        db: Database = request.app.state.db
        earlier = await run_in_threadpool(_replayed, db, user, body)
        if earlier is None:
            raise
        VOTE_REPLAYS.inc()
        return Response(
            store.vote_out(earlier.vote, user.name).model_dump_json(), 200, media_type="application/json"
        )
    try:
        recorded = await writer.record(user, body, body.source)
    except BaseException:
        await limiter.give_back_async(user.id)
        raise
    if recorded.created:
        VOTES.labels(body.source).inc()
        VOTE_SECONDS.observe(time.perf_counter() - start)
    else:
        await limiter.give_back_async(user.id)
        VOTE_REPLAYS.inc()
    # serialised here, once: returned as a model, it would be validated again against response_model
    out = store.vote_out(recorded.vote, user.name).model_dump_json()
    return Response(out, 201 if recorded.created else 200, media_type="application/json")


def _replayed(db: Database, user: User, body: VoteIn) -> store.Recorded | None:
    """The vote stored earlier under this idempotency key, when `body` is a retry of it (else None; a
    key of another labeler or of another answer raises as a replay would)."""
    with db.session() as session:
        earlier = session.scalar(select(Vote).where(Vote.idempotency_key == body.idempotency_key))
        return None if earlier is None else store.replay(earlier, user, body)


@router.get("")
def list_votes(
    user: CurrentUser,
    session: SessionDep,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN)] = None,
    labeler: Annotated[str | None, Query(pattern=NAME_PATTERN, description="admins only")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_INT32)] = 0,
) -> list[VoteOut]:
    """Votes, newest first. Labelers get only their own."""
    proj = projects.get_project(session, project) if project else None
    who = get_user(session, labeler) if labeler and user.role == "admin" else None
    found = store.list_votes(session, user, proj, who, limit, offset)
    names = dict(
        session.execute(select(User.id, User.name).where(User.id.in_({v.user_id for v in found}))).all()
    )
    return [store.vote_out(v, names[v.user_id]) for v in found]


@router.get("/{vote_id}")
def get_vote(vote_id: VoteId, user: CurrentUser, session: SessionDep) -> VoteOut:
    vote = store.get_vote(session, user, vote_id)
    owner = session.get(User, vote.user_id)
    return store.vote_out(vote, owner.name if owner else "")


@router.post("/undo")
def undo_last(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    project: Annotated[
        str | None, Query(pattern=PROJECT_PATTERN, description="your latest vote in it")
    ] = None,
) -> VoteOut:
    """Retract your latest vote (in `project`, if given) if it is within the undo window; the task reopens
    for you."""
    proj = projects.get_project(session, project) if project else None
    return store.vote_out(store.undo(session, user, settings.undo_window_s, project=proj), user.name)


@router.post("/{vote_id}/undo")
def undo(vote_id: VoteId, user: CurrentUser, session: SessionDep, settings: SettingsDep) -> VoteOut:
    """Retract one of your votes if it is within the undo window."""
    return store.vote_out(store.undo(session, user, settings.undo_window_s, vote_id), user.name)
