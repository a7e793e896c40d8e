"""Fuzzing the edge: valid, near-valid and garbage CloudEvents and messages through
functions-framework's test client. Every one is acknowledged (2xx), none raises,
and none changes the database."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.edge import PUBSUB_PUBLISHED, STORAGE_FINALIZED
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    RecordingPublisher,
    binary_request,
    function_client,
    pubsub_source,
    reset_process_caches,
    storage_source,
    structured_request,
)
from tests.conftest import FakeClock
from tests.dags import spec_from_edges

pytestmark = pytest.mark.postgres

EXAMPLES = 2000
TABLES = ("pipelines", "tasks", "task_dependencies", "batches", "task_log", "task_events",
          "circuit_breakers")
COUNTS_SQL = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in TABLES) + \
    ", (SELECT max(updated_at) FROM task_log)"

# -- strategies ------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(
    max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=4)
names = st.sampled_from(["two", "sales", "live", "a", "b", "ghost", "", "x" * 200,
                         "../etc", "a b", "ä", "1abc"]) | st.text(max_size=12)
types = st.sampled_from(["start_batch", "run_task", "rewind", "", "RUN_TASK"]) | st.text(
    max_size=10) | st.integers()
attempts = st.integers(min_value=-3, max_value=20_000) | st.text(max_size=3) | st.none()


@st.composite
def near_messages(draw: st.DrawFn) -> dict[str, Any]:
    """Message-shaped dicts, each field sometimes wrong, missing or surplus; any that
    happens to be valid names a batch that cannot start or an attempt not queued."""
    msg: dict[str, Any] = {"type": draw(types), "pipeline": draw(names),
                           "batch_id": draw(names | st.just("2024-03")), "task": draw(names),
                           "attempt": draw(attempts), "params": draw(json_values)}
    for key in draw(st.lists(st.sampled_from(sorted(msg)), max_size=3)):
        msg.pop(key, None)
    if draw(st.integers(0, 3)) == 0:
        msg[draw(st.text(max_size=8))] = draw(json_values)
    return msg


def is_effective(msg: Any) -> bool:
    """Would this message rightly change the database? (start a new batch of a real
    pipeline, or claim the one QUEUED task)."""
    if not isinstance(msg, dict):
        return False
    if msg.get("type") == "start_batch" and msg.get("pipeline") == "two":
        return msg.get("batch_id") != "live"
    return (msg.get("type") == "run_task" and msg.get("pipeline") == "two"
            and msg.get("batch_id") == "live" and msg.get("task") == "a"
            and msg.get("attempt") == 1 and type(msg.get("attempt")) is int)


payload_bytes = (
    near_messages().map(lambda m: json.dumps(m).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=64)
    | st.text(max_size=40).map(str.encode)
)


def as_body(value: Any) -> Any:
    """A binary-mode body: a mapping as is, anything else as its JSON text."""
    return value if isinstance(value, dict) else json.dumps(value)


@st.composite
def pubsub_events(draw: st.DrawFn) -> tuple[dict[str, str], bytes, Any]:
    """(headers, body, message) for `route`: a messagePublished event, valid or not."""
    payload = draw(payload_bytes)
    data_field: Any = draw(st.sampled_from(["b64", "urlsafe", "raw", "garbage"]))
    encoded = {"b64": base64.b64encode(payload).decode(),
               "urlsafe": base64.urlsafe_b64encode(payload).decode().rstrip("="),
               "raw": payload.decode("latin-1"),
               "garbage": draw(json_values)}[data_field]
    message: dict[str, Any] = {"data": encoded, "messageId": draw(st.text(max_size=8)),
                               "attributes": draw(st.dictionaries(
                                   st.sampled_from(["type", "CloudPubSubDeadLetterSourceDeliveryCount",
                                                    "x"]),
                                   st.text(max_size=4) | st.integers(), max_size=2))}
    for key in draw(st.lists(st.sampled_from(["data", "messageId", "attributes"]), max_size=1)):
        message.pop(key)
    envelope: Any = {"message": message, "subscription": draw(st.text(max_size=10))}
    if draw(st.booleans()):
        envelope["deliveryAttempt"] = draw(st.integers(-1, 10) | st.text(max_size=3))
    if draw(st.integers(0, 9)) == 0:
        envelope = draw(json_values)
    topic = draw(st.sampled_from(["tasks", "tasks-dead-letter", "x"]))
    event_type = draw(st.sampled_from([PUBSUB_PUBLISHED] * 4 + [STORAGE_FINALIZED, "x.y"]))
    if draw(st.booleans()):
        headers, body = binary_request(event_type, pubsub_source(topic), as_body(envelope))
    else:
        headers, body = structured_request(event_type, pubsub_source(topic), envelope)
    try:
        message_value = json.loads(payload)
    except ValueError:
        message_value = None
    return headers, body, message_value if data_field in ("b64", "urlsafe") else None


@st.composite
def storage_events(draw: st.DrawFn) -> tuple[dict[str, str], bytes]:
    """(headers, body) for `on_object_finalized`: near-valid objects and garbage."""
    bucket = draw(st.sampled_from(["landing", "elsewhere", "Bad Bucket", ""]) | st.text(max_size=8))
    name = draw(st.sampled_from(["sales/2024-03/part-0.parquet", "sales//_SUCCESS",
                                 "sales/../_SUCCESS", "other/2024-03/_SUCCESS",
                                 "sales/x';DROP TABLE batches;--/_SUCCESS"]) | st.text(max_size=30))
    data: Any = {"bucket": bucket, "name": name,
                 "generation": draw(st.text(max_size=5) | st.integers() | st.none()),
                 "size": draw(st.text(max_size=5) | st.integers() | st.none())}
    for key in draw(st.lists(st.sampled_from(sorted(data)), max_size=2)):
        data.pop(key, None)
    if draw(st.integers(0, 9)) == 0:
        data = draw(json_values)
    event_type = draw(st.sampled_from([STORAGE_FINALIZED] * 4 + [PUBSUB_PUBLISHED]))
    if draw(st.booleans()):
        return binary_request(event_type, storage_source("landing"), as_body(data))
    return structured_request(event_type, storage_source("landing"), data)


def effective_object(body: bytes) -> bool:
    """Would this event rightly start a batch: a marker of the sales trigger?"""
    from orchestrator.identifiers import valid_batch_id
    from orchestrator.pipeline.spec import GcsTrigger

    text_body = body.decode("utf-8", "replace")
    trigger = GcsTrigger(bucket="landing", pattern="sales/{batch_id}/_SUCCESS")
    try:
        doc = json.loads(text_body)
    except ValueError:
        return False
    data = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return False
    batch = trigger.match(str(data.get("bucket")), data["name"])
    return batch is not None and valid_batch_id(batch)


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str) -> Iterator[Runtime]:
    """A pipeline with a live batch (one task QUEUED) and a file-triggered one."""
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher(),
                      clock=FakeClock())
    runtime.sync_specs([
        spec_from_edges("two", {"a": [], "b": ["a"]}),
        build_pipeline({"name": "sales", "tasks": [{
            "name": "load", "handler": "noop",
            "gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}}]}),
    ])
    runtime.start_batch("two", "live")
    with bootstrap.use(runtime):
        yield runtime


@pytest.fixture(scope="module")
def clients() -> dict[str, Any]:
    return {target: function_client(target) for target in ("route", "on_object_finalized")}


def snapshot(engine: Engine) -> tuple[Any, ...]:
    with engine.connect() as conn:
        return tuple(conn.execute(text(COUNTS_SQL)).one())


_baselines: dict[int, tuple[Any, ...]] = {}


def baseline(rt: Runtime, engine: Engine) -> tuple[Any, ...]:
    """The rows as the fixture left them; examples share the fixture, and none may
    change them, so one snapshot serves every example."""
    if id(rt) not in _baselines:
        _baselines.clear()
        _baselines[id(rt)] = snapshot(engine)
    return _baselines[id(rt)]


FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(event=pubsub_events())
def test_route_acknowledges_every_malformed_message_and_changes_nothing(
        rt: Runtime, pg_engine: Engine, clients: dict[str, Any],
        event: tuple[dict[str, str], bytes, Any]) -> None:
    """Pub/Sub deliveries, fuzzed: 2xx, and the same rows afterwards."""
    headers, body, message = event
    assume(not is_effective(message))
    before = baseline(rt, pg_engine)
    resp = clients["route"].post("/", headers=headers, data=body)
    assert 200 <= resp.status_code < 300, resp.data[:300]
    assert snapshot(pg_engine) == before


@FUZZ
@given(event=storage_events())
def test_on_object_finalized_acknowledges_every_malformed_event_and_changes_nothing(
        rt: Runtime, pg_engine: Engine, clients: dict[str, Any],
        event: tuple[dict[str, str], bytes]) -> None:
    """Storage events, fuzzed: 2xx, and the same rows afterwards."""
    headers, body = event
    assume(not effective_object(body))
    before = baseline(rt, pg_engine)
    resp = clients["on_object_finalized"].post("/", headers=headers, data=body)
    assert 200 <= resp.status_code < 300, resp.data[:300]
    assert snapshot(pg_engine) == before


def test_the_fuzzers_reach_the_router_not_just_the_decoder(
        rt: Runtime, pg_engine: Engine, clients: dict[str, Any]) -> None:
    """A guard on the strategies: a valid message they could produce does change the
    database, so the checks above are not vacuous."""
    msg = {"type": "start_batch", "pipeline": "two", "batch_id": "2024-03"}
    assert is_effective(msg)
    headers, body = binary_request(PUBSUB_PUBLISHED, pubsub_source(), {
        "message": {"data": base64.b64encode(json.dumps(msg).encode()).decode(),
                    "messageId": "1"}})
    before = snapshot(pg_engine)
    assert clients["route"].post("/", headers=headers, data=body).status_code == 200
    assert snapshot(pg_engine) != before
