"""Typed FastAPI dependencies: settings, db session, the current user (bearer token or cookie), CSRF.

Dependencies that do no I/O are `async def`: FastAPI runs sync dependencies in its thread pool, and each
hop there (about 0.3 ms of CPU, measured) costs more than these functions do. Those that query stay sync.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from rlhf.feedback.db import Database
from rlhf.feedback.models import User
from rlhf.feedback.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    AuthCache,
    RateLimiter,
    check_csrf,
    read_session_cookie,
)
from rlhf.feedback.settings import Settings
from rlhf.feedback.users import user_by_token
from rlhf.feedback.writer import VoteWriter

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class LoginRequired(Exception):
    """Raised by page dependencies; the app answers with a redirect to /login."""


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


DbDep = Annotated[Database, Depends(get_db)]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for this request. Making one does no I/O, so this runs on the event loop; closing is
    sent to the thread pool only when a transaction is still open (closing then rolls it back)."""
    db: Database = request.app.state.db
    session = db.session()
    try:
        yield session
    finally:
        if session.in_transaction():
            await run_in_threadpool(session.close)
        else:
            session.close()


async def get_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


async def get_writer(request: Request) -> VoteWriter:
    writer: VoteWriter = request.app.state.writer
    return writer


async def get_secret(request: Request) -> str:
    secret: str = request.app.state.secret
    return secret


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]
WriterDep = Annotated[VoteWriter, Depends(get_writer)]
SecretDep = Annotated[str, Depends(get_secret)]


def _user_by_token(db: Database, token: str) -> User | None:
    with db.session() as session:
        return user_by_token(session, token)


def _user_by_id(db: Database, user_id: int) -> User | None:
    with db.session() as session:
        return session.get(User, user_id)


def session_user(claim: tuple[int, int] | None, user: User | None) -> User | None:
    """The user of a session cookie's claim, unless that session was ended (logout, password change)."""
    if claim is None or user is None or user.session_generation != claim[1]:
        return None
    return user


async def get_current_user(request: Request) -> User:
    """API callers: a bearer token, or a browser session (then unsafe methods also need the CSRF header).

    Token lookups go through the AuthCache; only a miss costs a query in the thread pool. (The app state
    is read directly rather than through sub-dependencies: each one costs time on every API request.)
    """
    db: Database = request.app.state.db
    secret: str = request.app.state.secret
    auth = request.headers.get("authorization", "")
    via_cookie = auth[:7].lower() != "bearer "
    if not via_cookie:
        token = auth[7:].strip()
        cache: AuthCache = request.app.state.auth_cache
        epoch = (
            await cache.epoch_async()
        )  # read before the lookup: a change made meanwhile makes the entry stale
        user = cache.get(token, epoch)
        if user is None:
            # A few lookups at a time: when many tokens miss at once (a server just started), unbounded
            # lookups would each take a thread and a new database connection, and all answer late.
            async with request.app.state.token_lookups:
                user = await run_in_threadpool(_user_by_token, db, token)
            if user is not None:
                cache.put(token, user, epoch)
    else:
        claim = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
        found = await run_in_threadpool(_user_by_id, db, claim[0]) if claim is not None else None
        user = session_user(claim, found)
    if user is None:
        raise HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    if user.disabled:
        raise HTTPException(403, "this account is disabled")
    if via_cookie and request.method not in SAFE_METHODS:
        if not check_csrf(secret, request.cookies.get(CSRF_COOKIE), request.headers.get(CSRF_HEADER)):
            raise HTTPException(403, "missing or wrong CSRF token")
    return user


def get_admin(user: Annotated[User, Depends(get_current_user)]) -> User:
    if user.role != "admin":
        raise HTTPException(403, "admins only")
    return user


def get_page_user(request: Request, session: SessionDep, secret: SecretDep) -> User:
    """Browser pages: a valid session cookie of an enabled user, else a redirect to the login page."""
    claim = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    user = session_user(claim, session.get(User, claim[0]) if claim is not None else None)
    if user is None or user.disabled:
        raise LoginRequired()
    return user


def get_page_admin(user: Annotated[User, Depends(get_page_user)]) -> User:
    if user.role != "admin":
        raise HTTPException(403, "admins only")
    return user


async def require_csrf(request: Request, secret: SecretDep) -> None:
    """Every form POST carries the CSRF token matching this browser's CSRF cookie."""
    form = await request.form()
    token = form.get(CSRF_FIELD)
    if not check_csrf(secret, request.cookies.get(CSRF_COOKIE), token if isinstance(token, str) else None):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page and try again")


CurrentUser = Annotated[User, Depends(get_current_user)]
AdminUser = Annotated[User, Depends(get_admin)]
PageUser = Annotated[User, Depends(get_page_user)]
PageAdmin = Annotated[User, Depends(get_page_admin)]
CsrfChecked = Depends(require_csrf)
