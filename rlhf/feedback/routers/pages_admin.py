"""Admin pages: projects, one project's overview and labeler statistics, settings, disabling labelers; the
iterative loops with their rounds, policy versions and leaderboard."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response

from rlhf.feedback import loop_state, projects, users
from rlhf.feedback.deps import CsrfChecked, PageAdmin, SessionDep
from rlhf.feedback.export import FORMATS
from rlhf.feedback.leaderboard import loop_leaderboard
from rlhf.feedback.schemas import NAME_PATTERN, PROJECT_PATTERN
from rlhf.feedback.stats import project_stats
from rlhf.feedback.web import render

router = APIRouter(prefix="/admin", include_in_schema=False)
ProjectName = Annotated[str, Path(pattern=PROJECT_PATTERN)]


@router.get("")
def index(request: Request, user: PageAdmin, session: SessionDep) -> Response:
    summaries = [projects.summary(session, p) for p in projects.list_projects(session)]
    ctx = {"user": user, "projects": summaries, "users": users.list_users(session),
           "loops": loop_state.list_loops(session)}  # fmt: skip
    return render(request, "admin_index.html", ctx)


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


@router.get("/loops/{name}")
def loop_page(request: Request, name: ProjectName, user: PageAdmin, session: SessionDep) -> Response:
    """One `rlhf loop` run: rounds (tasks, votes, phases), policy versions with lineage, the leaderboard."""
    loop = loop_state.get_loop(session, name)
    done = loop_state.finished_phases(session, loop)
    rounds = []
    for r in sorted({r for r, _ in done if r > 0}):
        tasks, votes = loop_state.round_counts(session, loop.name, r)
        rounds.append(
            {"round": r, "phases": [p for rr, p in done if rr == r], "tasks": tasks, "votes": votes}
        )
    ctx = {
        "user": user,
        "loop": loop,
        "rounds": rounds,
        "policies": loop_state.policies(session, loop),
        "reward_models": loop_state.reward_models(session, loop),
        "leaderboard": loop_leaderboard(session, loop),
    }
    return render(request, "admin_loop.html", ctx)


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
    users.update_user(session, name, disabled=disabled, acting=user)
    request.app.state.auth_cache.clear()
    return RedirectResponse(back, status_code=303)
