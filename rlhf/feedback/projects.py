"""Projects: create, look up, change overlap and gold rate, summarise."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from rlhf.feedback.db import db_of
from rlhf.feedback.errors import Conflict, NotFound
from rlhf.feedback.models import Project, Task, Vote
from rlhf.feedback.schemas import ProjectOut


def get_project(session: Session, name: str) -> Project:
    project = session.scalar(select(Project).where(Project.name == name))
    if project is None:
        raise NotFound(f"no project named {name!r}")
    return project


def list_projects(session: Session, for_labelers: bool = False) -> list[Project]:
    """Every project; for labelers, not the production ones (end users' A/B pairs are not theirs to see)."""
    stmt = select(Project).order_by(Project.id)
    if for_labelers:
        stmt = stmt.where(Project.production.is_(False))
    return list(session.scalars(stmt))


def create_project(session: Session, name: str, overlap: int = 1, gold_rate: float = 0.0) -> Project:
    project = Project(name=name, overlap=overlap, gold_rate=gold_rate)
    try:
        with db_of(session).write(session):
            session.add(project)
    except IntegrityError:
        raise Conflict(f"project {name!r} already exists") from None
    return project


def update_project(
    session: Session,
    name: str,
    overlap: int | None = None,
    gold_rate: float | None = None,
    guidelines: str | None = None,
    axes: list[str] | None = None,
) -> Project:
    """Change what is given; guidelines "" and axes [] clear them."""
    with db_of(session).write(session):
        project = get_project(session, name)
        if overlap is not None:
            project.overlap = overlap
        if gold_rate is not None:
            project.gold_rate = gold_rate
        if guidelines is not None:
            project.guidelines = guidelines.replace("\r\n", "\n") or None
        if axes is not None:
            project.axes = list(dict.fromkeys(axes)) or None
    return project


def summary(session: Session, project: Project) -> ProjectOut:
    """Counts of tasks, gold tasks and live votes."""
    n_tasks, n_gold = session.execute(
        select(func.count(), func.count().filter(Task.is_gold.is_(True))).where(Task.project_id == project.id)
    ).one()
    n_votes = session.scalar(
        select(func.count())
        .select_from(Vote)
        .join(Task, Task.id == Vote.task_id)
        .where(Task.project_id == project.id, Vote.retracted_at.is_(None))
    )
    return ProjectOut(
        name=project.name,
        overlap=project.overlap,
        gold_rate=project.gold_rate,
        n_tasks=int(n_tasks),
        n_gold_tasks=int(n_gold),
        n_votes=int(n_votes or 0),
        guidelines=project.guidelines,
        axes=project.axes or [],
        production=project.production,
        created_at=project.created_at,
    )
