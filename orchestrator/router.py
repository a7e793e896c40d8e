"""The router: one typed message (or storage event) in, guarded transitions out.

The same code runs behind the Cloud Function (`functions/main.py`) and behind
the embedded runtime's in-process bus. Its contract with the edge:

- it returns normally for everything that is done *or can never succeed*
  (malformed input, unknown names, duplicates, stale attempts): the edge acks;
- it raises `InfrastructureError` only when the database or the publisher is
  unreachable, so that Pub/Sub redelivers and the work happens later.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import breaker, concurrency, engine, failpoints, handlers, logs, mapping
from orchestrator.db.models import Pipeline, Task, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import maintenance
from orchestrator.engine.types import BatchFinished, Claimed, Dispatch, Outcome, TaskRow
from orchestrator.errors import InfrastructureError, InvalidInput, PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import RunTask, StartBatch, UnknownMessage, parse_message
from orchestrator.pipeline.spec import GcsTrigger
from orchestrator.ports import (
    Clock,
    ObjectStore,
    OutboundMessage,
    Publisher,
    SystemClock,
    Warehouse,
)
from orchestrator.status import TaskStatus
from orchestrator.storage_events import StorageObject

if TYPE_CHECKING:
    from orchestrator.edge import PubSubDelivery

# A dead letter may find its attempt still QUEUED (every delivery failed before the
# claim) or RUNNING (the worker died mid-attempt, its lease not yet swept).
DEAD_LETTER_FROM = (TaskStatus.QUEUED, TaskStatus.RUNNING)


@dataclass(frozen=True)
class RouteResult:
    """What became of one delivery. `outcome` is one of: started, exists, succeeded,
    failed, retrying, deferred, waiting (no free concurrency slot), expanded (a mapped
    task queued its instances), duplicate, stale, queued, ignored, invalid."""

    outcome: str
    detail: str = ""
    published: int = 0


@dataclass
class SweepReport:
    requeued: int = 0
    redispatched: int = 0
    expired: int = 0
    cancelled_batches: int = 0
    closed_batches: int = 0
    errors: list[str] = field(default_factory=list)


def dispatch_message(d: Dispatch) -> OutboundMessage:
    attributes = {"type": "run_task", "pipeline": d.pipeline, "batch_id": d.batch_id,
                  "task": d.task, "attempt": str(d.attempt)}
    if d.map_index >= 0:
        attributes["map_index"] = str(d.map_index)
    return OutboundMessage(data=d.message(), attributes=attributes)


class Router:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        publisher: Publisher,
        *,
        clock: Clock | None = None,
        warehouse_factory: Callable[[], Warehouse] | None = None,
        object_store_factory: Callable[[], ObjectStore] | None = None,
        redispatch_after_s: float = 60.0,
        on_batch_finished: Callable[[BatchFinished], None] | None = None,
        default_concurrency: int | None = None,
        continuation_s: float = 30.0,
    ):
        self.sessions = sessions
        # The cap on RUNNING attempts of a task that sets none (None: unlimited).
        self.default_concurrency = default_concurrency
        # How long one delivery may go on running children it claimed itself.
        self.continuation_s = continuation_s
        self.publisher = publisher
        self.clock = clock or SystemClock()
        self.warehouse_factory = warehouse_factory
        self.object_store_factory = object_store_factory
        self.redispatch_after_s = redispatch_after_s
        self.on_batch_finished = on_batch_finished

    # -- entry points ---------------------------------------------------------------

    def handle_payload(self, payload: bytes | str | dict[str, Any], **context: Any) -> RouteResult:
        """Parse and route one message; malformed input is logged and acknowledged."""
        try:
            msg = parse_message(payload)
        except InvalidInput as exc:
            logs.warning(f"rejected message: {exc}", outcome="invalid", **context)
            return RouteResult("invalid", str(exc))
        return self.handle(msg, **context)

    def deliver(self, delivery: PubSubDelivery) -> RouteResult:
        """One Pub/Sub delivery, decoded at the edge: a dead letter is folded into the
        task log, anything else is routed as a message."""
        context = delivery.log_context()
        count = delivery.dead_letter_count
        if count is None:
            return self.handle_payload(delivery.data, **context)
        try:
            msg = parse_message(delivery.data)
        except InvalidInput as exc:
            logs.warning(f"dead letter dropped: {exc}", outcome="invalid", **context)
            return RouteResult("invalid", str(exc))
        return self.dead_letter(msg, count, **context)

    def dead_letter(self, msg: StartBatch | RunTask | UnknownMessage, delivery_count: int,
                    **context: Any) -> RouteResult:
        """Pub/Sub gave up on `msg`: its task, if still QUEUED or RUNNING under that
        attempt, ends in ERROR now, so the batch finishes instead of waiting forever."""
        labels = {**_labels(msg), **context}
        if not isinstance(msg, RunTask):
            logs.error(f"dead letter of a {msg.type} message after {delivery_count} "
                       "delivery attempts; nothing to record", outcome="dead_letter", **labels)
            return RouteResult("ignored", f"dead-lettered {msg.type}")
        error = f"dead-lettered after {delivery_count} delivery attempts"
        now = self.clock.now()

        def record(s: Session) -> tuple[TaskRow, Outcome]:
            row = engine.resolve_task(s, msg.pipeline, msg.batch_id, msg.task, msg.map_index)
            return row, engine.fail(s, row, msg.attempt, error, now, retry_delay_s=None,
                                    from_states=DEAD_LETTER_FROM)

        try:
            row, outcome = transaction(self.sessions, record)
        except InvalidInput as exc:
            logs.warning(f"dead letter dropped: {exc}", outcome="invalid", **labels)
            return RouteResult("invalid", str(exc))
        if not outcome.applied:
            logs.info(f"dead letter ignored: task already moved on ({outcome.reason})",
                      outcome="duplicate", delivery_count=delivery_count, **labels)
            return RouteResult("duplicate", outcome.reason)
        self._after(outcome, row)
        logs.error(f"task failed: {error}", outcome="failed", delivery_count=delivery_count,
                   **labels)
        return RouteResult("failed", error, published=len(outcome.queued))

    def handle(self, msg: StartBatch | RunTask | UnknownMessage, **context: Any) -> RouteResult:
        try:
            if isinstance(msg, RunTask):
                return self.run_task(msg, **context)
            if isinstance(msg, StartBatch):
                return self.start_batch(msg, **context)
            logs.warning(f"ignored message of unknown type {msg.type!r}", outcome="ignored",
                         **context)
            return RouteResult("ignored", f"unknown message type {msg.type!r}")
        except InvalidInput as exc:
            logs.warning(f"rejected {msg.type}: {exc}", outcome="invalid",
                         **_labels(msg), **context)
            return RouteResult("invalid", str(exc))

    def start_batch(self, msg: StartBatch, **context: Any) -> RouteResult:
        labels = {**_labels(msg), **context}
        now = self.clock.now()
        deadline = now + timedelta(seconds=msg.deadline_s) if msg.deadline_s else None
        started = transaction(self.sessions, lambda s: engine.start_batch(
            s, msg.pipeline, msg.batch_id, msg.params, now, deadline_at=deadline))
        if not started.created:
            logs.info("batch already exists", outcome="exists", **labels)
            return RouteResult("exists")
        self.publish(started.queued)
        logs.info(f"batch started, {len(started.queued)} task(s) queued", outcome="started",
                  **labels)
        return RouteResult("started", published=len(started.queued))

    def run_task(self, msg: RunTask, **context: Any) -> RouteResult:
        labels = {**_labels(msg), **context}
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

        claimed, waiting = transaction(self.sessions, claim)
        if waiting:
            logs.info("no free concurrency slot: waiting for one", outcome="waiting", **labels)
            return RouteResult("waiting")
        if claimed is None:
            logs.info("duplicate or stale delivery: task is not QUEUED under this attempt",
                      outcome="duplicate", **labels)
            return RouteResult("duplicate")
        failpoints.hit("after_claim")
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
        if task is None or not self._is_plain(task):
            return None
        return engine.catalog.task_row(batch, task, msg.attempt)

    def _is_plain(self, task: engine.catalog.TaskDef) -> bool:
        return (task.map_over is None and task.concurrency is None
                and task.pipeline_concurrency is None and self.default_concurrency is None
                and breaker.policy_for(task.handler, task.config) is None)

    def _execute(self, claimed: Claimed, policy: breaker.Policy | RouteResult | None,
                 labels: dict[str, Any], *, may_continue: bool = True,
                 ) -> tuple[RouteResult, Claimed | None]:
        """Run a claimed attempt's handler and record its outcome; also returns the child
        claimed to run next on this worker, if any."""
        row = claimed.row
        attempt = claimed.attempt
        if row.map_over is not None and row.map_index < 0:
            return self._expand(claimed, labels), None
        started = time.perf_counter()
        try:
            output = self._run_handler(claimed)
        except PermanentError as exc:
            self._breaker_record(policy, ok=False)
            return self._fail(row, attempt, f"{type(exc).__name__}: {exc}", None, labels), None
        except Exception as exc:  # an unknown failure goes through the retry policy
            self._breaker_record(policy, ok=False)
            logs.emit(logging.WARNING, f"attempt failed: {type(exc).__name__}: {exc}",
                      outcome="failed", **labels)
            return self._fail(row, attempt, f"{type(exc).__name__}: {exc}",
                              row.retry_delay(attempt), labels), None
        elapsed_ms = (time.perf_counter() - started) * 1000
        self._breaker_record(policy, ok=True)
        done = self.clock.now()

        def commit_success(s: Session) -> tuple[Outcome, Claimed | None]:
            outcome = engine.succeed(s, row, attempt, output, done)
            known = {row.task_id: (output, TaskStatus.SUCCESS)} if row.map_index < 0 else {}
            nxt = (self._continue_with(s, outcome, done, known)
                   if outcome.applied and may_continue else None)
            failpoints.hit("before_success_commit")
            return outcome, nxt

        outcome, nxt = transaction(self.sessions, commit_success)
        if not outcome.applied:
            logs.warning(f"result discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason), None
        self._after(outcome, row)
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
            if batch is None or task is None or not self._is_plain(task):
                continue
            claimed = engine.claim(s, engine.catalog.task_row(batch, task, d.attempt), d.attempt,
                                   now, known_parents=known_parents)
            if claimed is not None:
                del outcome.queued[i]
                return claimed
        return None

    def object_finalized(self, obj: StorageObject) -> RouteResult:
        """A file landed: start its batch if needed and release the task waiting for it."""
        matches = transaction(self.sessions, lambda s: _matching_triggers(s, obj))
        if not matches:
            logs.info(f"no pipeline trigger matches {obj.uri}", outcome="ignored")
            return RouteResult("ignored", f"no trigger matches {obj.uri}")
        now = self.clock.now()
        published = 0
        outcomes = []
        for pipeline, task, batch_id in matches:
            labels = {"pipeline": pipeline, "batch_id": batch_id, "task": task}

            def release(s: Session, pipeline: str = pipeline, task: str = task,
                        batch_id: str = batch_id) -> tuple[engine.Started, Outcome]:
                started = engine.start_batch(s, pipeline, batch_id, {}, now)
                row = engine.resolve_task(s, pipeline, batch_id, task)
                return started, engine.release_waiting_root(s, row, obj.as_trigger(), now)

            try:
                started, released = transaction(self.sessions, release)
            except InvalidInput as exc:
                logs.warning(f"cannot start from {obj.uri}: {exc}", outcome="invalid", **labels)
                outcomes.append("invalid")
                continue
            queued = [*started.queued, *released.queued]
            self.publish(queued)
            published += len(queued)
            if released.applied:
                logs.info(f"file {obj.uri} arrived; task queued", outcome="queued", **labels)
                outcomes.append("queued")
            else:
                logs.info(f"file {obj.uri} arrived but {released.reason}", outcome="duplicate",
                          **labels)
                outcomes.append("duplicate")
        best = "queued" if "queued" in outcomes else (outcomes[0] if outcomes else "ignored")
        return RouteResult(best, published=published)

    # -- maintenance ----------------------------------------------------------------

    def sweep(self) -> SweepReport:
        """One idempotent maintenance pass (run every minute by the scheduler)."""
        report = SweepReport()
        now = self.clock.now()
        due = transaction(self.sessions, lambda s: maintenance.requeue_due(s, now))
        self.publish(due)
        report.requeued = len(due)
        stale = transaction(self.sessions, lambda s: maintenance.redispatch_stale(
            s, now, self.redispatch_after_s))
        self.publish(stale)
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
            if self._close(batch_pk):
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
            self._after(outcome, row)
        return len(results)

    # -- plumbing -------------------------------------------------------------------

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        if not dispatches:
            return
        failpoints.hit("before_publish")
        try:
            self.publisher.publish([dispatch_message(d) for d in dispatches])
        except InfrastructureError:
            raise
        except Exception as exc:
            # The rows are QUEUED and committed: the sweeper will publish them again.
            raise InfrastructureError(f"publish failed: {exc}") from exc

    def _run_handler(self, claimed: Claimed) -> dict[str, Any] | None:
        row = claimed.row
        try:
            fn = handlers.resolve(row.handler)
        except (KeyError, ImportError, AttributeError, ValueError, TypeError) as exc:
            raise PermanentError(f"handler {row.handler!r} cannot be loaded: {exc}") from exc
        ctx = TaskContext(
            pipeline=row.pipeline, batch_id=row.batch_id, task=row.task,
            attempt=claimed.attempt, config=row.config, input=claimed.input,
            deadline=claimed.lease_expires_at, warehouse_factory=self.warehouse_factory,
            object_store_factory=self.object_store_factory, clock=self.clock,
            active=lambda: self._still_running(row.log_id, claimed.attempt),
        )
        failpoints.hit("in_handler")
        output = fn(ctx)
        if output is None:
            return None
        if not isinstance(output, dict):
            raise PermanentError(f"handler returned {type(output).__name__}, expected a dict")
        try:
            return json.loads(json.dumps(output, default=str))
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"handler output is not JSON-serialisable: {exc}") from exc

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
              labels: dict[str, Any]) -> RouteResult:
        now = self.clock.now()
        outcome = transaction(self.sessions, lambda s: engine.fail(
            s, row, attempt, error, now, retry_delay_s=delay))
        if not outcome.applied:
            logs.warning(f"failure discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason)
        self._after(outcome, row)
        if delay is None:
            logs.error(f"task failed: {error}", outcome="failed", **labels)
            return RouteResult("failed", error, published=len(outcome.queued))
        logs.warning(f"will retry in {delay:g}s: {error}", outcome="retrying", **labels)
        return RouteResult("retrying", error, published=len(outcome.queued))

    def _after(self, outcome: Outcome, row: TaskRow) -> None:
        self.publish(outcome.queued)
        self._free_slot(row)
        if outcome.check_batch:
            self._close(row.batch_pk)

    def _free_slot(self, row: TaskRow) -> None:
        """`row` left RUNNING: if it held a limited slot, publish one task waiting for it
        now rather than at the sweeper's next redispatch."""
        if not concurrency.limits(row, self.default_concurrency):
            return
        now = self.clock.now()

        def wake(s: Session) -> list[Dispatch]:
            woken = concurrency.wake(s, row, now, self.default_concurrency)
            return maintenance.dispatches_of(s, woken)

        self.publish(transaction(self.sessions, wake))

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
                              lambda s: mapping.expand(s, row, claimed.attempt, items, now))
        if not outcome.applied:
            logs.warning(f"expansion discarded: {outcome.reason}", outcome="stale", **labels)
            return RouteResult("stale", outcome.reason)
        self._after(outcome, row)
        logs.info(f"mapped over {len(items)} item(s)", outcome="expanded", **labels)
        return RouteResult("expanded", published=len(outcome.queued))

    def _close(self, batch_pk: int) -> bool:
        now = self.clock.now()
        finished = transaction(self.sessions,
                               lambda s: engine.close_batch_if_done(s, batch_pk, now))
        if finished is None:
            return False
        logs.info(f"batch finished: {finished.status} in {finished.duration_s:.3f}s",
                  pipeline=finished.pipeline, batch_id=finished.batch_id)
        if self.on_batch_finished is not None:
            self.on_batch_finished(finished)
        return True


def _labels(msg: Any) -> dict[str, Any]:
    labels = {k: getattr(msg, k) for k in ("pipeline", "batch_id", "task", "attempt")
              if getattr(msg, k, None) is not None}
    if getattr(msg, "map_index", -1) >= 0:
        labels["map_index"] = msg.map_index
    return labels


def _matching_triggers(session: Session, obj: StorageObject) -> list[tuple[str, str, str]]:
    """(pipeline, task, batch_id) for every current task whose GCS trigger matches."""
    rows = session.execute(
        select(Pipeline.name, Task.name, Task.gcs_bucket, Task.gcs_pattern)
        .join(Task, (Task.pipeline_id == Pipeline.id) & (Task.version == Pipeline.version))
        .where(Task.gcs_bucket == obj.bucket)
    ).all()
    out = []
    for pipeline, task, bucket, pattern in rows:
        if bucket is None or pattern is None:
            continue
        batch_id = GcsTrigger(bucket=bucket, pattern=pattern).match(obj.bucket, obj.name)
        if batch_id is not None:
            out.append((pipeline, task, batch_id))
    return out
