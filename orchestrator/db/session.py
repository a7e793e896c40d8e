"""Engines, sessions and the one way to run a transaction.

The caller owns the transaction: engine functions take a `Session` and never
commit. `transaction()` retries the whole unit on deadlock or serialization
failure (a transient outcome of two parents locking shared children in
different orders), and turns "cannot reach the database" into
`InfrastructureError` so the edge asks for redelivery.
"""

from __future__ import annotations

import time
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

# SQLSTATE: serialization_failure, deadlock_detected.
_RETRY_SQLSTATES = {"40001", "40P01"}
_MAX_TX_ATTEMPTS = 8


def make_engine(url: str, *, pool_size: int = 5, max_overflow: int = 5, pool_timeout: float = 10.0,
                echo: bool = False) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, echo=echo, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    return create_engine(
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
    for attempt in range(1, _MAX_TX_ATTEMPTS + 1):
        try:
            with sessions.begin() as session:
                return work(session)
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
