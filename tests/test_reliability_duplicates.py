"""At-least-once delivery on real Postgres: every message delivered 1-3 times,
shuffled, by concurrent workers, into the embedded runtime, over random DAGs."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from orchestrator import handlers
from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import reset_process_caches
from tests import reliability as rel

pytestmark = pytest.mark.postgres

PIPELINES = 12
BATCHES = 120
WORKERS = 8


class DuplicatingBus:
    """Pub/Sub at its worst short of losing messages: each one is delivered one to
    three times, in random order, to several workers at once."""

    def __init__(self, workers: int, seed: int):
        self.workers = workers
        self._rng = random.Random(seed)
        self._cv = threading.Condition()
        self._queue: list[str] = []
        self._inflight = 0
        self._stop = False
        self._threads: list[threading.Thread] = []
        self._handler: Callable[[Any], Any] | None = None
        self.published = 0
        self.deliveries = 0
        self.redelivered = 0
        self.unhandled: list[str] = []

    def attach(self, handler: Callable[[Any], Any]) -> None:
        self._handler = handler

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        self.send([dict(m.data) for m in messages])

    def send(self, payloads: list[dict[str, Any]]) -> None:
        with self._cv:
            for data in payloads:
                copies = self._rng.randint(1, 3)
                self.published += 1
                self.deliveries += copies
                self._queue.extend([json.dumps(data)] * copies)
            self._cv.notify_all()

    def start(self) -> None:
        for i in range(self.workers):
            t = threading.Thread(target=self._work, name=f"dup-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(10)

    def drain(self, timeout: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._inflight:
                if time.monotonic() >= deadline:
                    return False
                self._cv.wait(0.01)
        return True

    def _work(self) -> None:
        assert self._handler is not None
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait(0.05)
                if self._stop:
                    return
                # Any pending copy, not the oldest: order is not guaranteed either.
                i = self._rng.randrange(len(self._queue))
                self._queue[i], self._queue[-1] = self._queue[-1], self._queue[i]
                payload = self._queue.pop()
                self._inflight += 1
            try:
                self._handler(payload.encode())
            except InfrastructureError:
                with self._cv:  # a 5xx: Pub/Sub delivers it again
                    self.redelivered += 1
                    self._queue.append(payload)
            except Exception as exc:  # the test fails on any
                self.unhandled.append(f"{type(exc).__name__}: {exc}")
            finally:
                with self._cv:
                    self._inflight -= 1
                    self._cv.notify_all()


@pytest.fixture
def effect(pg_engine: Engine) -> Iterator[rel.EffectHandler]:
    yield rel.install(pg_engine)
    handlers.unregister(rel.HANDLER)


def test_duplicated_shuffled_concurrent_deliveries_lose_nothing_and_double_nothing(
        pg_engine: Engine, pg_url: str, effect: rel.EffectHandler) -> None:
    """120 batches of 12 random DAGs: every batch terminal as the model predicts,
    one side effect per successful attempt, one handler call per claim."""
    reset_process_caches()
    rng = random.Random(20240301)
    bus = DuplicatingBus(WORKERS, seed=7)
    rt = Runtime(Settings(database_url=pg_url), pg_engine, bus, bus=bus)
    specs = [rel.random_dag(rng, f"dag{i}") for i in range(PIPELINES)]
    rt.sync_specs(specs)
    batches = {f"b{i:03d}": specs[i % PIPELINES] for i in range(BATCHES)}
    bus.start()
    try:
        # The start messages are duplicated and shuffled too.
        bus.send([{"type": "start_batch", "pipeline": spec.name, "batch_id": b}
                  for b, spec in batches.items()])
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            states = rel.batch_states(pg_engine)
            if len(states) == BATCHES and all(s != "RUNNING" for s in states.values()) \
                    and bus.drain(0.05):
                break
            time.sleep(0.05)
        assert bus.drain(10)
    finally:
        bus.stop()

    assert bus.unhandled == []
    states = rel.task_states(pg_engine)
    batch_states = rel.batch_states(pg_engine)
    expected_tasks: dict[tuple[str, str], tuple[str, int]] = {}
    for batch_id, spec in batches.items():
        status, tasks = rel.expected_run(spec, batch_id)
        assert batch_states[batch_id] == status, batch_id
        expected_tasks.update({(batch_id, t): v for t, v in tasks.items()})
    # Status and final attempt of every task, as the model computes them: no child
    # lost or run early, no retry skipped or added.
    assert states == expected_tasks

    successes = {(b, t, a) for (b, t), (s, a) in states.items() if s == "SUCCESS"}
    effects = rel.effects(pg_engine)
    assert set(effects) == successes
    assert max(effects.values()) == 1
    claimed = rel.claims(pg_engine)
    assert claimed == effect.calls  # each claim ran the handler once, each call was claimed
    assert max(claimed.values()) == 1

    duplicates = bus.deliveries - bus.published
    outcomes = Counter(s for s, _ in states.values())
    assert duplicates > bus.published // 2
    assert len(batches) >= 100 and outcomes["SUCCESS"] and outcomes["ERROR"]
    assert outcomes["UPSTREAM_FAILED"] and outcomes["SKIPPED"]
    print(f"\nduplicates: {len(batches)} batches, {len(states)} tasks, {bus.published} "
          f"messages, {bus.deliveries} deliveries ({duplicates} duplicates), "
          f"{sum(claimed.values())} claims, {sum(effects.values())} effects, "
          f"lost 0, doubled 0")
