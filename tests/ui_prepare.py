"""`python -m tests.ui_prepare HOME STEP`: the task log the browser tests look at,
made in a process of its own (so the DuckDB warehouse and SQLite file are released
before the UI server runs its work).

- `failed`: the demo's first three steps (2024-03 succeeds; 2024-04's expenses file
  has no `amount` column, so load_expenses fails and calculate_profit is
  UPSTREAM_FAILED).
- `fixed`: the demo's corrected expenses file lands in the bucket (no retry yet).
- `extra` (in another home): a batch whose error, param and pipeline description
  carry markup, and a batch of 10,000 tasks.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orchestrator import demo
from orchestrator.runtime import Runtime
from tests.ui_support import HOSTILE, big_batch, failed_diamond


def main(home: Path, step: str) -> None:
    with Runtime.embedded(demo.fresh_settings(home), workers=2) as rt:
        if step == "failed":
            demo.sync_example(rt)
            demo.good_month(rt, home)
            demo.bad_month(rt, home)
        elif step == "extra":
            now = datetime.now(UTC)
            failed_diamond(rt.sessions, now, pipeline="hostile", error=HOSTILE,
                           params={"region": HOSTILE}, description=HOSTILE)
            big_batch(rt.db, 10_000, now - timedelta(minutes=10))
        elif step == "fixed":
            demo.drop_fixed(rt, home)
        else:
            raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
