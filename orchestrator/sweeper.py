"""The sweeper: one idempotent maintenance pass, run every minute by Cloud Scheduler
(locally, by a loop).

It is the safety net of every transition that happens elsewhere: RETRYING rows
whose backoff has passed are queued for their next attempt, QUEUED rows that no
worker claimed in time are published again, RUNNING rows whose lease expired
fail (and retry if attempts are left), batches past their deadline are
cancelled, and batches with nothing open left are closed. Each step locks the
rows it takes with SKIP LOCKED, so two sweeps at once split the work instead
of doing it twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, failpoints, logs
from orchestrator.db.session import transaction
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine import maintenance
from orchestrator.engine.types import Outcome, TaskRow
from orchestrator.ports import Clock


@dataclass
class SweepReport:
    requeued: int = 0
    redispatched: int = 0
    expired: int = 0
    cancelled_batches: int = 0
    closed_batches: int = 0
    errors: list[str] = field(default_factory=list)


class Sweeper:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, clock: Clock,
                 *, redispatch_after_s: float = 60.0):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.clock = clock
        # A QUEUED task nobody claimed within this grace is published again.
        self.redispatch_after_s = redispatch_after_s

    def sweep(self) -> SweepReport:
        """One idempotent maintenance pass (run every minute by the scheduler)."""
        report = SweepReport()
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
        for pipeline, batch_id in transaction(self.sessions,
                                              lambda s: maintenance.overdue_batches(s, now)):
            def cancel(s: Session, p: str = pipeline, b: str = batch_id) -> int:
                return engine.cancel_batch(s, p, b, now, reason="deadline passed")

            transaction(self.sessions, cancel)
            logs.warning("batch cancelled: deadline passed", pipeline=pipeline, batch_id=batch_id)
            report.cancelled_batches += 1
        for batch_pk in transaction(self.sessions, maintenance.finished_open_batches):
            if self.dispatcher.close(batch_pk):
                report.closed_batches += 1
        return report

    def _expire_leases(self, now: Any, report: SweepReport) -> int:
        def expire(s: Session) -> list[tuple[Outcome, TaskRow]]:
            done = []
            for batch_pk, task_id, attempt, map_index in maintenance.expired_leases(s, now):
                row = engine.lookup.resolve_task_by_id(s, batch_pk, task_id, map_index)
                delay = row.retry_delay(attempt)
                outcome = engine.fail(s, row, attempt,
                                      f"lease expired: no result within {row.timeout_s:g}s",
                                      now, retry_delay_s=delay)
                done.append((outcome, row))
            return done

        results = transaction(self.sessions, expire)
        for outcome, row in results:
            logs.warning("lease expired", pipeline=row.pipeline, batch_id=row.batch_id,
                         task=row.task)
            self.dispatcher.after(outcome, row)
        return len(results)
