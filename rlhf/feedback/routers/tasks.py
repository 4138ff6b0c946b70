"""The labeler's queue over the API: next task, a task, skip."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy import select

from rlhf.feedback import projects, queue
from rlhf.feedback.deps import CurrentUser, SessionDep, SettingsDep
from rlhf.feedback.errors import NotFound
from rlhf.feedback.models import Assignment, Project, Task
from rlhf.feedback.schemas import API_ERRORS, MAX_INT32, PROJECT_PATTERN, NextTaskOut, TaskAdminOut, TaskOut

router = APIRouter(prefix="/api/tasks", tags=["tasks"], responses=API_ERRORS)
TaskId = Annotated[int, Path(ge=1, le=MAX_INT32)]


@router.post("/next")
def next_task(
    user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    project: Annotated[str | None, Query(pattern=PROJECT_PATTERN)] = None,
) -> NextTaskOut:
    """Assign and return your next task (in `project`, or in the first project that has one for you).

    The same open task comes back until you vote on it or skip it; `task` is null when nothing is left.
    """
    candidates = (
        [projects.get_project(session, project)]
        if project
        else projects.list_projects(session, for_labelers=True)
    )
    for proj in candidates:
        task = queue.next_task(session, user, proj, stale_after_s=settings.stale_assignment_s)
        if task is not None:
            return NextTaskOut(
                task=queue.task_view(session, task, proj.name), progress=queue.progress(session, user, proj)
            )
    progress = queue.progress(session, user, candidates[0]) if len(candidates) == 1 else None
    return NextTaskOut(task=None, progress=progress)


@router.get("/{task_id}", response_model=TaskAdminOut | TaskOut)
def get_task(task_id: TaskId, user: CurrentUser, session: SessionDep) -> TaskOut:
    """A task. Labelers see only tasks assigned to them, without gold fields or policy versions."""
    row = session.execute(select(Task, Project.name).join(Project).where(Task.id == task_id)).first()
    if row is None:
        raise NotFound(f"no task {task_id}")
    task, project_name = row
    if user.role != "admin":
        mine = session.scalar(
            select(Assignment.id).where(Assignment.task_id == task_id, Assignment.user_id == user.id)
        )
        if mine is None:
            raise NotFound(f"no task {task_id}")
    return queue.task_view(session, task, project_name, admin=user.role == "admin")


@router.post("/{task_id}/skip", status_code=204)
def skip(task_id: TaskId, user: CurrentUser, session: SessionDep) -> None:
    """Give an open task back; it will not be offered to you again."""
    queue.skip(session, user, task_id)
