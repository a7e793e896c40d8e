"""Pipeline files as a user writes them, through the `orchestrator` command: broken
or hostile files are refused with one clear line and change nothing."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.errors import PermanentError

BIN = Path(sys.executable).parent / "orchestrator"


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_broken_yaml_is_one_line_naming_the_file_line_and_column(tmp_path):
    path = write(tmp_path / "broken.yaml", """\
        name: orders
        tasks:
          - name: a
            handler: noop
           oops: [1
    """)
    line = error_line(cli("pipelines", "sync", str(path), code=1))
    assert line.startswith(f"error: {path}: line 5, column 4: invalid YAML: ")
    assert "<unicode string>" not in line
    folder = error_line(cli("pipelines", "sync", str(tmp_path), code=1))
    assert "broken.yaml: line 5, column 4: invalid YAML" in folder


@pytest.fixture
def on_postgres(pg_engine: Any, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The CLI on the test's Postgres database (emptied), as a deployment runs it."""
    monkeypatch.setenv("DATABASE_URL", pg_url)
    return pg_url


def stored_pipelines() -> list[str]:
    result = cli("pipelines", "list", "--json")
    return [p["pipeline"] for p in json.loads(result.stdout)]


@pytest.mark.parametrize(("task", "message"), [
    ({"name": "b", "handler": "noop", "depends_on": ["a", "a"]},
     "task 'b': depends_on names 'a' more than once"),
    ({"name": "b", "handler": "noop", "gcs_trigger": {
        "bucket": "landing", "pattern": "x/" * 510 + "{batch_id}/_SUCCESS"}},
     "pattern is 1,039 bytes long; a GCS object name is at most 1,024"),
])
def test_what_the_database_cannot_store_is_refused_by_validation(tmp_path, on_postgres, task,
                                                                  message):
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"name": "p", "tasks": [{"name": "a", "handler": "noop"}, task]}))
    line = error_line(cli("pipelines", "sync", str(path), code=1))
    assert message in line and "cannot use the database" not in line
    assert stored_pipelines() == []


def alias_bomb(levels: int = 9) -> str:
    """Nine lists of nine aliases to the list before: under 600 bytes of YAML that
    stand for 9**9 (387 million) strings."""
    lines = ["name: bomb", "tasks:", "  - name: t", "    handler: noop", "    config:",
             "      a0: &a0 [" + ",".join(['"lol"'] * 9) + "]"]
    lines += [f"      a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]"
              for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_without_expanding_it(tmp_path):
    """The installed command, with its address space capped at 1 GiB: expanding the
    aliases would need many times that, so only a refusal succeeds."""
    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb())
    assert len(path.read_bytes()) < 600

    def cap_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("ORCHESTRATOR_") and k != "DATABASE_URL"}
    done = subprocess.run([str(BIN), "pipelines", "sync", str(path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, preexec_fn=cap_memory, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {path}: line 1, column 1: invalid YAML: its aliases "
                           "expand to 490,329,075 values, more than 100,000 beyond")
    assert stored_pipelines() == []


def test_an_alias_that_contains_itself_is_refused(tmp_path):
    path = write(tmp_path / "loop.yaml", """\
        name: loop
        tasks:
          - name: t
            handler: noop
            config: {x: &x [*x]}
    """)
    line = error_line(cli("pipelines", "sync", str(path), code=1))
    assert "line 5, column 17: invalid YAML: an alias refers to a value that contains it" in line


def test_a_few_shared_aliases_still_load(tmp_path):
    path = write(tmp_path / "shared.yaml", """\
        name: shared
        tasks:
          - {name: a, handler: noop, retry: &retry {max_attempts: 5, initial_delay_s: 1}}
          - {name: b, handler: noop, depends_on: [a], retry: *retry}
    """)
    cli("pipelines", "sync", str(path))
    assert stored_pipelines() == ["shared"]


def test_handler_config_problems_come_in_the_same_pass_as_the_others(tmp_path):
    path = write(tmp_path / "p.yaml", """\
        name: p
        tasks:
          - {name: a, handler: python}
          - {name: b, handler: noop, depends_on: [nosuch]}
          - {name: c, handler: python, config: {callable: "m:f"}, timeout_s: -1}
          - {name: d, handler: python, config: {callable: "not a callable"}}
    """)
    line = error_line(cli("pipelines", "sync", str(path), code=1))
    assert "task 'b': depends on unknown task 'nosuch'" in line
    assert "task 'c' timeout_s: Input should be greater than 0" in line
    assert "task 'a': python: 'callable' is required" in line
    assert "task 'd': python: 'callable' must be 'module:function'" in line


ORDERS = """\
    name: orders
    tasks:
      - {name: extract, handler: noop}
"""
ORDERS_V2 = """\
    name: orders
    tasks:
      - {name: extract, handler: noop}
      - {name: load, handler: noop, depends_on: [extract]}
"""


def versions() -> dict[str, int]:
    return {p["pipeline"]: p["version"] for p in json.loads(
        cli("pipelines", "list", "--json").stdout)}


def test_two_files_of_a_folder_naming_one_pipeline_are_refused_naming_both(tmp_path, on_postgres):
    write(tmp_path / "flows" / "orders.yaml", ORDERS)
    write(tmp_path / "flows" / "orders_copy.yaml", ORDERS_V2)
    line = error_line(cli("pipelines", "sync", str(tmp_path / "flows"), code=1))
    assert ("pipeline 'orders' is defined by more than one file: orders.yaml, orders_copy.yaml"
            in line)
    assert versions() == {}
    line = error_line(cli("deploy", str(tmp_path / "flows"), code=1))
    assert "orders.yaml, orders_copy.yaml" in line
    assert versions() == {}


def test_a_pipeline_synced_from_one_file_is_replaced_from_another_only_when_asked(
        tmp_path, on_postgres):
    first = write(tmp_path / "orders.yaml", ORDERS)
    second = write(tmp_path / "new_orders.yaml", ORDERS_V2)
    cli("pipelines", "sync", str(first))
    line = error_line(cli("pipelines", "sync", str(second), code=1))
    assert ("pipeline 'orders' was synced from orders.yaml, not new_orders.yaml" in line
            and "--replace" in line)
    assert versions() == {"orders": 1}
    cli("pipelines", "sync", str(first))  # its own file again: unchanged
    assert versions() == {"orders": 1}
    assert "orders: synced (version 2)" in cli("pipelines", "sync", "--replace", str(second)).stdout
    assert "synced from new_orders.yaml, not orders.yaml" in error_line(
        cli("pipelines", "sync", str(first), code=1))
    assert versions() == {"orders": 2}


def test_deploy_follows_a_pipeline_to_another_file_of_its_folder(tmp_path, on_postgres):
    write(tmp_path / "flows" / "orders.yaml", ORDERS)
    cli("deploy", str(tmp_path / "flows"))
    (tmp_path / "flows" / "orders.yaml").rename(tmp_path / "flows" / "sales_orders.yaml")
    write(tmp_path / "flows" / "sales_orders.yaml", ORDERS_V2)
    assert "orders: synced (version 2)" in cli("deploy", str(tmp_path / "flows")).stdout
    assert "unchanged (version 2)" in cli("deploy", str(tmp_path / "flows")).stdout


def regions(ctx: Any) -> dict[str, Any]:
    return {"regions": ["north", "south", "east"]}


def per_region(ctx: Any) -> dict[str, Any]:
    if ctx.input["item"] == "south":
        raise PermanentError("no data for south")
    return {"region": ctx.input["item"]}


MAPPED = """\
    name: by_region
    concurrency: 2
    schedule: {cron: "0 6 * * *", timezone: Europe/Paris, batch_id: "{date}"}
    tasks:
      - name: regions
        handler: python
        config: {callable: "tests.test_pipeline_files:regions"}
        gcs_trigger: {bucket: landing, pattern: "regions/{batch_id}/_SUCCESS"}
      - name: per_region
        handler: python
        config: {callable: "tests.test_pipeline_files:per_region"}
        depends_on: [regions]
        concurrency: 3
        retry: {max_attempts: 1}
        map_over: {parent_output: regions.regions, max_instances: 50}
"""


def test_pipelines_show_has_map_over_concurrency_and_the_triggers(tmp_path):
    cli("pipelines", "sync", str(write(tmp_path / "by_region.yaml", MAPPED)))
    shown = cli("pipelines", "show", "by_region").stdout
    assert "by_region  version 1 from by_region.yaml" in shown
    assert ("trigger: schedule 0 6 * * * Europe/Paris (batch id {date}); "
            "file gs://landing/regions/{batch_id}/_SUCCESS (task regions)") in shown
    assert "concurrency: 2 running task(s) per batch" in shown
    row = next(line for line in shown.splitlines() if line.startswith("per_region"))
    assert "regions.regions (max 50)" in row and " 3 " in row
    doc = json.loads(cli("pipelines", "show", "by_region", "--json").stdout)
    assert doc["concurrency"] == 2 and doc["schedule"]["cron"] == "0 6 * * *"
    task = doc["tasks"][1]
    assert task["concurrency"] == 3 and task["map_over"]["parent_output"] == "regions.regions"


def test_why_explains_one_mapped_instance(tmp_path):
    cli("pipelines", "sync", str(write(tmp_path / "by_region.yaml", MAPPED)))
    (tmp_path / "_SUCCESS").write_text("")
    cli("drop", "_SUCCESS", "gs://landing/regions/d1/_SUCCESS", code=3)  # per_region[1] fails
    assert cli("why", "d1", "per_region[0]").stdout.startswith("per_region[0]: succeeded at ")
    failed = cli("why", "d1", "per_region[1]").stdout
    assert failed.startswith("per_region[1]: failed on attempt 1/1 at ")
    assert failed.rstrip().endswith("no data for south")
    assert ("no instance 'per_region[7]' in batch 'd1': per_region has 3 instance(s), "
            "per_region[0] to per_region[2]") in error_line(cli("why", "d1", "per_region[7]",
                                                                 code=1))
    assert "no task 'regions[0]'" in error_line(cli("why", "d1", "regions[0]", code=1))


def test_a_file_no_trigger_watches_is_stored_and_said_so_plainly(tmp_path):
    cli("pipelines", "sync", str(write(tmp_path / "by_region.yaml", MAPPED)))
    (tmp_path / "data.csv").write_text("a,b\n")
    result = cli("drop", "data.csv", "gs://landing/regions/d1/")
    assert result.stdout.strip() == "gs://landing/regions/d1/data.csv: stored; no trigger watches this path"
    assert result.stderr == ""
    assert (tmp_path / ".orchestrator/buckets/landing/regions/d1/data.csv").exists()
