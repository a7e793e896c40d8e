"""A pipeline version keeps its own concurrency cap.

The cap was read from `pipelines.concurrency`, which every sync overwrites, so a
re-sync changed the limit of batches already running. It now lives with the rest of
what a batch runs under, in `pipeline_versions`. Versions already stored take the
pipeline's current value: the one their running batches were held to.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pipeline_versions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("concurrency", sa.Integer(), nullable=True))
    op.execute("UPDATE pipeline_versions SET concurrency = (SELECT p.concurrency FROM "
               "pipelines p WHERE p.id = pipeline_versions.pipeline_id)")


def downgrade() -> None:
    with op.batch_alter_table("pipeline_versions", schema=None) as batch_op:
        batch_op.drop_column("concurrency")
