"""Malformed events are acknowledged (2xx), logged with the reason, and change
nothing; transient infrastructure failures get a 5xx so that Pub/Sub redelivers."""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.db.session import make_engine
from orchestrator.edge import PUBSUB_PUBLISHED, STORAGE_FINALIZED
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    FailingPublisher,
    RecordingPublisher,
    binary_request,
    function_client,
    object_data,
    pubsub_envelope,
    pubsub_request,
    pubsub_source,
    reset_process_caches,
    storage_request,
    storage_source,
    structured_request,
)
from tests.conftest import FakeClock
from tests.dags import spec_from_edges

pytestmark = pytest.mark.postgres

TABLES = ("pipelines", "tasks", "task_dependencies", "batches", "task_log", "task_events")
Request = tuple[dict[str, str], bytes]


def counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}


def run(**fields: Any) -> dict[str, Any]:
    return {"type": "run_task", "pipeline": "two", "batch_id": "live", "task": "a",
            "attempt": 1, **fields}


def start(**fields: Any) -> dict[str, Any]:
    return {"type": "start_batch", "pipeline": "two", "batch_id": "fresh", **fields}


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def raw_message(data: Any, **kw: Any) -> Request:
    return binary_request(PUBSUB_PUBLISHED, pubsub_source(), pubsub_envelope(None, raw_data=data,
                                                                             **kw))


def envelope_with(**message_fields: Any) -> Request:
    env = pubsub_envelope(start())
    env["message"].update(message_fields)
    return binary_request(PUBSUB_PUBLISHED, pubsub_source(), env)


TEN_MB = base64.b64encode(b"{" + b" " * (10 * 1024 * 1024) + b"}").decode()

# (id, target, request builder, words the log line must contain)
CASES: list[tuple[str, str, Callable[[], Request], str]] = [
    ("bad-base64", "route", lambda: raw_message("!!not*base64!!"), "not valid base64"),
    ("base64-not-a-string", "route", lambda: raw_message(12345), "must be a base64 string"),
    ("not-json", "route", lambda: pubsub_request(b"hello, world"), "not JSON"),
    ("invalid-utf8", "route", lambda: pubsub_request(b'{"type": "\xff\xfe"}'), "not valid UTF-8"),
    ("json-array", "route", lambda: pubsub_request(b"[1, 2, 3]"), "got list"),
    ("json-string", "route", lambda: pubsub_request(b'"start_batch"'), "got str"),
    ("json-null", "route", lambda: pubsub_request(b"null"), "got NoneType"),
    ("json-number", "route", lambda: pubsub_request(b"42"), "got int"),
    ("empty-data", "route", lambda: pubsub_request(b""), "not JSON"),
    ("missing-type", "route", lambda: pubsub_request(without(start(), "type")), "no string 'type'"),
    ("type-not-a-string", "route", lambda: pubsub_request(start(type=7)), "no string 'type'"),
    ("unknown-type", "route", lambda: pubsub_request({"type": "rewind_batch"}), "rewind_batch"),
    ("start-missing-pipeline", "route", lambda: pubsub_request(without(start(), "pipeline")),
     "pipeline: Field required"),
    ("start-missing-batch-id", "route", lambda: pubsub_request(without(start(), "batch_id")),
     "batch_id: Field required"),
    ("start-batch-id-sql", "route",
     lambda: pubsub_request(start(batch_id="2024'; DROP TABLE tasks;--")), "batch_id"),
    ("start-batch-id-path", "route", lambda: pubsub_request(start(batch_id="../../etc/passwd")),
     "batch_id"),
    ("start-batch-id-dotdot", "route", lambda: pubsub_request(start(batch_id="2024..03")),
     "invalid batch_id"),
    ("start-batch-id-int", "route", lambda: pubsub_request(start(batch_id=202403)), "batch_id"),
    ("start-params-list", "route", lambda: pubsub_request(start(params=[1, 2])), "params"),
    ("start-unknown-pipeline", "route", lambda: pubsub_request(start(pipeline="nosuch")),
     "unknown pipeline 'nosuch'"),
    ("start-pipeline-sql", "route", lambda: pubsub_request(start(pipeline="x; DELETE FROM tasks")),
     "pipeline"),
    ("run-missing-attempt", "route", lambda: pubsub_request(without(run(), "attempt")),
     "attempt: Field required"),
    ("run-attempt-string", "route", lambda: pubsub_request(run(attempt="1")), "attempt"),
    ("run-attempt-zero", "route", lambda: pubsub_request(run(attempt=0)), "attempt"),
    ("run-unknown-task", "route", lambda: pubsub_request(run(task="zz")), "no task 'zz'"),
    ("run-unknown-batch", "route", lambda: pubsub_request(run(batch_id="never")), "'never'"),
    ("run-unknown-pipeline", "route", lambda: pubsub_request(run(pipeline="ghost")), "'ghost'"),
    ("run-stale-attempt", "route", lambda: pubsub_request(run(attempt=9)), "stale"),
    ("run-task-not-queued", "route", lambda: pubsub_request(run(task="b")), "stale"),
    ("ten-megabytes", "route", lambda: raw_message(TEN_MB), "exceeds"),
    ("envelope-without-message", "route",
     lambda: binary_request(PUBSUB_PUBLISHED, pubsub_source(), {"subscription": "s"}),
     "no 'message'"),
    ("message-without-data", "route",
     lambda: binary_request(PUBSUB_PUBLISHED, pubsub_source(),
                            {"message": {"messageId": "1", "attributes": {}}}), "has no 'data'"),
    ("attributes-not-strings", "route", lambda: envelope_with(attributes={"attempt": 1}),
     "attributes"),
    ("delivery-attempt-not-int", "route",
     lambda: pubsub_request(start(), delivery_attempt="often"), "deliveryAttempt"),  # type: ignore[arg-type]
    ("body-not-json", "route",
     lambda: binary_request(PUBSUB_PUBLISHED, pubsub_source(), b"<xml/>"), "not JSON"),
    ("body-invalid-utf8", "route",
     lambda: binary_request(PUBSUB_PUBLISHED, pubsub_source(), b"\xff\xfe\x00"), "UTF-8"),
    ("event-data-array", "route",
     lambda: structured_request(PUBSUB_PUBLISHED, pubsub_source(), [1, 2]), "got list"),
    ("wrong-event-type", "route",
     lambda: structured_request("google.cloud.storage.object.v1.deleted", pubsub_source(), {}),
     "unexpected event type"),
    ("gcs-no-trigger-matches", "on_object_finalized",
     lambda: storage_request("landing", "other/2024-03/_SUCCESS"), "no trigger watches this path"),
    ("gcs-data-file-not-marker", "on_object_finalized",
     lambda: storage_request("landing", "sales/2024-03/part-0.parquet"),
     "no trigger watches this path"),
    ("gcs-unknown-bucket", "on_object_finalized",
     lambda: storage_request("elsewhere", "sales/2024-03/_SUCCESS", mode="structured"),
     "no trigger watches this path"),
    ("gcs-batch-id-sql", "on_object_finalized",
     lambda: storage_request("landing", "sales/x';DROP TABLE batches;--/_SUCCESS"),
     "invalid batch_id"),
    ("gcs-missing-name", "on_object_finalized",
     lambda: binary_request(STORAGE_FINALIZED, storage_source("landing"), {"bucket": "landing"}),
     "name"),
    ("gcs-bad-bucket", "on_object_finalized",
     lambda: storage_request("Bad Bucket!", "sales/2024-03/_SUCCESS"), "bucket"),
    ("gcs-bad-size", "on_object_finalized",
     lambda: binary_request(STORAGE_FINALIZED, storage_source("landing"),
                            {**object_data("landing", "sales/x/_SUCCESS"), "size": "lots"}),
     "invalid object size"),
    ("gcs-deleted-event", "on_object_finalized",
     lambda: structured_request("google.cloud.storage.object.v1.deleted",
                                storage_source("landing"),
                                object_data("landing", "sales/2024-05/_SUCCESS")),
     "unexpected event type"),
    ("gcs-body-not-json", "on_object_finalized",
     lambda: binary_request(STORAGE_FINALIZED, storage_source("landing"), b"{bucket"), "not JSON"),
]


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str, clock: FakeClock) -> Iterator[Runtime]:
    """Two pipelines synced and one batch live, so names resolve and rows exist."""
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher(), clock=clock)
    runtime.sync_specs([
        spec_from_edges("two", {"a": [], "b": ["a"]}),
        build_pipeline({"name": "sales", "tasks": [{
            "name": "load", "handler": "noop",
            "gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}}]}),
    ])
    runtime.start_batch("two", "live")
    with bootstrap.use(runtime):
        yield runtime


def test_there_are_at_least_25_bad_input_cases() -> None:
    """The catalogue below stays broad."""
    assert len(CASES) >= 25


@pytest.mark.parametrize(("target", "build", "says"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_malformed_event_is_acknowledged_logged_and_changes_nothing(
        rt: Runtime, pg_engine: Engine, caplog: pytest.LogCaptureFixture,
        target: str, build: Callable[[], Request], says: str) -> None:
    """2xx, a log line naming the problem, and the same row counts in every table."""
    before = counts(pg_engine)
    headers, body = build()
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        resp = function_client(target).post("/", headers=headers, data=body)
    assert 200 <= resp.status_code < 300, resp.data[:300]
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator"]
    assert any(says.lower() in line.lower() for line in lines), lines
    assert counts(pg_engine) == before


# -- transient failures --------------------------------------------------------------


@pytest.fixture
def unreachable(pg_url: str) -> Iterator[Runtime]:
    """A runtime whose database refuses connections (a closed port)."""
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/orchestrator"
    runtime = Runtime(Settings(database_url=url), make_engine(url, pool_size=1, max_overflow=0),
                      RecordingPublisher())
    with bootstrap.use(runtime):
        yield runtime
    runtime.db.dispose()


@pytest.mark.parametrize(("target", "build"), [
    ("route", lambda: pubsub_request(start())),
    ("route", lambda: pubsub_request(run(), mode="structured")),
    ("on_object_finalized", lambda: storage_request("landing", "sales/2024-03/_SUCCESS")),
], ids=["start-batch", "run-task", "object-finalized"])
def test_database_unreachable_is_a_5xx_for_redelivery(
        unreachable: Runtime, target: str, build: Callable[[], Request]) -> None:
    """No database: the function raises, functions-framework answers 500."""
    headers, body = build()
    assert function_client(target).post("/", headers=headers, data=body).status_code >= 500


def test_database_unreachable_fails_the_sweep_and_status_answers_503(
        unreachable: Runtime) -> None:
    """The scheduler retries a failed sweep; status says the store is unavailable."""
    assert function_client("sweep").post("/").status_code >= 500
    resp = function_client("status").get("/?batch_id=live")
    assert resp.status_code == 503 and "unavailable" in resp.get_json()["error"]


def test_malformed_input_is_still_acknowledged_when_the_database_is_down(
        unreachable: Runtime) -> None:
    """Bad input never needs the database, so it is never retried."""
    headers, body = pubsub_request(b"not json")
    assert function_client("route").post("/", headers=headers, data=body).status_code == 200


def test_pubsub_publish_failure_is_a_5xx(rt: Runtime, pg_engine: Engine) -> None:
    """Pub/Sub down while publishing the new batch's roots: 500, so it comes again."""
    rt.router.dispatcher.publisher = FailingPublisher()
    headers, body = pubsub_request(start())
    assert function_client("route").post("/", headers=headers, data=body).status_code == 500


def test_redelivery_after_publish_failure_does_not_start_the_batch_twice(
        rt: Runtime, pg_engine: Engine) -> None:
    """The retried start_batch finds the batch and acks; the sweeper owns the publish."""
    failing = FailingPublisher(failures=1)
    rt.router.dispatcher.publisher = failing
    headers, body = pubsub_request(start())
    client = function_client("route")
    assert client.post("/", headers=headers, data=body).status_code == 500
    before = counts(pg_engine)
    assert client.post("/", headers=headers, data=body).status_code == 200
    assert counts(pg_engine) == before
    assert failing.inner.messages == []
