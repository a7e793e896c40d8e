"""The locks of whole-batch operations, taken in one order (see the engine's docstring).

Order: the batch row first, then task_log rows by depth in the DAG (a mapped task's
instances before its own row, ids ascending within a level), then concurrency rows.
Per-task transitions lock their own row, then their children's, then their
grandchildren's: deeper each time, so a whole-batch operation that takes rows in
depth order never holds a deeper row while waiting for a shallower one that a
transition holds on its way down.

On SQLite a transaction holds the whole database from its first statement (one
writer at a time), so there is nothing to order: the row locks are skipped and
the batch lock compiles to a plain read.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Batch, TaskLog
from orchestrator.engine import catalog
from orchestrator.status import BatchStatus

# Ids per statement when locking many rows (a 10,000-instance task).
_CHUNK = 5000


def lock_batch(session: Session, batch_pk: int, *, shared: bool = False) -> BatchStatus | None:
    """Lock the batch row; return its status as of the lock (None: no such batch).

    Exclusive is `FOR NO KEY UPDATE`, not `FOR UPDATE`: every transition writes event
    rows, and a mapped task's expansion instance rows, that reference the batch, and
    checking that reference takes `FOR KEY SHARE` on it, which `FOR UPDATE` would block
    (stalling every worker of the batch) and `FOR NO KEY UPDATE` does not. Shared is
    `FOR SHARE`: several expansions of one batch may run at once, but not beside a
    cancel, retry or close.
    """
    stmt = select(Batch.status).where(Batch.id == batch_pk)
    stmt = stmt.with_for_update(read=True) if shared else stmt.with_for_update(key_share=True)
    status = session.execute(stmt).scalar_one_or_none()
    return BatchStatus(status) if status is not None else None


def lock_rows(session: Session, rows: Iterable[tuple[int, int, int]], *, shared: bool) -> None:
    """Lock task_log rows, given as (id, task_id, map_index), in the engine's order:
    once this returns, no transition of theirs is in flight and none can start until
    this transaction ends. `shared` (`FOR SHARE`) suffices for rows that are only read."""
    if session.get_bind().dialect.name != "postgresql":
        return
    levels: dict[tuple[int, int], list[int]] = {}
    for log_id, task_id, map_index in rows:
        key = (catalog.task_def(session, task_id).depth, 0 if map_index >= 0 else 1)
        levels.setdefault(key, []).append(log_id)
    for key in sorted(levels):
        ids = sorted(levels[key])
        for i in range(0, len(ids), _CHUNK):
            stmt = select(TaskLog.id).where(TaskLog.id.in_(ids[i:i + _CHUNK])).order_by(TaskLog.id)
            session.execute(stmt.with_for_update(read=True) if shared
                            else stmt.with_for_update(key_share=True)).all()
