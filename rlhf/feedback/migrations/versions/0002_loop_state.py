"""Loop state: loop runs, finished phases per round, reward-model and policy versions with their lineage.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 11:20:00

"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _version_table(name: str, *columns: sa.Column[Any]) -> None:
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("loop_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("parent", sa.String(length=64), nullable=True),
        *columns,
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["loop_id"], ["loop_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("loop_id", "name"),
    )
    with op.batch_alter_table(name, schema=None) as batch_op:
        batch_op.create_index(batch_op.f(f"ix_{name}_loop_id"), ["loop_id"], unique=False)


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "loop_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "loop_phases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("loop_id", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=32), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["loop_id"], ["loop_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("loop_id", "round", "phase"),
    )
    with op.batch_alter_table("loop_phases", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_loop_phases_loop_id"), ["loop_id"], unique=False)
    _version_table(
        "reward_model_versions",
        sa.Column("n_votes", sa.Integer(), nullable=False),
        sa.Column("vote_ids", sa.JSON(), nullable=False),
    )
    _version_table("policy_versions", sa.Column("reward_model", sa.String(length=64), nullable=True))


def downgrade() -> None:
    """Downgrade schema."""
    for name in ("policy_versions", "reward_model_versions", "loop_phases"):
        with op.batch_alter_table(name, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f"ix_{name}_loop_id"))
        op.drop_table(name)
    op.drop_table("loop_runs")
