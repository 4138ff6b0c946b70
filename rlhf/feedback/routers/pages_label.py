"""The labeler's pages: projects, the task in front of them, vote, skip, undo."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData

from rlhf.feedback import projects, queue
from rlhf.feedback import votes as store
from rlhf.feedback.deps import CsrfChecked, LimiterDep, PageUser, SessionDep, SettingsDep, WriterDep
from rlhf.feedback.errors import Conflict, InvalidInput, NotFound
from rlhf.feedback.metrics import VOTES
from rlhf.feedback.models import Project, Task, Vote
from rlhf.feedback.schemas import MAX_INT32, MAX_NOTE_CHARS, MAX_TEXT_CHARS, PROJECT_PATTERN, VoteIn
from rlhf.feedback.web import render

router = APIRouter(prefix="/label", include_in_schema=False)
ProjectName = Annotated[str, Path(pattern=PROJECT_PATTERN)]
RATING_SCALE = range(1, 8)  # the web form's rating scale: 1 (worst) .. 7 (best)
AXIS_KEYS = ("q", "e", "r", "y", "i", "o", "p", "z")  # clear of the page's other shortcuts
# Messages are passed as codes, so a crafted link cannot put its own text on the page.
MESSAGES = {
    "undone": "Vote undone: answer this task again.",
    "conflict": "That vote was not recorded: you already answered this task, or it has all its labelers.",
    "undo_failed": "Too late to undo that vote.",
    "unskipped": "Skip undone: here is the task again.",
    "unskip_failed": "That task cannot come back: it has all its labelers now.",
}


@router.get("")
def index(request: Request, user: PageUser, session: SessionDep) -> Response:
    rows = [
        (p.name, queue.progress(session, user, p)) for p in projects.list_projects(session, for_labelers=True)
    ]
    return render(request, "label_index.html", {"user": user, "projects": rows})


@router.get("/{project}")
def task_page(
    request: Request,
    project: ProjectName,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    voted: Annotated[int | None, Query(ge=1, le=MAX_INT32)] = None,
    skipped: Annotated[int | None, Query(ge=1, le=MAX_INT32)] = None,
) -> Response:
    proj = projects.get_project(session, project)
    undo_vote = None
    if voted is not None:
        vote = session.get(Vote, voted)
        window = timedelta(seconds=settings.undo_window_s)
        if (
            vote
            and vote.user_id == user.id
            and vote.retracted_at is None
            and _in_project(session, proj, vote.task_id)
        ):
            if datetime.now(timezone.utc) - vote.created_at <= window:
                undo_vote = vote.id
    # the undo buttons offer only this project's own vote and skip (a link may name another's)
    skipped = skipped if skipped is not None and _in_project(session, proj, skipped) else None
    task = queue.next_task(session, user, proj, stale_after_s=settings.stale_assignment_s)
    ctx: dict[str, Any] = {
        "user": user,
        "project": proj.name,
        "progress": queue.progress(session, user, proj),
        "undo_vote": undo_vote,
        "undo_skip": skipped,
        "guidelines": proj.guidelines,
        "undo_window_s": int(settings.undo_window_s),
        "message": MESSAGES.get(request.query_params.get("msg", "")),
    }
    if task is None:
        return render(request, "done.html", ctx)
    view = queue.task_view(session, task, proj.name)
    texts = {c.position: c.text for c in view.completions}
    slot_values = ["A" if pos == 0 else "B" for pos in view.display_order]
    ctx.update(
        axes=(proj.axes or []) if task.kind == "pairwise" else [],
        axis_keys=AXIS_KEYS,
        axis_columns=[("1", slot_values[0]), ("same", "same"), ("2", slot_values[-1])],
        task=view,
        slots=[(i + 1, pos, texts[pos]) for i, pos in enumerate(view.display_order)],
        display_order=",".join(str(p) for p in view.display_order),
        idempotency_key=f"web-{uuid.uuid4().hex}",
        rating_scale=list(RATING_SCALE),
        max_rewrite_chars=MAX_TEXT_CHARS,  # the body limit of a vote fits them (schemas.MAX_VOTE_BYTES)
        max_note_chars=MAX_NOTE_CHARS,
    )
    return render(request, "task.html", ctx)


def _vote_from_form(form: FormData, project: str) -> VoteIn:
    """The vote of `project`'s task page form (a task of another project is refused); rank_<position> fields
    carry a ranking."""

    def value(name: str) -> str | None:
        v = form.get(name)
        return v if isinstance(v, str) and v != "" else None

    def number(name: str) -> int | None:  # the form's numbers come as text
        v = value(name)
        return None if v is None else int(v)

    try:
        rating = number("rating")
        if rating is not None and rating not in RATING_SCALE:
            raise ValueError(f"rating must be {RATING_SCALE.start}..{RATING_SCALE.stop - 1}")
        order = value("display_order")
        ranks = {int(k[5:]): int(v) for k, v in form.items() if k.startswith("rank_") and isinstance(v, str)}
        if sorted(ranks) != list(range(len(ranks))):  # one rank per position 0..K-1, none made up
            raise ValueError("rank fields must name the positions 0..K-1")
        fields: dict[str, Any] = {
            "task_id": number("task_id"),
            "project": project,
            "choice": value("choice"),
            "rating": rating,
            "note": (value("note") or "").replace("\r\n", "\n") or None,  # browsers send CRLF line ends
            "display_order": [int(p) for p in order.split(",")] if order else None,
            "ranking": [ranks[p] for p in range(len(ranks))] if ranks else None,
            "time_to_vote_ms": number("time_ms"),
            "axes": {k[5:]: v for k, v in form.items() if k.startswith("axis_") and isinstance(v, str)}
            or None,
            "rewrite": (value("rewrite") or "").replace("\r\n", "\n").strip() or None,
            "idempotency_key": value("idempotency_key"),
        }
        return VoteIn.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidInput(f"the vote form is incomplete or malformed: {where}: {err['msg']}") from None
    except ValueError as e:
        raise InvalidInput(f"the vote form is incomplete or malformed: {e}") from None


@router.post("/{project}/vote", dependencies=[CsrfChecked])
async def vote(
    request: Request, project: ProjectName, user: PageUser, limiter: LimiterDep, writer: WriterDep
) -> Response:
    data = _vote_from_form(await request.form(), project)
    await limiter.take_async(user.id)
    try:
        recorded = await writer.record(user, data, "web")
    except BaseException as e:
        await limiter.give_back_async(user.id)
        if isinstance(e, Conflict):
            return RedirectResponse(f"/label/{project}?msg=conflict", status_code=303)
        raise
    if recorded.created:
        VOTES.labels("web").inc()
    else:
        await limiter.give_back_async(user.id)
    return RedirectResponse(f"/label/{project}?voted={recorded.vote.id}", status_code=303)


@router.post("/{project}/skip", dependencies=[CsrfChecked])
def skip(
    project: ProjectName,
    user: PageUser,
    session: SessionDep,
    task_id: Annotated[int, Form(ge=1, le=MAX_INT32)],
) -> Response:
    if not _in_project(session, projects.get_project(session, project), task_id):
        raise NotFound(f"task {task_id} is not in project {project!r}")
    try:
        queue.skip(session, user, task_id)
    except NotFound:
        return RedirectResponse(f"/label/{project}", status_code=303)  # a double click: nothing to do
    return RedirectResponse(f"/label/{project}?skipped={task_id}", status_code=303)


@router.post("/{project}/unskip", dependencies=[CsrfChecked])
def unskip(
    project: ProjectName,
    user: PageUser,
    session: SessionDep,
    task_id: Annotated[int, Form(ge=1, le=MAX_INT32)],
) -> Response:
    """Undo a skip: the task comes back as the open one, if it still has room for this labeler."""
    if not _in_project(session, projects.get_project(session, project), task_id):
        raise NotFound(f"task {task_id} is not in project {project!r}")
    try:
        queue.unskip(session, user, task_id)
    except (Conflict, NotFound):
        return RedirectResponse(f"/label/{project}?msg=unskip_failed", status_code=303)
    return RedirectResponse(f"/label/{project}?msg=unskipped", status_code=303)


@router.get("/{project}/help")
def help_page(request: Request, project: ProjectName, user: PageUser, session: SessionDep) -> Response:
    """The project's guidelines, its judgement axes and the keyboard shortcuts."""
    proj = projects.get_project(session, project)
    if proj.production:
        queue.next_task(session, user, proj)  # raises Forbidden: not a labelers' project
    ctx = {"user": user, "project": proj.name, "guidelines": proj.guidelines, "axes": proj.axes or []}
    return render(request, "help.html", {**ctx, "axis_keys": AXIS_KEYS})


@router.post("/{project}/undo", dependencies=[CsrfChecked])
def undo(
    project: ProjectName,
    user: PageUser,
    session: SessionDep,
    settings: SettingsDep,
    vote_id: Annotated[int, Form(ge=1, le=MAX_INT32)],
) -> Response:
    try:
        store.undo(session, user, settings.undo_window_s, vote_id, projects.get_project(session, project))
    except (Conflict, NotFound):
        return RedirectResponse(f"/label/{project}?msg=undo_failed", status_code=303)
    return RedirectResponse(f"/label/{project}?msg=undone", status_code=303)


def _in_project(session: Session, proj: Project, task_id: int) -> bool:
    """Whether task `task_id` exists and belongs to `proj`."""
    task = session.get(Task, task_id)
    return task is not None and task.project_id == proj.id
