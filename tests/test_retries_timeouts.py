"""Retries, timeouts, deadlines and trigger rules on real Postgres, on an injected
clock: the attempt timestamps in task_events follow the policy to the second."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import handlers
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import StartBatch
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests import reliability as rel
from tests.conftest import FakeClock
from tests.dags import sync

pytestmark = pytest.mark.postgres


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], pg_engine: Engine, clock: FakeClock,
           published: RecordingPublisher) -> Iterator[Router]:
    reset_process_caches()
    rel.install(pg_engine)
    yield Router(pg_sessions, published, clock=clock, redispatch_after_s=3600)
    handlers.unregister(rel.HANDLER)
    handlers.unregister("hang")


def task(name: str, parents: list[str] | None = None, *, handler: str = rel.HANDLER,
         rule: str = "all_success", retry: dict[str, Any] | None = None, timeout_s: float = 600,
         **config: Any) -> dict[str, Any]:
    return {"name": name, "handler": handler, "depends_on": parents or [], "trigger_rule": rule,
            "config": config, "timeout_s": timeout_s,
            "retry": retry or {"max_attempts": 1}}


def start(router: Router, pipeline: str, batch_id: str = "b1", **kw: Any) -> None:
    router.start_batch(StartBatch(type="start_batch", pipeline=pipeline, batch_id=batch_id, **kw))


def run_to_end(router: Router, published: RecordingPublisher, clock: FakeClock,
               engine: Engine, batch_id: str = "b1", step_s: float = 1.0,
               limit_s: float = 3600) -> str:
    """Deliver everything, then move the clock a second at a time, sweeping as the
    scheduler would, until the batch is terminal."""
    waited = 0.0
    while waited <= limit_s:
        published.pump(router)
        status = rel.batch_states(engine)[batch_id]
        if status != "RUNNING":
            return status
        clock.advance(step_s)
        waited += step_s
        router.sweep()
    raise AssertionError("batch still running")


def task_events(engine: Engine, task_name: str) -> list[tuple[str | None, str, int, float, Any]]:
    """(from, to, attempt, seconds since the first event, detail) of one task, in order."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT e.from_status, e.to_status, e.attempt, e.at, e.detail FROM task_events e "
            "JOIN tasks t ON t.id = e.task_id WHERE t.name = :n ORDER BY e.id"),
            {"n": task_name}).all()
    t0 = rows[0][3]
    return [(r[0], r[1], r[2], (r[3] - t0).total_seconds(), r[4]) for r in rows]


def test_attempts_follow_the_exponential_backoff_then_the_task_errors(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """Delays of 10, 20, then 25 s (capped): each claim exactly that long after the
    previous failure, never earlier; ERROR after the fourth attempt."""
    retry = {"max_attempts": 4, "initial_delay_s": 10, "backoff_factor": 2, "max_delay_s": 25}
    sync(pg_sessions, rel.pipeline("backoff", [task("call", retry=retry, flaky_p=1.0)]),
         clock.now())
    start(router, "backoff")
    assert run_to_end(router, published, clock, pg_engine) == "FAILED"

    events = task_events(pg_engine, "call")
    claims = [at for f, t, _, at, _ in events if (f, t) == ("QUEUED", "RUNNING")]
    failures = [(at, d) for f, t, _, at, d in events if (f, t) == ("RUNNING", "RETRYING")]
    assert claims == [0, 10, 30, 55]
    assert [d["delay_s"] for _, d in failures] == [10, 20, 25]
    assert [e[:3] for e in events][-1] == ("RUNNING", "ERROR", 4)
    assert [a for f, t, a, _, _ in events if t == "RUNNING"] == [1, 2, 3, 4]
    assert rel.task_states(pg_engine)[("b1", "call")] == ("ERROR", 4)


def test_a_task_that_outlives_its_timeout_is_retried_then_errors_and_its_late_result_is_fenced(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """Every attempt hangs past its 30 s lease: the sweeper fails it, retries once after
    5 s, then marks it ERROR; the hung attempts' results, when they come, change nothing."""
    release = threading.Event()
    finished: list[int] = []

    def hang(ctx: TaskContext) -> dict[str, Any]:
        release.wait(30)
        finished.append(ctx.attempt)
        return {"late": True}

    handlers.register("hang", hang)
    retry = {"max_attempts": 2, "initial_delay_s": 5}
    sync(pg_sessions, rel.pipeline("slow", [task("wait", handler="hang", retry=retry,
                                                 timeout_s=30)]), clock.now())
    start(router, "slow")
    workers: list[threading.Thread] = []
    results: list[str] = []

    def deliver_in_background() -> None:
        for m in published.take():
            t = threading.Thread(target=lambda d=dict(m.data): results.append(
                router.handle_payload(json.dumps(d).encode()).outcome))
            t.start()
            workers.append(t)

    deliver_in_background()
    for _ in range(120):
        if rel.batch_states(pg_engine)["b1"] != "RUNNING":
            break
        clock.advance(1)
        router.sweep()
        deliver_in_background()
    assert rel.batch_states(pg_engine)["b1"] == "FAILED"
    release.set()
    for t in workers:
        t.join(10)

    assert sorted(finished) == [1, 2] and results == ["stale", "stale"]
    status, attempt = rel.task_states(pg_engine)[("b1", "wait")]
    assert (status, attempt) == ("ERROR", 2)
    events = task_events(pg_engine, "wait")
    moves = [(f, t, a) for f, t, a, _, _ in events]
    assert moves == [("PENDING", "QUEUED", 1), ("QUEUED", "RUNNING", 1),
                     ("RUNNING", "RETRYING", 1), ("RETRYING", "QUEUED", 1),
                     ("QUEUED", "RUNNING", 2), ("RUNNING", "ERROR", 2)]
    claims = [at for f, t, _, at, _ in events if t == "RUNNING"]
    expiries = [at for f, t, _, at, _ in events if f == "RUNNING"]
    # A lease is over when the sweep after its 30 s and its 3 s grace finds it: never
    # sooner (a live worker would have reported its own timeout by then).
    assert [e - c for c, e in zip(claims, expiries, strict=True)] == [34, 34]
    assert claims[1] - expiries[0] == 5
    assert events[-1][4]["error"].startswith("timed out after 30s")


def test_a_batch_past_its_deadline_fails_and_its_open_tasks_are_cancelled(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """A batch with a 120 s deadline whose root keeps retrying: the first sweep after
    the deadline cancels every open task and fails the batch, and not one sweep earlier."""
    retry = {"max_attempts": 50, "initial_delay_s": 30, "backoff_factor": 1}
    sync(pg_sessions, rel.pipeline("late", [task("root", retry=retry, flaky_p=1.0),
                                            task("child", ["root"])]), clock.now())
    start(router, "late", deadline_s=120)
    t0 = clock.now()
    assert run_to_end(router, published, clock, pg_engine) == "FAILED"
    assert (clock.now() - t0).total_seconds() == 121
    states = rel.task_states(pg_engine)
    assert states[("b1", "root")][0] == "CANCELLED"
    assert states[("b1", "child")][0] == "CANCELLED"
    assert sum(rel.effects(pg_engine).values()) == 0


def test_all_done_runs_the_child_after_a_failed_parent(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """cleanup (all_done) runs once its parents finished, one of them ERROR; its
    all_success sibling is UPSTREAM_FAILED; the batch is FAILED."""
    sync(pg_sessions, rel.pipeline("cleanup", [
        task("ok", []), task("broken", [], permanent=["broken"]),
        task("cleanup", ["ok", "broken"], rule="all_done"),
        task("report", ["ok", "broken"]),
    ]), clock.now())
    start(router, "cleanup")
    assert run_to_end(router, published, clock, pg_engine) == "FAILED"
    states = {t: s for (_, t), (s, _) in rel.task_states(pg_engine).items()}
    assert states == {"ok": "SUCCESS", "broken": "ERROR", "cleanup": "SUCCESS",
                      "report": "UPSTREAM_FAILED"}
    assert set(rel.effects(pg_engine)) == {("b1", "ok", 1), ("b1", "cleanup", 1)}


@pytest.mark.parametrize(("fails", "alert", "batch"), [
    (True, "SUCCESS", "FAILED"), (False, "SKIPPED", "SUCCESS")], ids=["on-failure", "on-success"])
def test_one_failed_runs_the_alert_only_when_a_parent_fails(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        pg_sessions: sessionmaker[Session], pg_engine: Engine, fails: bool, alert: str,
        batch: str) -> None:
    """The alerting task runs (its handler is called) after a failure, and is SKIPPED,
    without a call, when every parent succeeded."""
    sync(pg_sessions, rel.pipeline("alerting", [
        task("load", [], permanent=["load"] if fails else []),
        task("alert", ["load"], rule="one_failed"),
    ]), clock.now())
    start(router, "alerting")
    assert run_to_end(router, published, clock, pg_engine) == batch
    assert rel.task_states(pg_engine)[("b1", "alert")][0] == alert
    ran = {t for _, t, _ in rel.effects(pg_engine)}
    assert ("alert" in ran) is fails
