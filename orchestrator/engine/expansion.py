"""Expansion: a mapped task's row fans out into instance rows and gathers them back.

A mapped task (`map_over` in its definition) has its own task_log row like any
task (map_index -1), promoted by its parents as usual. When that row is claimed,
no handler runs: the worker resolves the list (see `orchestrator.mapping`) and
the row expands, in one transaction, into one QUEUED instance row per item
(map_index 0..n-1, the item as input). From then on the row is the instances'
parent, on the same counters as the DAG's own edges: its `pending_parents`
counts the instances still open and `failed_parents` those that failed, and it
stays RUNNING without a lease (so neither the lease sweeper nor a concurrency
slot counts it).

Each instance's terminal transition decrements the task's row in one guarded
UPDATE; the decrement that reaches zero finishes it (SUCCESS, or ERROR if an
instance failed) in the same statement, gathers the instances' outputs into a
list (its output, in index order), and promotes its children exactly as a
static task's finish does. So a child of a mapped task is promoted exactly once
by the same mechanism that guards static fan-ins, and trigger rules apply to the
mapped task as a whole.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import case, insert, literal, select, update
from sqlalchemy.orm import Session

from orchestrator.db.models import TaskLog
from orchestrator.db.types import UTCDateTime
from orchestrator.engine import locks, lookup
from orchestrator.engine.dag import FAILED, KIND_OF, check_and_trigger_children
from orchestrator.engine.events import event, record
from orchestrator.engine.types import Dispatch, Outcome, TaskRow
from orchestrator.status import TaskStatus, TriggerRule

S = TaskStatus


def expand(session: Session, row: TaskRow, attempt: int, items: list[Any],
           now: datetime) -> Outcome:
    """RUNNING mapped task -> one QUEUED instance per item (or SUCCESS with `[]` for none).
    Guarded on the attempt that claimed it and on its lease, so it expands once.

    It adds open rows to the batch, so it first takes the batch lock (shared): a cancel
    that committed before finds the task CANCELLED here and nothing is added; one that
    comes later waits for this commit, and then sees every instance.
    """
    n = len(items)
    locks.lock_batch(session, row.batch_pk, shared=True)
    values: dict[str, Any] = {"lease_expires_at": None, "pending_parents": n,
                              "failed_parents": 0, "skipped_parents": 0, "output": None,
                              "updated_at": now}
    if n == 0:
        values.update(status=S.SUCCESS, output=[], finished_at=now)
    got = session.execute(
        update(TaskLog)
        .where(TaskLog.id == row.log_id, TaskLog.status == S.RUNNING,
               TaskLog.attempt == attempt, TaskLog.lease_expires_at.is_not(None))
        .values(values)
        .returning(TaskLog.map_attempt_base)
        .execution_options(synchronize_session=False)
    ).first()
    if got is None:
        return Outcome(applied=False, reason="not RUNNING under this attempt (stale or fenced)")
    if n == 0:
        return _finished(session, row, attempt, S.SUCCESS, now, {"map_instances": 0})
    # Instances of earlier expansions (before a retry) used attempts up to `base`.
    base = got[0]
    first = base + 1
    session.execute(insert(TaskLog), [
        {"batch_pk": row.batch_pk, "task_id": row.task_id, "map_index": i,
         "status": S.QUEUED, "attempt": first, "retry_base": base,
         "trigger_rule": TriggerRule.ALL_SUCCESS, "pending_parents": 0, "failed_parents": 0,
         "skipped_parents": 0, "waiting_for_file": False,
         "input": {"item": item, "map_index": i}, "dispatch_count": 0,
         "queued_at": now, "dispatched_at": now, "updated_at": now}
        for i, item in enumerate(items)
    ])
    record(session, [
        event(row.batch_pk, row.task_id, attempt, S.RUNNING, S.RUNNING, now,
              {"map_instances": n}),
        *(event(row.batch_pk, row.task_id, first, None, S.QUEUED, now, {"map_index": i})
          for i in range(n)),
    ])
    names = lookup.task_names(session, [row.task_id])
    return Outcome(applied=True, queued=[
        Dispatch(row.pipeline, row.batch_id, names[row.task_id], first, i) for i in range(n)])


def instance_finished(session: Session, row: TaskRow, status: TaskStatus,
                      now: datetime) -> Outcome:
    """An instance reached `status` (terminal): count it off its mapped task, and finish
    that task (and promote its children) if it was the last one open."""
    failed = 1 if KIND_OF.get(status) == FAILED else 0
    left = TaskLog.pending_parents - 1
    n_failed = TaskLog.failed_parents + failed
    ts = literal(now, UTCDateTime())
    final = case((n_failed > 0, literal(S.ERROR.value)), else_=literal(S.SUCCESS.value))
    got = session.execute(
        update(TaskLog)
        .where(TaskLog.batch_pk == row.batch_pk, TaskLog.task_id == row.task_id,
               TaskLog.map_index == -1, TaskLog.status == S.RUNNING,
               TaskLog.lease_expires_at.is_(None))
        .values({
            TaskLog.pending_parents: left,
            TaskLog.failed_parents: n_failed,
            TaskLog.status: case((left <= 0, final), else_=TaskLog.status),
            TaskLog.finished_at: case((left <= 0, ts), else_=TaskLog.finished_at),
            TaskLog.updated_at: ts,
        })
        .returning(TaskLog.id, TaskLog.status, TaskLog.attempt, TaskLog.failed_parents)
        .execution_options(synchronize_session=False)
    ).first()
    if got is None or TaskStatus(got[1]) is S.RUNNING:
        # Instances still open, or the task was cancelled meanwhile (nothing to promote).
        return Outcome(applied=True, check_batch=got is None)
    log_id, new, attempt, n_bad = got[0], TaskStatus(got[1]), got[2], got[3]
    outputs = list(session.execute(
        select(TaskLog.output)
        .where(TaskLog.batch_pk == row.batch_pk, TaskLog.task_id == row.task_id,
               TaskLog.map_index >= 0)
        .order_by(TaskLog.map_index)
    ).scalars())
    error = f"{n_bad} of {len(outputs)} mapped instances failed" if n_bad else None
    session.execute(
        update(TaskLog).where(TaskLog.id == log_id).values(output=outputs, error=error)
        .execution_options(synchronize_session=False)
    )
    detail = {"map_instances": len(outputs), **({"error": error} if error else {})}
    return _finished(session, row, attempt, new, now, detail)


def _finished(session: Session, row: TaskRow, attempt: int, status: TaskStatus, now: datetime,
              detail: dict[str, Any]) -> Outcome:
    """The mapped task itself finished: its children move on, as after any task."""
    promo = check_and_trigger_children(session, row.batch_pk, {KIND_OF[status]: [row.task_id]}, now)
    record(session, [event(row.batch_pk, row.task_id, attempt, S.RUNNING, status, now, detail),
                     *promo.events])
    queued = lookup.dispatches(session, row.pipeline, row.batch_id, promo.queued)
    return Outcome(applied=True, queued=queued, check_batch=not queued)
