"""Cooperative cancellation: a handler sees `is_active()` turn false, and stops."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from orchestrator.adapters.gcp.bigquery import BigQueryWarehouse
from orchestrator.adapters.local.warehouse import DuckDBWarehouse
from orchestrator.db.models import TaskLog
from orchestrator.errors import RetryableError
from orchestrator.handlers.context import TaskContext
from orchestrator.ports import JobState
from tests.dags import spec_from_edges
from tests.embedded import pg_runtime

STOPPED: dict[str, int] = {}
_lock = threading.Lock()


def loop_until_inactive(ctx: TaskContext) -> dict[str, Any]:
    while ctx.is_active():
        time.sleep(0.01)
    with _lock:
        STOPPED[ctx.batch_id] = STOPPED.get(ctx.batch_id, 0) + 1
    return {"stopped": True}


def _running(rt: Any) -> list[str]:
    with rt.sessions() as s:
        return list(s.execute(select(TaskLog.status).where(TaskLog.status == "RUNNING"))
                    .scalars())


@pytest.mark.postgres
def test_cancelling_a_batch_mid_run_leaves_nothing_running_after_the_next_check(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    looping = {"handler": "python", "config": {"callable": "tests.test_cancellation:loop_until_inactive"}}
    spec = spec_from_edges("cancel_me", {"w1": [], "w2": [], "w3": [], "after": ["w1", "w2", "w3"]},
                           w1=looping, w2=looping, w3=looping)
    with pg_runtime(pg_url, tmp_path) as rt:
        rt.sync_specs([spec])
        rt.start_batch("cancel_me", "c1")
        deadline = time.monotonic() + 10
        while len(_running(rt)) < 3:
            assert time.monotonic() < deadline, "the handlers never started"
            time.sleep(0.01)
        assert rt.cancel("cancel_me", "c1") == 4
        assert _running(rt) == []  # at once, in the database
        assert rt.bus.drain(timeout=10)  # every handler returned at its next check
        assert STOPPED["c1"] == 3
        with rt.sessions() as s:
            statuses = dict(s.execute(select(TaskLog.task_id, TaskLog.status)).all())
        assert set(statuses.values()) == {"CANCELLED"}  # late results were fenced off
        assert rt.batch_status("cancel_me", "c1") == "CANCELLED"


def test_is_active_turns_false_when_the_timeout_passes(clock: Any) -> None:
    ctx = TaskContext(pipeline="p", batch_id="b", task="t", attempt=1, config={}, input={},
                      deadline=clock.now() + timedelta(seconds=30), clock=clock)
    assert ctx.is_active()
    clock.advance(31)
    assert not ctx.is_active()


class _SlowJob:
    job_id = "j1"
    error_result = None
    state = "RUNNING"

    def __init__(self) -> None:
        self.polls = 0

    def done(self) -> bool:
        self.polls += 1
        return False

    def result(self, timeout: float | None = None) -> Any:
        raise AssertionError("never waited on: the job was cancelled")


class _Client:
    project = "proj"

    def __init__(self) -> None:
        from google.api_core import exceptions as gexc

        self.job = _SlowJob()
        self.cancelled: list[tuple[str, Any]] = []
        self._gexc = gexc

    def get_job(self, job_id: str, location: Any = None) -> Any:
        raise self._gexc.NotFound("no job")

    def query(self, sql: str, job_config: Any, job_id: str | None = None, location: Any = None,
              job_retry: Any = None) -> Any:
        return self.job

    def cancel_job(self, job_id: str, location: Any = None) -> Any:
        self.cancelled.append((job_id, location))
        return SimpleNamespace(job_id=job_id)


def test_a_bigquery_job_is_cancelled_through_the_api_once_its_attempt_is_inactive() -> None:
    client = _Client()
    wh = BigQueryWarehouse("proj", "analytics", location="EU", client=client, poll_interval_s=0)
    checks = iter([True, True, False])
    with pytest.raises(RetryableError, match="cancelled"):
        wh.run_query("SELECT 1", {}, job_id="j1", is_active=lambda: next(checks))
    assert client.cancelled == [("j1", "EU")]
    assert client.job.polls == 3


def test_a_local_job_of_an_inactive_attempt_rolls_back(tmp_path: Path) -> None:
    wh = DuckDBWarehouse(tmp_path / "wh.duckdb", default_dataset="analytics")
    try:
        with pytest.raises(RetryableError, match="no longer active"):
            wh.run_query("CREATE TABLE analytics.t AS SELECT 1 AS x", {}, job_id="j1",
                         is_active=lambda: False)
        assert wh.job_state("j1") == JobState.UNKNOWN
        assert not wh.table_exists("analytics.t")
    finally:
        wh.close()
