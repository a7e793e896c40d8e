"""`python -m tests.ui_prepare HOME STEP`: the task log the browser tests look at,
made in a process of its own (so the DuckDB warehouse and SQLite file are released
before the UI server runs its work).

- `failed`: the demo's first three steps (2024-03 succeeds; 2024-04's expenses file
  has no `amount` column, so load_expenses fails and calculate_profit is
  UPSTREAM_FAILED).
- `fixed`: the demo's corrected expenses file lands in the bucket (no retry yet).
- `extra` (in another home): a batch whose error, param and pipeline description
  carry markup, a batch of 10,000 tasks, and a python task that prints, logs and
  fails twice (`orders/2024-04`, task `enrich`).
- `live` (in that home, while its UI runs): a python task that prints a line every
  0.15 s, 30 in all, pausing after the tenth until `pipelines/release-tick` exists
  (`ticker/live-1`, task `tick`).
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from orchestrator import demo
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from tests.ui_support import HOSTILE, big_batch, failed_diamond

TASKS = '''\
import logging
import os
import sys
import time

vendor = logging.getLogger("vendor.currency")


def extract(ctx):
    print("listing gs://landing/orders/2024-04/")
    ctx.log.info("found %d files, %d rows", 3, 1200)
    return {"rows": 1200}


def _amount(row):
    return row["amount"] * row["quantity"]


def enrich(ctx):
    rows = ctx.parents["extract"]["rows"]
    print(f"reading {rows} rows from extract")
    ctx.log.info("joining %d rows with customers", rows)
    vendor.warning("slow response from the currency API (2.3 s)")
    print("DeprecationWarning: 'currency' is deprecated, use 'currency_code'", file=sys.stderr)
    total = sum(_amount(r) for r in [{"price": 10, "quantity": 2}])
    return {"total": total}


def tick(ctx):
    # Ten lines, then on only once the test has seen them (a file beside this module
    # says so), however slowly a loaded machine brings the page up.
    release = os.path.join(os.path.dirname(__file__), "release-tick")
    for i in range(30):
        if i == 10:
            waited = time.monotonic()
            while not os.path.exists(release) and time.monotonic() - waited < 120:
                time.sleep(0.05)
        print(f"tick {i:02d}")
        time.sleep(0.15)
    return {"ticks": 30}
'''


def _python(home: Path) -> Any:
    """Settings whose pipelines folder holds the tasks above."""
    folder = home / "pipelines"
    folder.mkdir(exist_ok=True)
    (folder / "uitasks.py").write_text(TASKS)
    return demo.fresh_settings(home).model_copy(update={"pipelines_dir": folder})


def _task(name: str, fn: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "handler": "python", "config": {"callable": f"uitasks:{fn}"}, **extra}


def main(home: Path, step: str) -> None:
    settings = _python(home) if step in ("extra", "live") else demo.fresh_settings(home)
    with Runtime.embedded(settings, workers=2) as rt:
        if step == "failed":
            demo.sync_example(rt)
            demo.good_month(rt, home)
            demo.bad_month(rt, home)
        elif step == "extra":
            now = datetime.now(UTC)
            failed_diamond(rt.sessions, now, pipeline="hostile", error=HOSTILE,
                           params={"region": HOSTILE}, description=HOSTILE)
            big_batch(rt.db, 10_000, now - timedelta(minutes=10))
            rt.sync_specs([build_pipeline({"name": "orders", "tasks": [
                _task("extract", "extract"),
                _task("enrich", "enrich", depends_on=["extract"],
                      retry={"max_attempts": 2, "initial_delay_s": 0}),
            ]}, known_handlers={"python"})])
            rt.start_batch("orders", "2024-04")
            assert rt.wait("orders", "2024-04", timeout=60) == "FAILED"
        elif step == "live":
            rt.sync_specs([build_pipeline({"name": "ticker", "tasks": [_task("tick", "tick")]},
                                          known_handlers={"python"})])
            rt.start_batch("ticker", "live-1")
            assert rt.wait("ticker", "live-1", timeout=60) == "SUCCESS"
        elif step == "fixed":
            demo.drop_fixed(rt, home)
        else:
            raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
