"""Login and logout pages (browser sessions: a signed HttpOnly SameSite=Lax cookie)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import FileResponse, RedirectResponse, Response

from rlhf.feedback.deps import CsrfChecked, SecretDep, SessionDep, SettingsDep, session_user
from rlhf.feedback.errors import RateLimited
from rlhf.feedback.models import User
from rlhf.feedback.security import (
    SESSION_COOKIE,
    LoginLimits,
    make_session_cookie,
    read_session_cookie,
    return_path,
)
from rlhf.feedback.users import authenticate, end_sessions
from rlhf.feedback.web import STATIC_DIR, render

router = APIRouter(include_in_schema=False)


@router.get("/")
def home(request: Request, session: SessionDep, secret: SecretDep) -> Response:
    claim = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    user = session_user(claim, session.get(User, claim[0]) if claim is not None else None)
    if user is None or user.disabled:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/admin" if user.role == "admin" else "/label", status_code=303)


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """The icon the pages declare (base.html), also where browsers look without one (a JSON answer opened in
    a tab): not a 404 on every first visit."""
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


# how long the browser keeps a session cookie after the session has ended (the server refuses it by then)
COOKIE_AFTER_SESSION_S = 7 * 24 * 3600
# what the login page says when a page sent the browser to it because the session had ended
ENDED = {
    "ended": "Your session has ended. Log in to go on where you were.",
    "lost": "Your session had ended, so what you last sent was not saved. Log in to send it again.",
}


@router.get("/login")
def login_page(request: Request) -> Response:
    """The login form; `next` (an app page) is where it goes after logging in."""
    after = request.query_params.get("next")
    reason = next((text for key, text in ENDED.items() if key in request.query_params), None)
    return render(request, "login.html", {"next": after if return_path(after) else None, "message": reason})


@router.post("/login", dependencies=[CsrfChecked])
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    secret: SecretDep,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
    after: Annotated[str | None, Form(alias="next", max_length=300)] = None,
) -> Response:
    after = after if return_path(after) else None  # only the app's own pages
    limits: LoginLimits = request.app.state.login_limits
    address = request.client.host if request.client else ""
    try:  # before the password check: a guess refused here costs no argon2 time
        limits.check(name, address)
    except RateLimited as e:
        message = f"Too many login attempts {e.scope}. Try again in {e.retry_after_s} s."
        headers = {"Retry-After": str(e.retry_after_s)}
        context = {"message": message, "next": after}
        return render(request, "login.html", context, status_code=429, headers=headers)
    user = authenticate(session, name, password)
    if user is None:  # counted by check: a failed attempt
        context = {"message": "Wrong name or password.", "next": after}
        return render(request, "login.html", context, status_code=401)
    limits.succeeded(name)
    home = "/admin" if user.role == "admin" else "/label"
    response = RedirectResponse(after or home, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        make_session_cookie(secret, user.id, settings.session_max_age_s, user.session_generation),
        # kept by the browser past the session's end, which the signed cookie carries: a form sent after it
        # still brings the cookie, so the login can say that the answer was not saved
        max_age=settings.session_max_age_s + COOKIE_AFTER_SESSION_S,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        path="/",
    )
    return response


@router.post("/logout", dependencies=[CsrfChecked])
def logout(request: Request, session: SessionDep, secret: SecretDep) -> Response:
    """End this session and every other one of the user's: copies of the cookie stop working too."""
    claim = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    user = session_user(claim, session.get(User, claim[0]) if claim is not None else None)
    if user is not None:
        end_sessions(session, user.id)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
