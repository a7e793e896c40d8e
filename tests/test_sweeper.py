"""The sweeper, on real Postgres: lost publishes, leases, backoff, batch closing and
deadlines, and concurrent passes that never publish a task twice."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Batch, Task, TaskAttempt, TaskLog
from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.engine import claim, maintenance, resolve_task
from orchestrator.messages import StartBatch
from orchestrator.router import Router
from orchestrator.testing import (
    DroppingPublisher,
    RecordingPublisher,
    SwitchablePublisher,
    reset_process_caches,
)
from tests.conftest import FakeClock
from tests.dags import spec_from_edges, sync

pytestmark = pytest.mark.postgres

GRACE = 60.0


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], clock: FakeClock,
           published: RecordingPublisher) -> Iterator[Router]:
    reset_process_caches()
    yield Router(pg_sessions, SwitchablePublisher(published), clock=clock,
                 redispatch_after_s=GRACE)


def start_lost(router: Router, pipeline: str, batch_id: str = "b1",
               deadline_s: float | None = None) -> DroppingPublisher:
    """Start a batch whose run messages are lost after the commit."""
    switch = router.publisher
    assert isinstance(switch, SwitchablePublisher)
    kept, switch.target = switch.target, DroppingPublisher()
    try:
        router.start_batch(StartBatch(type="start_batch", pipeline=pipeline, batch_id=batch_id,
                                      deadline_s=deadline_s))
        return switch.target
    finally:
        switch.target = kept


def statuses(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as s:
        rows = s.execute(select(Task.name, TaskLog.status)
                         .join(Task, Task.id == TaskLog.task_id)).all()
    return {n: str(st) for n, st in rows}


def test_a_lost_publish_is_republished_after_the_grace_and_completes(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """QUEUED with no message: the sweeper publishes it once the grace has passed."""
    sync(router.sessions, spec_from_edges("two", {"a": [], "b": ["a"]}), clock.now())
    assert len(start_lost(router, "two").dropped) == 1
    clock.advance(GRACE - 1)
    assert router.sweep().redispatched == 0 and published.messages == []
    clock.advance(2)
    assert router.sweep().redispatched == 1
    assert published.tasks() == [("two", "b1", "a", 1)]
    assert router.sweep().redispatched == 0
    published.pump(router)
    assert statuses(router.sessions) == {"a": "SUCCESS", "b": "SUCCESS"}


def _routers(pg_url: str, clock: FakeClock, n: int) -> list[tuple[Router, RecordingPublisher,
                                                                    Engine]]:
    out = []
    for _ in range(n):
        engine = make_engine(pg_url, pool_size=2, max_overflow=0)
        pub = RecordingPublisher()
        out.append((Router(make_sessionmaker(engine), pub, clock=clock,
                           redispatch_after_s=GRACE), pub, engine))
    return out


def test_concurrent_sweepers_publish_each_lost_task_exactly_once(
        router: Router, pg_url: str, clock: FakeClock) -> None:
    """Sweepers on separate connections, released together, share the work without overlap."""
    roots = {f"t{i}": [] for i in range(60)}
    sync(router.sessions, spec_from_edges("wide", roots), clock.now())
    sweepers = _routers(pg_url, clock, 6)
    try:
        for round_ in range(5):
            start_lost(router, "wide", batch_id=f"r{round_}")
            clock.advance(GRACE + 1)
            barrier = threading.Barrier(len(sweepers))

            def sweep(r: Router, barrier: threading.Barrier = barrier) -> int:
                barrier.wait()
                return r.sweep().redispatched

            with ThreadPoolExecutor(len(sweepers)) as pool:
                done = list(pool.map(sweep, [r for r, _, _ in sweepers]))
            assert sum(done) == len(roots), done
            # Settle this round so that only the next batch is stale in the next one.
            with router.sessions.begin() as s:
                s.execute(update(TaskLog).where(TaskLog.status == "QUEUED")
                          .values(status="CANCELLED"))
        every = Counter(t for _, pub, _ in sweepers for t in pub.tasks())
        assert len(every) == 5 * len(roots)
        assert set(every.values()) == {1}
    finally:
        for _, _, engine in sweepers:
            engine.dispose()


def test_a_sweeper_skips_rows_another_pass_holds_instead_of_waiting(
        router: Router, pg_url: str, clock: FakeClock) -> None:
    """FOR UPDATE SKIP LOCKED: while one pass holds the rows, another publishes none
    of them and does not block; the holder publishes them when it commits."""
    sync(router.sessions, spec_from_edges("held", {f"t{i}": [] for i in range(10)}), clock.now())
    start_lost(router, "held")
    clock.advance(GRACE + 1)
    ((other, other_pub, other_engine),) = _routers(pg_url, clock, 1)
    try:
        with router.sessions.begin() as holding:
            held = maintenance.redispatch_stale(holding, clock.now(), GRACE)
            assert len(held) == 10
            with ThreadPoolExecutor(1) as pool:
                report = pool.submit(other.sweep).result(timeout=10)
            assert report.redispatched == 0 and other_pub.messages == []
        assert router.sweep().redispatched == 0
    finally:
        other_engine.dispose()


def test_an_expired_lease_goes_to_retry_when_attempts_remain(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """A worker that died mid-attempt: RUNNING past its lease (its 30 s timeout and a
    3 s grace, in which a live worker reports the timeout itself) -> RETRYING, with
    the attempt closed as timed out, then attempt 2."""
    spec = spec_from_edges("l", {"t": []},
                           t={"timeout_s": 30, "retry": {"max_attempts": 2, "initial_delay_s": 5}})
    sync(router.sessions, spec, clock.now())
    start_lost(router, "l")
    transaction(router.sessions, lambda s: claim(s, resolve_task(s, "l", "b1", "t"), 1,
                                                 clock.now()))
    clock.advance(32)
    assert router.sweep().expired == 0
    clock.advance(2)
    assert router.sweep().expired == 1
    assert statuses(router.sessions) == {"t": "RETRYING"}
    with router.sessions() as s:
        attempt = s.execute(select(TaskAttempt)).scalar_one()
    assert (attempt.attempt, attempt.outcome) == (1, "RETRYING")
    assert attempt.error is not None and attempt.error.startswith("timed out after 30s")
    clock.advance(5)
    assert router.sweep().requeued == 1
    assert published.tasks() == [("l", "b1", "t", 2)]
    published.pump(router)
    assert statuses(router.sessions) == {"t": "SUCCESS"}


def test_an_expired_lease_without_attempts_left_is_an_error(
        router: Router, clock: FakeClock) -> None:
    """The last attempt's lease expiring ends the task and the batch."""
    spec = spec_from_edges("l1", {"t": [], "c": ["t"]},
                           t={"timeout_s": 30, "retry": {"max_attempts": 1}})
    sync(router.sessions, spec, clock.now())
    start_lost(router, "l1")
    transaction(router.sessions, lambda s: claim(s, resolve_task(s, "l1", "b1", "t"), 1,
                                                 clock.now()))
    clock.advance(34)
    report = router.sweep()
    assert report.expired == 1
    assert statuses(router.sessions) == {"t": "ERROR", "c": "UPSTREAM_FAILED"}
    with router.sessions() as s:
        assert s.execute(select(Batch.status)).scalar_one() == "FAILED"


def test_a_finished_batch_left_open_is_closed_once(
        router: Router, clock: FakeClock) -> None:
    """A batch whose last task finished without closing it is closed by the next pass."""
    sync(router.sessions, spec_from_edges("c", {"t": []}), clock.now())
    start_lost(router, "c")
    with router.sessions.begin() as s:
        s.execute(update(TaskLog).values(status="SUCCESS"))
    assert router.sweep().closed_batches == 1
    assert router.sweep().closed_batches == 0
    with router.sessions() as s:
        assert s.execute(select(Batch.status)).scalar_one() == "SUCCESS"


def test_a_batch_past_its_deadline_fails_its_open_tasks_are_cancelled_late_deliveries_ignored(
        router: Router, published: RecordingPublisher, clock: FakeClock) -> None:
    """Deadline passed: open tasks -> CANCELLED, the batch FAILED with the reason; a
    late run message is a no-op."""
    sync(router.sessions, spec_from_edges("dl", {"a": [], "b": ["a"]}), clock.now())
    lost = start_lost(router, "dl", deadline_s=300)
    clock.advance(299)
    assert router.sweep().missed_deadlines == 0
    clock.advance(2)
    assert router.sweep().missed_deadlines == 1
    assert statuses(router.sessions) == {"a": "CANCELLED", "b": "CANCELLED"}
    with router.sessions() as s:
        assert s.execute(select(Batch.status)).scalar_one() == "FAILED"
        errors = set(s.execute(select(TaskLog.error)).scalars())
    assert errors == {"deadline 12:05 UTC passed"}
    assert router.handle_payload(dict(lost.dropped[0].data)).outcome == "duplicate"
    assert router.sweep().missed_deadlines == 0
