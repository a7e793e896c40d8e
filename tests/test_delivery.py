"""The delivery front alone: it types a delivery and hands it on; what can never
succeed is acknowledged without reaching the worker (Postgres and SQLite)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.delivery import DeliveryFront
from orchestrator.dispatcher import RouteResult
from orchestrator.messages import RunTask
from orchestrator.testing import reset_process_caches
from tests.conftest import FakeClock
from tests.units import dispatcher, started, statuses


class SpyWorker:
    def __init__(self) -> None:
        self.calls: list[RunTask] = []

    def run_task(self, msg: RunTask, **context: Any) -> RouteResult:
        self.calls.append(msg)
        return RouteResult("succeeded")


def front(sessions: sessionmaker[Session], clock: FakeClock):
    reset_process_caches()
    d, published = dispatcher(sessions, clock)
    spy = SpyWorker()
    return DeliveryFront(sessions, d, spy, clock), spy, published  # type: ignore[arg-type]


@pytest.mark.parametrize("payload", [
    b"not json", b"[1, 2]", b'{"type": "run_task", "pipeline": "p"}',
    b'{"type": "run_task", "pipeline": "p", "batch_id": "b 1", "task": "t", "attempt": 1}',
])
def test_a_malformed_message_is_acknowledged_and_reaches_no_one(
        sessions: sessionmaker[Session], clock: FakeClock, payload: bytes) -> None:
    f, spy, published = front(sessions, clock)
    assert f.handle_payload(payload).outcome == "invalid"
    assert spy.calls == [] and published.messages == []


def test_run_task_goes_to_the_worker_and_an_unknown_type_is_ignored(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    f, spy, _ = front(sessions, clock)
    msg = {"type": "run_task", "pipeline": "p", "batch_id": "b1", "task": "t", "attempt": 2}
    assert f.handle_payload(json.dumps(msg)).outcome == "succeeded"
    assert [(m.task, m.attempt) for m in spy.calls] == [("t", 2)]
    assert f.handle_payload(b'{"type": "compact_logs"}').outcome == "ignored"
    assert len(spy.calls) == 1


def test_start_batch_starts_once_and_publishes_its_roots(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    f, _, published = front(sessions, clock)
    started(sessions, clock.now(), "two", {"a": [], "b": ["a"]}, batch_id="other")
    msg = {"type": "start_batch", "pipeline": "two", "batch_id": "b2", "params": {"k": 1}}
    assert f.handle_payload(json.dumps(msg)).outcome == "started"
    assert f.handle_payload(json.dumps(msg)).outcome == "exists"
    assert published.tasks() == [("two", "b2", "a", 1)]
    unknown = {**msg, "pipeline": "nope"}
    assert f.handle_payload(json.dumps(unknown)).outcome == "invalid"


def test_a_dead_letter_fails_its_task_and_closes_the_batch(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    f, spy, _ = front(sessions, clock)
    started(sessions, clock.now(), "one", {"a": []})
    msg = RunTask(type="run_task", pipeline="one", batch_id="b1", task="a", attempt=1)
    result = f.dead_letter(msg, 5)
    assert (result.outcome, result.detail) == ("failed", "dead-lettered after 5 delivery attempts")
    assert statuses(sessions) == {"a": "ERROR"}
    assert f.dead_letter(msg, 5).outcome == "duplicate"
    assert spy.calls == []
