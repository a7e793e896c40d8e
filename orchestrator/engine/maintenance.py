"""The sweeper's transitions: what no event will do by itself.

Each pass is idempotent and safe to run concurrently with itself: rows are taken
with FOR UPDATE SKIP LOCKED (or moved by a guarded UPDATE), so two sweepers never
publish the same QUEUED task twice in one grace period.
"""

from __future__ import annotations

import weakref
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session

from orchestrator.db.dialect import lock_skip_locked
from orchestrator.db.models import Batch, Pipeline, TaskLog
from orchestrator.engine import lookup
from orchestrator.engine.events import event, record
from orchestrator.engine.types import Dispatch
from orchestrator.status import OPEN, BatchStatus, TaskStatus

S = TaskStatus
_batch_names: weakref.WeakKeyDictionary[Any, dict[int, tuple[str, str]]] = (
    weakref.WeakKeyDictionary()
)


def batch_names(session: Session, batch_pks: list[int]) -> dict[int, tuple[str, str]]:
    """(pipeline, batch_id) per batch; immutable, so cached for the process."""
    cache = lookup.db_cache(_batch_names, session)
    missing = [b for b in set(batch_pks) if b not in cache]
    if missing:
        rows = session.execute(
            select(Batch.id, Pipeline.name, Batch.batch_id)
            .join(Pipeline, Pipeline.id == Batch.pipeline_id)
            .where(Batch.id.in_(missing))
        ).all()
        cache.update({r[0]: (r[1], r[2]) for r in rows})
    return {b: cache[b] for b in batch_pks}


def dispatches_of(session: Session, rows: list[tuple[int, int, int, int]]) -> list[Dispatch]:
    """(batch_pk, task_id, attempt, map_index) rows -> Dispatches."""
    if not rows:
        return []
    names = batch_names(session, [r[0] for r in rows])
    tasks = lookup.task_names(session, [r[1] for r in rows])
    return [Dispatch(names[b][0], names[b][1], tasks[t], a, m) for b, t, a, m in rows]


def redispatch_stale(session: Session, now: datetime, grace_s: float, limit: int = 500) -> list[Dispatch]:
    """QUEUED tasks nobody claimed within the grace: publish them again."""
    stale = lock_skip_locked(session, (
        select(TaskLog.id)
        .where(TaskLog.status == S.QUEUED,
               TaskLog.dispatched_at < now - timedelta(seconds=grace_s))
        .order_by(TaskLog.dispatched_at)
        .limit(limit)
    ))
    ids = list(session.execute(stale).scalars())
    if not ids:
        return []
    rows = session.execute(
        update(TaskLog)
        .where(TaskLog.id.in_(ids), TaskLog.status == S.QUEUED)
        .values(dispatched_at=now, dispatch_count=TaskLog.dispatch_count + 1, updated_at=now)
        .returning(TaskLog.batch_pk, TaskLog.task_id, TaskLog.attempt, TaskLog.map_index)
        .execution_options(synchronize_session=False)
    ).all()
    return dispatches_of(session, [(r[0], r[1], r[2], r[3]) for r in rows])


def requeue_due(session: Session, now: datetime, limit: int = 500) -> list[Dispatch]:
    """RETRYING tasks whose backoff has passed -> QUEUED for their next attempt."""
    due = lock_skip_locked(session, (
        select(TaskLog.id)
        .where(TaskLog.status == S.RETRYING, TaskLog.next_attempt_at <= now)
        .order_by(TaskLog.next_attempt_at)
        .limit(limit)
    ))
    ids = list(session.execute(due).scalars())
    if not ids:
        return []
    rows = session.execute(
        update(TaskLog)
        .where(TaskLog.id.in_(ids), TaskLog.status == S.RETRYING)
        .values(status=S.QUEUED, attempt=TaskLog.attempt + 1, next_attempt_at=None,
                queued_at=now, dispatched_at=now, updated_at=now)
        .returning(TaskLog.batch_pk, TaskLog.task_id, TaskLog.attempt, TaskLog.map_index)
        .execution_options(synchronize_session=False)
    ).all()
    record(session, [event(b, t, a - 1, S.RETRYING, S.QUEUED, now,
                           {"next_attempt": a, **({"map_index": m} if m >= 0 else {})})
                     for b, t, a, m in rows])
    return dispatches_of(session, [(r[0], r[1], r[2], r[3]) for r in rows])


def expired_leases(session: Session, now: datetime,
                   limit: int = 200) -> list[tuple[int, int, int, int]]:
    """RUNNING rows whose lease has passed, locked for this pass:
    (batch_pk, task_id, attempt, map_index)."""
    stmt = lock_skip_locked(session, (
        select(TaskLog.batch_pk, TaskLog.task_id, TaskLog.attempt, TaskLog.map_index)
        .where(TaskLog.status == S.RUNNING, TaskLog.lease_expires_at < now)
        .order_by(TaskLog.lease_expires_at)
        .limit(limit)
    ))
    return [(r[0], r[1], r[2], r[3]) for r in session.execute(stmt).all()]


def overdue_batches(session: Session, now: datetime, limit: int = 100) -> list[tuple[str, str]]:
    rows = session.execute(
        select(Batch.id).where(Batch.status == BatchStatus.RUNNING, Batch.deadline_at < now)
        .limit(limit)
    ).scalars().all()
    names = batch_names(session, list(rows))
    return [names[b] for b in rows]


def finished_open_batches(session: Session, limit: int = 500) -> list[int]:
    """RUNNING batches with no open task left (their closing check was missed)."""
    open_task = exists().where(TaskLog.batch_pk == Batch.id, TaskLog.status.in_(OPEN))
    return list(session.execute(
        select(Batch.id).where(Batch.status == BatchStatus.RUNNING, ~open_task).limit(limit)
    ).scalars())
