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
from collections.abc import Callable, Iterator
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
# The nap leaves a file when its sleep ends: whoever sees none has not waited for it.
NAPS = """\
    import time
    from pathlib import Path


    def nap(ctx):
        print("going to sleep")
        time.sleep(40)
        (Path(__file__).parent / "woke").write_text("")
        return {"slept": True}
"""


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": str(cwd)}
    return subprocess.run([str(BIN), *args], cwd=cwd, env=env, text=True, capture_output=True,
                          timeout=120)


def test_batch_start_returns_when_the_timed_out_batch_is_decided(tmp_path: Path) -> None:
    """Two attempts of a 40 s sleep under a 2 s timeout: the batch fails at the second
    timeout, and `batch start` (process exit included) returns then, while the
    abandoned sleeps still run: no nap has woken when it returns."""
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "sleepy.yaml").write_text(textwrap.dedent(SLEEPY))
    (tmp_path / "pipelines" / "naps.py").write_text(textwrap.dedent(NAPS))
    woke = tmp_path / "pipelines" / "woke"
    done = cli(tmp_path, "pipelines", "sync", "pipelines/")
    assert done.returncode == 0, done.stderr
    done = cli(tmp_path, "batch", "start", "sleepy", "s1")
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert not woke.exists(), "batch start waited for the abandoned handler"
    doc = json.loads(cli(tmp_path, "status", "s1", "--json").stdout)
    error = doc["tasks"][0]["error"]
    assert error.startswith("timed out after 2s") and "lease" not in error, error
    assert f"{(tmp_path / 'pipelines' / 'naps.py').resolve()}:7 in nap" in error
    logs = cli(tmp_path, "logs", "s1", "nap", "--attempt", "1").stdout
    assert "going to sleep" in logs and "time.sleep(40)" in logs  # where it was stuck

    done = cli(tmp_path, "run", "sleepy", "s2")
    assert done.returncode == 1, done.stderr
    assert not woke.exists(), "run waited for the abandoned handler"


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


def until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait for `condition`; give up (a failure) after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.02)


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
        release.wait(20)
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
    worker.start()
    try:
        # Until the outcome is recorded or the handler returns (it cannot before it is
        # released, or after 20 s): the outcome must come first.
        until(lambda: statuses(pg_sessions) == {"t": "RETRYING"} or bool(active_after))
        assert active_after == [] and worker.is_alive(), "recorded only when the handler returned"
        [a] = attempt_rows(pg_sessions)
        assert (a.outcome, a.error) == ("RETRYING", "timed out after 1s (at "
                                        f"{__file__}:{stuck.__code__.co_firstlineno + 2} "
                                        "in stuck)")
        assert "release.wait(20)" in (a.traceback or "")
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
    returned = threading.Event()

    def stuck(ctx: TaskContext) -> dict[str, Any]:
        running.set()
        release.wait(20)
        returned.set()
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
        until(lambda: [a.outcome for a in attempt_rows(pg_sessions)] == ["DISCARDED"]
              or returned.is_set())
        assert not returned.is_set(), "discarded only when the handler returned"
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
    returned = threading.Event()
    sleeper: list[threading.Thread] = []
    joined: list[threading.Thread] = []

    def stuck(ctx: TaskContext) -> dict[str, Any]:
        me = threading.current_thread()
        sleeper.append(me)
        plain_join = me.join

        def join(timeout: float | None = None) -> None:  # whoever waits for it, noted
            joined.append(me)
            plain_join(timeout)

        me.join = join  # type: ignore[method-assign]
        release.wait(20)
        returned.set()
        return {}

    handlers.register("stuck", stuck)
    handlers.register("quick", lambda ctx: {"quick": True})
    rt = Runtime.embedded(Settings(home=tmp_path), workers=1)
    try:
        for name, handler in (("slow", "stuck"), ("fast", "quick")):
            rt.sync_specs([build_pipeline({"name": name, "tasks": [{
                "name": "t", "handler": handler, "timeout_s": 1,
                "retry": {"max_attempts": 1}}]}, known_handlers={handler})])
        rt.start_batch("slow", "s1")
        # Drained while the handler is still held: the message was done at its timeout.
        assert rt.bus.drain(timeout=60) and not returned.is_set()
        assert rt.batch_status("slow", "s1") == "FAILED"
        rt.start_batch("fast", "f1")
        # The one worker is held; only its replacement can have run this.
        assert rt.wait("fast", "f1", timeout=60) == "SUCCESS" and not returned.is_set()
    finally:
        rt.close()
        closed_before_release = not returned.is_set()
        release.set()
        handlers.unregister("stuck")
        handlers.unregister("quick")
    # Closing neither waited for the sleeper nor tried to.
    assert closed_before_release and sleeper and joined == []
