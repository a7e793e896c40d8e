"""Batch-level transitions: start, cancel, retry the failed part, close."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, literal, select, update
from sqlalchemy.orm import Session

from orchestrator.db.dialect import insert_ignore
from orchestrator.db.models import Batch, Pipeline, Task, TaskDependency, TaskLog, task_log_table
from orchestrator.db.types import UTCDateTime
from orchestrator.engine import lookup
from orchestrator.engine.dag import evaluate_ready
from orchestrator.engine.events import event, record
from orchestrator.engine.types import BatchFinished, Dispatch
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.identifiers import valid_batch_id
from orchestrator.status import FAILED, OPEN, BatchStatus, TaskStatus

S = TaskStatus


@dataclass
class Started:
    batch_pk: int
    created: bool
    queued: list[Dispatch] = field(default_factory=list)


def start_batch(
    session: Session,
    pipeline: str,
    batch_id: str,
    params: dict[str, Any] | None,
    now: datetime,
    *,
    deadline_at: datetime | None = None,
) -> Started:
    """Create the batch and a task_log row for every task; idempotent on
    (pipeline, batch_id). Roots without a file trigger are QUEUED; roots with one
    wait for their object; the rest wait for parents."""
    if not valid_batch_id(batch_id):
        raise InvalidInput(
            f"invalid batch_id {batch_id!r}: use letters, digits and . _ - = : (at most 128)"
        )
    pipe = session.execute(
        select(Pipeline.id, Pipeline.version).where(Pipeline.name == pipeline)
    ).one_or_none()
    if pipe is None:
        raise NotFound(f"unknown pipeline {pipeline!r} (run `orchestrator pipelines sync` first)")
    pipeline_pk, version = pipe
    batch_pk = session.execute(
        insert_ignore(session, Batch, ["pipeline_id", "batch_id"])
        .values(pipeline_id=pipeline_pk, pipeline_version=version, batch_id=batch_id,
                params=params or {}, status=BatchStatus.RUNNING, created_at=now,
                deadline_at=deadline_at)
        .returning(Batch.id)
    ).scalar_one_or_none()
    if batch_pk is None:
        existing = lookup.find_batch(session, pipeline, batch_id)
        return Started(batch_pk=existing.id, created=False)

    n_parents = (
        select(func.count())
        .select_from(TaskDependency)
        .where(TaskDependency.child_task_id == Task.id)
        .scalar_subquery()
    )
    is_root = ~exists().where(TaskDependency.child_task_id == Task.id)
    ready = and_(is_root, Task.gcs_bucket.is_(None))
    ts = literal(now, UTCDateTime())
    rows = select(
        literal(batch_pk), Task.id,
        case((ready, literal(S.QUEUED.value)), else_=literal(S.PENDING.value)),
        literal(1), literal(0), Task.trigger_rule, n_parents, literal(0), literal(0),
        Task.gcs_bucket.is_not(None), literal(0),
        case((ready, ts), else_=None), case((ready, ts), else_=None), ts,
    ).where(Task.pipeline_id == pipeline_pk, Task.version == version)
    session.execute(
        task_log_table.insert().from_select(
            ["batch_pk", "task_id", "status", "attempt", "retry_base", "trigger_rule",
             "pending_parents", "failed_parents", "skipped_parents", "waiting_for_file",
             "dispatch_count", "queued_at", "dispatched_at", "updated_at"],
            rows,
        )
    )
    queued = session.execute(
        select(TaskLog.task_id, TaskLog.attempt)
        .where(TaskLog.batch_pk == batch_pk, TaskLog.status == S.QUEUED)
    ).all()
    record(session, [
        event(batch_pk, None, None, None, BatchStatus.RUNNING, now, {"params": params or {}}),
        *(event(batch_pk, t, a, S.PENDING, S.QUEUED, now, {"reason": "root"}) for t, a in queued),
    ])
    return Started(
        batch_pk=batch_pk, created=True,
        queued=lookup.dispatches(session, pipeline, batch_id, [(t, a) for t, a in queued]),
    )


def cancel_batch(session: Session, pipeline: str, batch_id: str, now: datetime,
                 reason: str = "cancelled", *, final: BatchStatus = BatchStatus.CANCELLED,
                 detail: dict[str, Any] | None = None) -> int:
    """Every open task -> CANCELLED, at once, and the batch -> `final` (FAILED for a
    missed deadline). A RUNNING handler sees it at its next `is_active()` check, and
    its late result is fenced off. Returns tasks cancelled."""
    batch = lookup.find_batch(session, pipeline, batch_id)
    rows = session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.status.in_(OPEN))
        .values(status=S.CANCELLED, finished_at=now, lease_expires_at=None, error=reason,
                updated_at=now)
        .returning(TaskLog.task_id, TaskLog.attempt)
        .execution_options(synchronize_session=False)
    ).all()
    changed = session.connection().execute(
        update(Batch).where(Batch.id == batch.id, Batch.status == BatchStatus.RUNNING)
        .values(status=final, finished_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount
    record(session, [
        *(event(batch.id, t, a, None, S.CANCELLED, now, {"reason": reason}) for t, a in rows),
        *([event(batch.id, None, None, BatchStatus.RUNNING, final, now,
                 {"reason": reason, **(detail or {})})] if changed else []),
    ])
    return len(rows)


def retry_batch(
    session: Session, pipeline: str, batch_id: str, now: datetime,
    tasks: Iterable[str] | None = None,
) -> list[Dispatch]:
    """Rerun the failed part of a batch (or the named tasks and everything downstream).

    The reset rows get a fresh retry budget but keep counting attempts up, so a
    zombie from an earlier attempt stays fenced off. Counters are recomputed from
    the parents' current statuses, then the ready rows are promoted as usual.
    """
    batch = lookup.find_batch(session, pipeline, batch_id)
    all_tasks = dict(session.execute(
        select(Task.name, Task.id).where(Task.pipeline_id == batch.pipeline_id,
                                         Task.version == batch.pipeline_version)
    ).all())
    edges = session.execute(
        select(TaskDependency.parent_task_id, TaskDependency.child_task_id)
        .where(TaskDependency.child_task_id.in_(all_tasks.values()))
    ).all()
    children: dict[int, list[int]] = {}
    for parent, child in edges:
        children.setdefault(parent, []).append(child)
    if tasks:
        unknown = sorted(set(tasks) - set(all_tasks))
        if unknown:
            raise NotFound(f"unknown task(s) in pipeline {pipeline!r}: {', '.join(unknown)}")
        seeds = [all_tasks[t] for t in tasks]
    else:
        seeds = list(session.execute(
            select(TaskLog.task_id).where(TaskLog.batch_pk == batch.id,
                                          TaskLog.status.in_(FAILED)).distinct()
        ).scalars())
    reset: set[int] = set()
    stack = list(seeds)
    while stack:
        t = stack.pop()
        if t not in reset:
            reset.add(t)
            stack.extend(children.get(t, ()))
    if not reset:
        return []
    open_rows = session.execute(
        select(func.count()).select_from(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(reset),
               TaskLog.status.in_(OPEN))
    ).scalar_one()
    if open_rows:
        raise InvalidInput("some of those tasks are still running or queued; wait or cancel first")
    ids = sorted(reset)
    # A mapped task expands again when it reruns: its old instances go.
    session.execute(
        delete(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(ids), TaskLog.map_index >= 0)
        .execution_options(synchronize_session=False)
    )
    before = session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(ids))
        .values(
            status=S.PENDING,
            retry_base=case((TaskLog.started_at.is_(None), TaskLog.retry_base),
                            else_=TaskLog.attempt),
            attempt=case((TaskLog.started_at.is_(None), TaskLog.attempt),
                         else_=TaskLog.attempt + 1),
            started_at=None, finished_at=None, error=None, output=None, next_attempt_at=None,
            lease_expires_at=None, updated_at=now,
        )
        .returning(TaskLog.task_id, TaskLog.attempt)
        .execution_options(synchronize_session=False)
    ).all()
    parent_log = task_log_table.alias("parent_log")
    dep = TaskDependency.__table__

    def count_parents(statuses: Iterable[str]) -> Any:
        return (
            select(func.count()).select_from(dep.join(
                parent_log,
                (parent_log.c.task_id == dep.c.parent_task_id)
                & (parent_log.c.batch_pk == batch.id) & (parent_log.c.map_index == -1),
            ))
            .where(dep.c.child_task_id == TaskLog.task_id,
                   parent_log.c.status.in_(list(statuses)))
            .scalar_subquery()
        )

    session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(ids))
        .values(
            pending_parents=count_parents(s.value for s in OPEN),
            failed_parents=count_parents(s.value for s in FAILED),
            skipped_parents=count_parents([S.SKIPPED.value]),
        )
        .execution_options(synchronize_session=False)
    )
    if batch.status != BatchStatus.RUNNING:
        session.execute(
            update(Batch).where(Batch.id == batch.id)
            .values(status=BatchStatus.RUNNING, finished_at=None)
            .execution_options(synchronize_session=False)
        )
    promo = evaluate_ready(session, batch.id, ids, now)
    record(session, [
        event(batch.id, None, None, batch.status, BatchStatus.RUNNING, now,
              {"reason": "retry", "tasks": len(ids)}),
        *(event(batch.id, t, a, None, S.PENDING, now, {"reason": "retry"}) for t, a in before),
        *promo.events,
    ])
    return lookup.dispatches(session, pipeline, batch_id, promo.queued)


def close_batch_if_done(session: Session, batch_pk: int, now: datetime) -> BatchFinished | None:
    """RUNNING -> SUCCESS/FAILED once no task is open. Guarded, so concurrent last
    tasks close it once. Called after the terminal transaction commits (a check
    inside it could miss a sibling committing at the same instant)."""
    still_open = session.execute(
        select(TaskLog.id).where(TaskLog.batch_pk == batch_pk, TaskLog.status.in_(OPEN)).limit(1)
    ).first()
    if still_open is not None:
        return None
    failed = session.execute(
        select(TaskLog.id).where(TaskLog.batch_pk == batch_pk,
                                 TaskLog.status.in_(FAILED)).limit(1)
    ).first()
    final = BatchStatus.FAILED if failed else BatchStatus.SUCCESS
    row = session.execute(
        update(Batch)
        .where(Batch.id == batch_pk, Batch.status == BatchStatus.RUNNING)
        .values(status=final, finished_at=now)
        .returning(Batch.created_at, Batch.batch_id, Batch.pipeline_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    pipeline = session.execute(select(Pipeline.name).where(Pipeline.id == row[2])).scalar_one()
    duration = (now - row[0]).total_seconds()
    record(session, [event(batch_pk, None, None, BatchStatus.RUNNING, final, now,
                           {"duration_s": duration})])
    return BatchFinished(batch_pk, pipeline, row[1], final, row[0], now)


