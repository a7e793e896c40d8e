"""One task's handler, run in this process with no metadata database: what
`orchestrator task test` does, and what `orchestrator.testing.task_context` and
`run_task` give a unit test.

The context is the one a worker builds: the task's config as synced (SQL files
inlined), the batch params, the parents' outputs by name, the triggering object,
and the warehouse and object store of the settings (the embedded DuckDB and local
buckets by default), built only if the handler asks for them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from orchestrator import capture, execution, handlers, usercode
from orchestrator.errors import InvalidInput, PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.load import load_pipelines
from orchestrator.pipeline.spec import PipelineSpec, TaskSpec
from orchestrator.ports import Clock, ObjectStore, SystemClock, Warehouse
from orchestrator.settings import Settings, get_settings


def find_pipeline(pipeline: str | Path | PipelineSpec,
                  settings: Settings | None = None) -> PipelineSpec:
    """A spec as is, a pipeline YAML file, or the name of one in the pipelines folder."""
    if isinstance(pipeline, PipelineSpec):
        return pipeline
    path = Path(pipeline)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise InvalidInput(f"no pipeline file {str(path)!r}")
        specs = load_pipelines(path)
        usercode.add_path(path.resolve().parent)
        return specs[0]
    folder = (settings or get_settings()).pipelines_dir
    if not folder.is_dir():
        raise InvalidInput(f"no pipeline file {str(pipeline)!r}, and no pipelines folder "
                           f"{str(folder)!r} to find it in (ORCHESTRATOR_PIPELINES_DIR)")
    found = [s for s in load_pipelines(folder) if s.name == str(pipeline)]
    if not found:
        raise InvalidInput(f"no pipeline {str(pipeline)!r} in {folder} (give its YAML file, "
                           "or set ORCHESTRATOR_PIPELINES_DIR)")
    usercode.add_path(folder)
    return found[0]


def _task(spec: PipelineSpec, name: str) -> TaskSpec:
    try:
        return spec.task(name)
    except KeyError:
        known = ", ".join(t.name for t in spec.tasks)
        raise InvalidInput(f"pipeline {spec.name!r} has no task {name!r} (its tasks: {known})"
                           ) from None


def _trigger(trigger: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if trigger is None:
        return {}
    if isinstance(trigger, Mapping):
        return dict(trigger)
    if not trigger.startswith("gs://") or "/" not in trigger[5:]:
        raise InvalidInput(f"trigger {trigger!r} is not a gs://bucket/object URI")
    bucket, _, name = trigger[5:].partition("/")
    return {"uri": trigger, "bucket": bucket, "name": name}


class _Once:
    def __init__(self, build: Callable[[], Any]):
        self._build = build
        self._value: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            if self._value is None:
                self._value = self._build()
            return self._value


def task_context(
    pipeline: str | Path | PipelineSpec,
    task: str,
    *,
    params: Mapping[str, Any] | None = None,
    parents: Mapping[str, Any] | None = None,
    trigger: str | Mapping[str, Any] | None = None,
    item: Any = None,
    map_index: int | None = None,
    batch_id: str = "test",
    attempt: int = 1,
    config: Mapping[str, Any] | None = None,
    warehouse: Warehouse | None = None,
    object_store: ObjectStore | None = None,
    clock: Clock | None = None,
    settings: Settings | None = None,
) -> TaskContext:
    """The context a worker would give `task` of `pipeline` (a YAML file, a name in the
    pipelines folder, or a spec), with these params, parent outputs and trigger.

    `parents` maps a parent's name to its output; a name that is not one of the task's
    parents is an error. `config` overrides keys of the task's config.
    """
    settings = settings or get_settings()
    usercode.add_path(settings.pipelines_dir)
    spec = find_pipeline(pipeline, settings)
    t = _task(spec, task)
    given = dict(parents or {})
    unknown = sorted(set(given) - set(t.depends_on))
    if unknown:
        theirs = ", ".join(t.depends_on) or "none"
        raise InvalidInput(f"task {task!r} has no parent {unknown[0]!r} (its parents: {theirs})")
    task_input: dict[str, Any] = {
        "params": dict(params or {}),
        "parents": given,
        "parent_status": {name: "SUCCESS" for name in given},
        "trigger": _trigger(trigger),
    }
    if item is not None or map_index is not None:
        task_input["item"] = item
        task_input["map_index"] = map_index if map_index is not None else 0
        if isinstance(item, str) and item.startswith("gs://") and trigger is None:
            task_input["trigger"] = _trigger(item)
    clock = clock or SystemClock()
    from orchestrator.runtime import make_object_store, make_warehouse

    return TaskContext(
        pipeline=spec.name, batch_id=batch_id, task=t.name, attempt=attempt,
        config={**t.config, **dict(config or {})}, input=task_input,
        deadline=clock.now() + timedelta(seconds=t.timeout_s),
        warehouse_factory=(lambda: warehouse) if warehouse is not None
        else _Once(lambda: make_warehouse(settings)),
        object_store_factory=(lambda: object_store) if object_store is not None
        else _Once(lambda: make_object_store(settings)),
        clock=clock, base_dir=spec.base_dir,
    )


@dataclass
class TaskRun:
    """What one run of a handler did."""

    output: dict[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    log: list[dict[str, Any]] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """What it printed and logged, one line per entry."""
        return "\n".join(e["line"] for e in self.log)


def run_task(pipeline: str | Path | PipelineSpec, task: str, *,
             echo: Callable[[dict[str, Any]], None] | None = None,
             **context: Any) -> TaskRun:
    """Run `task` of `pipeline` as a worker would (its output checked, its lines
    captured, its timeout enforced) with the context `task_context(pipeline, task,
    **context)` builds; returns what happened, never raising the task's error."""
    spec = find_pipeline(pipeline, context.get("settings"))
    t = _task(spec, task)
    ctx = task_context(spec, task, **context)
    return run_context(ctx, t.handler, timeout_s=t.timeout_s, echo=echo)


def run_context(ctx: TaskContext, handler: str = "python", *, timeout_s: float = 600.0,
                echo: Callable[[dict[str, Any]], None] | None = None) -> TaskRun:
    """Run a handler with a context built by hand (see `task_context`)."""
    log = capture.AttemptLog(echo=echo)
    started = time.monotonic()
    try:
        try:
            fn = handlers.resolve(handler)
        except (KeyError, PermanentError, ValueError) as exc:
            raise PermanentError(f"handler {handler!r} cannot be loaded: {exc}") from exc
        output = _json_output(execution.run_in_thread(fn, ctx, log, timeout_s=timeout_s))
    except Exception as exc:
        failure = execution.describe(exc)
        return TaskRun(error=failure.error, traceback=failure.traceback, log=log.entries(),
                       duration_s=time.monotonic() - started)
    return TaskRun(output=output, log=log.entries(), duration_s=time.monotonic() - started)


def _json_output(output: Any) -> dict[str, Any] | None:
    if output is None:
        return None
    if not isinstance(output, dict):
        raise PermanentError(f"handler returned {type(output).__name__}, expected a dict")
    try:
        return json.loads(json.dumps(output, default=str))
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"handler output is not JSON-serialisable: {exc}") from exc
