"""The `orchestrator` CLI on the embedded runtime, in a temporary folder, no environment."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.errors import PermanentError
from orchestrator.examples_data import (
    EXPENSES_COLUMNS,
    make_month,
    parquet_bytes,
    write_monthly_files,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "monthly_profit.yaml"
BIN = Path(sys.executable).parent / "orchestrator"


def always_fails(ctx: Any) -> dict[str, Any]:
    raise PermanentError("the report server said no")


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


def status_json(batch_id: str, *extra: str) -> dict[str, Any]:
    return json.loads(cli("status", batch_id, "--json", *extra).stdout)


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def drop_month(folder: Path, batch_id: str, kinds: tuple[str, ...] = ("sales", "expenses"),
               last_code: int = 0) -> None:
    """Drop the month's files, markers last; `last_code` is the last drop's exit code
    (3 when the file it triggers fails)."""
    drops = []
    for kind in kinds:
        src = folder / kind / batch_id
        names = sorted(p.name for p in src.glob("*.parquet"))
        if (src / "_SUCCESS").exists():
            names.append("_SUCCESS")
        drops += [(src / name, f"gs://landing/{kind}/{batch_id}/{name}") for name in names]
    for i, (path, uri) in enumerate(drops):
        cli("drop", str(path), uri, code=last_code if i == len(drops) - 1 else 0)


def profit(home: Path, batch_id: str) -> list[tuple[str, Decimal, Decimal, Decimal]]:
    from orchestrator.adapters.local.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(home / "warehouse.duckdb", default_dataset="analytics")
    try:
        rows = wh.fetch("SELECT region, revenue, expenses, profit FROM analytics.profit "
                        "WHERE month = CAST(CONCAT(@b, '-01') AS DATE) ORDER BY region",
                        {"b": batch_id})
    finally:
        wh.close()
    return [(r["region"], Decimal(str(r["revenue"])), Decimal(str(r["expenses"])),
             Decimal(str(r["profit"]))) for r in rows]


def expected(rows: list[dict[str, Any]]) -> list[tuple[str, Decimal, Decimal, Decimal]]:
    return [(r["region"], r["revenue"], r["expenses"], r["profit"]) for r in rows]


# -- the demo pipeline, through the CLI ---------------------------------------------------


def test_monthly_profit_runs_from_dropped_files_fails_on_a_bad_file_and_recovers(tmp_path):
    home = tmp_path / ".orchestrator"
    assert "monthly_profit: synced (version 1)" in cli("pipelines", "sync", str(EXAMPLE)).stdout

    # A good month: the _SUCCESS markers start the batch and release the loads.
    want = write_monthly_files(tmp_path / "in", "2024-03", seed=11, sales=300, expenses=60)
    drop_month(tmp_path / "in", "2024-03", kinds=("sales",))
    doc = status_json("2024-03")
    assert {t["task"]: t["status"] for t in doc["tasks"]} == {
        "load_sales": "SUCCESS", "load_expenses": "PENDING", "calculate_profit": "PENDING"}
    assert "waiting for its file gs://landing/expenses/2024-03/_SUCCESS" in cli(
        "why", "2024-03", "calculate_profit").stdout
    drop_month(tmp_path / "in", "2024-03", kinds=("expenses",))
    doc = status_json("2024-03")
    assert doc["status"] == "SUCCESS"
    assert [t["task"] for t in doc["tasks"]][-1] == "calculate_profit"
    assert doc["counts"] == {"SUCCESS": 3}
    assert profit(home, "2024-03") == expected(want)
    assert sum(r[3] for r in profit(home, "2024-03")) == sum(
        r["amount"] for r in make_month("2024-03", 11, sales=300, expenses=60)["sales"]) - sum(
        r["amount"] for r in make_month("2024-03", 11, sales=300, expenses=60)["expenses"])

    # A bad month: expenses without `amount`.
    bad = tmp_path / "bad"
    want_april = write_monthly_files(bad, "2024-04", seed=12, sales=300, expenses=60,
                                     files_per_table=1)
    rows = make_month("2024-04", 12, sales=300, expenses=60)["expenses"]
    cols = [c for c in EXPENSES_COLUMNS if c["name"] != "amount"]
    (bad / "expenses" / "2024-04" / "part-000.parquet").write_bytes(
        parquet_bytes([{k: v for k, v in r.items() if k != "amount"} for r in rows], cols))
    drop_month(bad, "2024-04", last_code=3)
    doc = status_json("2024-04")
    by_task = {t["task"]: t for t in doc["tasks"]}
    assert doc["status"] == "FAILED"
    assert by_task["load_expenses"]["status"] == "ERROR"
    assert "amount" in by_task["load_expenses"]["error"]
    assert by_task["calculate_profit"]["status"] == "UPSTREAM_FAILED"
    assert "upstream load_expenses failed with" in cli("why", "2024-04", "calculate_profit").stdout
    assert profit(home, "2024-04") == []

    # The corrected file, then `batch retry`: the failed part reruns and completes.
    write_monthly_files(bad, "2024-04", seed=12, sales=300, expenses=60, files_per_table=1,
                        marker=False)
    cli("drop", str(bad / "expenses/2024-04/part-000.parquet"),
        "gs://landing/expenses/2024-04/part-000.parquet")
    result = cli("batch", "retry", "2024-04")
    assert "1 task(s) queued again" in result.stderr
    doc = status_json("2024-04")
    assert doc["status"] == "SUCCESS"
    by_task = {t["task"]: t for t in doc["tasks"]}
    assert by_task["load_expenses"]["attempt"] == 2
    assert by_task["load_sales"]["attempt"] == 1  # the part that succeeded did not rerun
    assert profit(home, "2024-04") == expected(want_april)

    listing = json.loads(cli("status", "--json").stdout)
    assert listing["schema"] == "orchestrator.recent_batches/v1"
    assert [(b["batch_id"], b["status"]) for b in listing["batches"]] == [
        ("2024-04", "SUCCESS"), ("2024-03", "SUCCESS")]
    table = cli("status", "2024-04").stdout
    assert "monthly_profit 2024-04" in table and "3 SUCCESS" in table
    events = json.loads(cli("events", "2024-04", "--json").stdout)
    assert ("load_expenses", "RUNNING", "ERROR") in [(e["task"], e["from"], e["to"]) for e in events]


# -- commands on small pipelines ----------------------------------------------------------

NOOP = """
name: chain
tasks:
  - name: extract
    handler: noop
  - name: transform
    handler: noop
    depends_on: [extract]
  - name: report
    handler: python
    depends_on: [transform]
    config: {callable: "tests.test_cli:always_fails"}
    retry: {max_attempts: 1}
"""


def test_batch_start_runs_the_batch_and_exits_3_when_it_fails(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "chain.yaml", NOOP)))
    result = cli("batch", "start", "chain", "b1", "--param", "region=north", code=3)
    assert "chain b1" in result.stdout and "FAILED" in result.stdout
    doc = status_json("b1")
    assert doc["params"] == {"region": "north"}
    assert [(t["task"], t["status"]) for t in doc["tasks"]] == [
        ("extract", "SUCCESS"), ("transform", "SUCCESS"), ("report", "ERROR")]
    assert "the report server said no" in doc["tasks"][2]["error"]
    assert "failed on attempt 1/1" in cli("why", "b1", "report").stdout
    # `status --json` prints the document as the database wrote it.
    from orchestrator import queries
    from orchestrator.db.session import make_engine, make_sessionmaker

    engine = make_engine(f"sqlite:///{tmp_path / '.orchestrator' / 'metadata.db'}")
    with make_sessionmaker(engine)() as s:
        assert cli("status", "b1", "--json").stdout == queries.batch_status_json(s, "b1") + "\n"
    engine.dispose()

    # --task reruns that task and its downstream only.
    cli("batch", "retry", "b1", "--task", "transform", code=3)
    doc = status_json("b1")
    attempts = {t["task"]: t["attempt"] for t in doc["tasks"]}
    assert attempts == {"extract": 1, "transform": 2, "report": 2}


def test_batch_cancel_cancels_open_tasks(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "wait.yaml", """
        name: waits
        tasks:
          - name: load
            handler: noop
            gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
          - name: after
            handler: noop
            depends_on: [load]
    """)))
    cli("batch", "start", "waits", "w1")
    assert status_json("w1")["status"] == "RUNNING"
    assert "cancelled 2 open task(s)" in cli("batch", "cancel", "w1").stdout
    doc = status_json("w1")
    assert doc["status"] == "CANCELLED" and doc["counts"] == {"CANCELLED": 2}
    assert "cancelled" in cli("why", "w1", "after").stdout
    cli("status", "w1", "--watch", code=3)  # already finished: returns at once


def test_backfill_starts_one_batch_per_month_and_skips_existing(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "m.yaml", """
        name: monthly
        tasks:
          - {name: a, handler: noop}
          - {name: b, handler: noop, depends_on: [a]}
    """)))
    result = cli("batch", "backfill", "monthly", "--from", "2023-11", "--to", "2024-02", "-c", "2")
    assert "4 batch(es): 4 succeeded" in result.stderr
    listing = json.loads(cli("status", "--json", "--limit", "10").stdout)["batches"]
    assert sorted(b["batch_id"] for b in listing) == ["2023-11", "2023-12", "2024-01", "2024-02"]
    assert {b["status"] for b in listing} == {"SUCCESS"}
    again = cli("batch", "backfill", "monthly", "--ids", "2024-02,2024-03")
    assert "1 already existed" in again.stderr
    assert status_json("2024-03")["status"] == "SUCCESS"


def test_graph_prints_mermaid_and_dot_colored_by_a_batch(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "chain.yaml", NOOP)))
    mermaid = cli("pipelines", "graph", "chain").stdout
    assert mermaid.splitlines()[3] == "flowchart LR"
    assert "t_extract --> t_transform" in mermaid and "t_transform --> t_report" in mermaid
    cli("batch", "start", "chain", "g1", code=3)
    colored = cli("pipelines", "graph", "chain", "--batch", "g1", "--format", "dot").stdout
    assert colored.startswith('digraph "chain g1"')
    assert 't_report [label="report\\nERROR", fillcolor="#fca5a5"' in colored
    assert "t_extract -> t_transform;" in colored
    shown = json.loads(cli("pipelines", "show", "chain", "--json").stdout)
    assert [t["task"] for t in shown["tasks"]] == ["extract", "transform", "report"]
    assert json.loads(cli("pipelines", "list", "--json").stdout)[0]["tasks"] == 3


# -- errors: one line on stderr, a non-zero exit, never a traceback ----------------------


def _one_error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_batch_pipeline_and_task_are_clear_errors(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "chain.yaml", NOOP)))
    assert "no batch 'nope'" in _one_error_line(cli("status", "nope", code=1))
    assert "unknown pipeline 'ghost'" in _one_error_line(cli("batch", "start", "ghost", "b", code=1))
    cli("batch", "start", "chain", "b1", code=3)
    assert "no task 'zzz'" in _one_error_line(cli("why", "b1", "zzz", code=1))
    assert "unknown pipeline 'ghost'" in _one_error_line(cli("status", "b1", "-p", "ghost", code=1))
    assert "unknown task(s)" in _one_error_line(cli("batch", "retry", "b1", "-t", "zzz", code=1))


def test_before_any_sync_the_missing_database_is_explained(tmp_path):
    line = _one_error_line(cli("status", "b1", code=1))
    assert "no metadata database" in line and "pipelines sync" in line


@pytest.mark.parametrize("args, message", [
    (["--from", "2024-13", "--to", "2024-06"], "malformed --from date '2024-13'"),
    (["--from", "2024-06", "--to", "2024-01"], "is before --from"),
    (["--from", "2024-01", "--to", "2024-01-05"], "both be months or both be days"),
    (["--from", "2024-01"], "give a date range"),
])
def test_malformed_date_ranges_are_usage_errors(tmp_path, args, message):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "chain.yaml", NOOP)))
    assert message in _one_error_line(cli("batch", "backfill", "chain", *args, code=2))


def test_malformed_param_is_a_usage_error():
    assert "malformed --param 'oops'" in _one_error_line(
        cli("batch", "start", "chain", "b", "--param", "oops", code=2))


def test_an_invalid_pipeline_file_lists_its_problems_on_one_line(tmp_path):
    path = write_yaml(tmp_path / "cycle.yaml", """
        name: cyclic
        tasks:
          - {name: a, handler: noop, depends_on: [b]}
          - {name: b, handler: noop, depends_on: [a]}
          - {name: c, handler: nosuch}
    """)
    line = _one_error_line(cli("pipelines", "sync", str(path), code=1))
    assert "cycle" in line and "nosuch" in line
    assert "no such file" in _one_error_line(cli("pipelines", "sync", "missing.yaml", code=1))


def test_an_unreachable_database_is_one_line(monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:9/orchestrator")
    for args in (["status", "b1"], ["batch", "start", "chain", "b1"], ["db", "upgrade"]):
        line = _one_error_line(cli(*args, code=1))
        assert "127.0.0.1:9" in line and "refused" in line.lower(), line


def test_the_installed_command_reports_errors_without_a_traceback(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    bad_url = {**env, "DATABASE_URL": "postgresql://postgres@127.0.0.1:9/x"}
    runs = [
        (["status", "b1"], bad_url, 1, "error: cannot use the database"),
        (["status", "--bogus"], env, 2, "error: No such option: --bogus"),
        (["batch", "backfill", "p", "--from", "24-01", "--to", "2024-02"], env, 2,
         "error: malformed --from date"),
        (["batch", "start", "onlyone"], env, 2, "error: Missing argument 'batch_id'"),
    ]
    for args, run_env, code, start in runs:
        p = subprocess.run([str(BIN), *args], cwd=tmp_path, env=run_env, capture_output=True,
                           text=True, timeout=60)
        assert p.returncode == code, (args, p.returncode, p.stderr)
        assert p.stderr.startswith(start), (args, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_every_command_has_help_with_an_example():
    commands = [[], ["db", "upgrade"], ["pipelines", "sync"], ["pipelines", "list"],
                ["pipelines", "show"], ["pipelines", "graph"], ["batch", "start"],
                ["batch", "cancel"], ["batch", "retry"], ["batch", "backfill"], ["status"],
                ["why"], ["events"], ["sweep"], ["dev"], ["drop"], ["db"], ["pipelines"],
                ["batch"]]
    for c in commands:
        text = cli(*c, "--help").stdout
        assert "Example" in text, c


# -- the local runtime: drop, dev, sweep -------------------------------------------------

WAITS = """
name: files
tasks:
  - name: load
    handler: noop
    gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
  - name: after
    handler: noop
    depends_on: [load]
"""


def test_drop_copies_into_the_local_bucket_and_fires_the_trigger(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "files.yaml", WAITS)))
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n")
    result = cli("drop", "data.csv", "gs://landing/in/d1/")
    assert "gs://landing/in/d1/data.csv: stored; no trigger watches this path" in result.stdout
    assert (tmp_path / ".orchestrator/buckets/landing/in/d1/data.csv").read_text() == "a,b\n"
    result = cli("drop", "_SUCCESS", "gs://landing/in/d1/_SUCCESS")
    assert "files d1" in result.stdout and "SUCCESS" in result.stdout
    assert status_json("d1")["status"] == "SUCCESS"
    assert "not a gs:// URI" in _one_error_line(cli("drop", "_SUCCESS", "/tmp/x", code=2))
    assert "no such file" in _one_error_line(cli("drop", "nope", "gs://landing/x", code=1))


def test_dev_watches_the_bucket_folders_and_runs_what_lands(tmp_path):
    write_yaml(tmp_path / "files.yaml", WAITS)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [str(BIN), "dev", "--pipelines", "files.yaml", "--poll", "0.1", "--stop-after", "20"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = []
        while not any("watching" in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
        marker = tmp_path / ".orchestrator/buckets/landing/in/2024-05/_SUCCESS"
        marker.parent.mkdir(parents=True)
        marker.write_text("")
        deadline = time.monotonic() + 15
        # The bus thread may print the batch's end before the main thread prints the drop.
        while not (any("finished" in line for line in lines)
                   and any("→" in line for line in lines)):
            assert time.monotonic() < deadline, lines
            lines.append(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)
    text = "".join(lines)
    assert "gs://landing/in/2024-05/_SUCCESS → files/2024-05: queued" in text
    assert "batch files/2024-05 finished: SUCCESS" in text
    assert status_json("2024-05")["counts"] == {"SUCCESS": 2}


@pytest.mark.postgres
def test_dev_runs_the_tasks_in_worker_processes_on_postgres(tmp_path, pg_engine, pg_url):
    """`dev --processes 2` on PostgreSQL: the landed file's batch runs in two worker
    processes (not the dev process), whose end the console reports."""
    write_yaml(tmp_path / "files.yaml", WAITS)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "DATABASE_URL": pg_url}
    proc = subprocess.Popen(
        [str(BIN), "dev", "--pipelines", "files.yaml", "--poll", "0.1", "--stop-after", "30",
         "--processes", "2"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        assert proc.stdout is not None
        lines = []
        while not any("watching" in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            lines.append(line)
        marker = tmp_path / ".orchestrator/buckets/landing/in/2024-06/_SUCCESS"
        marker.parent.mkdir(parents=True)
        marker.write_text("")
        deadline = time.monotonic() + 20
        while not any("finished" in line for line in lines):
            assert time.monotonic() < deadline, lines
            lines.append(proc.stdout.readline())
    finally:
        proc.terminate()
        proc.wait(10)
        # Whatever is left of its process group (tests/test_dev_workers.py asserts that
        # nothing is) goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert "batch files/2024-06 finished: SUCCESS" in "".join(lines)
    with pg_engine.connect() as conn:
        workers = conn.execute(text(
            "SELECT DISTINCT a.worker FROM task_attempts a JOIN batches b ON b.id = a.batch_pk"
            " WHERE b.batch_id = '2024-06'")).scalars().all()
    # Who ran each attempt is host:pid: never the dev process itself.
    assert workers and all(not w.endswith(f":{proc.pid}") for w in workers), workers


def test_sweep_reports_what_it_did(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "files.yaml", WAITS)))
    assert cli("sweep").stdout.startswith("requeued 0, redispatched 0, expired 0")
