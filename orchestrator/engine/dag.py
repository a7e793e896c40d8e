"""Moving children on when parents finish: `check_and_trigger_children`.

Exactly-once promotion rests on one statement. Each child row carries a counter
of unfinished parents. A parent's terminal transaction decrements its children's
counters with a single guarded UPDATE; the row lock makes concurrent decrements
serialize, Postgres re-evaluates the WHERE and SET on the newest row version, and
the one decrement that reaches zero computes the child's new status in the same
statement. No read-then-write, so no lost or doubled child, whatever the timing.

The work per finished parent is one UPDATE over its own children, so a batch
costs O(tasks + edges) in total, and a 10,000-parent fan-in touches its child
10,000 times, not 10,000² times.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    and_,
    bindparam,
    case,
    func,
    literal,
    select,
    update,
)
from sqlalchemy.orm import Session

from orchestrator.db.models import TaskDependency, TaskLog, task_log_table
from orchestrator.db.types import UTCDateTime
from orchestrator.engine import catalog
from orchestrator.engine.events import event
from orchestrator.status import TaskStatus, TriggerRule

S = TaskStatus
R = TriggerRule

# What a finished parent counts as, for its children's trigger rules.
SUCCEEDED, FAILED, SKIPPED = "succeeded", "failed", "skipped"
KIND_OF: dict[TaskStatus, str] = {
    S.SUCCESS: SUCCEEDED,
    S.ERROR: FAILED,
    S.UPSTREAM_FAILED: FAILED,
    S.CANCELLED: FAILED,
    S.SKIPPED: SKIPPED,
}


def ready_status(pending: Any, failed: Any, skipped: Any) -> ColumnElement[Any]:
    """The status a PENDING child should have, given its parent counters.

    all_success: any failed parent -> UPSTREAM_FAILED at once; all done and some
      skipped -> SKIPPED; all succeeded -> QUEUED.
    all_done:    every parent finished -> QUEUED.
    one_failed:  any failed parent -> QUEUED at once; all done, none failed -> SKIPPED.
    """
    rule = TaskLog.trigger_rule
    return case(
        (and_(rule == R.ALL_SUCCESS, failed > 0), literal(S.UPSTREAM_FAILED.value)),
        (and_(rule == R.ALL_SUCCESS, pending <= 0, skipped > 0), literal(S.SKIPPED.value)),
        (and_(rule == R.ALL_SUCCESS, pending <= 0), literal(S.QUEUED.value)),
        (and_(rule == R.ALL_DONE, pending <= 0), literal(S.QUEUED.value)),
        (and_(rule == R.ONE_FAILED, failed > 0), literal(S.QUEUED.value)),
        (and_(rule == R.ONE_FAILED, pending <= 0), literal(S.SKIPPED.value)),
        else_=literal(S.PENDING.value),
    )


def _status_dependent_values(new_status: ColumnElement[Any], now: datetime | Any
                             ) -> dict[Any, Any]:
    ts = now if isinstance(now, BindParameter) else literal(now, UTCDateTime())
    terminal = new_status.in_([S.UPSTREAM_FAILED.value, S.SKIPPED.value])
    queued = new_status == S.QUEUED.value
    return {
        TaskLog.status: new_status,
        TaskLog.queued_at: case((queued, ts), else_=TaskLog.queued_at),
        TaskLog.dispatched_at: case((queued, ts), else_=TaskLog.dispatched_at),
        TaskLog.finished_at: case((terminal, ts), else_=TaskLog.finished_at),
        TaskLog.updated_at: ts,
    }


@dataclass
class Promotion:
    """Children whose status changed: (task_id, attempt, new status) in order."""

    changed: list[tuple[int, int, TaskStatus]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    # Some child is still waiting for other parents (so the batch is not done).
    still_pending: bool = False

    @property
    def queued(self) -> list[tuple[int, int]]:
        return [(tid, att) for tid, att, st in self.changed if st is S.QUEUED]


def check_and_trigger_children(
    session: Session,
    batch_pk: int,
    finished: dict[str, list[int]],
    now: datetime,
) -> Promotion:
    """Tell the children of `finished` parents (grouped by kind) that they are done.

    Children that became terminal (UPSTREAM_FAILED, SKIPPED) are themselves
    finished parents, so the cascade repeats level by level until nothing changes.
    The statements issued are one per level and kind, independent of batch size.
    """
    result = Promotion()
    waiting: set[int] = set()
    frontier = {k: list(v) for k, v in finished.items() if v}
    while frontier:
        nxt: dict[str, list[int]] = {}
        for kind, parents in frontier.items():
            for task_id, attempt, status in _decrement_children(session, batch_pk, kind, parents, now):
                new = TaskStatus(status)
                if new is S.PENDING:
                    waiting.add(task_id)
                    continue
                waiting.discard(task_id)  # a later level of the cascade decided it
                result.changed.append((task_id, attempt, new))
                result.events.append(event(batch_pk, task_id, attempt, S.PENDING, new, now,
                                           {"reason": f"parent {kind}"}))
                if new in KIND_OF:
                    nxt.setdefault(KIND_OF[new], []).append(task_id)
        frontier = nxt
    result.still_pending = bool(waiting)
    return result


def _decrement_children(
    session: Session, batch_pk: int, kind: str, parents: list[int], now: datetime
) -> Iterable[tuple[int, int, str]]:
    # Children come from the cached edges, and their rows are found by key. A join
    # or subquery from task_log to the edges would let the planner scan every open
    # row of the batch per finished parent (fresh rows have no statistics):
    # quadratic work for a fan-in.
    children = sorted({c for p in parents for c in catalog.task_def(session, p).children})
    if not children:
        return []
    if len(parents) == 1:
        # By key: the (batch_pk, task_id) indexes find each child directly.
        stmt = _single_parent_update(kind)
        params = {"k_batch": batch_pk, "children": children, "now": now}
        return [(r[0], r[1], r[2]) for r in session.connection().execute(stmt, params)]
    child_rows = session.connection().execute(
        select(TaskLog.id).where(TaskLog.batch_pk == batch_pk, TaskLog.task_id.in_(children),
                                 TaskLog.map_index == -1)
    ).scalars().all()
    # A child may have several parents in this set: count its edges from the set.
    n: ColumnElement[Any] = (
        select(func.count())
        .select_from(TaskDependency)
        .where(
            TaskDependency.child_task_id == TaskLog.task_id,
            TaskDependency.parent_task_id.in_(parents),
        )
        .scalar_subquery()
    )
    pending = TaskLog.pending_parents - n
    failed = TaskLog.failed_parents + (n if kind == FAILED else literal(0))
    skipped = TaskLog.skipped_parents + (n if kind == SKIPPED else literal(0))
    values: dict[Any, Any] = {
        TaskLog.pending_parents: pending,
        TaskLog.failed_parents: failed,
        TaskLog.skipped_parents: skipped,
        **_status_dependent_values(ready_status(pending, failed, skipped), now),
    }
    stmt = (
        update(task_log_table)
        .where(
            TaskLog.id.in_(child_rows),
            # Only a waiting child listens: once promoted or failed, later parents
            # finishing change nothing, and a duplicate can never re-promote it.
            TaskLog.status == S.PENDING,
        )
        .values(values)
        .returning(TaskLog.task_id, TaskLog.attempt, TaskLog.status)
    )
    return [(r[0], r[1], r[2]) for r in session.execute(stmt)]


_single_parent_updates: dict[str, Any] = {}


def _single_parent_update(kind: str) -> Any:
    """The decrement for one finished parent, built once per kind: building the CASE
    expressions costs more Python than the statement costs Postgres."""
    stmt = _single_parent_updates.get(kind)
    if stmt is None:
        n = literal(1)
        pending = TaskLog.pending_parents - n
        failed = TaskLog.failed_parents + (n if kind == FAILED else literal(0))
        skipped = TaskLog.skipped_parents + (n if kind == SKIPPED else literal(0))
        now = bindparam("now", type_=UTCDateTime())
        stmt = (
            update(task_log_table)
            .where(TaskLog.batch_pk == bindparam("k_batch"),
                   TaskLog.task_id.in_(bindparam("children", expanding=True)),
                   TaskLog.map_index == -1, TaskLog.status == S.PENDING)
            .values({
                TaskLog.pending_parents: pending,
                TaskLog.failed_parents: failed,
                TaskLog.skipped_parents: skipped,
                **_status_dependent_values(ready_status(pending, failed, skipped), now),
            })
            .returning(TaskLog.task_id, TaskLog.attempt, TaskLog.status)
        )
        _single_parent_updates[kind] = stmt
    return stmt


def evaluate_ready(
    session: Session, batch_pk: int, task_ids: list[int] | None, now: datetime
) -> Promotion:
    """Re-evaluate PENDING rows from their counters as they stand (after a reset)."""
    pending, failed, skipped = (
        TaskLog.pending_parents, TaskLog.failed_parents, TaskLog.skipped_parents,
    )
    new_status = ready_status(pending, failed, skipped)
    stmt = update(TaskLog).where(
        TaskLog.batch_pk == batch_pk,
        TaskLog.status == S.PENDING,
        TaskLog.waiting_for_file.is_(False),
        new_status != S.PENDING.value,
    )
    if task_ids is not None:
        stmt = stmt.where(TaskLog.task_id.in_(task_ids))
    rows = session.execute(
        stmt.values(_status_dependent_values(new_status, now))
        .returning(TaskLog.task_id, TaskLog.attempt, TaskLog.status)
        .execution_options(synchronize_session=False)
    ).all()
    result = Promotion()
    terminal: dict[str, list[int]] = {}
    for task_id, attempt, status in rows:
        new = TaskStatus(status)
        result.changed.append((task_id, attempt, new))
        result.events.append(event(batch_pk, task_id, attempt, S.PENDING, new, now,
                                   {"reason": "re-evaluated"}))
        if new in KIND_OF:
            terminal.setdefault(KIND_OF[new], []).append(task_id)
    if terminal:
        more = check_and_trigger_children(session, batch_pk, terminal, now)
        result.changed.extend(more.changed)
        result.events.extend(more.events)
    return result
