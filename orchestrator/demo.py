"""`make demo`: the monthly-profit pipeline on the embedded runtime, start to finish.

1. Generates a month of sales and expenses as Parquet (pyarrow) and drops the files
   into the local landing bucket, the way a user would with `orchestrator drop`.
   The `_SUCCESS` markers fire the GCS triggers: the loads run, then
   `calculate_profit`. Prints the batch status and the profit rows, checked against
   figures computed here from the Parquet files in the bucket (read with pyarrow,
   summed in Python), independently of the pipeline's SQL and of the generator.
   The sample data gives the `west` region sales but no expenses, so the profit
   query's outer join has a region to keep; the demo says so.
2. A second month gets a bad expenses file (no `amount` column): its load fails with
   a clear error and `calculate_profit` is UPSTREAM_FAILED. The good file is dropped
   and `orchestrator batch retry` runs; the batch then completes.

Everything lives in a fresh folder (`.orchestrator/demo`, wiped at the start), so
reruns work and nothing else is touched. No environment variable is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from orchestrator import logs, queries
from orchestrator.cli import render
from orchestrator.cli.ops import buckets_root, drop, sync
from orchestrator.cli.wiring import batch_pk, settle

PIPELINE = "monthly_profit"
GOOD_MONTH = "2024-03"
BAD_MONTH = "2024-04"
BUCKET = "landing"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DEFAULT_HOME = Path(".orchestrator") / "demo"

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


def say(text: str) -> None:
    console.print(text)


def step(title: str) -> None:
    console.print()
    console.rule(f"[bold]{title}", align="left")


def command(text: str) -> None:
    console.print(f"[dim]$[/dim] [bold cyan]{text}[/bold cyan]")


def _uri(kind: str, batch_id: str, name: str) -> str:
    return f"gs://{BUCKET}/{kind}/{batch_id}/{name}"


def drop_month(rt: Any, folder: Path, batch_id: str, kinds: tuple[str, ...] = ("sales", "expenses"),
               markers: bool = True) -> None:
    """Drop every Parquet file of the month, then each folder's `_SUCCESS` marker last."""
    pks: list[int] = []
    for kind in kinds:
        src = folder / kind / batch_id
        names = sorted(p.name for p in src.glob("*.parquet"))
        if markers and (src / "_SUCCESS").exists():
            names.append("_SUCCESS")
        for name in names:
            rel = os.path.relpath(src / name)
            command(f"orchestrator drop {rel} {_uri(kind, batch_id, name)}")
            dropped = drop(rt, src / name, _uri(kind, batch_id, name))
            pks.extend(batch_pk(rt, p, b) for p, b in dropped.batches)
    settle(rt, set(pks), timeout_s=120)


def write_bad_expenses(folder: Path, batch_id: str) -> None:
    """Expenses for the month without the `amount` column, as a broken export would be."""
    from orchestrator.examples_data import EXPENSES_COLUMNS, make_month, parquet_bytes

    rows = make_month(batch_id, seed=7)["expenses"]
    columns = [c for c in EXPENSES_COLUMNS if c["name"] != "amount"]
    target = folder / "expenses" / batch_id
    target.mkdir(parents=True, exist_ok=True)
    (target / "part-000.parquet").write_bytes(
        parquet_bytes([{k: v for k, v in r.items() if k != "amount"} for r in rows], columns))
    (target / "_SUCCESS").write_bytes(b"")


def show_status(rt: Any, batch_id: str) -> dict[str, Any]:
    with rt.sessions() as s:
        doc = queries.batch_status(s, batch_id, PIPELINE)
    command(f"orchestrator status {batch_id}")
    console.print(render.batch_table(doc))
    return doc


def profit_rows(rt: Any, batch_id: str) -> list[dict[str, Any]]:
    return list(rt.warehouse().fetch(
        "SELECT month, region, revenue, expenses, profit FROM analytics.profit "
        "WHERE month = CAST(CONCAT(@batch_id, '-01') AS DATE) ORDER BY region",
        {"batch_id": batch_id},
    ))


def _money(v: Any) -> str:
    return f"{Decimal(str(v)):,.2f}"


def landed_totals(rt: Any, batch_id: str) -> dict[str, dict[str, Decimal]]:
    """Amount per region of the month's sales and expenses, read with pyarrow from the
    Parquet files in the landing bucket (what the loads read), summed in Python."""
    import pyarrow.parquet as pq

    totals: dict[str, dict[str, Decimal]] = {}
    for kind in ("sales", "expenses"):
        sums: dict[str, Decimal] = {}
        folder = buckets_root(rt) / BUCKET / kind / batch_id
        for path in sorted(folder.glob("*.parquet")):
            for row in pq.read_table(path, columns=["region", "amount"]).to_pylist():
                sums[row["region"]] = sums.get(row["region"], Decimal(0)) + row["amount"]
        totals[kind] = sums
    return totals


def profit_from_files(rt: Any, batch_id: str) -> list[tuple[str, str, Decimal, Decimal, Decimal]]:
    """(month, region, revenue, expenses, profit) per region, from the dropped files:
    every region with sales or expenses, a missing side counting as zero."""
    totals = landed_totals(rt, batch_id)
    sales, costs = totals["sales"], totals["expenses"]
    month = f"{batch_id}-01"
    return [(month, region, sales.get(region, Decimal(0)), costs.get(region, Decimal(0)),
             sales.get(region, Decimal(0)) - costs.get(region, Decimal(0)))
            for region in sorted(set(sales) | set(costs))]


def explain_missing_expenses(rt: Any, batch_id: str) -> None:
    totals = landed_totals(rt, batch_id)
    for region in sorted(set(totals["sales"]) - set(totals["expenses"])):
        say(f"[bold]{region}[/bold] has sales but no expenses: the sample data leaves it out "
            "of the expenses on purpose, so that the profit query's FULL OUTER JOIN has a "
            "region to keep. Its row shows expenses 0.00, not a missing row.")


def show_profit(rt: Any, batch_id: str) -> bool:
    rows = profit_rows(rt, batch_id)
    table = Table(title=f"analytics.profit, {batch_id}", show_edge=False, header_style="bold")
    for col in ("month", "region", "revenue", "expenses", "profit"):
        table.add_column(col, justify="left" if col in ("month", "region") else "right")
    for r in rows:
        table.add_row(str(r["month"]), r["region"], _money(r["revenue"]), _money(r["expenses"]),
                      _money(r["profit"]))
    console.print(table)
    got = [(str(r["month"]), r["region"], Decimal(str(r["revenue"])),
            Decimal(str(r["expenses"])), Decimal(str(r["profit"]))) for r in rows]
    want = profit_from_files(rt, batch_id)
    if got == want:
        say("[green]✓[/green] the same figures as computed here from the dropped Parquet files")
        return True
    say("[bold red]✗ the profit rows differ from the figures computed from the dropped "
        "Parquet files:")
    for g in sorted(set(got) - set(want)):
        say(f"  pipeline: {g}")
    for w in sorted(set(want) - set(got)):
        say(f"  files:    {w}")
    return False


def fresh_settings(home: Path) -> Any:
    from orchestrator.settings import Settings

    return Settings(home=home.resolve(), database_url=None, warehouse="local", object_store="local")


def sync_example(rt: Any) -> None:
    step("1. Sync the pipeline")
    command(f"orchestrator pipelines sync {EXAMPLES / 'monthly_profit.yaml'}")
    for r in sync(rt, EXAMPLES / "monthly_profit.yaml"):
        say(f"{r.name}: synced (version {r.version}): load_sales + load_expenses "
            "→ calculate_profit")


def good_month(rt: Any, home: Path) -> dict[str, Any]:
    from orchestrator.examples_data import write_monthly_files

    step(f"2. A month of sales and expenses lands: batch {GOOD_MONTH}")
    incoming = home / "incoming"
    write_monthly_files(incoming, GOOD_MONTH, seed=1, sales=2000, expenses=300)
    say(f"generated 2,000 sales and 300 expenses as Parquet under {incoming}")
    drop_month(rt, incoming, GOOD_MONTH)
    return show_status(rt, GOOD_MONTH)


def bad_month(rt: Any, home: Path) -> dict[str, Any]:
    """The month whose expenses file lacks a column: load_expenses fails, and
    calculate_profit is UPSTREAM_FAILED."""
    from orchestrator.examples_data import write_monthly_files

    step(f"3. A bad file: batch {BAD_MONTH} gets expenses without an `amount` column")
    bad = home / "incoming-bad"
    write_monthly_files(bad, BAD_MONTH, seed=2, sales=2000, expenses=300, files_per_table=1)
    shutil.rmtree(bad / "expenses")
    write_bad_expenses(bad, BAD_MONTH)
    drop_month(rt, bad, BAD_MONTH)
    doc = show_status(rt, BAD_MONTH)
    command(f"orchestrator why {BAD_MONTH} calculate_profit")
    with rt.sessions() as s:
        say(queries.why(s, BAD_MONTH, "calculate_profit", rt.clock.now(), PIPELINE))
    return doc


def drop_fixed(rt: Any, home: Path) -> None:
    """The corrected expenses file lands (no marker: nothing fires until a retry)."""
    from orchestrator.examples_data import write_monthly_files

    step("4. Recovery: drop the corrected file, then retry the failed part")
    fixed = home / "incoming-fixed"
    write_monthly_files(fixed, BAD_MONTH, seed=2, sales=2000, expenses=300, files_per_table=1,
                        marker=False)
    drop_month(rt, fixed, BAD_MONTH, kinds=("expenses",), markers=False)


def ui_command(home: Path) -> str:
    return f"ORCHESTRATOR_HOME={home} orchestrator ui"


def run(home: Path) -> int:
    from orchestrator.runtime import Runtime

    started = time.perf_counter()
    logs.configure("text", logging.CRITICAL)  # the demo narrates; failures show in the tables
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    ok = True
    with Runtime.embedded(fresh_settings(home)) as rt:
        sync_example(rt)

        doc = good_month(rt, home)
        ok &= doc["status"] == "SUCCESS"
        explain_missing_expenses(rt, GOOD_MONTH)
        ok &= show_profit(rt, GOOD_MONTH)

        doc = bad_month(rt, home)
        ok &= doc["status"] == "FAILED"
        by_task = {t["task"]: t for t in doc["tasks"]}
        ok &= by_task["load_expenses"]["status"] == "ERROR"
        ok &= by_task["calculate_profit"]["status"] == "UPSTREAM_FAILED"

        drop_fixed(rt, home)
        command(f"orchestrator batch retry {BAD_MONTH}")
        n = rt.retry(PIPELINE, BAD_MONTH)
        say(f"{PIPELINE}/{BAD_MONTH}: {n} task(s) queued again")
        settle(rt, [batch_pk(rt, PIPELINE, BAD_MONTH)], timeout_s=120)
        doc = show_status(rt, BAD_MONTH)
        ok &= doc["status"] == "SUCCESS"
        ok &= show_profit(rt, BAD_MONTH)

    elapsed = time.perf_counter() - started
    step("Done")
    env = f"ORCHESTRATOR_HOME={home}"
    say(f"{'[green]demo finished' if ok else '[bold red]demo failed'}[/] in {elapsed:.1f} s. "
        "Look around:")
    for cmd in (f"{env} orchestrator status", f"{env} orchestrator events {BAD_MONTH}",
                f"{env} orchestrator pipelines graph {PIPELINE} --batch {BAD_MONTH}"):
        say(f"  {cmd}")
    say("Or in your browser (the DAG, the timeline, every task and its events), at "
        "http://127.0.0.1:8080/:")
    say(f"  [bold]{ui_command(home)}[/bold]")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME,
                        help="Folder for the demo's state (wiped first); default %(default)s.")
    args = parser.parse_args(argv)
    try:
        return run(args.home)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line, never a traceback
        console.print(f"[bold red]error:[/] {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
