"""The event stream: every transition, in order, once; batch-finished once per batch."""

from __future__ import annotations

import threading
from collections import defaultdict
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import TaskEvent
from orchestrator.db.session import make_sessionmaker, transaction
from orchestrator.errors import InfrastructureError
from orchestrator.event_stream import SCHEMA, read_after, relay_once
from orchestrator.ports import SystemClock
from orchestrator.testing import FailingPublisher, RecordingPublisher
from tests.dags import spec_from_edges
from tests.embedded import pg_runtime

pytestmark = pytest.mark.postgres

DIAMOND = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"]}


def flaky(ctx: Any) -> dict[str, Any]:
    # Fails its first attempt, so the stream carries a RETRYING/QUEUED detour too.
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails")
    return {"ok": True}


def _run_batches(rt: Any, n: int) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(event: dict[str, Any]) -> None:
        with lock:
            received.append(event)

    spec = spec_from_edges("events_demo", DIAMOND, c={
        "handler": "python", "config": {"callable": "tests.test_event_stream:flaky"},
        "retry": {"max_attempts": 2, "initial_delay_s": 0}})
    rt.sync_specs([spec])
    rt.subscribe(collect)
    for i in range(n):
        rt.start_batch("events_demo", f"b{i}")
    for i in range(n):
        assert rt.wait("events_demo", f"b{i}", timeout=30) == "SUCCESS"
    assert rt.events.flush(timeout=10)
    return list(received)


def test_every_transition_arrives_in_order_per_task_and_batch_finished_once(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    with pg_runtime(pg_url, tmp_path) as rt:
        events = _run_batches(rt, 6)
        with rt.sessions() as s:
            stored = s.execute(select(TaskEvent.id)).scalars().all()
    ids = [e["id"] for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) == len(stored)
    assert all(e["schema"] == SCHEMA for e in events)

    chains: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    finished: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] == "task":
            chains[(e["batch_id"], e["task"])].append(e)
        elif e["type"] == "batch_finished":
            finished[e["batch_id"]].append(e)
    assert len(chains) == 6 * 4
    for (batch_id, task), chain in chains.items():
        # Each transition leaves the state the previous one entered.
        steps = [(e["from"], e["to"]) for e in chain]
        for (_, entered), (left, _) in pairwise(steps):
            assert left == entered, (batch_id, task, steps)
        assert steps[-1][1] == "SUCCESS", (batch_id, task, steps)
        if task == "c":
            assert ("RUNNING", "QUEUED") in steps  # the failed first attempt, requeued at once
    assert sorted(finished) == [f"b{i}" for i in range(6)]
    for batch_id, done in finished.items():
        assert len(done) == 1, batch_id
        assert done[0]["status"] == "SUCCESS" and done[0]["duration_s"] >= 0
        # The batch finishes after its last task.
        last_task = max(e["id"] for e in events if e["batch_id"] == batch_id and e["task"])
        assert done[0]["id"] > last_task


def test_a_slow_subscriber_never_holds_up_the_engine(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    gate = threading.Event()
    seen: list[int] = []

    def slow(event: dict[str, Any]) -> None:
        gate.wait(10)
        seen.append(event["id"])

    with pg_runtime(pg_url, tmp_path) as rt:
        rt.sync_specs([spec_from_edges("slow_sub", DIAMOND)])
        rt.subscribe(slow)
        rt.start_batch("slow_sub", "b1")
        # The batch finishes while the subscriber is still stuck on its first event.
        assert rt.wait("slow_sub", "b1", timeout=10) == "SUCCESS"
        assert seen == []
        gate.set()
        assert rt.events.flush(timeout=10)
    assert len(seen) > 8 and seen == sorted(seen)


def _batch(sessions: sessionmaker[Session]) -> int:
    from tests.dags import sync

    sync(sessions, spec_from_edges("relay", {"a": []}), SystemClock().now())
    from orchestrator.engine import start_batch

    return transaction(sessions, lambda s: start_batch(
        s, "relay", "b1", {}, SystemClock().now()).batch_pk)


def _append(s: Session, batch_pk: int, to: str) -> None:
    s.execute(insert(TaskEvent).values(batch_pk=batch_pk, task_id=None, attempt=None,
                                       from_status="RUNNING", to_status=to,
                                       at=SystemClock().now(), detail={"note": to}))


def test_a_lost_publish_is_retried_and_nothing_is_published_twice(
        pg_engine: Engine) -> None:
    sessions = make_sessionmaker(pg_engine)
    _batch(sessions)
    failing = FailingPublisher(failures=1)
    now = SystemClock().now
    with pytest.raises(InfrastructureError):
        relay_once(sessions, failing, now=now)
    assert failing.inner.messages == []
    assert relay_once(sessions, failing, now=now) == 2  # the batch started, its root queued
    assert relay_once(sessions, failing, now=now) == 0
    ids = [m.data["id"] for m in failing.inner.messages]
    assert ids == sorted(set(ids))
    assert failing.inner.messages[0].attributes["type"] == "batch_started"


def test_concurrent_relays_publish_each_event_exactly_once(pg_engine: Engine) -> None:
    sessions = make_sessionmaker(pg_engine)
    batch_pk = _batch(sessions)
    sink = RecordingPublisher()
    stop = threading.Event()

    def relay() -> None:
        while not stop.is_set():
            relay_once(sessions, sink, now=SystemClock().now, limit=7)

    threads = [threading.Thread(target=relay) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(200):
        transaction(sessions, lambda s, i=i: _append(s, batch_pk, f"E{i}"))
    stop.set()
    for t in threads:
        t.join()
    relay_once(sessions, sink, now=SystemClock().now)
    ids = [m.data["id"] for m in sink.messages]
    assert len(ids) == 202 and ids == sorted(set(ids))


def test_an_id_that_commits_late_is_waited_for_not_skipped(pg_engine: Engine) -> None:
    sessions = make_sessionmaker(pg_engine)
    batch_pk = _batch(sessions)
    first = transaction(sessions, lambda s: len(read_after(s, 0)))
    # A transaction draws the next id and stays open; a later one commits past it.
    slow = pg_engine.connect()
    tx = slow.begin()
    slow.execute(text("UPDATE batches SET params = params WHERE id = :b"), {"b": batch_pk})
    slow.execute(insert(TaskEvent).values(batch_pk=batch_pk, to_status="LATE",
                                          at=SystemClock().now()))
    transaction(sessions, lambda s: _append(s, batch_pk, "EARLY"))
    seen = transaction(sessions, lambda s: read_after(s, 0, gap_wait_s=0.2))
    assert [e["to"] for e in seen][first:] == []  # held back at the gap, not skipped
    tx.commit()
    slow.close()
    seen = transaction(sessions, lambda s: read_after(s, 0))
    assert [e["to"] for e in seen][first:] == ["LATE", "EARLY"]


def test_a_rolled_back_id_does_not_hold_the_stream(pg_engine: Engine) -> None:
    sessions = make_sessionmaker(pg_engine)
    batch_pk = _batch(sessions)
    first = transaction(sessions, lambda s: len(read_after(s, 0)))
    with pg_engine.connect() as conn:
        tx = conn.begin()
        conn.execute(insert(TaskEvent).values(batch_pk=batch_pk, to_status="GONE",
                                              at=SystemClock().now()))
        tx.rollback()
    transaction(sessions, lambda s: _append(s, batch_pk, "AFTER"))
    seen = transaction(sessions, lambda s: read_after(s, 0, gap_wait_s=0.2))
    assert [e["to"] for e in seen][first:] == ["AFTER"]


def test_the_cloud_relay_publishes_each_transition_to_the_events_topic_once(
        pg_engine: Engine, tmp_path: Path) -> None:
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings

    tasks, topic = RecordingPublisher(), RecordingPublisher()
    rt = Runtime(Settings().model_copy(update={"home": tmp_path}), pg_engine, tasks,
                 events_publisher=topic)
    rt.sync_specs([spec_from_edges("cloudy", DIAMOND)])
    rt.start_batch("cloudy", "c1")
    tasks.pump(rt.router)
    assert rt.batch_status("cloudy", "c1") == "SUCCESS"
    n = rt.relay_events()
    assert n == len(topic.messages) and rt.relay_events() == 0
    finished = [m for m in topic.messages if m.attributes["type"] == "batch_finished"]
    assert len(finished) == 1 and finished[0].data["status"] == "SUCCESS"
    assert finished[0].attributes["batch_id"] == "c1"
