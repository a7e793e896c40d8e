"""Read commands on a database the orchestrator never migrated (or migrated long ago)
say what to run, on a real PostgreSQL database created empty for the test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from orchestrator.db.migrate import upgrade
from orchestrator.db.session import make_engine
from tests.conftest import ADMIN_URL
from tests.test_cli import _one_error_line, clean_env, cli

__all__ = ["clean_env"]

READS = [["status"], ["status", "b1"], ["why", "b1", "load"], ["events", "b1"],
         ["logs", "b1", "load"], ["output", "b1", "load"], ["pipelines", "list"],
         ["pipelines", "show", "p"], ["schedules"], ["alerts"], ["batch", "cancel", "b1"]]


@pytest.fixture
def empty_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    name = f"orch_empty_{uuid.uuid4().hex[:10]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    try:
        yield url
    finally:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_read_commands_on_an_empty_database_say_to_run_db_upgrade(empty_pg):
    for args in READS:
        line = _one_error_line(cli(*args, code=1))
        assert "has no orchestrator tables yet: run `orchestrator db upgrade`" in line, (args, line)
        assert "does not exist" not in line, (args, line)
    # It changed nothing: still no table at all.
    engine = make_engine(empty_pg, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            assert conn.execute(text(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            )).scalar_one() == 0
    finally:
        engine.dispose()
    assert "is up to date" in cli("db", "upgrade").stdout
    assert "no batches yet" in cli("status").stderr


def test_a_database_with_an_older_schema_says_to_run_db_upgrade(empty_pg):
    engine = make_engine(empty_pg, pool_size=1, max_overflow=0)
    try:
        upgrade(engine, "0001")  # before the alerts table
    finally:
        engine.dispose()
    line = _one_error_line(cli("alerts", code=1))
    assert "has an older schema (0001;" in line and "run `orchestrator db upgrade`" in line
    cli("db", "upgrade")
    assert "no alerts yet" in cli("alerts").stderr
