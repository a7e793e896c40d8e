"""Circuit breakers on real Postgres, on an injected clock: N failures within a window
open the breaker, new claims wait instead of calling the service, one probe is let
through after the open time, and its success closes the breaker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import handlers
from orchestrator.db.session import transaction
from orchestrator.engine import breaker
from orchestrator.errors import PipelineValidationError
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import StartBatch
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests import reliability as rel
from tests.conftest import FakeClock
from tests.dags import sync

pytestmark = pytest.mark.postgres

BREAKER = {"failures": 3, "window_s": 60, "open_s": 30}


class Service:
    """A dependency that is down until the test brings it up; counts its calls."""

    def __init__(self) -> None:
        self.up = False
        self.calls: list[str] = []

    def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        self.calls.append(ctx.task)
        if not self.up:
            raise ConnectionError("billing-api: 503")
        return {}


@pytest.fixture
def service() -> Iterator[Service]:
    svc = Service()
    handlers.register("billing", svc)
    handlers.register("invoices", svc)
    yield svc
    handlers.unregister("billing")
    handlers.unregister("invoices")


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], clock: FakeClock,
           published: RecordingPublisher, service: Service) -> Router:
    reset_process_caches()
    return Router(pg_sessions, published, clock=clock, redispatch_after_s=3600)


def spec(name: str, tasks: dict[str, str], cb: Any, max_attempts: int = 3) -> Any:
    return rel.pipeline(name, [
        {"name": t, "handler": h, "config": {"circuit_breaker": cb},
         "retry": {"max_attempts": max_attempts, "initial_delay_s": 1, "backoff_factor": 1}}
        for t, h in tasks.items()])


def statuses(engine: Engine) -> dict[str, str]:
    return {t: s for (_, t), (s, _) in rel.task_states(engine).items()}


def breaker_state(sessions: sessionmaker[Session], key: str) -> str:
    with sessions() as s:
        return breaker.state_of(s, key)


def deferrals(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text(
            "SELECT count(*) FROM task_events WHERE from_status = 'QUEUED' "
            "AND to_status = 'RETRYING'")).scalar_one())


def test_consecutive_failures_open_the_breaker_and_a_successful_probe_closes_it(
        router: Router, published: RecordingPublisher, clock: FakeClock, service: Service,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """Five tasks on one failing service: three calls open the breaker, the other two
    wait out 30 s without a call, one probe per open period, then all succeed, and
    waiting spent none of the three attempts each task has."""
    tasks = {f"invoice{i}": "billing" for i in range(5)}
    sync(pg_sessions, spec("bill", tasks, BREAKER), clock.now())
    router.start_batch(StartBatch(type="start_batch", pipeline="bill", batch_id="b1"))
    published.pump(router)
    key = "handler:billing"
    assert len(service.calls) == 3
    assert breaker_state(pg_sessions, key) == breaker.OPEN
    assert deferrals(pg_engine) == 2
    opened = clock.now()

    # Retries come due while the breaker is open: they wait again, no call is made.
    for _ in range(29):
        clock.advance(1)
        router.sweep()
        published.pump(router)
    assert len(service.calls) == 3
    assert set(statuses(pg_engine).values()) == {"RETRYING"}

    # Open time over: exactly one probe; the service is still down, so it opens again.
    clock.advance(1)
    router.sweep()
    published.pump(router)
    assert len(service.calls) == 4
    assert breaker_state(pg_sessions, key) == breaker.OPEN
    reopened = clock.now()
    assert (reopened - opened).total_seconds() == 30

    service.up = True
    for _ in range(30):
        clock.advance(1)
        router.sweep()
        published.pump(router)
    assert len(service.calls) == 4 + 5
    assert breaker_state(pg_sessions, key) == breaker.CLOSED
    assert set(statuses(pg_engine).values()) == {"SUCCESS"}
    assert rel.batch_states(pg_engine)["b1"] == "SUCCESS"
    # Each wait lasts until the breaker may let a probe through: 2 at the opening, 3
    # retries due a second later, 4 beside the first probe, and that probe's retry.
    assert deferrals(pg_engine) == 2 + 3 + 4 + 1
    assert max(service.calls.count(t) for t in tasks) <= 3


def test_a_named_dependency_is_shared_across_handlers_and_pipelines(
        router: Router, published: RecordingPublisher, clock: FakeClock, service: Service,
        pg_sessions: sessionmaker[Session], pg_engine: Engine) -> None:
    """Failures of `billing` tasks open the `billing-api` breaker for an `invoices`
    task of another pipeline, which then waits instead of calling."""
    cb = {**BREAKER, "key": "billing-api"}
    sync(pg_sessions, spec("bill", {f"t{i}": "billing" for i in range(3)}, cb), clock.now())
    sync(pg_sessions, spec("send", {"mail": "invoices"}, cb), clock.now())
    router.start_batch(StartBatch(type="start_batch", pipeline="bill", batch_id="b1"))
    published.pump(router)
    assert breaker_state(pg_sessions, "billing-api") == breaker.OPEN
    router.start_batch(StartBatch(type="start_batch", pipeline="send", batch_id="s1"))
    published.pump(router)
    assert "mail" not in service.calls
    assert rel.task_states(pg_engine)[("s1", "mail")] == ("RETRYING", 1)
    assert breaker_state(pg_sessions, "handler:billing") == breaker.CLOSED


def test_failures_spread_wider_than_the_window_do_not_open_it(
        pg_sessions: sessionmaker[Session], pg_engine: Engine, clock: FakeClock) -> None:
    """Three failures, but never three within 60 s: closed; then three within: open."""
    policy = breaker.Policy("svc", failures=3, window_s=60, open_s=30)

    def fail() -> str:
        return transaction(pg_sessions, lambda s: breaker.record_failure(s, policy, clock.now()))

    assert [fail(), (clock.advance(50), fail())[1], (clock.advance(20), fail())[1]] == [
        breaker.CLOSED] * 3
    assert (clock.advance(10), fail())[1] == breaker.CLOSED
    assert (clock.advance(10), fail())[1] == breaker.OPEN


def test_a_success_resets_the_count_of_consecutive_failures(
        pg_sessions: sessionmaker[Session], pg_engine: Engine, clock: FakeClock) -> None:
    """fail, fail, succeed, fail, fail: still closed (the failures are not consecutive)."""
    policy = breaker.Policy("svc", failures=3, window_s=60, open_s=30)
    now = clock.now()
    for ok in (False, False, True, False):
        transaction(pg_sessions, lambda s, ok=ok: breaker.record_success(s, policy, now) if ok
                    else breaker.record_failure(s, policy, now))
    assert transaction(pg_sessions, lambda s: breaker.record_failure(s, policy, now)) == "closed"


def test_concurrent_claims_after_the_open_time_elect_exactly_one_probe(
        pg_sessions: sessionmaker[Session], pg_engine: Engine, clock: FakeClock) -> None:
    """Twelve workers at the half-open instant: one may call, eleven wait for it; a
    probe that never reports back is replaced after another open time."""
    policy = breaker.Policy("svc", failures=1, window_s=60, open_s=30)
    transaction(pg_sessions, lambda s: breaker.record_failure(s, policy, clock.now()))
    at = clock.now() + timedelta(seconds=30)
    barrier = threading.Barrier(12)
    results: list[float | None] = []

    def claim() -> None:
        barrier.wait()
        results.append(transaction(pg_sessions, lambda s: breaker.gate(s, policy, at)))

    threads = [threading.Thread(target=claim) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results.count(None) == 1
    assert all(r == 30 for r in results if r is not None)
    later = at + timedelta(seconds=30)
    assert transaction(pg_sessions, lambda s: breaker.gate(s, policy, later)) is None


@pytest.mark.parametrize("bad", [{"failures": 0}, {"open_s": "soon"}, {"retries": 3}, "yes"])
def test_a_malformed_breaker_setting_fails_the_sync(service: Service, bad: Any) -> None:
    """Checked with the pipeline, before any batch runs."""
    with pytest.raises(PipelineValidationError, match="circuit_breaker"):
        spec("bad", {"t": "billing"}, bad)


def test_the_breaker_setting_is_not_a_handler_config_problem() -> None:
    """A built-in handler with a strict config check accepts the router's setting."""
    rel.pipeline("ok", [{"name": "t", "handler": "python", "config": {
        "callable": "tests.reliability:outcome_of", "circuit_breaker": True}}])
