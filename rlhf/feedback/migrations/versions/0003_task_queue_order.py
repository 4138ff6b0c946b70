"""The task queue's index ends with the task id: the queue reads the open tasks of one assignment count in id
order (rlhf.feedback.queue._candidates), a step into the index instead of a sort of every open task.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 12:00:00

"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_queue")
        batch_op.create_index("ix_tasks_queue", ["project_id", "is_gold", "n_assigned", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_queue")
        batch_op.create_index("ix_tasks_queue", ["project_id", "is_gold", "n_assigned"], unique=False)
