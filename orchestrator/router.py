"""The router: the units that move a pipeline on, wired together once.

Each unit does one job and is tested alone:

- `delivery.DeliveryFront`: a Pub/Sub delivery (or a local bus message) in, typed
  and dispatched: start a batch, hand a task to the worker, fold in a dead letter;
- `worker.Worker`: claim a task, run its handler, record the outcome, continue
  the chain on this worker;
- `triggers.StorageTriggers`: a finalized object releases the task waiting for it;
- `sweeper.Sweeper`: the periodic pass (due retries, unclaimed tasks, expired
  leases, batches left open), which also runs the clock's units:
  `schedules.Schedules` (due ticks start their batches), `deadlines.Deadlines`
  (deadlines, warnings, late files) and `alerts.Alerts` (the alerts outbox);
- `dispatcher.Dispatcher`: what every committed transition is followed by
  (publish what it queued, free its concurrency slot, close its batch).

The same router runs behind the Cloud Functions (`functions/main.py`) and behind
the embedded runtime's in-process bus. It returns normally for everything that
is done or can never succeed (the edge acks), and raises `InfrastructureError`
only when the database or the publisher is unreachable (Pub/Sub redelivers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.alerts import DEFAULT_EVENTS, Alerts
from orchestrator.deadlines import Deadlines
from orchestrator.delivery import DeliveryFront
from orchestrator.dispatcher import Dispatcher, RouteResult, dispatch_message
from orchestrator.engine.types import BatchFinished, Dispatch
from orchestrator.messages import RunTask, StartBatch, UnknownMessage
from orchestrator.ports import AlertSink, Clock, ObjectStore, Publisher, SystemClock, Warehouse
from orchestrator.schedules import Schedules
from orchestrator.storage_events import StorageObject
from orchestrator.sweeper import Sweeper, SweepReport
from orchestrator.triggers import StorageTriggers
from orchestrator.worker import Worker

if TYPE_CHECKING:
    from orchestrator.edge import PubSubDelivery

__all__ = ["RouteResult", "Router", "SweepReport", "dispatch_message"]


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
        alert_sinks: Mapping[str, AlertSink] | None = None,
        alert_events: Iterable[str] = DEFAULT_EVENTS,
        attempt_log_bytes: int | None = None,
    ):
        self.sessions = sessions
        self.clock = clock or SystemClock()
        self.dispatcher = Dispatcher(sessions, publisher, self.clock,
                                     default_concurrency=default_concurrency,
                                     on_batch_finished=on_batch_finished)
        self.worker = Worker(sessions, self.dispatcher, self.clock,
                             warehouse_factory=warehouse_factory,
                             object_store_factory=object_store_factory,
                             default_concurrency=default_concurrency,
                             continuation_s=continuation_s,
                             **({"attempt_log_bytes": attempt_log_bytes}
                                if attempt_log_bytes is not None else {}))
        self.front = DeliveryFront(sessions, self.dispatcher, self.worker, self.clock)
        self.triggers = StorageTriggers(sessions, self.dispatcher, self.clock)
        self.alerts = Alerts(sessions, self.clock, sinks=alert_sinks,
                             default_events=alert_events)
        self.schedules = Schedules(sessions, self.dispatcher, self.clock)
        self.deadlines = Deadlines(sessions, self.dispatcher, self.clock, self.alerts)
        self.sweeper = Sweeper(sessions, self.dispatcher, self.clock,
                               redispatch_after_s=redispatch_after_s, schedules=self.schedules,
                               deadlines=self.deadlines, alerts=self.alerts)

    @property
    def publisher(self) -> Publisher:
        return self.dispatcher.publisher

    def deliver(self, delivery: PubSubDelivery) -> RouteResult:
        return self.front.deliver(delivery)

    def handle_payload(self, payload: bytes | str | dict[str, Any], **context: Any) -> RouteResult:
        return self.front.handle_payload(payload, **context)

    def handle(self, msg: StartBatch | RunTask | UnknownMessage, **context: Any) -> RouteResult:
        return self.front.handle(msg, **context)

    def start_batch(self, msg: StartBatch, **context: Any) -> RouteResult:
        return self.front.start_batch(msg, **context)

    def dead_letter(self, msg: StartBatch | RunTask | UnknownMessage, delivery_count: int,
                    **context: Any) -> RouteResult:
        return self.front.dead_letter(msg, delivery_count, **context)

    def run_task(self, msg: RunTask, **context: Any) -> RouteResult:
        return self.worker.run_task(msg, **context)

    def object_finalized(self, obj: StorageObject) -> RouteResult:
        return self.triggers.object_finalized(obj)

    def sweep(self) -> SweepReport:
        return self.sweeper.sweep()

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        self.dispatcher.publish(dispatches)
