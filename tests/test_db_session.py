"""The transaction helper on real Postgres: dropped connections and outages."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator.db.session import make_engine, make_sessionmaker, transaction
from orchestrator.errors import InfrastructureError


def test_a_connection_the_server_dropped_is_replaced_and_the_unit_runs_once_more(pg_url: str):
    engine = make_engine(pg_url, pool_size=1, max_overflow=0)
    sessions = make_sessionmaker(engine)
    pid = transaction(sessions, lambda s: s.execute(text("select pg_backend_pid()")).scalar())
    admin = make_engine(pg_url, pool_size=1, max_overflow=0)
    with admin.connect() as conn:
        conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    calls = []

    def work(s):  # type: ignore[no-untyped-def]
        calls.append(1)
        return s.execute(text("select pg_backend_pid()")).scalar()

    new_pid = transaction(sessions, work)
    assert new_pid != pid and len(calls) == 2
    engine.dispose()
    admin.dispose()


def test_an_unreachable_database_is_an_infrastructure_error(pg_engine: Engine):
    engine = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none", pool_size=1)
    with pytest.raises(InfrastructureError, match="database unavailable"):
        transaction(make_sessionmaker(engine), lambda s: s.execute(text("select 1")))
