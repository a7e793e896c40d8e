"""Alerts: derived once from the transitions, delivered from the outbox to a real HTTP
webhook on 127.0.0.1 and to the Pub/Sub emulator's `alerts` topic; retried with
backoff while a receiver is down, given up on when it refuses for good, and never
in the way of a task."""

from __future__ import annotations

import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import alerts, engine
from orchestrator.adapters.gcp.pubsub import PubSubPublisher
from orchestrator.adapters.webhook import WebhookSink
from orchestrator.alerts import TopicSink
from orchestrator.db.models import Alert, AlertDelivery, Batch
from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.errors import PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import StartBatch
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.sync import sync_pipeline
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.conftest import FakeClock
from tests.pubsub_emulator import PubSubEmulator, pubsub_emulator  # noqa: F401
from tests.webhook import WebhookReceiver, webhook_receiver

ERROR = "PermanentError: analytics.sales has no column amount\nTraceback (most recent call last):"


def bad_data(ctx: TaskContext) -> dict[str, Any]:
    raise PermanentError(ERROR.split(": ", 1)[1])


def flaky(ctx: TaskContext) -> dict[str, Any]:
    raise RuntimeError("connection reset by peer")


def pipeline(name: str = "sales", *, fail: str | None = "bad_data", attempts: int = 1,
             alerts_: Any = None) -> Any:
    load: dict[str, Any] = {"name": "load", "handler": "noop"}
    if fail:
        load = {"name": "load", "handler": "python",
                "config": {"callable": f"tests.test_alerts:{fail}"},
                "retry": {"max_attempts": attempts, "initial_delay_s": 10}}
    data: dict[str, Any] = {"name": name, "tasks": [
        load, {"name": "report", "handler": "noop", "depends_on": ["load"]}]}
    if alerts_ is not None:
        data["alerts"] = alerts_
    return build_pipeline(data, known_handlers={"noop", "python"})


def run_batch(router: Router, published: RecordingPublisher, name: str, batch_id: str) -> None:
    router.start_batch(StartBatch(type="start_batch", pipeline=name, batch_id=batch_id))
    published.pump(router)


def deliveries(sessions: sessionmaker[Session]) -> list[tuple[str, str, int, bool, bool]]:
    with sessions() as s:
        return [(k, c, n, d is not None, f is not None) for k, c, n, d, f in s.execute(
            select(Alert.kind, AlertDelivery.channel, AlertDelivery.attempts,
                   AlertDelivery.delivered_at, AlertDelivery.failed_at)
            .join(Alert, Alert.id == AlertDelivery.alert_id).order_by(Alert.id))]


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


def make_router(sessions: sessionmaker[Session], published: Any, clock: FakeClock,
                sinks: dict[str, Any], events: tuple[str, ...] = alerts.DEFAULT_EVENTS) -> Router:
    reset_process_caches()
    return Router(sessions, published, clock=clock, alert_sinks=sinks, alert_events=events)


@pytest.mark.postgres
def test_a_failure_alerts_once_per_kind_with_the_error_and_the_command(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        receiver: WebhookReceiver) -> None:
    """A task that fails after its last retry: one task_failed and one batch_failed reach
    the webhook, each saying what failed, the error's first line and `orchestrator why`;
    the retry before it alerts nothing, and later sweeps send nothing again."""
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(receiver.url)},
                         events=("batch_failed", "task_failed"))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(fail="flaky", attempts=2),
                                                     clock.now()))
    run_batch(router, published, "sales", "2024-03")
    assert router.sweep().alerts_created == 0  # RETRYING is not a failure yet
    clock.advance(11)
    router.sweep()
    published.pump(router)
    report = router.sweep()
    assert (report.alerts_created, report.alerts_delivered) == (2, 2)
    for _ in range(3):
        clock.advance(600)
        assert router.sweep().alerts_delivered == 0
    task_text, batch_text = receiver.texts()
    assert task_text.splitlines() == [
        "[error] task_failed: sales/2024-03: task load failed on attempt 2",
        # The error names where it was raised (the handler's own line).
        f"RuntimeError: connection reset by peer (at {__file__}:"
        f"{flaky.__code__.co_firstlineno + 1} in flaky)",
        "More: `orchestrator why 2024-03 load -p sales`"]
    assert batch_text.splitlines()[0] == "[error] batch_failed: sales/2024-03: batch FAILED: load failed"
    assert batch_text.splitlines()[2] == "More: `orchestrator why 2024-03 load -p sales`"
    assert [d["content_type"] for d in receiver.received] == ["application/json"] * 2
    assert set(receiver.received[0]["body"]) == {"text"}  # Slack-compatible, nothing else


HEALED: list[bool] = []


def heals(ctx: TaskContext) -> dict[str, Any]:
    if not HEALED:
        raise PermanentError("the source table is empty")
    return {}


@pytest.mark.postgres
def test_a_failure_retried_before_the_sweep_read_it_pages_no_one(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        receiver: WebhookReceiver) -> None:
    """The batch failed and was retried (successfully) before the next sweep: the
    failure is already handled, so no task_failed or batch_failed alert is sent for it.
    A rerun that fails again alerts, once."""
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(receiver.url)},
                         events=("batch_failed", "task_failed"))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(fail="heals"), clock.now()))
    HEALED.clear()
    for batch_id, heal in (("2024-04", True), ("2024-05", False)):
        run_batch(router, published, "sales", batch_id)
        with pg_sessions() as s:
            assert s.execute(select(Batch.status).where(Batch.batch_id == batch_id)
                             ).scalar_one() == "FAILED"
        if heal:
            HEALED.append(True)
        queued = transaction(pg_sessions, lambda s, b=batch_id: engine.retry_batch(
            s, "sales", b, clock.now()))
        router.publish(queued)
        published.pump(router)
        HEALED.clear()
        report = router.sweep()
        assert report.alerts_created == (0 if heal else 2), batch_id
    assert sorted(t.splitlines()[0] for t in receiver.texts()) == [
        "[error] batch_failed: sales/2024-05: batch FAILED: load failed",
        "[error] task_failed: sales/2024-05: task load failed on attempt 2"]


@pytest.mark.postgres
def test_the_error_in_an_alert_is_its_first_line(pg_sessions: sessionmaker[Session],
                                                 clock: FakeClock, published: RecordingPublisher,
                                                 receiver: WebhookReceiver) -> None:
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(receiver.url)})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    run_batch(router, published, "sales", "2024-04")
    router.sweep()
    (text,) = receiver.texts()
    assert text.splitlines()[1] == "PermanentError: analytics.sales has no column amount"


@pytest.mark.postgres
def test_a_failed_batch_writes_the_error_line_a_log_based_alert_matches(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        caplog: pytest.LogCaptureFixture) -> None:
    """Cloud Monitoring's policy (terraform/alerts.tf) matches jsonPayload.event."""
    from orchestrator.logs import JsonFormatter

    router = make_router(pg_sessions, published, clock, {})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline("ok", fail=None), clock.now()))
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        run_batch(router, published, "sales", "b1")
        run_batch(router, published, "ok", "b2")
    entries = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    failed = [e for e in entries if e.get("event") == "batch_failed"]
    assert [(e["severity"], e["pipeline"], e["batch_id"]) for e in failed] == [
        ("ERROR", "sales", "b1")]


@pytest.mark.postgres
def test_a_webhook_answering_500_for_a_while_gets_the_alert_later_once(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        receiver: WebhookReceiver) -> None:
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(receiver.url)})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    receiver.fail_next(3)
    run_batch(router, published, "sales", "b1")
    report = router.sweep()
    assert (report.alerts_created, report.alerts_delivered, report.alerts_retrying) == (1, 0, 1)
    # Backoff: 30 s, then 60 s, then 120 s; a sweep before the next try sends nothing.
    for wait, expect_requests in ((29, 1), (2, 2), (59, 2), (2, 3), (121, 4), (3600, 4)):
        clock.advance(wait)
        router.sweep()
        assert len(receiver.received) == expect_requests, wait
    assert len(receiver.accepted) == 1
    assert deliveries(pg_sessions) == [("batch_failed", "webhook", 4, True, False)]
    with pg_sessions() as s:
        (row,) = alerts.recent(s)
    assert row["deliveries"][0]["state"] == "delivered"


@pytest.mark.postgres
def test_a_receiver_that_refuses_for_good_is_given_up_and_logged(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture) -> None:
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(receiver.url)})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    receiver.fail_next(100, status=404)
    run_batch(router, published, "sales", "b1")
    with caplog.at_level(logging.ERROR, logger="orchestrator"):
        router.sweep()
    clock.advance(86400)
    router.sweep()
    assert len(receiver.received) == 1
    assert deliveries(pg_sessions) == [("batch_failed", "webhook", 1, False, True)]
    assert any("giving up" in r.getMessage() and "404" in r.getMessage() for r in caplog.records)
    # The URL (a credential) is never in a log line.
    assert all("secret" not in r.getMessage() for r in caplog.records)


@pytest.mark.postgres
def test_a_receiver_that_is_down_never_holds_up_a_task(
        pg_sessions: sessionmaker[Session], clock: FakeClock,
        published: RecordingPublisher) -> None:
    """Nothing listens at the webhook's address: batches still run to the end, the sweep
    finishes its maintenance and reports the alert as retrying."""
    with webhook_receiver() as gone:
        url = gone.url
    router = make_router(pg_sessions, published, clock, {"webhook": WebhookSink(url)})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline("ok", fail=None), clock.now()))
    run_batch(router, published, "sales", "b1")
    report = router.sweep()
    assert (report.alerts_retrying, report.errors) == (1, [])
    run_batch(router, published, "ok", "b2")
    with pg_sessions() as s:
        assert set(s.execute(select(Batch.batch_id, Batch.status)).all()) == {
            ("b1", "FAILED"), ("b2", "SUCCESS")}


@pytest.mark.postgres
def test_concurrent_sweeps_create_and_deliver_each_alert_once(
        pg_sessions: sessionmaker[Session], pg_url: str, clock: FakeClock,
        published: RecordingPublisher, receiver: WebhookReceiver) -> None:
    router = make_router(pg_sessions, published, clock, {})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    for i in range(8):
        run_batch(router, published, "sales", f"b{i}")
    engines = [make_engine(pg_url, pool_size=2, max_overflow=0) for _ in range(6)]
    sweepers = [Router(make_sessionmaker(e), RecordingPublisher(), clock=clock,
                       alert_sinks={"webhook": WebhookSink(receiver.url)}) for e in engines]
    barrier = threading.Barrier(len(sweepers))

    def sweep(r: Router) -> int:
        barrier.wait()
        return r.sweep().alerts_created

    try:
        with ThreadPoolExecutor(len(sweepers)) as pool:
            created = list(pool.map(sweep, sweepers))
        for r in sweepers:
            r.sweep()
    finally:
        for e in engines:
            e.dispose()
    assert sum(created) == 8
    first_lines = Counter(t.splitlines()[0] for t in receiver.texts())
    assert len(first_lines) == 8 and set(first_lines.values()) == {1}


@pytest.mark.postgres
def test_a_pipeline_chooses_its_events_and_channels(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        receiver: WebhookReceiver) -> None:
    """`alerts: {events: [batch_succeeded], to: [pubsub]}` sends a success to the topic
    only; a pipeline that says nothing gets the project's default (no success alert)."""
    topic = RecordingPublisher()
    router = make_router(pg_sessions, published, clock, {
        "webhook": WebhookSink(receiver.url), "pubsub": TopicSink(topic)})
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline("loud", fail=None, alerts_={
        "events": ["batch_succeeded"], "to": ["pubsub"]}), clock.now()))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline("quiet", fail=None),
                                                     clock.now()))
    run_batch(router, published, "loud", "b1")
    run_batch(router, published, "quiet", "b1")
    router.sweep()
    assert receiver.received == []
    (message,) = topic.messages
    assert message.data["kind"] == "batch_succeeded" and message.data["pipeline"] == "loud"
    assert message.attributes["kind"] == "batch_succeeded"
    assert message.attributes["alert_id"] == str(message.data["id"])


def test_alerts_work_on_sqlite_too(sqlite_engine: Any, clock: FakeClock,
                                   published: RecordingPublisher) -> None:
    sessions = make_sessionmaker(sqlite_engine)
    topic = RecordingPublisher()
    router = make_router(sessions, published, clock, {"pubsub": TopicSink(topic)})
    transaction(sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    run_batch(router, published, "sales", "b1")
    assert router.sweep().alerts_delivered == 1
    assert router.sweep().alerts_delivered == 0
    assert [m.data["kind"] for m in topic.messages] == ["batch_failed"]


@pytest.mark.emulator
@pytest.mark.postgres
def test_the_alerts_topic_receives_each_alert_once_on_the_pubsub_emulator(
        pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
        pubsub_emulator: PubSubEmulator) -> None:  # noqa: F811
    pubsub_emulator.create_topic("alerts-t")
    pubsub_emulator.create_subscription("alerts-t", "alerts-t-pull")
    router = make_router(pg_sessions, published, clock, {
        "pubsub": TopicSink(PubSubPublisher(pubsub_emulator.project, "alerts-t"))},
        events=("batch_failed", "task_failed"))
    transaction(pg_sessions, lambda s: sync_pipeline(s, pipeline(), clock.now()))
    run_batch(router, published, "sales", "2024-03")
    assert router.sweep().alerts_delivered == 2
    router.sweep()
    got = pubsub_emulator.pull("alerts-t-pull", want=3, timeout=8)
    assert sorted(m.attributes["kind"] for m in got) == ["batch_failed", "task_failed"]
    docs = {m.attributes["kind"]: json.loads(m.data) for m in got}
    assert docs["task_failed"]["schema"] == "orchestrator.alert/v1"
    assert docs["task_failed"]["command"] == "orchestrator why 2024-03 load -p sales"
    assert docs["batch_failed"]["error"] == ERROR.splitlines()[0]


def test_an_upgrade_does_not_alert_about_failures_from_before_it(tmp_path: Any,
                                                                 clock: FakeClock) -> None:
    """The alerts cursor starts at the newest event when the migration creates it."""
    from sqlalchemy import text

    from orchestrator.db.migrate import upgrade

    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        upgrade(engine, "0007")
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO pipelines (id, name, description, version, definition_hash, "
                "definition, created_at, updated_at) VALUES (1, 'old', '', 1, 'h', '{}', "
                "'2024-01-01 00:00:00', '2024-01-01 00:00:00')"))
            conn.execute(text(
                "INSERT INTO batches (id, pipeline_id, pipeline_version, batch_id, params, status, "
                "created_at) VALUES (1, 1, 1, 'b', '{}', 'FAILED', '2024-01-01 00:00:00')"))
            for to in ("RUNNING", "FAILED"):
                conn.execute(text(
                    "INSERT INTO task_events (batch_pk, from_status, to_status, at) VALUES "
                    "(1, 'RUNNING', :to, '2024-01-01 00:00:00')"), {"to": to})
        upgrade(engine)
        with engine.connect() as conn:
            assert conn.execute(text(
                "SELECT last_event_id FROM event_cursors WHERE name = 'alerts'")).scalar() == 2
        topic = RecordingPublisher()
        reset_process_caches()
        router = Router(make_sessionmaker(engine), RecordingPublisher(), clock=clock,
                        alert_sinks={"pubsub": TopicSink(topic)})
        assert router.sweep().alerts_created == 0 and topic.messages == []
    finally:
        engine.dispose()
