"""Mapped tasks: instance rows in task_log, and the map source of a task.

A mapped task's own row (map_index -1) expands into one row per item when it
runs, so the task log is unique on (batch, task, map_index) instead of (batch, task).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column(
            "map_over",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ))
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("map_index", sa.Integer(), server_default=sa.text("-1"),
                                      nullable=False))
        batch_op.drop_constraint("uq_task_log_batch_task", type_="unique")
        batch_op.create_unique_constraint("uq_task_log_batch_task_map",
                                          ["batch_pk", "task_id", "map_index"])


def downgrade() -> None:
    op.execute("DELETE FROM task_log WHERE map_index <> -1")
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.drop_constraint("uq_task_log_batch_task_map", type_="unique")
        batch_op.create_unique_constraint("uq_task_log_batch_task", ["batch_pk", "task_id"])
        batch_op.drop_column("map_index")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("map_over")
