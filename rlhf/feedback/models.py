"""Table models of the feedback store (SQLAlchemy 2, typed). Raw votes are kept; pairs are derived on export.

The schema is created and changed only by the Alembic migrations in `rlhf/feedback/migrations/`;
a test checks that the migrated schema matches these models.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

ROLES = ("admin", "labeler")
TASK_KINDS = ("pairwise", "ranking", "rating")
CHOICES = ("A", "B", "tie", "both_bad")
# where a vote came from (Vote.source): the labeling page, the API, a production A/B vote, the simulated panel, or
# `rlhf label import --preferences` and `rlhf cai label` (preference_import.SOURCE)
SOURCES = ("web", "api", "production", "simulated", "import")
ASSIGNMENT_STATUSES = ("open", "done", "skipped", "expired")  # expired: left open, taken over (queue.py)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[int]: JSON, datetime: UTCDateTime}


class User(Base):
    """A labeler or an admin. Passwords are argon2 hashes; a disabled user can neither log in nor vote."""

    __tablename__ = "users"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    # Written into every session cookie; bumped by logout and password changes, which ends older cookies.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    """A bearer token for API clients; only its SHA-256 is stored (tokens are 256-bit random)."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64), default="")
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Project(Base):
    """A labeling project: `overlap` labelers per task; `gold_rate` of served tasks are gold items."""

    __tablename__ = "projects"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    overlap: Mapped[int] = mapped_column(Integer, default=1)
    gold_rate: Mapped[float] = mapped_column(Float, default=0.0)
    # Production A/B pairs: answered by the end user who got them, never offered to labelers.
    production: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    guidelines: Mapped[str | None] = mapped_column(Text)  # Markdown, shown with every task
    axes: Mapped[list[str] | None] = mapped_column(JSON)  # judgement axes asked beside the overall choice
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"
    __table_args__ = (UniqueConstraint("project_id", "external_id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"), index=True)
    external_id: Mapped[str | None] = mapped_column(String(128))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Completion(Base):
    """One sampled answer, with the policy version and sampling parameters that made it (its lineage)."""

    __tablename__ = "completions"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    policy: Mapped[str] = mapped_column(String(128), default="")
    sampling: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Task(Base):
    """A comparison shown to labelers: pairwise (2 completions), ranking (K) or rating (1).

    `n_assigned` counts live assignments; it is raised with a conditional UPDATE so overlap holds under races.
    """

    __tablename__ = "tasks"
    # one range per assignment count, in id order: the queue's next task is a step into the index
    __table_args__ = (Index("ix_tasks_queue", "project_id", "is_gold", "n_assigned", "id"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    is_gold: Mapped[bool] = mapped_column(Boolean, default=False)
    gold_choice: Mapped[str | None] = mapped_column(String(16))
    n_completions: Mapped[int] = mapped_column(Integer)
    n_assigned: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskCompletion(Base):
    """The completions of a task in canonical order: position 0 is answer A, 1 is B, and so on."""

    __tablename__ = "task_completions"
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    completion_id: Mapped[int] = mapped_column(ForeignKey("completions.id", ondelete="CASCADE"), index=True)


class Assignment(Base):
    """Task <-> labeler. open: shown, not yet answered; done: voted; skipped: gives the slot back; expired: left
    open too long, the slot taken over by another labeler."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("task_id", "user_id"),
        Index("ix_assignments_user_status", "user_id", "status"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16), default="open")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Vote(Base):
    """One raw judgement, never rewritten. Undo marks `retracted_at`; at most one live vote per task and labeler.

    `choice` refers to canonical positions (A = position 0); `display_order[i]` is the position shown in slot i.
    """

    __tablename__ = "votes"
    __table_args__ = (
        Index(
            "uq_votes_live",
            "task_id",
            "user_id",
            unique=True,
            sqlite_where=text("retracted_at IS NULL"),
            postgresql_where=text("retracted_at IS NULL"),
        ),
        Index("ix_votes_user_created", "user_id", "created_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    choice: Mapped[str | None] = mapped_column(String(16))
    ranking: Mapped[list[int] | None] = mapped_column()
    rating: Mapped[float | None] = mapped_column(Float)
    margin: Mapped[float | None] = mapped_column(Float)
    confidence: Mapped[float | None] = mapped_column(Float)
    note: Mapped[str | None] = mapped_column(Text)
    display_order: Mapped[list[int] | None] = mapped_column()
    time_to_vote_ms: Mapped[int | None] = mapped_column(Integer)
    idempotency_key: Mapped[str] = mapped_column(String(128), unique=True)
    source: Mapped[str] = mapped_column(String(16), default="api")
    axes: Mapped[dict[str, str] | None] = mapped_column(JSON)  # axis -> "A" | "B" | "same"
    rewrite: Mapped[str | None] = mapped_column(Text)  # the labeler's better answer (exported as SFT data)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    retracted_at: Mapped[datetime | None] = mapped_column()


class AppSetting(Base):
    """Key/value pairs the app keeps for itself (the generated signing secret)."""

    __tablename__ = "app_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RateEvent(Base):
    """One event counted by a rate limit (a vote, a login attempt) when server processes share the limit
    through the database (several workers, no Redis). Rows older than the longest window are deleted."""

    __tablename__ = "rate_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(200))
    at: Mapped[float] = mapped_column(Float)  # Unix time in seconds
    __table_args__ = (Index("ix_rate_events_key_at", "key", "at"),)


# --- the iterative loop (`rlhf loop`): its state lives here, beside the tasks and votes it makes ---------


class LoopRun(Base):
    """One `rlhf loop` run; its comparison tasks live in the project of the same name."""

    __tablename__ = "loop_runs"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class LoopPhase(Base):
    """A finished phase of one round (`generate`, `tasks`, `votes`, `reward`, `ppo`, `eval`, `register`).

    Written in the same transaction as the phase's own rows, so a restarted loop skips exactly what was done.
    """

    __tablename__ = "loop_phases"
    __table_args__ = (UniqueConstraint("loop_id", "round", "phase"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    loop_id: Mapped[int] = mapped_column(ForeignKey("loop_runs.id", ondelete="CASCADE"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str] = mapped_column(String(32))
    info: Mapped[dict[str, Any]] = mapped_column(default=dict)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)


class RewardModelVersion(Base):
    """A reward model the loop trained: the votes it learned from (ids and count) and the one it started from."""

    __tablename__ = "reward_model_versions"
    __table_args__ = (UniqueConstraint("loop_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    loop_id: Mapped[int] = mapped_column(ForeignKey("loop_runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    parent: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    n_votes: Mapped[int] = mapped_column(Integer)
    vote_ids: Mapped[list[int]] = mapped_column(default=list)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class PolicyVersion(Base):
    """A policy of the loop: the parent it was trained from, the reward model it was trained against."""

    __tablename__ = "policy_versions"
    __table_args__ = (UniqueConstraint("loop_id", "name"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    loop_id: Mapped[int] = mapped_column(ForeignKey("loop_runs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    parent: Mapped[str | None] = mapped_column(String(64))
    reward_model: Mapped[str | None] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
