"""Production projects (A/B pairs answered only by their end users, never offered to labelers); a session
generation per user (logging out or changing the password ends every session cookie issued before); a
project's guidelines and judgement axes; a vote's per-axis judgements and rewritten answer.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 17:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("production", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("guidelines", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("axes", sa.JSON(), nullable=True))
    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("axes", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("rewrite", sa.Text(), nullable=True))
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("session_generation", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_column("session_generation")
    with op.batch_alter_table("votes", schema=None) as batch_op:
        batch_op.drop_column("rewrite")
        batch_op.drop_column("axes")
    with op.batch_alter_table("projects", schema=None) as batch_op:
        batch_op.drop_column("axes")
        batch_op.drop_column("guidelines")
        batch_op.drop_column("production")
