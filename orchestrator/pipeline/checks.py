"""Per-handler config checks run at sync time, so bad config fails before a batch starts.

Each handler module may define `check_config(config, base_dir) -> list[str]`; the
check is imported lazily and only at sync time.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

from orchestrator import handlers
from orchestrator.engine import breaker
from orchestrator.pipeline.spec import PipelineSpec, TaskSpec


def task_config_problems(tasks: Iterable[TaskSpec], base_dir: Path | None) -> list[str]:
    """Each task's config judged by its handler (and the router's breaker settings)."""
    problems: list[str] = []
    for task in tasks:
        problems.extend(f"task {task.name!r}: {p}" for p in breaker.check_config(task.config))
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
        # The breaker is the router's setting, not the handler's: keep it out of its check.
        own = {k: v for k, v in task.config.items() if k != breaker.CONFIG_KEY}
        problems.extend(f"task {task.name!r}: {p}" for p in check(own, base_dir))
    return problems


def prepared_configs(spec: PipelineSpec) -> dict[str, dict[str, object]]:
    """Each task's config as it should be stored: a handler's `prepare_config(config,
    base_dir)` (if it has one) inlines what only the pipeline folder holds, such as
    SQL files, so a worker elsewhere never needs that folder."""
    out: dict[str, dict[str, object]] = {}
    for task in spec.tasks:
        config = dict(task.config)
        target = handlers.BUILTIN.get(task.handler)
        if target is not None:
            module = importlib.import_module(target.partition(":")[0])
            prepare = getattr(module, "prepare_config", None)
            if prepare is not None:
                config = prepare(config, spec.base_dir)
        out[task.name] = config
    return out


def prepare_spec(spec: PipelineSpec) -> PipelineSpec:
    """The spec with prepared configs, ready to sync (its hash then covers the SQL text)."""
    configs = prepared_configs(spec)
    tasks = tuple(t.model_copy(update={"config": configs[t.name]}) for t in spec.tasks)
    return spec.model_copy(update={"tasks": tasks})
