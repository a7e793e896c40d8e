"""Deadlines and late files: the time rules applied to batches that are running.

Every batch start (a message, a file, a schedule tick) goes through `start_batch`,
which stamps the new batch with its deadline and warning time, computed from its
own pipeline version's rules (or an explicit deadline for this batch) and its
logical time. Then, on each sweep, `Deadlines.apply`:

- a batch past its deadline: its open tasks are cancelled and it ends FAILED, with
  the reason in its event (from which `deadline_missed` alerts);
- a batch past its warning time: `deadline_warning` alerts, once, nothing is cancelled;
- a task still waiting for its file past `expected_by`: `file_late` alerts, naming the
  file and the batch;
- past `fail_after`: the task fails (ERROR), so its downstream learns it the usual way.

Each change is one guarded transaction (the batch row locked, or the task row's
status in the WHERE clause), so two sweeps at once apply a rule once.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, logs
from orchestrator.alerts import Alerts, document, status_command, why_command
from orchestrator.db.dialect import lock_skip_locked
from orchestrator.db.models import Alert, Batch, Pipeline, PipelineVersion, Task, TaskLog
from orchestrator.db.session import transaction
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import catalog, maintenance
from orchestrator.engine.types import Outcome, TaskRow
from orchestrator.errors import InvalidInput
from orchestrator.pipeline.params import resolve as resolve_params
from orchestrator.pipeline.timing import local_clock
from orchestrator.pipeline.versions import rules
from orchestrator.ports import Clock
from orchestrator.status import BatchStatus, TaskStatus

S = TaskStatus


def start_batch(session: Session, pipeline: str, batch_id: str, params: dict[str, Any] | None,
                now: datetime, *, deadline_s: float | None = None,
                logical_at: datetime | None = None) -> engine.Started:
    """Start a batch (idempotent on its id) under its version's time rules, with its
    params converted to the types the pipeline declares (InvalidInput if they are not)."""
    declared = session.execute(
        select(Pipeline.definition["params"]).where(Pipeline.name == pipeline)
    ).scalar_one_or_none()
    try:
        params = resolve_params(pipeline, declared, params)
    except InvalidInput:
        # The batch may exist already (a file arriving for a batch started by hand):
        # then there is nothing to start, and nothing wrong.
        if session.execute(select(Batch.id).join(Pipeline, Pipeline.id == Batch.pipeline_id)
                           .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
                           ).first() is None:
            raise
    started = engine.start_batch(session, pipeline, batch_id, params, now)
    if started.created:
        # Not the catalog: it would cache a batch this transaction may yet roll back.
        pipeline_pk, number = session.execute(
            select(Batch.pipeline_id, Batch.pipeline_version).where(Batch.id == started.batch_pk)
        ).one()
        version = rules(session, pipeline_pk, number)
        deadline = warn = None
        if version.deadline is not None:
            deadline, warn = version.deadline.times(now, logical_at or now, version.tz)
        if deadline_s is not None:
            deadline = now + timedelta(seconds=deadline_s)
        if warn is not None and deadline is not None and warn >= deadline:
            warn = None
        if deadline is not None or warn is not None or logical_at is not None:
            session.execute(
                update(Batch).where(Batch.id == started.batch_pk)
                .values(deadline_at=deadline, warn_at=warn, logical_at=logical_at)
                .execution_options(synchronize_session=False))
    return started


def file_uri(bucket: str | None, pattern: str | None, batch_id: str) -> str:
    return f"gs://{bucket}/{(pattern or '').replace('{batch_id}', batch_id)}"


@dataclass
class LateFile:
    batch: catalog.BatchRef
    task_id: int
    task: str
    uri: str
    expected_at: datetime | None
    fail_at: datetime | None
    tz: ZoneInfo


def late_files(session: Session, now: datetime) -> list[LateFile]:
    """Tasks of running batches still waiting for a file whose `expected_by` or
    `fail_after` has passed. Only versions with file expectations are looked at."""
    rows = session.execute(
        select(TaskLog.batch_pk, TaskLog.task_id, Batch.pipeline_id, Batch.pipeline_version,
               Batch.batch_id, Batch.params, Batch.created_at, Batch.logical_at, Pipeline.name,
               Task.name, Task.gcs_bucket, Task.gcs_pattern)
        .join(Batch, Batch.id == TaskLog.batch_pk)
        .join(PipelineVersion, (PipelineVersion.pipeline_id == Batch.pipeline_id)
              & (PipelineVersion.version == Batch.pipeline_version))
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .join(Task, Task.id == TaskLog.task_id)
        .where(Batch.status == BatchStatus.RUNNING, PipelineVersion.files.is_not(None),
               TaskLog.status == S.PENDING, TaskLog.waiting_for_file.is_(True),
               TaskLog.map_index == -1)
    ).all()
    out = []
    for (batch_pk, task_id, pipeline_pk, version, batch_id, params, created_at, logical_at,
         pipeline, task, bucket, pattern) in rows:
        r = rules(session, pipeline_pk, version)
        f = r.files.get(task)
        if f is None:
            continue
        logical = logical_at or created_at
        expected = f.expected_by.resolve(created_at, logical, r.tz) if f.expected_by else None
        fail = f.fail_after.resolve(created_at, logical, r.tz) if f.fail_after else None
        if (expected is None or expected > now) and (fail is None or fail > now):
            continue
        ref = catalog.BatchRef(batch_pk, pipeline_pk, pipeline, batch_id, version, params or {})
        out.append(LateFile(ref, task_id, task, file_uri(bucket, pattern, batch_id), expected,
                            fail, r.tz))
    return out


@dataclass
class DeadlineReport:
    missed: int = 0
    warned: int = 0
    files_late: int = 0
    files_failed: int = 0


class Deadlines:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, clock: Clock,
                 alerts: Alerts):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.clock = clock
        self.alerts = alerts

    def apply(self) -> DeadlineReport:
        now = self.clock.now()
        report = DeadlineReport()
        for pipeline, batch_id in transaction(self.sessions,
                                              lambda s: maintenance.overdue_batches(s, now)):
            if transaction(self.sessions, partial(self._fail_overdue, pipeline=pipeline,
                                                  batch_id=batch_id, now=now)):
                report.missed += 1
        for batch_pk in transaction(self.sessions, lambda s: _warnings_due(s, now)):
            created = transaction(self.sessions, partial(self._warn, batch_pk=batch_pk, now=now))
            if created is not None:
                report.warned += 1
                self.alerts.notify([created])
        late = transaction(self.sessions, lambda s: late_files(s, now))
        alerted = transaction(self.sessions, lambda s: _alerted(s, late)) if late else set()
        for f in late:
            if f.fail_at is not None and f.fail_at <= now and self._fail_file(f, now):
                report.files_failed += 1
            if (f.batch.batch_pk, f.task) not in alerted:
                created = transaction(self.sessions, partial(self._file_late, f=f, now=now))
                if created is not None:
                    report.files_late += 1
                    self.alerts.notify([created])
        return report

    def _fail_overdue(self, s: Session, pipeline: str, batch_id: str, now: datetime) -> bool:
        """RUNNING past its deadline -> open tasks CANCELLED, batch FAILED (once: the
        batch row is locked, and a second sweep finds it no longer RUNNING)."""
        batch = catalog.batch_ref(s, pipeline, batch_id)
        assert batch is not None
        row = s.execute(lock_skip_locked(s, select(Batch.deadline_at).where(
            Batch.id == batch.batch_pk, Batch.status == BatchStatus.RUNNING,
            Batch.deadline_at < now))).first()
        if row is None:
            return False
        tz = rules(s, batch.pipeline_pk, batch.version).tz
        reason = f"deadline {local_clock(row[0], tz)} passed"
        n = engine.cancel_batch(s, pipeline, batch_id, now, reason, final=BatchStatus.FAILED,
                                detail={"deadline_at": row[0].isoformat()})
        logs.error(f"batch failed: {reason}; {n} open task(s) cancelled", event="batch_failed",
                   outcome="deadline_missed", pipeline=pipeline, batch_id=batch_id)
        return True

    def _warn(self, s: Session, batch_pk: int, now: datetime) -> dict[str, Any] | None:
        """The warning time passed and the batch still runs: alert once (the warning time
        is cleared by the same guarded UPDATE that takes it)."""
        got = s.execute(
            update(Batch).where(Batch.id == batch_pk, Batch.status == BatchStatus.RUNNING,
                                Batch.warn_at <= now)
            .values(warn_at=None).returning(Batch.warn_at, Batch.deadline_at)
            .execution_options(synchronize_session=False)).first()
        if got is None:
            return None
        (pipeline, batch_id), = maintenance.batch_names(s, [batch_pk]).values()
        batch = catalog.batch_ref(s, pipeline, batch_id)
        assert batch is not None
        tz = rules(s, batch.pipeline_pk, batch.version).tz
        open_tasks = s.execute(select(TaskLog.id).where(
            TaskLog.batch_pk == batch_pk, TaskLog.status.in_(
                [S.PENDING, S.QUEUED, S.RUNNING, S.RETRYING]))).all()
        until = f"; deadline {local_clock(got[1], tz)}" if got[1] is not None else ""
        title = f"still running at {local_clock(now, tz)} with {len(open_tasks)} open task(s){until}"
        logs.warning(f"deadline warning: {title}", event="deadline_warning", pipeline=pipeline,
                     batch_id=batch_id)
        doc = document("deadline_warning", pipeline, batch_id, None, title, now,
                       command=status_command(pipeline, batch_id))
        return self.alerts.record(s, batch, "deadline_warning", None, doc, now)

    def _file_late(self, s: Session, f: LateFile, now: datetime) -> dict[str, Any] | None:
        since = f.expected_at or f.fail_at
        assert since is not None
        then = f"; the task fails at {local_clock(f.fail_at, f.tz)}" if (
            f.fail_at is not None and f.fail_at > now) else ""
        title = f"file {f.uri} has not arrived (late since {local_clock(since, f.tz)}){then}"
        doc = document("file_late", f.batch.pipeline, f.batch.batch_id, f.task, title, now,
                       command=why_command(f.batch.pipeline, f.batch.batch_id, f.task),
                       detail={"uri": f.uri, "expected_at": since.isoformat()})
        return self.alerts.record(s, f.batch, "file_late", f.task, doc, now)

    def _fail_file(self, f: LateFile, now: datetime) -> bool:
        """Still waiting past `fail_after`: PENDING -> ERROR, guarded on PENDING, so a file
        landing at the same moment either releases the task or finds it failed."""
        error = f"file {f.uri} did not arrive by {local_clock(f.fail_at or now, f.tz)}"

        def fail(s: Session) -> tuple[Outcome, TaskRow]:
            row = engine.lookup.resolve_task_by_id(s, f.batch.batch_pk, f.task_id, -1)
            return engine.fail(s, row, row.attempt, error, now, retry_delay_s=None,
                               from_states=(S.PENDING,)), row

        outcome, row = transaction(self.sessions, fail)
        if not outcome.applied:
            return False
        logs.error(f"task failed: {error}", outcome="failed", pipeline=f.batch.pipeline,
                   batch_id=f.batch.batch_id, task=f.task)
        self.dispatcher.after(outcome, row)
        return True


def _warnings_due(session: Session, now: datetime) -> list[int]:
    return list(session.execute(
        select(Batch.id).where(Batch.status == BatchStatus.RUNNING, Batch.warn_at <= now)
        .limit(100)).scalars())


def _alerted(session: Session, late: list[LateFile]) -> set[tuple[int, str]]:
    rows = session.execute(
        select(Alert.batch_pk, Alert.task).where(
            Alert.kind == "file_late", Alert.batch_pk.in_({f.batch.batch_pk for f in late}))
    ).all()
    return {(b, t) for b, t in rows}
