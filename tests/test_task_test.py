"""`orchestrator task test` runs one task's handler here with no database, and the
pytest helpers (`orchestrator.testing.task_context`, `run_task`) build the same
context for a unit test of a `python` task."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.errors import InvalidInput
from orchestrator.testing import run_task, task_context

PIPELINE = """\
    name: orders
    tasks:
      - name: load
        handler: python
        config: {callable: "order_tasks:load"}
      - name: enrich
        handler: python
        depends_on: [load]
        config: {callable: "order_tasks:enrich", kwargs: {factor: 10}}
      - name: land
        handler: python
        gcs_trigger: {bucket: landing, pattern: "orders/{batch_id}/_SUCCESS"}
        config: {callable: "order_tasks:land"}
"""
TASKS = """\
    def load(ctx):
        raise RuntimeError(f"cannot load {ctx.params['region']}")


    def enrich(ctx, factor):
        print("enriching", ctx.parents["load"]["rows"], "rows")
        ctx.log.info("region %s", ctx.params.get("region"))
        return {"rows": ctx.parents["load"]["rows"] * factor, "batch": ctx.batch_id}


    def land(ctx):
        return {"uri": ctx.trigger["uri"]}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Each test has its own copy of the module: forget the last test's, and this
    # test's when it ends (a later test's `reload_changed` would find it otherwise).
    monkeypatch.delitem(sys.modules, "order_tasks", raising=False)
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "orders.yaml").write_text(textwrap.dedent(PIPELINE))
    (tmp_path / "pipelines" / "order_tasks.py").write_text(textwrap.dedent(TASKS))
    yield tmp_path
    sys.modules.pop("order_tasks", None)


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def test_task_test_runs_the_handler_here_and_prints_its_output(project: Path) -> None:
    result = cli("task", "test", "orders", "enrich", "--param", "region=north",
                 "--parent", 'load={"rows": 4}')
    assert json.loads(result.stdout) == {"rows": 40, "batch": "test"}
    assert "stdout  enriching 4 rows" in result.stderr and "INFO    region north" in result.stderr
    # No metadata database was needed, or made.
    assert not (project / ".orchestrator" / "metadata.db").exists()
    # A YAML path works as well as a name from the pipelines folder.
    result = cli("task", "test", "pipelines/orders.yaml", "land", "--trigger",
                 "gs://landing/orders/b7/_SUCCESS", "--batch-id", "b7")
    assert json.loads(result.stdout) == {"uri": "gs://landing/orders/b7/_SUCCESS"}


def test_task_test_prints_the_traceback_of_a_failure(project: Path) -> None:
    result = cli("task", "test", "orders", "load", "--param", "region=south", code=1)
    assert result.stdout == ""
    assert 'order_tasks.py", line 2, in load' in result.stderr
    # The traceback starts in the user's own code: the orchestrator's frames above it
    # (the python handler calling the function) say nothing about the task.
    frames = [line for line in result.stderr.splitlines() if line.lstrip().startswith("File ")]
    assert frames and all("order_tasks.py" in f for f in frames), frames
    assert result.stderr.rstrip().endswith(
        "error: RuntimeError: cannot load south (at "
        f"{(project / 'pipelines' / 'order_tasks.py').resolve()}:2 in load)")


@pytest.mark.parametrize(("args", "message"), [
    (("orders", "nope"), "no task 'nope' (its tasks: load, enrich, land)"),
    (("orders", "enrich", "--parent", "lod={}"), "no parent 'lod' (its parents: load)"),
    (("orders", "enrich", "--parent", "load={rows"), "--parent load: not JSON"),
    (("nosuch", "load"), "no pipeline 'nosuch' in pipelines"),
])
def test_task_test_rejects_bad_input_in_one_line(project: Path, args: tuple[str, ...],
                                                 message: str) -> None:
    result = CliRunner().invoke(app, ["task", "test", *args])
    assert result.exit_code in (1, 2) and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- the pytest helpers, as a user's unit test would use them ---------------------------------


def test_task_context_builds_what_a_worker_would_give_the_function(project: Path) -> None:
    import order_tasks  # importable: the helper put the pipelines folder on the path

    ctx = task_context("orders", "enrich", params={"region": "west"},
                       parents={"load": {"rows": 2}}, batch_id="2024-03")
    assert ctx.config["kwargs"] == {"factor": 10}
    assert ctx.input["parent_status"] == {"load": "SUCCESS"}
    assert order_tasks.enrich(ctx, **ctx.config["kwargs"]) == {"rows": 20, "batch": "2024-03"}
    with pytest.raises(InvalidInput, match="no parent 'loaf'"):
        task_context("orders", "enrich", parents={"loaf": {}})


def test_run_task_returns_output_error_traceback_and_lines(project: Path) -> None:
    ok = run_task("pipelines/orders.yaml", "enrich", params={"region": "east"},
                  parents={"load": {"rows": 1}})
    assert ok.ok and ok.output == {"rows": 10, "batch": "test"}
    assert ok.text == "enriching 1 rows\nregion east"
    failed = run_task("orders", "load", params={"region": "north"})
    assert not failed.ok and failed.output is None
    assert failed.error is not None and failed.error.startswith("RuntimeError: cannot load north")
    assert failed.traceback is not None and "in load" in failed.traceback


def test_the_readme_examples_of_a_python_task_and_its_unit_test_pass(tmp_path: Path) -> None:
    """The module and the unit test the README shows, as a user would copy them."""
    import re
    import subprocess

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", readme, re.S)
    module = next(code for lang, code in blocks
                  if lang == "python" and code.startswith("# pipelines/mytasks.py"))
    task = next(code for lang, code in blocks if lang == "yaml" and "mytasks:enrich" in code)
    test = next(code for lang, code in blocks
                if lang == "python" and "from orchestrator.testing import" in code)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "mytasks.py").write_text(module)
    (tmp_path / "pipelines" / "orders.yaml").write_text(
        "name: orders\ntasks:\n  - name: load\n    handler: noop\n" + task)
    (tmp_path / "test_mytasks.py").write_text(test)
    (tmp_path / "pyproject.toml").write_text('[tool.pytest.ini_options]\npythonpath = ["pipelines"]\n')
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
                          cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
