"""A re-synced pipeline keeps its running batches going: a file still releases the task
of the version its batch started on, and a file for a new batch goes to the current
version (Postgres and SQLite, and the issue's own scenario through the CLI)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.db.models import Batch
from orchestrator.storage_events import StorageObject
from orchestrator.testing import reset_process_caches
from orchestrator.triggers import StorageTriggers, matching_triggers
from tests.conftest import FakeClock
from tests.dags import spec_from_edges, sync
from tests.units import dispatcher


def trigger(pattern: str) -> dict[str, Any]:
    return {"gcs_trigger": {"bucket": "landing", "pattern": pattern}}


def two_roots(expenses_pattern: str, expenses_task: str = "load_expenses") -> Any:
    return spec_from_edges(
        "profit", {"load_sales": [], expenses_task: [], "report": ["load_sales", expenses_task]},
        load_sales=trigger("sales/{batch_id}/_SUCCESS"),
        **{expenses_task: trigger(expenses_pattern)})


def obj(name: str) -> StorageObject:
    return StorageObject(bucket="landing", name=name, generation="1")


def versions(sessions: sessionmaker[Session]) -> dict[str, int]:
    with sessions() as s:
        return dict(s.execute(select(Batch.batch_id, Batch.pipeline_version)).all())  # type: ignore[arg-type]


def test_an_open_batch_of_an_older_version_is_released_by_its_own_trigger(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    reset_process_caches()
    sync(sessions, two_roots("expenses/{batch_id}/_SUCCESS"), clock.now())
    d, published = dispatcher(sessions, clock)
    triggers = StorageTriggers(sessions, d, clock)
    assert triggers.object_finalized(obj("sales/2024-02/_SUCCESS")).outcome == "queued"
    # Version 2 watches another marker, and renames nothing else.
    sync(sessions, two_roots("expenses/{batch_id}/_READY"), clock.now())

    with sessions() as s:
        assert matching_triggers(s, obj("expenses/2024-02/_SUCCESS")) == [
            ("profit", "load_expenses", "2024-02")]
        # Version 1's marker starts no new batch: only the current version may.
        assert matching_triggers(s, obj("expenses/2024-03/_SUCCESS")) == []
        assert matching_triggers(s, obj("expenses/2024-03/_READY")) == [
            ("profit", "load_expenses", "2024-03")]
        # Version 2's marker does not concern a batch that runs version 1.
        assert matching_triggers(s, obj("expenses/2024-02/_READY")) == []
    assert triggers.object_finalized(obj("expenses/2024-02/_SUCCESS")).outcome == "queued"
    assert triggers.object_finalized(obj("sales/2024-03/_SUCCESS")).outcome == "queued"
    assert versions(sessions) == {"2024-02": 1, "2024-03": 2}
    assert sorted(published.tasks()) == [
        ("profit", "2024-02", "load_expenses", 1), ("profit", "2024-02", "load_sales", 1),
        ("profit", "2024-03", "load_sales", 1)]


def test_a_task_renamed_in_the_new_version_still_gets_its_file_in_the_old_batch(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    reset_process_caches()
    sync(sessions, two_roots("expenses/{batch_id}/_SUCCESS"), clock.now())
    d, _ = dispatcher(sessions, clock)
    triggers = StorageTriggers(sessions, d, clock)
    triggers.object_finalized(obj("sales/2024-02/_SUCCESS"))
    sync(sessions, two_roots("expenses/{batch_id}/_SUCCESS", expenses_task="load_costs"),
         clock.now())
    with sessions() as s:
        assert matching_triggers(s, obj("expenses/2024-02/_SUCCESS")) == [
            ("profit", "load_expenses", "2024-02")]
        assert matching_triggers(s, obj("expenses/2024-05/_SUCCESS")) == [
            ("profit", "load_costs", "2024-05")]
    assert triggers.object_finalized(obj("expenses/2024-02/_SUCCESS")).outcome == "queued"


def test_a_late_file_for_a_finished_batch_of_an_older_version_is_a_duplicate(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    reset_process_caches()
    sync(sessions, two_roots("expenses/{batch_id}/_SUCCESS"), clock.now())
    d, _ = dispatcher(sessions, clock)
    triggers = StorageTriggers(sessions, d, clock)
    triggers.object_finalized(obj("sales/2024-02/_SUCCESS"))
    with sessions.begin() as s:
        s.execute(Batch.__table__.update().values(status="SUCCESS"))
    sync(sessions, two_roots("expenses/{batch_id}/_SUCCESS", expenses_task="load_costs"),
         clock.now())
    # Version 1 has no open batch left; the current version's trigger matches, and its
    # release finds nothing waiting in a finished batch.
    with sessions() as s:
        assert matching_triggers(s, obj("expenses/2024-02/_SUCCESS")) == [
            ("profit", "load_costs", "2024-02")]
    assert triggers.object_finalized(obj("expenses/2024-02/_SUCCESS")).outcome in (
        "duplicate", "invalid")
    assert versions(sessions) == {"2024-02": 1}


# -- the scenario as a user met it, through the CLI ------------------------------------------


PIPELINE = """\
    name: profit
    tasks:
      - name: load_sales
        handler: noop
        gcs_trigger: {{bucket: landing, pattern: "sales/{{batch_id}}/_SUCCESS"}}
      - name: load_expenses
        handler: noop
        gcs_trigger: {{bucket: landing, pattern: "expenses/{{batch_id}}/{marker}"}}
      - name: report
        handler: noop
        depends_on: [load_sales, load_expenses]
"""


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def test_after_a_resync_the_running_batch_still_completes_when_its_file_lands(
        folder: Path) -> None:
    yaml = folder / "profit.yaml"
    marker = folder / "_SUCCESS"
    marker.write_text("")
    yaml.write_text(textwrap.dedent(PIPELINE.format(marker="_SUCCESS")))
    assert "version 1" in cli("pipelines", "sync", str(yaml)).stdout
    cli("drop", str(marker), "gs://landing/sales/2024-02/_SUCCESS")
    yaml.write_text(textwrap.dedent(PIPELINE.format(marker="_READY")))
    assert "version 2" in cli("pipelines", "sync", str(yaml)).stdout

    why = cli("why", "2024-02", "load_expenses").stdout
    assert "waiting for its file gs://landing/expenses/2024-02/_SUCCESS" in why
    dropped = cli("drop", str(marker), "gs://landing/expenses/2024-02/_SUCCESS")
    assert "no trigger watches this path" not in dropped.stdout + dropped.stderr
    assert ": queued" in dropped.stderr
    doc = json.loads(cli("status", "2024-02", "--json").stdout)
    assert doc["status"] == "SUCCESS" and doc["counts"] == {"SUCCESS": 3}

    # A new batch runs the current version: its expenses wait for the new marker.
    cli("drop", str(marker), "gs://landing/sales/2024-03/_SUCCESS")
    assert "gs://landing/expenses/2024-03/_READY" in cli("why", "2024-03", "load_expenses").stdout
    assert "no trigger watches this path" in cli(
        "drop", str(marker), "gs://landing/expenses/2024-03/_SUCCESS").stdout
    cli("drop", str(marker), "gs://landing/expenses/2024-03/_READY")
    assert json.loads(cli("status", "2024-03", "--json").stdout)["status"] == "SUCCESS"
