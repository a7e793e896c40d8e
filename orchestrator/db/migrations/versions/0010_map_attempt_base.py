"""Attempts of a mapped task's instances keep rising across expansions.

A retry deletes a mapped task's instances and its rerun expands again; the new
instances are numbered on from the highest attempt the old ones reached (kept on
the mapped task's own row), so a handler still running from before stays fenced.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.add_column(sa.Column("map_attempt_base", sa.Integer(),
                                      server_default=sa.text("0"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.drop_column("map_attempt_base")
