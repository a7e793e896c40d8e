"""Random DAGs, random trigger rules, random completion orders: every batch ends
terminal, with the statuses an independent reference model predicts."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Task, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import (
    claim,
    close_batch_if_done,
    fail,
    resolve_task,
    start_batch,
    succeed,
)
from orchestrator.status import BatchStatus, TaskStatus, TriggerRule
from orchestrator.testing import reset_process_caches
from tests.dags import spec_from_edges, sync

S = TaskStatus
R = TriggerRule
OUTCOMES = ("success", "error", "flaky")  # flaky: one failed attempt, then success
_names = itertools.count()


@st.composite
def dags(draw: Any) -> tuple[dict[str, list[str]], dict[str, R], dict[str, str]]:
    """Up to 12 tasks; each may depend on any earlier one (so the graph is acyclic)."""
    n = draw(st.integers(min_value=1, max_value=12))
    names = [f"t{i}" for i in range(n)]
    parents = {
        name: sorted(draw(st.sets(st.sampled_from(names[:i]), max_size=4)) if i else [])
        for i, name in enumerate(names)
    }
    rules = {name: draw(st.sampled_from(list(R))) for name in names}
    outcomes = {name: draw(st.sampled_from(OUTCOMES)) for name in names}
    return parents, rules, outcomes


def expected_statuses(parents: dict[str, list[str]], rules: dict[str, R],
                      outcomes: dict[str, str]) -> dict[str, S]:
    """The reference model: each task's final status from its parents' final statuses."""
    memo: dict[str, S] = {}

    def kind(status: S) -> str:
        if status is S.SUCCESS:
            return "succeeded"
        if status is S.SKIPPED:
            return "skipped"
        return "failed"

    def run(task: str) -> S:
        return S.ERROR if outcomes[task] == "error" else S.SUCCESS

    def final(task: str) -> S:
        if task in memo:
            return memo[task]
        kinds = [kind(final(p)) for p in parents[task]]
        rule = rules[task]
        if not kinds:
            result = run(task)
        elif rule is R.ALL_SUCCESS:
            if "failed" in kinds:
                result = S.UPSTREAM_FAILED
            elif "skipped" in kinds:
                result = S.SKIPPED
            else:
                result = run(task)
        elif rule is R.ALL_DONE:
            result = run(task)
        else:  # one_failed
            result = run(task) if "failed" in kinds else S.SKIPPED
        memo[task] = result
        return result

    return {t: final(t) for t in parents}


def drive(sessions: sessionmaker[Session], pipeline: str, outcomes: dict[str, str],
          pick: Any, now: Any) -> tuple[dict[str, S], Any, list[tuple[str, int]]]:
    """Run the batch to the end, choosing among the QUEUED tasks with `pick`."""
    started = transaction(sessions, lambda s: start_batch(s, pipeline, "b", {}, now))
    dispatched = [(d.task, d.attempt) for d in started.queued]
    ran: list[tuple[str, int]] = []
    closed = None
    for _ in range(100):
        queued = transaction(sessions, lambda s: sorted(s.execute(
            select(Task.name).join(TaskLog, TaskLog.task_id == Task.id)
            .where(TaskLog.batch_pk == started.batch_pk, TaskLog.status == S.QUEUED)
        ).scalars()))
        if not queued:
            break
        name = pick(queued)
        row = transaction(sessions, lambda s, name=name: resolve_task(s, pipeline, "b", name))
        assert (name, row.attempt) in dispatched, "a QUEUED task was never handed out to run"
        assert transaction(sessions, lambda s, row=row: claim(s, row, row.attempt, now))
        ran.append((name, row.attempt))
        if outcomes[name] == "success" or (outcomes[name] == "flaky" and row.attempt > 1):
            out = transaction(sessions, lambda s, row=row: succeed(s, row, row.attempt, {}, now))
        elif outcomes[name] == "flaky":
            out = transaction(sessions, lambda s, row=row: fail(s, row, row.attempt, "flaky",
                                                                now, retry_delay_s=0))
        else:
            out = transaction(sessions, lambda s, row=row: fail(s, row, row.attempt, "boom",
                                                                now, retry_delay_s=None))
        assert out.applied
        dispatched.extend((d.task, d.attempt) for d in out.queued)
        if out.check_batch and closed is None:
            # What a worker does after a terminal transition that queued nothing.
            closed = transaction(sessions,
                                 lambda s: close_batch_if_done(s, started.batch_pk, now))
    finished = closed
    final = transaction(sessions, lambda s: {n: S(st_) for n, st_ in s.execute(
        select(Task.name, TaskLog.status).join(TaskLog, TaskLog.task_id == Task.id)
        .where(TaskLog.batch_pk == started.batch_pk)).all()})
    assert len(dispatched) == len(set(dispatched)), "a task attempt was handed out twice"
    return final, finished, ran


@pytest.mark.slow
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=dags(), data=st.data())
def test_every_batch_ends_terminal_as_the_trigger_rules_say(sessions: sessionmaker[Session],
                                                            clock: Any, case: Any, data: Any):
    """Whatever the DAG, rules, outcomes and completion order, the batch closes and each
    task's final status is the one the reference model derives."""
    parents, rules, outcomes = case
    reset_process_caches()
    name = f"prop_{next(_names)}"
    fields = {t: {"trigger_rule": rules[t].value,
                  "retry": {"max_attempts": 2, "initial_delay_s": 0}} for t in parents}
    sync(sessions, spec_from_edges(name, parents, **fields), clock.now())

    def pick(queued: list[str]) -> str:
        return data.draw(st.sampled_from(queued))

    final, finished, ran = drive(sessions, name, outcomes, pick, clock.now())
    want = expected_statuses(parents, rules, outcomes)
    assert final == want
    assert finished is not None, "the batch did not close"
    failed = any(s in (S.ERROR, S.UPSTREAM_FAILED) for s in final.values())
    assert finished.status == (BatchStatus.FAILED if failed else BatchStatus.SUCCESS)
    # Exactly the tasks the model runs were run, each once per attempt it needed.
    runs = {t for t, _ in ran}
    assert runs == {t for t, s in want.items() if s in (S.SUCCESS, S.ERROR)}
    for t in runs:
        attempts = [a for n, a in ran if n == t]
        assert attempts == ([1, 2] if outcomes[t] == "flaky" else [1])


def test_reference_model_examples():
    """The reference model itself: cascades, skips and the alerting rule."""
    parents = {"a": [], "b": ["a"], "c": ["b"], "alert": ["a", "b"], "cleanup": ["c"],
               "after": ["alert"]}
    rules = {"a": R.ALL_SUCCESS, "b": R.ALL_SUCCESS, "c": R.ALL_SUCCESS,
             "alert": R.ONE_FAILED, "cleanup": R.ALL_DONE, "after": R.ALL_SUCCESS}
    ok = {t: "success" for t in parents}
    assert expected_statuses(parents, rules, ok) == {
        "a": S.SUCCESS, "b": S.SUCCESS, "c": S.SUCCESS, "alert": S.SKIPPED,
        "cleanup": S.SUCCESS, "after": S.SKIPPED}
    assert expected_statuses(parents, rules, {**ok, "b": "error"}) == {
        "a": S.SUCCESS, "b": S.ERROR, "c": S.UPSTREAM_FAILED, "alert": S.SUCCESS,
        "cleanup": S.SUCCESS, "after": S.SUCCESS}
