"""The models and the alembic migrations describe the same schema, on both stores."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from orchestrator.db.migrate import MIGRATIONS_DIR, alembic_config, downgrade, upgrade
from orchestrator.db.models import Base
from orchestrator.db.session import make_engine
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.sync import sync_pipeline
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
        downgrade(engine, "base")
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


# Tasks inserted child first (ids out of topological order), names sorting neither way;
# ids from 101 up, clear of the ones a sync takes from the sequences afterwards.
_OLD_TASKS = [(101, "z_join"), (102, "b_left"), (103, "m_root"), (104, "A_right"),
              (105, "a_solo"), (106, "other_root")]
_OLD_EDGES = [(101, 102), (101, 104), (102, 103), (104, 103)]  # (child, parent)


def _fill_0014(engine: Engine) -> None:
    with engine.begin() as c:
        for pid, name in ((101, "diamond"), (102, "single")):
            c.execute(text(
                "INSERT INTO pipelines (id, name, description, version, definition_hash, "
                "definition, created_at, updated_at) VALUES (:id, :n, '', 1, 'h', '{}', "
                "'2024-01-01 00:00:00+00', '2024-01-01 00:00:00+00')"), {"id": pid, "n": name})
        for tid, name in _OLD_TASKS:
            c.execute(text(
                "INSERT INTO tasks (id, pipeline_id, version, name, handler, config, "
                "max_attempts, retry_initial_delay_s, retry_backoff_factor, retry_max_delay_s, "
                "timeout_s, trigger_rule) VALUES (:id, :p, 1, :n, 'noop', '{}', 3, 10, 2, 600, "
                "600, 'all_success')"), {"id": tid, "p": 102 if name == "other_root" else 101,
                                         "n": name})
        for child, parent in _OLD_EDGES:
            c.execute(text("INSERT INTO task_dependencies (child_task_id, parent_task_id) "
                           "VALUES (:c, :p)"), {"c": child, "p": parent})
        c.execute(text(
            "INSERT INTO batches (id, pipeline_id, pipeline_version, batch_id, params, status, "
            "created_at) VALUES (101, 101, 1, 'b', '{}', 'RUNNING', '2024-01-01 00:00:00+00')"))
        c.execute(text(
            "INSERT INTO task_log (batch_pk, task_id, status, attempt, retry_base, trigger_rule, "
            "pending_parents, failed_parents, skipped_parents, waiting_for_file, "
            "dispatch_count, updated_at) SELECT 101, id, 'PENDING', 1, 0, 'all_success', 0, 0, "
            "0, false, 0, '2024-01-01 00:00:00+00' FROM tasks WHERE pipeline_id = 101"))


def _check_backfill(engine: Engine) -> None:
    """0015 gives every task of every version its place and its parents' names, as a
    sync of the same definition writes them."""
    upgrade(engine, "0014")
    _fill_0014(engine)
    upgrade(engine)
    with engine.connect() as c:
        # Nothing that references the tasks is lost on the way (no table is rebuilt).
        assert c.execute(text("SELECT count(*) FROM task_dependencies")).scalar() == 4
        assert c.execute(text("SELECT count(*) FROM task_log")).scalar() == 5
        got = {name: (pos, json.loads(deps)) for name, pos, deps in c.execute(text(
            "SELECT name, position, depends_on_json FROM tasks WHERE pipeline_id = 101"))}
        single = c.execute(text(
            "SELECT position, depends_on_json FROM tasks WHERE pipeline_id = 102")).one()
    assert got == {"m_root": (0, []), "b_left": (1, ["m_root"]), "A_right": (2, ["m_root"]),
                   "z_join": (3, ["A_right", "b_left"]), "a_solo": (4, [])}
    assert tuple(single) == (0, "[]")
    spec = build_pipeline({"name": "diamond_again", "tasks": [
        {"name": "z_join", "handler": "noop", "depends_on": ["b_left", "A_right"]},
        {"name": "b_left", "handler": "noop", "depends_on": ["m_root"]},
        {"name": "m_root", "handler": "noop"},
        {"name": "A_right", "handler": "noop", "depends_on": ["m_root"]},
        {"name": "a_solo", "handler": "noop"}]})
    with Session(engine) as s, s.begin():
        sync_pipeline(s, spec, datetime(2024, 1, 2, tzinfo=UTC))
    with engine.connect() as c:
        synced = {name: (pos, json.loads(deps)) for name, pos, deps in c.execute(text(
            "SELECT t.name, t.position, t.depends_on_json FROM tasks t "
            "JOIN pipelines p ON p.id = t.pipeline_id WHERE p.name = 'diamond_again'"))}
    assert synced == got


def test_task_positions_are_filled_in_on_sqlite(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        _check_backfill(engine)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_task_positions_are_filled_in_on_postgres(fresh_pg: Engine):
    _check_backfill(fresh_pg)


# At head, rows in every table that refers to another; only the ids are needed to
# tell whether they are all still there.
_T0 = "'2024-01-01 00:00:00+00'"
_HEAD_ROWS = {
    "pipelines": ("id", [
        "INSERT INTO pipelines (id, name, description, version, definition_hash, definition, "
        f"created_at, updated_at) VALUES (1, 'p', '', 1, 'h', '{{}}', {_T0}, {_T0})"]),
    "pipeline_versions": ("pipeline_id, version", [
        "INSERT INTO pipeline_versions (pipeline_id, version, timezone, created_at) "
        f"VALUES (1, 1, 'UTC', {_T0})"]),
    "schedules": ("pipeline_id", [
        f"INSERT INTO schedules (pipeline_id, paused, updated_at) VALUES (1, false, {_T0})"]),
    "tasks": ("id", [
        "INSERT INTO tasks (id, pipeline_id, version, name, handler, config, max_attempts, "
        "retry_initial_delay_s, retry_backoff_factor, retry_max_delay_s, timeout_s, "
        f"trigger_rule) VALUES ({tid}, 1, 1, '{name}', 'noop', '{{}}', 3, 10, 2, 600, 600, "
        "'all_success')" for tid, name in ((1, "a"), (2, "b"))]),
    "task_dependencies": ("child_task_id, parent_task_id", [
        "INSERT INTO task_dependencies (child_task_id, parent_task_id) VALUES (2, 1)"]),
    "batches": ("id", [
        "INSERT INTO batches (id, pipeline_id, pipeline_version, batch_id, params, status, "
        f"created_at) VALUES (1, 1, 1, 'b', '{{}}', 'RUNNING', {_T0})"]),
    "task_log": ("id", [
        "INSERT INTO task_log (id, batch_pk, task_id, status, attempt, retry_base, "
        "trigger_rule, pending_parents, failed_parents, skipped_parents, waiting_for_file, "
        f"dispatch_count, updated_at) VALUES ({tid}, 1, {tid}, '{status}', 1, 0, "
        f"'all_success', 0, 0, 0, false, 0, {_T0})"
        for tid, status in ((1, "SUCCESS"), (2, "QUEUED"))]),
    "task_events": ("id", [
        f"INSERT INTO task_events (id, batch_pk, task_id, to_status, at) VALUES (1, 1, NULL, "
        f"'RUNNING', {_T0}), (2, 1, 1, 'SUCCESS', {_T0})"]),
    "task_attempts": ("id", [
        "INSERT INTO task_attempts (id, batch_pk, task_id, attempt, outcome, started_at, log, "
        f"updated_at) VALUES (1, 1, 1, 1, 'SUCCESS', {_T0}, '[]', {_T0})"]),
    "alerts": ("id", [
        "INSERT INTO alerts (id, batch_pk, kind, task, message, created_at) "
        f"VALUES (1, 1, 'deadline_missed', '', '{{}}', {_T0})"]),
    "alert_deliveries": ("alert_id, channel", [
        "INSERT INTO alert_deliveries (alert_id, channel, attempts, next_attempt_at) "
        f"VALUES (1, 'log', 0, {_T0})"]),
}


def _rows(engine: Engine, tables: set[str]) -> dict[str, list[tuple[object, ...]]]:
    with engine.connect() as c:
        return {t: [tuple(r) for r in c.execute(text(
            f"SELECT {_HEAD_ROWS[t][0]} FROM {t} ORDER BY {_HEAD_ROWS[t][0]}"))]
            for t in tables}


def _check_rows_survive_every_step(engine: Engine) -> None:
    """Down one migration at a time to the first and up again: every row at head stays
    as long as its table does (a rebuilt table never takes the rows that refer to it
    along), and the tables of the first migration have them all back at head."""
    upgrade(engine)
    with engine.begin() as c:
        for _key, inserts in _HEAD_ROWS.values():
            for insert in inserts:
                c.execute(text(insert))
    at_head = _rows(engine, set(_HEAD_ROWS))
    assert all(at_head.values())
    revisions = [s.revision for s in ScriptDirectory.from_config(alembic_config())
                 .walk_revisions()]  # head first

    def kept(tables: set[str]) -> dict[str, list[tuple[object, ...]]]:
        return {t: at_head[t] for t in tables}

    for revision in revisions[1:]:
        downgrade(engine, revision)
        present = set(_HEAD_ROWS) & set(inspect(engine).get_table_names())
        assert _rows(engine, present) == kept(present), f"down to {revision}"
    first = present
    assert first >= {"pipelines", "tasks", "task_dependencies", "batches", "task_log",
                     "task_events"}
    for revision in reversed(revisions[:-1]):
        upgrade(engine, revision)
        assert _rows(engine, first) == kept(first), f"up to {revision}"
    assert current_revision(engine) == head_revision()
    assert schema_diff(engine) == []


def test_rows_survive_downgrades_and_upgrades_on_sqlite(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'steps.db'}")
    try:
        _check_rows_survive_every_step(engine)
        with engine.connect() as c:  # the pooled connection has its foreign keys back
            assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_rows_survive_downgrades_and_upgrades_on_postgres(fresh_pg: Engine):
    _check_rows_survive_every_step(fresh_pg)


_DANGLING = """
from alembic import op

revision = "9999"
down_revision = "{head}"


def upgrade():
    op.execute("CREATE TABLE scratch (id INTEGER PRIMARY KEY)")
    op.execute("DELETE FROM tasks WHERE id = 1")


def downgrade():
    pass
"""


@pytest.mark.parametrize("given", ["connection", "url"])
def test_a_migration_on_sqlite_that_leaves_rows_without_their_parent_fails(
        tmp_path: Path, given: str):
    """Foreign keys are off while migrations run on SQLite, so nothing cascades; a
    migration that deletes rows others still refer to fails and changes nothing, on
    the connection it is given or on one of its own."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_dangling.py").write_text(
        _DANGLING.replace("{head}", str(head_revision())))
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    engine = make_engine(f"sqlite:///{tmp_path / 'dangling.db'}")
    try:
        upgrade(engine)
        with engine.begin() as c:
            for _key, inserts in _HEAD_ROWS.values():
                for insert in inserts:
                    c.execute(text(insert))
        before = _rows(engine, set(_HEAD_ROWS))
        with engine.connect() as conn:
            if given == "connection":
                cfg.attributes["connection"] = conn
            else:
                cfg.set_main_option("sqlalchemy.url", f"sqlite:///{tmp_path / 'dangling.db'}")
            with pytest.raises(RuntimeError, match="referring to rows that do not exist"):
                command.upgrade(cfg, "head")
        assert current_revision(engine) == head_revision()
        assert "scratch" not in inspect(engine).get_table_names()
        assert _rows(engine, set(_HEAD_ROWS)) == before
        with engine.connect() as c:
            assert c.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()


def test_migrations_on_sqlite_refuse_a_connection_inside_a_transaction(tmp_path: Path):
    """Inside a transaction SQLite ignores switching foreign keys off, so a rebuilt
    table would take the rows that refer to it along: refused before anything runs."""
    engine = make_engine(f"sqlite:///{tmp_path / 'refused.db'}")
    try:
        upgrade(engine, "0014")
        cfg = alembic_config()
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            with pytest.raises(RuntimeError, match="outside a transaction"):
                command.downgrade(cfg, "0013")
        assert current_revision(engine) == "0014"
    finally:
        engine.dispose()
