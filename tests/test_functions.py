"""The Cloud Function entry points, through functions-framework's own test client,
with real CloudEvents in binary and structured mode (Postgres behind them)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from orchestrator import bootstrap, queries
from orchestrator.db.models import Batch, TaskLog
from orchestrator.edge import DEAD_LETTER_COUNT_ATTRIBUTE
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    FailingPublisher,
    RecordingPublisher,
    SwitchablePublisher,
    function_client,
    pubsub_request,
    reset_process_caches,
    storage_request,
)
from tests.conftest import FakeClock
from tests.dags import spec_from_edges

pytestmark = pytest.mark.postgres

MODES = ["binary", "structured"]
CALLS: list[str] = []


def echo_trigger(ctx: TaskContext) -> dict[str, Any]:
    CALLS.append(ctx.task)
    return {"loaded": ctx.trigger["uri"], "generation": ctx.trigger["generation"]}


def summarize(ctx: TaskContext) -> dict[str, Any]:
    CALLS.append(ctx.task)
    return {"from": ctx.parents["load"]["loaded"], "region": ctx.params.get("region")}


SALES = {
    "name": "sales",
    "tasks": [
        {"name": "load", "handler": "python",
         "config": {"callable": "tests.test_functions:echo_trigger"},
         "gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}},
        {"name": "report", "handler": "python", "depends_on": ["load"],
         "config": {"callable": "tests.test_functions:summarize"}},
    ],
}


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str, clock: FakeClock,
       published: RecordingPublisher) -> Iterator[Runtime]:
    reset_process_caches()
    CALLS.clear()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine,
                      SwitchablePublisher(published), clock=clock)
    runtime.sync_specs([spec_from_edges("two", {"a": [], "b": ["a"]}),
                        build_pipeline(SALES)])
    with bootstrap.use(runtime):
        yield runtime


def post(target: str, request: tuple[dict[str, str], bytes]) -> Any:
    headers, body = request
    return function_client(target).post("/", headers=headers, data=body)


def drive(published: RecordingPublisher, mode: str = "binary") -> int:
    """Push every published message into `route`, as the push subscription does."""
    client = function_client("route")
    n = 0
    while pending := published.take():
        for m in pending:
            headers, body = pubsub_request(dict(m.data), attributes=dict(m.attributes), mode=mode)
            assert client.post("/", headers=headers, data=body).status_code == 200
            n += 1
    return n


def statuses(rt: Runtime, batch_id: str) -> dict[str, str]:
    from orchestrator.db.models import Task

    with rt.sessions() as s:
        rows = s.execute(
            select(Task.name, TaskLog.status).join(TaskLog, TaskLog.task_id == Task.id)
            .join(Batch, Batch.id == TaskLog.batch_pk).where(Batch.batch_id == batch_id)
        ).all()
    return {name: str(status) for name, status in rows}


@pytest.mark.parametrize("mode", MODES)
def test_start_batch_event_drives_a_two_task_pipeline_to_success(
        rt: Runtime, published: RecordingPublisher, mode: str) -> None:
    """A start_batch CloudEvent queues the root; pushing each run_task completes the DAG."""
    start = {"type": "start_batch", "pipeline": "two", "batch_id": "2024-03"}
    assert post("route", pubsub_request(start, mode=mode)).status_code == 200
    assert published.tasks() == [("two", "2024-03", "a", 1)]
    # One delivery: the root's worker claims and runs the child itself (continuation).
    assert drive(published, mode) == 1
    assert statuses(rt, "2024-03") == {"a": "SUCCESS", "b": "SUCCESS"}
    assert rt.batch_status("two", "2024-03") == "SUCCESS"


def test_published_attributes_name_type_pipeline_batch_and_task(
        rt: Runtime, published: RecordingPublisher) -> None:
    """Run messages carry attributes for filtering and tracing."""
    post("route", pubsub_request({"type": "start_batch", "pipeline": "two", "batch_id": "b1"}))
    (msg,) = published.messages
    assert dict(msg.attributes) == {"type": "run_task", "pipeline": "two", "batch_id": "b1",
                                    "task": "a", "attempt": "1"}


def test_raw_push_envelope_is_converted_and_routed(
        rt: Runtime, published: RecordingPublisher) -> None:
    """A plain Pub/Sub push body (no CloudEvent headers) reaches route too."""
    from orchestrator.testing import pubsub_envelope

    envelope = pubsub_envelope({"type": "start_batch", "pipeline": "two", "batch_id": "raw"})
    resp = function_client("route").post("/projects/test-project/topics/tasks", json=envelope)
    assert resp.status_code == 200
    assert published.tasks() == [("two", "raw", "a", 1)]


@pytest.mark.parametrize("mode", MODES)
def test_completeness_marker_starts_batch_and_queues_load_with_uri_and_generation(
        rt: Runtime, published: RecordingPublisher, mode: str) -> None:
    """Data files do nothing; the _SUCCESS marker starts the batch and releases `load`."""
    part = storage_request("landing", "sales/2024-03/part-0.parquet", mode=mode)
    assert post("on_object_finalized", part).status_code == 200
    assert published.messages == []
    with rt.sessions() as s:
        assert s.execute(select(Batch.id)).first() is None

    marker = storage_request("landing", "sales/2024-03/_SUCCESS", mode=mode, generation="42")
    assert post("on_object_finalized", marker).status_code == 200
    assert published.tasks() == [("sales", "2024-03", "load", 1)]
    drive(published, mode)
    assert statuses(rt, "2024-03") == {"load": "SUCCESS", "report": "SUCCESS"}
    with rt.sessions() as s:
        outputs = dict(s.execute(select(TaskLog.task_id, TaskLog.output)).all())
    assert {"loaded": "gs://landing/sales/2024-03/_SUCCESS", "generation": "42"} in outputs.values()
    assert {"from": "gs://landing/sales/2024-03/_SUCCESS", "region": None} in outputs.values()


def test_a_second_finalize_of_the_marker_queues_nothing(
        rt: Runtime, published: RecordingPublisher) -> None:
    """Eventarc may deliver the same object twice: the task is released once."""
    marker = storage_request("landing", "sales/2024-04/_SUCCESS")
    post("on_object_finalized", marker)
    post("on_object_finalized", marker)
    assert published.tasks() == [("sales", "2024-04", "load", 1)]


def test_duplicate_run_task_delivery_runs_the_handler_once(
        rt: Runtime, published: RecordingPublisher, caplog: pytest.LogCaptureFixture) -> None:
    """Pub/Sub delivering a run message twice is acked and logged as a duplicate."""
    post("on_object_finalized", storage_request("landing", "sales/dup/_SUCCESS"))
    (msg,) = published.take()
    request = pubsub_request(dict(msg.data), message_id="m-1")
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert post("route", request).status_code == 200
        assert post("route", request).status_code == 200
    # The first delivery ran load and, as its continuation, report; the second ran nothing.
    assert CALLS == ["load", "report"]
    assert any("duplicate" in r.getMessage() for r in caplog.records)


def test_delivery_attempt_and_message_id_are_logged(
        rt: Runtime, published: RecordingPublisher, caplog: pytest.LogCaptureFixture) -> None:
    """A redelivery's deliveryAttempt appears on the log line of the work it did."""
    start = {"type": "start_batch", "pipeline": "two", "batch_id": "logged"}
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        post("route", pubsub_request(start, delivery_attempt=3, message_id="mid-7"))
    fields = [r.fields for r in caplog.records if "batch started" in r.getMessage()]
    assert fields and fields[0]["delivery_attempt"] == 3 and fields[0]["message_id"] == "mid-7"


@pytest.mark.parametrize("mode", MODES)
def test_dead_letter_fails_the_queued_task_with_its_delivery_count(
        rt: Runtime, published: RecordingPublisher, mode: str) -> None:
    """A dead-lettered run message ends its task in ERROR and the batch in FAILED."""
    post("route", pubsub_request({"type": "start_batch", "pipeline": "two", "batch_id": "dl"}))
    (msg,) = published.take()
    dead = pubsub_request(dict(msg.data), mode=mode, topic="dead-letter",
                          attributes={**msg.attributes, DEAD_LETTER_COUNT_ATTRIBUTE: "5"})
    assert post("route", dead).status_code == 200
    assert statuses(rt, "dl") == {"a": "ERROR", "b": "UPSTREAM_FAILED"}
    with rt.sessions() as s:
        error = s.execute(select(TaskLog.error).where(TaskLog.status == "ERROR")).scalar_one()
    assert "5 delivery attempts" in error
    assert rt.batch_status("two", "dl") == "FAILED"
    assert published.take() == []


def test_dead_letter_for_a_finished_task_changes_nothing(
        rt: Runtime, published: RecordingPublisher) -> None:
    """A dead letter that arrives after the task succeeded is a logged no-op."""
    post("route", pubsub_request({"type": "start_batch", "pipeline": "two", "batch_id": "ok"}))
    (msg,) = published.messages
    drive(published)
    dead = pubsub_request(dict(msg.data), topic="dead-letter",
                          attributes={DEAD_LETTER_COUNT_ATTRIBUTE: "5"})
    assert post("route", dead).status_code == 200
    assert statuses(rt, "ok") == {"a": "SUCCESS", "b": "SUCCESS"}


def test_unknown_message_type_is_acknowledged(
        rt: Runtime, published: RecordingPublisher, caplog: pytest.LogCaptureFixture) -> None:
    """A future message type gets a 2xx and a log line, never a retry."""
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        resp = post("route", pubsub_request({"type": "compact_task_log", "older_than": "30d"}))
    assert resp.status_code == 200
    assert any("compact_task_log" in r.getMessage() for r in caplog.records)


def test_publish_failure_is_a_5xx_and_the_task_stays_queued_for_the_sweeper(
        rt: Runtime, published: RecordingPublisher, clock: FakeClock) -> None:
    """Pub/Sub down: route raises (redelivery) after the task was committed QUEUED."""
    rt.router.publisher.target = FailingPublisher()  # type: ignore[attr-defined]
    start = {"type": "start_batch", "pipeline": "two", "batch_id": "outbox"}
    assert post("route", pubsub_request(start)).status_code == 500
    assert statuses(rt, "outbox") == {"a": "QUEUED", "b": "PENDING"}

    rt.router.publisher.target = published  # type: ignore[attr-defined]
    clock.advance(rt.settings.redispatch_after_s + 1)
    resp = function_client("sweep").post("/")
    assert resp.status_code == 200 and resp.get_json()["redispatched"] == 1
    drive(published)
    assert statuses(rt, "outbox") == {"a": "SUCCESS", "b": "SUCCESS"}


def test_sweep_returns_its_report_as_json(rt: Runtime) -> None:
    """The scheduler's POST gets the pass's counts."""
    resp = function_client("sweep").post("/")
    assert resp.status_code == 200
    assert resp.get_json() == {"requeued": 0, "redispatched": 0, "expired": 0,
                               "closed_batches": 0, "scheduled": 0, "missed_deadlines": 0,
                               "deadline_warnings": 0, "files_late": 0, "files_failed": 0,
                               "alerts_created": 0, "alerts_delivered": 0,
                               "alerts_retrying": 0, "errors": []}


def test_status_returns_the_batch_as_json(rt: Runtime, published: RecordingPublisher) -> None:
    """GET ?batch_id=&pipeline= answers 200 with every task's status."""
    post("route", pubsub_request({"type": "start_batch", "pipeline": "two", "batch_id": "s1"}))
    resp = function_client("status").get("/?batch_id=s1&pipeline=two")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    # Served as the database wrote it.
    with rt.sessions() as s:
        assert resp.get_data(as_text=True) == queries.batch_status_json(s, "s1", "two")
    body = json.loads(resp.data)
    assert body["pipeline"] == "two" and body["batch_id"] == "s1" and body["status"] == "RUNNING"
    assert {t["task"]: t["status"] for t in body["tasks"]} == {"a": "QUEUED", "b": "PENDING"}


@pytest.mark.parametrize(("query", "code", "says"), [
    ("/?batch_id=nope&pipeline=two", 404, "nope"),
    ("/?batch_id=s1&pipeline=missing", 404, "missing"),
    ("/", 400, "batch_id"),
    ("/?batch_id=", 400, "batch_id"),
    ("/?batch_id=..%2F..%2Fetc", 400, "invalid batch_id"),
    ("/?batch_id=x%27%3B+drop+table+tasks", 400, "invalid batch_id"),
    ("/?batch_id=s1&pipeline=a%20b", 400, "invalid pipeline"),
])
def test_status_errors_are_json_with_the_right_code(
        rt: Runtime, query: str, code: int, says: str) -> None:
    """Unknown batch -> 404, missing or invalid parameters -> 400, each with an error."""
    resp = function_client("status").get(query)
    assert resp.status_code == code
    assert says in resp.get_json()["error"]


def test_status_rejects_other_methods(rt: Runtime) -> None:
    """Status is read-only."""
    assert function_client("status").post("/?batch_id=s1").status_code == 405


@pytest.mark.parametrize(("env", "kind"), [
    ({}, "embedded"),
    ({"ORCHESTRATOR_GCP_PROJECT": "my-project"}, "cloud"),
    ({"ORCHESTRATOR_GCP_PROJECT": "my-project", "ORCHESTRATOR_RUNTIME": "embedded"}, "embedded"),
    ({"ORCHESTRATOR_RUNTIME": "cloud"}, "cloud"),
])
def test_runtime_kind_comes_from_the_environment(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], kind: str) -> None:
    """A deployed function (a GCP project set) is cloud unless told otherwise."""
    for name in ("ORCHESTRATOR_GCP_PROJECT", "ORCHESTRATOR_RUNTIME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert bootstrap.BootstrapSettings().runtime_kind() == kind


def test_the_functions_build_one_runtime_per_instance(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """Built from settings on first use, then reused by every request."""
    monkeypatch.setenv("ORCHESTRATOR_RUNTIME", "embedded")
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    old = bootstrap.install(None)
    try:
        first = bootstrap.runtime()
        assert bootstrap.runtime() is first and bootstrap.router() is first.router
        assert str(first.db.url).endswith(f"{tmp_path}/metadata.db")
        first.close()
    finally:
        bootstrap.install(old)


def test_the_cloud_runtime_builds_one_pubsub_client_for_its_topics_on_first_publish(
        monkeypatch: pytest.MonkeyPatch, pg_url: str) -> None:
    """Tasks, events and alerts share one transport, built by the first publish, not before."""
    from orchestrator.adapters.gcp import pubsub
    from orchestrator.ports import OutboundMessage

    built: list[Any] = []
    sent: list[str] = []

    class Transport:
        def __init__(self) -> None:
            built.append(self)

        def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
            sent.append(path)
            n = len(json.loads(body)["messages"])
            return 200, json.dumps({"messageIds": [str(i) for i in range(n)]}).encode()

    monkeypatch.setattr(pubsub, "default_transport", Transport)
    rt = Runtime.cloud(Settings(database_url=pg_url, gcp_project="p", tasks_topic="tasks",
                                events_topic="events"))
    try:
        assert built == []
        rt.publisher.publish([OutboundMessage({"type": "run_task"})])
        assert rt.events_publisher is not None
        rt.events_publisher.publish([OutboundMessage({"type": "batch_finished"})])
        assert len(built) == 1
        assert sent == ["/v1/projects/p/topics/tasks:publish",
                        "/v1/projects/p/topics/events:publish"]
    finally:
        rt.close()
