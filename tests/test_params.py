"""Typed batch params: a pipeline declares them; `batch start --param`, the start
message through `route`, file triggers and schedules all convert them, fill in the
defaults, and refuse a missing or malformed one with one clear line that starts
nothing. A pipeline without a declaration takes any params, as given."""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.cli.app import app
from orchestrator.db.models import Batch
from orchestrator.db.session import transaction
from orchestrator.errors import PipelineValidationError
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.sync import sync_pipeline
from orchestrator.router import Router
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    RecordingPublisher,
    function_client,
    pubsub_request,
    reset_process_caches,
    storage_request,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.postgres

SALES = {
    "name": "sales",
    "params": {
        "region": {"type": "string", "required": True},
        "day": {"type": "date", "default": "2024-03-01"},
        "limit": {"type": "int", "default": 100},
        "ratio": "float",
        "dry_run": {"type": "bool", "default": False},
        "regions": {"type": "list", "default": ["north", "south"]},
    },
    "tasks": [{"name": "load", "handler": "noop"}],
}


def batch_params(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {b: p for b, p in conn.execute(select(Batch.batch_id, Batch.params))}


# -- the command line ------------------------------------------------------------------


@pytest.fixture
def on_postgres(pg_engine: Engine, pg_url: str, tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Engine:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    monkeypatch.chdir(tmp_path)
    return pg_engine


def cli(*args: str, code: int = 0) -> Any:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def sync_yaml(tmp_path: Path, text: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    cli("pipelines", "sync", str(path))


SALES_YAML = """\
    name: sales
    params:
      region: {type: string, required: true}
      day: {type: date, default: 2024-03-01}
      limit: {type: int, default: 100}
      ratio: float
      dry_run: {type: bool, default: false}
      regions: {type: list, default: [north, south]}
    tasks:
      - {name: load, handler: noop}
"""


def test_batch_start_converts_declared_params_and_fills_in_defaults(tmp_path, on_postgres):
    sync_yaml(tmp_path, SALES_YAML)
    cli("batch", "start", "sales", "b1", "--param", "region=eu", "--param", "limit=7",
        "--param", "ratio=0.5", "--param", "dry_run=yes", "--param", "regions=a, b")
    cli("batch", "start", "sales", "b2", "--param", "region=us")
    assert batch_params(on_postgres) == {
        "b1": {"region": "eu", "day": "2024-03-01", "limit": 7, "ratio": 0.5, "dry_run": True,
               "regions": ["a", "b"]},
        "b2": {"region": "us", "day": "2024-03-01", "limit": 100, "dry_run": False,
               "regions": ["north", "south"]},
    }


@pytest.mark.parametrize(("params", "says"), [
    ([], "missing required param 'region' (string)"),
    (["region=eu", "limit=ten"], "param 'limit': 'ten' is not an int"),
    (["region=eu", "day=2024-02-30"], "param 'day': '2024-02-30' is not a date (YYYY-MM-DD)"),
    (["region=eu", "dry_run=maybe"], "param 'dry_run': 'maybe' is not a bool"),
    (["region=eu", "ratio=nan"], "param 'ratio': 'nan' is not a float"),
    (["region=eu", "zone=x"], "unknown param 'zone' (declared: day, dry_run, limit, ratio, "
                              "region, regions)"),
])
def test_a_missing_or_malformed_param_is_one_error_and_starts_nothing(
        tmp_path, on_postgres, params, says):
    sync_yaml(tmp_path, SALES_YAML)
    args = [a for p in params for a in ("--param", p)]
    result = cli("batch", "start", "sales", "b1", *args, code=1)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: invalid params for pipeline 'sales': ") and says in lines[0]
    assert batch_params(on_postgres) == {}


def test_every_problem_of_the_params_is_in_the_one_line(tmp_path, on_postgres):
    sync_yaml(tmp_path, SALES_YAML)
    result = cli("batch", "start", "sales", "b1", "--param", "limit=x", "--param", "zone=1",
                 code=1)
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "unknown param 'zone'" in line and "'x' is not an int" in line
    assert "missing required param 'region'" in line


def test_a_pipeline_without_a_declaration_takes_any_params_as_given(tmp_path, on_postgres):
    sync_yaml(tmp_path, """\
        name: plain
        tasks: [{name: a, handler: noop}]
    """)
    cli("batch", "start", "plain", "b1", "--param", "limit=7", "--param", "anything=x")
    assert batch_params(on_postgres) == {"b1": {"limit": "7", "anything": "x"}}


@pytest.mark.parametrize(("params", "says"), [
    ({"n": "integer"}, "params.n.type: Input should be 'string', 'int', 'float', 'bool', "
                       "'date' or 'list'"),
    ({"n": {"type": "int", "default": "ten"}}, "params.n: Value error, 'ten' is not an int"),
    ({"n": {"type": "int", "default": 1, "required": True}},
     "a required param has no default"),
    ({"bad name": "int"}, "invalid param name 'bad name'"),
])
def test_a_malformed_declaration_is_refused_at_sync(params, says):
    with pytest.raises(PipelineValidationError) as info:
        build_pipeline({"name": "p", "params": params, "tasks": [{"name": "a", "handler": "noop"}]})
    assert any(says in p for p in info.value.problems), info.value.problems


# -- the start message, file triggers -------------------------------------------------------


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str, clock: FakeClock) -> Iterator[Runtime]:
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher(), clock=clock)
    runtime.sync_specs([build_pipeline(SALES), build_pipeline({
        **SALES, "name": "files", "params": {**SALES["params"], "region": {"default": "eu"}},
        "tasks": [{"name": "load", "handler": "noop", "gcs_trigger": {
            "bucket": "landing", "pattern": "files/{batch_id}/_SUCCESS"}}]}), build_pipeline({
        **SALES, "name": "by_hand", "tasks": [{"name": "load", "handler": "noop", "gcs_trigger": {
            "bucket": "landing", "pattern": "by_hand/{batch_id}/_SUCCESS"}}]})])
    with bootstrap.use(runtime):
        yield runtime


def post(target: str, req: tuple[dict[str, str], bytes]) -> Any:
    headers, body = req
    return function_client(target).post("/", headers=headers, data=body)


def test_a_start_message_gets_its_params_converted(rt, pg_engine):
    message = {"type": "start_batch", "pipeline": "sales", "batch_id": "m1",
               "params": {"region": "eu", "limit": "7", "day": "2024-04-01", "ratio": 2}}
    assert post("route", pubsub_request(message)).status_code == 200
    assert batch_params(pg_engine)["m1"] == {
        "region": "eu", "day": "2024-04-01", "limit": 7, "ratio": 2.0, "dry_run": False,
        "regions": ["north", "south"]}


def test_a_start_message_with_bad_params_is_acknowledged_logged_and_starts_nothing(
        rt, pg_engine, caplog):
    message = {"type": "start_batch", "pipeline": "sales", "batch_id": "m1",
               "params": {"limit": 7.5, "dry_run": "perhaps"}}
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        response = post("route", pubsub_request(message))
    assert 200 <= response.status_code < 300  # acknowledged: a redelivery cannot help
    lines = [r.getMessage() for r in caplog.records if r.name == "orchestrator"]
    assert any("invalid params for pipeline 'sales': param 'limit': 7.5 is not an int; "
               "missing required param 'region' (string); param 'dry_run': 'perhaps' is not "
               "a bool (true or false)" in line for line in lines), lines
    assert batch_params(pg_engine) == {}
    assert rt.publisher.messages == []


def test_a_file_starts_its_batch_with_the_defaults_or_is_refused_without_them(rt, pg_engine,
                                                                               caplog):
    assert post("on_object_finalized",
                storage_request("landing", "files/d1/_SUCCESS")).status_code == 200
    assert batch_params(pg_engine)["d1"]["region"] == "eu"
    # `by_hand` needs a region that no file carries: its batch is started by hand first.
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        post("on_object_finalized", storage_request("landing", "by_hand/d1/_SUCCESS"))
    assert any("missing required param 'region'" in r.getMessage() for r in caplog.records)
    assert set(batch_params(pg_engine)) == {"d1"}
    rt.start_batch("by_hand", "d2", {"region": "us"})
    post("on_object_finalized", storage_request("landing", "by_hand/d2/_SUCCESS"))
    assert ("by_hand", "d2", "load", 1) in rt.publisher.tasks()  # the file released it


# -- schedules ------------------------------------------------------------------------------


def scheduled(params: dict[str, Any]) -> dict[str, Any]:
    return {**SALES, "schedule": {"cron": "0 6 * * *", "timezone": "UTC", "batch_id": "{date}",
                                  "params": params}}


def test_schedule_params_are_checked_at_sync_and_converted_at_the_tick(
        pg_sessions, clock: FakeClock, pg_engine):
    with pytest.raises(PipelineValidationError) as info:
        build_pipeline(scheduled({"limit": "ten"}))
    assert info.value.problems == [
        "schedule.params: missing required param 'region' (string)",
        "schedule.params: param 'limit': 'ten' is not an int"]
    reset_process_caches()
    router = Router(pg_sessions, RecordingPublisher(), clock=clock)
    clock.t = datetime(2024, 3, 1, 5, 30, tzinfo=UTC)
    transaction(pg_sessions, lambda s: sync_pipeline(
        s, build_pipeline(scheduled({"region": "eu", "limit": "5", "dry_run": "true"})),
        clock.now()))
    clock.t = datetime(2024, 3, 1, 6, 0, 1, tzinfo=UTC)
    assert router.sweep().scheduled == 1
    assert batch_params(pg_engine) == {"2024-03-01": {
        "region": "eu", "day": "2024-03-01", "limit": 5, "dry_run": True,
        "regions": ["north", "south"]}}
