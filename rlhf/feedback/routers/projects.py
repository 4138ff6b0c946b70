"""Projects (admins): create, settings, import candidates, export preferences, statistics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from fastapi.responses import Response

from rlhf.data.jsonl import jsonl_line
from rlhf.feedback import projects
from rlhf.feedback.deps import AdminUser, CurrentUser, SessionDep
from rlhf.feedback.export import export_records
from rlhf.feedback.importer import import_candidates
from rlhf.feedback.schemas import (
    API_ERRORS,
    PROJECT_PATTERN,
    ExportFormat,
    ImportIn,
    ImportOut,
    ProjectIn,
    ProjectOut,
    ProjectUpdate,
    StatsOut,
)
from rlhf.feedback.stats import project_stats

router = APIRouter(prefix="/api/projects", tags=["projects"], responses=API_ERRORS)
ProjectName = Annotated[str, Path(pattern=PROJECT_PATTERN)]


@router.get("")
def list_projects(user: CurrentUser, session: SessionDep) -> list[ProjectOut]:
    """Every project (for labelers: not the production ones)."""
    listed = projects.list_projects(session, for_labelers=user.role != "admin")
    return [projects.summary(session, p) for p in listed]


@router.post("", status_code=201)
def create_project(body: ProjectIn, _: AdminUser, session: SessionDep) -> ProjectOut:
    project = projects.create_project(session, body.name, body.overlap, body.gold_rate)
    return projects.summary(session, project)


@router.get("/{name}")
def get_project(name: ProjectName, _: AdminUser, session: SessionDep) -> ProjectOut:
    return projects.summary(session, projects.get_project(session, name))


@router.patch("/{name}")
def update_project(name: ProjectName, body: ProjectUpdate, _: AdminUser, session: SessionDep) -> ProjectOut:
    """Change the overlap (labelers per task), the gold rate (chance the next task is gold), the guidelines
    (Markdown; "" clears them) or the judgement axes ([] clears them)."""
    project = projects.update_project(session, name, body.overlap, body.gold_rate, body.guidelines, body.axes)
    return projects.summary(session, project)


@router.post("/{name}/import", status_code=201)
def import_into(name: ProjectName, body: ImportIn, _: AdminUser, session: SessionDep) -> ImportOut:
    """Add prompts, completions and comparison tasks from candidate generations (and gold items).

    Creates the project if it does not exist. Rows whose prompt_id the project holds already are skipped.
    """
    out = import_candidates(
        session,
        name,
        body.candidates,
        task_kind=body.task_kind,
        gold=body.gold,
        overlap=body.overlap,
        gold_rate=body.gold_rate,
    )
    if body.guidelines is not None or body.axes is not None:
        projects.update_project(session, name, guidelines=body.guidelines, axes=body.axes)
    return out


@router.get(
    "/{name}/export",
    response_class=Response,
    responses={200: {"content": {"application/x-ndjson": {}}, "description": "one JSON record per line"}},
)
def export(
    name: ProjectName, _: AdminUser, session: SessionDep, format: Annotated[ExportFormat, Query()] = "votes"
) -> Response:
    """Live votes as preference records (JSON Lines): votes, pairs (TRL), ranking or rating."""
    records = export_records(session, name, format)
    body = "".join(jsonl_line(r) + "\n" for r in records)
    disposition = f'attachment; filename="{name}.{format}.jsonl"'
    return Response(body, media_type="application/x-ndjson", headers={"Content-Disposition": disposition})


@router.get("/{name}/stats")
def stats(name: ProjectName, _: AdminUser, session: SessionDep) -> StatsOut:
    """Per-labeler votes, agreement, accuracy on gold, median time; Krippendorff's alpha of the project."""
    return project_stats(session, name)
