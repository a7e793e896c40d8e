"""A task's output as JSON (`orchestrator output`), and SQL on the embedded warehouse
(`orchestrator sql`), through the CLI."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.app import app

PIPELINE = """\
    name: numbers
    tasks:
      - name: make
        handler: bigquery_query
        config:
          sql: "SELECT n, n * n AS square FROM UNNEST([1, 2, 3]) AS n"
          destination: analytics.squares
      - name: count
        handler: python
        depends_on: [make]
        config: {callable: "numbers_tasks:count"}
      - name: fail
        handler: python
        config: {callable: "numbers_tasks:fail"}
        retry: {max_attempts: 1}
"""
TASKS = """\
    def count(ctx):
        return {"job": ctx.parents["make"]["job_id"], "rows": 3, "nested": {"ok": True}}


    def fail(ctx):
        raise RuntimeError("no")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Each test has its own copy of the module: forget the last test's.
    monkeypatch.delitem(sys.modules, "numbers_tasks", raising=False)
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "numbers.yaml").write_text(textwrap.dedent(PIPELINE))
    (tmp_path / "pipelines" / "numbers_tasks.py").write_text(textwrap.dedent(TASKS))
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def test_output_prints_what_the_children_receive_and_sql_reads_the_warehouse(
        project: Path) -> None:
    cli("pipelines", "sync")
    cli("batch", "start", "numbers", "n1", code=3)  # `fail` fails; the rest succeeds
    status = json.loads(cli("status", "n1", "--json").stdout)
    outputs = {t["task"]: t["output"] for t in status["tasks"]}

    count = json.loads(cli("output", "n1", "count").stdout)
    assert count == outputs["count"] and count["rows"] == 3 and count["nested"] == {"ok": True}
    assert json.loads(cli("output", "n1", "make").stdout)["destination"] == "analytics.squares"
    err = cli("output", "n1", "fail", code=1).stderr
    assert err.startswith("error: fail has no output: it is ERROR") and "RuntimeError: no" in err
    assert "no task 'nope'" in cli("output", "n1", "nope", code=1).stderr

    # BigQuery SQL, as a pipeline would write it; parameters as @name.
    query = "SELECT n, square FROM analytics.squares WHERE n >= @least ORDER BY n"
    rows = json.loads(cli("sql", query, "--param", "least=2", "--format", "json").stdout)
    assert rows == [{"n": 2, "square": 4}, {"n": 3, "square": 9}]
    table = cli("sql", "SELECT SUM(square) AS total FROM analytics.squares")
    assert "total" in table.stdout and "14" in table.stdout and "(1 row)" in table.stderr
    text = cli("sql", query, "--param", "least=1", "--format", "csv").stdout
    assert list(csv.reader(io.StringIO(text))) == [["n", "square"], ["1", "1"], ["2", "4"],
                                                   ["3", "9"]]
    assert "local warehouse" in cli("sql", "SELECT * FROM analytics.nope", code=1).stderr


def test_sql_explains_what_it_needs(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "no warehouse at" in cli("sql", "SELECT 1", code=2).stderr
    monkeypatch.setenv("ORCHESTRATOR_WAREHOUSE", "bigquery")
    assert "bq query" in cli("sql", "SELECT 1", code=2).stderr
