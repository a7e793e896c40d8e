"""Concurrency locks, circuit breakers and event-stream cursors.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import orchestrator.db.types

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "concurrency_locks",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_concurrency_locks")),
    )
    op.create_table(
        "circuit_breakers",
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=10), nullable=False),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column(
            "window_started_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("opened_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_circuit_breakers")),
    )
    op.create_table(
        "event_cursors",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column(
            "last_event_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False
        ),
        sa.Column("updated_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_event_cursors")),
    )


def downgrade() -> None:
    op.drop_table("event_cursors")
    op.drop_table("circuit_breakers")
    op.drop_table("concurrency_locks")
