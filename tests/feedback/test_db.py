"""rlhf/feedback/db.py and the migrations: schema, pragmas, URL handling."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from rlhf.errors import ConfigError
from rlhf.feedback.db import (
    SCHEMA_HEAD,
    Database,
    current_revision,
    head_revision,
    normalize_url,
    open_database,
    table_names,
    upgrade,
)
from rlhf.feedback.models import Base

TABLES = [
    "api_tokens",
    "app_settings",
    "assignments",
    "completions",
    "loop_phases",
    "loop_runs",
    "policy_versions",
    "projects",
    "prompts",
    "reward_model_versions",
    "task_completions",
    "tasks",
    "users",
    "votes",
]


def test_migrations_create_the_schema(db: Database) -> None:
    assert current_revision(db) == head_revision() == SCHEMA_HEAD
    assert set(TABLES) <= set(table_names(db))
    assert "alembic_version" in table_names(db)


def test_migrations_match_the_models(db: Database) -> None:
    with db.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_upgrade_twice_is_harmless(db: Database) -> None:
    upgrade(db)
    assert current_revision(db) == head_revision()


def test_sqlite_runs_in_wal_with_foreign_keys(tmp_path) -> None:
    db = Database(f"sqlite:///{tmp_path}/x.db", sqlite_synchronous="FULL")
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 30000
    db.dispose()


def test_urls() -> None:
    assert normalize_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("runs/f.db") == "sqlite:///runs/f.db"
    with pytest.raises(ConfigError):
        Database("sqlite:///:memory:")
    with pytest.raises(ConfigError):
        Database("mysql://u@h/db")


def test_a_bare_path_opens_an_sqlite_store(tmp_path) -> None:
    """`--db runs/f/feedback.db`, as normalize_url reads it: the store at that file, new or existing."""
    db = open_database(str(tmp_path / "f.db"))
    assert current_revision(db) == SCHEMA_HEAD
    db.dispose()
    db = open_database(str(tmp_path / "f.db"), existing=True)
    assert "projects" in table_names(db)
    db.dispose()
    with pytest.raises(ConfigError, match="no feedback store"):
        open_database(str(tmp_path / "none.db"), existing=True)
    with pytest.raises(ConfigError, match="not a database URL"):
        open_database("postgresql://host:port/db")


def test_loop_tables_migrate_onto_an_existing_store(tmp_path) -> None:
    """A store made before the loop tables existed (revision 0001) keeps its data when upgraded to the head."""
    db = Database(f"sqlite:///{tmp_path}/old.db")
    upgrade(db, "0001")
    assert "loop_runs" not in table_names(db)
    with db.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO projects (name, overlap, gold_rate, created_at) VALUES ('p', 1, 0, '2026-01-01')"
            )
        )
    upgrade(db)
    assert current_revision(db) == SCHEMA_HEAD
    assert {"loop_runs", "loop_phases", "policy_versions", "reward_model_versions"} <= set(table_names(db))
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM projects")).scalars().all() == ["p"]
    db.dispose()


def test_a_first_migration_prints_one_line(tmp_path) -> None:
    """Alembic logs a dozen "setup plugin ..." lines as it is first imported and one per migration: in a fresh
    process with INFO logging on, creating a store says only that it migrated."""
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s %(message)s')\n"
        "from rlhf.feedback.db import Database, upgrade\n"
        f"upgrade(Database('sqlite:///{tmp_path}/f.db'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "migrated to head" in lines[0], out
