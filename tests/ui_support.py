"""Task logs for the UI tests: a small failed batch made through the engine, and a
10,000-task batch written in bulk (the engine would take seconds to make it)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Batch, Pipeline, Task, TaskDependency, TaskEvent, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import (
    attempts,
    claim,
    close_batch_if_done,
    fail,
    find_batch,
    resolve_task,
    start_batch,
    succeed,
)
from orchestrator.engine.attempts import AttemptRecord
from tests.dags import spec_from_edges, sync

DIAMOND = {"extract": [], "load_a": ["extract"], "load_b": ["extract"],
           "combine": ["load_a", "load_b"]}
HOSTILE = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


def run_task(sessions: sessionmaker[Session], pipeline: str, batch_id: str, task: str,
             now: datetime, error: str | None = None, output: dict[str, Any] | None = None,
             lines: list[dict[str, Any]] | None = None) -> None:
    """Claim and finish one task, with the attempt's record as a worker writes it (in
    the transaction of its result): a line it printed and, when it fails, the error
    on stderr and a traceback."""
    def claimed(s: Session) -> int:
        row = resolve_task(s, pipeline, batch_id, task)
        assert claim(s, row, row.attempt, now) is not None
        return row.attempt

    attempt = transaction(sessions, claimed)
    at = now.isoformat(timespec="milliseconds")
    log = lines if lines is not None else [
        {"at": at, "stream": "stdout", "line": f"{task}: attempt {attempt} starting"},
        *([{"at": at, "stream": "stderr", "line": error.splitlines()[0]}] if error else [])]
    record = AttemptRecord(
        started_at=now, finished_at=now, outcome="ERROR" if error else "SUCCESS", error=error,
        traceback=(f'Traceback (most recent call last):\n  File "tasks.py", line 3, in {task}\n'
                   f"{error}\n") if error else None,
        log=log, worker="test:1")

    def finished(s: Session) -> None:
        row = resolve_task(s, pipeline, batch_id, task)
        if error is None:
            succeed(s, row, attempt, output or {"rows": 3}, now)
        else:
            fail(s, row, attempt, error, now, retry_delay_s=None)
        attempts.finish(s, row, attempt, record, now)

    transaction(sessions, finished)


def failed_diamond(sessions: sessionmaker[Session], now: datetime, pipeline: str = "diamond",
                   batch_id: str = "b1", error: str = "RuntimeError: disk full",
                   params: dict[str, Any] | None = None, description: str = "") -> None:
    """extract and load_b succeed, load_a fails for good, combine is UPSTREAM_FAILED."""
    spec = spec_from_edges(pipeline, DIAMOND)
    if description:
        spec = spec.model_copy(update={"description": description})
    sync(sessions, spec, now)
    transaction(sessions, lambda s: start_batch(s, pipeline, batch_id, params or {}, now))
    t = now
    for task, err in (("extract", None), ("load_b", None), ("load_a", error)):
        t += timedelta(seconds=1)
        run_task(sessions, pipeline, batch_id, task, t, err)
    close(sessions, pipeline, batch_id, t)


def close(sessions: sessionmaker[Session], pipeline: str, batch_id: str, now: datetime) -> None:
    """What the router does after a terminal transaction commits."""
    transaction(sessions, lambda s: close_batch_if_done(
        s, find_batch(s, pipeline, batch_id).id, now))


STATUS_CYCLE = ("SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS", "SUCCESS", "RUNNING", "QUEUED",
                "PENDING", "PENDING", "ERROR")


def big_batch(engine: Engine, n: int, now: datetime, pipeline: str = "wide",
              batch_id: str = "big-1") -> None:
    """A fan-out and fan-in of `n` tasks (root → n-2 → final) with one batch in flight,
    its statuses cycling through a realistic mix, and an event per start and finish."""
    with engine.begin() as c:
        pid = c.execute(insert(Pipeline).values(
            name=pipeline, description="a wide batch", version=1, definition_hash="x",
            definition={"name": pipeline}, created_at=now, updated_at=now
        ).returning(Pipeline.id)).scalar_one()
        names = ["root", *(f"t{i:05d}" for i in range(n - 2)), "final"]
        c.execute(insert(Task), [
            {"pipeline_id": pid, "version": 1, "name": name, "handler": "noop", "config": {},
             "max_attempts": 3, "retry_initial_delay_s": 10, "retry_backoff_factor": 2,
             "retry_max_delay_s": 600, "timeout_s": 600, "trigger_rule": "all_success",
             "position": i, "depends_on_json": ('[]' if name == "root" else '["root"]'
                                                if name != "final" else json.dumps(names[1:-1]))}
            for i, name in enumerate(names)])
        ids = dict(c.execute(select(Task.name, Task.id).where(Task.pipeline_id == pid)).all())
        middle = [ids[name] for name in names[1:-1]]
        c.execute(insert(TaskDependency), [
            *({"child_task_id": t, "parent_task_id": ids["root"]} for t in middle),
            *({"child_task_id": ids["final"], "parent_task_id": t} for t in middle)])
        bpk = c.execute(insert(Batch).values(
            pipeline_id=pid, pipeline_version=1, batch_id=batch_id, params={}, status="RUNNING",
            created_at=now).returning(Batch.id)).scalar_one()
        rows, events = [], []
        for i, name in enumerate(names):
            status = ("SUCCESS" if name == "root" else "PENDING" if name == "final"
                      else STATUS_CYCLE[i % len(STATUS_CYCLE)])
            started = now + timedelta(milliseconds=i)
            ran = status in ("SUCCESS", "RUNNING", "ERROR")
            done = status in ("SUCCESS", "ERROR")
            rows.append({
                "batch_pk": bpk, "task_id": ids[name], "status": status, "attempt": 1,
                "retry_base": 0, "trigger_rule": "all_success", "map_index": -1,
                "pending_parents": 0, "failed_parents": 0, "skipped_parents": 0,
                "waiting_for_file": False, "dispatch_count": 1, "queued_at": started,
                "started_at": started if ran else None,
                "finished_at": started + timedelta(seconds=1) if done else None,
                "error": f"boom {i}" if status == "ERROR" else None, "updated_at": now})
            if ran:
                events.append({"batch_pk": bpk, "task_id": ids[name], "attempt": 1,
                               "from_status": "QUEUED", "to_status": "RUNNING", "at": started})
            if done:
                events.append({"batch_pk": bpk, "task_id": ids[name], "attempt": 1,
                               "from_status": "RUNNING", "to_status": status,
                               "at": started + timedelta(seconds=1)})
        c.execute(insert(TaskLog), rows)
        c.execute(insert(TaskEvent), events)


def event_count(sessions: sessionmaker[Session]) -> int:
    with sessions() as s:
        return int(s.execute(select(func.count()).select_from(TaskEvent)).scalar() or 0)
