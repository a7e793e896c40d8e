"""Task transitions: one function each, one guarded UPDATE each.

Every function declares the states it may leave from. The UPDATE names those
states (and, where it matters, the attempt) in its WHERE clause and checks the
row count, so a duplicate, late or stale event finds no row and becomes a logged
no-op instead of a second effect. The caller owns the transaction.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.orm import Session

from orchestrator.db.models import TaskLog, task_log_table
from orchestrator.db.types import UTCDateTime, storable_text
from orchestrator.engine import attempts, catalog, concurrency, expansion, hot, lookup
from orchestrator.engine.dag import KIND_OF, Promotion, check_and_trigger_children
from orchestrator.engine.events import event, record
from orchestrator.engine.types import Claimed, Dispatch, Outcome, TaskRow
from orchestrator.status import TaskStatus

S = TaskStatus

CLAIM_FROM = (S.QUEUED,)
SUCCEED_FROM = (S.RUNNING,)
FAIL_FROM = (S.RUNNING,)
REQUEUE_FROM = (S.RETRYING,)
RELEASE_FROM = (S.PENDING,)  # a file-triggered root whose object arrived


def _guarded(row: TaskRow, allowed: tuple[TaskStatus, ...], attempt: int | None = None) -> Any:
    # Core UPDATE by the row's unique key: the ORM's bulk-update bookkeeping would
    # cost more than the statement, and the key needs no prior read of the row id.
    stmt = update(task_log_table).where(
        TaskLog.batch_pk == row.batch_pk, TaskLog.task_id == row.task_id,
        TaskLog.map_index == row.map_index, TaskLog.status.in_(allowed))
    if attempt is not None:
        stmt = stmt.where(TaskLog.attempt == attempt)
    return stmt


def _key(row: TaskRow, attempt: int) -> dict[str, Any]:
    return {"k_batch": row.batch_pk, "k_task": row.task_id, "k_map": row.map_index,
            "k_attempt": attempt}


def _prebuilt(allowed: tuple[TaskStatus, ...]) -> Any:
    """The guard of the hot transitions, built once: the statement is then reused with
    new parameters instead of being rebuilt (and re-keyed) on every delivery."""
    return update(task_log_table).where(
        TaskLog.batch_pk == bindparam("k_batch"), TaskLog.task_id == bindparam("k_task"),
        TaskLog.map_index == bindparam("k_map"), TaskLog.status.in_(allowed),
        TaskLog.attempt == bindparam("k_attempt"))


_NOW = bindparam("now", type_=UTCDateTime())
_CLAIM = _prebuilt(CLAIM_FROM).values(
    status=S.RUNNING, started_at=_NOW, lease_expires_at=bindparam("lease", type_=UTCDateTime()),
    finished_at=None, error=None, next_attempt_at=None, updated_at=_NOW,
).returning(TaskLog.id, TaskLog.retry_base, TaskLog.input)
_SUCCEED = _prebuilt(SUCCEED_FROM).values(
    status=S.SUCCESS, output=bindparam("output", type_=task_log_table.c.output.type),
    finished_at=_NOW, lease_expires_at=None, updated_at=_NOW,
).returning(TaskLog.id)


def _instance(row: TaskRow, detail: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """An event's detail, naming the instance of a mapped task."""
    if row.map_index < 0:
        return detail
    return {**(detail or {}), "map_index": row.map_index}


def _dispatch(row: TaskRow, attempt: int) -> list[Dispatch]:
    return [Dispatch(row.pipeline, row.batch_id, row.task, attempt, row.map_index)]


def lease_for(timeout_s: float) -> timedelta:
    """How long a claim holds its task: the timeout, which the worker enforces itself,
    and a grace, so that only a worker that is gone (not one reporting its timeout)
    is failed by the sweeper."""
    return timedelta(seconds=timeout_s + min(60.0, max(2.0, timeout_s / 10)))


def claim(session: Session, row: TaskRow, attempt: int, now: datetime,
          *, default_concurrency: int | None = None,
          known_parents: dict[int, tuple[Any, Any]] | None = None) -> Claimed | None:
    """QUEUED -> RUNNING for exactly one delivery of `attempt`; None for the others, and
    for a claim that finds no free slot under the task's concurrency limits (the check
    is part of the same guarded UPDATE, under the limits' locks)."""
    lease = now + lease_for(row.timeout_s)
    limits = concurrency.limits(row, default_concurrency)
    if limits:
        concurrency.lock(session, [lim.key for lim in limits])
        got = session.execute(
            concurrency.guard(_guarded(row, CLAIM_FROM, attempt), limits)
            .values(status=S.RUNNING, started_at=now, lease_expires_at=lease, finished_at=None,
                    error=None, next_attempt_at=None, updated_at=now)
            .returning(TaskLog.id, TaskLog.retry_base, TaskLog.input)
        ).first()
    elif hot.available(session, row):
        # One statement: the guarded UPDATE, its event and the parents' outputs.
        fused = hot.claim(session, row, attempt, now, lease, known_parents)
        if fused is None:
            return None
        (log_id, retry_base, given), parent_rows = fused
        row = replace(row, log_id=log_id, retry_base=retry_base, input=given,
                      status=S.RUNNING, attempt=attempt)
        return Claimed(row=row, attempt=attempt, lease_expires_at=lease,
                       input=task_input(session, row, known_parents, parent_rows))
    else:
        got = session.connection().execute(_CLAIM, {**_key(row, attempt), "now": now, "lease": lease}).first()
    if got is None:
        return None
    # The row as claimed: a row built from cached definitions learns its id here.
    row = replace(row, log_id=got[0], retry_base=got[1], input=got[2], status=S.RUNNING,
                  attempt=attempt)
    record(session, [event(row.batch_pk, row.task_id, attempt, S.QUEUED, S.RUNNING, now,
                           _instance(row))])
    return Claimed(row=row, attempt=attempt, lease_expires_at=lease,
                   input=task_input(session, row, known_parents))


def task_input(session: Session, row: TaskRow,
               known_parents: dict[int, tuple[Any, Any]] | None = None,
               read: list[tuple[int, Any, Any]] | None = None) -> dict[str, Any]:
    """The batch params, each parent's output by name, and what triggered the task."""
    # Parent ids come from the cached edges and their rows are read by key (a join from
    # the edges could scan the whole batch per claim). Parents whose (output, status)
    # the caller already holds, such as the one whose SUCCESS this very transaction
    # wrote, need no read at all; nor do those the claim's own statement read (`read`).
    definition = catalog.task_def(session, row.task_id)
    known = known_parents or {}
    unknown = [p for p in definition.parents if p not in known]
    parent_rows = [(p, *known[p]) for p in definition.parents if p in known]
    if read is not None:
        parent_rows += read
    elif unknown:
        parent_rows += session.connection().execute(
            select(TaskLog.task_id, TaskLog.output, TaskLog.status)
            .where(TaskLog.batch_pk == row.batch_pk, TaskLog.task_id.in_(unknown),
                   TaskLog.map_index == -1)
        ).all()
    parents = [(catalog.task_def(session, t).name, output, status)
               for t, output, status in parent_rows]
    out: dict[str, Any] = {
        "params": row.params,
        # A mapped parent's output is the list of its instances' outputs.
        "parents": {name: output for name, output, _ in parents},
        "parent_status": {name: str(status) for name, _, status in parents},
        "trigger": row.input or {},
    }
    if row.map_index >= 0:
        item = (row.input or {}).get("item")
        out["item"] = item
        out["map_index"] = row.map_index
        # An object under a mapped prefix is the instance's trigger, as a landed file
        # would be, so file handlers (parquet_to_bigquery) load it with no extra config.
        out["trigger"] = {}
        if isinstance(item, str) and item.startswith("gs://"):
            bucket, _, name = item[5:].partition("/")
            out["trigger"] = {"uri": item, "bucket": bucket, "name": name}
    return out


def succeed(
    session: Session, row: TaskRow, attempt: int, output: dict[str, Any] | None, now: datetime,
    *, attempt_record: attempts.AttemptRecord | None = None,
) -> Outcome:
    """RUNNING -> SUCCESS for the attempt that holds the task; then move children on.

    With `attempt_record`, the attempt's record is written too (outcome SUCCESS, or
    DISCARDED when the guard found the task moved on), in the same transaction."""
    if hot.available(session, row):
        rec = None
        if attempt_record is not None:
            rec = {"started_at": attempt_record.started_at,
                   "log": attempts.storable_log(attempt_record.log),
                   "log_dropped": attempt_record.log_dropped, "worker": attempt_record.worker}
        applied, children = hot.succeed(session, row, attempt, output, now, rec)
        if not applied:
            return Outcome(applied=False, reason="not RUNNING under this attempt (stale or fenced)")
        return _promoted(session, row, now, children)
    got = session.connection().execute(_SUCCEED, {**_key(row, attempt), "now": now, "output": output}).first()
    if attempt_record is not None:
        attempts.finish(session, row, attempt, replace(
            attempt_record, outcome="SUCCESS" if got is not None else attempts.DISCARDED,
            finished_at=now), now)
    if got is None:
        return Outcome(applied=False, reason="not RUNNING under this attempt (stale or fenced)")
    return _finish(session, row, attempt, S.SUCCESS, now, {})


def _promoted(session: Session, row: TaskRow, now: datetime,
              children: list[tuple[int, int, TaskStatus]]) -> Outcome:
    """The tail of a one-statement SUCCESS: its children's events are written; a child
    it made terminal (SKIPPED) finishes its own children in turn."""
    decided: list[tuple[int, int, TaskStatus]] = [
        (t, a, st) for t, a, st in children if st is not S.PENDING]
    waiting = {t for t, _, st in children if st is S.PENDING}
    promo = Promotion(changed=decided)
    terminal: dict[str, list[int]] = {}
    for t, _, st in decided:
        if st in KIND_OF:
            terminal.setdefault(KIND_OF[st], []).append(t)
    if terminal:
        more = check_and_trigger_children(session, row.batch_pk, terminal, now)
        promo.changed.extend(more.changed)
        # A child still waiting here may have been decided by the cascade (its other
        # parent was a sibling just skipped).
        waiting -= {t for t, _, _ in more.changed}
        promo.still_pending = more.still_pending
        record(session, more.events)
    promo.still_pending = promo.still_pending or bool(waiting)
    queued = lookup.dispatches(session, row.pipeline, row.batch_id, promo.queued)
    return Outcome(applied=True, queued=queued,
                   check_batch=not queued and not promo.still_pending)


def fail(
    session: Session,
    row: TaskRow,
    attempt: int,
    error: str,
    now: datetime,
    *,
    retry_delay_s: float | None,
    from_states: tuple[TaskStatus, ...] = FAIL_FROM,
) -> Outcome:
    """RUNNING -> RETRYING (after `retry_delay_s`), straight to QUEUED for the next
    attempt when the delay is zero, or ERROR when `retry_delay_s` is None."""
    # The reason is kept whatever it holds: a NUL or a lone surrogate would make the
    # database refuse the whole transition and leave the task RUNNING.
    error = storable_text(error[:8000])
    if retry_delay_s is None:
        got = session.execute(
            _guarded(row, from_states, attempt)
            .values(status=S.ERROR, error=error, finished_at=now, lease_expires_at=None,
                    updated_at=now)
            .returning(TaskLog.status)
        ).first()
        if got is None:
            return Outcome(applied=False, reason="not RUNNING under this attempt")
        # With several allowed states, the one read when the row was resolved is the best
        # record of where it left from (the guard above made the move itself safe).
        left = from_states[0] if len(from_states) == 1 else row.status
        return _finish(session, row, attempt, S.ERROR, now, {"error": error}, left)
    if retry_delay_s <= 0:
        got = session.execute(
            _guarded(row, from_states, attempt)
            .values(status=S.QUEUED, attempt=attempt + 1, error=error, lease_expires_at=None,
                    queued_at=now, dispatched_at=now, next_attempt_at=None, updated_at=now)
            .returning(TaskLog.id)
        ).first()
        if got is None:
            return Outcome(applied=False, reason="not RUNNING under this attempt")
        record(session, [event(row.batch_pk, row.task_id, attempt, S.RUNNING, S.QUEUED, now,
                               _instance(row, {"error": error, "next_attempt": attempt + 1}))])
        return Outcome(applied=True, queued=_dispatch(row, attempt + 1))
    due = now + timedelta(seconds=retry_delay_s)
    got = session.execute(
        _guarded(row, from_states, attempt)
        .values(status=S.RETRYING, error=error, lease_expires_at=None, next_attempt_at=due,
                updated_at=now)
        .returning(TaskLog.id)
    ).first()
    if got is None:
        return Outcome(applied=False, reason="not RUNNING under this attempt")
    record(session, [event(row.batch_pk, row.task_id, attempt, S.RUNNING, S.RETRYING, now,
                           _instance(row, {"error": error, "next_attempt_at": due.isoformat(),
                                           "delay_s": retry_delay_s}))])
    return Outcome(applied=True)


def release_waiting_root(
    session: Session, row: TaskRow, trigger: dict[str, Any], now: datetime
) -> Outcome:
    """PENDING (waiting for its file) -> QUEUED, with the object as the task's input."""
    got = session.execute(
        _guarded(row, RELEASE_FROM)
        .where(TaskLog.waiting_for_file.is_(True))
        .values(status=S.QUEUED, waiting_for_file=False, input=trigger, queued_at=now,
                dispatched_at=now, updated_at=now)
        .returning(TaskLog.attempt)
    ).first()
    if got is None:
        return Outcome(applied=False, reason=f"task is {row.status}, not waiting for a file")
    record(session, [event(row.batch_pk, row.task_id, got[0], S.PENDING, S.QUEUED, now,
                           {"trigger": trigger})])
    return Outcome(applied=True, queued=lookup.dispatches(
        session, row.pipeline, row.batch_id, [(row.task_id, got[0])]))


def _finish(
    session: Session, row: TaskRow, attempt: int, status: TaskStatus, now: datetime,
    detail: dict[str, Any], from_status: TaskStatus = S.RUNNING,
) -> Outcome:
    """The tail of every terminal transition: children, events, and the outbox."""
    if row.map_index >= 0:
        # An instance's parent-in-waiting is its mapped task, counted down as a fan-in.
        record(session, [event(row.batch_pk, row.task_id, attempt, from_status, status, now,
                               _instance(row, detail))])
        return expansion.instance_finished(session, row, status, now)
    promo = check_and_trigger_children(session, row.batch_pk, {KIND_OF[status]: [row.task_id]}, now)
    record(session, [event(row.batch_pk, row.task_id, attempt, from_status, status, now,
                           detail or None), *promo.events])
    queued = lookup.dispatches(session, row.pipeline, row.batch_id, promo.queued)
    # A child still waiting, or one just queued, is an open task: the batch cannot be
    # done, so skip the check (a fan-in would otherwise run it once per parent).
    return Outcome(applied=True, queued=queued,
                   check_batch=not queued and not promo.still_pending)


DEFER_FROM = (S.QUEUED,)


def defer(session: Session, row: TaskRow, attempt: int, delay_s: float, reason: str,
          now: datetime) -> Outcome:
    """QUEUED -> RETRYING without running (e.g. its circuit breaker is open).

    The requeue after `delay_s` moves the attempt number on, which fences off the
    deferred delivery; `retry_base` moves with it, so waiting never spends a retry.
    """
    due = now + timedelta(seconds=delay_s)
    got = session.execute(
        _guarded(row, DEFER_FROM, attempt)
        .values(status=S.RETRYING, retry_base=TaskLog.retry_base + 1, next_attempt_at=due,
                error=reason[:8000], updated_at=now)
        .returning(TaskLog.id)
    ).first()
    if got is None:
        return Outcome(applied=False, reason="not QUEUED under this attempt")
    record(session, [event(row.batch_pk, row.task_id, attempt, S.QUEUED, S.RETRYING, now,
                           _instance(row, {"deferred": reason, "next_attempt_at": due.isoformat(),
                                           "delay_s": delay_s}))])
    return Outcome(applied=True)
