"""Users and API tokens (admins), and /api/me."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from rlhf.feedback import users
from rlhf.feedback.deps import AdminUser, CurrentUser, SessionDep
from rlhf.feedback.schemas import API_ERRORS, NAME_PATTERN, TokenIn, TokenOut, UserIn, UserOut, UserUpdate

router = APIRouter(prefix="/api", tags=["users"], responses=API_ERRORS)
UserName = Annotated[str, Path(pattern=NAME_PATTERN)]


@router.get("/me")
def me(user: CurrentUser) -> UserOut:
    return UserOut.model_validate(user)


@router.post("/logout", status_code=204)
def logout(user: CurrentUser, session: SessionDep, request: Request) -> Response:
    """Log out: revoke the bearer token this request carries, or end every browser session of yours
    (a cookie-authenticated call). Every server process refuses the token from the next request on."""
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        users.revoke_token(session, auth[7:].strip())
    else:
        users.end_sessions(session, user.id)
    request.app.state.auth_cache.clear()
    return Response(status_code=204)


@router.get("/users")
def list_users(_: AdminUser, session: SessionDep) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in users.list_users(session)]


@router.post("/users", status_code=201)
def create_user(body: UserIn, _: AdminUser, session: SessionDep) -> UserOut:
    return UserOut.model_validate(users.create_user(session, body.name, body.role, body.password))


@router.patch("/users/{name}")
def update_user(
    name: UserName, body: UserUpdate, admin: AdminUser, session: SessionDep, request: Request
) -> UserOut:
    """Disable or enable a user, change their role or password. 409 when it would demote or disable
    yourself, or leave no enabled admin."""
    user = users.update_user(
        session, name, disabled=body.disabled, role=body.role, password=body.password, acting=admin
    )
    request.app.state.auth_cache.clear()
    return UserOut.model_validate(user)


@router.post("/users/{name}/tokens", status_code=201)
def create_token(name: UserName, body: TokenIn, _: AdminUser, session: SessionDep) -> TokenOut:
    """A new API token for `name`; the response is the only time it is shown."""
    return TokenOut(user=name, token=users.create_token(session, name, body.name))
