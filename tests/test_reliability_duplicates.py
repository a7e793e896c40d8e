"""At-least-once delivery on real Postgres: every message delivered 1-3 times,
shuffled, by concurrent workers, into the embedded runtime, over random DAGs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from orchestrator import handlers
from orchestrator.errors import InfrastructureError, InvalidInput
from orchestrator.ports import OutboundMessage
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import reset_process_caches
from tests import reliability as rel

pytestmark = pytest.mark.postgres

PIPELINES = 12
BATCHES = 120
WORKERS = 8
PROCESSES = 4


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


class _Copies:
    """Counts of messages published and delivered, shared with worker processes."""

    def __init__(self, seed: int):
        self.published = mp.get_context("fork").Value("q", 0)
        self.deliveries = mp.get_context("fork").Value("q", 0)
        self.seed = seed

    def duplicating(self, publish: Callable[..., None]) -> Callable[..., None]:
        """`publish`, sending each message 1-3 times, shuffled within what it is given."""
        copies = self
        rngs: dict[int, random.Random] = {}

        def dup(bus: Any, messages: Sequence[OutboundMessage]) -> None:
            rng = rngs.setdefault(os.getpid(), random.Random(copies.seed + os.getpid()))
            out = [m for m in messages for _ in range(rng.randint(1, 3))]
            rng.shuffle(out)
            with copies.published.get_lock():
                copies.published.value += len(messages)
                copies.deliveries.value += len(out)
            publish(bus, out)

        return dup


def _run_on_threads(pg_engine: Engine, pg_url: str, specs: list[Any],
                    batches: dict[str, Any]) -> tuple[int, int, Counter[Any] | None]:
    bus = DuplicatingBus(WORKERS, seed=7)
    rt = Runtime(Settings(database_url=pg_url), pg_engine, bus, bus=bus)
    rt.sync_specs(specs)
    bus.start()
    try:
        # The start messages are duplicated and shuffled too.
        bus.send([{"type": "start_batch", "pipeline": spec.name, "batch_id": b}
                  for b, spec in batches.items()])
        _wait_for_all(pg_engine, bus)
    finally:
        bus.stop()
    assert bus.unhandled == []
    return bus.published, bus.deliveries, None


def _run_on_processes(pg_engine: Engine, pg_url: str, specs: list[Any],
                      batches: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                      ) -> tuple[int, int, Counter[Any] | None]:
    """The embedded runtime with worker processes, whose every publish (and the test's
    own start messages) is duplicated: the processes inherit the patched publisher."""
    from orchestrator.adapters.local import procbus

    copies = _Copies(seed=7)
    monkeypatch.setattr(procbus._QueuePublisher, "publish",
                        copies.duplicating(procbus._QueuePublisher.publish))
    rt = Runtime.embedded(Settings(database_url=pg_url), processes=PROCESSES, migrate_db=False)
    try:
        rt.sync_specs(specs)
        assert rt.bus is not None
        rt.bus.publish([OutboundMessage(data={"type": "start_batch", "pipeline": spec.name,
                                              "batch_id": b}, attributes={})
                        for b, spec in batches.items()])
        _wait_for_all(pg_engine, rt.bus)
    finally:
        rt.close()
    return int(copies.published.value), int(copies.deliveries.value), None


def _wait_for_all(pg_engine: Engine, bus: Any) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        states = rel.batch_states(pg_engine)
        if len(states) == BATCHES and all(s != "RUNNING" for s in states.values()) \
                and bus.drain(0.05):
            break
        time.sleep(0.05)
    assert bus.drain(10)


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_duplicated_shuffled_concurrent_deliveries_lose_nothing_and_double_nothing(
        pg_engine: Engine, pg_url: str, effect: rel.EffectHandler, workers: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """120 batches of 12 random DAGs: every batch terminal as the model predicts,
    one side effect per successful attempt, one handler call per claim; with worker
    threads, and with worker processes (each with its own connections)."""
    reset_process_caches()
    rng = random.Random(20240301)
    specs = [rel.random_dag(rng, f"dag{i}") for i in range(PIPELINES)]
    batches = {f"b{i:03d}": specs[i % PIPELINES] for i in range(BATCHES)}
    if workers == "threads":
        published, deliveries, _ = _run_on_threads(pg_engine, pg_url, specs, batches)
    else:
        published, deliveries, _ = _run_on_processes(pg_engine, pg_url, specs, batches,
                                                     monkeypatch)
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
    if workers == "threads":  # the handler's own count lives in each worker process
        assert claimed == effect.calls  # each claim ran the handler once, each call claimed
    assert max(claimed.values()) == 1

    duplicates = deliveries - published
    outcomes = Counter(s for s, _ in states.values())
    assert duplicates > published // 2
    assert len(batches) >= 100 and outcomes["SUCCESS"] and outcomes["ERROR"]
    assert outcomes["UPSTREAM_FAILED"] and outcomes["SKIPPED"]
    print(f"\nduplicates ({workers}): {len(batches)} batches, {len(states)} tasks, {published} "
          f"messages, {deliveries} deliveries ({duplicates} duplicates), "
          f"{sum(claimed.values())} claims, {sum(effects.values())} effects, "
          f"lost 0, doubled 0")


OPERATED = 48
OPERATING_S = 6.0


def covered(actions: Counter[str]) -> bool:
    return (actions["cancel"] >= 3 and actions["retry while RUNNING"] >= 3
            and actions["retry while FAILED"] + actions["retry while CANCELLED"] >= 3)


def test_operator_retries_and_cancels_racing_the_workers_leave_every_batch_consistent(
        pg_engine: Engine, pg_url: str, effect: rel.EffectHandler) -> None:
    """Two operators retry and cancel batches at random while the workers run them
    (every message delivered 1-3 times, shuffled): once all is quiet, every batch is
    closed with the status its tasks call for and told so last, every task's status is
    one its parents allow, and no attempt ran twice or was overwritten by a zombie."""
    reset_process_caches()
    rng = random.Random(20240302)
    bus = DuplicatingBus(WORKERS, seed=11)
    rt = Runtime(Settings(database_url=pg_url), pg_engine, bus, bus=bus)
    specs = [rel.random_dag(rng, f"op{i}", permanent_p=0.12) for i in range(6)]
    rt.sync_specs(specs)
    batches = {f"o{i:03d}": specs[i % len(specs)] for i in range(OPERATED)}
    told: dict[str, str] = {}
    rt.on_batch_finished(lambda f: told.__setitem__(f.batch_id, str(f.status)))
    actions: Counter[str] = Counter()
    stop = threading.Event()
    errors: list[str] = []

    def operator(seed: int) -> None:
        orng = random.Random(seed)
        while not stop.is_set():
            # Mostly a batch still running: the races are with its workers.
            running = [b for b, s in rel.batch_states(pg_engine).items() if s == "RUNNING"]
            batch_id = orng.choice(running if running and orng.random() < 0.8
                                   else sorted(batches))
            name = batches[batch_id].name
            try:
                status = rt.batch_status(name, batch_id)
                if status is None:
                    continue
                if status == "RUNNING" and orng.random() < 0.15:
                    actions["cancel"] += 1 if rt.cancel(name, batch_id) else 0
                elif rt.retry(name, batch_id):
                    actions[f"retry while {status}"] += 1
            except InvalidInput:
                actions["retry refused: tasks still open"] += 1
            except Exception as exc:  # the test fails on any
                errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(orng.uniform(0, 0.004))

    bus.start()
    operators = [threading.Thread(target=operator, args=(i,), daemon=True) for i in range(2)]
    try:
        bus.send([{"type": "start_batch", "pipeline": spec.name, "batch_id": b}
                  for b, spec in batches.items()])
        for t in operators:
            t.start()
        # At least OPERATING_S, and on until each kind of race has happened a few times
        # (a loaded machine runs fewer batches' tasks per second of operating).
        started = time.monotonic()
        while time.monotonic() - started < 5 * OPERATING_S and (
                time.monotonic() - started < OPERATING_S or not covered(actions)):
            time.sleep(0.1)
        stop.set()
        for t in operators:
            t.join(10)
        # Quiet down: the sweeper closes a batch whose retry left nothing to run.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            rt.router.sweep()
            states = rel.batch_states(pg_engine)
            if all(s != "RUNNING" for s in states.values()) and bus.drain(0.05):
                break
            time.sleep(0.05)
        assert bus.drain(10)
    finally:
        stop.set()
        bus.stop()

    assert errors == [] and bus.unhandled == []
    tasks = rel.task_states(pg_engine)
    batch_states = rel.batch_states(pg_engine)
    last_event = rel.last_batch_events(pg_engine)
    wrong = []
    for batch_id, spec in batches.items():
        states = {t: s for (b, t), (s, _) in tasks.items() if b == batch_id}
        if problem := rel.batch_violation(states, batch_states[batch_id]):
            wrong.append((batch_id, problem))
        wrong += [(batch_id, v) for v in rel.rule_violations(spec, states)]
        if last_event.get(batch_id) != batch_states[batch_id]:
            wrong.append((batch_id, f"last batch event {last_event.get(batch_id)}"))
        if batch_states[batch_id] in ("SUCCESS", "FAILED") and \
                told.get(batch_id) != batch_states[batch_id]:
            wrong.append((batch_id, f"finish told {told.get(batch_id)}"))
    assert wrong == [], wrong[:10]

    effects = rel.effects(pg_engine)
    assert max(effects.values()) == 1  # no attempt's effect ran twice
    for (b, t), (s, attempt) in tasks.items():
        if s == "SUCCESS":  # the attempt of record is one that did its work, not a zombie
            assert effects[(b, t, attempt)] == 1, (b, t, attempt)
    claimed = rel.claims(pg_engine)
    assert claimed == effect.calls and max(claimed.values()) == 1
    assert covered(actions), actions
    print(f"\noperators: {dict(actions)}; {len(batches)} batches, {len(tasks)} tasks, "
          f"{sum(claimed.values())} claims, {bus.deliveries} deliveries, wrong 0")
