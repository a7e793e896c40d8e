"""`noop`: does nothing (optionally sleeps `seconds`); for tests, demos and benchmarks."""

from __future__ import annotations

import time
from typing import Any

from orchestrator.handlers.context import TaskContext


def check_config(config: dict[str, Any], base_dir: object) -> list[str]:
    seconds = config.get("seconds", 0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        return [f"noop: 'seconds' must be a non-negative number, got {seconds!r}"]
    return []


def run(ctx: TaskContext) -> dict[str, Any]:
    seconds = float(ctx.config.get("seconds", 0))
    if seconds:
        time.sleep(seconds)
    return {}
