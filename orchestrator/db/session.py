"""Engines, sessions and the one way to run a transaction.

The caller owns the transaction: engine functions take a `Session` and never
commit. `transaction()` retries the whole unit on deadlock or serialization
failure (a transient outcome of two parents locking shared children in
different orders), and turns "cannot reach the database" into
`InfrastructureError` so the edge asks for redelivery.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import InfrastructureError

T = TypeVar("T")

# SQLSTATE: serialization_failure, deadlock_detected; invalid_sql_statement_name (a
# prepared statement the connection no longer has: the hot path forgets it first).
_RETRY_SQLSTATES = {"40001", "40P01", "26000"}
_MAX_TX_ATTEMPTS = 8


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, pool_timeout: float = 10.0,
                echo: bool = False, prepared_statements: bool = True) -> Engine:
    """An engine for `url`. On PostgreSQL, `prepared_statements` lets the hot path
    prepare its statements once per connection (off behind a pooler that hands each
    transaction a different server connection, such as PgBouncer in transaction mode)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=pool_timeout,
        # No ping per checkout: it is a round trip on every transaction. A connection
        # the server dropped instead fails its first statement, and `transaction()`
        # runs the unit again on a fresh one. Recycling keeps them from going stale.
        pool_pre_ping=False,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "application_name": "orchestrator"},
    )
    _one_process_per_connection(engine)
    if not prepared_statements:
        _unprepared.add(engine)
    return engine


_unprepared: weakref.WeakSet[Engine] = weakref.WeakSet()


def prepares(engine: Engine) -> bool:
    """Whether statements may be prepared on `engine`'s connections."""
    return engine not in _unprepared


def _one_process_per_connection(engine: Engine) -> None:
    """A worker process forked from this one never uses a connection this process
    opened (two processes on one socket corrupt both): it opens its own instead."""

    @event.listens_for(engine, "connect")
    def _on_connect(_dbapi_conn: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _on_checkout(_dbapi_conn: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            # Forget it without closing it (closing would end the parent's session).
            record.dbapi_connection = proxy.dbapi_connection = None
            raise sa_exc.DisconnectionError("connection opened by another process")


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite opens transactions lazily and DEFERRED, so two writers that both read
    # first deadlock on the upgrade; take the write lock up front instead.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, autoflush=False)


def _is_retryable(exc: DBAPIError) -> bool:
    code = getattr(exc.orig, "pgcode", None)
    if code in _RETRY_SQLSTATES:
        return True
    return "database is locked" in str(exc.orig)


def _is_unreachable(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError) or bool(exc.connection_invalidated)


def is_infrastructure(exc: BaseException) -> bool:
    """True when `exc` says the database or the message bus could not do the work now
    (unreachable, timed out, or still deadlocked after the retries), so the same work
    can succeed later. Anything else is about the input or the code: doing it again
    gives the same answer."""
    if isinstance(exc, InfrastructureError):
        return True
    if isinstance(exc, DBAPIError):
        return _is_retryable(exc) or _is_unreachable(exc)
    return isinstance(exc, sa_exc.TimeoutError | sa_exc.DisconnectionError)


def transaction(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction, retrying it whole on deadlock/serialization."""

    def once() -> T:
        with sessions.begin() as session:
            return work(session)

    return _retried(once)


def _retried(once: Callable[[], T]) -> T:
    for attempt in range(1, _MAX_TX_ATTEMPTS + 1):
        try:
            return once()
        except DBAPIError as exc:
            if _is_retryable(exc) and attempt < _MAX_TX_ATTEMPTS:
                time.sleep(0.002 * attempt)
                continue
            if exc.connection_invalidated and attempt == 1:
                # A pooled connection the server had closed: the pool has dropped
                # it; the first try changed nothing, so run the unit once more.
                continue
            if _is_unreachable(exc) and not _is_retryable(exc):
                raise InfrastructureError(f"database unavailable: {exc.orig}") from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover


@contextmanager
def session_scope(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A read-mostly session; commits on success (for callers that need no retry)."""
    try:
        with sessions.begin() as session:
            yield session
    except OperationalError as exc:
        raise InfrastructureError(f"database unavailable: {exc.orig}") from exc


# -- fewer round trips on PostgreSQL ---------------------------------------------------
#
# psycopg2 opens a transaction with a BEGIN of its own (a round trip) and ends it with
# a COMMIT (another). On the hot path, where a transaction is one or two statements,
# those are most of the round trips. `lean_transaction` runs the same unit on a
# connection in autocommit mode and sends BEGIN in front of its first statement and,
# when asked, a read after its COMMIT, in one query each: the same transaction, two
# round trips fewer. `single_statement` runs a unit of exactly one write statement as
# that statement alone (autocommit: the statement is the transaction).

_BEGIN_PENDING = "orchestrator.begin_pending"
_autocommit_makers: weakref.WeakKeyDictionary[sessionmaker[Session], sessionmaker[Session]] = (
    weakref.WeakKeyDictionary())
_hooked: weakref.WeakSet[Engine] = weakref.WeakSet()
_hook_lock = threading.Lock()


def _is_postgres(sessions: sessionmaker[Session]) -> bool:
    bind = sessions.kw.get("bind")
    return isinstance(bind, Engine) and bind.dialect.name == "postgresql"


def _autocommit(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    maker = _autocommit_makers.get(sessions)
    if maker is not None:
        return maker
    with _hook_lock:
        maker = _autocommit_makers.get(sessions)
        if maker is not None:
            return maker
        bind: Engine = sessions.kw["bind"]
        if bind not in _hooked:
            event.listen(bind, "before_cursor_execute", _begin_in_front, retval=True)
            _hooked.add(bind)
        maker = sessionmaker(bind.execution_options(isolation_level="AUTOCOMMIT"),
                             expire_on_commit=False, autoflush=False)
        _autocommit_makers[sessions] = maker
        return maker


def _begin_in_front(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                    executemany: bool) -> tuple[str, Any]:
    pending = conn.info.get(_BEGIN_PENDING)
    if pending is not None and pending[0]:
        pending[0] = False
        statement = "BEGIN; " + statement
    return statement, parameters


def lean_transaction(sessions: sessionmaker[Session], work: Callable[[Session], T],
                     then: Callable[[T], tuple[str, dict[str, Any]] | None] | None = None,
                     ) -> tuple[T, Any]:
    """`transaction(sessions, work)`, and on PostgreSQL the first row of the read (SQL
    in psycopg2's paramstyle) that `then(result)` names, run after the commit in a
    snapshot of its own: BEGIN goes with the first statement and the read with the
    COMMIT. The row is None where no read ran (elsewhere, or `then` named none)."""
    if not _is_postgres(sessions):
        return transaction(sessions, work), None
    lean = _autocommit(sessions)

    def once() -> tuple[T, Any]:
        with lean() as session:
            conn = session.connection()
            pending = [True]
            info = conn.info
            info[_BEGIN_PENDING] = pending
            try:
                out = work(session)
                # What runs before a commit (the queued events) runs in this transaction.
                session.dispatch.before_commit(session)
                read = then(out) if then is not None else None
                if pending[0]:  # nothing was sent: no transaction to end
                    got = conn.exec_driver_sql(*read).first() if read is not None else None
                elif read is not None:
                    got = conn.exec_driver_sql("COMMIT; " + read[0], read[1]).first()
                else:
                    conn.exec_driver_sql("COMMIT")
                    got = None
            except BaseException:
                if not pending[0]:
                    # A broken connection cannot roll back: the pool drops it.
                    with contextlib.suppress(Exception):
                        conn.exec_driver_sql("ROLLBACK")
                session.rollback()
                raise
            finally:
                info.pop(_BEGIN_PENDING, None)
            session.commit()
            return out, got

    return _retried(once)


def single_statement(sessions: sessionmaker[Session], work: Callable[[Session], T]) -> T:
    """Run `work`, which sends at most one statement that writes (and any number of
    reads), with that statement as its own transaction on PostgreSQL; elsewhere, as
    `transaction` does."""
    if not _is_postgres(sessions):
        return transaction(sessions, work)
    lean = _autocommit(sessions)

    def once() -> T:
        with lean() as session:
            out = work(session)
            session.commit()
            return out

    return _retried(once)
