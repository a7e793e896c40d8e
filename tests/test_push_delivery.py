"""Pub/Sub's own push body, as terraform's push subscriptions send it to `route`
(no CloudEvent headers, the topic in the endpoint's path), through
functions-framework's app: every field reaches the code, and a delivery that can
never succeed is acknowledged and logged with what it was instead of being
redelivered until Pub/Sub parks it."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.db.models import TaskLog
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher, function_client, reset_process_caches
from tests import reliability as rel
from tests.conftest import FakeClock
from tests.dags import spec_from_edges

pytestmark = pytest.mark.postgres

TASKS = "/projects/test-project/topics/tasks"
DEAD_LETTER = "/projects/test-project/topics/dead-letter"
DEEP = 100_000


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str) -> Iterator[Runtime]:
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher(),
                      clock=FakeClock())
    runtime.sync_specs([spec_from_edges("two", {"load": [], "report": ["load"]})])
    with bootstrap.use(runtime):
        yield runtime


def push(path: str, envelope: Any) -> Any:
    """POST a raw push body, as Pub/Sub does: JSON, no `ce-*` headers."""
    body = envelope if isinstance(envelope, bytes) else json.dumps(envelope).encode()
    return function_client("route").post(path, data=body,
                                         headers={"content-type": "application/json"})


def envelope(data: bytes | None, *, attempt: int | None = None, message_id: str = "m-1",
             **attributes: str) -> dict[str, Any]:
    message: dict[str, Any] = {"attributes": attributes, "messageId": message_id,
                               "publishTime": "2024-03-01T12:00:00Z"}
    if data is not None:
        message["data"] = base64.b64encode(data).decode()
    out: dict[str, Any] = {"message": message,
                           "subscription": "projects/test-project/subscriptions/tasks-route"}
    if attempt is not None:
        out["deliveryAttempt"] = attempt
    return out


def logged(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, Any]]]:
    return [(r.getMessage(), dict(getattr(r, "fields", {}) or {})) for r in caplog.records
            if r.name == "orchestrator"]


def test_the_delivery_attempt_of_a_raw_push_reaches_the_log_line_of_its_work(
        rt: Runtime, caplog: pytest.LogCaptureFixture) -> None:
    start = json.dumps({"type": "start_batch", "pipeline": "two", "batch_id": "b1"}).encode()
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert push(TASKS, envelope(start, attempt=4, message_id="m-4")).status_code == 200
    started = [f for m, f in logged(caplog) if "batch started" in m]
    assert started and started[0]["delivery_attempt"] == 4 and started[0]["message_id"] == "m-4"


def test_a_raw_dead_letter_push_records_pubsubs_delivery_count(
        rt: Runtime, pg_engine: Engine) -> None:
    """Pub/Sub counts the attempts of a dead letter's subscription in `deliveryAttempt`;
    without the source-count attribute, that count is what the task log records."""
    rt.start_batch("two", "b2")
    run = json.dumps({"type": "run_task", "pipeline": "two", "batch_id": "b2", "task": "load",
                      "attempt": 1}).encode()
    assert push(DEAD_LETTER, envelope(run, attempt=6)).status_code == 200
    with rt.sessions() as s:
        error = s.execute(select(TaskLog.error).where(TaskLog.status == "ERROR")).scalar_one()
    assert error == "dead-lettered after 6 delivery attempts"


def test_a_message_of_attributes_alone_is_acknowledged_and_logged_with_its_attributes(
        rt: Runtime, pg_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    before = rel.task_states(pg_engine)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        resp = push(TASKS, envelope(None, attempt=2, message_id="m-attrs", type="start_batch"))
    assert resp.status_code == 200
    rejected = [(m, f) for m, f in logged(caplog) if "has no 'data'" in m]
    assert rejected, logged(caplog)
    _, fields = rejected[0]
    assert fields["outcome"] == "invalid"
    assert (fields["message_id"], fields["delivery_attempt"]) == ("m-attrs", 2)
    assert fields["attributes"] == {"type": "start_batch"}
    assert rel.task_states(pg_engine) == before


@pytest.mark.parametrize("where", ["push body", "message data", "binary CloudEvent body"])
def test_json_nested_a_hundred_thousand_deep_is_acknowledged_and_logged(
        rt: Runtime, pg_engine: Engine, caplog: pytest.LogCaptureFixture, where: str) -> None:
    deep = b"[" * DEEP + b"]" * DEEP
    before = rel.task_states(pg_engine)
    client = function_client("route")
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        if where == "push body":
            resp = push(TASKS, deep)
        elif where == "message data":
            resp = push(TASKS, envelope(deep, attempt=1))
        else:
            resp = client.post("/", data=deep, headers={
                "ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "//pubsub.googleapis.com/"
                "projects/test-project/topics/tasks",
                "ce-type": "google.cloud.pubsub.topic.v1.messagePublished",
                "content-type": "application/json"})
    assert resp.status_code == 200
    invalid = [(m, f) for m, f in logged(caplog) if f.get("outcome") == "invalid"]
    assert invalid and "nested too deeply" in invalid[0][0], logged(caplog)
    assert rel.task_states(pg_engine) == before


def test_route_answers_other_methods_with_405(rt: Runtime) -> None:
    assert function_client("route").get(TASKS).status_code == 405
