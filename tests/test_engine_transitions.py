"""The task and batch state machine: allowed transitions move, the rest change nothing.

Runs on both metadata stores (Postgres and SQLite) through the `sessions` fixture.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Batch, TaskEvent, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import (
    cancel_batch,
    claim,
    close_batch_if_done,
    fail,
    release_waiting_root,
    resolve_task,
    retry_batch,
    start_batch,
    succeed,
)
from orchestrator.engine.transitions import lease_for
from orchestrator.engine.types import TaskRow
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.status import BatchStatus, TaskStatus
from orchestrator.testing import reset_process_caches
from tests.dags import spec_from_edges, sync

S = TaskStatus
P = "chain"
CHAIN = {"a": [], "b": ["a"], "c": ["b"]}


@pytest.fixture(autouse=True)
def _fresh_name_caches() -> None:
    # The database is emptied between tests with RESTART IDENTITY, so ids come back
    # with other names: forget the process's cached names.
    reset_process_caches()


def tx(sessions: sessionmaker[Session], fn: Callable[[Session], Any]) -> Any:
    return transaction(sessions, fn)


def row(sessions: sessionmaker[Session], task: str, batch: str = "b1", pipeline: str = P) -> TaskRow:
    return tx(sessions, lambda s: resolve_task(s, pipeline, batch, task))


def statuses(sessions: sessionmaker[Session], batch: str = "b1", pipeline: str = P) -> dict[str, str]:
    return {t: str(row(sessions, t, batch, pipeline).status)
            for t in tx(sessions, lambda s: _task_names(s, pipeline, batch))}


def _task_names(s: Session, pipeline: str, batch: str) -> list[str]:
    from orchestrator.db.models import Pipeline, Task

    return list(s.execute(
        select(Task.name).join(TaskLog, TaskLog.task_id == Task.id)
        .join(Batch, Batch.id == TaskLog.batch_pk).join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .where(Pipeline.name == pipeline, Batch.batch_id == batch).order_by(Task.name)
    ).scalars())


def snapshot(sessions: sessionmaker[Session], batch_pk: int) -> tuple[Any, ...]:
    """Every task_log row of the batch, the batch row, and the number of events."""
    def read(s: Session) -> tuple[Any, ...]:
        logs = [dict(r) for r in s.execute(
            select(TaskLog.__table__).where(TaskLog.batch_pk == batch_pk).order_by(TaskLog.id)
        ).mappings()]
        batch = dict(s.execute(select(Batch.__table__).where(Batch.id == batch_pk)).mappings().one())
        events = s.execute(
            select(func.count()).select_from(TaskEvent).where(TaskEvent.batch_pk == batch_pk)
        ).scalar_one()
        return logs, batch, events

    return tx(sessions, read)


@pytest.fixture
def chain(sessions: sessionmaker[Session], clock: Any) -> sessionmaker[Session]:
    """Pipeline a -> b -> c, batch b1 started: a QUEUED, b and c PENDING."""
    sync(sessions, spec_from_edges(P, CHAIN), clock.now())
    tx(sessions, lambda s: start_batch(s, P, "b1", {"month": "2024-03"}, clock.now()))
    return sessions


def run_ok(sessions: sessionmaker[Session], task: str, now: Any, batch: str = "b1",
           pipeline: str = P) -> Any:
    r = row(sessions, task, batch, pipeline)
    assert tx(sessions, lambda s: claim(s, r, r.attempt, now)) is not None
    out = tx(sessions, lambda s: succeed(s, r, r.attempt, {"task": task}, now))
    assert out.applied
    return out


# --- starting a batch -------------------------------------------------------------------


def test_start_batch_queues_roots_and_leaves_children_pending(chain: Any):
    """A new batch has a row per task: roots QUEUED, the rest PENDING on their parents."""
    assert statuses(chain) == {"a": S.QUEUED, "b": S.PENDING, "c": S.PENDING}
    counters = tx(chain, lambda s: dict(s.execute(
        select(TaskLog.task_id, TaskLog.pending_parents)).all()))
    assert sorted(counters.values()) == [0, 1, 1]


def test_start_batch_is_idempotent_on_pipeline_and_batch_id(sessions: Any, clock: Any):
    """Starting the same (pipeline, batch_id) twice creates nothing the second time."""
    sync(sessions, spec_from_edges(P, CHAIN), clock.now())
    first = tx(sessions, lambda s: start_batch(s, P, "b1", {}, clock.now()))
    assert first.created and [d.task for d in first.queued] == ["a"]
    before = snapshot(sessions, first.batch_pk)
    again = tx(sessions, lambda s: start_batch(s, P, "b1", {"other": 1}, clock.advance(5)))
    assert again.batch_pk == first.batch_pk
    assert not again.created and again.queued == []
    assert snapshot(sessions, first.batch_pk) == before
    other = tx(sessions, lambda s: start_batch(s, P, "b2", {}, clock.now()))
    assert other.created and other.batch_pk != first.batch_pk


def test_start_batch_rejects_unknown_pipeline_and_bad_batch_id(sessions: Any, clock: Any):
    """An unknown pipeline or an unsafe batch id is refused before anything is written."""
    sync(sessions, spec_from_edges(P, CHAIN), clock.now())
    with pytest.raises(NotFound):
        tx(sessions, lambda s: start_batch(s, "nope", "b1", {}, clock.now()))
    with pytest.raises(InvalidInput):
        tx(sessions, lambda s: start_batch(s, P, "../etc", {}, clock.now()))
    assert tx(sessions, lambda s: s.execute(select(func.count()).select_from(Batch)).scalar_one()) == 0


# --- refused transitions ----------------------------------------------------------------

# Each case: steps that bring the batch to a state, then a transition that must be refused.
# A step is (action, task); the final action returns True when it was applied.


def _do(s: Session, action: str, r: TaskRow, now: Any, attempt: int | None = None) -> bool:
    att = r.attempt if attempt is None else attempt
    if action == "claim":
        return claim(s, r, att, now) is not None
    if action == "succeed":
        return succeed(s, r, att, {"late": True}, now).applied
    if action == "error":
        return fail(s, r, att, "boom", now, retry_delay_s=None).applied
    if action == "retry_now":
        return fail(s, r, att, "boom", now, retry_delay_s=0).applied
    if action == "retry_later":
        return fail(s, r, att, "boom", now, retry_delay_s=30).applied
    if action == "release":
        return release_waiting_root(s, r, {"bucket": "x", "name": "y"}, now).applied
    raise AssertionError(action)


REFUSED = [
    ("claim from PENDING", [], ("claim", "b", None)),
    ("claim from RUNNING", [("claim", "a")], ("claim", "a", None)),
    ("claim from SUCCESS", [("claim", "a"), ("succeed", "a")], ("claim", "a", None)),
    ("claim from ERROR", [("claim", "a"), ("error", "a")], ("claim", "a", None)),
    ("claim from UPSTREAM_FAILED", [("claim", "a"), ("error", "a")], ("claim", "b", None)),
    ("claim from RETRYING", [("claim", "a"), ("retry_later", "a")], ("claim", "a", None)),
    ("claim of a later attempt", [], ("claim", "a", 2)),
    ("claim of an earlier attempt", [("claim", "a"), ("retry_now", "a")], ("claim", "a", 1)),
    ("succeed from QUEUED", [], ("succeed", "a", None)),
    ("succeed from PENDING", [], ("succeed", "b", None)),
    ("succeed from SUCCESS", [("claim", "a"), ("succeed", "a")], ("succeed", "a", None)),
    ("succeed from ERROR", [("claim", "a"), ("error", "a")], ("succeed", "a", None)),
    ("succeed from RETRYING", [("claim", "a"), ("retry_later", "a")], ("succeed", "a", None)),
    ("succeed with a wrong attempt", [("claim", "a")], ("succeed", "a", 2)),
    ("error from SUCCESS", [("claim", "a"), ("succeed", "a")], ("error", "a", None)),
    ("retry from SUCCESS", [("claim", "a"), ("succeed", "a")], ("retry_now", "a", None)),
    ("retry later from SUCCESS", [("claim", "a"), ("succeed", "a")], ("retry_later", "a", None)),
    ("error from QUEUED", [], ("error", "a", None)),
    ("error from PENDING", [], ("error", "b", None)),
    ("error from ERROR", [("claim", "a"), ("error", "a")], ("error", "a", None)),
    ("error with a wrong attempt", [("claim", "a")], ("error", "a", 3)),
    ("release of a QUEUED root", [], ("release", "a", None)),
    ("release of a child waiting on parents", [], ("release", "b", None)),
    ("release of a RUNNING task", [("claim", "a")], ("release", "a", None)),
]


@pytest.mark.parametrize(("steps", "refused"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_disallowed_transition_is_refused_and_changes_nothing(chain: Any, clock: Any,
                                                               steps: list[tuple[str, str]],
                                                               refused: tuple[str, str, int | None]):
    """A transition from a state it may not leave is a no-op: same rows, no new events."""
    for action, task in steps:
        r = row(chain, task)
        assert tx(chain, lambda s, r=r, action=action: _do(s, action, r, clock.now())), (action, task)
    action, task, attempt = refused
    r = row(chain, task)
    before = snapshot(chain, r.batch_pk)
    clock.advance(60)
    applied = tx(chain, lambda s: _do(s, action, r, clock.now(), attempt))
    assert applied is False
    assert snapshot(chain, r.batch_pk) == before


# --- fencing ----------------------------------------------------------------------------


def test_late_success_from_an_expired_attempt_is_fenced_off(chain: Any, clock: Any):
    """A zombie attempt 1 finishing after attempt 2 took over changes nothing."""
    a1 = row(chain, "a")
    assert tx(chain, lambda s: claim(s, a1, 1, clock.now())) is not None
    # The lease of attempt 1 expires: the next attempt is queued and claimed.
    requeued = tx(chain, lambda s: fail(s, a1, 1, "lease expired", clock.advance(600),
                                        retry_delay_s=0))
    assert requeued.applied and [(d.task, d.attempt) for d in requeued.queued] == [("a", 2)]
    a2 = row(chain, "a")
    assert (a2.status, a2.attempt) == (S.QUEUED, 2)
    assert tx(chain, lambda s: claim(s, a2, 2, clock.advance(1))) is not None

    before = snapshot(chain, a1.batch_pk)
    late = tx(chain, lambda s: succeed(s, a1, 1, {"zombie": True}, clock.advance(1)))
    assert late.applied is False and late.queued == []
    assert snapshot(chain, a1.batch_pk) == before
    assert row(chain, "a").status == S.RUNNING

    done = tx(chain, lambda s: succeed(s, a2, 2, {"fresh": True}, clock.advance(1)))
    assert done.applied and [(d.task, d.attempt) for d in done.queued] == [("b", 1)]
    out = tx(chain, lambda s: s.execute(
        select(TaskLog.output, TaskLog.attempt).where(TaskLog.id == a2.log_id)).one())
    assert tuple(out) == ({"fresh": True}, 2)


# --- file-triggered roots ---------------------------------------------------------------


def test_root_with_gcs_trigger_waits_for_its_file(sessions: Any, clock: Any):
    """A root with a gcs_trigger stays PENDING (waiting_for_file) until released once."""
    trig = {"gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}}
    sync(sessions, spec_from_edges("files", {"load": [], "calc": ["load"], "free": []},
                                   load=trig), clock.now())
    started = tx(sessions, lambda s: start_batch(s, "files", "2024-03", {}, clock.now()))
    assert [d.task for d in started.queued] == ["free"]
    load = row(sessions, "load", "2024-03", "files")
    assert load.status == S.PENDING
    waiting = tx(sessions, lambda s: s.execute(
        select(TaskLog.waiting_for_file).where(TaskLog.id == load.log_id)).scalar_one())
    assert waiting is True
    assert tx(sessions, lambda s: claim(s, load, 1, clock.now())) is None

    obj = {"bucket": "landing", "name": "sales/2024-03/_SUCCESS", "generation": "7"}
    out = tx(sessions, lambda s: release_waiting_root(s, load, obj, clock.advance(1)))
    assert out.applied and [(d.task, d.attempt) for d in out.queued] == [("load", 1)]
    again = tx(sessions, lambda s: release_waiting_root(s, load, obj, clock.advance(1)))
    assert again.applied is False and again.queued == []
    got = tx(sessions, lambda s: claim(s, row(sessions, "load", "2024-03", "files"), 1,
                                       clock.now()))
    assert got is not None and got.input["trigger"] == obj
    assert row(sessions, "calc", "2024-03", "files").status == S.PENDING


# --- cancel -----------------------------------------------------------------------------


def test_cancel_batch_cancels_every_open_task_and_fences_late_results(chain: Any, clock: Any):
    """Cancel makes every open task CANCELLED and the batch CANCELLED; a late success is refused."""
    a = row(chain, "a")
    assert tx(chain, lambda s: claim(s, a, 1, clock.now())) is not None
    n = tx(chain, lambda s: cancel_batch(s, P, "b1", clock.advance(5)))
    assert n == 3
    assert statuses(chain) == {"a": S.CANCELLED, "b": S.CANCELLED, "c": S.CANCELLED}
    before = snapshot(chain, a.batch_pk)
    assert before[1]["status"] == BatchStatus.CANCELLED
    assert tx(chain, lambda s: succeed(s, a, 1, {}, clock.advance(1))).applied is False
    assert tx(chain, lambda s: fail(s, a, 1, "x", clock.now(), retry_delay_s=0)).applied is False
    assert tx(chain, lambda s: close_batch_if_done(s, a.batch_pk, clock.now())) is None
    assert tx(chain, lambda s: cancel_batch(s, P, "b1", clock.now())) == 0
    assert snapshot(chain, a.batch_pk) == before


def test_cancel_leaves_finished_tasks_alone(chain: Any, clock: Any):
    """Cancelling keeps SUCCESS rows as they are and cancels only the open ones."""
    run_ok(chain, "a", clock.now())
    assert tx(chain, lambda s: cancel_batch(s, P, "b1", clock.advance(1))) == 2
    assert statuses(chain) == {"a": S.SUCCESS, "b": S.CANCELLED, "c": S.CANCELLED}


# --- retries ----------------------------------------------------------------------------

RETRY3 = {"retry": {"max_attempts": 3, "initial_delay_s": 5, "backoff_factor": 2,
                    "max_delay_s": 60}}


def test_failure_with_attempts_left_waits_in_retrying(sessions: Any, clock: Any):
    """A failed attempt with attempts left is RETRYING until its backoff; children keep waiting."""
    sync(sessions, spec_from_edges("flaky", {"x": [], "y": ["x"]}, x=RETRY3), clock.now())
    tx(sessions, lambda s: start_batch(s, "flaky", "b1", {}, clock.now()))
    x = row(sessions, "x", pipeline="flaky")
    assert [x.retry_delay(1), x.retry_delay(2), x.retry_delay(3)] == [5.0, 10.0, None]
    assert tx(sessions, lambda s: claim(s, x, 1, clock.now())) is not None
    out = tx(sessions, lambda s: fail(s, x, 1, "flaky", clock.now(), retry_delay_s=x.retry_delay(1)))
    assert out.applied and out.queued == [] and not out.check_batch
    got = tx(sessions, lambda s: s.execute(
        select(TaskLog.status, TaskLog.attempt, TaskLog.next_attempt_at, TaskLog.error)
        .where(TaskLog.id == x.log_id)).one())
    assert tuple(got) == (S.RETRYING, 1, clock.now() + timedelta(seconds=5), "flaky")
    assert row(sessions, "y", pipeline="flaky").status == S.PENDING
    assert tx(sessions, lambda s: close_batch_if_done(s, x.batch_pk, clock.now())) is None


def test_failures_walk_the_attempts_then_error_and_cascade(sessions: Any, clock: Any):
    """Each failure with attempts left queues the next attempt; the last one ends in ERROR."""
    sync(sessions, spec_from_edges("flaky", {"x": [], "y": ["x"], "z": ["y"]}, x=RETRY3),
         clock.now())
    tx(sessions, lambda s: start_batch(s, "flaky", "b1", {}, clock.now()))
    seen = []
    while True:
        x = row(sessions, "x", pipeline="flaky")
        assert tx(sessions, lambda s, x=x: claim(s, x, x.attempt, clock.now())) is not None
        delay = x.retry_delay(x.attempt)
        seen.append((x.attempt, delay))
        if delay is None:
            out = tx(sessions, lambda s, x=x: fail(s, x, x.attempt, "still broken",
                                                    clock.advance(1), retry_delay_s=None))
            assert out.applied and out.queued == [] and out.check_batch
            break
        # The backoff elapsed: requeue at once with the next attempt number.
        now = clock.advance(delay)
        out = tx(sessions, lambda s, x=x, now=now: fail(s, x, x.attempt, "broken", now,
                                                        retry_delay_s=0))
        assert [(d.task, d.attempt) for d in out.queued] == [("x", x.attempt + 1)]
    assert seen == [(1, 5.0), (2, 10.0), (3, None)]
    assert statuses(sessions, pipeline="flaky") == {
        "x": S.ERROR, "y": S.UPSTREAM_FAILED, "z": S.UPSTREAM_FAILED}
    done = tx(sessions, lambda s: close_batch_if_done(s, x.batch_pk, clock.now()))
    assert done is not None and done.status == BatchStatus.FAILED


def test_retry_batch_reruns_the_failed_part_with_a_fresh_budget(sessions: Any, clock: Any):
    """retry_batch requeues the ERROR task (next attempt, fresh budget), re-arms its
    UPSTREAM_FAILED descendants, leaves successes alone, and the batch then succeeds."""
    parents = {"a": [], "b": ["a"], "c": ["b"], "d": ["a"]}
    sync(sessions, spec_from_edges("rerun", parents,
                                   b={"retry": {"max_attempts": 2, "initial_delay_s": 1}}),
         clock.now())
    started = tx(sessions, lambda s: start_batch(s, "rerun", "b1", {}, clock.now()))
    run_ok(sessions, "a", clock.now(), pipeline="rerun")
    run_ok(sessions, "d", clock.now(), pipeline="rerun")
    b = row(sessions, "b", pipeline="rerun")
    assert tx(sessions, lambda s: claim(s, b, 1, clock.now())) is not None
    assert tx(sessions, lambda s: fail(s, b, 1, "x", clock.now(), retry_delay_s=0)).applied
    b2 = row(sessions, "b", pipeline="rerun")
    assert tx(sessions, lambda s: claim(s, b2, 2, clock.now())) is not None
    assert b2.retry_delay(2) is None
    assert tx(sessions, lambda s: fail(s, b2, 2, "x", clock.now(), retry_delay_s=None)).applied
    assert statuses(sessions, pipeline="rerun") == {
        "a": S.SUCCESS, "b": S.ERROR, "c": S.UPSTREAM_FAILED, "d": S.SUCCESS}
    closed = tx(sessions, lambda s: close_batch_if_done(s, started.batch_pk, clock.now()))
    assert closed is not None and closed.status == BatchStatus.FAILED

    a_before = tx(sessions, lambda s: dict(s.execute(
        select(TaskLog.__table__).where(TaskLog.batch_pk == started.batch_pk,
                                        TaskLog.task_id == row(sessions, "a", "b1", "rerun").task_id)
    ).mappings().one()))
    queued = tx(sessions, lambda s: retry_batch(s, "rerun", "b1", clock.advance(60)))
    assert [(d.task, d.attempt) for d in queued] == [("b", 3)]
    assert statuses(sessions, pipeline="rerun") == {
        "a": S.SUCCESS, "b": S.QUEUED, "c": S.PENDING, "d": S.SUCCESS}
    b3 = row(sessions, "b", pipeline="rerun")
    assert (b3.attempt, b3.retry_base) == (3, 2)
    assert b3.retry_delay(3) == 1.0  # a fresh budget: attempt 3 is the first of two again
    assert b3.batch_status == BatchStatus.RUNNING
    a_after = tx(sessions, lambda s: dict(s.execute(
        select(TaskLog.__table__).where(TaskLog.id == a_before["id"])).mappings().one()))
    assert a_after == a_before
    # The old attempt stays fenced off after the reset.
    assert tx(sessions, lambda s: succeed(s, b2, 2, {}, clock.now())).applied is False

    assert tx(sessions, lambda s: claim(s, b3, 3, clock.now())) is not None
    out = tx(sessions, lambda s: succeed(s, b3, 3, {}, clock.now()))
    assert [(d.task, d.attempt) for d in out.queued] == [("c", 1)]
    last = run_ok(sessions, "c", clock.advance(1), pipeline="rerun")
    assert last.check_batch
    done = tx(sessions, lambda s: close_batch_if_done(s, started.batch_pk, clock.now()))
    assert done is not None and done.status == BatchStatus.SUCCESS
    assert set(statuses(sessions, pipeline="rerun").values()) == {S.SUCCESS}


def test_retry_batch_refuses_while_tasks_are_open(chain: Any, clock: Any):
    """Rerunning tasks that are still queued or running is refused and changes nothing."""
    a = row(chain, "a")
    before = snapshot(chain, a.batch_pk)
    with pytest.raises(InvalidInput):
        tx(chain, lambda s: retry_batch(s, P, "b1", clock.now(), tasks=["a"]))
    assert snapshot(chain, a.batch_pk) == before
    assert tx(chain, lambda s: retry_batch(s, P, "b1", clock.now())) == []


def test_close_batch_waits_for_open_tasks_and_closes_once(chain: Any, clock: Any):
    """The batch closes only when no task is open, and only the first close reports it."""
    batch_pk = row(chain, "a").batch_pk
    for t in ("a", "b"):
        run_ok(chain, t, clock.advance(1))
        assert tx(chain, lambda s: close_batch_if_done(s, batch_pk, clock.now())) is None
    out = run_ok(chain, "c", clock.advance(1))
    assert out.check_batch and out.queued == []
    done = tx(chain, lambda s: close_batch_if_done(s, batch_pk, clock.now()))
    assert done is not None and done.status == BatchStatus.SUCCESS and done.pipeline == P
    assert done.duration_s == 3.0
    assert tx(chain, lambda s: close_batch_if_done(s, batch_pk, clock.now())) is None


def test_claim_hands_the_task_its_parents_outputs_and_params(chain: Any, clock: Any):
    """A claimed child receives the batch params and each parent's output by name."""
    run_ok(chain, "a", clock.now())
    b = row(chain, "b")
    got = tx(chain, lambda s: claim(s, b, 1, clock.now()))
    assert got is not None
    assert got.input["params"] == {"month": "2024-03"}
    assert got.input["parents"] == {"a": {"task": "a"}}
    assert got.input["parent_status"] == {"a": "SUCCESS"}
    # The lease outlasts the timeout (the worker reports a timeout itself) by a grace.
    assert got.lease_expires_at == clock.now() + lease_for(b.timeout_s)
    assert lease_for(b.timeout_s) > timedelta(seconds=b.timeout_s)
