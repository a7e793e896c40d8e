"""The delivery front: one Pub/Sub delivery (or one message of the local bus) in,
typed, and handed to whoever handles its kind.

Its contract with the edge (`functions/main.py`) is kept here, in `_contained`:

- it raises only when the database or the publisher is out of reach
  (`is_infrastructure`), so that Pub/Sub redelivers and the work happens later;
- everything else returns, and the edge acknowledges: work done, duplicates and
  stale attempts, and every message that can never succeed (malformed, unknown
  names, values the database refuses, a bug met on the way). Those are logged with
  their reason and, when they concern a task still waiting for this very delivery
  (QUEUED under its attempt), recorded on it as ERROR with that reason, so its batch
  finishes instead of waiting for a message that will never come right. Redelivering
  such a message would only fail again, for as long as Pub/Sub keeps trying.

Once a delivery has claimed its attempt, whatever goes wrong with that attempt is the
worker's to record (`Worker._execute`), under the same rule.

A `start_batch` message starts its batch here; a `run_task` message goes to the
worker; a dead letter (Pub/Sub gave up on a message) is folded into the task log
so that its batch finishes instead of waiting forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import deadlines, engine, logs
from orchestrator.db.session import is_infrastructure, transaction
from orchestrator.db.types import storable_text
from orchestrator.dispatcher import Dispatcher, RouteResult
from orchestrator.engine.types import Outcome, TaskRow
from orchestrator.errors import InvalidInput
from orchestrator.messages import RunTask, StartBatch, UnknownMessage, log_labels, parse_message
from orchestrator.ports import Clock
from orchestrator.status import TaskStatus
from orchestrator.worker import Worker

if TYPE_CHECKING:
    from orchestrator.edge import PubSubDelivery

# A dead letter may find its attempt still QUEUED (every delivery failed before the
# claim) or RUNNING (the worker died mid-attempt, its lease not yet swept).
DEAD_LETTER_FROM = (TaskStatus.QUEUED, TaskStatus.RUNNING)


class DeliveryFront:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, worker: Worker,
                 clock: Clock):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.worker = worker
        self.clock = clock

    def handle_payload(self, payload: bytes | str | dict[str, Any], **context: Any) -> RouteResult:
        """Parse and route one message; malformed input is logged and acknowledged."""
        msg = self._parse(payload, "rejected message", context)
        if isinstance(msg, RouteResult):
            return msg
        return self.handle(msg, **context)

    def deliver(self, delivery: PubSubDelivery) -> RouteResult:
        """One Pub/Sub delivery, decoded at the edge: a dead letter is folded into the
        task log, anything else is routed as a message."""
        context = delivery.log_context()
        count = delivery.dead_letter_count
        if count is None:
            return self.handle_payload(delivery.data, **context)
        msg = self._parse(delivery.data, "dead letter dropped", context)
        if isinstance(msg, RouteResult):
            return msg
        return self.dead_letter(msg, count, **context)

    def _parse(self, payload: bytes | str | dict[str, Any], what: str,
               context: dict[str, Any]) -> StartBatch | RunTask | UnknownMessage | RouteResult:
        # Parsing touches no database or publisher: whatever it raises is about the input.
        try:
            return parse_message(payload)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, InvalidInput) else f"{type(exc).__name__}: {exc}"
            logs.warning(f"{what}: {reason}", outcome="invalid", **context)
            return RouteResult("invalid", reason)

    def handle(self, msg: StartBatch | RunTask | UnknownMessage, **context: Any) -> RouteResult:
        return self._contained(msg, context, lambda: self._route(msg, context), record=True)

    def dead_letter(self, msg: StartBatch | RunTask | UnknownMessage, delivery_count: int,
                    **context: Any) -> RouteResult:
        """Pub/Sub gave up on `msg`: its task, if still QUEUED or RUNNING under that
        attempt, ends in ERROR now, so the batch finishes instead of waiting forever."""
        return self._contained(msg, context,
                               lambda: self._dead_letter(msg, delivery_count, context),
                               record=False)

    def _contained(self, msg: StartBatch | RunTask | UnknownMessage, context: dict[str, Any],
                   work: Callable[[], RouteResult], *, record: bool) -> RouteResult:
        """The contract with the edge (see the module's docstring), in one place."""
        try:
            return work()
        except InvalidInput as exc:
            logs.warning(f"rejected {msg.type}: {exc}", outcome="invalid",
                         **log_labels(msg), **context)
            return RouteResult("invalid", str(exc))
        except Exception as exc:
            if is_infrastructure(exc):
                raise
            return self._poisoned(msg, exc, context, record=record)

    def _poisoned(self, msg: StartBatch | RunTask | UnknownMessage, exc: Exception,
                  context: dict[str, Any], *, record: bool) -> RouteResult:
        """A message that met an error no redelivery can cure: log it, with the traceback,
        and record it on the task it was waiting for, if any."""
        labels = {**log_labels(msg), **context}
        reason = storable_text(f"{type(exc).__name__}: {exc}")[:2000]
        logs.log.error(f"{msg.type} cannot succeed, acknowledged: {reason}", exc_info=exc,
                       extra={"fields": {"outcome": "invalid", **labels}})
        if not (record and isinstance(msg, RunTask)):
            return RouteResult("invalid", reason)
        error = f"cannot be run: {reason}"
        now = self.clock.now()

        def fail_waiting(s: Session) -> tuple[TaskRow, Outcome]:
            row = engine.resolve_task(s, msg.pipeline, msg.batch_id, msg.task, msg.map_index)
            return row, engine.fail(s, row, msg.attempt, error, now, retry_delay_s=None,
                                    from_states=(TaskStatus.QUEUED,))

        try:
            row, outcome = transaction(self.sessions, fail_waiting)
        except Exception as again:
            if is_infrastructure(again):
                raise
            logs.error(f"could not record the failure on the task: {type(again).__name__}: "
                       f"{again}", outcome="invalid", **labels)
            return RouteResult("invalid", reason)
        if not outcome.applied:
            return RouteResult("invalid", reason)
        self.dispatcher.after(outcome, row)
        logs.error(f"task failed: {error}", outcome="failed", **labels)
        return RouteResult("failed", error, published=len(outcome.queued))

    def _dead_letter(self, msg: StartBatch | RunTask | UnknownMessage, delivery_count: int,
                     context: dict[str, Any]) -> RouteResult:
        labels = {**log_labels(msg), **context}
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
        self.dispatcher.after(outcome, row)
        logs.error(f"task failed: {error}", outcome="failed", delivery_count=delivery_count,
                   **labels)
        return RouteResult("failed", error, published=len(outcome.queued))

    def _route(self, msg: StartBatch | RunTask | UnknownMessage,
               context: dict[str, Any]) -> RouteResult:
        if isinstance(msg, RunTask):
            return self.worker.run_task(msg, **context)
        if isinstance(msg, StartBatch):
            return self.start_batch(msg, **context)
        logs.warning(f"ignored message of unknown type {msg.type!r}", outcome="ignored",
                     **context)
        return RouteResult("ignored", f"unknown message type {msg.type!r}")

    def start_batch(self, msg: StartBatch, **context: Any) -> RouteResult:
        labels = {**log_labels(msg), **context}
        now = self.clock.now()
        started = transaction(self.sessions, lambda s: deadlines.start_batch(
            s, msg.pipeline, msg.batch_id, msg.params, now, deadline_s=msg.deadline_s))
        if not started.created:
            logs.info("batch already exists", outcome="exists", **labels)
            return RouteResult("exists")
        self.dispatcher.publish(started.queued)
        logs.info(f"batch started, {len(started.queued)} task(s) queued", outcome="started",
                  **labels)
        return RouteResult("started", published=len(started.queued))

