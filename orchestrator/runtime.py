"""Wiring: the one place where settings pick adapters.

`Runtime.embedded()` is the zero-setup default (SQLite file, in-process bus,
local buckets, DuckDB); `Runtime.cloud()` is what the Cloud Function builds
(Postgres via DATABASE_URL, Pub/Sub, BigQuery, GCS). Both wire the same router,
engine and handlers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine as eng
from orchestrator import logs, usercode
from orchestrator.db.models import Batch, Pipeline
from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.engine.types import BatchFinished
from orchestrator.event_stream import Callback, EventHub, Subscription, relay_once
from orchestrator.names import NameMap
from orchestrator.pipeline.timing import parse_alert_events
from orchestrator.ports import AlertSink, Clock, ObjectStore, Publisher, SystemClock, Warehouse
from orchestrator.router import Router
from orchestrator.settings import Settings, get_settings
from orchestrator.status import BATCH_TERMINAL, BatchStatus

if TYPE_CHECKING:
    # Migrations (alembic) and pipeline files (YAML) are the operator's business, never
    # a request's: imported where they are used, so the functions never load them.
    from orchestrator.pipeline.spec import PipelineSpec
    from orchestrator.pipeline.sync import SyncResult


class _Lazy:
    """Build an adapter on first use, once, thread-safely."""

    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._value: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = self._build()
        return self._value

    @property
    def built(self) -> Any:
        """The adapter, if it was ever asked for."""
        return self._value


def make_warehouse(settings: Settings) -> Warehouse:
    if settings.warehouse == "bigquery":
        from orchestrator.adapters.gcp.bigquery import BigQueryWarehouse

        return BigQueryWarehouse(project=settings.gcp_project, default_dataset=settings.bq_dataset,
                                 location=settings.bq_location,
                                 partition_decorators=settings.bq_partition_decorators,
                                 names=NameMap.from_settings(settings))
    from orchestrator.adapters.local.warehouse import DuckDBWarehouse

    return DuckDBWarehouse(settings.home / "warehouse.duckdb",
                           default_dataset=settings.bq_dataset or "analytics")


def make_object_store(settings: Settings) -> ObjectStore:
    if settings.object_store == "gcs":
        from orchestrator.adapters.gcp.storage import GcsObjectStore

        return GcsObjectStore(project=settings.gcp_project, names=NameMap.from_settings(settings))
    from orchestrator.adapters.local.object_store import LocalObjectStore

    return LocalObjectStore(settings.home / "buckets")


def make_alert_sinks(settings: Settings, topic_publisher: Publisher | None = None,
                     ) -> dict[str, AlertSink]:
    """The alert channels this deployment has: the `alerts` topic (given its publisher)
    and the webhook, when ORCHESTRATOR_ALERT_WEBHOOK_URL is set."""
    from orchestrator.alerts import TopicSink

    sinks: dict[str, AlertSink] = {}
    if topic_publisher is not None:
        sinks["pubsub"] = TopicSink(topic_publisher)
    if settings.alert_webhook_url is not None and settings.alert_webhook_url.get_secret_value():
        from orchestrator.adapters.webhook import WebhookSink

        sinks["webhook"] = WebhookSink(settings.alert_webhook_url.get_secret_value())
    return sinks


def _worker_router(settings: Settings, clock: Clock | None) -> Any:
    """What a worker process builds once it starts: a router of its own, over its own
    connections (a process never uses its parent's)."""

    def build(publisher: Publisher, on_finished: Callable[[BatchFinished], None]) -> Any:
        from orchestrator import execution, worker

        execution.reset_in_worker_process()
        worker.reset_in_worker_process()
        db = make_engine(settings.resolved_database_url(), pool_size=2, max_overflow=2,
                         pool_timeout=settings.db_pool_timeout_s,
                         prepared_statements=settings.db_prepared_statements)
        rt = Runtime(settings, db, publisher, clock=clock)
        rt.on_batch_finished(on_finished)
        return rt.router.handle_payload

    return build


class Runtime:
    def __init__(
        self,
        settings: Settings,
        db: Engine,
        publisher: Publisher,
        *,
        clock: Clock | None = None,
        bus: Any = None,
        warehouse_factory: Callable[[], Warehouse] | None = None,
        object_store_factory: Callable[[], ObjectStore] | None = None,
        events_publisher: Publisher | None = None,
        alert_sinks: Mapping[str, AlertSink] | None = None,
    ):
        self.settings = settings
        self.db = db
        self.sessions: sessionmaker[Session] = make_sessionmaker(db)
        self.clock = clock or SystemClock()
        self.bus = bus
        self.publisher = publisher
        self.warehouse = warehouse_factory or _Lazy(lambda: make_warehouse(settings))
        self.object_store = object_store_factory or _Lazy(lambda: make_object_store(settings))
        self._finished_listeners: list[Callable[[BatchFinished], None]] = []
        # Local subscribers to the event stream; the events topic in the cloud.
        self.events = EventHub(self.sessions)
        self.events_publisher = events_publisher
        self.router = Router(
            self.sessions, publisher, clock=self.clock,
            warehouse_factory=self.warehouse, object_store_factory=self.object_store,
            redispatch_after_s=settings.redispatch_after_s,
            on_batch_finished=self._batch_finished,
            default_concurrency=settings.default_concurrency,
            continuation_s=settings.continuation_s,
            alert_sinks=alert_sinks if alert_sinks is not None else make_alert_sinks(settings),
            alert_events=parse_alert_events(settings.alert_events),
            attempt_log_bytes=settings.attempt_log_bytes,
        )
        # The pipelines folder ships with the pipelines (and their Python modules):
        # `callable: "mytasks:run"` imports mytasks.py from there, here and in the cloud.
        usercode.add_path(settings.pipelines_dir)
        if bus is not None:
            bus.attach(self._route)
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()

    # -- construction -----------------------------------------------------------------

    @classmethod
    def embedded(cls, settings: Settings | None = None, *, workers: int | None = None,
                 clock: Clock | None = None, migrate_db: bool = True,
                 start: bool = True, processes: int | None = None) -> Runtime:
        """The embedded runtime. `processes` (or ORCHESTRATOR_WORKER_PROCESSES) > 0 runs
        that many worker processes instead of `workers` threads, on PostgreSQL; SQLite,
        which has one writer, keeps its threads."""
        from orchestrator.adapters.local.bus import InProcessBus

        settings = settings or get_settings()
        url = settings.resolved_database_url()
        db = make_engine(url, pool_size=max(8, (workers or settings.workers) * 2),
                         max_overflow=4, pool_timeout=settings.db_pool_timeout_s,
                         prepared_statements=settings.db_prepared_statements)
        if migrate_db:
            from orchestrator.db import migrate

            migrate.upgrade(db)
        procs = processes if processes is not None else settings.worker_processes
        if procs and db.dialect.name == "postgresql":
            from orchestrator.adapters.local.procbus import ProcessBus

            pbus = ProcessBus(procs, _worker_router(settings, clock))
            rt = cls(settings, db, pbus, clock=clock, bus=pbus)
            pbus.on_finished(rt._batch_finished_elsewhere)
            if start:
                pbus.start()
            return rt
        bus = InProcessBus(workers or settings.workers)
        rt = cls(settings, db, bus, clock=clock, bus=bus)
        if start:
            bus.start()
        return rt

    @classmethod
    def cloud(cls, settings: Settings | None = None) -> Runtime:
        from orchestrator.adapters.gcp.pubsub import PubSubPublisher, SharedClient

        settings = (settings or get_settings()).for_cloud()
        db = make_engine(settings.resolved_database_url(), pool_size=settings.db_pool_size,
                         max_overflow=settings.db_max_overflow,
                         pool_timeout=settings.db_pool_timeout_s,
                         prepared_statements=settings.db_prepared_statements)
        if not settings.gcp_project:
            raise RuntimeError("ORCHESTRATOR_GCP_PROJECT is not set")
        # One client (one channel) for the three topics, built by the first publish.
        client = SharedClient()
        alerts = PubSubPublisher(settings.gcp_project, settings.alerts_topic, shared=client)
        return cls(settings, db,
                   PubSubPublisher(settings.gcp_project, settings.tasks_topic, shared=client),
                   events_publisher=PubSubPublisher(settings.gcp_project, settings.events_topic,
                                                    shared=client),
                   alert_sinks=make_alert_sinks(settings, alerts))

    # -- operations -------------------------------------------------------------------

    def sync(self, path: str | Path) -> list[SyncResult]:
        from orchestrator.pipeline.load import load_pipelines

        specs = load_pipelines(path)
        return self.sync_specs(specs)

    def sync_specs(self, specs: list[PipelineSpec], *, replace: bool = False) -> list[SyncResult]:
        from orchestrator.pipeline.sync import sync_pipeline

        now = self.clock.now()
        return transaction(self.sessions, lambda s: [sync_pipeline(s, sp, now, replace=replace)
                                                     for sp in specs])

    def start_batch(self, pipeline: str, batch_id: str, params: dict[str, Any] | None = None,
                    deadline_s: float | None = None) -> bool:
        from orchestrator.messages import StartBatch

        msg = StartBatch(type="start_batch", pipeline=pipeline, batch_id=batch_id,
                         params=params or {}, deadline_s=deadline_s)
        try:
            return self.router.start_batch(msg).outcome == "started"
        finally:
            self.events.poke()

    def cancel(self, pipeline: str, batch_id: str) -> int:
        now = self.clock.now()
        n = transaction(self.sessions, lambda s: eng.cancel_batch(s, pipeline, batch_id, now))
        self.events.poke()
        return n

    def retry(self, pipeline: str, batch_id: str, tasks: list[str] | None = None) -> int:
        now = self.clock.now()
        queued = transaction(self.sessions,
                             lambda s: eng.retry_batch(s, pipeline, batch_id, now, tasks))
        self.events.poke()
        self.router.publish(queued)
        return len(queued)

    def batch_status(self, pipeline: str, batch_id: str) -> BatchStatus | None:
        with self.sessions() as s:
            return s.execute(
                select(Batch.status).join(Pipeline, Pipeline.id == Batch.pipeline_id)
                .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
            ).scalar_one_or_none()

    def wait(self, pipeline: str, batch_id: str, timeout: float = 60.0,
             sweep_every_s: float = 0.5) -> BatchStatus | None:
        """Block until the batch is terminal (sweeping now and then, as the scheduler
        would); returns the final status, or the current one on timeout."""
        deadline = time.monotonic() + timeout
        last_sweep = time.monotonic()
        while True:
            status = self.batch_status(pipeline, batch_id)
            if status in BATCH_TERMINAL:
                return status
            if time.monotonic() >= deadline:
                return status
            if self.bus is not None:
                self.bus.drain(timeout=0.05)
            if time.monotonic() - last_sweep >= sweep_every_s:
                self.router.sweep()
                self.events.poke()
                last_sweep = time.monotonic()
            else:
                time.sleep(0.002)

    def on_batch_finished(self, callback: Callable[[BatchFinished], None]) -> None:
        self._finished_listeners.append(callback)

    def on_alert(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(alert)` for each alert this process creates (the `dev` console)."""
        self.router.alerts.on_alert(callback)

    def on_scheduled(self, callback: Callable[[Any], None]) -> None:
        """Call `callback(started)` for each batch a schedule tick of this process starts."""
        self.router.schedules.on_started(callback)

    def subscribe(self, callback: Callback, *, from_start: bool = False) -> Subscription:
        """Call `callback(event)` for every transition from now on (schema
        `orchestrator.event/v1`, see `orchestrator.event_stream`), in order, from a
        thread of its own: a slow callback delays only its own events."""
        return self.events.subscribe(callback, from_start=from_start)

    def relay_events(self, *, skip_if_busy: bool = False) -> int:
        """Publish new transitions to the events topic (cloud); returns how many."""
        if self.events_publisher is None:
            return 0
        # A best-effort pass after a message must not keep its function waiting on a gap:
        # the sweeper's pass waits longer, and publishes what this one left.
        return relay_once(self.sessions, self.events_publisher, now=self.clock.now,
                          skip_if_busy=skip_if_busy, gap_wait_s=0.1 if skip_if_busy else 2.0)

    def _route(self, payload: Any) -> Any:
        try:
            return self.router.handle_payload(payload)
        finally:
            self.events.poke()

    def _batch_finished_elsewhere(self, finished: BatchFinished) -> None:
        """A worker process finished a batch: tell this process's listeners."""
        self.events.poke()
        self._batch_finished(finished)

    def _batch_finished(self, finished: BatchFinished) -> None:
        for cb in list(self._finished_listeners):
            try:
                cb(finished)
            except Exception as exc:  # a listener never breaks the engine
                logs.warning(f"batch-finished listener failed: {exc}")

    def start_sweeper(self, interval_s: float = 1.0) -> None:
        """Run the sweeper in the background, as Cloud Scheduler does every minute."""
        if self._sweeper is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.router.sweep()
                except Exception as exc:  # keep sweeping; the next pass retries
                    logs.warning(f"sweep failed: {exc}")
                self.events.poke()

        self._sweeper = threading.Thread(target=loop, name="orchestrator-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()
        self.events.close()
        if self._sweeper is not None:
            self._sweeper.join(5)
        if self.bus is not None:
            self.bus.stop()
        # A warehouse file (DuckDB) admits one writer: let the next command open it (a
        # job that an abandoned handler still runs keeps it; the process exit ends it).
        built = getattr(self.warehouse, "built", None)
        if built is not None and hasattr(built, "close"):
            built.close(timeout=2.0)
        self.db.dispose()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
