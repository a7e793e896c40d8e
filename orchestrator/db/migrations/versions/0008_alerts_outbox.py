"""Alerts (once per batch, kind and task) and their delivery per channel.

Alerts are derived from the transitions in task_events after a cursor; it starts
at the newest event, so an upgrade does not alert about batches that failed before it.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import orchestrator.db.types

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
PENDING = "delivered_at IS NULL AND failed_at IS NULL"


def upgrade() -> None:
    op.create_table(
        "alerts",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("batch_pk", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("task", sa.String(length=128), nullable=False),
        sa.Column("message", JSON, nullable=False),
        sa.Column("created_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["batch_pk"], ["batches.id"],
                                name=op.f("fk_alerts_batch_pk_batches"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alerts")),
        sa.UniqueConstraint("batch_pk", "kind", "task", name="uq_alerts_batch_kind_task"),
    )
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.create_index("ix_alerts_created_at", ["created_at"], unique=False)
    op.create_table(
        "alert_deliveries",
        sa.Column("alert_id", BIG_ID, nullable=False),
        sa.Column("channel", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", orchestrator.db.types.UTCDateTime(timezone=True),
                  nullable=False),
        sa.Column("delivered_at", orchestrator.db.types.UTCDateTime(timezone=True),
                  nullable=True),
        sa.Column("failed_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["alert_id"], ["alerts.id"],
                                name=op.f("fk_alert_deliveries_alert_id_alerts"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("alert_id", "channel", name=op.f("pk_alert_deliveries")),
    )
    with op.batch_alter_table("alert_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_alert_deliveries_due", ["next_attempt_at"], unique=False,
                              postgresql_where=sa.text(PENDING), sqlite_where=sa.text(PENDING))
    op.execute(
        "INSERT INTO event_cursors (name, last_event_id, updated_at) "
        "SELECT 'alerts', COALESCE(MAX(id), 0), CURRENT_TIMESTAMP FROM task_events"
    )


def downgrade() -> None:
    op.execute("DELETE FROM event_cursors WHERE name = 'alerts'")
    with op.batch_alter_table("alert_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_alert_deliveries_due")
    op.drop_table("alert_deliveries")
    with op.batch_alter_table("alerts", schema=None) as batch_op:
        batch_op.drop_index("ix_alerts_created_at")
    op.drop_table("alerts")
