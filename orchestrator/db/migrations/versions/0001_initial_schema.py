"""Initial schema: pipelines, tasks, task_dependencies, batches, task_log, task_events.

Revision ID: 0001
Revises:
Create Date: 2026-11-22 23:45:47.261957
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

import orchestrator.db.types

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "pipelines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "definition",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("created_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pipelines")),
        sa.UniqueConstraint("name", name=op.f("uq_pipelines_name")),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("pipeline_version", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.String(length=128), nullable=False),
        sa.Column(
            "params",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column(
            "status",
            sa.Enum(
                "RUNNING",
                "SUCCESS",
                "FAILED",
                "CANCELLED",
                name="batch_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("created_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column("finished_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("deadline_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_batches_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("pipeline_id", "batch_id", name="uq_batches_pipeline_batch_id"),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index("ix_batches_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_batches_open",
            ["status"],
            unique=False,
            postgresql_where=sa.text("status = 'RUNNING'"),
            sqlite_where=sa.text("status = 'RUNNING'"),
        )

    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("pipeline_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("handler", sa.String(length=128), nullable=False),
        sa.Column(
            "config",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_initial_delay_s", sa.Float(), nullable=False),
        sa.Column("retry_backoff_factor", sa.Float(), nullable=False),
        sa.Column("retry_max_delay_s", sa.Float(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=False),
        sa.Column(
            "trigger_rule",
            sa.Enum(
                "all_success",
                "all_done",
                "one_failed",
                name="trigger_rule",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("gcs_bucket", sa.String(length=222), nullable=True),
        sa.Column("gcs_pattern", sa.String(length=1024), nullable=True),
        sa.CheckConstraint("max_attempts >= 1", name=op.f("ck_tasks_max_attempts_positive")),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["pipelines.id"],
            name=op.f("fk_tasks_pipeline_id_pipelines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint(
            "pipeline_id", "version", "name", name="uq_tasks_pipeline_version_name"
        ),
    )
    op.create_table(
        "task_dependencies",
        sa.Column("child_task_id", sa.Integer(), nullable=False),
        sa.Column("parent_task_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["child_task_id"],
            ["tasks.id"],
            name=op.f("fk_task_dependencies_child_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["parent_task_id"],
            ["tasks.id"],
            name=op.f("fk_task_dependencies_parent_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "child_task_id", "parent_task_id", name=op.f("pk_task_dependencies")
        ),
    )
    with op.batch_alter_table("task_dependencies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_task_dependencies_parent_task_id"), ["parent_task_id"], unique=False
        )

    op.create_table(
        "task_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_pk", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("from_status", sa.String(length=20), nullable=True),
        sa.Column("to_status", sa.String(length=20), nullable=False),
        sa.Column("at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.Column(
            "detail",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.ForeignKeyConstraint(
            ["batch_pk"],
            ["batches.id"],
            name=op.f("fk_task_events_batch_pk_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_task_events_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_events")),
    )
    with op.batch_alter_table("task_events", schema=None) as batch_op:
        batch_op.create_index("ix_task_events_batch", ["batch_pk", "id"], unique=False)

    op.create_table(
        "task_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("batch_pk", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "PENDING",
                "QUEUED",
                "RUNNING",
                "RETRYING",
                "SUCCESS",
                "ERROR",
                "UPSTREAM_FAILED",
                "SKIPPED",
                "CANCELLED",
                name="task_status",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("retry_base", sa.Integer(), nullable=False),
        sa.Column(
            "trigger_rule",
            sa.Enum(
                "all_success",
                "all_done",
                "one_failed",
                name="trigger_rule",
                native_enum=False,
                create_constraint=True,
                length=20,
            ),
            nullable=False,
        ),
        sa.Column("pending_parents", sa.Integer(), nullable=False),
        sa.Column("failed_parents", sa.Integer(), nullable=False),
        sa.Column("skipped_parents", sa.Integer(), nullable=False),
        sa.Column("waiting_for_file", sa.Boolean(), nullable=False),
        sa.Column(
            "input",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column(
            "output",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("queued_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("dispatched_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("dispatch_count", sa.Integer(), nullable=False),
        sa.Column("started_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column(
            "lease_expires_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column(
            "next_attempt_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("finished_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=True),
        sa.Column("updated_at", orchestrator.db.types.UTCDateTime(timezone=True), nullable=False),
        sa.CheckConstraint("attempt >= 1", name=op.f("ck_task_log_attempt_positive")),
        sa.ForeignKeyConstraint(
            ["batch_pk"],
            ["batches.id"],
            name=op.f("fk_task_log_batch_pk_batches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_task_log_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_task_log")),
        sa.UniqueConstraint("batch_pk", "task_id", name="uq_task_log_batch_task"),
    )
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.create_index(
            "ix_task_log_open_batch",
            ["batch_pk"],
            unique=False,
            postgresql_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
            sqlite_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
        )
        batch_op.create_index(
            "ix_task_log_open_status",
            ["status"],
            unique=False,
            postgresql_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
            sqlite_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
        )
        batch_op.create_index(
            "ix_task_log_running_task",
            ["task_id"],
            unique=False,
            postgresql_where=sa.text("status = 'RUNNING'"),
            sqlite_where=sa.text("status = 'RUNNING'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("task_log", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_task_log_running_task",
            postgresql_where=sa.text("status = 'RUNNING'"),
            sqlite_where=sa.text("status = 'RUNNING'"),
        )
        batch_op.drop_index(
            "ix_task_log_open_status",
            postgresql_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
            sqlite_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
        )
        batch_op.drop_index(
            "ix_task_log_open_batch",
            postgresql_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
            sqlite_where=sa.text("status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"),
        )

    op.drop_table("task_log")
    with op.batch_alter_table("task_events", schema=None) as batch_op:
        batch_op.drop_index("ix_task_events_batch")

    op.drop_table("task_events")
    with op.batch_alter_table("task_dependencies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_task_dependencies_parent_task_id"))

    op.drop_table("task_dependencies")
    op.drop_table("tasks")
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index(
            "ix_batches_open",
            postgresql_where=sa.text("status = 'RUNNING'"),
            sqlite_where=sa.text("status = 'RUNNING'"),
        )
        batch_op.drop_index("ix_batches_created_at")

    op.drop_table("batches")
    op.drop_table("pipelines")
