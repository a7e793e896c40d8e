"""Per pipeline version: its time zone, schedule, deadline, alert events and file
expectations (what a batch runs under besides its graph).

Every version already in `tasks` gets a row with no rules, so batches of existing
pipelines behave as before.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import orchestrator.db.types

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "pipeline_versions",
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("timezone", sa.String(length=64), nullable=False),
        sa.Column("schedule", JSON, nullable=True),
        sa.Column("deadline", JSON, nullable=True),
        sa.Column("alerts", JSON, nullable=True),
        sa.Column("files", JSON, nullable=True),
        sa.Column("created_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["pipeline_id"], ["pipelines.id"],
                                name=op.f("fk_pipeline_versions_pipeline_id_pipelines"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("pipeline_id", "version", name=op.f("pk_pipeline_versions")),
    )
    op.execute(
        "INSERT INTO pipeline_versions (pipeline_id, version, timezone, created_at) "
        "SELECT t.pipeline_id, t.version, 'UTC', p.updated_at FROM "
        "(SELECT DISTINCT pipeline_id, version FROM tasks) t "
        "JOIN pipelines p ON p.id = t.pipeline_id"
    )


def downgrade() -> None:
    op.drop_table("pipeline_versions")
