"""The hot path's statements are prepared once per PostgreSQL connection and then only
executed; a connection that lost them prepares again; the setting turns them off.

Each test runs on one engine with one connection, so the statements the server has
prepared for that connection can be read back from `pg_prepared_statements`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.engine import claim, resolve_task, start_batch, succeed
from orchestrator.status import TaskStatus
from orchestrator.testing import reset_process_caches
from tests.dags import spec_from_edges, sync

pytestmark = pytest.mark.postgres

P = "chain"
CHAIN = {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]}


def _one_connection(pg_engine: Engine, prepared: bool) -> Engine:
    # pg_engine emptied the tables; this engine has exactly one connection to look into.
    return make_engine(pg_engine.url.render_as_string(hide_password=False), pool_size=1,
                       max_overflow=0, prepared_statements=prepared)


@pytest.fixture
def one(pg_engine: Engine) -> Iterator[Engine]:
    engine = _one_connection(pg_engine, prepared=True)
    yield engine
    engine.dispose()


@pytest.fixture
def unprepared(pg_engine: Engine) -> Iterator[Engine]:
    engine = _one_connection(pg_engine, prepared=False)
    yield engine
    engine.dispose()


def _started(engine: Engine, clock: Any) -> sessionmaker[Session]:
    reset_process_caches()
    sessions = make_sessionmaker(engine)
    sync(sessions, spec_from_edges(P, CHAIN), clock.now())
    transaction(sessions, lambda s: start_batch(s, P, "b1", {}, clock.now()))
    return sessions


def _run(sessions: sessionmaker[Session], task: str, clock: Any) -> list[str]:
    """Claim and succeed `task`; the statements sent, as the driver saw them."""
    sent: list[str] = []
    bind = sessions.kw["bind"]

    def seen(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(bind, "before_cursor_execute", seen)
    try:
        r = transaction(sessions, lambda s: resolve_task(s, P, "b1", task))
        assert transaction(sessions, lambda s: claim(s, r, r.attempt, clock.now())) is not None
        out = transaction(sessions, lambda s: succeed(s, r, r.attempt, {"t": task}, clock.now()))
        assert out.applied
    finally:
        event.remove(bind, "before_cursor_execute", seen)
    return sent


def _prepared(engine: Engine) -> dict[str, int]:
    """The connection's prepared statements: name -> times run with a generic plan or
    a custom one."""
    with engine.connect() as c:
        return {name: generic + custom for name, generic, custom in c.execute(text(
            "SELECT name, generic_plans, custom_plans FROM pg_prepared_statements"))}


def _status(sessions: sessionmaker[Session], task: str) -> TaskStatus:
    return transaction(sessions, lambda s: resolve_task(s, P, "b1", task)).status


def test_the_claim_and_success_are_prepared_once_and_then_executed(one: Engine, clock: Any):
    sessions = _started(one, clock)
    first = _run(sessions, "a", clock)
    assert _prepared(one) == {"orchestrator_claim_0": 1, "orchestrator_succeed": 1,
                              "orchestrator_decrement_1": 1}
    second = _run(sessions, "b", clock)
    third = _run(sessions, "c", clock)
    # Prepared once: the later tasks only execute what the connection has.
    # (b and c read their parent's output in the claim: a claim with one parent.)
    assert _prepared(one) == {"orchestrator_claim_0": 1, "orchestrator_claim_1": 2,
                              "orchestrator_succeed": 3, "orchestrator_decrement_1": 3}
    for sent in (first, second, third):
        hot = [s for s in sent if "task_log SET status = 'RUNNING'" in s
               or "task_log SET status = 'SUCCESS'" in s or "pending_parents - 1" in s]
        assert hot == [], "a hot statement was sent as text"
        assert sum(s.startswith("EXECUTE orchestrator_") for s in sent) == 3
    assert [_status(sessions, t) for t in "abcd"] == [
        TaskStatus.SUCCESS, TaskStatus.SUCCESS, TaskStatus.SUCCESS, TaskStatus.QUEUED]


def test_a_connection_that_lost_its_prepared_statements_prepares_them_again(
        one: Engine, clock: Any):
    sessions = _started(one, clock)
    _run(sessions, "a", clock)
    with one.connect() as c:  # what a DEALLOCATE, or a pooler switching servers, does
        c.exec_driver_sql("DEALLOCATE ALL")
        c.commit()
    assert _prepared(one) == {}
    _run(sessions, "b", clock)
    assert _status(sessions, "b") == TaskStatus.SUCCESS
    assert _status(sessions, "c") == TaskStatus.QUEUED
    assert _prepared(one) == {"orchestrator_claim_1": 1, "orchestrator_succeed": 1,
                              "orchestrator_decrement_1": 1}


def test_with_prepared_statements_off_nothing_is_prepared(unprepared: Engine, clock: Any):
    sessions = _started(unprepared, clock)
    sent = _run(sessions, "a", clock) + _run(sessions, "b", clock)
    assert _prepared(unprepared) == {}
    assert not any(s.startswith(("EXECUTE", "PREPARE")) for s in sent)
    assert [_status(sessions, t) for t in "abc"] == [
        TaskStatus.SUCCESS, TaskStatus.SUCCESS, TaskStatus.QUEUED]
