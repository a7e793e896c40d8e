"""Callables for the `python` handler in benchmark pipelines."""

from __future__ import annotations

import time
from typing import Any


def sleep(ctx: Any, seconds: float = 0.0) -> dict[str, Any]:
    if seconds:
        time.sleep(seconds)
    return {}
