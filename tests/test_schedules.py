"""Schedules on real Postgres with an injected clock: the sweep starts each due tick's
batch once (concurrent sweeps, retried sweeps, duplicate ticks), catch-up after an
outage, daylight-saving nights, pause and resume, and new versions of a pipeline."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Batch, Pipeline, ScheduleState
from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.errors import InvalidInput
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.spec import PipelineSpec
from orchestrator.pipeline.sync import sync_pipeline
from orchestrator.router import Router
from orchestrator.schedules import listing, set_paused
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.conftest import FakeClock

pytestmark = pytest.mark.postgres

PARIS = ZoneInfo("Europe/Paris")


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS).astimezone(UTC)  # type: ignore[misc]


def spec(name: str = "daily", tasks: int = 2, **schedule: Any) -> PipelineSpec:
    rule = {"cron": "0 6 * * *", "timezone": "Europe/Paris", "batch_id": "{date}", **schedule}
    return build_pipeline({
        "name": name, "schedule": rule,
        "tasks": [{"name": f"t{i}", "handler": "noop"} for i in range(tasks)],
    }, known_handlers={"noop"})


def sync(sessions: sessionmaker[Session], sp: PipelineSpec, now: datetime) -> None:
    transaction(sessions, lambda s: sync_pipeline(s, sp, now))


def batches(sessions: sessionmaker[Session]) -> list[tuple[str, datetime | None]]:
    with sessions() as s:
        return [(b, t) for b, t in s.execute(
            select(Batch.batch_id, Batch.logical_at).order_by(Batch.id)).all()]


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def router(pg_sessions: sessionmaker[Session], clock: FakeClock,
           published: RecordingPublisher) -> Router:
    reset_process_caches()
    return Router(pg_sessions, published, clock=clock)


def test_a_schedule_starts_its_batch_on_its_own_at_the_tick(
        router: Router, clock: FakeClock, published: RecordingPublisher) -> None:
    """Synced at 05:30 Paris; nothing before 06:00; the first sweep after 06:00 starts
    batch `2024-03-01` for the 06:00 tick, queues its roots, and the batch runs."""
    clock.t = paris(2024, 3, 1, 5, 30)
    sync(router.sessions, spec(), clock.now())
    clock.t = paris(2024, 3, 1, 5, 59)
    assert router.sweep().scheduled == 0
    clock.t = paris(2024, 3, 1, 6, 0, 40)
    assert router.sweep().scheduled == 1
    assert batches(router.sessions) == [("2024-03-01", paris(2024, 3, 1, 6, 0))]
    assert sorted(published.tasks()) == [("daily", "2024-03-01", "t0", 1),
                                         ("daily", "2024-03-01", "t1", 1)]
    published.pump(router)
    router.sweep()
    with router.sessions() as s:
        assert s.execute(select(Batch.status)).scalar_one() == "SUCCESS"
    # The scheduler calls again within the same minute (a duplicate tick), and tomorrow.
    assert router.sweep().scheduled == 0
    clock.t = paris(2024, 3, 2, 6, 0, 5)
    assert router.sweep().scheduled == 1
    assert [b for b, _ in batches(router.sessions)] == ["2024-03-01", "2024-03-02"]


def test_a_retried_sweep_starts_nothing_twice(router: Router, clock: FakeClock,
                                              published: RecordingPublisher) -> None:
    """A sweep that started the batch but whose state update was lost (here: undone by
    hand) finds the batch existing when the tick is handled again."""
    clock.t = paris(2024, 3, 1, 5, 0)
    sync(router.sessions, spec(), clock.now())
    clock.t = paris(2024, 3, 1, 6, 1)
    assert router.sweep().scheduled == 1
    sent = len(published.messages)
    with router.sessions.begin() as s:
        s.execute(update(ScheduleState).values(last_tick_at=paris(2024, 3, 1, 5, 0)))
    assert router.sweep().scheduled == 0
    assert len(published.messages) == sent
    assert [b for b, _ in batches(router.sessions)] == ["2024-03-01"]


def _sweepers(pg_url: str, clock: FakeClock, n: int) -> list[tuple[Router, RecordingPublisher,
                                                                    Engine]]:
    out = []
    for _ in range(n):
        engine = make_engine(pg_url, pool_size=2, max_overflow=0)
        pub = RecordingPublisher()
        # No republishing of unclaimed roots within the test: each message is a tick's.
        out.append((Router(make_sessionmaker(engine), pub, clock=clock,
                           redispatch_after_s=1e9), pub, engine))
    return out


def test_concurrent_sweeps_start_each_tick_once(router: Router, pg_url: str,
                                                clock: FakeClock) -> None:
    """Six sweepers on their own connections, released together at each of several
    ticks (one of them after an outage with `catchup: all`): one batch per tick,
    each root's run message published once in all."""
    clock.t = paris(2024, 3, 1, 0, 0)
    sync(router.sessions, spec("hourly", tasks=3, cron="0 * * * *", batch_id="{datetime}",
                               catchup="all"), clock.now())
    sync(router.sessions, spec("daily", tasks=1), clock.now())
    sweepers = _sweepers(pg_url, clock, 6)
    try:
        for now in (paris(2024, 3, 1, 1, 0, 5), paris(2024, 3, 1, 2, 0, 0),
                    paris(2024, 3, 1, 6, 30, 0)):
            clock.t = now
            barrier = threading.Barrier(len(sweepers))

            def sweep(r: Router, barrier: threading.Barrier = barrier) -> int:
                barrier.wait()
                return r.sweep().scheduled

            before = len(batches(router.sessions))
            with ThreadPoolExecutor(len(sweepers)) as pool:
                started = list(pool.map(sweep, [r for r, _, _ in sweepers]))
            assert sum(started) == len(batches(router.sessions)) - before > 0
        ids = [b for b, _ in batches(router.sessions)]
        hourly = [f"2024-03-01T{h:02d}:00" for h in range(1, 7)]
        assert sorted(ids) == sorted([*hourly, "2024-03-01"])
        every = Counter(t for _, pub, _ in sweepers for t in pub.tasks())
        assert set(every.values()) == {1}
        assert len(every) == 3 * len(hourly) + 1
    finally:
        for _, _, engine in sweepers:
            engine.dispose()


@pytest.mark.parametrize(("policy", "expected"), [
    ("latest", ["2024-03-01T09:00"]),
    ("all", ["2024-03-01T07:00", "2024-03-01T08:00", "2024-03-01T09:00"]),
    ("none", []),
])
def test_catchup_after_a_three_hour_outage(router: Router, clock: FakeClock, policy: str,
                                           expected: list[str]) -> None:
    """The 06:00 tick ran; the sweeper was down until 09:20; then each policy."""
    clock.t = paris(2024, 3, 1, 5, 0)
    sync(router.sessions, spec("hourly", cron="0 * * * *", batch_id="{datetime}",
                               catchup=policy), clock.now())
    clock.t = paris(2024, 3, 1, 6, 0, 30)
    assert router.sweep().scheduled == 1
    clock.t = paris(2024, 3, 1, 9, 20)
    router.sweep()
    assert [b for b, _ in batches(router.sessions)][1:] == expected
    # Whatever was skipped stays skipped; the next tick runs as usual.
    clock.t = paris(2024, 3, 1, 10, 0, 10)
    assert router.sweep().scheduled == 1
    assert router.sweep().scheduled == 0


@pytest.mark.parametrize(("night", "hours"), [(paris(2024, 3, 30, 23, 0), 23),
                                              (paris(2024, 10, 26, 23, 0), 25)],
                         ids=["spring-forward", "fall-back"])
def test_daylight_saving_nights_neither_skip_nor_double_a_run(
        router: Router, clock: FakeClock, night: datetime, hours: int) -> None:
    """Sweeping every ten minutes through a whole day that has a clock change: the
    hourly schedule starts one batch per real hour, the 02:30 daily one batch."""
    clock.t = night
    sync(router.sessions, spec("hourly", cron="0 * * * *", batch_id="{datetime}"), clock.now())
    sync(router.sessions, spec("nightly", cron="30 2 * * *", batch_id="{date}"), clock.now())
    end = night + timedelta(hours=hours + 1)
    while clock.t < end:
        clock.advance(600)
        router.schedules.tick()
    with router.sessions() as s:
        rows = s.execute(select(Pipeline.name, Batch.batch_id, Batch.logical_at)
                         .join(Pipeline, Pipeline.id == Batch.pipeline_id)).all()
    day = (night + timedelta(hours=2)).astimezone(PARIS).date()
    hourly = sorted(lt for name, _, lt in rows
                    if name == "hourly" and lt.astimezone(PARIS).date() == day)
    assert len(hourly) == hours
    assert all(b - a == timedelta(hours=1) for a, b in itertools.pairwise(hourly))
    assert len({b for name, b, _ in rows if name == "hourly"}) == len(
        [r for r in rows if r[0] == "hourly"])
    assert [b for name, b, _ in rows if name == "nightly"] == [f"{day:%Y-%m-%d}"]


def test_pause_is_stored_and_honoured_and_resume_does_not_catch_up(
        router: Router, clock: FakeClock) -> None:
    clock.t = paris(2024, 3, 1, 5, 0)
    sync(router.sessions, spec(), clock.now())
    assert transaction(router.sessions, lambda s: set_paused(s, "daily", True, clock.now()))
    assert not transaction(router.sessions, lambda s: set_paused(s, "daily", True, clock.now()))
    clock.t = paris(2024, 3, 3, 7, 0)
    assert router.sweep().scheduled == 0
    with router.sessions() as s:
        assert listing(s, clock.now())[0]["paused"] is True
    transaction(router.sessions, lambda s: set_paused(s, "daily", False, clock.now()))
    assert router.sweep().scheduled == 0  # the paused days are not caught up on
    clock.t = paris(2024, 3, 4, 6, 0, 20)
    assert router.sweep().scheduled == 1
    assert [b for b, _ in batches(router.sessions)] == ["2024-03-04"]
    sync(router.sessions, build_pipeline({"name": "plain", "tasks": [
        {"name": "a", "handler": "noop"}]}, known_handlers={"noop"}), clock.now())
    with pytest.raises(InvalidInput, match="has no schedule"):
        transaction(router.sessions, lambda s: set_paused(s, "plain", True, clock.now()))


def test_a_new_version_keeps_its_schedules_history(router: Router, clock: FakeClock) -> None:
    """A changed file synced days later is a new version, and goes on from the last
    tick: no burst of catch-up runs. A schedule removed, then added back, starts
    from when it came back."""
    clock.t = paris(2024, 3, 1, 5, 0)
    sync(router.sessions, spec(), clock.now())
    clock.t = paris(2024, 3, 1, 6, 0, 30)
    router.sweep()
    clock.t = paris(2024, 3, 1, 12, 0)
    sync(router.sessions, spec(tasks=3, catchup="all"), clock.now())
    assert router.sweep().scheduled == 0
    clock.t = paris(2024, 3, 2, 6, 0, 30)
    assert router.sweep().scheduled == 1
    with router.sessions() as s:
        versions = s.execute(select(Batch.batch_id, Batch.pipeline_version)
                             .order_by(Batch.id)).all()
        assert [tuple(v) for v in versions] == [("2024-03-01", 1), ("2024-03-02", 2)]
        row = listing(s, clock.now())[0]
    assert row["last_batch_id"] == "2024-03-02"
    assert row["next"][0].startswith("2024-03-03T06:00")
    plain = build_pipeline({"name": "daily", "tasks": [{"name": "t0", "handler": "noop"}]},
                           known_handlers={"noop"})
    sync(router.sessions, plain, clock.now())
    clock.t = paris(2024, 3, 9, 12, 0)
    assert router.sweep().scheduled == 0
    sync(router.sessions, spec(catchup="all"), clock.now())
    assert router.sweep().scheduled == 0  # a week without a schedule is not caught up on
    clock.t = paris(2024, 3, 10, 6, 0, 30)
    assert router.sweep().scheduled == 1
