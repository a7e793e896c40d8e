"""Deadlines and late files on real Postgres with an injected clock: a warning that
alerts and cancels nothing, a deadline that cancels the open tasks and fails the
batch with the reason, a file late since its `expected_by` and failed at its
`fail_after`, and what `why` and `status` say meanwhile."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import queries
from orchestrator.db.models import Alert, Batch, TaskEvent
from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.engine import claim, resolve_task, succeed
from orchestrator.messages import StartBatch
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.sync import sync_pipeline
from orchestrator.router import Router
from orchestrator.storage_events import StorageObject
from orchestrator.testing import RecordingAlertSink, RecordingPublisher, reset_process_caches
from tests.conftest import FakeClock
from tests.units import statuses

pytestmark = pytest.mark.postgres

PARIS = ZoneInfo("Europe/Paris")
EVERYTHING = ["batch_failed", "task_failed", "deadline_missed", "deadline_warning", "file_late"]


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS).astimezone(UTC)  # type: ignore[misc]


def daily_sales(deadline: dict[str, str] | None = None, **trigger: str) -> Any:
    data: dict[str, Any] = {
        "name": "daily_sales",
        "schedule": {"cron": "0 6 * * *", "timezone": "Europe/Paris", "batch_id": "{date}"},
        "alerts": {"events": EVERYTHING},
        "tasks": [
            {"name": "load_sales", "handler": "noop", "timeout_s": 7200, "gcs_trigger": {
                "bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS", **trigger}},
            {"name": "report", "handler": "noop", "depends_on": ["load_sales"]},
        ],
    }
    if deadline:
        data["deadline"] = deadline
    return build_pipeline(data, known_handlers={"noop"})


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def topic() -> RecordingAlertSink:
    return RecordingAlertSink()


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], clock: FakeClock, published: RecordingPublisher,
           topic: RecordingAlertSink) -> Router:
    reset_process_caches()
    return Router(pg_sessions, published, clock=clock, alert_sinks={"pubsub": topic})


def start_at_six(router: Router, clock: FakeClock, spec: Any) -> None:
    clock.t = paris(2024, 3, 1, 5, 0)
    transaction(router.sessions, lambda s: sync_pipeline(s, spec, clock.now()))
    clock.t = paris(2024, 3, 1, 6, 0, 20)
    assert router.sweep().scheduled == 1


def why(router: Router, task: str, batch_id: str = "2024-03-01") -> str:
    with router.sessions() as s:
        return queries.why(s, batch_id, task, router.clock.now(), "daily_sales")


def land(router: Router, batch_id: str = "2024-03-01") -> str:
    return router.object_finalized(StorageObject(
        bucket="landing", name=f"sales/{batch_id}/_SUCCESS", generation="1")).outcome


def test_a_late_file_alerts_once_then_fails_its_task_at_fail_after(
        router: Router, clock: FakeClock, published: RecordingPublisher,
        topic: RecordingAlertSink) -> None:
    start_at_six(router, clock, daily_sales(expected_by="06:30", fail_after="08:00"))
    uri = "gs://landing/sales/2024-03-01/_SUCCESS"
    clock.t = paris(2024, 3, 1, 6, 29)
    assert router.sweep().files_late == 0
    assert why(router, "load_sales") == (
        f"load_sales: waiting for its file {uri} (expected by 06:30 Europe/Paris; the task "
        "fails at 08:00 Europe/Paris)")
    clock.t = paris(2024, 3, 1, 6, 31)
    assert router.sweep().files_late == 1
    assert router.sweep().files_late == 0
    (alert,) = topic.kinds("file_late")
    assert alert["title"] == (f"file {uri} has not arrived (late since 06:30 Europe/Paris); "
                              "the task fails at 08:00 Europe/Paris")
    assert (alert["batch_id"], alert["task"]) == ("2024-03-01", "load_sales")
    assert alert["command"] == "orchestrator why 2024-03-01 load_sales -p daily_sales"
    assert "late since 06:30 Europe/Paris" in why(router, "load_sales")
    assert "late since 06:30 Europe/Paris" in why(router, "report")
    clock.t = paris(2024, 3, 1, 8, 0, 30)
    assert router.sweep().files_failed == 1
    assert statuses(router.sessions) == {"load_sales": "ERROR", "report": "UPSTREAM_FAILED"}
    assert why(router, "load_sales").endswith(
        f"with: file {uri} did not arrive by 08:00 Europe/Paris")
    router.sweep()
    assert [a["kind"] for a in topic.alerts] == ["file_late", "task_failed", "batch_failed"]
    # The file turns up after all: its task has moved on, nothing runs twice.
    assert land(router) == "duplicate"
    assert router.sweep().files_failed == 0


def test_a_file_that_arrives_in_time_is_never_late(router: Router, clock: FakeClock,
                                                   published: RecordingPublisher,
                                                   topic: RecordingAlertSink) -> None:
    start_at_six(router, clock, daily_sales(expected_by="06:30", fail_after="2h"))
    clock.t = paris(2024, 3, 1, 6, 10)
    assert land(router) == "queued"
    published.pump(router)
    clock.t = paris(2024, 3, 1, 9, 0)
    report = router.sweep()
    assert (report.files_late, report.files_failed) == (0, 0)
    assert statuses(router.sessions) == {"load_sales": "SUCCESS", "report": "SUCCESS"}
    assert topic.alerts == []


def test_a_warning_alerts_without_cancelling_and_the_deadline_fails_the_batch(
        router: Router, clock: FakeClock, published: RecordingPublisher,
        topic: RecordingAlertSink) -> None:
    """deadline: {at: "07:30", warn_at: "07:00"} on the 06:00 tick: at 07:00 a warning and
    nothing else; at 07:30 the open tasks are cancelled and the batch FAILED with the
    reason, and the zombie result that comes later is fenced off."""
    start_at_six(router, clock, daily_sales({"at": "07:30", "warn_at": "07:00"}))
    assert land(router) == "queued"
    row = transaction(router.sessions, lambda s: resolve_task(s, "daily_sales", "2024-03-01",
                                                              "load_sales"))
    transaction(router.sessions, lambda s: claim(s, row, 1, clock.now()))  # runs for long
    with router.sessions() as s:
        doc = queries.batch_status(s, "2024-03-01", "daily_sales")
    assert doc["deadline_at"] == paris(2024, 3, 1, 7, 30).isoformat()
    assert doc["logical_at"] == paris(2024, 3, 1, 6, 0).isoformat()
    assert why(router, "report").endswith(
        "The batch's deadline is 07:30 Europe/Paris (in 90 min): its open tasks are cancelled "
        "then and it fails.")
    clock.t = paris(2024, 3, 1, 7, 0, 30)
    assert router.sweep().deadline_warnings == 1
    assert router.sweep().deadline_warnings == 0
    assert statuses(router.sessions) == {"load_sales": "RUNNING", "report": "PENDING"}
    (warning,) = topic.kinds("deadline_warning")
    assert warning["title"] == ("still running at 07:00:30 Europe/Paris with 2 open task(s); "
                                "deadline 07:30 Europe/Paris")
    clock.t = paris(2024, 3, 1, 7, 30, 30)
    assert router.sweep().missed_deadlines == 1
    assert statuses(router.sessions) == {"load_sales": "CANCELLED", "report": "CANCELLED"}
    with router.sessions() as s:
        assert s.execute(select(Batch.status)).scalar_one() == "FAILED"
    assert why(router, "report") == (
        "report: cancelled at 06:30:30 (deadline 07:30 Europe/Paris passed); `batch retry` "
        "runs it again.")
    router.sweep()
    (missed,) = topic.kinds("deadline_missed")
    assert missed["title"] == ("missed its deadline 07:30 Europe/Paris: open tasks cancelled, "
                               "batch FAILED")
    assert topic.kinds("batch_failed") == []  # one cause, one alert
    # The attempt that was running reports success late: fenced off.
    late = transaction(router.sessions, lambda s: succeed(s, row, 1, {}, clock.now()))
    assert not late.applied


def test_a_deadline_after_start_and_an_explicit_one_for_a_batch(
        router: Router, clock: FakeClock, published: RecordingPublisher) -> None:
    spec = build_pipeline({"name": "adhoc", "deadline": {"after_start": "2h", "at": "23:00"},
                           "tasks": [{"name": "a", "handler": "noop"}]}, known_handlers={"noop"})
    transaction(router.sessions, lambda s: sync_pipeline(s, spec, clock.now()))
    router.start_batch(StartBatch(type="start_batch", pipeline="adhoc", batch_id="x"))
    router.start_batch(StartBatch(type="start_batch", pipeline="adhoc", batch_id="y",
                                  deadline_s=600))
    clock.t = datetime(2024, 3, 1, 22, 0, tzinfo=UTC)
    router.start_batch(StartBatch(type="start_batch", pipeline="adhoc", batch_id="z"))
    with router.sessions() as s:
        got = dict(s.execute(select(Batch.batch_id, Batch.deadline_at)).all())
    start = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
    assert got == {"x": start + timedelta(hours=2), "y": start + timedelta(minutes=10),
                   "z": datetime(2024, 3, 1, 23, 0, tzinfo=UTC)}


def test_concurrent_sweeps_apply_a_deadline_once(router: Router, pg_url: str, clock: FakeClock,
                                                 topic: RecordingAlertSink) -> None:
    start_at_six(router, clock, daily_sales({"after_start": "30m"}))
    clock.t = paris(2024, 3, 1, 6, 31)
    engines = [make_engine(pg_url, pool_size=2, max_overflow=0) for _ in range(5)]
    sweepers = [Router(make_sessionmaker(e), RecordingPublisher(), clock=clock,
                       alert_sinks={"pubsub": topic}) for e in engines]
    barrier = threading.Barrier(len(sweepers))

    def sweep(r: Router) -> int:
        barrier.wait()
        return r.sweep().missed_deadlines

    try:
        with ThreadPoolExecutor(len(sweepers)) as pool:
            missed = list(pool.map(sweep, sweepers))
        for r in sweepers:
            r.sweep()
    finally:
        for e in engines:
            e.dispose()
    assert sum(missed) == 1
    with router.sessions() as s:
        failed = s.execute(select(TaskEvent.id).where(TaskEvent.task_id.is_(None),
                                                      TaskEvent.to_status == "FAILED")).all()
        kinds = s.execute(select(Alert.kind)).scalars().all()
    assert len(failed) == 1 and kinds == ["deadline_missed"]
    assert [a["kind"] for a in topic.alerts] == ["deadline_missed"]
