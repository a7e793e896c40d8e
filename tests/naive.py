"""A deliberately wrong promotion, kept to show that the concurrency tests catch it.

`naive_succeed` marks the parent SUCCESS, then reads its children's parents
without any lock, inside the parent's own transaction, and queues a child only
if it sees every parent SUCCESS. Under READ COMMITTED each parent sees its own
write but not the uncommitted writes of parents finishing at the same instant,
so when they all read before any of them commits, every one of them concludes
"not yet" and the child is never queued. Never use this outside tests.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.db.models import TaskDependency, TaskLog
from orchestrator.engine import lookup
from orchestrator.engine.events import event, record
from orchestrator.engine.types import Outcome, TaskRow
from orchestrator.status import TaskStatus

S = TaskStatus


def naive_succeed(
    session: Session,
    row: TaskRow,
    attempt: int,
    output: dict[str, Any] | None,
    now: datetime,
    *,
    pause_s: float = 0.005,
) -> Outcome:
    """RUNNING -> SUCCESS, then an unlocked read of the parents decides the children."""
    got = session.execute(
        update(TaskLog)
        .where(TaskLog.id == row.log_id, TaskLog.status == S.RUNNING, TaskLog.attempt == attempt)
        .values(status=S.SUCCESS, output=output, finished_at=now, lease_expires_at=None,
                updated_at=now)
        .returning(TaskLog.id)
        .execution_options(synchronize_session=False)
    ).first()
    if got is None:
        return Outcome(applied=False, reason="not RUNNING under this attempt")
    events = [event(row.batch_pk, row.task_id, attempt, S.RUNNING, S.SUCCESS, now)]
    children = session.execute(
        select(TaskDependency.child_task_id).where(TaskDependency.parent_task_id == row.task_id)
    ).scalars().all()
    queued: list[tuple[int, int]] = []
    for child in children:
        parent_log = TaskLog.__table__.alias("parent_log")
        statuses = session.execute(
            select(parent_log.c.status)
            .select_from(TaskDependency)
            .join(parent_log, (parent_log.c.task_id == TaskDependency.parent_task_id)
                  & (parent_log.c.batch_pk == row.batch_pk))
            .where(TaskDependency.child_task_id == child)
        ).scalars().all()
        # The window between the read and the commit, where sibling parents commit
        # unseen; a real worker has one too (publishing, logging, network).
        time.sleep(pause_s)
        if all(s == S.SUCCESS for s in statuses):
            promoted = session.execute(
                update(TaskLog)
                .where(TaskLog.batch_pk == row.batch_pk, TaskLog.task_id == child,
                       TaskLog.status == S.PENDING)
                .values(status=S.QUEUED, queued_at=now, dispatched_at=now, updated_at=now)
                .returning(TaskLog.attempt)
                .execution_options(synchronize_session=False)
            ).first()
            if promoted is not None:
                queued.append((child, promoted[0]))
                events.append(event(row.batch_pk, child, promoted[0], S.PENDING, S.QUEUED, now,
                                    {"reason": "parents succeeded"}))
    record(session, events)
    return Outcome(applied=True, queued=lookup.dispatches(session, row.pipeline, row.batch_id,
                                                          queued))
