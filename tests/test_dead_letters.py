"""Dead letters: a message Pub/Sub gave up on reaches `route` from the dead-letter
subscription and is folded into the task log as ERROR with its delivery count;
`orchestrator batch retry` replays the batch to SUCCESS."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from orchestrator import bootstrap
from orchestrator.cli.app import app
from orchestrator.edge import DEAD_LETTER_COUNT_ATTRIBUTE
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    RecordingPublisher,
    function_client,
    pubsub_request,
    reset_process_caches,
)
from tests import reliability as rel
from tests.conftest import FakeClock
from tests.dags import spec_from_edges

pytestmark = pytest.mark.postgres


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str) -> Iterator[Runtime]:
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher(),
                      clock=FakeClock())
    runtime.sync_specs([spec_from_edges("two", {"load": [], "report": ["load"]})])
    runtime.start_batch("two", "2024-03")
    with bootstrap.use(runtime):
        yield runtime


def dead_letter(task: str, attempt: int, count: int, **extra: Any) -> tuple[dict[str, str], bytes]:
    """The dead-letter topic's copy of a run_task message, as its push subscription
    delivers it to `route`."""
    msg = {"type": "run_task", "pipeline": "two", "batch_id": "2024-03", "task": task,
           "attempt": attempt, **extra}
    return pubsub_request(msg, topic="tasks-dead-letter", delivery_attempt=1,
                          attributes={DEAD_LETTER_COUNT_ATTRIBUTE: str(count)})


def error_of(engine: Engine, task: str) -> tuple[str, int, str | None]:
    with engine.connect() as conn:
        row = conn.execute(text(
            "SELECT l.status, l.attempt, l.error FROM task_log l JOIN tasks t ON t.id = l.task_id "
            "WHERE t.name = :t"), {"t": task}).one()
    return str(row[0]), row[1], row[2]


def test_a_dead_letter_ends_its_task_in_error_with_the_delivery_count(
        rt: Runtime, pg_engine: Engine) -> None:
    """ERROR with "after 5 delivery attempts", the child UPSTREAM_FAILED, the batch
    FAILED; a second copy of the dead letter changes nothing."""
    route = function_client("route")
    headers, body = dead_letter("load", 1, 5)
    assert route.post("/", headers=headers, data=body).status_code == 200
    status, attempt, error = error_of(pg_engine, "load")
    assert (status, attempt) == ("ERROR", 1)
    assert error == "dead-lettered after 5 delivery attempts"
    assert error_of(pg_engine, "report")[0] == "UPSTREAM_FAILED"
    assert rt.batch_status("two", "2024-03") == "FAILED"
    with pg_engine.connect() as conn:
        detail = conn.execute(text(
            "SELECT detail FROM task_events WHERE to_status = 'ERROR'")).scalar_one()
    assert "5 delivery attempts" in detail["error"]

    before = rel.task_states(pg_engine)
    headers, body = dead_letter("load", 1, 6)
    assert route.post("/", headers=headers, data=body).status_code == 200
    assert rel.task_states(pg_engine) == before


def test_a_dead_letter_for_an_attempt_that_already_moved_on_is_ignored(
        rt: Runtime, pg_engine: Engine) -> None:
    """A late dead letter of attempt 1 cannot fail attempt 2 (fencing)."""
    rt.router.publisher.take()  # type: ignore[attr-defined]
    with pg_engine.begin() as conn:
        conn.execute(text("UPDATE task_log SET attempt = 2"))
    headers, body = dead_letter("load", 1, 5)
    assert function_client("route").post("/", headers=headers, data=body).status_code == 200
    assert error_of(pg_engine, "load")[:2] == ("QUEUED", 2)


def test_a_worker_that_died_mid_attempt_is_failed_by_its_dead_letter(
        rt: Runtime, pg_engine: Engine) -> None:
    """RUNNING (its lease not yet swept) is also folded into ERROR."""
    with pg_engine.begin() as conn:
        conn.execute(text("UPDATE task_log SET status = 'RUNNING' WHERE status = 'QUEUED'"))
    headers, body = dead_letter("load", 1, 7)
    assert function_client("route").post("/", headers=headers, data=body).status_code == 200
    assert error_of(pg_engine, "load") == ("ERROR", 1, "dead-lettered after 7 delivery attempts")


def test_batch_retry_replays_a_dead_lettered_batch_to_success(
        rt: Runtime, pg_engine: Engine, pg_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`orchestrator batch retry` requeues the dead-lettered task, runs it and its
    child, and exits 0 with the batch SUCCESS."""
    headers, body = dead_letter("load", 1, 5)
    function_client("route").post("/", headers=headers, data=body)
    assert rt.batch_status("two", "2024-03") == "FAILED"
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["batch", "retry", "2024-03", "-p", "two", "--timeout", "30"])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert rt.batch_status("two", "2024-03") == "SUCCESS"
    # Never claimed before, so it keeps attempt 1: a claim is still once per attempt.
    assert error_of(pg_engine, "load") == ("SUCCESS", 1, None)
    assert error_of(pg_engine, "report")[:2] == ("SUCCESS", 1)
