"""Login and logout pages (browser sessions: a signed HttpOnly SameSite=Lax cookie)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from rlhf.feedback.deps import CsrfChecked, SecretDep, SessionDep, SettingsDep
from rlhf.feedback.models import User
from rlhf.feedback.security import SESSION_COOKIE, make_session_cookie, read_session_cookie
from rlhf.feedback.users import authenticate
from rlhf.feedback.web import render

router = APIRouter(include_in_schema=False)


@router.get("/")
def home(request: Request, session: SessionDep, secret: SecretDep) -> Response:
    uid = read_session_cookie(secret, request.cookies.get(SESSION_COOKIE))
    user = session.get(User, uid) if uid is not None else None
    if user is None or user.disabled:
        return RedirectResponse("/login", status_code=303)
    return RedirectResponse("/admin" if user.role == "admin" else "/label", status_code=303)


@router.get("/login")
def login_page(request: Request) -> Response:
    return render(request, "login.html")


@router.post("/login", dependencies=[CsrfChecked])
def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    secret: SecretDep,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=256)],
) -> Response:
    user = authenticate(session, name, password)
    if user is None:
        return render(request, "login.html", {"message": "Wrong name or password."}, status_code=401)
    response = RedirectResponse("/admin" if user.role == "admin" else "/label", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        make_session_cookie(secret, user.id, settings.session_max_age_s),
        max_age=settings.session_max_age_s,
        httponly=True,
        samesite="lax",
        secure=settings.cookie_secure,
        path="/",
    )
    return response


@router.post("/logout", dependencies=[CsrfChecked])
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
