"""The metadata database: typed SQLAlchemy 2.0 models.

The DAG (`tasks`, `task_dependencies`) is versioned: a sync that changes a
pipeline adds a new version instead of editing the old one in place, so a batch
that is running keeps the exact graph it started with.

`task_log` carries, per child row, the counters that make promotion exactly-once:
`pending_parents` is decremented inside each parent's own terminal transaction and
the decrement that reaches zero promotes the child (row locks serialize them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from orchestrator.db.types import JSONType, UTCDateTime
from orchestrator.status import BatchStatus, TaskStatus, TriggerRule

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY, so big ids are BIGINT elsewhere only.
BigId = BigInteger().with_variant(Integer(), "sqlite")

OPEN_STATUSES_SQL = "status IN ('PENDING', 'QUEUED', 'RUNNING', 'RETRYING')"


def _enum(cls: type, name: str) -> Enum:
    # Stored by value, as a VARCHAR with a CHECK, so adding a state is a plain migration.
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=20,
        values_callable=lambda e: [m.value for m in e],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Pipeline(Base):
    __tablename__ = "pipelines"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    version: Mapped[int] = mapped_column(Integer, default=1)
    definition_hash: Mapped[str] = mapped_column(String(64))
    definition: Mapped[dict[str, Any]] = mapped_column(JSONType)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    # The file name it was last synced from (None if built in code): another file
    # naming the same pipeline replaces it only when asked to.
    source_file: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("pipeline_id", "version", "name", name="uq_tasks_pipeline_version_name"),
        CheckConstraint("max_attempts >= 1", name="max_attempts_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    handler: Mapped[str] = mapped_column(String(128))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    retry_initial_delay_s: Mapped[float] = mapped_column(Float, default=10.0)
    retry_backoff_factor: Mapped[float] = mapped_column(Float, default=2.0)
    retry_max_delay_s: Mapped[float] = mapped_column(Float, default=600.0)
    timeout_s: Mapped[float] = mapped_column(Float, default=600.0)
    trigger_rule: Mapped[TriggerRule] = mapped_column(_enum(TriggerRule, "trigger_rule"))
    concurrency: Mapped[int | None] = mapped_column(Integer)
    # A mapped task: {"gcs_prefix": …} or {"parent_output": "parent.key"}, "max_instances".
    map_over: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    gcs_bucket: Mapped[str | None] = mapped_column(String(222))
    gcs_pattern: Mapped[str | None] = mapped_column(String(1024))
    # Fixed at sync, as the version itself is: the task's place in the version's
    # topological order (0 first; parents before children, ties in the order of the
    # definition) and its parents' names, sorted, as JSON text. The status document
    # lists the tasks in that order with those names, read straight from the row.
    # (The defaults only let the migration add the columns in place.)
    position: Mapped[int] = mapped_column(Integer, server_default="0")
    depends_on_json: Mapped[str] = mapped_column(Text, server_default="[]")


class TaskDependency(Base):
    __tablename__ = "task_dependencies"

    child_task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    parent_task_id: Mapped[int] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("pipeline_id", "batch_id", name="uq_batches_pipeline_batch_id"),
        Index(
            "ix_batches_open",
            "status",
            postgresql_where=text("status = 'RUNNING'"),
            sqlite_where=text("status = 'RUNNING'"),
        ),
        Index("ix_batches_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pipeline_id: Mapped[int] = mapped_column(ForeignKey("pipelines.id", ondelete="CASCADE"))
    pipeline_version: Mapped[int] = mapped_column(Integer)
    batch_id: Mapped[str] = mapped_column(String(128))
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus, "batch_status"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # When a `deadline_warning` alerts (cleared once it has).
    warn_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The schedule tick this batch runs for; NULL for a batch started by a file or message.
    logical_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class TaskLog(Base):
    __tablename__ = "task_log"
    __table_args__ = (
        UniqueConstraint("batch_pk", "task_id", "map_index", name="uq_task_log_batch_task_map"),
        CheckConstraint("attempt >= 1", name="attempt_positive"),
        # Small partial indexes: the sweeper and "is the batch finished?" only ever look
        # at open rows, which are a sliver of a task log of millions.
        Index(
            "ix_task_log_open_status",
            "status",
            postgresql_where=text(OPEN_STATUSES_SQL),
            sqlite_where=text(OPEN_STATUSES_SQL),
        ),
        # With task_id in it, a planner that picks this index for a lookup by key
        # (fresh rows have no statistics) still finds the row directly instead of
        # scanning every open row of the batch, which is quadratic over a fan-in.
        Index(
            "ix_task_log_open_batch",
            "batch_pk",
            "task_id",
            postgresql_where=text(OPEN_STATUSES_SQL),
            sqlite_where=text(OPEN_STATUSES_SQL),
        ),
        Index(
            "ix_task_log_running_task",
            "task_id",
            postgresql_where=text("status = 'RUNNING'"),
            sqlite_where=text("status = 'RUNNING'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    status: Mapped[TaskStatus] = mapped_column(_enum(TaskStatus, "task_status"))
    # -1 for a task's own row; 0..n-1 for the instances a mapped task expanded into.
    map_index: Mapped[int] = mapped_column(Integer, default=-1, server_default=text("-1"))
    # The attempt being run, or the next one to run while QUEUED/RETRYING.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Attempts used before the current run (a manual retry starts a fresh budget
    # but keeps numbering up, so older attempts stay fenced off).
    retry_base: Mapped[int] = mapped_column(Integer, default=0)
    # On a mapped task's own row: the highest attempt its instances of earlier
    # expansions reached. A new expansion numbers its instances on from there, so an
    # (instance, attempt) pair is never used twice and a zombie stays fenced off.
    map_attempt_base: Mapped[int] = mapped_column(Integer, default=0,
                                                  server_default=text("0"))
    trigger_rule: Mapped[TriggerRule] = mapped_column(_enum(TriggerRule, "trigger_rule"))
    pending_parents: Mapped[int] = mapped_column(Integer, default=0)
    failed_parents: Mapped[int] = mapped_column(Integer, default=0)
    skipped_parents: Mapped[int] = mapped_column(Integer, default=0)
    # A root with a GCS trigger waits for its object (or an explicit force).
    waiting_for_file: Mapped[bool] = mapped_column(Boolean, default=False)
    input: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    output: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    dispatched_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    dispatch_count: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class TaskEvent(Base):
    """Append-only: one row per transition. The audit trail and the event stream."""

    __tablename__ = "task_events"
    __table_args__ = (Index("ix_task_events_batch", "batch_pk", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    # NULL for batch-level events (started, finished, cancelled).
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    attempt: Mapped[int | None] = mapped_column(Integer)
    from_status: Mapped[str | None] = mapped_column(String(20))
    to_status: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(UTCDateTime())
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONType)


class TaskAttempt(Base):
    """One row per attempt that ran a handler: what the worker saw of it.

    Written by the worker that ran it (while it runs, now and then, and in the same
    transaction as its result), or by the sweeper when that worker went silent. The
    task log keeps the task's state; this keeps each attempt's story: its outcome,
    its error with a traceback, and what it logged and printed (bounded in size).
    """

    __tablename__ = "task_attempts"
    __table_args__ = (
        UniqueConstraint("batch_pk", "task_id", "map_index", "attempt",
                         name="uq_task_attempts_batch_task_map_attempt"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    map_index: Mapped[int] = mapped_column(Integer, default=-1, server_default=text("-1"))
    attempt: Mapped[int] = mapped_column(Integer)
    # RUNNING, then what the attempt's end did to the task (SUCCESS, RETRYING, ERROR),
    # or DISCARDED: its result came after the attempt had been fenced off.
    outcome: Mapped[str] = mapped_column(String(20))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The one-line error (as in task_log) and the formatted traceback, both bounded.
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    # [{"at": ISO time, "stream": "stdout"|"stderr"|"log", "level", "logger", "line"}]:
    # the first and the last lines when there were too many, `log_dropped` between.
    log: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    log_dropped: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    # Which process ran it: host and pid (a function instance in the cloud).
    worker: Mapped[str | None] = mapped_column(String(200))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


# The Core tables, typed as such, for the hot statements that skip the ORM.
task_log_table = cast(Table, TaskLog.__table__)
task_events_table = cast(Table, TaskEvent.__table__)
task_attempts_table = cast(Table, TaskAttempt.__table__)


class ConcurrencyLock(Base):
    """One row per concurrency key (`task:<pipeline>.<task>`, `batch:<id>`, `global`).

    Claims under a limit lock this row first, which serializes them per key; the
    guarded claim then counts RUNNING rows in a fresh statement, so two claims can
    never both take the last slot. The slot count itself is derived from task_log,
    never kept twice.
    """

    __tablename__ = "concurrency_locks"

    # `task:` + a 128-character pipeline name + `.` + a 128-character task name fits.
    key: Mapped[str] = mapped_column(String(300), primary_key=True)


class CircuitBreaker(Base):
    """Consecutive failures of one handler or named dependency, and whether new
    claims for it should wait instead of hammering a failing service."""

    __tablename__ = "circuit_breakers"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    state: Mapped[str] = mapped_column(String(10), default="closed")  # closed|open|half_open
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    window_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class EventCursor(Base):
    """How far a relay has published task_events to the event stream (the outbox
    cursor): a lost publish is retried from here, a slow subscriber lags behind it."""

    __tablename__ = "event_cursors"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    last_event_id: Mapped[int] = mapped_column(BigId, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class PipelineVersion(Base):
    """What a batch runs under besides its graph, per pipeline version: the time zone,
    schedule, deadline, alert events and file expectations of that version's file."""

    __tablename__ = "pipeline_versions"

    pipeline_id: Mapped[int] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    timezone: Mapped[str] = mapped_column(String(64), default="UTC")
    schedule: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    deadline: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    alerts: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # {task: {"expected_by": "06:30", "fail_after": "2h"}} for file-triggered tasks.
    files: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    # The cap on RUNNING tasks of each batch of this version (`pipelines.concurrency` is
    # the latest file's, which a sync overwrites).
    concurrency: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ScheduleState(Base):
    """A pipeline's schedule across its versions: whether it is paused, and the latest
    tick handled (started or skipped by the catch-up policy). Keyed by the pipeline,
    not a version, so a new version goes on from where the last one was."""

    __tablename__ = "schedules"

    pipeline_id: Mapped[int] = mapped_column(
        ForeignKey("pipelines.id", ondelete="CASCADE"), primary_key=True)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    last_tick_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_batch_id: Mapped[str | None] = mapped_column(String(128))
    last_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Alert(Base):
    """One alert, created once per (batch, kind, task): the outbox of the alert channels."""

    __tablename__ = "alerts"
    __table_args__ = (
        UniqueConstraint("batch_pk", "kind", "task", name="uq_alerts_batch_kind_task"),
        Index("ix_alerts_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    batch_pk: Mapped[int] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    # The task's name, or '' for an alert about the whole batch.
    task: Mapped[str] = mapped_column(String(128), default="")
    # The document every channel is sent (schema orchestrator.alert/v1).
    message: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class AlertDelivery(Base):
    """One alert on one channel: retried with backoff until delivered, or given up on
    (a receiver that refuses it for good) with the reason."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        Index("ix_alert_deliveries_due", "next_attempt_at",
              postgresql_where=text("delivered_at IS NULL AND failed_at IS NULL"),
              sqlite_where=text("delivered_at IS NULL AND failed_at IS NULL")),
    )

    alert_id: Mapped[int] = mapped_column(ForeignKey("alerts.id", ondelete="CASCADE"),
                                          primary_key=True)
    channel: Mapped[str] = mapped_column(String(20), primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
