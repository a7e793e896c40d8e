"""A task that never checks `ctx.is_active()` does not outlive its timeout: the worker
stops waiting, records "timed out after 2s" (with where the handler was), and the
commands that wait for a batch return when it is decided. The abandoned handler's
late result is fenced off and kept as a note on its attempt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, handlers
from orchestrator.db.models import TaskAttempt
from orchestrator.db.session import transaction
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import StartBatch
from orchestrator.pipeline.load import build_pipeline
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.dags import sync
from tests.units import statuses

BIN = Path(sys.executable).parent / "orchestrator"

SLEEPY = """\
    name: sleepy
    tasks:
      - name: nap
        handler: python
        timeout_s: 2
        retry: {max_attempts: 2, initial_delay_s: 0}
        config: {callable: "naps:nap"}
"""
NAPS = """\
    import time


    def nap(ctx):
        print("going to sleep")
        time.sleep(12)
        return {"slept": True}
"""


def cli(cwd: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
    started = time.monotonic()
    done = subprocess.run([str(BIN), *args], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=60)
    return done, time.monotonic() - started


def test_batch_start_returns_when_the_timed_out_batch_is_decided(tmp_path: Path) -> None:
    """Two attempts of a 12 s sleep under a 2 s timeout: the batch fails after ~4 s and
    `batch start` (process exit included) returns then, not after the sleeps."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "sleepy.yaml").write_text(textwrap.dedent(SLEEPY))
    (tmp_path / "pipelines" / "naps.py").write_text(textwrap.dedent(NAPS))
    done, _ = cli(tmp_path, "pipelines", "sync", "pipelines/")
    assert done.returncode == 0, done.stderr
    done, took = cli(tmp_path, "batch", "start", "sleepy", "s1")
    assert done.returncode == 3, (done.stdout, done.stderr)
    # 2 x 2 s of timeouts, a process start and exit; the sleeps would take 12 s or more.
    assert took < 9, took
    doc = json.loads(cli(tmp_path, "status", "s1", "--json")[0].stdout)
    error = doc["tasks"][0]["error"]
    assert error.startswith("timed out after 2s") and "lease" not in error, error
    assert f"{(tmp_path / 'pipelines' / 'naps.py').resolve()}:6 in nap" in error
    logs = cli(tmp_path, "logs", "s1", "nap", "--attempt", "1")[0].stdout
    assert "going to sleep" in logs and "time.sleep(12)" in logs  # where it was stuck

    done, took = cli(tmp_path, "run", "sleepy", "s2")
    assert done.returncode == 1 and took < 9, (took, done.stderr)


# -- the worker alone, on Postgres ------------------------------------------------------------


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], clock: Any) -> Iterator[tuple[Router, Any]]:
    reset_process_caches()
    published = RecordingPublisher()
    yield Router(pg_sessions, published, clock=clock, redispatch_after_s=3600), published
    handlers.unregister("stuck")


def one_task(pg_sessions: sessionmaker[Session], clock: Any, timeout_s: float,
             attempts: int = 1) -> None:
    spec = build_pipeline({"name": "p", "tasks": [{
        "name": "t", "handler": "stuck", "timeout_s": timeout_s,
        "retry": {"max_attempts": attempts, "initial_delay_s": 60}}]},
        known_handlers={"stuck"})
    sync(pg_sessions, spec, clock.now())


def attempt_rows(pg_sessions: sessionmaker[Session]) -> list[TaskAttempt]:
    with pg_sessions() as s:
        return list(s.execute(select(TaskAttempt).order_by(TaskAttempt.attempt)).scalars())


@pytest.mark.postgres
def test_the_timeout_is_recorded_at_once_and_the_late_result_is_fenced(
        router: tuple[Router, Any], pg_sessions: sessionmaker[Session], clock: Any) -> None:
    """The handler never returns in time: its attempt is failed as timed out when the
    timeout passes (the handler still running), with where it was; what it does when
    it returns at last is a note on the attempt, and changes nothing."""
    rt, published = router
    release = threading.Event()
    active_after: list[bool] = []

    def stuck(ctx: TaskContext) -> dict[str, Any]:
        print("working")
        release.wait(30)
        active_after.append(ctx.is_active())
        print("done, too late")
        return {"late": True}

    handlers.register("stuck", stuck)
    one_task(pg_sessions, clock, timeout_s=1, attempts=2)
    rt.start_batch(StartBatch(type="start_batch", pipeline="p", batch_id="b1"))
    [msg] = published.take()
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(
        rt.handle_payload(json.dumps(dict(msg.data))).outcome))
    started = time.monotonic()
    worker.start()
    try:
        while statuses(pg_sessions) != {"t": "RETRYING"}:
            assert time.monotonic() - started < 4, "not recorded at the timeout"
            time.sleep(0.02)
        [a] = attempt_rows(pg_sessions)
        assert (a.outcome, a.error) == ("RETRYING", "timed out after 1s (at "
                                        f"{__file__}:{stuck.__code__.co_firstlineno + 2} "
                                        "in stuck)")
        assert "release.wait(30)" in (a.traceback or "")
        assert worker.is_alive()  # the handler runs on, abandoned
    finally:
        release.set()
        worker.join(10)
    assert results == ["stale"]
    [a] = attempt_rows(pg_sessions)
    assert a.outcome == "RETRYING"  # the note changes nothing that was decided
    assert [e["line"] for e in a.log][:2] == ["working", "done, too late"]
    assert "this result was discarded" in a.log[-1]["line"]
    assert active_after == [False]
    assert statuses(pg_sessions) == {"t": "RETRYING"}
    with pg_sessions() as s:
        assert engine.resolve_task(s, "p", "b1", "t").attempt == 1


@pytest.mark.postgres
def test_a_batch_cancelled_while_its_task_runs_frees_the_worker(
        router: tuple[Router, Any], pg_sessions: sessionmaker[Session], clock: Any) -> None:
    """The watchdog notices within its watch interval that the attempt was fenced off:
    the attempt is DISCARDED then, while the handler still runs."""
    rt, published = router
    release = threading.Event()
    running = threading.Event()

    def stuck(ctx: TaskContext) -> dict[str, Any]:
        running.set()
        release.wait(30)
        return {}

    handlers.register("stuck", stuck)
    one_task(pg_sessions, clock, timeout_s=600)
    rt.start_batch(StartBatch(type="start_batch", pipeline="p", batch_id="b1"))
    [msg] = published.take()
    results: list[str] = []
    worker = threading.Thread(target=lambda: results.append(
        rt.handle_payload(json.dumps(dict(msg.data))).outcome))
    worker.start()
    try:
        assert running.wait(10)
        transaction(pg_sessions, lambda s: engine.cancel_batch(s, "p", "b1", clock.now()))
        deadline = time.monotonic() + 6
        while [a.outcome for a in attempt_rows(pg_sessions)] != ["DISCARDED"]:
            assert time.monotonic() < deadline, attempt_rows(pg_sessions)
            time.sleep(0.05)
        assert statuses(pg_sessions) == {"t": "CANCELLED"}
    finally:
        release.set()
        worker.join(10)
    assert results == ["stale"]


def test_the_embedded_bus_replaces_a_worker_held_by_an_abandoned_handler(
        tmp_path: Path) -> None:
    """One worker; its handler sleeps past its 1 s timeout. The bus counts the message
    done at the timeout, a new worker runs the next batch meanwhile, and closing the
    runtime does not wait for the sleeper."""
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings

    release = threading.Event()
    handlers.register("stuck", lambda ctx: release.wait(20) and {})
    handlers.register("quick", lambda ctx: {"quick": True})
    rt = Runtime.embedded(Settings(home=tmp_path), workers=1)
    try:
        for name, handler in (("slow", "stuck"), ("fast", "quick")):
            rt.sync_specs([build_pipeline({"name": name, "tasks": [{
                "name": "t", "handler": handler, "timeout_s": 1,
                "retry": {"max_attempts": 1}}]}, known_handlers={handler})])
        started = time.monotonic()
        rt.start_batch("slow", "s1")
        assert rt.bus.drain(timeout=10) and time.monotonic() - started < 4
        assert rt.batch_status("slow", "s1") == "FAILED"
        rt.start_batch("fast", "f1")
        assert rt.wait("fast", "f1", timeout=10) == "SUCCESS"
        closing = time.monotonic()
    finally:
        rt.close()
        release.set()
        handlers.unregister("stuck")
        handlers.unregister("quick")
    assert time.monotonic() - closing < 3
