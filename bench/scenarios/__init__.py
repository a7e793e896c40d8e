"""The scenarios, in the order `python -m bench` runs them.

Each module's `run(ctx)` returns a list of `Metric`s; it raises `Skipped` when it
cannot run here, which the runner turns into a "skipped: <reason>" row.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> module:function
SCENARIOS: dict[str, str] = {
    "chain40": "bench.scenarios.chain:chain40",
    "noop_chain": "bench.scenarios.chain:noop_chain",
    "pg_limit": "bench.scenarios.throughput:pg_limit",
    "throughput": "bench.scenarios.throughput:throughput",
    "fanout_fanin_1000": "bench.scenarios.fan:fanout_fanin_1000",
    "fan_out_10k": "bench.scenarios.fan:fan_out_10k",
    "fan_in_10k": "bench.scenarios.fan:fan_in_10k",
    "status_10k": "bench.scenarios.status:status_10k",
    "ui_batch_10k": "bench.scenarios.ui:ui_batch_10k",
    "cold_import": "bench.scenarios.cold_import:cold_import",
    "cold_first_ack": "bench.scenarios.cold_start:cold_first_ack",
    "parquet_load": "bench.scenarios.parquet:parquet_load",
}


def load(name: str) -> Callable[[Any], list[Any]]:
    module, _, fn = SCENARIOS[name].partition(":")
    return getattr(importlib.import_module(module), fn)  # type: ignore[no-any-return]
