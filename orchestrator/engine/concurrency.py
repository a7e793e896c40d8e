"""Concurrency limits: how many attempts may be RUNNING at once.

A task's `concurrency` caps its RUNNING attempts across all batches (key
`task:<pipeline>.<task>`); a pipeline's `concurrency` caps the RUNNING tasks of
one batch (key `batch:<batch pk>`); `ORCHESTRATOR_DEFAULT_CONCURRENCY` is the
task cap of tasks that set none (unset: unlimited). A task with no limit pays
nothing here.

The claim of a limited task is one guarded statement: it first locks the
`concurrency_locks` row of each of its keys (created on demand, in key order so
two claims never wait on each other crosswise), then its UPDATE compares the
RUNNING count, counted in that same statement, with the limit. Claims of one key
are serialized by the lock, and each counts what the previous one committed, so
two claims can never both take the last slot. The count comes from task_log
itself (the partial index of RUNNING rows), never from a second copy.

A claim over the limit does not run: the row stays QUEUED, marked as waiting
(`next_attempt_at`, otherwise unused while QUEUED, holds since when). When a
slot frees (a limited task finishes or goes back to RETRYING), the freeing
worker wakes one waiting row per key and publishes it at once; the sweeper's
redispatch of unclaimed QUEUED rows is only the safety net for a lost wake-up.
A wake-up takes the same key locks, so it cannot slip between a claim's count
and its marking as waiting.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from orchestrator.db.models import ConcurrencyLock, Task, TaskLog
from orchestrator.engine.types import TaskRow
from orchestrator.status import TaskStatus

S = TaskStatus


@dataclass(frozen=True)
class Limit:
    key: str
    limit: int
    # RUNNING attempts under this key, as a scalar subquery (evaluated per statement).
    running: ColumnElement[Any]
    # Which QUEUED rows wait on this key.
    scope: ColumnElement[bool]


def _attempts() -> ColumnElement[bool]:
    # A mapped task's own row stays RUNNING without a lease while its instances run:
    # it is bookkeeping, not an attempt, so it takes no slot.
    return and_(TaskLog.status == S.RUNNING, TaskLog.lease_expires_at.is_not(None))


def _same_task(row: TaskRow) -> Any:
    # Every version of the task: a pipeline synced mid-run must not double its cap.
    return select(Task.id).where(Task.pipeline_id == row.pipeline_pk, Task.name == row.task)


def limits(row: TaskRow, default: int | None = None) -> list[Limit]:
    """The limits that apply to `row`'s claims, in lock order (empty: unlimited)."""
    out: list[Limit] = []
    task_limit = row.concurrency if row.concurrency is not None else default
    if row.map_over is not None and row.map_index < 0:
        task_limit = None  # expanding a mapped task runs nothing; its instances count
    if row.pipeline_concurrency is not None and not (row.map_over is not None
                                                     and row.map_index < 0):
        out.append(Limit(
            key=f"batch:{row.batch_pk}", limit=row.pipeline_concurrency,
            running=select(func.count()).select_from(TaskLog)
            .where(TaskLog.batch_pk == row.batch_pk, _attempts()).scalar_subquery(),
            scope=TaskLog.batch_pk == row.batch_pk,
        ))
    if task_limit is not None:
        ids = _same_task(row)
        out.append(Limit(
            key=f"task:{row.pipeline}.{row.task}", limit=task_limit,
            running=select(func.count()).select_from(TaskLog)
            .where(TaskLog.task_id.in_(ids), _attempts()).scalar_subquery(),
            scope=TaskLog.task_id.in_(ids),
        ))
    return sorted(out, key=lambda lim: lim.key)


def lock(session: Session, keys: list[str]) -> None:
    """Lock the rows of `keys` (creating them on first use) in one statement: an upsert
    that touches an existing row locks it, as SELECT … FOR UPDATE would."""
    if not keys:
        return
    mod = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    stmt = mod.insert(ConcurrencyLock).values([{"key": k} for k in sorted(keys)])
    session.execute(stmt.on_conflict_do_update(index_elements=["key"],
                                               set_={"key": stmt.excluded.key}))


def guard(stmt: Any, applicable: list[Limit]) -> Any:
    """The claim's UPDATE, allowed only while every limit has a free slot."""
    for lim in applicable:
        stmt = stmt.where(lim.running < lim.limit)
    return stmt


def wait_for_slot(session: Session, row: TaskRow, attempt: int, now: datetime) -> bool:
    """Mark a QUEUED row whose claim found no free slot as waiting; False if the row
    was not QUEUED under `attempt` after all (a duplicate or stale delivery)."""
    got = session.execute(
        update(TaskLog)
        .where(TaskLog.id == row.log_id, TaskLog.status == S.QUEUED, TaskLog.attempt == attempt)
        .values(next_attempt_at=now, dispatched_at=now, updated_at=now)
        .returning(TaskLog.id)
        .execution_options(synchronize_session=False)
    ).first()
    return got is not None


def wake(session: Session, row: TaskRow, now: datetime,
         default: int | None = None) -> list[tuple[int, int, int, int]]:
    """A slot of `row`'s keys was freed: take one waiting row per key off the wait and
    return (batch_pk, task_id, attempt, map_index) of each, to publish after commit."""
    applicable = limits(row, default)
    if not applicable:
        return []
    lock(session, [lim.key for lim in applicable])
    ids: list[int] = []
    for lim in applicable:
        stmt = (
            select(TaskLog.id)
            .where(lim.scope, TaskLog.status == S.QUEUED, TaskLog.next_attempt_at.is_not(None),
                   TaskLog.id.not_in(ids) if ids else TaskLog.id.is_not(None))
            .order_by(TaskLog.next_attempt_at, TaskLog.id)
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            stmt = stmt.with_for_update(skip_locked=True)
        ids.extend(session.execute(stmt).scalars())
    if not ids:
        return []
    rows = session.execute(
        update(TaskLog)
        .where(TaskLog.id.in_(ids), TaskLog.status == S.QUEUED,
               TaskLog.next_attempt_at.is_not(None))
        .values(next_attempt_at=None, dispatched_at=now,
                dispatch_count=TaskLog.dispatch_count + 1, updated_at=now)
        .returning(TaskLog.batch_pk, TaskLog.task_id, TaskLog.attempt, TaskLog.map_index)
        .execution_options(synchronize_session=False)
    ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]
