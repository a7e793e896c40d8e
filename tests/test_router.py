"""The router: handlers by name, retryable and permanent failures, fencing, dead
letters, and the in-process bus that calls the same router (Postgres and SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import handlers
from orchestrator.db.models import Task, TaskEvent, TaskLog
from orchestrator.errors import (
    InfrastructureError,
    PermanentError,
    PipelineValidationError,
    RetryableError,
)
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import RunTask, StartBatch
from orchestrator.pipeline.load import build_pipeline
from orchestrator.router import Router
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import FailingPublisher, RecordingPublisher, reset_process_caches
from tests.conftest import FakeClock
from tests.dags import spec_from_edges, sync

SEEN: list[dict[str, Any]] = []


def add(ctx: TaskContext) -> dict[str, Any]:
    SEEN.append({"task": ctx.task, "params": ctx.params, "parents": ctx.parents})
    return {"n": ctx.params.get("base", 0) + sum(p["n"] for p in ctx.parents.values())}


def flaky(ctx: TaskContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RetryableError("warehouse busy")
    return {"attempt": ctx.attempt}


def broken(ctx: TaskContext) -> dict[str, Any]:
    raise PermanentError("bad data in row 7")


def surprising(ctx: TaskContext) -> dict[str, Any]:
    raise ZeroDivisionError("division by zero")


def not_a_dict(ctx: TaskContext) -> Any:
    return [1, 2, 3]


def py(fn: str, **extra: Any) -> dict[str, Any]:
    return {"handler": "python", "config": {"callable": f"tests.test_router:{fn}"}, **extra}


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def router(sessions: sessionmaker[Session], clock: FakeClock,
           published: RecordingPublisher) -> Iterator[Router]:
    reset_process_caches()
    SEEN.clear()
    yield Router(sessions, published, clock=clock)


def status(router: Router, task: str) -> tuple[str, int, str | None]:
    with router.sessions() as s:
        row = s.execute(select(TaskLog.status, TaskLog.attempt, TaskLog.error)
                        .join(Task, Task.id == TaskLog.task_id).where(Task.name == task)).one()
    return str(row[0]), row[1], row[2]


def start(router: Router, pipeline: str, batch_id: str = "b1", **params: Any) -> None:
    router.start_batch(StartBatch(type="start_batch", pipeline=pipeline, batch_id=batch_id,
                                  params=params))


def test_python_handler_gets_params_and_parent_outputs_and_feeds_its_child(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """`python` calls module:function with the task input; its dict is the child's input."""
    spec = spec_from_edges("sum", {"x": [], "y": [], "z": ["x", "y"]},
                           x=py("add"), y=py("add"), z=py("add"))
    sync(router.sessions, spec, clock.now())
    start(router, "sum", base=1)
    # Two roots delivered; the last to finish runs z itself (continuation).
    assert published.pump(router) == 2
    assert status(router, "z")[0] == "SUCCESS"
    z = next(s for s in SEEN if s["task"] == "z")
    assert z == {"task": "z", "params": {"base": 1}, "parents": {"x": {"n": 1}, "y": {"n": 1}}}
    with router.sessions() as s:
        outputs = s.execute(select(TaskLog.output).join(Task, Task.id == TaskLog.task_id)
                            .where(Task.name == "z")).scalar_one()
    assert outputs == {"n": 3}


@pytest.mark.parametrize(("config", "says"), [
    ({}, "'callable' is required"),
    ({"callable": "no_colon"}, "module:function"),
    ({"callable": "pkg.mod:"}, "module:function"),
    ({"callable": "pkg mod:fn"}, "module:function"),
    ({"callable": 3}, "module:function"),
    ({"callable": "a:b", "retries": 2}, "unknown config key 'retries'"),
])
def test_python_handler_config_is_checked_at_sync(config: dict[str, Any], says: str) -> None:
    """A bad `callable` fails the pipeline definition before any batch starts."""
    with pytest.raises(PipelineValidationError, match=says):
        build_pipeline({"name": "p", "tasks": [{"name": "t", "handler": "python",
                                                 "config": config}]})


def test_retryable_error_goes_through_the_retry_policy(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """RetryableError -> RETRYING; after the backoff the sweeper queues attempt 2."""
    retry = {"max_attempts": 3, "initial_delay_s": 30}
    sync(router.sessions, spec_from_edges("f", {"t": []}, t=py("flaky", retry=retry)),
         clock.now())
    start(router, "f")
    published.pump(router)
    assert status(router, "t")[:2] == ("RETRYING", 1)
    assert "warehouse busy" in (status(router, "t")[2] or "")
    clock.advance(29)
    assert router.sweep().requeued == 0
    clock.advance(2)
    assert router.sweep().requeued == 1
    published.pump(router)
    assert status(router, "t")[:2] == ("SUCCESS", 2)


def test_permanent_error_fails_at_once_and_the_child_is_upstream_failed(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """PermanentError -> ERROR with attempts left; children never run."""
    spec = spec_from_edges("p", {"t": [], "c": ["t"]},
                           t=py("broken", retry={"max_attempts": 5}))
    sync(router.sessions, spec, clock.now())
    start(router, "p")
    published.pump(router)
    assert status(router, "t") == ("ERROR", 1, "PermanentError: bad data in row 7")
    assert status(router, "c")[0] == "UPSTREAM_FAILED"


def test_an_unknown_exception_is_retried_until_attempts_run_out(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """Any other exception counts as retryable, bounded by max_attempts."""
    retry = {"max_attempts": 2, "initial_delay_s": 0}
    sync(router.sessions, spec_from_edges("u", {"t": []}, t=py("surprising", retry=retry)),
         clock.now())
    start(router, "u")
    published.pump(router)
    assert status(router, "t")[:2] == ("ERROR", 2)


@pytest.mark.parametrize(("task", "says"), [
    (py("not_a_dict"), "expected a dict"),
    (py("missing_function"), "cannot load"),
    ({"handler": "python", "config": {"callable": "tests.no_such_module:fn"}}, "cannot load"),
])
def test_a_handler_that_cannot_work_ends_in_error_without_retry(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        task: dict[str, Any], says: str) -> None:
    """Unloadable callables and non-dict outputs are permanent failures."""
    sync(router.sessions, spec_from_edges("h", {"t": []}, t=task), clock.now())
    start(router, "h")
    published.pump(router)
    state, attempt, error = status(router, "t")
    assert (state, attempt) == ("ERROR", 1) and says in (error or "")


def test_handlers_registered_by_name_are_resolved_by_the_router(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """`register(name, callable)` adds a handler a pipeline can name."""
    handlers.register("stamp", lambda ctx: {"stamped": ctx.batch_id})
    try:
        spec = build_pipeline({"name": "r", "tasks": [{"name": "t", "handler": "stamp"}]})
        sync(router.sessions, spec, clock.now())
        start(router, "r", batch_id="2024-03")
        published.pump(router)
    finally:
        handlers.unregister("stamp")
    assert status(router, "t")[0] == "SUCCESS"


def test_noop_sleeps_its_seconds(router: Router, published: RecordingPublisher,
                                 clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """noop's optional `seconds` is how long it sleeps."""
    slept: list[float] = []
    monkeypatch.setattr("orchestrator.handlers.noop.time.sleep", slept.append)
    sync(router.sessions, spec_from_edges("n", {"t": []}, t={"config": {"seconds": 1.5}}),
         clock.now())
    start(router, "n")
    published.pump(router)
    assert slept == [1.5] and status(router, "t")[0] == "SUCCESS"


def test_a_late_result_from_an_expired_attempt_is_fenced_off(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """The lease expires mid-run and attempt 2 is queued: attempt 1's success is stale."""
    outcomes: list[str] = []

    def zombie(ctx: TaskContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            clock.advance(120)
            router.sweep()
        return {"attempt": ctx.attempt}

    handlers.register("zombie", zombie)
    try:
        retry = {"max_attempts": 3, "initial_delay_s": 0}
        spec = build_pipeline({"name": "z", "tasks": [
            {"name": "t", "handler": "zombie", "timeout_s": 60, "retry": retry}]})
        sync(router.sessions, spec, clock.now())
        start(router, "z")
        first = published.take()
        outcomes.append(router.handle_payload(dict(first[0].data)).outcome)
        assert status(router, "t")[:2] == ("QUEUED", 2)
        published.pump(router)
    finally:
        handlers.unregister("zombie")
    assert outcomes == ["stale"]
    assert status(router, "t")[:2] == ("SUCCESS", 2)


def test_dead_letter_fails_a_running_attempt_and_ignores_another_attempt(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """Only the dead letter's own attempt, QUEUED or RUNNING, is folded into ERROR."""
    sync(router.sessions, spec_from_edges("d", {"t": []}), clock.now())
    start(router, "d")
    msg = RunTask(type="run_task", pipeline="d", batch_id="b1", task="t", attempt=1)
    assert router.dead_letter(msg.model_copy(update={"attempt": 2}), 5).outcome == "duplicate"
    assert status(router, "t")[0] == "QUEUED"
    assert router.dead_letter(msg, 5).outcome == "failed"
    assert status(router, "t") == ("ERROR", 1, "dead-lettered after 5 delivery attempts")
    assert router.dead_letter(msg, 5).outcome == "duplicate"


def test_publisher_outage_raises_infrastructure_error_after_commit(
        router: Router, clock: FakeClock) -> None:
    """The batch is committed with its roots QUEUED, then the publish error propagates."""
    sync(router.sessions, spec_from_edges("o", {"t": []}), clock.now())
    router.dispatcher.publisher = FailingPublisher()
    with pytest.raises(InfrastructureError, match="Pub/Sub unavailable"):
        start(router, "o")
    assert status(router, "t")[0] == "QUEUED"


def test_embedded_runtime_bus_runs_a_pipeline_through_the_same_router(tmp_path: Path) -> None:
    """The in-process bus is a worker pool calling Router.handle_payload."""
    reset_process_caches()
    with Runtime.embedded(Settings(home=tmp_path), workers=3) as rt:
        rt.sync_specs([spec_from_edges("local", {"a": [], "b": ["a"], "c": ["a"],
                                                 "d": ["b", "c"]})])
        assert rt.start_batch("local", "2024-03")
        assert rt.wait("local", "2024-03", timeout=20) == "SUCCESS"
        # a; then one of b/c (its sibling runs on a's worker); d runs on the last one's.
        assert rt.bus.published == 2


@pytest.mark.parametrize("continuation_s, deliveries", [(30.0, 1), (0.0, 4)])
def test_a_worker_runs_the_child_it_queued_unless_continuation_is_off(
        router: Router, published: RecordingPublisher, clock: FakeClock,
        continuation_s: float, deliveries: int) -> None:
    """A chain runs from one delivery: each SUCCESS claims the next task in its own
    transaction; with continuation off, every task is published and delivered."""
    router.worker.continuation_s = continuation_s
    sync(router.sessions, spec_from_edges("chain", {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}),
         clock.now())
    start(router, "chain")
    assert published.pump(router) == deliveries
    assert [status(router, t)[0] for t in "abcd"] == ["SUCCESS"] * 4
    with router.sessions() as s:
        claims = s.execute(select(func.count()).select_from(TaskEvent)
                           .where(TaskEvent.to_status == "RUNNING",
                                  TaskEvent.task_id.is_not(None))).scalar_one()
    assert claims == 4  # each task claimed once, whichever way it was reached
