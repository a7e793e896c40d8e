"""Callables for the `python` handler in benchmark pipelines."""

from __future__ import annotations

import time
from typing import Any


def sleep(ctx: Any, seconds: float = 0.0) -> dict[str, Any]:
    if seconds:
        time.sleep(seconds)
    return {}


def stamp(ctx: Any) -> dict[str, Any]:
    """A no-op that records when it ran, so a hop is measured handler to handler: from
    the parent's return to the child's start, whatever path the child took there."""
    started = time.time()
    return {"started": started, "ended": time.time()}
