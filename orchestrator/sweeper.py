"""The sweeper: one idempotent maintenance pass, run every minute by Cloud Scheduler
(locally, by a loop).

It is the safety net of every transition that happens elsewhere: RETRYING rows
whose backoff has passed are queued for their next attempt, QUEUED rows that no
worker claimed in time are published again, RUNNING rows whose lease expired
fail (and retry if attempts are left), and batches with nothing open left are
closed. Each step locks the rows it takes with SKIP LOCKED, so two sweeps at
once split the work instead of doing it twice.

It is also the clock, through units of their own: due schedule ticks start
their batches (`schedules`), deadlines and late files are applied
(`deadlines`), and alerts are derived and delivered (`alerts`). A failure in one
of those is reported and logged, and never stops the maintenance above.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, failpoints, logs
from orchestrator.alerts import Alerts
from orchestrator.db.session import transaction
from orchestrator.deadlines import Deadlines
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import attempts, maintenance
from orchestrator.engine.types import Outcome, TaskRow
from orchestrator.errors import InfrastructureError
from orchestrator.ports import Clock
from orchestrator.schedules import Schedules


@dataclass
class SweepReport:
    requeued: int = 0
    redispatched: int = 0
    expired: int = 0
    closed_batches: int = 0
    scheduled: int = 0
    missed_deadlines: int = 0
    deadline_warnings: int = 0
    files_late: int = 0
    files_failed: int = 0
    alerts_created: int = 0
    alerts_delivered: int = 0
    alerts_retrying: int = 0
    errors: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, clock: Clock,
                 *, redispatch_after_s: float = 60.0, schedules: Schedules | None = None,
                 deadlines: Deadlines | None = None, alerts: Alerts | None = None):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.clock = clock
        # A QUEUED task nobody claimed within this grace is published again.
        self.redispatch_after_s = redispatch_after_s
        self.schedules = schedules
        self.deadlines = deadlines
        self.alerts = alerts

    def sweep(self) -> SweepReport:
        """One idempotent maintenance pass (run every minute by the scheduler)."""
        report = SweepReport()
        if self.schedules is not None:
            self._step(report, "schedules", lambda: self._schedules(report))
        now = self.clock.now()
        due = transaction(self.sessions, lambda s: maintenance.requeue_due(s, now))
        self.dispatcher.publish(due)
        report.requeued = len(due)
        stale = transaction(self.sessions, lambda s: maintenance.redispatch_stale(
            s, now, self.redispatch_after_s))
        self.dispatcher.publish(stale)
        report.redispatched = len(stale)
        failpoints.hit("mid_sweep")
        report.expired = self._expire_leases(now, report)
        for batch_pk in transaction(self.sessions, maintenance.finished_open_batches):
            if self.dispatcher.close(batch_pk):
                report.closed_batches += 1
        if self.deadlines is not None:
            self._step(report, "deadlines", lambda: self._deadlines(report))
        if self.alerts is not None:
            self._step(report, "alerts", lambda: self._alerts(report))
        return report

    def _step(self, report: SweepReport, name: str, run: Callable[[], None]) -> None:
        try:
            run()
        except InfrastructureError:
            raise
        except Exception as exc:  # one unit's bug must not stop the others
            logs.error(f"sweep step {name} failed: {type(exc).__name__}: {exc}", step=name)
            report.errors.append(f"{name}: {type(exc).__name__}: {exc}")

    def _schedules(self, report: SweepReport) -> None:
        assert self.schedules is not None
        report.scheduled = len(self.schedules.tick())

    def _deadlines(self, report: SweepReport) -> None:
        assert self.deadlines is not None
        done = self.deadlines.apply()
        report.missed_deadlines = done.missed
        report.deadline_warnings = done.warned
        report.files_late = done.files_late
        report.files_failed = done.files_failed

    def _alerts(self, report: SweepReport) -> None:
        assert self.alerts is not None
        report.alerts_created = self.alerts.derive()
        sent = self.alerts.deliver()
        report.alerts_delivered = sent.delivered
        report.alerts_retrying = sent.retrying

    def _expire_leases(self, now: Any, report: SweepReport) -> int:
        def expire(s: Session) -> list[tuple[Outcome, TaskRow]]:
            done = []
            for batch_pk, task_id, attempt, map_index in maintenance.expired_leases(s, now):
                row = engine.lookup.resolve_task_by_id(s, batch_pk, task_id, map_index)
                delay = row.retry_delay(attempt)
                # A live worker reports its own timeout; past the lease's grace, the
                # worker is gone (a crash, a killed instance) or stuck outside Python.
                error = (f"timed out after {row.timeout_s:g}s: no result from its worker, "
                         "which stopped or was lost")
                outcome = engine.fail(s, row, attempt, error, now, retry_delay_s=delay)
                if outcome.applied:
                    attempts.close_lost(s, row, attempt,
                                        "ERROR" if delay is None else "RETRYING", error, now)
                done.append((outcome, row))
            return done

        results = transaction(self.sessions, expire)
        for outcome, row in results:
            logs.warning("timed out: no result from its worker (lease expired)",
                         pipeline=row.pipeline, batch_id=row.batch_id, task=row.task)
            self.dispatcher.after(outcome, row)
        return len(results)
