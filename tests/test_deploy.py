"""`orchestrator deploy`, the deployment job's one command: migrate the metadata
database, then store every pipeline of ORCHESTRATOR_PIPELINES_DIR, within the
connections the deployment budgets for the job, and nothing at all when a
pipeline is bad."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine, make_url
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.db import session as db_session
from orchestrator.db.session import make_engine
from tests.conftest import ADMIN_URL

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def empty_pg(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new, empty database, named by DATABASE_URL."""
    admin = make_engine(ADMIN_URL, pool_size=1, max_overflow=0)
    name = f"orch_deploy_{uuid.uuid4().hex[:10]}"
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    monkeypatch.setenv("DATABASE_URL", url)
    yield url
    with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def deploy(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, ["deploy", *args])
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def pipelines(url: str) -> dict[str, str]:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT name, definition_hash FROM pipelines")).all())
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_deploy_migrates_an_empty_database_and_syncs_the_pipelines_dir(
        empty_pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "pipelines")
    first = deploy()
    assert "monthly_profit: synced (version 1)" in first.stdout
    assert set(pipelines(empty_pg)) == {"monthly_profit"}
    again = deploy()
    assert "monthly_profit: unchanged (version 1)" in again.stdout
    monkeypatch.setenv("ORCHESTRATOR_PIPELINES_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    assert "no *.yaml pipeline files" in deploy().stdout


@pytest.mark.postgres
def test_a_bad_pipeline_stops_the_deploy_before_it_touches_the_database(
        empty_pg: str, tmp_path: Path) -> None:
    folder = tmp_path / "pipelines"
    shutil.copytree(EXAMPLES, folder)
    (folder / "broken.yaml").write_text(
        "name: broken\ntasks:\n  - {name: a, handler: noop, depends_on: [ghost]}\n")
    result = deploy(code=1)
    assert "broken.yaml" in result.stderr and "ghost" in result.stderr
    engine = make_engine(empty_pg, pool_size=1, max_overflow=0)
    try:
        assert inspect(engine).get_table_names() == []
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_deploy_holds_no_more_connections_than_the_budget_gives_the_job(
        empty_pg: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Terraform budgets db_pool_size + db_max_overflow connections for the job."""
    shutil.copytree(EXAMPLES, tmp_path / "pipelines")
    monkeypatch.setenv("ORCHESTRATOR_DB_POOL_SIZE", "1")
    monkeypatch.setenv("ORCHESTRATOR_DB_MAX_OVERFLOW", "0")
    engines: list[Engine] = []
    real = db_session.make_engine

    def spy(*args: Any, **kwargs: Any) -> Engine:
        engine = real(*args, **kwargs)
        engines.append(engine)
        return engine

    monkeypatch.setattr(db_session, "make_engine", spy)
    deploy()
    assert len(engines) == 1
    pool: Any = engines[0].pool
    assert pool.size() + pool._max_overflow <= 1


def test_deploy_on_sqlite_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(EXAMPLES, tmp_path / "defs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'meta.db'}")
    assert "monthly_profit: synced" in deploy(str(tmp_path / "defs")).stdout
    assert set(pipelines(f"sqlite:///{tmp_path / 'meta.db'}")) == {"monthly_profit"}


def test_a_missing_pipelines_dir_is_a_clear_error(tmp_path: Path) -> None:
    result = deploy(code=1)
    assert "no such folder of pipelines" in result.stderr and "pipelines" in result.stderr
