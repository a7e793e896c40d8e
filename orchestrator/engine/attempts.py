"""Attempt records: one `task_attempts` row per attempt that ran a handler.

The worker writes its attempt's row in the same transaction as the attempt's
result (`finish`), and its log now and then while the handler runs (`save_log`,
which never touches an attempt already finished). The sweeper closes the row of
an attempt whose worker went silent (`close_lost`). A result that came after
its attempt was fenced off is recorded as DISCARDED, the task log unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from orchestrator.db.dialect import upsert
from orchestrator.db.models import TaskAttempt, TaskLog, task_attempts_table
from orchestrator.db.types import storable_text, text_problem
from orchestrator.engine.types import TaskRow

KEY = ["batch_pk", "task_id", "map_index", "attempt"]
RUNNING = "RUNNING"
# The attempt's result came after it had been fenced off (the task moved on).
DISCARDED = "DISCARDED"
LOG_FIELDS = ["log", "log_dropped", "updated_at"]


@dataclass(frozen=True)
class AttemptRecord:
    """What one attempt did, as its worker saw it."""

    started_at: datetime
    outcome: str = RUNNING
    finished_at: datetime | None = None
    error: str | None = None
    traceback: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    log_dropped: int = 0
    worker: str | None = None


def _values(row: TaskRow, attempt: int, rec: AttemptRecord, now: datetime) -> dict[str, Any]:
    # What a task printed or raised is kept whatever it holds: a NUL or a lone surrogate
    # would make the database refuse the attempt's record, and with it the result.
    return {"batch_pk": row.batch_pk, "task_id": row.task_id, "map_index": row.map_index,
            "attempt": attempt, "outcome": rec.outcome, "started_at": rec.started_at,
            "finished_at": rec.finished_at, "error": _text(rec.error),
            "traceback": _text(rec.traceback), "log": [_entry(e) for e in rec.log],
            "log_dropped": rec.log_dropped, "worker": rec.worker, "updated_at": now}


def _text(value: str | None) -> str | None:
    return storable_text(value) if value is not None else None


def storable_log(log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An attempt's log lines as the database can hold them."""
    return [_entry(e) for e in log]


def _entry(entry: dict[str, Any]) -> dict[str, Any]:
    if all(not isinstance(v, str) or text_problem(v) is None for v in entry.values()):
        return entry
    return {k: storable_text(v) if isinstance(v, str) else v for k, v in entry.items()}


_COLUMNS = ["batch_pk", "task_id", "map_index", "attempt", "outcome", "started_at",
            "finished_at", "error", "traceback", "log", "log_dropped", "worker", "updated_at"]
_statements: dict[tuple[str, str], Any] = {}


def _upsert(session: Session, kind: str, update: list[str], where: Any = None) -> Any:
    """The upsert of `kind`, built once per dialect: it runs once per attempt, on the
    hot path, where building and compiling it anew would cost more than running it."""
    key = (session.get_bind().dialect.name, kind)
    stmt = _statements.get(key)
    if stmt is None:
        values = {c: bindparam(c, type_=task_attempts_table.c[c].type) for c in _COLUMNS}
        stmt = _statements[key] = upsert(session, task_attempts_table, KEY, values, update,
                                         where=where)
    return stmt


def finish(session: Session, row: TaskRow, attempt: int, rec: AttemptRecord,
           now: datetime) -> None:
    """The attempt's final record (in the transaction that records its result)."""
    stmt = _upsert(session, "finish", [c for c in _COLUMNS if c not in (*KEY, "started_at")])
    session.connection().execute(stmt, _values(row, attempt, rec, now))


def save_log(session: Session, row: TaskRow, attempt: int, rec: AttemptRecord,
             now: datetime) -> None:
    """The log so far of a running attempt, or the late lines of an abandoned one:
    an existing row keeps its outcome and error."""
    session.connection().execute(_upsert(session, "log", LOG_FIELDS),
                                 _values(row, attempt, rec, now))


def close_running(session: Session, row: TaskRow, attempt: int, rec: AttemptRecord,
                  now: datetime) -> None:
    """End an attempt still RUNNING (or never saved) with `rec`'s outcome and log: one
    whose result will never count (it was fenced off while it ran)."""
    stmt = _upsert(session, "close", ["outcome", "finished_at", *LOG_FIELDS],
                   where=TaskAttempt.outcome == RUNNING)
    session.connection().execute(stmt, _values(row, attempt, rec, now))


def close_lost(session: Session, row: TaskRow, attempt: int, outcome: str, error: str,
               now: datetime) -> None:
    """The worker of a RUNNING attempt went silent and the sweeper failed it."""
    started = session.execute(
        select(TaskLog.started_at).where(
            TaskLog.batch_pk == row.batch_pk, TaskLog.task_id == row.task_id,
            TaskLog.map_index == row.map_index)
    ).scalar_one_or_none()
    rec = AttemptRecord(started_at=started or now, outcome=outcome, finished_at=now, error=error)
    # Only a row still RUNNING: a late write of its worker may have closed it already.
    stmt = _upsert(session, "lost", ["outcome", "finished_at", "error", "updated_at"],
                   where=TaskAttempt.outcome == RUNNING)
    session.connection().execute(stmt, _values(row, attempt, rec, now))
