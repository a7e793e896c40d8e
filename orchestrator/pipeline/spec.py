"""Pipelines as code: the typed definition, and its structural validation.

Validation collects every problem before reporting, so a user fixes a file in
one pass, and nothing is written unless the whole definition is sound. Reading
files, and the handlers' own config checks, live in `orchestrator.pipeline.load`.
"""

from __future__ import annotations

import graphlib
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.identifiers import NAME_RE
from orchestrator.pipeline.params import ParamSpec, check
from orchestrator.pipeline.timing import AlertsSpec, DeadlineSpec, ScheduleSpec, TimeRule
from orchestrator.status import TriggerRule


# Optional parts left out of the stored definition when unset, so adding one to the
# model does not change the hash (and the version) of every pipeline that lacks it.
def _unset(value: object) -> bool:
    return value is None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RetryPolicy(_Frozen):
    max_attempts: int = Field(default=3, ge=1, le=100)
    initial_delay_s: float = Field(default=10.0, ge=0)
    backoff_factor: float = Field(default=2.0, ge=1)
    max_delay_s: float = Field(default=600.0, ge=0)

    def delay_after(self, attempt: int) -> float:
        """Seconds to wait after attempt number `attempt` (1-based) failed."""
        delay = self.initial_delay_s * self.backoff_factor ** (attempt - 1)
        return float(min(delay, self.max_delay_s))


# GCS's own limit on an object name (UTF-8 bytes), and the stored pattern's.
MAX_OBJECT_NAME_BYTES = 1024


class GcsTrigger(_Frozen):
    """A root task that waits for an object: `gs://bucket/<pattern>`.

    The pattern names `{batch_id}` once and may use `*` for any run of
    characters within one path segment, e.g. `sales/{batch_id}/_SUCCESS` (a
    completeness marker) or `sales/{batch_id}/*.parquet`.
    """

    bucket: str
    pattern: str
    # If the object has not arrived by then, `file_late` alerts; `fail_after` fails the task.
    expected_by: TimeRule | None = Field(default=None, exclude_if=_unset)
    fail_after: TimeRule | None = Field(default=None, exclude_if=_unset)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._\-]{1,220}[a-z0-9]$", v):
            raise ValueError(f"invalid bucket name {v!r}")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v.count("{batch_id}") != 1:
            raise ValueError("pattern must contain {batch_id} exactly once")
        if v.startswith("/") or ".." in v:
            raise ValueError(f"invalid object pattern {v!r}")
        if len(v.encode()) > MAX_OBJECT_NAME_BYTES:
            raise ValueError(f"pattern is {len(v.encode()):,} bytes long; a GCS object name "
                             f"is at most {MAX_OBJECT_NAME_BYTES:,}")
        return v

    def regex(self) -> re.Pattern[str]:
        head, _, tail = self.pattern.partition("{batch_id}")

        def lit(s: str) -> str:
            return ".*?".join(re.escape(p).replace(r"\*", "[^/]*") for p in s.split("**"))

        return re.compile(f"^{lit(head)}(?P<batch_id>[^/]+?){lit(tail)}$")

    def match(self, bucket: str, name: str) -> str | None:
        """The batch id this object belongs to, or None if it is not this trigger's."""
        if bucket != self.bucket:
            return None
        m = self.regex().match(name)
        return m.group("batch_id") if m else None


MAX_INSTANCES_LIMIT = 100_000


class MapOver(_Frozen):
    """Run one instance of the task per item of a list known only at run time:
    the objects under a GCS prefix (`gcs_prefix`, with `{batch_id}` and batch
    params as placeholders), or a list in a parent's output (`parent_output:
    "parent.key"`). Each instance gets `ctx.input["item"]` and `ctx.input["map_index"]`;
    the task's children get the instances' outputs as a list, in index order. More
    than `max_instances` items fail the task."""

    gcs_prefix: str | None = None
    parent_output: str | None = None
    max_instances: int = Field(default=1000, ge=1, le=MAX_INSTANCES_LIMIT)

    @field_validator("gcs_prefix")
    @classmethod
    def _prefix(cls, v: str | None) -> str | None:
        if v is not None and (not v.startswith("gs://") or len(v) <= 5 or ".." in v):
            raise ValueError(f"gcs_prefix must be a gs:// URI prefix, got {v!r}")
        return v

    @field_validator("parent_output")
    @classmethod
    def _parent_output(cls, v: str | None) -> str | None:
        if v is not None and (v.count(".") < 1 or not all(v.split("."))):
            raise ValueError(f"parent_output must be 'parent.key', got {v!r}")
        return v

    @property
    def parent(self) -> str | None:
        return self.parent_output.split(".", 1)[0] if self.parent_output else None


class TaskSpec(_Frozen):
    name: str
    handler: str
    config: dict[str, Any] = Field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float = Field(default=600.0, gt=0)
    trigger_rule: TriggerRule = TriggerRule.ALL_SUCCESS
    concurrency: int | None = Field(default=None, ge=1)
    gcs_trigger: GcsTrigger | None = None
    map_over: MapOver | None = None
    description: str = ""


class PipelineSpec(_Frozen):
    name: str
    description: str = ""
    concurrency: int | None = Field(default=None, ge=1)
    tasks: tuple[TaskSpec, ...]
    # The params a batch takes, by name; None: any params, as given.
    params: dict[str, ParamSpec] | None = Field(default=None, exclude_if=_unset)
    schedule: ScheduleSpec | None = Field(default=None, exclude_if=_unset)
    deadline: DeadlineSpec | None = Field(default=None, exclude_if=_unset)
    alerts: AlertsSpec | None = Field(default=None, exclude_if=_unset)
    # Where relative paths in task configs (SQL files) resolve; not part of the identity.
    base_dir: Path | None = Field(default=None, exclude=True)
    # The file name it was read from (None if built in code); not part of the identity.
    source_file: str | None = Field(default=None, exclude=True)

    def task(self, name: str) -> TaskSpec:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)

    def topological_order(self) -> list[str]:
        ts = graphlib.TopologicalSorter({t.name: set(t.depends_on) for t in self.tasks})
        return list(ts.static_order())

    def canonical(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def definition_hash(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _problems_from_pydantic(exc: ValidationError, source: dict[str, Any]) -> list[str]:
    out = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
            tasks = source.get("tasks") or []
            name = tasks[loc[1]].get("name") if loc[1] < len(tasks) and isinstance(
                tasks[loc[1]], dict) else None
            where = f"task {name!r}" if name else f"tasks[{loc[1]}]"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc)
        prefix = " ".join(p for p in (where, field) if p)
        out.append(f"{prefix}: {err['msg']}" if prefix else err["msg"])
    return out


@dataclass(frozen=True)
class Parsed:
    """A definition's spec (None when its fields do not validate), the tasks that do
    validate on their own (for the checks that judge one task), and every structural
    problem found: fields, names, handlers, dependencies, cycles."""

    spec: PipelineSpec | None
    tasks: tuple[TaskSpec, ...]
    problems: list[str]


def parse_definition(data: Any, *, base_dir: Path | None, known_handlers: Iterable[str]) -> Parsed:
    """Judge a definition (a dict, as from YAML) as a whole; see `Parsed`."""
    known = set(known_handlers)
    if not isinstance(data, dict):
        return Parsed(None, (), ["the file must hold a mapping with 'name' and 'tasks'"])
    data = dict(data)
    problems: list[str] = []
    tasks = data.get("tasks")
    if isinstance(tasks, dict):
        # Also accept `tasks: {name: {...}}`, the shorter form for hand-written files.
        data["tasks"] = [{"name": k, **(v or {})} for k, v in tasks.items()]
    spec: PipelineSpec | None = None
    try:
        spec = PipelineSpec.model_validate({**data, "base_dir": base_dir})
    except ValidationError as exc:
        problems.extend(_problems_from_pydantic(exc, data))

    raw_tasks = [t for t in (data.get("tasks") or []) if isinstance(t, dict)]
    if not raw_tasks and "tasks" in data and not problems:
        problems.append("a pipeline needs at least one task")
    name = data.get("name")
    if isinstance(name, str) and not NAME_RE.match(name):
        problems.append(f"invalid pipeline name {name!r}: use letters, digits, _ and -")

    seen: set[str] = set()
    names = {t.get("name") for t in raw_tasks if isinstance(t.get("name"), str)}
    graph: dict[str, set[str]] = {}
    for t in raw_tasks:
        tname = t.get("name")
        if not isinstance(tname, str):
            continue
        if not NAME_RE.match(tname):
            problems.append(f"invalid task name {tname!r}: use letters, digits, _ and -")
        if tname in seen:
            problems.append(f"duplicate task name {tname!r}")
        seen.add(tname)
        handler = t.get("handler")
        if isinstance(handler, str) and handler not in known:
            problems.append(
                f"task {tname!r}: unknown handler {handler!r} (known: {', '.join(sorted(known))})"
            )
        deps = t.get("depends_on") or []
        if isinstance(deps, str):
            deps = [deps]
        if not isinstance(deps, list):
            continue
        # Other kinds of item are the field validation's to report.
        deps = [p for p in deps if isinstance(p, str)]
        problems.extend(f"task {tname!r}: depends_on names {parent!r} more than once"
                        for parent, n in Counter(deps).items() if n > 1)
        for parent in deps:
            if parent not in names:
                problems.append(f"task {tname!r}: depends on unknown task {parent!r}")
            elif parent == tname:
                problems.append(f"task {tname!r}: depends on itself")
        graph.setdefault(tname, set()).update(p for p in deps if p in names and p != tname)
        if t.get("gcs_trigger") and deps:
            problems.append(f"task {tname!r}: only a root task (no depends_on) may have a gcs_trigger")
        problems.extend(_map_problems(tname, t.get("map_over"), deps))

    if spec is not None and spec.params is not None:
        problems.extend(f"invalid param name {p!r}: use letters, digits, _ and -"
                        for p in spec.params if not NAME_RE.match(p))
        if spec.schedule is not None:
            _, wrong = check(spec.params, dict(spec.schedule.params))
            problems.extend(f"schedule.params: {p}" for p in wrong)

    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        cycle = exc.args[1]
        problems.append("cycle: " + " -> ".join(reversed(cycle)))

    if spec is not None:
        valid = spec.tasks
    else:
        valid = tuple(t for t in (_task_or_none(raw) for raw in raw_tasks) if t is not None)
    return Parsed(spec, valid, list(dict.fromkeys(problems)))


def _task_or_none(raw: dict[str, Any]) -> TaskSpec | None:
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError:
        return None


def _map_problems(task: str, raw: Any, deps: list[Any]) -> list[str]:
    if not isinstance(raw, dict):
        return []
    sources = [k for k in ("gcs_prefix", "parent_output") if raw.get(k) is not None]
    if len(sources) != 1:
        return [f"task {task!r}: map_over needs exactly one of gcs_prefix or parent_output"]
    parent = str(raw.get("parent_output") or "").split(".", 1)[0]
    if sources == ["parent_output"] and parent not in deps:
        return [f"task {task!r}: map_over.parent_output names {parent!r}, which is not in "
                "its depends_on"]
    return []
