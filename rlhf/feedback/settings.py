"""Settings of the labeling app, read from the environment (RLHF_LABEL_<FIELD>), overridable in code."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from rlhf.config.env import EnvSettings


class Settings(EnvSettings):
    """Every field can be set by an environment variable named RLHF_LABEL_<FIELD> (upper case)."""

    env_prefix: ClassVar[str] = "RLHF_LABEL_"
    label: ClassVar[str] = "label"

    db: str = Field("sqlite:///feedback.db", description="Database URL: sqlite:///FILE or postgresql://...")
    secret: str | None = Field(
        None,
        description="Key that signs session cookies and CSRF tokens; generated and kept in the db if unset",
    )
    undo_window_s: float = Field(
        60.0, ge=0, description="Seconds during which a labeler may undo their last vote"
    )
    stale_assignment_s: float = Field(
        3600.0,
        ge=0,
        description="Seconds after which a task a labeler opened and left unanswered goes to another labeler "
        "who has nothing else (a disabled labeler's at once); 0 keeps it theirs",
    )
    votes_per_minute: int = Field(
        120, ge=0, description="Per-labeler limit on new votes per minute (429 beyond it); 0 turns it off"
    )
    max_body_bytes: int = Field(
        64 * 1024, ge=1024, description="Largest request body accepted (413 beyond it)"
    )
    max_import_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest candidate import (API body or file) accepted"
    )
    auth_cache_s: float = Field(
        5.0, ge=0, description="Seconds an API token's user is cached in memory (0: look it up every request)"
    )
    login_attempts_per_address: int = Field(
        30, ge=0, description="Login attempts one client address may make per login window; 0 turns it off"
    )
    login_failures_per_account: int = Field(
        10, ge=0, description="Failed logins one account name may take per login window; 0 turns it off"
    )
    login_window_s: float = Field(900.0, gt=0, description="Seconds of the sliding window of login limits")
    session_max_age_s: int = Field(12 * 3600, ge=60, description="Lifetime of a browser login session")
    cookie_secure: bool = Field(False, description="Mark cookies Secure (set when served over HTTPS)")
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        "NORMAL",
        description="SQLite synchronous mode in WAL: NORMAL survives a killed process, FULL also a power cut",
    )
    redis_url: str | None = Field(
        None,
        description="Redis (redis://HOST:6379/0) that several server processes share rate limits, login "
        "limits and token revocations through; unset: in memory (one process) or the database (--workers > 1)",
    )
    workers: int = Field(
        1,
        ge=1,
        le=256,
        description="Server processes sharing this store (set by `rlhf label serve --workers`)",
    )
    migrate_on_start: bool = Field(True, description="Run the Alembic migrations when the server starts")
