"""The `orchestrator` command line.

With no configuration it runs the embedded runtime: a SQLite file, the in-process
bus, local buckets and a DuckDB warehouse under `.orchestrator/` (ORCHESTRATOR_HOME).
DATABASE_URL switches the metadata store to Postgres; with ORCHESTRATOR_GCP_PROJECT
set as well, commands that start work publish to Pub/Sub for the deployed functions
instead of running it in this process.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.text import Text

from orchestrator import logs, queries
from orchestrator.cli import render, tasks
from orchestrator.cli.ops import (
    BucketWatcher,
    PipelineWatcher,
    batch_ids_between,
    buckets_root,
    deadline_seconds,
    drop,
    fire,
    force_release,
    parse_params,
    sync,
)
from orchestrator.cli.wiring import (
    EXIT_INTERRUPTED,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    UsageProblem,
    batch_pk,
    busy_counts,
    db_label,
    fail,
    handle_errors,
    is_cloud,
    outcome_code,
    read_session,
    runtime,
    settings,
    settle,
)
from orchestrator.identifiers import batch_id_problem

CONTEXT = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="orchestrator",
    help="Event-driven pipelines on Google Cloud, or on this machine with no setup.\n\n"
         "Example: [bold]orchestrator pipelines sync examples/ && "
         "orchestrator status[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings=CONTEXT,
    add_completion=False,
)
db_app = typer.Typer(help="The metadata database.\n\nExample: [bold]orchestrator db upgrade[/bold]",
                     no_args_is_help=True, context_settings=CONTEXT)
pipelines_app = typer.Typer(
    help="Pipeline definitions.\n\nExample: [bold]orchestrator pipelines sync pipelines/[/bold]",
    no_args_is_help=True, context_settings=CONTEXT)
batch_app = typer.Typer(
    help="Start, cancel, retry and backfill batches.\n\n"
         "Example: [bold]orchestrator batch start monthly_profit 2024-03[/bold]",
    no_args_is_help=True, context_settings=CONTEXT)
schedules_app = typer.Typer(
    help="Cron schedules: list them (last and next runs), pause or resume one.\n\n"
         "Example: [bold]orchestrator schedules pause daily_sales[/bold]",
    invoke_without_command=True, context_settings=CONTEXT)
app.add_typer(db_app, name="db")
app.add_typer(pipelines_app, name="pipelines")
app.add_typer(batch_app, name="batch")
app.add_typer(schedules_app, name="schedules")

# Piped output gets wide lines rather than wrapped cells; a terminal uses its width.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)

PipelineOpt = Annotated[str | None, typer.Option(
    "--pipeline", "-p", help="The pipeline, when the batch id exists in several.")]
TIMEOUT_HELP = "Give up waiting after this many seconds (embedded runtime only)."
FINAL = {"SUCCESS", "FAILED", "CANCELLED"}


@app.callback()
def _root(verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="Log every transition to stderr.")] = False) -> None:
    logs.configure("text", logging.INFO if verbose else logging.ERROR)


def _emit_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def _exit_for(docs: list[dict[str, Any]], timed_out: bool = False) -> None:
    if timed_out:
        for doc in (d for d in docs if d["status"] == "RUNNING"):
            err.print(f"{doc['pipeline']}/{doc['batch_id']}: stopped waiting (--timeout); "
                      "its work goes on")
    code = outcome_code(docs, timed_out)
    if code:
        raise typer.Exit(code)


def _status_doc(batch_id: str, pipeline: str | None) -> dict[str, Any]:
    with read_session() as s:
        return queries.batch_status(s, batch_id, pipeline)


def _print_status(rt: Any, batch_id: str, pipeline: str) -> dict[str, Any]:
    with rt.sessions() as s:
        doc = queries.batch_status(s, batch_id, pipeline)
    out.print(render.batch_table(doc))
    return doc


# -- db -----------------------------------------------------------------------------------


@db_app.command("upgrade")
@handle_errors
def db_upgrade() -> None:
    """Create or migrate the metadata database to the newest schema.

    Example: [bold]DATABASE_URL=postgresql://postgres@127.0.0.1/orchestrator orchestrator db upgrade[/bold]
    """
    from orchestrator.db import migrate
    from orchestrator.db.session import make_engine

    s = settings()
    engine = make_engine(s.resolved_database_url(), pool_size=1, max_overflow=0)
    try:
        migrate.upgrade(engine)
    finally:
        engine.dispose()
    out.print(f"database {db_label(s)} is up to date")


@app.command("deploy")
@handle_errors
def deploy(
    path: Annotated[Path | None, typer.Argument(
        help="The folder of pipelines (default: ORCHESTRATOR_PIPELINES_DIR, `pipelines/`).")] = None,
) -> None:
    """Migrate the metadata database, then store every pipeline of the folder: what the
    deployment's job runs on every `terraform apply` that changed the source.

    Every pipeline is checked before anything is written; a bad one changes nothing.
    At most ORCHESTRATOR_DB_POOL_SIZE + ORCHESTRATOR_DB_MAX_OVERFLOW connections are
    open at once, the share of the connection budget the deployment gives the job.

    Example: [bold]orchestrator deploy pipelines/[/bold]
    """
    from orchestrator.db import migrate
    from orchestrator.db.session import make_engine, make_sessionmaker, transaction
    from orchestrator.pipeline.checks import prepare_spec
    from orchestrator.pipeline.load import load_pipelines
    from orchestrator.pipeline.sync import sync_pipeline
    from orchestrator.ports import SystemClock

    s = settings()
    target = path or s.pipelines_dir
    if not target.is_dir():
        raise FileNotFoundError(2, "no such folder of pipelines", str(target))
    specs = [prepare_spec(spec) for spec in load_pipelines(target)]
    engine = make_engine(s.resolved_database_url(), pool_size=max(1, s.db_pool_size),
                         max_overflow=s.db_max_overflow, pool_timeout=s.db_pool_timeout_s,
                         prepared_statements=s.db_prepared_statements)
    try:
        migrate.upgrade(engine)
        now = SystemClock().now()
        # The folder is what is deployed: a pipeline moved to another file of it follows.
        results = transaction(make_sessionmaker(engine), lambda session: [
            sync_pipeline(session, spec, now, replace=True) for spec in specs])
    finally:
        engine.dispose()
    out.print(f"database {db_label(s)} is up to date")
    if not results:
        out.print(f"no *.yaml pipeline files in {target}")
    for r in results:
        what = f"synced (version {r.version})" if r.changed else f"unchanged (version {r.version})"
        out.print(f"{r.name}: {what}")


# -- pipelines ----------------------------------------------------------------------------


@pipelines_app.command("sync")
@handle_errors
def pipelines_sync(
    path: Annotated[Path | None, typer.Argument(
        help="A pipeline YAML file or a folder of them (default: ORCHESTRATOR_PIPELINES_DIR, "
             "`pipelines/`).")] = None,
    replace: Annotated[bool, typer.Option(
        "--replace", help="Let a file define a pipeline that was synced from another file.")
    ] = False,
) -> None:
    """Validate pipeline files and store them; a changed pipeline becomes a new version.

    Nothing is written unless every file is valid. Two files may not name the same
    pipeline: a pipeline synced from one file is replaced from another only with --replace.

    Example: [bold]orchestrator pipelines sync examples/monthly_profit.yaml[/bold]
    """
    target = path or settings().pipelines_dir
    if not target.exists():
        raise FileNotFoundError(2, "no such file or folder", str(target))
    with runtime(embedded_only=True) as rt:
        results = sync(rt, target, replace=replace)
    if not results:
        raise UsageProblem(f"no *.yaml pipeline files in {target}")
    for r in results:
        what = f"synced (version {r.version})" if r.changed else f"unchanged (version {r.version})"
        out.print(f"{r.name}: {what}")


@pipelines_app.command("list")
@handle_errors
def pipelines_list(json_out: Annotated[bool, typer.Option("--json", help="Machine output.")] = False) -> None:
    """List the synced pipelines.

    Example: [bold]orchestrator pipelines list --json[/bold]
    """
    with read_session() as s:
        rows = queries.list_pipelines(s)
    if json_out:
        _emit_json(rows)
    elif not rows:
        err.print("no pipelines yet: run `orchestrator pipelines sync PATH`")
    else:
        out.print(render.pipelines_table(rows))


@pipelines_app.command("show")
@handle_errors
def pipelines_show(
    name: Annotated[str, typer.Argument(help="The pipeline's name.")],
    json_out: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """Show a pipeline's tasks, dependencies, retry policy and triggers.

    Example: [bold]orchestrator pipelines show monthly_profit[/bold]
    """
    with read_session() as s:
        doc = queries.pipeline_definition(s, name)
    if json_out:
        _emit_json(doc)
    else:
        out.print(render.pipeline_table(doc))


@pipelines_app.command("graph")
@handle_errors
def pipelines_graph(
    name: Annotated[str, typer.Argument(help="The pipeline's name.")],
    batch: Annotated[str | None, typer.Option(
        "--batch", "-b", help="Color the tasks by this batch's statuses.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="mermaid or dot.")] = "mermaid",
) -> None:
    """Print the pipeline's DAG as Mermaid or Graphviz DOT.

    Example: [bold]orchestrator pipelines graph monthly_profit --batch 2024-03 --format dot | dot -Tsvg > dag.svg[/bold]
    """
    from orchestrator.graph import FORMATS
    from orchestrator.graph import render as render_graph

    if fmt not in FORMATS:
        raise UsageProblem(f"unknown --format {fmt!r}: use one of {', '.join(FORMATS)}")
    with read_session() as s:
        if batch is not None:
            doc = queries.batch_status(s, batch, name)
            tasks = [t["task"] for t in doc["tasks"]]
            edges = [(p, t["task"]) for t in doc["tasks"] for p in t["depends_on"]]
            statuses = {t["task"]: t["status"] for t in doc["tasks"]}
            title = f"{name} {batch}"
        else:
            definition = queries.pipeline_definition(s, name)
            tasks = [t["task"] for t in definition["tasks"]]
            edges = [(p, t["task"]) for t in definition["tasks"] for p in t["depends_on"]]
            statuses, title = None, name
    typer.echo(render_graph(fmt, tasks, edges, statuses, title), nl=False)


# -- batch --------------------------------------------------------------------------------


def _resolve_pipeline(batch_id: str, pipeline: str | None) -> str:
    return str(_status_doc(batch_id, pipeline)["pipeline"])


@batch_app.command("start")
@handle_errors
def batch_start(
    pipeline: Annotated[str, typer.Argument(help="The pipeline to run.")],
    batch_id: Annotated[str, typer.Argument(help="The batch id, e.g. 2024-03.")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A batch parameter, key=value; repeatable.")] = None,
    deadline: Annotated[str | None, typer.Option(
        "--deadline", help="Fail the batch (cancelling its open tasks) if not done by then: a "
                           "duration (2h, 90m) or a clock time (\"07:30\", in the pipeline's "
                           "time zone). Default: the pipeline's `deadline:`.")] = None,
    timeout: Annotated[float, typer.Option(help=TIMEOUT_HELP)] = 600.0,
) -> None:
    """Start a batch. Tasks with a file trigger wait for their file.

    On the embedded runtime the command runs the tasks and returns when nothing is
    left to do but wait for files; exit code 3 if the batch failed or a task already
    did (while another waits for its file), 4 if it stopped waiting (--timeout).

    Example: [bold]orchestrator batch start monthly_profit 2024-03 --param region=north[/bold]
    """
    params = parse_params(param)
    with runtime() as rt:
        deadline_s = deadline_seconds(rt, pipeline, deadline) if deadline else None
        started = rt.start_batch(pipeline, batch_id, params, deadline_s=deadline_s)
        if not started:
            err.print(f"batch {pipeline}/{batch_id} already exists; "
                      "`orchestrator batch retry` reruns its failed part")
        if is_cloud(rt.settings):
            out.print(f"published start of {pipeline}/{batch_id}; follow it with "
                      f"`orchestrator status {batch_id} --watch`")
            return
        settled = settle(rt, [batch_pk(rt, pipeline, batch_id)], timeout)
        doc = _print_status(rt, batch_id, pipeline)
    _exit_for([doc], timed_out=not settled)


@batch_app.command("cancel")
@handle_errors
def batch_cancel(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    pipeline: PipelineOpt = None,
) -> None:
    """Cancel every open task of a batch. A running task's late result is discarded.

    Example: [bold]orchestrator batch cancel 2024-03 -p monthly_profit[/bold]
    """
    name = _resolve_pipeline(batch_id, pipeline)
    with runtime() as rt:
        n = rt.cancel(name, batch_id)
    out.print(f"{name}/{batch_id}: cancelled {n} open task(s)")


@batch_app.command("retry")
@handle_errors
def batch_retry(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    pipeline: PipelineOpt = None,
    task: Annotated[list[str] | None, typer.Option(
        "--task", "-t", help="Rerun this task and everything downstream; repeatable. "
                             "Default: the failed, upstream-failed and cancelled tasks.")] = None,
    timeout: Annotated[float, typer.Option(help=TIMEOUT_HELP)] = 600.0,
) -> None:
    """Rerun the failed part of a batch, or the named tasks and their downstream.

    Exit code 3 if the batch fails again, 4 on --timeout (embedded runtime).

    Example: [bold]orchestrator batch retry 2024-03 --task load_sales[/bold]
    """
    name = _resolve_pipeline(batch_id, pipeline)
    with runtime() as rt:
        n = rt.retry(name, batch_id, task or None)
        if n == 0 and not task:
            err.print(f"{name}/{batch_id}: nothing failed, nothing to retry")
        else:
            err.print(f"{name}/{batch_id}: {n} task(s) queued again")
        if is_cloud(rt.settings):
            return
        settled = settle(rt, [batch_pk(rt, name, batch_id)], timeout)
        doc = _print_status(rt, batch_id, name)
    _exit_for([doc], timed_out=not settled)


@batch_app.command("backfill")
@handle_errors
def batch_backfill(
    pipeline: Annotated[str, typer.Argument(help="The pipeline to run.")],
    from_: Annotated[str | None, typer.Option(
        "--from", help="First batch: YYYY-MM (one batch per month) or YYYY-MM-DD (per day).")] = None,
    to: Annotated[str | None, typer.Option("--to", help="Last batch, inclusive.")] = None,
    ids: Annotated[str | None, typer.Option(
        "--ids", help="Comma-separated batch ids instead of a date range.")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", "-c", min=1, help="Batches in flight at once.")] = 4,
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A parameter for every batch, key=value; repeatable.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600.0,
) -> None:
    """Start one batch per month or day of a range (or per listed id), a few at a time.

    A batch that already exists is left alone. Batches whose tasks wait for files
    count as done once nothing else is left to run. Exit code 3 if any batch failed
    (or has a failed task), 4 on --timeout.

    Example: [bold]orchestrator batch backfill monthly_profit --from 2024-01 --to 2024-06 -c 2[/bold]
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if ids is not None and (from_ or to):
        raise UsageProblem("give either --ids or --from/--to, not both")
    if ids is not None:
        batch_ids = [b.strip() for b in ids.split(",") if b.strip()]
        if not batch_ids:
            raise UsageProblem("--ids is empty")
        if bad := [p for p in map(batch_id_problem, batch_ids) if p]:  # before any starts
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise UsageProblem(f"--ids: {bad[0]}{more}; no batch was started")
    elif from_ and to:
        batch_ids = batch_ids_between(from_, to)
    else:
        raise UsageProblem("give a date range (--from and --to) or --ids")
    params = parse_params(param)
    results: dict[str, str] = {}
    with runtime() as rt:
        cloud = is_cloud(rt.settings)
        todo = deque(batch_ids)
        active: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        last_sweep = time.monotonic()
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn())
        with Progress(*columns, console=err, transient=False) as bar:
            job = bar.add_task(f"backfill {pipeline}", total=len(batch_ids))
            while todo or active:
                while todo and len(active) < concurrency:
                    b = todo.popleft()
                    existed = not rt.start_batch(pipeline, b, params)
                    if existed:
                        results[b] = "exists"
                        bar.advance(job)
                    else:
                        active[batch_pk(rt, pipeline, b)] = b
                if cloud:
                    time.sleep(1.0)
                elif rt.bus is not None:
                    rt.bus.drain(timeout=0.1)
                    if time.monotonic() - last_sweep > 0.25:
                        rt.router.sweep()
                        last_sweep = time.monotonic()
                with rt.sessions() as s:
                    busy = busy_counts(s, active)
                for pk in [pk for pk in active if not busy.get(pk)]:
                    results[active.pop(pk)] = "done"
                    bar.advance(job)
                if time.monotonic() > deadline:
                    fail(f"backfill timed out after {timeout:g} s; the started batches keep "
                         "running", EXIT_TIMEOUT)
        statuses = []
        with rt.sessions() as s:
            rows = [queries.batch_status(s, b, pipeline) for b in batch_ids]
    for doc in rows:
        statuses.append(doc["status"])
    table = render.recent_table([
        {"pipeline": pipeline, "batch_id": d["batch_id"], "status": d["status"],
         "created_at": d["created_at"], "duration_s": d["duration_s"], "counts": d["counts"]}
        for d in rows])
    out.print(table)
    n_failed = sum(s in ("FAILED", "CANCELLED") for s in statuses)
    err.print(f"{len(rows)} batch(es): {sum(s == 'SUCCESS' for s in statuses)} succeeded, "
              f"{n_failed} failed, {sum(s == 'RUNNING' for s in statuses)} still open, "
              f"{sum(v == 'exists' for v in results.values())} already existed")
    _exit_for(rows)


# -- status, why, events ------------------------------------------------------------------


@app.command("status")
@handle_errors
def status(
    batch_id: Annotated[str | None, typer.Argument(
        help="The batch id; without it, the recent batches are listed.")] = None,
    pipeline: PipelineOpt = None,
    watch: Annotated[bool, typer.Option(
        "--watch", "-w", help="Refresh until the batch is finished; exit code 3 if it failed.")] = False,
    json_out: Annotated[bool, typer.Option(
        "--json", help="Print the documented JSON shape (schema orchestrator.batch_status/v1).")] = False,
    limit: Annotated[int, typer.Option(help="How many recent batches to list.")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes with --watch.")] = 1.0,
) -> None:
    """A batch's tasks (status, attempt, start, duration, error), or the recent batches.

    Example: [bold]orchestrator status 2024-03 --watch[/bold]
    """
    if batch_id is None:
        with read_session() as s:
            rows = queries.recent_batches(s, limit=limit, pipeline=pipeline)
        if json_out:
            _emit_json({"schema": "orchestrator.recent_batches/v1", "batches": rows})
        elif not rows:
            err.print("no batches yet")
        else:
            out.print(render.recent_table(rows))
        return
    if json_out and not watch:
        # As the database wrote it: a 10,000-task batch is never rebuilt in Python.
        with read_session() as s:
            typer.echo(queries.batch_status_json(s, batch_id, pipeline))
        return
    doc = _status_doc(batch_id, pipeline)
    if watch and doc["status"] not in FINAL:
        if json_out:
            while doc["status"] not in FINAL:
                time.sleep(interval)
                doc = _status_doc(batch_id, pipeline)
        else:
            with Live(render.batch_table(doc), console=out, auto_refresh=False,
                      transient=True) as live:
                while doc["status"] not in FINAL:
                    time.sleep(interval)
                    doc = _status_doc(batch_id, pipeline)
                    live.update(render.batch_table(doc), refresh=True)
    if json_out:
        _emit_json(doc)
    else:
        out.print(render.batch_table(doc))
    if watch:
        _exit_for([doc])


@app.command("why")
@handle_errors
def why(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    task: Annotated[str, typer.Argument(help="The task.")],
    pipeline: PipelineOpt = None,
) -> None:
    """In plain words, why a task has not run (or how it ended).

    Example: [bold]orchestrator why 2024-03 calculate_profit[/bold]
    """
    from orchestrator.ports import SystemClock

    with read_session() as s:
        typer.echo(queries.why(s, batch_id, task, SystemClock().now(), pipeline))


@app.command("events")
@handle_errors
def events(
    batch_id: Annotated[str, typer.Argument(help="The batch id.")],
    pipeline: PipelineOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """The batch's transition history, oldest first.

    Example: [bold]orchestrator events 2024-03 --json[/bold]
    """
    with read_session() as s:
        rows = queries.batch_events(s, batch_id, pipeline)
    if json_out:
        _emit_json(rows)
    else:
        out.print(render.events_table(rows))


# -- schedules and alerts -------------------------------------------------------------------


@schedules_app.callback()
@handle_errors
def schedules_list(
    ctx: typer.Context,
    json_out: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """Every schedule: its cron and time zone, paused or not, its last run and its next
    three, in its own time zone.

    Example: [bold]orchestrator schedules[/bold]
    """
    from orchestrator import schedules
    from orchestrator.ports import SystemClock

    if ctx.invoked_subcommand is not None:
        return
    with read_session() as s:
        rows = schedules.listing(s, SystemClock().now())
    if json_out:
        _emit_json({"schema": "orchestrator.schedules/v1", "schedules": rows})
    elif not rows:
        err.print("no schedules: add `schedule:` to a pipeline file and sync it")
    else:
        out.print(render.schedules_table(rows))


def _pause(pipeline: str, paused: bool) -> None:
    from orchestrator import schedules
    from orchestrator.db.session import transaction

    with runtime(embedded_only=True) as rt:
        now = rt.clock.now()
        changed = transaction(rt.sessions, lambda s: schedules.set_paused(s, pipeline, paused, now))
    word = "paused" if paused else "resumed"
    out.print(f"{pipeline}: schedule {word}" if changed else f"{pipeline}: schedule already {word}")


@schedules_app.command("pause")
@handle_errors
def schedules_pause(pipeline: Annotated[str, typer.Argument(help="The pipeline.")]) -> None:
    """Stop a pipeline's schedule from starting batches (stored in the database, so
    every sweeper honours it).

    Example: [bold]orchestrator schedules pause daily_sales[/bold]
    """
    _pause(pipeline, True)


@schedules_app.command("resume")
@handle_errors
def schedules_resume(pipeline: Annotated[str, typer.Argument(help="The pipeline.")]) -> None:
    """Let a paused schedule start batches again, from its next tick (the ticks of the
    pause are not caught up on).

    Example: [bold]orchestrator schedules resume daily_sales[/bold]
    """
    _pause(pipeline, False)


@app.command("alerts")
@handle_errors
def alerts_list(
    pipeline: PipelineOpt = None,
    limit: Annotated[int, typer.Option(help="How many recent alerts to list.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Machine output.")] = False,
) -> None:
    """The recent alerts and their delivery on each channel (delivered, retrying, given up).

    Example: [bold]orchestrator alerts --limit 5[/bold]
    """
    from orchestrator import alerts

    with read_session() as s:
        rows = alerts.recent(s, limit=limit, pipeline=pipeline)
    if json_out:
        _emit_json({"schema": "orchestrator.alerts/v1", "alerts": rows})
    elif not rows:
        err.print("no alerts yet")
    else:
        out.print(render.alerts_table(rows))


# -- maintenance and the local runtime ------------------------------------------------------


@app.command("run")
@handle_errors
def run(
    pipeline: Annotated[str, typer.Argument(help="The pipeline to run.")],
    batch_id: Annotated[str, typer.Argument(help="A new batch id, e.g. ci-1234.")],
    param: Annotated[list[str] | None, typer.Option(
        "--param", help="A batch parameter, key=value; repeatable.")] = None,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", help="Sync this pipeline file (or folder) first.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Release the tasks that wait for a GCS file without the file "
                        "(their input names the object their pattern expects).")] = False,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 600.0,
) -> None:
    """Run one batch to the end in this process, then print its status table.

    The same engine, handlers and metadata database as always (DATABASE_URL, or
    the local SQLite file), with the work done here instead of by the deployed
    functions: for debugging a pipeline, and for testing it in CI. Exit code 0
    if the batch succeeded, 1 if it failed, was cancelled, or could not finish
    (a task waits for a file: drop it first, or pass --force).

    Example: [bold]orchestrator run monthly_profit ci-42 --file pipelines/monthly_profit.yaml --force[/bold]
    """
    params = parse_params(param)
    with runtime(embedded_only=True) as rt:
        if file is not None:
            if not file.exists():
                raise FileNotFoundError(2, "no such file or folder", str(file))
            for r in sync(rt, file):
                err.print(f"pipeline {r.name}: version {r.version}"
                          f"{' (updated)' if r.changed else ''}")
        if not rt.start_batch(pipeline, batch_id, params):
            raise UsageProblem(f"batch {pipeline}/{batch_id} already exists; choose a new "
                               "batch id, or rerun its failed part with `orchestrator batch retry`")
        if force:
            released = force_release(rt, pipeline, batch_id)
            if released:
                err.print(f"released without their file: {', '.join(released)}")
        settle(rt, [batch_pk(rt, pipeline, batch_id)], timeout)
        doc = _print_status(rt, batch_id, pipeline)
    if doc["status"] == "SUCCESS":
        return
    if doc["status"] == "RUNNING":
        waiting = [t["task"] for t in doc["tasks"] if t["waiting_for_file"]]
        why = (f"waiting for a file: {', '.join(waiting)} (drop it first, or pass --force)"
               if waiting else f"still running after {timeout:g} s")
        err.print(f"batch {pipeline}/{batch_id} did not finish: {why}")
    raise typer.Exit(1)


@app.command("sweep")
@handle_errors
def sweep() -> None:
    """One maintenance pass: requeue due retries, republish unclaimed tasks, expire
    leases, close finished batches; start due schedule ticks, apply deadlines and late
    files, and send alerts.

    Example: [bold]orchestrator sweep[/bold]
    """
    with runtime() as rt:
        report = rt.router.sweep()
        if rt.bus is not None:
            rt.bus.drain(timeout=60)
    out.print(f"requeued {report.requeued}, redispatched {report.redispatched}, "
              f"expired {report.expired}, closed {report.closed_batches} batch(es); "
              f"scheduled {report.scheduled}, missed deadlines {report.missed_deadlines}, "
              f"late files {report.files_late}; alerts created {report.alerts_created}, "
              f"delivered {report.alerts_delivered}, retrying {report.alerts_retrying}")
    for e in report.errors:
        err.print(f"warning: {e}")


@app.command("drop")
@handle_errors
def drop_cmd(
    file: Annotated[Path, typer.Argument(help="A local file.")],
    uri: Annotated[str, typer.Argument(help="Where it lands: gs://bucket/path (a trailing / "
                                            "keeps the file's name).")],
    timeout: Annotated[float, typer.Option(help=TIMEOUT_HELP)] = 600.0,
) -> None:
    """Copy a file into a local bucket and fire its finalize event, as GCS would.

    Runs what the file triggers, then prints the status of the batches it touched;
    exit code 3 once one of them has a failed task, 4 if it stopped waiting (--timeout).

    Example: [bold]orchestrator drop sales.parquet gs://landing/sales/2024-03/_SUCCESS[/bold]
    """
    if is_cloud(settings()):
        raise UsageProblem("`drop` writes to the embedded runtime's local buckets; "
                           "on Google Cloud copy the file with `gcloud storage cp`")
    if not uri.startswith("gs://"):
        raise UsageProblem(f"{uri!r} is not a gs:// URI")
    with runtime(embedded_only=True) as rt:
        dropped = drop(rt, file, uri)
        if not dropped.batches:
            out.print(dropped.summary())
            return
        pks = [batch_pk(rt, p, b) for p, b in dropped.batches]
        err.print(f"{dropped.uri}: {dropped.outcome}")
        settled = settle(rt, pks, timeout)
        docs = [_print_status(rt, b, p) for p, b in dropped.batches]
    _exit_for(docs, timed_out=not settled)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (from a supervisor, `timeout`, `docker stop`) stops like Ctrl-C: in
    order, the runtime's workers with it, instead of ending this process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@app.command("dev")
@handle_errors
def dev(
    pipelines: Annotated[Path | None, typer.Option(
        "--pipelines", help="Sync these pipeline files first (default: `pipelines/` if it exists).")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between scans of the bucket folders.")] = 0.5,
    sweep_every: Annotated[float, typer.Option(help="Seconds between sweeps.")] = 1.0,
    stop_after: Annotated[float | None, typer.Option(hidden=True)] = None,
    processes: Annotated[int | None, typer.Option(
        "--processes", min=0,
        help="On PostgreSQL: run tasks in this many worker processes (each with its own "
             "connections) instead of threads; 0 for threads. Worker processes keep the "
             "Python modules they loaded until restarted. Default: "
             "ORCHESTRATOR_WORKER_PROCESSES, else 0.")] = None,
) -> None:
    """Run the embedded runtime in the foreground until Ctrl-C (or SIGTERM).

    It watches the local bucket folders (ORCHESTRATOR_HOME/buckets/<bucket>/…) for
    new files, fires their finalize events, runs the sweeper (schedules start their
    batches on time, deadlines apply, and alerts print here, and go to
    ORCHESTRATOR_ALERT_WEBHOOK_URL if set), and reloads the pipeline files (syncing a
    changed one as a new version for new batches) and their Python modules when
    they change.

    Example: [bold]orchestrator dev --pipelines examples/[/bold], then in another shell
    [bold]cp _SUCCESS .orchestrator/buckets/landing/sales/2024-03/[/bold]
    """
    s = settings()
    if is_cloud(s):
        raise UsageProblem("`dev` runs the embedded runtime; unset ORCHESTRATOR_GCP_PROJECT")
    with _sigterm_interrupts(), runtime(embedded_only=True, processes=processes) as rt:
        source = pipelines or (s.pipelines_dir if s.pipelines_dir.exists() else None)
        if source is not None:
            if not source.exists():
                raise FileNotFoundError(2, "no such file or folder", str(source))
            for r in sync(rt, source):
                out.print(f"pipeline {r.name}: version {r.version}"
                          f"{' (updated)' if r.changed else ''}")

        def finished(f: Any) -> None:
            out.print(f"batch {f.pipeline}/{f.batch_id} finished: ", end="")
            out.print(render.status_text(str(f.status)), end="")
            out.print(f" in {f.duration_s:.1f} s")

        def alerted(alert: dict[str, Any]) -> None:
            out.print(Text(f"alert {alert['kind']}: {alert['pipeline']}/{alert['batch_id']}: "
                           f"{alert['title']}", style=render.ALERT_STYLE[alert["severity"]]))
            if alert.get("error"):
                out.print(f"  {alert['error']}")
            if alert.get("command"):
                out.print(f"  more: {alert['command']}")

        def scheduled(started: Any) -> None:
            out.print(f"schedule {started.pipeline}: started batch {started.batch_id}")

        rt.on_batch_finished(finished)
        rt.on_alert(alerted)
        rt.on_scheduled(scheduled)
        root = buckets_root(rt)
        root.mkdir(parents=True, exist_ok=True)
        watcher = BucketWatcher(root)
        pipeline_files = PipelineWatcher(source) if source is not None else None
        rt.start_sweeper(sweep_every)
        out.print(f"watching {root} for new files; database {db_label(s)}; Ctrl-C to stop")
        started = time.monotonic()
        try:
            while stop_after is None or time.monotonic() - started < stop_after:
                for bucket, name in watcher.poll():
                    dropped = fire(rt, bucket, name)
                    out.print(dropped.summary())
                if pipeline_files is not None and (changed := pipeline_files.poll()):
                    _resync(rt, pipeline_files.source, changed)
                _reload_modules()
                time.sleep(poll)
        except KeyboardInterrupt:
            out.print("stopping")
            interrupted = True
        else:
            interrupted = False
        if rt.bus is not None:
            rt.bus.drain(timeout=10)
    if interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)


@app.command("ui")
@handle_errors
def ui(
    host: Annotated[str, typer.Option(
        help="Address to listen on. Anything but loopback exposes the UI to your network: "
             "put it behind an authenticating proxy.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
    read_only: Annotated[bool, typer.Option(
        "--read-only", help="Show, never act: no start, retry or cancel; no migration.")] = False,
    allow_host: Annotated[list[str] | None, typer.Option(
        "--allow-host", help="Also accept requests for this host name (e.g. behind a proxy); "
                             "repeatable.")] = None,
) -> None:
    """A web UI over the task log: batches, their DAG and timeline, tasks, events; start,
    retry and cancel.

    On the embedded runtime, the work an action queues runs in this process.

    Example: [bold]orchestrator ui --read-only[/bold], then open http://127.0.0.1:8080
    """
    from orchestrator.ui.server import serve

    s = settings()
    mode = " (read-only)" if read_only else ""
    shown = f"[{host}]" if ":" in host else host
    err.print(f"orchestrator ui{mode}: http://{shown}:{port}/  database {db_label(s)}; "
              "Ctrl-C to stop")
    serve(s, host=host, port=port, read_only=read_only, extra_hosts=allow_host or [],
          cloud=is_cloud(s))


def _resync(rt: Any, source: Path, changed: list[Path]) -> None:
    """`dev`: pipeline files changed on disk are synced again. A changed pipeline
    becomes a new version, which new batches run; a file that is now invalid keeps
    the stored versions."""
    from orchestrator.errors import OrchestratorError, PipelineValidationError

    what = ", ".join(p.name for p in changed)
    try:
        results = sync(rt, source)
    except PipelineValidationError as exc:
        err.print(f"{what} changed but cannot be synced, keeping the stored versions: "
                  f"{exc.source}: {'; '.join(exc.problems)}", markup=False, soft_wrap=True)
        return
    except (OrchestratorError, OSError) as exc:
        err.print(f"{what} changed but cannot be synced, keeping the stored versions: {exc}",
                  markup=False, soft_wrap=True)
        return
    updated = [r for r in results if r.changed]
    for r in updated:
        out.print(f"reloaded pipeline {r.name} from {what}: version {r.version}; new batches "
                  "run it, running ones keep theirs", markup=False, soft_wrap=True)
    if not updated:
        out.print(f"{what} changed; no pipeline changed", markup=False, soft_wrap=True)


def _reload_modules() -> None:
    """Python modules of the pipelines that changed on disk are reloaded: the next
    attempt of a task runs the new code (one running now finishes with the old)."""
    from orchestrator import handlers, usercode

    reloaded = usercode.reload_changed()
    for name, problem in reloaded:
        if problem is None:
            out.print(f"reloaded module {name}")
        else:
            err.print(f"cannot reload module {name}, keeping the old one: {problem}",
                      markup=False)
    if reloaded:
        handlers.clear_cache()


tasks.register(app)


def main() -> None:
    """Entry point: usage errors become one line too, never a traceback."""
    try:
        code = app(standalone_mode=False)
    except Exception as exc:
        # typer may bundle its own copy of click: match its exceptions by shape.
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(EXIT_USAGE)
        if hasattr(exc, "format_message") and hasattr(exc, "exit_code"):
            where = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
            typer.echo(f"error: {exc.format_message()}{where}", err=True)
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            typer.echo("interrupted", err=True)
            sys.exit(130)
        raise
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
