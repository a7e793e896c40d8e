"""Schedule state per pipeline (paused, the latest tick handled), across its versions.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import orchestrator.db.types

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("paused", sa.Boolean(), nullable=False),
        sa.Column("last_tick_at", orchestrator.db.types.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("last_batch_id", sa.String(length=128), nullable=True),
        sa.Column("last_started_at", orchestrator.db.types.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("updated_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["pipeline_id"], ["pipelines.id"],
                                name=op.f("fk_schedules_pipeline_id_pipelines"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pipeline_id", name=op.f("pk_schedules")),
    )


def downgrade() -> None:
    op.drop_table("schedules")
