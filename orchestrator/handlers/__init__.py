"""The handler registry: names a pipeline file may use, resolved lazily.

A handler is `run(ctx: TaskContext) -> dict | None`. Modules are imported on
first use so that a function instance that only routes messages never pays for
BigQuery or pyarrow at cold start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

BUILTIN: dict[str, str] = {
    "noop": "orchestrator.handlers.noop:run",
    "python": "orchestrator.handlers.python:run",
    "parquet_to_bigquery": "orchestrator.handlers.parquet_to_bigquery:run",
    "bigquery_query": "orchestrator.handlers.bigquery_query:run",
}

_extra: dict[str, str | Callable[..., Any]] = {}
_cache: dict[str, Callable[..., Any]] = {}


def register(name: str, target: str | Callable[..., Any]) -> None:
    """Register a handler by `module:function` path or by callable (tests, plugins)."""
    _extra[name] = target
    _cache.pop(name, None)


def unregister(name: str) -> None:
    _extra.pop(name, None)
    _cache.pop(name, None)


def names() -> frozenset[str]:
    return frozenset(BUILTIN) | frozenset(_extra)


def resolve(name: str) -> Callable[..., Any]:
    if name in _cache:
        return _cache[name]
    target = _extra.get(name, BUILTIN.get(name))
    if target is None:
        raise KeyError(name)
    fn = load_callable(target) if isinstance(target, str) else target
    _cache[name] = fn
    return fn


def load_callable(path: str) -> Callable[..., Any]:
    """`module:function`; a module that cannot be imported raises `usercode.ImportFailed`
    (a `PermanentError` naming the file and line)."""
    from orchestrator import usercode

    return usercode.load_callable(path)


def clear_cache() -> None:
    """Forget resolved handlers (after user modules were reloaded)."""
    _cache.clear()
