"""The worker: claim a task, run its handler, record the outcome, continue the chain.

One `run_task` delivery becomes at most one claim (QUEUED -> RUNNING for exactly
one delivery of that attempt; duplicates and stale attempts are acknowledged),
one handler call and one terminal transition. Before the claim, a task with a
circuit breaker passes its gate; a claim over a concurrency limit waits, QUEUED,
for a slot. A mapped task's claim runs no handler: its list is resolved and its
row expands into instances.

The continuation keeps a chain fast: a child that a task's SUCCESS readied is
claimed in that same transaction and run here at once, with no publish and no
second delivery, for up to `continuation_s` per delivery.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import capture, engine, execution, failpoints, handlers, logs, mapping
from orchestrator.db.models import TaskLog
from orchestrator.db.session import (
    is_infrastructure,
    lean_transaction,
    single_statement,
    transaction,
)
from orchestrator.db.types import json_problem
from orchestrator.dispatcher import Dispatcher, RouteResult
from orchestrator.engine import attempts, batches, breaker, concurrency, expansion
from orchestrator.engine.types import Claimed, Outcome, TaskRow
from orchestrator.errors import PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import RunTask, log_labels
from orchestrator.ports import Clock, ObjectStore, Warehouse
from orchestrator.status import TaskStatus

# Which process ran an attempt (a function instance, in the cloud).
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def reset_in_worker_process() -> None:
    """In a worker process forked from a runtime: attempts are recorded under its pid."""
    global WORKER_ID
    WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


class Worker:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        dispatcher: Dispatcher,
        clock: Clock,
        *,
        warehouse_factory: Callable[[], Warehouse] | None = None,
        object_store_factory: Callable[[], ObjectStore] | None = None,
        default_concurrency: int | None = None,
        continuation_s: float = 30.0,
        attempt_log_bytes: int = capture.DEFAULT_LIMIT_BYTES,
    ):
        self.sessions = sessions
        # The bound on what one attempt's log keeps (its first and last lines).
        self.attempt_log_bytes = attempt_log_bytes
        self.dispatcher = dispatcher
        self.clock = clock
        self.warehouse_factory = warehouse_factory
        self.object_store_factory = object_store_factory
        # The cap on RUNNING attempts of a task that sets none (None: unlimited).
        self.default_concurrency = default_concurrency
        # How long one delivery may go on running children it claimed itself.
        self.continuation_s = continuation_s

    def run_task(self, msg: RunTask, **context: Any) -> RouteResult:
        labels = {**log_labels(msg), **context}
        now = self.clock.now()
        fast = self._plain_task(msg)
        policy: breaker.Policy | RouteResult | None = None
        if fast is None:
            policy = self._breaker_gate(msg, now)
            if isinstance(policy, RouteResult):
                logs.warning(f"not claimed: {policy.detail}", outcome="deferred", **labels)
                return policy

        def claim(s: Session) -> tuple[Claimed | None, bool]:
            if fast is not None:
                # Definitions from the catalog: the claim is the first and only read.
                return engine.claim(s, fast, msg.attempt, now), False
            row = engine.resolve_task(s, msg.pipeline, msg.batch_id, msg.task, msg.map_index)
            claimed = engine.claim(s, row, msg.attempt, now,
                                   default_concurrency=self.default_concurrency)
            # Still under the limits' locks: a slot freed from here on wakes this row.
            waiting = (claimed is None and bool(concurrency.limits(row, self.default_concurrency))
                       and concurrency.wait_for_slot(s, row, msg.attempt, now))
            return claimed, waiting

        # A plain claim is one statement: on PostgreSQL, its own transaction.
        claimed, waiting = (single_statement(self.sessions, claim) if fast is not None
                            else transaction(self.sessions, claim))
        if waiting:
            logs.info("no free concurrency slot: waiting for one", outcome="waiting", **labels)
            return RouteResult("waiting")
        if claimed is None:
            logs.info("duplicate or stale delivery: task is not QUEUED under this attempt",
                      outcome="duplicate", **labels)
            return RouteResult("duplicate")
        result, nxt = self._execute(claimed, policy, labels)
        # The continuation: a child this worker claimed in its parent's own SUCCESS
        # transaction runs here at once, with no publish and no second delivery. Past
        # the budget, the last one claimed still runs (it holds a lease), then we stop.
        deadline = time.monotonic() + self.continuation_s
        while nxt is not None:
            nxt_labels = {**context, "pipeline": nxt.row.pipeline, "batch_id": nxt.row.batch_id,
                          "task": nxt.row.display_name, "attempt": nxt.attempt}
            _, nxt = self._execute(nxt, None, nxt_labels,
                                   may_continue=time.monotonic() < deadline)
        return result

    def _plain_task(self, msg: RunTask) -> TaskRow | None:
        """The task as a row built from cached definitions, when nothing but the guarded
        claim stands between the delivery and the handler (no limit, breaker or map)."""
        if msg.map_index >= 0:
            return None
        with self.sessions() as s:
            batch = engine.catalog.batch_ref(s, msg.pipeline, msg.batch_id)
            if batch is None:
                return None
            task = engine.catalog.task_by_name(s, batch, msg.task)
        if task is None or not self._is_plain(task, batch):
            return None
        return engine.catalog.task_row(batch, task, msg.attempt)

    def _is_plain(self, task: engine.catalog.TaskDef, batch: engine.catalog.BatchRef) -> bool:
        return (task.map_over is None and task.concurrency is None
                and batch.concurrency is None and self.default_concurrency is None
                and breaker.policy_for(task.handler, task.config) is None)

    def _execute(self, claimed: Claimed, policy: breaker.Policy | RouteResult | None,
                 labels: dict[str, Any], *, may_continue: bool = True,
                 ) -> tuple[RouteResult, Claimed | None]:
        """Run a claimed attempt's handler and record its outcome; also returns the child
        claimed to run next on this worker, if any.

        The attempt belongs to this worker from its claim on, and so does whatever goes
        wrong with it: anything raised here that is not the database or the publisher
        being out of reach (which the delivery's redelivery retries) fails the attempt
        on the spot, with its real reason, instead of leaving it RUNNING until the lease
        expires and then blaming the lease.
        """
        try:
            failpoints.hit("after_claim")
            return self._attempt(claimed, policy, labels, may_continue=may_continue)
        except Exception as exc:
            if is_infrastructure(exc):
                raise
            return self._attempt_broke(claimed, exc, labels), None

    def _attempt_broke(self, claimed: Claimed, exc: Exception, labels: dict[str, Any]
                       ) -> RouteResult:
        """Record an attempt that failed around its handler (say, its result could not be
        stored): bad data fails the task, anything else goes through its retry policy."""
        row, attempt = claimed.row, claimed.attempt
        reason = f"{type(exc).__name__}: {exc}"
        logs.log.error(f"attempt failed outside its handler: {reason}", exc_info=exc,
                       extra={"fields": {"outcome": "failed", **labels}})
        permanent = isinstance(exc, PermanentError | DataError)
        return self._fail(row, attempt, reason, None if permanent else row.retry_delay(attempt),
                          labels)

    def _attempt(self, claimed: Claimed, policy: breaker.Policy | RouteResult | None,
                 labels: dict[str, Any], *, may_continue: bool = True,
                 ) -> tuple[RouteResult, Claimed | None]:
        row = claimed.row
        attempt = claimed.attempt
        if row.map_over is not None and row.map_index < 0:
            return self._expand(claimed, labels), None
        started = time.perf_counter()
        began = self.clock.now()
        log = capture.AttemptLog(self.attempt_log_bytes, echo=self._echo(labels))
        # Set once the watchdog's verdict on an abandoned attempt is recorded.
        recorded = threading.Event()
        try:
            output = self._run_handler(claimed, log, began, policy, labels, recorded)
        except execution.Abandoned as late:
            return self._late(row, attempt, began, log, late, recorded), None
        except Exception as exc:  # PermanentError fails now; the rest is retried
            return self._failed(row, attempt, began, log, exc, policy, labels), None
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._breaker_record(policy, ok=True)
        done = self.clock.now()
        record = self._record(began, log, None)

        def commit_success(s: Session) -> tuple[Outcome, Claimed | None]:
            # The attempt's record goes with the result (SUCCESS, or DISCARDED if fenced).
            outcome = engine.succeed(s, row, attempt, output, done, attempt_record=record)
            known = {row.task_id: (output, TaskStatus.SUCCESS)} if row.map_index < 0 else {}
            nxt = (self._continue_with(s, outcome, done, known)
                   if outcome.applied and may_continue else None)
            failpoints.hit("before_success_commit")
            return outcome, nxt

        # Whether the batch is still open is read with the COMMIT, when it is a question.
        (outcome, nxt), still_open = lean_transaction(
            self.sessions, commit_success,
            lambda done: (batches.open_task_read(row.batch_pk)
                          if done[0].check_batch else None))
        if not outcome.applied:
            logs.warning(f"result discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason), None
        self.dispatcher.after(outcome, row,
                              still_open=bool(still_open[0]) if still_open else None)
        logs.info(f"succeeded in {elapsed_ms:.1f} ms", outcome="succeeded", **labels)
        return RouteResult("succeeded", published=len(outcome.queued)), nxt

    def _continue_with(self, s: Session, outcome: Outcome, now: Any,
                       known_parents: dict[int, tuple[Any, Any]]) -> Claimed | None:
        """Claim one just-queued plain child in the parent's transaction, and take it out
        of what will be published. Duplicates stay harmless: a claimed child's message,
        if the sweeper ever sends one, finds it RUNNING and is acked as a duplicate."""
        if self.continuation_s <= 0:
            return None
        for i, d in enumerate(outcome.queued):
            if d.map_index >= 0:
                continue
            batch = engine.catalog.batch_ref(s, d.pipeline, d.batch_id)
            task = engine.catalog.task_by_name(s, batch, d.task) if batch else None
            if batch is None or task is None or not self._is_plain(task, batch):
                continue
            claimed = engine.claim(s, engine.catalog.task_row(batch, task, d.attempt), d.attempt,
                                   now, known_parents=known_parents)
            if claimed is not None:
                del outcome.queued[i]
                return claimed
        return None

    def _run_handler(self, claimed: Claimed, log: capture.AttemptLog, began: datetime,
                     policy: breaker.Policy | RouteResult | None, labels: dict[str, Any],
                     recorded: threading.Event) -> dict[str, Any] | None:
        row = claimed.row
        attempt = claimed.attempt
        try:
            fn = handlers.resolve(row.handler)
        except (KeyError, PermanentError, ValueError) as exc:
            raise PermanentError(f"handler {row.handler!r} cannot be loaded: {exc}") from exc
        # Set when the watchdog gives the attempt up (timeout, or fenced off).
        stop = threading.Event()
        ctx = TaskContext(
            pipeline=row.pipeline, batch_id=row.batch_id, task=row.task,
            attempt=attempt, config=row.config, input=claimed.input,
            deadline=began + timedelta(seconds=row.timeout_s),
            warehouse_factory=self.warehouse_factory,
            object_store_factory=self.object_store_factory, clock=self.clock,
            active=lambda: not stop.is_set() and self._still_running(row.log_id, attempt),
        )
        failpoints.hit("in_handler")
        saved = [log.version]

        def watch() -> bool:
            # Now and then while a long handler runs: save what it logged so far (for
            # `logs --follow`), and give up if the attempt no longer holds the task.
            if log.version != saved[0]:
                saved[0] = log.version
                self._save_log(row, attempt, began, log, attempts.RUNNING)
            return self._still_running(row.log_id, attempt)

        def abandon(reason: BaseException) -> None:
            try:
                if isinstance(reason, execution.TimedOut):
                    self._failed(row, attempt, began, log, reason, policy, labels)
                else:
                    self._save_log(row, attempt, began, log, attempts.DISCARDED, closed=True)
                    logs.warning("stopped waiting for the handler: the task is no longer "
                                 "RUNNING under this attempt (cancelled, or moved on)",
                                 outcome="stale", **labels)
            except Exception as exc:  # the sweeper's lease expiry is the safety net
                logs.error(f"could not record the abandoned attempt: {exc}", **labels)
            finally:
                recorded.set()

        output = execution.run_handler(fn, ctx, log, timeout_s=row.timeout_s, watch=watch,
                                       on_abandon=abandon, stop=stop)
        if output is None:
            return None
        if not isinstance(output, dict):
            raise PermanentError(f"handler returned {type(output).__name__}, expected a dict")
        try:
            stored = json.loads(json.dumps(output, default=str))
        except (TypeError, ValueError, RecursionError) as exc:
            raise PermanentError(f"handler output is not JSON-serialisable: {exc}") from exc
        if (problem := json_problem(stored, "output")) is not None:
            raise PermanentError(f"handler output cannot be stored: {problem}")
        return stored

    # -- the attempt's record ------------------------------------------------------------

    def _failed(self, row: TaskRow, attempt: int, began: datetime, log: capture.AttemptLog,
                exc: BaseException, policy: breaker.Policy | RouteResult | None,
                labels: dict[str, Any]) -> RouteResult:
        """The handler raised (or timed out): ERROR now, or through the retry policy."""
        failure = execution.describe(exc)
        self._breaker_record(policy, ok=False)
        delay = None if failure.permanent else row.retry_delay(attempt)
        if not failure.permanent:
            logs.emit(logging.WARNING, f"attempt failed: {failure.error}", outcome="failed",
                      **labels)
        return self._fail(row, attempt, failure.error, delay, labels,
                          record=self._record(began, log, failure))

    def _late(self, row: TaskRow, attempt: int, began: datetime, log: capture.AttemptLog,
              late: execution.Abandoned, recorded: threading.Event) -> RouteResult:
        """An abandoned handler returned at last: a note on its attempt, nothing else."""
        recorded.wait(30)
        what = (f"raised {type(late.error).__name__}: {late.error}" if late.error is not None
                else "returned")
        log.add("orchestrator", f"the handler {what} after {late.late_s:.1f} s, once its "
                                f"attempt had been given up ({late.reason}); this result was "
                                "discarded")
        self._save_log(row, attempt, began, log, attempts.DISCARDED)
        return RouteResult("stale", f"handler returned after it was given up ({late.reason})")

    def _echo(self, labels: dict[str, Any]) -> Any:
        fields = {k: labels[k] for k in ("pipeline", "batch_id", "task", "attempt")
                  if k in labels}
        return lambda entry: logs.task_line(entry, **fields)

    def _record(self, began: datetime, log: capture.AttemptLog,
                failure: execution.Failure | None) -> attempts.AttemptRecord:
        return attempts.AttemptRecord(
            started_at=began, finished_at=self.clock.now(),
            error=failure.error if failure else None,
            traceback=failure.traceback if failure else None,
            log=log.entries(), log_dropped=log.dropped, worker=WORKER_ID)

    def _save_log(self, row: TaskRow, attempt: int, began: datetime, log: capture.AttemptLog,
                  outcome: str, *, closed: bool = False) -> None:
        """The attempt's log so far (its outcome, if it has one, stays); `closed` ends a
        RUNNING attempt with this outcome."""
        now = self.clock.now()
        rec = attempts.AttemptRecord(started_at=began, outcome=outcome, log=log.entries(),
                                     log_dropped=log.dropped, worker=WORKER_ID,
                                     finished_at=now if closed else None)
        save = attempts.close_running if closed else attempts.save_log
        try:
            transaction(self.sessions, lambda s: save(s, row, attempt, rec, now))
        except Exception as exc:  # the log is a courtesy: never fail the attempt over it
            logs.warning(f"could not save the attempt's log: {exc}", pipeline=row.pipeline,
                         batch_id=row.batch_id, task=row.display_name, attempt=attempt)

    def _breaker_gate(self, msg: RunTask, now: Any) -> breaker.Policy | RouteResult | None:
        """The task's circuit breaker (None: it has none), or a `deferred` result when
        the breaker is open and the task was moved to RETRYING instead of claimed."""

        def gate(s: Session) -> breaker.Policy | RouteResult | None:
            row = engine.resolve_task(s, msg.pipeline, msg.batch_id, msg.task, msg.map_index)
            policy = breaker.policy_for(row.handler, row.config)
            # A duplicate or stale delivery is the claim's to reject, not the breaker's.
            if (policy is None or row.status != TaskStatus.QUEUED
                    or row.attempt != msg.attempt):
                return policy
            delay = breaker.gate(s, policy, now)
            if delay is None:
                return policy
            reason = f"circuit breaker {policy.key!r} is open; next try in {delay:g}s"
            outcome = engine.transitions.defer(s, row, msg.attempt, delay, reason, now)
            return RouteResult("deferred", reason) if outcome.applied else policy

        return transaction(self.sessions, gate)

    def _breaker_record(self, policy: breaker.Policy | RouteResult | None, *, ok: bool) -> None:
        if not isinstance(policy, breaker.Policy):
            return
        now = self.clock.now()
        if ok:
            transaction(self.sessions, lambda s: breaker.record_success(s, policy, now))
            return
        state = transaction(self.sessions, lambda s: breaker.record_failure(s, policy, now))
        if state == breaker.OPEN:
            logs.warning(f"circuit breaker {policy.key!r} is open", breaker=policy.key)

    def _still_running(self, log_id: int, attempt: int) -> bool:
        with self.sessions() as s:
            status = s.execute(
                select(TaskLog.status).where(TaskLog.id == log_id, TaskLog.attempt == attempt)
            ).scalar_one_or_none()
        return status == TaskStatus.RUNNING

    def _fail(self, row: TaskRow, attempt: int, error: str, delay: float | None,
              labels: dict[str, Any], *, record: attempts.AttemptRecord | None = None,
              ) -> RouteResult:
        now = self.clock.now()

        def commit_failure(s: Session) -> Outcome:
            outcome = engine.fail(s, row, attempt, error, now, retry_delay_s=delay)
            if record is not None:
                ended = ("ERROR" if delay is None else "RETRYING") if outcome.applied \
                    else attempts.DISCARDED
                attempts.finish(s, row, attempt, replace(record, outcome=ended), now)
            return outcome

        outcome = transaction(self.sessions, commit_failure)
        if not outcome.applied:
            logs.warning(f"failure discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason)
        self.dispatcher.after(outcome, row)
        if delay is None:
            logs.error(f"task failed: {error}", outcome="failed", **labels)
            return RouteResult("failed", error, published=len(outcome.queued))
        logs.warning(f"will retry in {delay:g}s: {error}", outcome="retrying", **labels)
        return RouteResult("retrying", error, published=len(outcome.queued))

    def _expand(self, claimed: Claimed, labels: dict[str, Any]) -> RouteResult:
        """A mapped task was claimed: resolve its list and queue one instance per item."""
        row = claimed.row
        try:
            store = self.object_store_factory() if self.object_store_factory else None
            items = mapping.resolve_items(row, claimed.input, store)
        except PermanentError as exc:
            return self._fail(row, claimed.attempt, f"{type(exc).__name__}: {exc}", None, labels)
        except Exception as exc:  # listing the prefix failed: the retry policy decides
            return self._fail(row, claimed.attempt, f"{type(exc).__name__}: {exc}",
                              row.retry_delay(claimed.attempt), labels)
        now = self.clock.now()
        outcome = transaction(self.sessions,
                              lambda s: expansion.expand(s, row, claimed.attempt, items, now))
        if not outcome.applied:
            logs.warning(f"expansion discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason)
        self.dispatcher.after(outcome, row)
        logs.info(f"mapped over {len(items)} item(s)", outcome="expanded", **labels)
        return RouteResult("expanded", published=len(outcome.queued))

