"""Shared fixtures: a real PostgreSQL database (migrated once per session and
emptied between tests) and a throwaway SQLite file."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.migrate import upgrade
from orchestrator.db.session import make_engine, make_sessionmaker
from orchestrator.testing import reset_process_caches


def _admin_url() -> str:
    # `make test` writes the server it found or started to .tmp/test-database-url.
    if os.environ.get("TEST_DATABASE_URL"):
        return os.environ["TEST_DATABASE_URL"]
    found = Path(__file__).resolve().parents[1] / ".tmp" / "test-database-url"
    if found.exists():
        return found.read_text().strip()
    return "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


ADMIN_URL = _admin_url()
TABLES = (
    "task_attempts, task_events, task_log, batches, task_dependencies, tasks, pipelines, "
    "concurrency_locks, circuit_breakers, event_cursors"
)


class FakeClock:
    """A clock the test moves by hand: backoff and leases without sleeping."""

    def __init__(self, start: datetime | None = None):
        self.t = start or datetime(2024, 3, 1, 12, 0, tzinfo=UTC)

    def now(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh database on the test server, migrated with alembic, dropped at the end."""
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    name = f"orch_test_{uuid.uuid4().hex[:10]}"
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # the suite must not silently skip the Postgres tests
        pytest.exit(f"PostgreSQL is not reachable at {ADMIN_URL}: {exc}", returncode=3)
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url, pool_size=1, max_overflow=0)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_engine(pg_url: str) -> Iterator[Engine]:
    engine = make_engine(pg_url, pool_size=40, max_overflow=10)
    # Ids restart with the tables, so names cached for old ids must go too.
    reset_process_caches()
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    yield engine
    engine.dispose()


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'metadata.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def any_engine(request: pytest.FixtureRequest) -> Engine:
    """The same test on both metadata stores."""
    name = "pg_engine" if request.param == "postgresql" else "sqlite_engine"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


@pytest.fixture
def pg_sessions(pg_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(pg_engine)


@pytest.fixture
def sessions(any_engine: Engine) -> sessionmaker[Session]:
    return make_sessionmaker(any_engine)


# Modules whose tests hold dozens of connections at once (up to 50): they share one
# xdist worker, so two of them never add up against the server's max_connections.
MANY_CONNECTIONS = frozenset({
    "tests/test_concurrency_limits.py", "tests/test_engine_promotion.py",
    "tests/test_mapping.py", "tests/test_circuit_breaker.py",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs two workers), each module runs whole on one
    worker, so its module-scoped fixtures (a browser, an installed function source) are
    made once; every test that needs the Google Cloud emulators runs on the same worker,
    so the emulators start once and their virtualenvs are installed by one process; and
    the modules of MANY_CONNECTIONS run one after another. Each worker has its own
    scratch database (`pg_url`)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        module = item.nodeid.split("::")[0]
        if item.get_closest_marker("emulator"):
            group = "emulators"
        elif module in MANY_CONNECTIONS:
            group = "many-connections"
        else:
            group = module
        item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Some tests log a lone surrogate on purpose (a poison input); an xdist worker
    sends its reports to the controller as UTF-8, which cannot carry one: escape them."""
    report.sections = [(title, _encodable(body)) for title, body in report.sections]


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
