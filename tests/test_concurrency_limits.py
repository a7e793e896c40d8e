"""Concurrency limits: a claim over the limit waits, and a freed slot wakes it at once."""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import TaskEvent, TaskLog
from orchestrator.messages import StartBatch
from orchestrator.ports import SystemClock
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher
from tests.dags import spec_from_edges, sync
from tests.embedded import pg_runtime

pytestmark = pytest.mark.postgres


def brief_work(ctx: Any) -> dict[str, Any]:
    time.sleep(0.02)
    return {"done": ctx.batch_id}


WORK = {"handler": "python", "config": {"callable": "tests.test_concurrency_limits:brief_work"}}


def max_running(sessions: sessionmaker[Session], key: str = "task") -> int:
    """The most attempts RUNNING at once under each key, replayed from task_events in
    id order (a claim's event follows its update; a finish's precedes its commit)."""
    with sessions() as s:
        rows = s.execute(select(TaskEvent.batch_pk, TaskEvent.task_id, TaskEvent.from_status,
                                TaskEvent.to_status).order_by(TaskEvent.id)).all()
    running: dict[Any, int] = defaultdict(int)
    peak = 0
    for batch_pk, task_id, left, entered in rows:
        if task_id is None:
            continue
        k = task_id if key == "task" else batch_pk
        if entered == "RUNNING" and left == "QUEUED":
            running[k] += 1
        elif left == "RUNNING" and entered != "RUNNING":
            running[k] -= 1
        peak = max(peak, running[k])
    return peak


def test_a_limit_of_2_is_never_exceeded_under_50_concurrent_claims(
        pg_sessions: sessionmaker[Session]) -> None:
    sync(pg_sessions, spec_from_edges("limited", {"work": []}, work={**WORK, "concurrency": 2}),
         SystemClock().now())
    published = RecordingPublisher()
    router = Router(pg_sessions, published)
    for i in range(50):
        router.start_batch(StartBatch(type="start_batch", pipeline="limited", batch_id=f"b{i}"))
    first = published.take()
    assert len(first) == 50
    barrier = threading.Barrier(50, timeout=30)

    def deliver(message: Any) -> str:
        barrier.wait()
        return router.handle_payload(json.dumps(dict(message.data))).outcome

    with ThreadPoolExecutor(max_workers=50) as pool:
        outcomes = list(pool.map(deliver, first))
    assert set(outcomes) == {"succeeded", "waiting"}
    # Every finish woke the next waiting task by publishing it: no sweeper involved.
    published.pump(router)
    with pg_sessions() as s:
        statuses = s.execute(select(TaskLog.status)).scalars().all()
    assert statuses == ["SUCCESS"] * 50
    assert max_running(pg_sessions) == 2


def test_a_pipeline_limit_caps_the_running_tasks_of_each_batch_without_the_sweeper(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    roots = {f"t{i}": [] for i in range(12)}
    spec = spec_from_edges("wide", roots, **{t: WORK for t in roots})
    spec = spec.model_copy(update={"concurrency": 3})
    with pg_runtime(pg_url, tmp_path, workers=8) as rt:
        rt.sync_specs([spec])
        for b in ("x", "y"):
            rt.start_batch("wide", b)
        for b in ("x", "y"):
            assert rt.wait("wide", b, timeout=20, sweep_every_s=3600) == "SUCCESS"
        assert max_running(rt.sessions, key="batch") == 3


def test_the_default_limit_applies_to_tasks_that_set_none(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    with pg_runtime(pg_url, tmp_path, workers=6, default_concurrency=1) as rt:
        rt.sync_specs([spec_from_edges("serial", {"work": []}, work=WORK)])
        for i in range(6):
            rt.start_batch("serial", f"s{i}")
        for i in range(6):
            assert rt.wait("serial", f"s{i}", timeout=20, sweep_every_s=3600) == "SUCCESS"
        assert max_running(rt.sessions) == 1


def test_a_waiting_task_is_not_lost_when_its_wake_up_is(
        pg_sessions: sessionmaker[Session], clock: Any) -> None:
    sync(pg_sessions, spec_from_edges("one_at_a_time", {"work": []},
                                      work={**WORK, "concurrency": 1}), clock.now())
    published = RecordingPublisher()
    router = Router(pg_sessions, published, clock=clock, redispatch_after_s=30)
    for b in ("a", "b"):
        router.start_batch(StartBatch(type="start_batch", pipeline="one_at_a_time", batch_id=b))
    _, second = published.take()
    with pg_sessions.begin() as s:
        # "a" holds the only slot: as if its worker were busy with it right now.
        s.execute(TaskLog.__table__.update().where(TaskLog.batch_pk == 1)
                  .values(status="RUNNING", started_at=clock.now(),
                          lease_expires_at=clock.now() + timedelta(seconds=600)))
    assert router.handle_payload(json.dumps(dict(second.data))).outcome == "waiting"
    with pg_sessions.begin() as s:
        s.execute(TaskLog.__table__.update().where(TaskLog.batch_pk == 1)
                  .values(status="SUCCESS", lease_expires_at=None))  # its wake-up never came
    clock.advance(31)
    report = router.sweep()
    assert report.redispatched == 1
    published.pump(router)
    with pg_sessions() as s:
        assert s.execute(select(TaskLog.status).where(TaskLog.batch_pk == 2)).scalar_one() == "SUCCESS"
