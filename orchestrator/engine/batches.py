"""Batch-level transitions: start, cancel, retry the failed part, close.

Each of cancel, retry and close reads or changes the batch as a whole, so each
takes the batch row's lock first (`locks.lock_batch`), as the engine's docstring
sets out; what each one must see of the per-task transitions is said beside it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, literal, select, update
from sqlalchemy.orm import Session

from orchestrator.db.dialect import insert_ignore
from orchestrator.db.models import Batch, Pipeline, Task, TaskDependency, TaskLog, task_log_table
from orchestrator.db.types import UTCDateTime, json_problem
from orchestrator.engine import locks, lookup
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
    if (problem := json_problem(params or {}, "params")) is not None:
        raise InvalidInput(f"invalid params: {problem}")
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
    its late result is fenced off. Returns tasks cancelled.

    Under the batch lock no open row can appear (only a retry or an expansion adds
    them, and both take that lock), so the open rows read here are all there will be;
    they are locked in the engine's order before the UPDATE, which then waits for no one.
    """
    batch = lookup.find_batch(session, pipeline, batch_id)
    locks.lock_batch(session, batch.id)
    open_rows = session.execute(
        select(TaskLog.id, TaskLog.task_id, TaskLog.map_index)
        .where(TaskLog.batch_pk == batch.id, TaskLog.status.in_(OPEN))
    ).all()
    if not open_rows:
        # Every task has finished and only the close is still to come (the last
        # finisher's, or the sweeper's): the batch ends as its tasks did, not cancelled.
        return 0
    locks.lock_rows(session, [(r[0], r[1], r[2]) for r in open_rows], shared=False)
    rows = session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.status.in_(OPEN))
        .values(status=S.CANCELLED, finished_at=now, lease_expires_at=None, error=reason,
                updated_at=now)
        .returning(TaskLog.task_id, TaskLog.attempt)
        .execution_options(synchronize_session=False)
    ).all()
    if not rows:
        # The open rows finished while their locks were awaited (a worker committing
        # the last SUCCESS): as above, the batch is left to its close.
        return 0
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
    zombie from an earlier attempt stays fenced off; a mapped task's instances go,
    and its next expansion numbers them on from the highest attempt they reached.
    Counters are recomputed from the parents' current statuses, then the ready rows
    are promoted as usual.

    The batch lock orders the retry with a close (which then either sees the reset
    rows or has closed the batch, which the retry reopens) and with cancels and
    expansions. The reset rows themselves are terminal, which no transition but a
    retry leaves. Their parents outside the reset are not: one may be committing its
    terminal transition, whose decrement of a reset child found that child terminal
    and did nothing. So those parents' rows are locked (shared) before they are
    counted: a transition in flight holds its row, so the count waits for its commit
    and sees it finished; a later one waits for this commit, and its decrement then
    finds the child PENDING, counting it.
    """
    batch = lookup.find_batch(session, pipeline, batch_id)
    status = locks.lock_batch(session, batch.id)
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
    outside = sorted({p for p, c in edges if c in reset and p not in reset})
    if outside:
        parent_rows = session.execute(
            select(TaskLog.id, TaskLog.task_id, TaskLog.map_index)
            .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(outside),
                   TaskLog.map_index == -1)
        ).all()
        locks.lock_rows(session, [(r[0], r[1], r[2]) for r in parent_rows], shared=True)
    instance = task_log_table.alias("instance")
    highest_instance_attempt = (
        select(func.max(instance.c.attempt))
        .where(instance.c.batch_pk == TaskLog.batch_pk, instance.c.task_id == TaskLog.task_id,
               instance.c.map_index >= 0)
        .scalar_subquery()
    )
    before = session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(ids), TaskLog.map_index == -1)
        .values(
            status=S.PENDING,
            retry_base=case((TaskLog.started_at.is_(None), TaskLog.retry_base),
                            else_=TaskLog.attempt),
            attempt=case((TaskLog.started_at.is_(None), TaskLog.attempt),
                         else_=TaskLog.attempt + 1),
            map_attempt_base=func.coalesce(highest_instance_attempt, TaskLog.map_attempt_base),
            started_at=None, finished_at=None, error=None, output=None, next_attempt_at=None,
            lease_expires_at=None, updated_at=now,
        )
        .returning(TaskLog.task_id, TaskLog.attempt)
        .execution_options(synchronize_session=False)
    ).all()
    # A mapped task expands again when it reruns: its old instances go.
    session.execute(
        delete(TaskLog)
        .where(TaskLog.batch_pk == batch.id, TaskLog.task_id.in_(ids), TaskLog.map_index >= 0)
        .execution_options(synchronize_session=False)
    )
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
    if status != BatchStatus.RUNNING:
        session.execute(
            update(Batch).where(Batch.id == batch.id)
            .values(status=BatchStatus.RUNNING, finished_at=None)
            .execution_options(synchronize_session=False)
        )
    promo = evaluate_ready(session, batch.id, ids, now)
    record(session, [
        event(batch.id, None, None, status, BatchStatus.RUNNING, now,
              {"reason": "retry", "tasks": len(ids)}),
        *(event(batch.id, t, a, None, S.PENDING, now, {"reason": "retry"}) for t, a in before),
        *promo.events,
    ])
    return lookup.dispatches(session, pipeline, batch_id, promo.queued)


def open_task_read(batch_pk: int) -> tuple[str, dict[str, Any]]:
    """`_has_open_task` as SQL text (PostgreSQL), for a caller to send with its COMMIT:
    a "still open" there spares the close its own transaction."""
    states = ", ".join(f"'{st.value}'" for st in sorted(OPEN))
    return (f"SELECT EXISTS (SELECT 1 FROM task_log WHERE batch_pk = %(b)s "
            f"AND status IN ({states}))", {"b": batch_pk})


def _has_open_task(session: Session, batch_pk: int) -> bool:
    return session.execute(
        select(TaskLog.id).where(TaskLog.batch_pk == batch_pk, TaskLog.status.in_(OPEN)).limit(1)
    ).first() is not None


def close_batch_if_done(session: Session, batch_pk: int, now: datetime) -> BatchFinished | None:
    """RUNNING -> SUCCESS/FAILED once no task is open. Called after the terminal
    transaction commits (a check inside it could miss a sibling committing at the
    same instant); guarded, so concurrent last tasks close it once.

    "No task open" can only stop being true through a retry, so the usual answer
    ("still open") is read without a lock, and only a batch that looks done is locked
    and checked again, in a statement that starts after the lock is granted: a retry
    that committed meanwhile is seen there, and one that comes later finds the batch
    closed and reopens it.
    """
    if _has_open_task(session, batch_pk):
        return None
    if locks.lock_batch(session, batch_pk) != BatchStatus.RUNNING:
        return None
    if _has_open_task(session, batch_pk):
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
