"""The models and the alembic migrations describe the same schema, on both stores."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine, make_url

from orchestrator.db.migrate import alembic_config, upgrade
from orchestrator.db.models import Base
from orchestrator.db.session import make_engine
from tests.conftest import ADMIN_URL

TABLES = {"pipelines", "tasks", "task_dependencies", "batches", "task_log", "task_events"}


def schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True,
                                                     "render_as_batch": True})
        return list(compare_metadata(ctx, Base.metadata))


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


@pytest.fixture
def fresh_pg() -> Iterator[Engine]:
    """An empty Postgres database of its own, migrated by the test."""
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    name = f"orch_migr_{uuid.uuid4().hex[:10]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine = make_engine(make_url(ADMIN_URL).set(database=name)
                         .render_as_string(hide_password=False), pool_size=1, max_overflow=0)
    yield engine
    engine.dispose()
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.mark.postgres
def test_migrations_match_the_models_on_postgres(fresh_pg: Engine):
    """Autogenerate against a freshly migrated Postgres database finds nothing to change."""
    upgrade(fresh_pg)
    assert current_revision(fresh_pg) == head_revision()
    assert schema_diff(fresh_pg) == []


def test_migrations_match_the_models_on_sqlite(sqlite_engine: Engine):
    """Autogenerate against a freshly migrated SQLite database finds nothing to change."""
    assert current_revision(sqlite_engine) == head_revision()
    assert schema_diff(sqlite_engine) == []


def test_downgrade_to_base_then_upgrade_again_on_sqlite(tmp_path: Path):
    """Every migration can be undone and redone: base leaves no tables, head matches the models."""
    engine = make_engine(f"sqlite:///{tmp_path / 'roundtrip.db'}")
    try:
        upgrade(engine)
        assert set(inspect(engine).get_table_names()) >= TABLES
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        assert schema_diff(engine) == []
    finally:
        engine.dispose()


def test_the_migration_history_is_one_line():
    """One head, and every revision but the first has a parent: no branches to merge."""
    script = ScriptDirectory.from_config(alembic_config())
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert sum(1 for r in revisions if r.down_revision is None) == 1
