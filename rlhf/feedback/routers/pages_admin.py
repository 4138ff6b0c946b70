"""Admin pages: projects, one project's overview and labeler statistics, settings, disabling labelers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response

from rlhf.feedback import projects, users
from rlhf.feedback.deps import CsrfChecked, PageAdmin, SessionDep
from rlhf.feedback.export import FORMATS
from rlhf.feedback.schemas import NAME_PATTERN, PROJECT_PATTERN
from rlhf.feedback.stats import project_stats
from rlhf.feedback.web import render

router = APIRouter(prefix="/admin", include_in_schema=False)
ProjectName = Annotated[str, Path(pattern=PROJECT_PATTERN)]


@router.get("")
def index(request: Request, user: PageAdmin, session: SessionDep) -> Response:
    summaries = [projects.summary(session, p) for p in projects.list_projects(session)]
    return render(
        request, "admin_index.html", {"user": user, "projects": summaries, "users": users.list_users(session)}
    )


@router.get("/projects/{name}")
def project_page(request: Request, name: ProjectName, user: PageAdmin, session: SessionDep) -> Response:
    project = projects.get_project(session, name)
    ctx = {
        "user": user,
        "project": projects.summary(session, project),
        "stats": project_stats(session, name),
        "formats": FORMATS,
    }
    return render(request, "admin_project.html", ctx)


@router.post("/projects/{name}/settings", dependencies=[CsrfChecked])
def project_settings(
    name: ProjectName,
    _: PageAdmin,
    session: SessionDep,
    overlap: Annotated[int, Form(ge=1, le=100)],
    gold_rate: Annotated[float, Form(ge=0, le=1)],
) -> Response:
    projects.update_project(session, name, overlap=overlap, gold_rate=gold_rate)
    return RedirectResponse(f"/admin/projects/{name}", status_code=303)


@router.post("/users/{name}/disabled", dependencies=[CsrfChecked])
def set_disabled(
    request: Request,
    name: Annotated[str, Path(pattern=NAME_PATTERN)],
    user: PageAdmin,
    session: SessionDep,
    disabled: Annotated[bool, Form()],
    back: Annotated[str, Form(pattern=r"^/admin(/projects/[A-Za-z0-9_.-]+)?$")] = "/admin",
) -> Response:
    """Disable (or enable again) a user; a disabled user can neither log in, nor use a token, nor vote."""
    if name == user.name and disabled:
        return RedirectResponse(back, status_code=303)  # an admin cannot lock themselves out
    users.update_user(session, name, disabled=disabled)
    request.app.state.auth_cache.clear()
    return RedirectResponse(back, status_code=303)
