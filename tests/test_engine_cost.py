"""Database work per task completion is constant, and a whole batch is linear in its edges.

Work is counted, never timed: SQL statements (SQLAlchemy cursor events), rows the
driver reports (`cursor.rowcount`), and on Postgres the tuples the server itself
read (`pg_stat_get_xact_*`), which also sees rows scanned but never returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Task, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import claim, close_batch_if_done, resolve_task, start_batch, succeed
from orchestrator.engine.types import TaskRow
from orchestrator.status import BatchStatus, TaskStatus
from orchestrator.testing import reset_process_caches
from tests.dags import fan_in, spec_from_edges, sync

S = TaskStatus
T = TypeVar("T")

# Tuples the server read in the current transaction: sequential scans, heap fetches
# through indexes, and index entries returned, over the database's own tables.
TUPLES_READ = text("""
    SELECT
      (SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0)
         FROM pg_stat_xact_user_tables)
    + (SELECT coalesce(sum(pg_stat_get_xact_tuples_returned(i.indexrelid)), 0)
         FROM pg_index i JOIN pg_stat_xact_user_tables t ON t.relid = i.indrelid)
""")


@pytest.fixture(autouse=True)
def _fresh_name_caches() -> None:
    # The database is emptied between tests with RESTART IDENTITY, so ids come back
    # with other names: forget the process's cached names.
    reset_process_caches()


@dataclass
class Work:
    statements: int = 0
    rows: int = 0
    tuples_read: int = 0


@contextmanager
def metered(engine: Engine) -> Iterator[Work]:
    """Count the statements and reported rows of everything run on `engine` meanwhile."""
    work = Work()

    def after(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if "pg_stat" in statement:
            return
        work.statements += 1
        work.rows += max(cursor.rowcount, 0)

    event.listen(engine, "after_cursor_execute", after)
    try:
        yield work
    finally:
        event.remove(engine, "after_cursor_execute", after)


def tuples_read(s: Session) -> int:
    """The server's running count of rows read by this connection (0 off Postgres).

    The counters are pending statistics not yet flushed, which may include earlier
    transactions on the same connection; they only grow within a transaction, so
    the work of one transaction is the difference between its first and last read.
    """
    if s.get_bind().dialect.name != "postgresql":
        return 0
    return int(s.execute(TUPLES_READ).scalar_one())


def counted(work: Work, fn: Callable[[Session], T]) -> Callable[[Session], T]:
    """`fn` run in a transaction that adds the rows the server read for it to `work`."""

    def run(s: Session) -> T:
        before = tuples_read(s)
        out = fn(s)
        work.tuples_read += tuples_read(s) - before
        return out

    return run


def complete(sessions: sessionmaker[Session], pipeline: str, batch: str, task: str,
             now: Any, work: Work) -> None:
    """One task completion as a worker does it: resolve, claim, succeed, each committed."""

    row = transaction(sessions, counted(work, lambda s: resolve_task(s, pipeline, batch, task)))

    def start(s: Session) -> None:
        assert claim(s, row, row.attempt, now) is not None

    def finish(s: Session) -> None:
        out = succeed(s, row, row.attempt, {"n": 1}, now)
        assert out.applied and [d.task for d in out.queued] == ["b"]

    transaction(sessions, counted(work, start))
    transaction(sessions, counted(work, finish))


def completion_cost(sessions: sessionmaker[Session], engine: Engine, name: str,
                    parents: dict[str, list[str]], now: Any) -> tuple[Work, Work]:
    """Work to complete root `a` (whose one child is `b`) in a first and a second batch."""
    sync(sessions, spec_from_edges(name, parents), now)
    costs = []
    for batch in ("first", "second"):
        transaction(sessions, lambda s, batch=batch: start_batch(s, name, batch, {}, now))
        with metered(engine) as work:
            complete(sessions, name, batch, "a", now, work)
        costs.append(work)
    return costs[0], costs[1]


def test_a_completion_costs_the_same_statements_in_a_dag_of_3_or_3000(any_engine: Engine,
                                                                     clock: Any):
    """Completing a task issues the same statements (and touches the same rows) whatever
    the size or shape of the rest of the DAG, and the server reads only a handful of rows."""
    sessions = sessionmaker(any_engine, expire_on_commit=False, autoflush=False)
    small = {"a": [], "b": ["a"], "c": ["b"]}
    deep = {"a": [], "b": ["a"], "c": ["b"]}
    deep.update({f"d{i}": [f"d{i - 1}" if i else "c"] for i in range(2997)})
    wide = {"a": [], "b": ["a"], "c": ["b"], "hub": []}
    wide.update({f"w{i}": ["hub"] for i in range(2996)})
    assert len(deep) == len(wide) == 3000

    results = {name: completion_cost(sessions, any_engine, name, dag, clock.now())
               for name, dag in (("small", small), ("deep", deep), ("wide", wide))}
    first = {name: r[0].statements for name, r in results.items()}
    second = {name: (r[1].statements, r[1].rows) for name, r in results.items()}
    assert len(set(first.values())) == 1, first
    assert len(set(second.values())) == 1, second
    # And it is a small number: resolve, claim, succeed, decrement on PostgreSQL (each
    # with its events); SQLite writes the events in statements of their own, and each
    # of its three transactions begins with a BEGIN IMMEDIATE.
    assert second["small"][0] <= (4 if any_engine.dialect.name == "postgresql" else 9)
    # A scan of the batch's 3,000 rows (or of its ~3,000 open ones) per completion
    # would show here; index lookups read a handful.
    read = {name: r[1].tuples_read for name, r in results.items()}
    assert max(read.values()) < 200, read


def run_fan_in(sessions: sessionmaker[Session], engine: Engine, n: int, now: Any,
               chunk: int = 1000) -> Work:
    """Run a whole fan-in batch of n parents through the engine; return its total work."""
    name = f"fan_in_{n}"
    sync(sessions, spec_from_edges(name, fan_in(n)), now)
    with metered(engine) as work:

        def begin(s: Session) -> tuple[int, list[TaskRow]]:
            started = start_batch(s, name, "b", {}, now)
            assert len(started.queued) == n
            first = resolve_task(s, name, "b", "p0")
            # The parents differ only in ids and names: one query resolves them all.
            parents = s.execute(
                select(TaskLog.id, TaskLog.task_id, Task.name)
                .join(Task, Task.id == TaskLog.task_id)
                .where(TaskLog.batch_pk == started.batch_pk, Task.name != "child")
            ).all()
            # The same guarded QUEUED -> RUNNING as `claim`, for every parent in one
            # statement: a claim reads no sibling's row, and this keeps the test short.
            claimed = s.execute(
                update(TaskLog)
                .where(TaskLog.batch_pk == started.batch_pk, TaskLog.status == S.QUEUED,
                       TaskLog.attempt == 1)
                .values(status=S.RUNNING, started_at=now, updated_at=now)
                .execution_options(synchronize_session=False)
            ).rowcount
            assert claimed == n == len(parents)
            return started.batch_pk, [replace(first, log_id=log_id, task_id=task_id, task=t)
                                      for log_id, task_id, t in parents]

        batch_pk, rows = transaction(sessions, counted(work, begin))
        for lo in range(0, n, chunk):
            def finish_parents(s: Session, lo: int = lo) -> None:
                for r in rows[lo:lo + chunk]:
                    assert succeed(s, r, 1, None, now).applied

            transaction(sessions, counted(work, finish_parents))

        def finish_child(s: Session) -> None:
            child = resolve_task(s, name, "b", "child")
            assert child.status == S.QUEUED
            got = claim(s, child, 1, now)
            assert got is not None and len(got.input["parents"]) == n
            assert succeed(s, child, 1, None, now).check_batch

        transaction(sessions, counted(work, finish_child))
        done = transaction(sessions, counted(work, lambda s: close_batch_if_done(s, batch_pk, now)))
        assert done is not None and done.status == BatchStatus.SUCCESS
    return work


@pytest.mark.postgres
@pytest.mark.slow
def test_fan_in_work_is_linear_in_edges(pg_engine: Engine, pg_sessions: Any, clock: Any):
    """A 10,000-parent fan-in costs ~10x a 1,000-parent one: constant work per parent,
    never a re-read of the open siblings per finished parent (which would be ~100x)."""
    small = run_fan_in(pg_sessions, pg_engine, 1_000, clock.now())
    large = run_fan_in(pg_sessions, pg_engine, 10_000, clock.now())
    assert 9 < large.statements / small.statements < 12, (small, large)
    assert 9 < large.rows / small.rows < 12, (small, large)
    # The server's own row reads: linear is a few dozen per edge; re-reading the
    # open siblings per finished parent is thousands per edge.
    assert large.tuples_read < 100 * 10_000, (small, large)


class _Published:
    """A publisher that keeps what it is given."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def publish(self, messages: Any) -> None:
        self.messages.extend(messages)


@contextmanager
def round_trips(engine: Engine) -> Iterator[list[str]]:
    """The queries sent to the server meanwhile, in order: each statement (several in
    one query count once), and psycopg2's own BEGIN and COMMIT of a transaction."""
    sent: list[str] = []

    def execute(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        sent.append(" ".join(statement.split())[:40])

    def begin(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            sent.append("(BEGIN)")

    def commit(conn: Any) -> None:
        if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
            sent.append("(COMMIT)")

    listeners = (("after_cursor_execute", execute), ("begin", begin), ("commit", commit))
    for name, fn in listeners:
        event.listen(engine, name, fn)
    try:
        yield sent
    finally:
        for name, fn in listeners:
            event.remove(engine, name, fn)


@pytest.mark.postgres
def test_a_plain_task_through_the_worker_costs_three_round_trips(pg_engine: Engine,
                                                                   pg_url: str) -> None:
    """On PostgreSQL a plain task's delivery is: its claim (one statement, its own
    transaction), its SUCCESS with BEGIN in front, and the COMMIT with the read of
    whether its batch is still open. The transactions' own BEGIN and COMMIT round
    trips are gone."""
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings

    published = _Published()
    rt = Runtime(Settings(database_url=pg_url), pg_engine, published)
    rt.sync_specs([spec_from_edges("plain", {"a": [], "b": [], "c": [], "d": []})])
    assert rt.start_batch("plain", "b1")
    first, *measured, last = [m.data for m in published.messages]
    rt.router.handle_payload(first)  # the first delivery loads the definitions
    with round_trips(pg_engine) as sent:
        for msg in measured:
            assert rt.router.handle_payload(msg).outcome == "succeeded"
    assert len(sent) == 3 * len(measured), sent
    # The last one closes the batch (a transaction of its own, once per batch).
    assert rt.router.handle_payload(last).outcome == "succeeded"
    assert rt.batch_status("plain", "b1") == BatchStatus.SUCCESS
