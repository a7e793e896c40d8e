"""The worker alone: claim, run, record, continue; duplicates and stale attempts are
acknowledged without running anything (Postgres and SQLite)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Task, TaskLog
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import RunTask
from orchestrator.testing import reset_process_caches
from orchestrator.worker import Worker
from tests.conftest import FakeClock
from tests.units import dispatcher, started, statuses

RUNS: list[str] = []


def count(ctx: TaskContext) -> dict[str, Any]:
    RUNS.append(ctx.task)
    return {"item": ctx.input.get("item"), "parents": sorted(ctx.parents)}


def items(ctx: TaskContext) -> dict[str, Any]:
    return {"list": ["x", "y", "z"]}


def py(fn: str, **extra: Any) -> dict[str, Any]:
    return {"handler": "python", "config": {"callable": f"tests.test_worker:{fn}"}, **extra}


def run(pipeline: str, task: str, attempt: int = 1, map_index: int = -1) -> RunTask:
    return RunTask(type="run_task", pipeline=pipeline, batch_id="b1", task=task,
                   attempt=attempt, map_index=map_index)


def worker(sessions: sessionmaker[Session], clock: FakeClock, continuation_s: float = 0.0):
    reset_process_caches()
    RUNS.clear()
    d, published = dispatcher(sessions, clock)
    return Worker(sessions, d, clock, continuation_s=continuation_s), published


def test_a_claimed_task_runs_once_and_its_ready_child_is_published(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    w, published = worker(sessions, clock)
    started(sessions, clock.now(), "chain", {"a": [], "b": ["a"]}, a=py("count"), b=py("count"))
    assert w.run_task(run("chain", "a")).outcome == "succeeded"
    assert w.run_task(run("chain", "a")).outcome == "duplicate"  # the same delivery again
    assert RUNS == ["a"]
    assert published.tasks() == [("chain", "b1", "b", 1)]
    assert statuses(sessions) == {"a": "SUCCESS", "b": "QUEUED"}


def test_a_delivery_for_an_attempt_not_queued_runs_nothing(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    w, published = worker(sessions, clock)
    started(sessions, clock.now(), "one", {"a": []}, a=py("count"))
    assert w.run_task(run("one", "a", attempt=2)).outcome == "duplicate"
    assert RUNS == [] and published.messages == []
    assert statuses(sessions) == {"a": "QUEUED"}


def test_the_continuation_runs_the_readied_child_here_without_a_publish(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    w, published = worker(sessions, clock, continuation_s=30.0)
    started(sessions, clock.now(), "chain", {"a": [], "b": ["a"], "c": ["b"]},
            a=py("count"), b=py("count"), c=py("count"))
    assert w.run_task(run("chain", "a")).outcome == "succeeded"
    assert RUNS == ["a", "b", "c"]
    assert published.messages == []
    assert statuses(sessions) == {"a": "SUCCESS", "b": "SUCCESS", "c": "SUCCESS"}


def test_a_mapped_task_expands_into_instances_and_gathers_them(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    w, published = worker(sessions, clock)
    started(sessions, clock.now(), "fan", {"src": [], "each": ["src"]}, src=py("items"),
            each=py("count", map_over={"parent_output": "src.list"}))
    w.run_task(run("fan", "src"))
    assert w.run_task(run("fan", "each")).outcome == "expanded"
    instances = [m for m in published.data if m.get("map_index") is not None]
    assert [m["map_index"] for m in instances] == [0, 1, 2]
    for i in (2, 0, 1):
        assert w.run_task(run("fan", "each", map_index=i)).outcome == "succeeded"
    assert statuses(sessions)["each"] == "SUCCESS"
    with sessions() as s:
        output = s.execute(select(TaskLog.output).join(Task, Task.id == TaskLog.task_id)
                           .where(Task.name == "each", TaskLog.map_index == -1)).scalar_one()
    assert [o["item"] for o in output] == ["x", "y", "z"]  # in index order, not finish order
