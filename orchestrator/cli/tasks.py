"""Commands about one task: its attempts' logs and tracebacks, its output, a run of
its handler here (`task test`), and SQL on the embedded warehouse.

Task text (what a task printed, its tracebacks, query results) is printed as
plain text, never through rich markup, so a `[bold]` in a user's line stays as is.
"""

from __future__ import annotations

import csv
import json
import sys
import time
import urllib.parse
from typing import Annotated, Any

import typer

from orchestrator import queries
from orchestrator.capture import TASK_LOGGER
from orchestrator.cli.ops import parse_params
from orchestrator.cli.wiring import UsageProblem, fail, handle_errors, read_session, settings
from orchestrator.errors import NotFound

PipelineOpt = Annotated[str | None, typer.Option(
    "--pipeline", "-p", help="The pipeline, when the batch id exists in several.")]
TERMINAL = {"SUCCESS", "ERROR", "UPSTREAM_FAILED", "SKIPPED", "CANCELLED"}

task_app = typer.Typer(
    help="One task on its own.\n\nExample: [bold]orchestrator task test monthly_profit "
         "calculate_profit --param region=north[/bold]",
    no_args_is_help=True, context_settings={"help_option_names": ["-h", "--help"]})


def _echo(text: str = "", *, err: bool = False) -> None:
    typer.echo(text, err=err)


# -- logs ------------------------------------------------------------------------------------


def logs_filter(pipeline: str, batch_id: str, task: str, attempt: int | None) -> str:
    """The Cloud Logging filter for the lines one task (one attempt) logged."""
    parts = [f'labels.pipeline="{pipeline}"', f'labels.batch_id="{batch_id}"',
             f'labels.task="{task}"']
    if attempt is not None:
        parts.append(f'labels.attempt="{attempt}"')
    return " AND ".join(parts)


def logs_explorer_url(project: str, query: str) -> str:
    return ("https://console.cloud.google.com/logs/query;query="
            f"{urllib.parse.quote(query, safe='')}?project={urllib.parse.quote(project)}")


def _clock(iso: str | None) -> str:
    return iso[11:23] if iso and len(iso) >= 23 else (iso or "")


def _entry_text(e: dict[str, Any]) -> str:
    kind = e.get("level") or e.get("stream") or ""
    # `ctx.log` needs no name; a module's own logger does.
    logger = e.get("logger") or ""
    who = f"{logger}: " if logger and not logger.startswith(TASK_LOGGER) else ""
    lines = str(e.get("line", "")).split("\n")
    head = f"{_clock(e.get('at'))}  {kind:<7} {who}{lines[0]}"
    return "\n".join([head, *(f"{'':22}{rest}" for rest in lines[1:])])


def _attempt_head(a: dict[str, Any], max_attempts: int) -> str:
    took = f" · {a['duration_s']:.1f} s" if a.get("duration_s") is not None else ""
    worker = f" · worker {a['worker']}" if a.get("worker") else ""
    return (f"── attempt {a['attempt']}/{max_attempts} · {a['outcome']} · started "
            f"{_clock(a['started_at'])}{took}{worker}")


def _attempt_tail(a: dict[str, Any]) -> list[str]:
    out = []
    if a.get("error"):
        out.append(f"error: {a['error']}")
    if a.get("traceback"):
        out.append(a["traceback"].rstrip("\n"))
    return out


def _print_attempts(doc: dict[str, Any]) -> None:
    if not doc["attempts"]:
        _echo(f"{doc['task']}: no attempt has run yet (it is {doc['status']})", err=True)
        return
    for i, a in enumerate(doc["attempts"]):
        if i:
            _echo()
        _echo(_attempt_head(a, doc["max_attempts"]))
        for e in a["log"]:
            _echo(_entry_text(e))
        for line in _attempt_tail(a):
            _echo(line)


def _follow(batch_id: str, task: str, pipeline: str | None, attempt: int | None,
            interval: float) -> None:
    """Print lines as the task's attempts log them, until the task is done."""
    printed: dict[int, tuple[int, dict[str, Any] | None]] = {}  # attempt -> (count, last)
    closed: set[int] = set()
    waiting_said = False
    while True:
        with read_session() as s:
            doc = queries.task_attempts(s, batch_id, task, pipeline, attempt)
        for a in doc["attempts"]:
            n = a["attempt"]
            if n in closed:
                continue
            if n not in printed:
                if printed:
                    _echo()
                _echo(_attempt_head({**a, "outcome": "RUNNING", "duration_s": None},
                                    doc["max_attempts"]))
                printed[n] = (0, None)
            count, last = printed[n]
            entries = a["log"]
            start = count
            if last is not None and (count > len(entries) or entries[count - 1] != last):
                # The bounded log moved on: find the last line shown, or say what was cut.
                found = [i for i, e in enumerate(entries) if e == last]
                start = found[-1] + 1 if found else len(entries) - 1
            for e in entries[start:]:
                _echo(_entry_text(e))
            printed[n] = (len(entries), entries[-1] if entries else None)
            if a["outcome"] != "RUNNING":
                closed.add(n)
                _echo(f"── attempt {n} ended: {a['outcome']}"
                      + (f" after {a['duration_s']:.1f} s" if a.get("duration_s") else ""))
                for line in _attempt_tail(a):
                    _echo(line)
        done = doc["status"] in TERMINAL and all(
            a["outcome"] != "RUNNING" for a in doc["attempts"])
        if done or (attempt is not None and attempt in closed):
            return
        if not doc["attempts"] and not waiting_said:
            _echo(f"{task} is {doc['status']}: waiting for its first attempt…", err=True)
            waiting_said = True
        time.sleep(interval)


@handle_errors
def logs_command(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    task: Annotated[str, typer.Argument(help="The task (a mapped instance: name[3]).")],
    pipeline: PipelineOpt = None,
    attempt: Annotated[int | None, typer.Option(
        "--attempt", "-a", min=1, help="Only this attempt.")] = None,
    follow: Annotated[bool, typer.Option(
        "--follow", "-f", help="Keep printing lines as they are logged, until the task "
                               "is done.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="The attempts as JSON (schema orchestrator.task_attempts/v1).")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls with --follow.")] = 1.0,
) -> None:
    """What a task printed and logged, attempt by attempt, with each failure's traceback.

    Lines of a running task are saved every few seconds (and when it ends), so
    --follow trails it by that much. In the cloud the same lines are in Cloud Logging,
    labelled with the pipeline, batch, task and attempt: the command prints the
    Logs Explorer filter for them.

    Example: [bold]orchestrator logs 2024-03 load_sales --attempt 2[/bold]
    """
    if follow and json_out:
        raise UsageProblem("--follow prints lines as they come; it cannot be combined with --json")
    with read_session() as s:
        doc = queries.task_attempts(s, batch_id, task, pipeline, attempt)
    project = settings().gcp_project
    if project and not json_out:
        query = logs_filter(doc["pipeline"], doc["batch_id"], doc["task"], attempt)
        _echo(f"Cloud Logging: {query}", err=True)
        _echo(f"  {logs_explorer_url(project, query)}", err=True)
    if json_out:
        _echo(json.dumps(doc, indent=2, default=str))
        return
    if attempt is not None and not doc["attempts"] and not follow:
        raise NotFound(f"{task} has no attempt {attempt} that ran (it is on attempt "
                       f"{doc['attempt']}, {doc['status']})")
    if follow:
        _follow(batch_id, task, pipeline, attempt, interval)
    else:
        _print_attempts(doc)


# -- output ----------------------------------------------------------------------------------


@handle_errors
def output_command(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    task: Annotated[str, typer.Argument(help="The task (a mapped instance: name[3]).")],
    pipeline: PipelineOpt = None,
) -> None:
    """A task's output as JSON: what its children receive from it.

    Exit code 1 if the task has not succeeded.

    Example: [bold]orchestrator output 2024-03 load_sales | jq .rows_loaded[/bold]
    """
    with read_session() as s:
        doc = queries.task_output(s, batch_id, task, pipeline)
    if doc["status"] != "SUCCESS":
        why = f": {doc['error'].splitlines()[0]}" if doc.get("error") else ""
        fail(f"{task} has no output: it is {doc['status']} (attempt {doc['attempt']}){why}")
    _echo(json.dumps(doc["output"], indent=2, default=str))


# -- sql -------------------------------------------------------------------------------------


@handle_errors
def sql_command(
    query: Annotated[str, typer.Argument(help="One BigQuery SQL statement (as in a pipeline).")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A query parameter @key, key=value; repeatable.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, json or csv.")] = "table",
) -> None:
    """Query the embedded warehouse (DuckDB) with the BigQuery SQL your pipelines use.

    Example: [bold]orchestrator sql "SELECT region, profit FROM analytics.profit ORDER BY region"[/bold]
    """
    from orchestrator.adapters.local.warehouse import DuckDBWarehouse

    if fmt not in ("table", "json", "csv"):
        raise UsageProblem(f"unknown --format {fmt!r}: use table, json or csv")
    s = settings()
    if s.warehouse == "bigquery":
        raise UsageProblem("`sql` queries the embedded warehouse; this configuration uses "
                           "BigQuery: run `bq query --use_legacy_sql=false` instead")
    path = s.home / "warehouse.duckdb"
    if not path.exists():
        raise UsageProblem(f"no warehouse at {path} yet: run a pipeline first "
                           "(or set ORCHESTRATOR_HOME)")
    wh = DuckDBWarehouse(path, default_dataset=s.bq_dataset or "analytics", read_only=True)
    try:
        rows = wh.fetch(query, parse_params(param))
    except Exception as exc:
        if "lock" in str(exc).lower():
            raise UsageProblem(f"the warehouse {path} is open in another process (is "
                               "`orchestrator dev` running?): stop it, or query it there"
                               ) from exc
        raise
    finally:
        wh.close()
    if fmt == "json":
        _echo(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        if rows:
            w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        _print_table(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    if not rows:
        _echo("(no rows)", err=True)
        return
    table = Table(show_edge=False, header_style="bold", pad_edge=False)
    for name in rows[0]:
        table.add_column(name)
    for r in rows:
        table.add_row(*(Text("" if v is None else str(v)) for v in r.values()))
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)
    _echo(f"({len(rows)} row{'s' if len(rows) != 1 else ''})", err=True)


# -- task test -------------------------------------------------------------------------------


def _parents(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise UsageProblem(f"malformed --parent {item!r}: use NAME=JSON, e.g. "
                               "load='{\"rows\": 3}'")
        try:
            out[name.strip()] = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise UsageProblem(f"--parent {name.strip()}: not JSON ({exc.msg} at column "
                               f"{exc.colno})") from exc
    return out


@handle_errors
def task_test(
    pipeline: Annotated[str, typer.Argument(
        help="A pipeline YAML file, or a pipeline's name in the pipelines folder "
             "(ORCHESTRATOR_PIPELINES_DIR).")],
    task: Annotated[str, typer.Argument(help="The task to run.")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A batch parameter, key=value; repeatable.")] = None,
    parent: Annotated[list[str] | None, typer.Option(
        "--parent", help="A parent's output, NAME=JSON; repeatable.")] = None,
    trigger: Annotated[str | None, typer.Option(
        "--trigger", help="The object that triggered it, gs://bucket/path.")] = None,
    item: Annotated[str | None, typer.Option(
        "--item", help="For a mapped task: its item, as JSON.")] = None,
    batch_id: Annotated[str, typer.Option("--batch-id", help="The batch id it sees.")] = "test",
) -> None:
    """Run one task's handler here, now, with no metadata database: its lines go to
    stderr, its output (JSON) to stdout; on failure, its traceback, and exit code 1.

    The warehouse and buckets are the embedded ones (ORCHESTRATOR_HOME), as for
    every local run.

    Example: [bold]orchestrator task test pipelines/orders.yaml enrich --param region=north --parent load='{"rows": 3}'[/bold]
    """
    from orchestrator.capture import real_stream
    from orchestrator.tasktest import run_task

    try:
        item_value = json.loads(item) if item is not None else None
    except json.JSONDecodeError as exc:
        raise UsageProblem(f"--item: not JSON ({exc.msg} at column {exc.colno})") from exc
    stderr = real_stream(sys.stderr)

    def echo(entry: dict[str, Any]) -> None:
        stderr.write(_entry_text(entry) + "\n")
        stderr.flush()

    result = run_task(pipeline, task, params=parse_params(param), parents=_parents(parent),
                      trigger=trigger, item=item_value,
                      map_index=0 if item is not None else None, batch_id=batch_id,
                      settings=settings(), echo=echo)
    if result.ok:
        _echo(json.dumps(result.output, indent=2, default=str))
        _echo(f"{task}: succeeded in {result.duration_s:.2f} s", err=True)
        return
    if result.traceback:
        _echo(result.traceback.rstrip("\n"), err=True)
    _echo(f"error: {result.error}", err=True)
    raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("logs")(logs_command)
    app.command("output")(output_command)
    app.command("sql")(sql_command)
    task_app.command("test")(task_test)
    app.add_typer(task_app, name="task")
