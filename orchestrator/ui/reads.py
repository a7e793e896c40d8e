"""The reads behind the web UI, one function per page panel; each takes a session and
never writes.

What the CLI shows too (a batch's status, `why`, the pipeline's tasks) comes from
`orchestrator.queries`, so the two never disagree; this module adds what only a page
needs: the filtered batch list, the recent-run marks, attempts for the timeline, each
attempt of a task with its log and traceback, the pages of a long event history, one
task's full row, a pipeline's versions.

Every statement is bounded by an index and a limit, whatever the size of the task log:
a page never reads more rows than it shows, except the batch page, which reads its
batch's task rows once (through `queries.batch_status`) for the counts, the graph and
the topological order of the table; and a task page, which reads the whole stored log
of the few attempts it shows (as bounded by the worker, `attempt_log_bytes`) and shows
its first and last lines.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from orchestrator.db.models import (
    Batch,
    Pipeline,
    Task,
    TaskAttempt,
    TaskDependency,
    TaskEvent,
    TaskLog,
)
from orchestrator.errors import NotFound
from orchestrator.status import BatchStatus, TaskStatus

BATCH_STATUSES = tuple(s.value for s in BatchStatus)
TASK_STATUSES = tuple(s.value for s in TaskStatus)
RUNNING_RECORD = "RUNNING"  # a task_attempts row whose attempt has not ended


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


# -- the batches page ---------------------------------------------------------------------


@dataclass(frozen=True)
class BatchFilter:
    pipeline: str | None = None
    status: str | None = None
    since: date | None = None  # created on or after this day (UTC)
    until: date | None = None  # created on or before this day (UTC)
    before: int | None = None  # the page after the batch with this primary key

    def query_args(self) -> dict[str, str]:
        """The filter as URL query arguments (for the "older" link)."""
        out = {"pipeline": self.pipeline, "status": self.status,
               "since": self.since.isoformat() if self.since else None,
               "until": self.until.isoformat() if self.until else None}
        return {k: v for k, v in out.items() if v}


@dataclass
class BatchRow:
    pk: int
    pipeline: str
    batch_id: str
    status: str
    params: dict[str, Any]
    created_at: datetime
    finished_at: datetime | None
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.created_at).total_seconds()

    @property
    def tasks(self) -> int:
        return sum(self.counts.values())


class CountsCache:
    """Task counts of finished batches, which cannot change while the batch stays
    finished: a retry reopens it (status RUNNING) and its next finish has a new
    `finished_at`, so (pk, status, finished_at) names one set of counts for good.
    Bounded; one per app, since primary keys mean nothing across databases."""

    def __init__(self, size: int = 4096):
        self.size = size
        self._data: OrderedDict[tuple[int, str, datetime | None], dict[str, int]] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(b: BatchRow) -> tuple[int, str, datetime | None] | None:
        return None if b.status == BatchStatus.RUNNING.value else (b.pk, b.status, b.finished_at)

    def get(self, b: BatchRow) -> dict[str, int] | None:
        key = self.key(b)
        with self._lock:
            if key is None or key not in self._data:
                return None
            self._data.move_to_end(key)
            return self._data[key]

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def put(self, b: BatchRow, counts: dict[str, int]) -> None:
        key = self.key(b)
        if key is None:
            return
        with self._lock:
            self._data[key] = counts
            while len(self._data) > self.size:
                self._data.popitem(last=False)


def batch_list(session: Session, filt: BatchFilter, limit: int = 50,
               cache: CountsCache | None = None) -> tuple[list[BatchRow], bool]:
    """The newest batches matching `filt`, newest first, and whether older ones exist.

    One indexed statement reads the page of batches (by `ix_batches_created_at`, or the
    pipeline's unique key); a second counts the tasks by status of only those batches
    still running or not counted before (by the task log's unique key), since a
    finished batch of 10,000 tasks costs 10,000 row reads to count."""
    page = (
        select(Batch.id, Batch.batch_id, Batch.status, Batch.params, Batch.created_at,
               Batch.finished_at, Pipeline.name.label("pipeline"))
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
    )
    if filt.pipeline:
        page = page.where(Pipeline.name == filt.pipeline)
    if filt.status:
        page = page.where(Batch.status == filt.status)
    if filt.since:
        page = page.where(Batch.created_at >= _midnight(filt.since))
    if filt.until:
        page = page.where(Batch.created_at < _midnight(filt.until + timedelta(days=1)))
    if filt.before is not None:
        anchor = select(Batch.created_at).where(Batch.id == filt.before).scalar_subquery()
        page = page.where(or_(Batch.created_at < anchor,
                              and_(Batch.created_at == anchor, Batch.id < filt.before)))
    rows = session.execute(
        page.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit + 1)
    ).all()
    batches = [BatchRow(r.id, r.pipeline, r.batch_id, _value(r.status), r.params or {},
                        r.created_at, r.finished_at) for r in rows[:limit]]
    todo: dict[int, BatchRow] = {}
    for b in batches:
        known = cache.get(b) if cache is not None else None
        if known is None:
            todo[b.pk] = b
        else:
            b.counts = dict(known)
    if todo:
        for pk, status, n in session.execute(
            select(TaskLog.batch_pk, TaskLog.status, func.count())
            .where(TaskLog.batch_pk.in_(list(todo)), TaskLog.map_index == -1)
            .group_by(TaskLog.batch_pk, TaskLog.status)
        ):
            todo[pk].counts[_value(status)] = int(n)
        for b in todo.values():
            b.counts = {s: b.counts[s] for s in TASK_STATUSES if s in b.counts}
            if cache is not None:
                cache.put(b, dict(b.counts))
    return batches, len(rows) > limit


def _midnight(d: date) -> datetime:
    return datetime(d.year, d.month, d.day, tzinfo=UTC)


@dataclass
class PipelineRuns:
    pipeline: str
    description: str
    version: int
    runs: list[BatchRow]  # newest first


def recent_runs(session: Session, per_pipeline: int = 20) -> list[PipelineRuns]:
    """Every pipeline with the status of its last runs, in one statement (a window over
    the batches table, which holds one row per run, never per task)."""
    ranked = (
        select(Batch.id, Batch.pipeline_id, Batch.batch_id, Batch.status, Batch.created_at,
               Batch.finished_at,
               func.row_number().over(partition_by=Batch.pipeline_id,
                                      order_by=(Batch.created_at.desc(), Batch.id.desc()))
               .label("rn"))
        .subquery()
    )
    rows = session.execute(
        select(Pipeline.name, Pipeline.description, Pipeline.version, ranked.c.id,
               ranked.c.batch_id, ranked.c.status, ranked.c.created_at, ranked.c.finished_at)
        .outerjoin(ranked, and_(ranked.c.pipeline_id == Pipeline.id,
                                ranked.c.rn <= per_pipeline))
        .order_by(Pipeline.name, ranked.c.rn)
    ).all()
    out: dict[str, PipelineRuns] = {}
    for r in rows:
        p = out.setdefault(r.name, PipelineRuns(r.name, r.description or "", r.version, []))
        if r.id is not None:
            p.runs.append(BatchRow(r.id, r.name, r.batch_id, _value(r.status), {},
                                   r.created_at, r.finished_at))
    return list(out.values())


# -- a batch ------------------------------------------------------------------------------


def batch_key(session: Session, pipeline: str, batch_id: str) -> tuple[int, str, datetime,
                                                                        datetime | None]:
    """(primary key, status, created_at, finished_at) of one batch; NotFound if none."""
    row = session.execute(
        select(Batch.id, Batch.status, Batch.created_at, Batch.finished_at)
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
    ).first()
    if row is None:
        raise NotFound(f"no batch {batch_id!r} of pipeline {pipeline!r}")
    return int(row.id), _value(row.status), row.created_at, row.finished_at


def batch_version(session: Session, pk: int) -> tuple[int, str]:
    """(newest event id, batch status): changes whenever anything in the batch moves,
    since every transition appends an event. Two index lookups."""
    newest = session.execute(
        select(func.max(TaskEvent.id)).where(TaskEvent.batch_pk == pk)
    ).scalar()
    status = session.execute(select(Batch.status).where(Batch.id == pk)).scalar()
    if status is None:
        raise NotFound("the batch no longer exists")
    return int(newest or 0), _value(status)


@dataclass
class Attempt:
    task: str
    map_index: int | None
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    # The status the attempt left RUNNING for, or RUNNING; with a record, what its end
    # did to the task (SUCCESS, RETRYING, ERROR) or DISCARDED (it came too late).
    outcome: str
    error: str | None
    # False: the attempt ended while QUEUED, without running (a circuit breaker
    # deferred it, or its message was dead-lettered before any worker claimed it).
    ran: bool = True
    note: str | None = None  # what the attempt did besides running ("expanded into 4")
    # From its `task_attempts` record, when it ran a handler:
    record_id: int | None = None
    worker: str | None = None
    log_dropped: int = 0
    traceback: str | None = None
    log: list[dict[str, Any]] | None = None  # None: not read (or no record)

    @property
    def name(self) -> str:
        return self.task if self.map_index is None else f"{self.task}[{self.map_index}]"

    @property
    def label(self) -> str:
        return f"{self.name} #{self.attempt}"

    @property
    def key(self) -> str:
        """An id for the page (an anchor, and what the script keeps across a refresh)."""
        return f"{self.attempt}" if self.map_index is None else f"{self.map_index}-{self.attempt}"

    @property
    def duration_s(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


def _detail_index(detail: dict[str, Any] | None) -> int | None:
    index = (detail or {}).get("map_index")
    return index if isinstance(index, int) else None


def attempts(session: Session, pk: int, task_id: int | None = None,
             limit: int = 1000, *, instance: int | None = None,
             not_run: bool = False) -> tuple[list[Attempt], bool]:
    """Every run of a task (or of the whole batch), oldest first, from the transitions
    into and out of RUNNING: start, end, how it ended and with what error. At most
    `limit` attempts; the flag says whether more exist.

    `instance` keeps one instance of a mapped task; `not_run` adds the attempts that
    ended while QUEUED (deferred, or dead-lettered) as attempts that did not run."""
    ends_queued = and_(TaskEvent.from_status == TaskStatus.QUEUED.value,
                       TaskEvent.to_status.in_([TaskStatus.RETRYING.value,
                                                TaskStatus.ERROR.value]))
    stmt = (
        select(TaskEvent.task_id, TaskEvent.attempt, TaskEvent.from_status,
               TaskEvent.to_status, TaskEvent.at, TaskEvent.detail, Task.name)
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.batch_pk == pk,
               or_(TaskEvent.to_status == TaskStatus.RUNNING.value,
                   TaskEvent.from_status == TaskStatus.RUNNING.value,
                   TaskEvent.to_status == TaskStatus.CANCELLED.value,
                   *((ends_queued,) if not_run else ())))
        .order_by(TaskEvent.id)
    )
    if task_id is not None:
        stmt = stmt.where(TaskEvent.task_id == task_id)
    if instance is not None:
        stmt = stmt.where(TaskEvent.detail["map_index"].as_integer() == instance)
    # Two events per attempt, and a little slack for cancellations.
    rows = session.execute(stmt.limit(2 * limit + 2)).all()
    open_: dict[tuple[int, int | None, int], Attempt] = {}
    done: list[Attempt] = []
    for r in rows:
        detail = r.detail or {}
        index = _detail_index(detail)
        key = (r.task_id, index, r.attempt or 0)
        error = detail.get("error") or detail.get("reason") or detail.get("deferred")
        if r.from_status == r.to_status == TaskStatus.RUNNING.value:
            # A mapped task's expansion: the same attempt, now waiting for its instances.
            if key in open_ and isinstance(detail.get("map_instances"), int):
                open_[key].note = f"expanded into {detail['map_instances']:,} instance(s)"
        elif r.to_status == TaskStatus.RUNNING.value:
            open_[key] = Attempt(r.name, index, r.attempt or 0, r.at, None, "RUNNING", None)
            done.append(open_[key])
        elif key in open_:
            a = open_.pop(key)
            a.finished_at, a.outcome = r.at, r.to_status
            a.error = str(error) if error is not None else None
        elif (r.from_status == TaskStatus.QUEUED.value
              and r.to_status != TaskStatus.CANCELLED.value):
            done.append(Attempt(r.name, index, r.attempt or 0, r.at, r.at, r.to_status,
                                str(error) if error is not None else None, ran=False))
    return done[:limit], len(done) > limit


def task_attempts(session: Session, pk: int, task_id: int, name: str, *,
                  instance: int | None = None, limit: int = 200,
                  bodies: int = 5) -> tuple[list[Attempt], bool]:
    """Every attempt of one task (or of one instance), oldest first: what the worker
    recorded of each (`task_attempts`: outcome, times, error, traceback, log) laid
    over the transitions, which also know the attempts that ran no handler (a mapped
    task's expansion, an attempt deferred or dead-lettered while queued) and end an
    attempt whose worker never could (a dead letter, an expired lease, a cancel).

    Only the last `bodies` attempts that ran a handler come with their traceback and
    log, read by a statement of their own: a mapped task's thousand attempts cost
    their short rows, never a thousand logs."""
    spans, more = attempts(session, pk, task_id, limit, instance=instance, not_run=True)
    stmt = (
        select(TaskAttempt.id, TaskAttempt.map_index, TaskAttempt.attempt, TaskAttempt.outcome,
               TaskAttempt.started_at, TaskAttempt.finished_at, TaskAttempt.error,
               TaskAttempt.log_dropped, TaskAttempt.worker)
        .where(TaskAttempt.batch_pk == pk, TaskAttempt.task_id == task_id)
    )
    if instance is not None:
        stmt = stmt.where(TaskAttempt.map_index == instance)
    elif more:
        # The transitions were cut at `limit`: only the records of those attempts count.
        stmt = stmt.where(TaskAttempt.map_index.in_(
            sorted({-1 if a.map_index is None else a.map_index for a in spans})))
    by_key = {(a.map_index, a.attempt): a for a in spans if a.ran}
    found = list(spans)
    for r in session.execute(stmt):
        index = None if r.map_index < 0 else r.map_index
        a = by_key.get((index, r.attempt))
        if a is None:
            if more:
                continue
            # A record with no transitions to match (never expected): shown as recorded.
            a = Attempt(name, index, r.attempt, r.started_at, r.finished_at, r.outcome, None)
            found.append(a)
        a.started_at = r.started_at
        if r.outcome != RUNNING_RECORD or a.outcome == TaskStatus.RUNNING.value:
            a.finished_at, a.outcome = r.finished_at, r.outcome
        # else: a record still RUNNING under a closed attempt lost its worker (a dead
        # letter, an expired lease): the transition knows how the attempt ended.
        a.record_id, a.worker, a.log_dropped = r.id, r.worker, int(r.log_dropped or 0)
        if r.error is not None:
            a.error = r.error
    found.sort(key=lambda a: a.started_at)
    more = more or len(found) > limit
    found = found[:limit]
    with_record = [a for a in found if a.record_id is not None][-bodies:] if bodies > 0 else []
    if with_record:
        texts = {r.id: r for r in session.execute(
            select(TaskAttempt.id, TaskAttempt.traceback, TaskAttempt.log)
            .where(TaskAttempt.id.in_([a.record_id for a in with_record])))}
        for a in with_record:
            t = texts.get(a.record_id)
            if t is not None:
                a.traceback, a.log = t.traceback, t.log if isinstance(t.log, list) else []
    return found, more


def log_stamp(session: Session, pk: int, task_id: int, instance: int | None = None
              ) -> datetime | None:
    """When a running attempt of the task last saved its log (None: none is running).
    One lookup by the records' unique key: the live task page reads it every second."""
    stmt = select(func.max(TaskAttempt.updated_at)).where(
        TaskAttempt.batch_pk == pk, TaskAttempt.task_id == task_id,
        TaskAttempt.outcome == RUNNING_RECORD)
    if instance is not None:
        stmt = stmt.where(TaskAttempt.map_index == instance)
    value: datetime | None = session.execute(stmt).scalar()
    return value


@dataclass
class EventRow:
    id: int
    at: datetime
    task: str | None
    attempt: int | None
    from_status: str | None
    to_status: str
    detail: dict[str, Any] | None


def events_page(session: Session, pk: int, after: int = 0, limit: int = 500,
                task_id: int | None = None) -> tuple[list[EventRow], bool]:
    """A page of the batch's history, oldest first, by `ix_task_events_batch`."""
    stmt = (
        select(TaskEvent.id, TaskEvent.at, Task.name, TaskEvent.attempt, TaskEvent.from_status,
               TaskEvent.to_status, TaskEvent.detail)
        .outerjoin(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.batch_pk == pk, TaskEvent.id > after)
        .order_by(TaskEvent.id)
        .limit(limit + 1)
    )
    if task_id is not None:
        stmt = stmt.where(TaskEvent.task_id == task_id)
    rows = session.execute(stmt).all()
    out = []
    for r in rows[:limit]:
        index = (r.detail or {}).get("map_index")
        name = f"{r.name}[{index}]" if r.name is not None and isinstance(index, int) else r.name
        out.append(EventRow(r.id, r.at, name, r.attempt, r.from_status, r.to_status, r.detail))
    return out, len(rows) > limit


# -- a task -------------------------------------------------------------------------------


@dataclass
class TaskDetail:
    task_id: int
    name: str
    handler: str
    status: str
    attempt: int
    max_attempts: int
    trigger_rule: str
    waiting_for_file: bool
    gcs_trigger: str | None
    input: Any
    output: Any
    error: str | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    next_attempt_at: datetime | None
    lease_expires_at: datetime | None
    timeout_s: float
    mapped: bool
    parents: list[tuple[str, str]] = field(default_factory=list)  # (name, status)
    children: list[tuple[str, str]] = field(default_factory=list)


def task_key(session: Session, pk: int, task: str) -> int:
    """The id of the batch's task named `task`; NotFound if it has none."""
    found = session.execute(
        select(Task.id).join(TaskLog, TaskLog.task_id == Task.id)
        .where(TaskLog.batch_pk == pk, TaskLog.map_index == -1, Task.name == task)
    ).scalar()
    if found is None:
        raise NotFound(f"no task {task!r} in this batch")
    return int(found)


def task_detail(session: Session, pk: int, task: str) -> TaskDetail:
    """One task's own row of the batch (not its instances), with its neighbours."""
    row = session.execute(
        select(Task.id, Task.name, Task.handler, Task.max_attempts, Task.timeout_s,
               Task.gcs_bucket, Task.gcs_pattern, Task.map_over, TaskLog.status,
               TaskLog.attempt, TaskLog.retry_base, TaskLog.trigger_rule,
               TaskLog.waiting_for_file, TaskLog.input, TaskLog.output, TaskLog.error,
               TaskLog.queued_at, TaskLog.started_at, TaskLog.finished_at,
               TaskLog.next_attempt_at, TaskLog.lease_expires_at)
        .join(TaskLog, TaskLog.task_id == Task.id)
        .where(TaskLog.batch_pk == pk, TaskLog.map_index == -1, Task.name == task)
    ).first()
    if row is None:
        raise NotFound(f"no task {task!r} in this batch")
    detail = TaskDetail(
        task_id=row.id, name=row.name, handler=row.handler, status=_value(row.status),
        attempt=row.attempt, max_attempts=int(row.retry_base or 0) + int(row.max_attempts),
        trigger_rule=_value(row.trigger_rule), waiting_for_file=bool(row.waiting_for_file),
        gcs_trigger=f"gs://{row.gcs_bucket}/{row.gcs_pattern}" if row.gcs_bucket else None,
        input=row.input, output=row.output, error=row.error, queued_at=row.queued_at,
        started_at=row.started_at, finished_at=row.finished_at,
        next_attempt_at=row.next_attempt_at, lease_expires_at=row.lease_expires_at,
        timeout_s=row.timeout_s, mapped=row.map_over is not None,
    )
    for column, other, target in (
        (TaskDependency.child_task_id, TaskDependency.parent_task_id, detail.parents),
        (TaskDependency.parent_task_id, TaskDependency.child_task_id, detail.children),
    ):
        for name, status in session.execute(
            select(Task.name, TaskLog.status)
            .join(TaskDependency, other == Task.id)
            .join(TaskLog, and_(TaskLog.task_id == Task.id, TaskLog.batch_pk == pk,
                                TaskLog.map_index == -1))
            .where(column == row.id)
            .order_by(Task.name)
        ):
            target.append((name, _value(status)))
    return detail


def has_instance(session: Session, pk: int, task_id: int, index: int) -> bool:
    return session.execute(
        select(TaskLog.id).where(TaskLog.batch_pk == pk, TaskLog.task_id == task_id,
                                 TaskLog.map_index == index)
    ).first() is not None


@dataclass
class InstanceRow:
    map_index: int
    status: str
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None


def instances(session: Session, pk: int, task_id: int, limit: int = 200) -> tuple[list[InstanceRow], int]:
    """The first instances of a mapped task (failed ones first), and how many there are."""
    failed_first = (TaskLog.status.in_([TaskStatus.ERROR.value, TaskStatus.CANCELLED.value,
                                        TaskStatus.RETRYING.value]))
    rows = session.execute(
        select(TaskLog.map_index, TaskLog.status, TaskLog.attempt, TaskLog.started_at,
               TaskLog.finished_at, TaskLog.error)
        .where(TaskLog.batch_pk == pk, TaskLog.task_id == task_id, TaskLog.map_index >= 0)
        .order_by(failed_first.desc(), TaskLog.map_index)
        .limit(limit)
    ).all()
    total = session.execute(
        select(func.count()).select_from(TaskLog)
        .where(TaskLog.batch_pk == pk, TaskLog.task_id == task_id, TaskLog.map_index >= 0)
    ).scalar() or 0
    return [InstanceRow(r.map_index, _value(r.status), r.attempt, r.started_at, r.finished_at,
                        r.error) for r in rows], int(total)


# -- a pipeline ---------------------------------------------------------------------------


@dataclass
class PipelineInfo:
    id: int
    name: str
    description: str
    version: int
    concurrency: int | None
    definition: dict[str, Any]
    created_at: datetime
    updated_at: datetime


def pipeline_info(session: Session, name: str) -> PipelineInfo:
    p = session.execute(select(Pipeline).where(Pipeline.name == name)).scalar_one_or_none()
    if p is None:
        raise NotFound(f"unknown pipeline {name!r}")
    return PipelineInfo(p.id, p.name, p.description or "", p.version, p.concurrency,
                        p.definition or {}, p.created_at, p.updated_at)


@dataclass
class TaskDefinition:
    name: str
    handler: str
    depends_on: list[str]
    trigger_rule: str
    max_attempts: int
    retry: str  # "5 s, x2, at most 60 s"
    timeout_s: float
    concurrency: int | None
    gcs_trigger: str | None
    map_over: dict[str, Any] | None


def pipeline_tasks(session: Session, pipeline_id: int, version: int) -> list[TaskDefinition]:
    """One version's tasks in the order of the definition, with their policies."""
    tasks = session.execute(
        select(Task).where(Task.pipeline_id == pipeline_id, Task.version == version)
        .order_by(Task.id)
    ).scalars().all()
    names = {t.id: t.name for t in tasks}
    parents: dict[int, list[str]] = {}
    for child, parent in session.execute(
        select(TaskDependency.child_task_id, TaskDependency.parent_task_id)
        .where(TaskDependency.child_task_id.in_(list(names)))
    ):
        parents.setdefault(child, []).append(names[parent])
    return [
        TaskDefinition(
            name=t.name, handler=t.handler, depends_on=sorted(parents.get(t.id, [])),
            trigger_rule=_value(t.trigger_rule), max_attempts=t.max_attempts,
            retry=(f"{t.retry_initial_delay_s:g} s, x{t.retry_backoff_factor:g}, "
                   f"at most {t.retry_max_delay_s:g} s"),
            timeout_s=t.timeout_s, concurrency=t.concurrency,
            gcs_trigger=f"gs://{t.gcs_bucket}/{t.gcs_pattern}" if t.gcs_bucket else None,
            map_over=t.map_over,
        )
        for t in tasks
    ]


@dataclass
class VersionRow:
    version: int
    tasks: int
    batches: int
    last_batch_at: datetime | None


def pipeline_versions(session: Session, pipeline_id: int) -> list[VersionRow]:
    """Every stored version, newest first, with its task count and how many batches ran it."""
    tasks = dict(session.execute(
        select(Task.version, func.count()).where(Task.pipeline_id == pipeline_id)
        .group_by(Task.version)
    ).all())
    runs = {v: (n, last) for v, n, last in session.execute(
        select(Batch.pipeline_version, func.count(), func.max(Batch.created_at))
        .where(Batch.pipeline_id == pipeline_id).group_by(Batch.pipeline_version)
    ).all()}
    return [VersionRow(v, int(tasks[v]), int(runs.get(v, (0, None))[0]), runs.get(v, (0, None))[1])
            for v in sorted(tasks, reverse=True)]


def pipeline_names(session: Session) -> list[str]:
    return list(session.execute(select(Pipeline.name).order_by(Pipeline.name)).scalars())

