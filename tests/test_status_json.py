"""The status document written by the database is the documented one.

`queries.batch_status_json` has the database build every task's JSON object (what the
`status` function and `status --json` serve as written). Here its document is compared,
whole, with the same document built in Python from the task log's rows, the way the
status query always built it, for real batches on PostgreSQL and SQLite: every task
status, errors with quotes, newlines and non-ASCII text, nested outputs, waiting for a
file, mixed-case parent names, cancelled batches, and mapped tasks (succeeded, failed,
and not yet expanded).
"""

from __future__ import annotations

import heapq
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import queries
from orchestrator.db.models import Batch, Pipeline, Task, TaskDependency, TaskLog
from orchestrator.db.session import make_sessionmaker, transaction
from orchestrator.engine import (
    cancel_batch,
    claim,
    expansion,
    fail,
    resolve_task,
    start_batch,
    succeed,
)
from orchestrator.errors import PermanentError
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.status import TaskStatus
from tests.dags import sync

HERE = "tests.test_status_json"
T0 = datetime(2024, 3, 1, 12, 0, 0, 123456).astimezone()  # aware, in the local zone

# -- the document as Python built it from the rows -------------------------------------


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    us = (b - a) // timedelta(microseconds=1)
    ms = (abs(us) + 500) // 1000
    return (ms if us >= 0 else -ms) / 1000


def _topological(ids: list[int], parents: dict[int, list[int]]) -> list[int]:
    indegree = {t: 0 for t in ids}
    children: dict[int, list[int]] = {}
    for c, ps in parents.items():
        for p in ps:
            indegree[c] += 1
            children.setdefault(p, []).append(c)
    ready = [t for t, n in indegree.items() if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        t = heapq.heappop(ready)
        order.append(t)
        for c in children.get(t, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    return order


def reference(session: Session, batch_id: str, pipeline: str) -> dict[str, Any]:
    batch, name = session.execute(
        select(Batch, Pipeline.name).join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .where(Batch.batch_id == batch_id, Pipeline.name == pipeline)).one()
    rows = {t.id: (t, log) for log, t in session.execute(
        select(TaskLog, Task).join(Task, Task.id == TaskLog.task_id)
        .where(TaskLog.batch_pk == batch.id, TaskLog.map_index == -1)).all()}
    parents: dict[int, list[int]] = {}
    for c, p in session.execute(select(TaskDependency.child_task_id,
                                       TaskDependency.parent_task_id)
                                .where(TaskDependency.child_task_id.in_(list(rows)))):
        parents.setdefault(c, []).append(p)
    instances: dict[int, dict[str, int]] = {}
    for log in session.execute(select(TaskLog).where(TaskLog.batch_pk == batch.id,
                                                     TaskLog.map_index >= 0)).scalars():
        counts = instances.setdefault(log.task_id, {})
        counts[str(log.status)] = counts.get(str(log.status), 0) + 1
    tasks, counts = [], {}
    for tid in _topological(list(rows), parents):
        t, log = rows[tid]
        counts[str(log.status)] = counts.get(str(log.status), 0) + 1
        inst = instances.get(tid) if t.map_over else None
        tasks.append({
            "task": t.name, "status": str(log.status), "attempt": log.attempt,
            "max_attempts": (log.retry_base or 0) + t.max_attempts,
            "trigger_rule": str(log.trigger_rule),
            "depends_on": sorted(rows[p][0].name for p in parents.get(tid, [])),
            "waiting_for_file": bool(log.waiting_for_file),
            "queued_at": _iso(log.queued_at), "started_at": _iso(log.started_at),
            "finished_at": _iso(log.finished_at),
            "duration_s": _seconds(log.started_at, log.finished_at),
            "next_attempt_at": _iso(log.next_attempt_at), "error": log.error,
            "output": log.output,
            "instances": ({"total": sum(inst.values()),
                           "counts": {s.value: inst[s.value] for s in TaskStatus
                                      if s.value in inst}} if inst else None),
        })
    return {
        "schema": queries.SCHEMA, "pipeline": name, "batch_id": batch.batch_id,
        "status": str(batch.status), "params": batch.params or {},
        "created_at": _iso(batch.created_at), "finished_at": _iso(batch.finished_at),
        "duration_s": _seconds(batch.created_at, batch.finished_at),
        "deadline_at": _iso(batch.deadline_at), "warn_at": _iso(batch.warn_at),
        "logical_at": _iso(batch.logical_at),
        "counts": {s.value: counts[s.value] for s in TaskStatus if s.value in counts},
        "tasks": tasks,
    }


def assert_same(sessions: sessionmaker[Session], batch_id: str, pipeline: str) -> dict[str, Any]:
    with sessions() as s:
        served = queries.batch_status_json(s, batch_id, pipeline)
        expected = reference(s, batch_id, pipeline)
    doc = json.loads(served)
    assert doc == expected
    # The same keys in the same order, as the documented shape lists them.
    assert list(doc) == list(expected)
    assert [list(t) for t in doc["tasks"]] == [list(t) for t in expected["tasks"]]
    return doc


# -- batches ------------------------------------------------------------------------------

EVERY_STATUS = {
    "name": "every_status",
    "tasks": [
        {"name": "Zeta_ok", "handler": "noop"},
        {"name": "Alpha_err", "handler": "noop", "retry": {"max_attempts": 1}},
        {"name": "retrying", "handler": "noop", "retry": {"max_attempts": 4}},
        {"name": "running", "handler": "noop"},
        {"name": "queued", "handler": "noop"},
        # A child listed before one of its parents, parents in mixed case.
        {"name": "upstream", "handler": "noop", "depends_on": ["Zeta_ok", "Alpha_err", "b_ok"]},
        {"name": "b_ok", "handler": "noop"},
        {"name": "skipped", "handler": "noop", "depends_on": ["Zeta_ok"],
         "trigger_rule": "one_failed"},
        {"name": "pending", "handler": "noop", "depends_on": ["running"]},
        {"name": "waits_for_file", "handler": "noop",
         "gcs_trigger": {"bucket": "landing", "pattern": "in/{batch_id}/_SUCCESS"}},
    ],
}


def _claim(s: Session, batch_id: str, task: str, now: datetime) -> Any:
    row = resolve_task(s, "every_status", batch_id, task)
    assert claim(s, row, row.attempt, now) is not None
    return row


def _run(sessions: sessionmaker[Session], batch_id: str) -> None:
    at = [T0 + timedelta(seconds=i, microseconds=m) for i, m in
          enumerate((0, 1500, 2500, 999_500, 7, 0, 500, 250_000))]

    def ok(task: str, start: datetime, end: datetime, output: Any) -> None:
        row = transaction(sessions, lambda s: _claim(s, batch_id, task, start))
        transaction(sessions, lambda s: succeed(s, resolve_task(s, "every_status", batch_id,
                                                                task), row.attempt, output, end))

    def ko(task: str, start: datetime, end: datetime, error: str, delay: float | None) -> None:
        row = transaction(sessions, lambda s: _claim(s, batch_id, task, start))
        transaction(sessions, lambda s: fail(s, resolve_task(s, "every_status", batch_id, task),
                                             row.attempt, error, end, retry_delay_s=delay))

    transaction(sessions, lambda s: start_batch(
        s, "every_status", batch_id, {"region": "nord", "n": [1, 2.5, None]}, at[0]))
    # Durations that end in exactly half a millisecond, and whole seconds.
    ok("Zeta_ok", at[1], at[2], {"rows": 3, "nested": {"x": [1, 2.5, None, "é ✓"]}})
    ok("b_ok", at[2], at[3], None)
    ko("Alpha_err", at[3], at[5], 'échec "quoted"\nline two\ttab \\ back ✓', None)
    ko("retrying", at[4], at[6], "transient", 30.0)
    transaction(sessions, lambda s: _claim(s, batch_id, "running", at[7]))


def test_every_status_is_the_same_document(sessions: sessionmaker[Session]) -> None:
    sync(sessions, build_pipeline(EVERY_STATUS), T0)
    _run(sessions, "2024-03")
    doc = assert_same(sessions, "2024-03", "every_status")
    statuses = {t["task"]: t["status"] for t in doc["tasks"]}
    assert statuses == {
        "Zeta_ok": "SUCCESS", "Alpha_err": "ERROR", "retrying": "RETRYING",
        "running": "RUNNING", "queued": "QUEUED", "upstream": "UPSTREAM_FAILED",
        "b_ok": "SUCCESS", "skipped": "SKIPPED", "pending": "PENDING",
        "waits_for_file": "PENDING"}
    by = {t["task"]: t for t in doc["tasks"]}
    assert by["upstream"]["depends_on"] == ["Alpha_err", "Zeta_ok", "b_ok"]
    assert by["waits_for_file"]["waiting_for_file"] is True
    assert by["Zeta_ok"]["duration_s"] == 1.001  # 1.001000 s
    assert by["Alpha_err"]["duration_s"] == 1.001  # 1.000500 s: half away from zero
    # A cancelled batch: its open tasks CANCELLED, the batch finished with a duration.
    _run(sessions, "2024-04")
    transaction(sessions, lambda s: cancel_batch(s, "every_status", "2024-04",
                                                 T0 + timedelta(minutes=5, microseconds=1)))
    doc = assert_same(sessions, "2024-04", "every_status")
    assert doc["status"] == "CANCELLED" and doc["counts"]["CANCELLED"] >= 1


def test_whole_seconds_and_half_milliseconds_round_as_documented(
        sessions: sessionmaker[Session]) -> None:
    """Timestamps without microseconds drop them, as isoformat does; a duration of
    exactly x.xxx5 s rounds away from zero."""
    sync(sessions, build_pipeline({"name": "every_status", "tasks": EVERY_STATUS["tasks"]}), T0)
    _run(sessions, "b")
    whole = T0.replace(microsecond=0)
    with sessions.begin() as s:
        s.execute(update(TaskLog).values(started_at=whole,
                                         finished_at=whole + timedelta(microseconds=2_674_500))
                  .where(TaskLog.status == "SUCCESS"))
    doc = assert_same(sessions, "b", "every_status")
    ok = next(t for t in doc["tasks"] if t["task"] == "Zeta_ok")
    assert ok["started_at"] == whole.astimezone(UTC).isoformat()
    assert "." not in ok["started_at"] and ok["duration_s"] == 2.675


# -- mapped tasks, run by the embedded runtime ---------------------------------------------


def list_regions(ctx: Any) -> dict[str, Any]:
    return {"regions": ["north", "south", "east", "west"]}


def load_one(ctx: Any) -> dict[str, Any]:
    if ctx.input["item"] == "east" and ctx.params.get("break_east"):
        raise PermanentError("east is broken")
    return {"item": ctx.input["item"]}


def total(ctx: Any) -> dict[str, Any]:
    return {"n": len(ctx.parents["load"])}


def _py(fn: str, **extra: Any) -> dict[str, Any]:
    return {"handler": "python", "config": {"callable": f"{HERE}:{fn}"}, **extra}


MAPPED = {"name": "mapped", "tasks": [
    {"name": "regions", **_py("list_regions")},
    {"name": "load", "depends_on": ["regions"], "retry": {"max_attempts": 1},
     **_py("load_one", map_over={"parent_output": "regions.regions"})},
    {"name": "total", "depends_on": ["load"], **_py("total")},
]}


def test_mapped_batches_are_the_same_document(any_engine: Engine, tmp_path: Path) -> None:
    url = any_engine.url.render_as_string(hide_password=False)
    rt = Runtime.embedded(Settings(home=tmp_path / "home", database_url=url), workers=2,
                          migrate_db=False)
    try:
        rt.sync_specs([build_pipeline(MAPPED)])
        rt.start_batch("mapped", "fine")
        assert rt.wait("mapped", "fine", timeout=60) == "SUCCESS"
        rt.start_batch("mapped", "broken", params={"break_east": True})
        assert rt.wait("mapped", "broken", timeout=60) == "FAILED"
    finally:
        rt.close()
    sessions = make_sessionmaker(any_engine)
    fine = assert_same(sessions, "fine", "mapped")
    assert fine["tasks"][1]["instances"] == {"total": 4, "counts": {"SUCCESS": 4}}
    broken = assert_same(sessions, "broken", "mapped")
    load = broken["tasks"][1]
    assert load["status"] == "ERROR"
    assert load["instances"]["total"] == 4 and load["instances"]["counts"]["ERROR"] == 1
    assert broken["tasks"][2]["status"] == "UPSTREAM_FAILED"


def test_a_mapped_task_not_yet_expanded_has_no_instances(sessions: sessionmaker[Session]) -> None:
    sync(sessions, build_pipeline(MAPPED), T0)
    transaction(sessions, lambda s: start_batch(s, "mapped", "b", {}, T0))
    doc = assert_same(sessions, "b", "mapped")
    assert [t["instances"] for t in doc["tasks"]] == [None, None, None]


# -- the order of the tasks ---------------------------------------------------------------

# Listed out of order (a child before its parents), names that sort neither in the
# order of the definition nor in topological order, a diamond, a mapped task inside it.
DIAMOND = {"name": "diamond", "tasks": [
    {"name": "z_join", "handler": "noop", "depends_on": ["b_left", "A_right"]},
    {"name": "b_left", "handler": "noop", "depends_on": ["m_root"]},
    {"name": "m_root", "handler": "noop"},
    {"name": "A_right", "handler": "noop", "depends_on": ["m_root"],
     "map_over": {"parent_output": "m_root.items"}},
    {"name": "c_tail", "handler": "noop", "depends_on": ["z_join"]},
    {"name": "a_solo", "handler": "noop"},
]}
# Kahn's algorithm, the ready task defined first going first.
DIAMOND_ORDER = ["m_root", "b_left", "A_right", "z_join", "c_tail", "a_solo"]


def test_tasks_come_in_topological_order_ties_in_the_order_of_the_definition(
        sessions: sessionmaker[Session]) -> None:
    sync(sessions, build_pipeline(DIAMOND), T0)
    transaction(sessions, lambda s: start_batch(s, "diamond", "d", {}, T0))

    def run(s: Session) -> None:
        row = resolve_task(s, "diamond", "d", "m_root")
        assert claim(s, row, row.attempt, T0) is not None
        succeed(s, resolve_task(s, "diamond", "d", "m_root"), row.attempt,
                {"items": ["x", "y", "z"]}, T0 + timedelta(seconds=1))

    def expand(s: Session) -> None:
        row = resolve_task(s, "diamond", "d", "A_right")
        claimed = claim(s, row, row.attempt, T0 + timedelta(seconds=2))
        assert claimed is not None
        expansion.expand(s, resolve_task(s, "diamond", "d", "A_right"), claimed.attempt,
                         ["x", "y", "z"], T0 + timedelta(seconds=2))

    transaction(sessions, run)
    transaction(sessions, expand)
    doc = assert_same(sessions, "d", "diamond")
    assert [t["task"] for t in doc["tasks"]] == DIAMOND_ORDER
    by = {t["task"]: t for t in doc["tasks"]}
    assert by["z_join"]["depends_on"] == ["A_right", "b_left"]
    assert by["A_right"]["instances"]["total"] == 3
    # A new version that reorders the graph orders the new batches; the old batch
    # keeps its version's order.
    flipped = {"name": "diamond", "tasks": [
        {"name": "m_root", "handler": "noop", "depends_on": ["a_solo"]},
        *(t for t in DIAMOND["tasks"] if t["name"] != "m_root")]}
    sync(sessions, build_pipeline(flipped), T0)
    transaction(sessions, lambda s: start_batch(s, "diamond", "e", {}, T0))
    doc = assert_same(sessions, "e", "diamond")
    assert [t["task"] for t in doc["tasks"]] == [
        "a_solo", "m_root", "b_left", "A_right", "z_join", "c_tail"]
    assert [t["task"] for t in assert_same(sessions, "d", "diamond")["tasks"]] == DIAMOND_ORDER
