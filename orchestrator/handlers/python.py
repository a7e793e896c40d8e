"""`python`: call a user function, `callable: "package.module:function"`.

The function receives the `TaskContext` (its `input` holds the batch params, the
parents' outputs and the triggering object) and returns a JSON-ready dict, which
becomes the task's output and its children's input. It raises `RetryableError`
for a transient failure and `PermanentError` for one no retry can fix; anything
else goes through the task's retry policy.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator import handlers
from orchestrator.errors import PermanentError
from orchestrator.handlers.context import TaskContext

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
CALLABLE_RE = re.compile(rf"^{_DOTTED}:{_DOTTED}$")


def check_config(config: dict[str, Any], base_dir: object) -> list[str]:
    # Only the form is checked: the module may be importable on the workers alone.
    target = config.get("callable")
    if target is None:
        return ["python: 'callable' is required, e.g. 'my_package.tasks:build_report'"]
    if not isinstance(target, str) or not CALLABLE_RE.match(target):
        return [f"python: 'callable' must be 'module:function', got {target!r}"]
    unknown = set(config) - {"callable", "kwargs"}
    problems = [f"python: unknown config key {k!r}" for k in sorted(unknown)]
    if "kwargs" in config and not isinstance(config["kwargs"], dict):
        problems.append("python: 'kwargs' must be a mapping")
    return problems


def run(ctx: TaskContext) -> dict[str, Any] | None:
    target = ctx.config.get("callable")
    if not isinstance(target, str) or not CALLABLE_RE.match(target):
        raise PermanentError(f"python: 'callable' must be 'module:function', got {target!r}")
    try:
        fn = handlers.load_callable(target)
    except (PermanentError, ValueError) as exc:
        # Whatever stops the module from loading (a SyntaxError as much as an
        # ImportError) will stop it on every retry: fail now, saying where.
        raise PermanentError(f"python: cannot load {target!r}: {exc}") from exc
    output = fn(ctx, **dict(ctx.config.get("kwargs") or {}))
    if output is not None and not isinstance(output, dict):
        raise PermanentError(f"python: {target} returned {type(output).__name__}, expected a dict")
    return output
