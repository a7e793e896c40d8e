"""Crash injection on real Postgres: a failpoint kills or fails the worker at each
step of a delivery and halfway through a sweep; the sweeper (run here, on an
injected clock) brings the batch to the state a run without the crash reaches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import failpoints, handlers
from orchestrator.failpoints import Crash
from orchestrator.messages import StartBatch
from orchestrator.pipeline.spec import PipelineSpec
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests import reliability as rel
from tests.conftest import FakeClock
from tests.dags import sync

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parents[1]
ROUND_S = 11.0  # per pump-and-sweep round: past a retry delay, a lease in three rounds
TIMEOUT_S = 30.0
GRACE_S = 60.0


def crash_spec() -> PipelineSpec:
    """A flaky root, a diamond, a permanent failure, and both non-default trigger rules."""
    def task(name: str, parents: list[str], rule: str = "all_success",
             **config: object) -> dict[str, object]:
        return {"name": name, "handler": rel.HANDLER, "depends_on": parents,
                "trigger_rule": rule, "config": config, "timeout_s": TIMEOUT_S,
                "retry": {"max_attempts": 4, "initial_delay_s": 10, "backoff_factor": 1}}

    return rel.pipeline("crashy", [
        task("extract", [], flaky_attempts=[1]),
        task("left", ["extract"]),
        task("right", ["extract"]),
        task("join", ["left", "right"]),
        task("publish", ["join"], permanent=["publish"]),
        task("downstream", ["publish"]),
        task("alert", ["publish"], "one_failed"),
        task("cleanup", ["join", "publish"], "all_done"),
    ])


class World:
    """One process's deliveries, pumped by hand: a Crash (or any error) abandons the
    delivery it happened in, and Pub/Sub does not bring that message back."""

    def __init__(self, router: Router, publisher: RecordingPublisher, clock: FakeClock):
        self.router, self.publisher, self.clock = router, publisher, clock
        self.abandoned = 0

    def _survive(self, fn: object, *args: object) -> None:
        try:
            fn(*args)  # type: ignore[operator]
        except (Crash, Exception):
            self.abandoned += 1

    def run(self, engine: Engine, batch_id: str, rounds: int = 60) -> str:
        self._survive(self.router.handle_payload, json.dumps(
            {"type": "start_batch", "pipeline": "crashy", "batch_id": batch_id}).encode())
        for _ in range(rounds):
            while pending := self.publisher.take():
                for m in pending:
                    self._survive(self.router.handle_payload, json.dumps(dict(m.data)).encode())
            status = rel.batch_states(engine).get(batch_id)
            if status not in (None, "RUNNING"):
                return status
            self.clock.advance(ROUND_S)
            self._survive(self.router.sweep)
        raise AssertionError(f"batch {batch_id} still running after {rounds} rounds")


@pytest.fixture
def world(pg_sessions: sessionmaker[Session], pg_engine: Engine,
          clock: FakeClock) -> Iterator[World]:
    reset_process_caches()
    rel.install(pg_engine)
    sync(pg_sessions, crash_spec(), clock.now())
    published = RecordingPublisher()
    yield World(Router(pg_sessions, published, clock=clock, redispatch_after_s=GRACE_S),
                published, clock)
    failpoints.disarm()
    handlers.unregister(rel.HANDLER)


def outcome(engine: Engine, batch_id: str) -> dict[str, str]:
    return {t: s for (b, t), (s, _) in rel.task_states(engine).items() if b == batch_id}


EXPECTED = {
    "extract": "SUCCESS", "left": "SUCCESS", "right": "SUCCESS", "join": "SUCCESS",
    "publish": "ERROR", "downstream": "UPSTREAM_FAILED", "alert": "SUCCESS",
    "cleanup": "SUCCESS",
}
# (point, which hit fires): every point, early and later in the batch.
# (A crash-free batch sweeps once: mid_sweep gets a test of its own below.)
CASES = [(p, skip) for p in failpoints.POINTS for skip in ((0,) if p == "mid_sweep" else (0, 2))]


def test_without_a_crash_the_batch_ends_as_expected(world: World, pg_engine: Engine) -> None:
    """The reference run: the state every crashed run must reach as well."""
    assert world.run(pg_engine, "reference") == "FAILED"
    assert outcome(pg_engine, "reference") == EXPECTED
    assert world.abandoned == 0
    assert rel.effects(pg_engine) == {("reference", t, 2 if t == "extract" else 1): 1
                                      for t, s in EXPECTED.items() if s == "SUCCESS"}


@pytest.mark.parametrize("action", ["crash", "raise"])
@pytest.mark.parametrize(("point", "skip"), CASES, ids=[f"{p}-{s}" for p, s in CASES])
def test_a_crash_at_each_step_ends_in_the_same_state(
        world: World, pg_engine: Engine, point: str, skip: int, action: str) -> None:
    """Same final statuses, every success applied once, no attempt's effect run twice,
    and a second raw effect only where the crash fell between effect and commit."""
    failpoints.arm(point, action, skip=skip, times=1)
    assert world.run(pg_engine, "crashed") == "FAILED"
    assert failpoints.fired(point) == 1, "the failpoint never fired"
    # An ordinary exception, in the handler or around it, is recorded and acknowledged
    # (a delivery raises only when the database or the publisher is out of reach); only
    # a crash loses the delivery, and the sweeper mends what it left. A sweep that
    # raises is retried by its scheduler.
    assert world.abandoned == (1 if action == "crash" or point == "mid_sweep" else 0)
    assert outcome(pg_engine, "crashed") == EXPECTED

    successes = {t for t, s in EXPECTED.items() if s == "SUCCESS"}
    assert set(rel.applied(pg_engine)) == {("crashed", t) for t in successes}
    raw = rel.effects(pg_engine)
    assert max(raw.values()) == 1  # an attempt's effect never ran twice
    extra = sum(raw.values()) - len(successes)
    assert extra == (1 if point == "before_success_commit" else 0)
    # The task log's final attempt of each success is one that did its effect.
    for (_, task), (status, attempt) in rel.task_states(pg_engine).items():
        if status == "SUCCESS":
            assert raw[("crashed", task, attempt)] == 1


def test_sweeps_that_keep_dying_halfway_resume_where_they_stopped(
        world: World, pg_engine: Engine) -> None:
    """A worker dies after its claim, then four sweeps die before expiring its lease:
    the fifth finishes the job, and the batch ends as without any crash."""
    failpoints.arm("after_claim", "crash", skip=1, times=1)
    failpoints.arm("mid_sweep", "crash", times=4)
    assert world.run(pg_engine, "crashed") == "FAILED"
    assert (failpoints.fired("after_claim"), failpoints.fired("mid_sweep")) == (1, 4)
    assert outcome(pg_engine, "crashed") == EXPECTED
    assert max(rel.effects(pg_engine).values()) == 1
    assert len(rel.applied(pg_engine)) == sum(s == "SUCCESS" for s in EXPECTED.values())


KILL_SCRIPT = """
import json, sys
from orchestrator.db.session import make_engine, make_sessionmaker
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher
from tests import reliability as rel
from tests.conftest import FakeClock
from datetime import datetime
url, start, payload = sys.argv[1], sys.argv[2], sys.argv[3]
engine = make_engine(url, pool_size=2, max_overflow=0)
rel.handlers.register(rel.HANDLER, rel.EffectHandler(engine))
router = Router(make_sessionmaker(engine), RecordingPublisher(),
                clock=FakeClock(datetime.fromisoformat(start)))
router.handle_payload(payload.encode())
print("survived")
"""


def test_a_real_kill_between_effect_and_commit_is_recovered_by_the_sweeper(
        world: World, pg_engine: Engine, pg_url: str) -> None:
    """os._exit in a worker process mid-transaction: Postgres rolls SUCCESS back, the
    lease expires, the next attempt succeeds, and the effect is applied once."""
    world.clock.t = datetime.now(UTC)
    world.router.start_batch(StartBatch(type="start_batch", pipeline="crashy", batch_id="killed"))
    first = world.publisher.take()
    assert [m.data["task"] for m in first] == ["extract"]
    # extract's first attempt is flaky by design: let it fail and come back as attempt 2.
    world.router.handle_payload(json.dumps(dict(first[0].data)).encode())
    world.clock.advance(ROUND_S)
    world.router.sweep()
    second = world.publisher.take()
    assert [m.data["attempt"] for m in second] == [2]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, pg_url, world.clock.now().isoformat(),
         json.dumps(dict(second[0].data))],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, failpoints.ENV: "before_success_commit:kill"},
    )
    assert proc.returncode == 137, proc.stderr
    assert "survived" not in proc.stdout
    assert rel.task_states(pg_engine)[("killed", "extract")] == ("RUNNING", 2)
    assert rel.effects(pg_engine)[("killed", "extract", 2)] == 1

    assert world.run(pg_engine, "killed") == "FAILED"
    assert outcome(pg_engine, "killed") == EXPECTED
    assert rel.task_states(pg_engine)[("killed", "extract")] == ("SUCCESS", 3)
    assert rel.applied(pg_engine)[("killed", "extract")] == 2



GATED_SCRIPT = """
import sys, time
from datetime import datetime
from pathlib import Path
from orchestrator import handlers
from orchestrator.db.session import make_engine, make_sessionmaker
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher
from tests.conftest import FakeClock
url, start, payload, gate, name = sys.argv[1:6]

def gated(ctx):
    Path(gate, name + ".started").write_text("")
    while not Path(gate, name + ".go").exists():
        time.sleep(0.01)
    return {"by": name, "item": ctx.input.get("item")}

handlers.register("gated", gated)
engine = make_engine(url, pool_size=2, max_overflow=0)
router = Router(make_sessionmaker(engine), RecordingPublisher(),
                clock=FakeClock(datetime.fromisoformat(start)))
print(router.handle_payload(payload.encode()).outcome)
"""


def in_main_process(ctx: Any) -> dict[str, Any]:
    if "items" in ctx.config:
        return {"items": ctx.config["items"]}
    return {"by": "main", "item": ctx.input.get("item")}


class GatedWorker:
    """Another worker process that runs one delivery and holds its handler open (a
    zombie, once its attempt has been cancelled) until the test lets it finish."""

    def __init__(self, gate: Path, name: str, pg_url: str, clock: FakeClock, payload: str):
        self.gate, self.name = gate, name
        self.proc = subprocess.Popen(
            [sys.executable, "-c", GATED_SCRIPT, pg_url, clock.now().isoformat(), payload,
             str(gate), name], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        deadline = time.monotonic() + 60
        while not (gate / f"{name}.started").exists():
            assert self.proc.poll() is None, self.proc.communicate()
            assert time.monotonic() < deadline, "the worker never reached its handler"
            time.sleep(0.01)

    def finish(self) -> str:
        (self.gate / f"{self.name}.go").write_text("")
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return out.strip()


def test_a_zombie_worker_process_of_a_mapped_instance_is_fenced_after_cancel_and_retry(
        world: World, pg_engine: Engine, pg_url: str, pg_sessions: sessionmaker[Session],
        tmp_path: Path) -> None:
    """A worker process is still running instance 0 of a mapped task when the operator
    cancels the batch and retries it; the rerun expands again and another process runs
    the new instance 0. The zombie finishing first is refused, the rerun's result is the
    one kept, and the batch succeeds."""
    from orchestrator import engine
    from orchestrator.db.session import transaction

    handlers.register("gated", in_main_process)
    sync(pg_sessions, rel.pipeline("mapped", [
        {"name": "src", "handler": "gated", "config": {"items": ["x", "y"]}},
        {"name": "load", "handler": "gated", "depends_on": ["src"], "timeout_s": TIMEOUT_S,
         "map_over": {"parent_output": "src.items"}},
        {"name": "total", "handler": "gated", "depends_on": ["load"]},
    ]), world.clock.now())
    router, published = world.router, world.publisher

    def deliver_until_instances() -> dict[int, str]:
        """Deliver in this process until the mapped task has expanded; its instances'
        messages by index, the one of instance 1 already delivered here too."""
        while True:
            batch = published.take()
            assert batch, "nothing left to deliver"
            instances = {int(m.data["map_index"]): json.dumps(dict(m.data))
                         for m in batch if m.data.get("map_index") is not None}
            if instances:
                assert router.handle_payload(instances[1].encode()).outcome == "succeeded"
                return instances
            for m in batch:
                router.handle_payload(json.dumps(dict(m.data)).encode())

    router.handle_payload(b'{"type": "start_batch", "pipeline": "mapped", "batch_id": "z"}')
    zombie = GatedWorker(tmp_path, "zombie", pg_url, world.clock,
                         deliver_until_instances()[0])
    now = world.clock.now()
    transaction(pg_sessions, lambda s: engine.cancel_batch(s, "mapped", "z", now))
    router.publish(transaction(pg_sessions, lambda s: engine.retry_batch(s, "mapped", "z", now)))
    rerun = GatedWorker(tmp_path, "rerun", pg_url, world.clock, deliver_until_instances()[0])

    assert zombie.finish() == "stale"
    assert rerun.finish() == "succeeded"
    published.pump(router)
    assert rel.batch_states(pg_engine)["z"] == "SUCCESS"
    with pg_sessions() as s:
        load = engine.resolve_task(s, "mapped", "z", "load")
        total = engine.resolve_task(s, "mapped", "z", "total")
        from orchestrator.db.models import TaskLog

        output = s.execute(select(TaskLog.output).where(TaskLog.id == load.log_id)).scalar_one()
    assert output == [{"by": "rerun", "item": "x"}, {"by": "main", "item": "y"}]
    assert total.status == "SUCCESS"


def test_a_worker_process_killed_between_effect_and_commit_is_replaced_and_recovered(
        pg_engine: Engine, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        ) -> None:
    """The embedded runtime with worker processes: one process dies for real after its
    task's effect and before the SUCCESS commit. A new process takes its place, the
    sweeper expires the dead attempt's lease, the retry succeeds, and no attempt's
    effect ran twice."""
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings

    reset_process_caches()
    rel.install(pg_engine)
    killed = tmp_path / "killed"
    real_hit = failpoints.hit

    def hit(name: str) -> None:
        # Once across all the processes: the first to create the file dies.
        if name == "before_success_commit":
            try:
                os.close(os.open(killed, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
            os._exit(137)
        real_hit(name)

    # The worker processes are forked from here: they inherit the patched failpoint.
    monkeypatch.setattr(failpoints, "hit", hit)
    tasks = [{"name": name, "handler": rel.HANDLER, "depends_on": parents, "timeout_s": 1,
              "retry": {"max_attempts": 3, "initial_delay_s": 0.1}}
             for name, parents in (("a", []), ("b", ["a"]), ("c", ["b"]))]
    rt = Runtime.embedded(Settings(database_url=pg_url, home=tmp_path, redispatch_after_s=1.0),
                          processes=2, migrate_db=False)
    try:
        rt.sync_specs([rel.pipeline("killed", tasks)])
        first = set(rt.bus.pids()) if rt.bus is not None else set()
        assert rt.start_batch("killed", "k1")
        assert str(rt.wait("killed", "k1", timeout=60, sweep_every_s=0.2)) == "SUCCESS"
        replaced = set(rt.bus.pids()) - first if rt.bus is not None else set()
    finally:
        rt.close()
    assert killed.exists() and replaced, "no worker process died and was replaced"
    states = {t: s for (b, t), s in rel.task_states(pg_engine).items() if b == "k1"}
    assert {t: s for t, (s, _) in states.items()} == {"a": "SUCCESS", "b": "SUCCESS",
                                                      "c": "SUCCESS"}
    raw = rel.effects(pg_engine)
    assert max(raw.values()) == 1  # an attempt's effect never ran twice
    assert sum(raw.values()) == 4  # the dead attempt's effect, and one per task
    for task, (_, attempt) in states.items():
        assert raw[("k1", task, attempt)] == 1
