"""Per-handler config checks run at sync time, so bad config fails before a batch starts.

Each handler module may define `check_config(config, base_dir) -> list[str]`; the
check is imported lazily and only at sync time.
"""

from __future__ import annotations

import importlib

from orchestrator import handlers
from orchestrator.pipeline.spec import PipelineSpec


def handler_config_problems(spec: PipelineSpec) -> list[str]:
    problems: list[str] = []
    for task in spec.tasks:
        target = handlers.BUILTIN.get(task.handler)
        if target is None:
            continue
        try:
            module = importlib.import_module(target.partition(":")[0])
        except ModuleNotFoundError:
            continue
        check = getattr(module, "check_config", None)
        if check is None:
            continue
        problems.extend(f"task {task.name!r}: {p}" for p in check(task.config, spec.base_dir))
    return problems
