"""The open-rows index of task_log also covers task_id.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OPEN = "status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"


def upgrade() -> None:
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.drop_index("ix_task_log_open_batch")
        batch_op.create_index("ix_task_log_open_batch", ["batch_pk", "task_id"], unique=False,
                              postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))


def downgrade() -> None:
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.drop_index("ix_task_log_open_batch")
        batch_op.create_index("ix_task_log_open_batch", ["batch_pk"], unique=False,
                              postgresql_where=sa.text(OPEN), sqlite_where=sa.text(OPEN))
