"""Typed FastAPI dependencies: settings, db session, the current user (bearer token or cookie), CSRF."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlalchemy.orm import Session

from rlhf.feedback.db import Database
from rlhf.feedback.models import User
from rlhf.feedback.security import (
    CSRF_COOKIE,
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    RateLimiter,
    check_csrf,
    read_session_cookie,
)
from rlhf.feedback.settings import Settings
from rlhf.feedback.users import user_by_token

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class LoginRequired(Exception):
    """Raised by page dependencies; the app answers with a redirect to /login."""


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def get_session(db: Annotated[Database, Depends(get_db)]) -> Iterator[Session]:
    with db.session() as session:
        yield session


def get_limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


def get_secret(request: Request) -> str:
    secret: str = request.app.state.secret
    return secret


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
LimiterDep = Annotated[RateLimiter, Depends(get_limiter)]
SecretDep = Annotated[str, Depends(get_secret)]


def _authenticate(request: Request, session: Session, secret: str) -> tuple[User | None, bool]:
    """(user or None, whether the credential was a browser cookie)."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return user_by_token(session, auth[7:].strip()), False
    uid = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    return (session.get(User, uid) if uid is not None else None), True


def get_current_user(request: Request, session: SessionDep, secret: SecretDep) -> User:
    """API callers: a bearer token, or a browser session (then unsafe methods also need the CSRF header)."""
    user, via_cookie = _authenticate(request, session, secret)
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
    uid = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    user = session.get(User, uid) if uid is not None else None
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
