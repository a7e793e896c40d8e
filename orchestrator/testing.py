"""Fakes for tests, beside the ports they stand in for, CloudEvent builders, and the
helpers for a unit test of a task.

`task_context(pipeline, task, params=…, parents=…)` builds the context a worker
would give the task (from its YAML file, or its name in the pipelines folder), so a
test can call a `python` task's function directly; `run_task(pipeline, task, …)`
runs the task's handler as a worker would and returns its output, error,
traceback and captured lines (`TaskRun`). Neither needs a database.

`RecordingPublisher` keeps what was published and can pump it back into a
router (a synchronous stand-in for Pub/Sub push); `FailingPublisher` is Pub/Sub
being down; `DroppingPublisher` is a publish that was lost after the commit.
The builders produce the HTTP requests functions-framework receives from
Pub/Sub and Eventarc, in binary and structured CloudEvent mode.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator.edge import PUBSUB_PUBLISHED, STORAGE_FINALIZED
from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage
from orchestrator.tasktest import TaskRun, run_context, run_task, task_context

# The helpers for a unit test of a task live in `tasktest`; they are offered here.
__all__ = ["TaskRun", "run_context", "run_task", "task_context"]

# -- publishers ---------------------------------------------------------------------


class RecordingPublisher:
    """Keeps every message, in order; thread-safe."""

    def __init__(self) -> None:
        self.messages: list[OutboundMessage] = []
        self._lock = threading.Lock()
        self._cursor = 0

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        with self._lock:
            self.messages.extend(messages)

    @property
    def data(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(m.data) for m in self.messages]

    def tasks(self) -> list[tuple[str, str, str, int]]:
        """(pipeline, batch_id, task, attempt) of every run_task message published."""
        return [(d["pipeline"], d["batch_id"], d["task"], d["attempt"])
                for d in self.data if d.get("type") == "run_task"]

    def take(self) -> list[OutboundMessage]:
        """Messages published since the last `take()`."""
        with self._lock:
            new = self.messages[self._cursor:]
            self._cursor = len(self.messages)
        return new

    def pump(self, router: Any, limit: int = 10_000) -> int:
        """Deliver every pending message to `router`, including those its handling
        publishes, until none is left; returns how many were delivered."""
        delivered = 0
        while delivered < limit:
            pending = self.take()
            if not pending:
                return delivered
            for m in pending:
                router.handle_payload(json.dumps(dict(m.data)).encode())
                delivered += 1
        raise AssertionError(f"still publishing after {limit} deliveries")


class FailingPublisher:
    """Pub/Sub is unreachable: the first `failures` publishes raise (all, if None)."""

    def __init__(self, failures: int | None = None, inner: Any = None):
        self.failures = failures
        self.attempts = 0
        self.inner = inner if inner is not None else RecordingPublisher()

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        self.attempts += 1
        if self.failures is None or self.attempts <= self.failures:
            raise InfrastructureError("publish failed: Pub/Sub unavailable (fake)")
        self.inner.publish(messages)


class DroppingPublisher:
    """Accepts and loses every message, as a crash right after the commit would."""

    def __init__(self) -> None:
        self.dropped: list[OutboundMessage] = []

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        self.dropped.extend(messages)


class SwitchablePublisher:
    """Forwards to `target`, which a test swaps mid-run (e.g. to lose one publish)."""

    def __init__(self, target: Any):
        self.target = target

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        self.target.publish(messages)


# -- CloudEvents as functions-framework receives them -------------------------------

PROJECT = "test-project"


def b64(data: bytes | str | Mapping[str, Any]) -> str:
    if isinstance(data, Mapping):
        data = json.dumps(dict(data))
    if isinstance(data, str):
        data = data.encode()
    return base64.b64encode(data).decode()


def pubsub_envelope(
    data: bytes | str | Mapping[str, Any] | None,
    attributes: Mapping[str, str] | None = None,
    *,
    message_id: str | None = None,
    delivery_attempt: int | None = None,
    raw_data: Any = None,
    topic: str = "tasks",
) -> dict[str, Any]:
    """The messagePublished event data; `raw_data` puts a value in `message.data` as is."""
    message: dict[str, Any] = {
        "data": raw_data if raw_data is not None else b64(data if data is not None else b""),
        "attributes": dict(attributes or {}),
        "messageId": message_id or uuid.uuid4().hex[:12],
        "publishTime": "2024-03-01T12:00:00.000Z",
    }
    envelope: dict[str, Any] = {
        "message": message, "subscription": f"projects/{PROJECT}/subscriptions/{topic}-push"}
    if delivery_attempt is not None:
        envelope["deliveryAttempt"] = delivery_attempt
    return envelope


def pubsub_source(topic: str = "tasks") -> str:
    return f"//pubsub.googleapis.com/projects/{PROJECT}/topics/{topic}"


def storage_source(bucket: str) -> str:
    return f"//storage.googleapis.com/projects/_/buckets/{bucket}"


def object_data(bucket: str, name: str, generation: str = "1700000000000000",
                size: int | str = "1024") -> dict[str, Any]:
    return {"kind": "storage#object", "bucket": bucket, "name": name,
            "generation": generation, "size": str(size), "contentType": "application/octet-stream"}


def binary_request(event_type: str, source: str, body: bytes | str | Mapping[str, Any],
                   *, event_id: str | None = None,
                   subject: str | None = None) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a binary-mode CloudEvent: attributes in `ce-*` headers."""
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event_id or uuid.uuid4().hex,
        "ce-type": event_type,
        "ce-source": source,
        "ce-time": "2024-03-01T12:00:00Z",
        "content-type": "application/json",
    }
    if subject:
        headers["ce-subject"] = subject
    if isinstance(body, Mapping):
        body = json.dumps(dict(body))
    return headers, body.encode() if isinstance(body, str) else body


def structured_request(event_type: str, source: str, data: Any,
                       *, event_id: str | None = None) -> tuple[dict[str, str], bytes]:
    """(headers, body) of a structured-mode CloudEvent: one JSON document."""
    event = {
        "specversion": "1.0",
        "id": event_id or uuid.uuid4().hex,
        "type": event_type,
        "source": source,
        "time": "2024-03-01T12:00:00Z",
        "datacontenttype": "application/json",
        "data": data,
    }
    return {"content-type": "application/cloudevents+json"}, json.dumps(event).encode()


def pubsub_request(data: bytes | str | Mapping[str, Any] | None, *, mode: str = "binary",
                   topic: str = "tasks", **envelope: Any) -> tuple[dict[str, str], bytes]:
    """A Pub/Sub message as a CloudEvent request to `route`."""
    body = pubsub_envelope(data, topic=topic, **envelope)
    build = binary_request if mode == "binary" else structured_request
    return build(PUBSUB_PUBLISHED, pubsub_source(topic), body)


def storage_request(bucket: str, name: str, *, mode: str = "binary",
                    **fields: Any) -> tuple[dict[str, str], bytes]:
    """An object-finalized CloudEvent request to `on_object_finalized`."""
    data = object_data(bucket, name, **fields)
    if mode == "binary":
        return binary_request(STORAGE_FINALIZED, storage_source(bucket), data,
                              subject=f"objects/{name}")
    return structured_request(STORAGE_FINALIZED, storage_source(bucket), data)


# -- the functions, through functions-framework's own app -------------------------

FUNCTIONS_MAIN = Path(__file__).resolve().parents[1] / "functions" / "main.py"


def function_client(target: str, source: str | Path = FUNCTIONS_MAIN) -> Any:
    """A Flask test client for one entry point of `functions/main.py`."""
    from functions_framework import create_app

    return create_app(target, str(source)).test_client()


def reset_process_caches() -> None:
    """Forget the cached task and batch names: a test that empties the database with
    RESTART IDENTITY reuses ids for different names."""
    from orchestrator.engine import catalog, maintenance

    maintenance._batch_names.clear()
    catalog.clear()


class RecordingAlertSink:
    """An alert channel that keeps every alert it is sent, in order; thread-safe."""

    def __init__(self) -> None:
        self.alerts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def send(self, alert: Mapping[str, Any]) -> None:
        with self._lock:
            self.alerts.append(dict(alert))

    def kinds(self, kind: str) -> list[dict[str, Any]]:
        with self._lock:
            return [a for a in self.alerts if a["kind"] == kind]
