"""Admin pages: projects, one project's overview and labeler statistics, settings, disabling labelers; the
iterative loops with their rounds, policy versions and leaderboard."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import APIRouter, Form, Path, Request
from fastapi.responses import RedirectResponse, Response

from rlhf.feedback import loop_state, projects, users
from rlhf.feedback.deps import CsrfChecked, PageAdmin, SessionDep
from rlhf.feedback.errors import InvalidInput
from rlhf.feedback.export import FORMATS
from rlhf.feedback.leaderboard import loop_leaderboard, project_leaderboard
from rlhf.feedback.schemas import MAX_AXES, MAX_GUIDELINES_CHARS, NAME_PATTERN, NO_NUL, PROJECT_PATTERN
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
    stats = project_stats(session, name)
    peak = max((d.votes for d in stats.votes_per_day), default=0)
    ctx = {
        "user": user,
        "project": projects.summary(session, project),
        "stats": stats,
        "leaderboard": project_leaderboard(session, name),
        "chart": _bars([(d.day, d.votes) for d in stats.votes_per_day[-60:]], peak),
        "formats": FORMATS,
        "max_guidelines_chars": MAX_GUIDELINES_CHARS,
    }
    return render(request, "admin_project.html", ctx)


def _bars(days: list[tuple[str, int]], peak: int) -> list[dict[str, object]]:
    """Bars of the votes-per-day chart (an inline SVG of 600 x 120 user units: no script, no library)."""
    width = min(600 / max(len(days), 1), 40.0)  # a few days: narrow bars, not one wall
    return [
        {"x": i * width, "w": max(width - 2, 1), "h": 100 * n / peak if peak else 0, "day": day, "n": n}
        for i, (day, n) in enumerate(days)
    ]


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
    guidelines: Annotated[str | None, Form(pattern=NO_NUL)] = None,
    axes: Annotated[str | None, Form(max_length=300, pattern=r"^[a-z_, ]*$")] = None,
) -> Response:
    """Overlap, gold rate, guidelines (Markdown) and judgement axes (comma-separated) of a project."""
    if guidelines is not None:
        # counted as the page's textarea counts them: a line break is one character (browsers send CRLF)
        guidelines = guidelines.replace("\r\n", "\n")
        if len(guidelines) > MAX_GUIDELINES_CHARS:
            raise InvalidInput(
                f"guidelines: {len(guidelines)} characters, at most {MAX_GUIDELINES_CHARS} are taken"
            )
    axis_list = None
    if axes is not None:  # as the API takes them: a name it refuses, or one too many, is said, not dropped
        axis_list = [a for a in (a.strip() for a in axes.split(",")) if a]
        wrong = [a for a in axis_list if not re.match(r"^[a-z][a-z_]{0,31}$", a)]
        if wrong:
            raise InvalidInput(
                f"axis {wrong[0][:40]!r}: a name of a-z and _ that starts with a letter, at most 32"
            )
        if len(axis_list) > MAX_AXES:
            raise InvalidInput(f"{len(axis_list)} axes: at most {MAX_AXES}")
    projects.update_project(
        session, name, overlap=overlap, gold_rate=gold_rate, guidelines=guidelines, axes=axis_list
    )
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
