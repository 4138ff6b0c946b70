"""Users, API tokens and the app's signing secret."""

from __future__ import annotations

import secrets

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, InvalidInput, NotFound
from rlhf.feedback.models import ROLES, ApiToken, AppSetting, User
from rlhf.feedback.security import hash_password, hash_token, new_token, verify_password


def create_user(session: Session, name: str, role: str, password: str | None = None) -> User:
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    user = User(name=name, role=role, password_hash=hash_password(password) if password else None)
    try:
        with db_of(session).write(session):
            session.add(user)
    except IntegrityError:
        raise Conflict(f"user {name!r} already exists") from None
    return user


def get_user(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))


def update_user(
    session: Session,
    name: str,
    *,
    disabled: bool | None = None,
    role: str | None = None,
    password: str | None = None,
    acting: User | None = None,
) -> User:
    """Change a user. Refused (Conflict) when it would take admin rights from `acting` (the admin making
    the change: nobody locks themselves out) or leave the store without an enabled admin."""
    if role is not None and role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    losing_admin = role not in (None, "admin") or disabled is True
    with db_of(session).write(session):
        if losing_admin:
            # the enabled admins' rows, locked until this change commits: two admins disabling each other at
            # once (two workers on PostgreSQL) would each count the other as the admin left (SQLite's write
            # transactions are one at a time already)
            session.execute(
                select(User.id).where(User.role == "admin", User.disabled.is_(False)).with_for_update()
            ).all()
        user = get_user(session, name)
        if losing_admin and user.role == "admin" and not user.disabled:
            if acting is not None and acting.id == user.id:
                raise Conflict("you cannot demote or disable yourself; another admin can")
            others = session.scalar(
                select(func.count())
                .select_from(User)
                .where(User.role == "admin", User.disabled.is_(False), User.id != user.id)
            )
            if not others:
                raise Conflict(f"{name!r} is the last enabled admin; make another admin first")
        if disabled is not None:
            user.disabled = disabled
        if role is not None:
            user.role = role
        if password is not None:
            user.password_hash = hash_password(password)
            user.session_generation += 1  # a new password ends every session opened with the old one
    return user


def end_sessions(session: Session, user_id: int) -> None:
    """End every browser session of the user (their session cookies name an older generation)."""
    with db_of(session).write(session):
        session.execute(
            update(User).where(User.id == user_id).values(session_generation=User.session_generation + 1)
        )


def authenticate(session: Session, name: str, password: str) -> User | None:
    """The enabled user with this name and password, else None (the same answer for every failure)."""
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        verify_password(None, password)  # spend a real check's time, so names cannot be probed by timing
        return None
    if not verify_password(user.password_hash, password) or user.disabled:
        return None
    return user


def create_token(session: Session, user_name: str, token_name: str = "") -> str:
    """Create an API token for `user_name`; the plain token is returned once and never stored."""
    token = new_token()
    with db_of(session).write(session):
        user = get_user(session, user_name)
        session.add(ApiToken(user_id=user.id, token_hash=hash_token(token), name=token_name))
    return token


def revoke_token(session: Session, token: str) -> bool:
    """Revoke an API token (it is refused from now on); False if it was unknown or already revoked."""
    with db_of(session).write(session):
        result = session.execute(
            update(ApiToken)
            .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked.is_(False))
            .values(revoked=True)
        )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def user_by_token(session: Session, token: str) -> User | None:
    stmt = (
        select(User)
        .join(ApiToken, ApiToken.user_id == User.id)
        .where(ApiToken.token_hash == hash_token(token), ApiToken.revoked.is_(False))
    )
    return session.scalar(stmt)


def app_secret(session: Session) -> str:
    """The secret kept in the db, created on first use (used when RLHF_LABEL_SECRET is not set)."""
    row = session.get(AppSetting, "secret")
    if row is not None:
        return row.value
    try:
        with db_of(session).write(session):
            session.add(AppSetting(key="secret", value=secrets.token_urlsafe(48)))
    except IntegrityError:
        pass  # another process created it first
    row = session.get(AppSetting, "secret", populate_existing=True)
    assert row is not None
    return row.value
