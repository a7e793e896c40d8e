"""Each page is a list of panels; each panel is one template fed by one load function.

A page first builds its context (the batch, task or pipeline it is about, read once),
then every panel's `load(session, page)` returns the data its template shows. A new
panel is one function and one template added to a list below; nothing else changes.
"""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy.orm import Session

from orchestrator import queries
from orchestrator.errors import NotFound
from orchestrator.status import BATCH_TERMINAL, FAILED, OPEN
from orchestrator.ui import layout, reads
from orchestrator.ui.urls import task_url

GRAPH_LIMIT = 300  # tasks; a larger DAG is a table, not a picture
TIMELINE_LIMIT = 200  # attempts drawn in the batch's timeline (a scrolling box)
TASK_ATTEMPTS_LIMIT = 200
# What the task page shows of the attempts' stories, whatever was stored: the log and
# traceback of the last few attempts only (earlier ones show their error), each log
# at most so many lines and characters (its first and last ones, the cut marked).
LOG_ATTEMPTS = 5
LOG_LINES = 1000
LOG_CHARS = 96 * 1024
LINE_CHARS = 4000
TRACEBACK_CHARS = 48 * 1024
ERROR_CHARS = 4000
ERROR_SHORT_CHARS = 500  # of an attempt shown without its log
# A task page follows an attempt that outlives its batch while it saves its log: one
# silent for longer lost its worker.
RUNNING_SILENT_S = 60.0
TABLE_PAGE = 200  # task rows per page of the batch's table
EVENTS_PAGE = 500
TASK_EVENTS_LIMIT = 200
INSTANCES_LIMIT = 200
RECENT_RUNS = 20
BATCHES_PAGE = 25
ERROR_PREVIEW = 160

TERMINAL_BATCH = frozenset(s.value for s in BATCH_TERMINAL)
FAILED_TASK = frozenset(s.value for s in FAILED)  # what "retry" reruns
OPEN_TASK = frozenset(s.value for s in OPEN)  # what "cancel" stops


@dataclass(frozen=True)
class Panel:
    template: str
    load: Callable[[Session, Any], dict[str, Any]]


def first_line(text: str | None, limit: int = ERROR_PREVIEW) -> str:
    if not text or not text.strip():
        return ""
    line = text.strip().splitlines()[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def clip_text(text: str | None, limit: int) -> str | None:
    """Text of at most about `limit` characters: its head and its tail, the cut said."""
    if text is None or len(text) <= limit:
        return text
    half = limit // 2
    return (f"{text[:half]}\n… {len(text) - 2 * half:,} characters not shown here …\n"
            f"{text[-half:]}")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


# -- the batches page -----------------------------------------------------------------------


@dataclass
class BatchesPage:
    filt: reads.BatchFilter
    now: datetime
    counts: reads.CountsCache | None = None


def load_runs(s: Session, page: BatchesPage) -> dict[str, Any]:
    return {"pipelines": reads.recent_runs(s, RECENT_RUNS)}


def load_batch_list(s: Session, page: BatchesPage) -> dict[str, Any]:
    rows, more = reads.batch_list(s, page.filt, BATCHES_PAGE, page.counts)
    return {"rows": rows, "more": more, "older": rows[-1].pk if more and rows else None,
            "filt": page.filt, "pipelines": reads.pipeline_names(s)}


BATCHES_PANELS = [
    Panel("panels/runs.html", load_runs),
    Panel("panels/batch_list.html", load_batch_list),
]


# -- a batch ------------------------------------------------------------------------------


@dataclass
class BatchPage:
    pipeline: str
    batch_id: str
    pk: int
    doc: dict[str, Any]  # queries.batch_status
    version: int
    now: datetime
    status_filter: str | None = None
    page: int = 1

    @property
    def status(self) -> str:
        return str(self.doc["status"])

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_BATCH

    @property
    def following(self) -> bool:
        return not self.finished

    @property
    def failed_tasks(self) -> int:
        return sum(n for st, n in self.doc["counts"].items() if st in FAILED_TASK)

    @property
    def open_tasks(self) -> int:
        return sum(n for st, n in self.doc["counts"].items() if st in OPEN_TASK)


def batch_page(s: Session, pipeline: str, batch_id: str, now: datetime,
               status_filter: str | None = None, page: int = 1) -> BatchPage:
    doc = queries.batch_status(s, batch_id, pipeline)
    pk = reads.batch_key(s, pipeline, batch_id)[0]
    version, _ = reads.batch_version(s, pk)
    return BatchPage(pipeline, batch_id, pk, doc, version, now, status_filter, max(1, page))


def _instance_note(t: dict[str, Any]) -> str:
    inst = t.get("instances")
    if not inst:
        return str(t["status"])
    done = inst["counts"].get("SUCCESS", 0)
    failed = sum(n for st, n in inst["counts"].items() if st in FAILED_TASK)
    note = f"{t['status']} · {done}/{inst['total']}"
    return note + (f" · {failed} failed" if failed else "")


def load_batch_header(s: Session, page: BatchPage) -> dict[str, Any]:
    return {"counts": page.doc["counts"], "total": len(page.doc["tasks"])}


def load_graph(s: Session, page: BatchPage) -> dict[str, Any]:
    tasks = page.doc["tasks"]
    if len(tasks) > GRAPH_LIMIT:
        return {"graph": None, "tasks": len(tasks), "limit": GRAPH_LIMIT, "href": None}
    graph = layout.dag([t["task"] for t in tasks],
                       [(p, t["task"]) for t in tasks for p in t["depends_on"]],
                       {t["task"]: t["status"] for t in tasks},
                       {t["task"]: _instance_note(t) for t in tasks})
    return {"graph": graph, "tasks": len(tasks), "limit": GRAPH_LIMIT,
            "href": functools.partial(task_url, page.pipeline, page.batch_id)}


def load_timeline(s: Session, page: BatchPage) -> dict[str, Any]:
    spans, more = reads.attempts(s, page.pk, limit=TIMELINE_LIMIT)
    created = datetime.fromisoformat(page.doc["created_at"])
    end = datetime.fromisoformat(page.doc["finished_at"]) if page.doc["finished_at"] else page.now
    chart = layout.timeline(
        [(a.label, task_url(page.pipeline, page.batch_id, a.task, a.map_index), a.started_at,
          a.finished_at,
          a.outcome, f"{a.label}: {a.outcome}"
                     + (f", {layout.seconds(a.duration_s)}" if a.duration_s is not None else "")
                     + (f" — {first_line(a.error, 200)}" if a.error else ""))
         for a in spans],
        created, end) if spans else None
    return {"chart": chart, "more": more, "limit": TIMELINE_LIMIT}


def load_task_table(s: Session, page: BatchPage) -> dict[str, Any]:
    tasks = page.doc["tasks"]
    if page.status_filter:
        tasks = [t for t in tasks if t["status"] == page.status_filter]
    pages = max(1, -(-len(tasks) // TABLE_PAGE))
    current = min(page.page, pages)
    shown = tasks[(current - 1) * TABLE_PAGE: current * TABLE_PAGE]
    rows = [{**t, "error_line": first_line(t["error"]), "note": _instance_note(t)
             if t.get("instances") else ""} for t in shown]
    return {"rows": rows, "matching": len(tasks), "page": current, "pages": pages,
            "status_filter": page.status_filter, "counts": page.doc["counts"],
            "total": len(page.doc["tasks"])}


BATCH_PANELS = [
    Panel("panels/batch_header.html", load_batch_header),
    Panel("panels/graph.html", load_graph),
    Panel("panels/timeline.html", load_timeline),
    Panel("panels/task_table.html", load_task_table),
]


# -- a task -------------------------------------------------------------------------------


@dataclass
class TaskPage:
    pipeline: str
    batch_id: str
    pk: int
    batch_status: str
    version: str  # what the live stream announces: the page is current while it holds
    task: reads.TaskDetail
    now: datetime
    instance: int | None = None  # the attempts of one instance of a mapped task
    running: bool = False  # an attempt of the task (or instance) saved its log lately

    @property
    def finished(self) -> bool:
        return self.batch_status in TERMINAL_BATCH

    @property
    def following(self) -> bool:
        """Whether the page listens for changes: while its batch runs, and while an
        attempt still runs after the batch ended (its last lines are yet to come)."""
        return not self.finished or self.running


def task_version(s: Session, pk: int, task_id: int, instance: int | None,
                 now: datetime) -> tuple[str, str, bool]:
    """(version, batch status, running): a task page's version moves with its batch
    (every transition) and with the log of a running attempt, which its worker saves
    every few seconds while the handler runs. Three index lookups.

    `running` is whether an attempt saved its log lately: one still RUNNING after its
    batch ended is a handler that was cancelled (its worker closes it within seconds)
    or whose worker died (its record stays RUNNING for good, and is not followed)."""
    newest, status = reads.batch_version(s, pk)
    stamp = reads.log_stamp(s, pk, task_id, instance)
    if stamp is None:
        return str(newest), status, False
    lately = (now - stamp).total_seconds() <= RUNNING_SILENT_S
    return f"{newest}.{int(stamp.timestamp() * 1000)}", status, lately


def task_page(s: Session, pipeline: str, batch_id: str, task: str, now: datetime,
              instance: int | None = None) -> TaskPage:
    pk = reads.batch_key(s, pipeline, batch_id)[0]
    detail = reads.task_detail(s, pk, task)
    if instance is not None and not reads.has_instance(s, pk, detail.task_id, instance):
        raise NotFound(f"{task} has no instance {instance}" if detail.mapped
                       else f"{task} is not a mapped task: it has no instances")
    version, status, running = task_version(s, pk, detail.task_id, instance, now)
    return TaskPage(pipeline, batch_id, pk, status, version, detail, now, instance, running)


def load_task_summary(s: Session, page: TaskPage) -> dict[str, Any]:
    return {"why": queries.why(s, page.batch_id, page.task.name, page.now, page.pipeline)}


@dataclass
class LogLine:
    at: str  # HH:MM:SS.mmm (UTC)
    at_full: str
    stream: str  # stdout, stderr, log, orchestrator (anything else: "other")
    level: str | None  # for log records: DEBUG … CRITICAL as recorded
    logger: str | None  # a module's own logger (ctx.log's needs no name)
    text: str

    @property
    def css(self) -> str:
        css = f"ln ln-{self.stream}"
        if self.level and self.level.lower() in LEVELS:
            css += f" lv-{self.level.lower()}"
        return css


@dataclass
class LogView:
    head: list[LogLine]
    tail: list[LogLine] = field(default_factory=list)  # after the lines left out
    hidden: int = 0  # lines between the head and the tail that the page leaves out
    hidden_chars: int = 0

    @property
    def count(self) -> int:
        return len(self.head) + len(self.tail) + self.hidden


STREAMS = frozenset({"stdout", "stderr", "log", "orchestrator"})
LEVELS = frozenset({"debug", "info", "warning", "error", "critical"})
TASK_LOGGER = "orchestrator.task"


def _log_line(entry: Any) -> LogLine:
    if not isinstance(entry, dict):
        entry = {"line": entry}
    at = str(entry.get("at") or "")
    stream = str(entry.get("stream") or "")
    level = entry.get("level")
    logger = entry.get("logger")
    text = str(entry.get("line", ""))
    if len(text) > LINE_CHARS:
        text = f"{text[:LINE_CHARS]}… ({len(text) - LINE_CHARS:,} more characters not shown)"
    return LogLine(at=at[11:23] if len(at) >= 23 else at, at_full=at,
                   stream=stream if stream in STREAMS else "other",
                   level=str(level) if level else None,
                   logger=str(logger) if logger and not str(logger).startswith(TASK_LOGGER)
                   else None,
                   text=text)


def log_view(entries: list[Any], lines: int = LOG_LINES, chars: int = LOG_CHARS) -> LogView:
    """The lines of a stored log that a page shows: all of them, or (past `lines` lines
    or `chars` characters) its first and its last ones, as the worker keeps them."""
    costs = [min(len(str(e.get("line", "")) if isinstance(e, dict) else str(e)), LINE_CHARS)
             for e in entries]
    if len(entries) <= lines and sum(costs) <= chars:
        return LogView([_log_line(e) for e in entries])
    head, used = 0, 0
    while head < len(entries) and head < lines // 2 and used + costs[head] <= chars // 2:
        used += costs[head]
        head += 1
    tail, room = 0, chars - used
    while (tail < len(entries) - head and head + tail < lines
           and costs[len(entries) - 1 - tail] <= room):
        room -= costs[len(entries) - 1 - tail]
        tail += 1
    hidden = range(head, len(entries) - tail)
    return LogView([_log_line(e) for e in entries[:head]],
                   [_log_line(e) for e in entries[len(entries) - tail:]],
                   hidden=len(hidden), hidden_chars=sum(costs[k] for k in hidden))


@dataclass
class AttemptView:
    a: reads.Attempt
    error: str | None
    traceback: str | None
    log: LogView | None  # None: not shown on this page (an earlier attempt)
    open: bool  # its story is unfolded when the page opens


def load_attempts(s: Session, page: TaskPage) -> dict[str, Any]:
    rows, more = reads.task_attempts(s, page.pk, page.task.task_id, page.task.name,
                                     instance=page.instance, limit=TASK_ATTEMPTS_LIMIT,
                                     bodies=LOG_ATTEMPTS)
    newest = max((i for i, a in enumerate(rows) if a.log is not None), default=None)
    views = [AttemptView(
        a=a, error=clip_text(a.error, ERROR_CHARS if a.log is not None else ERROR_SHORT_CHARS),
        traceback=clip_text(a.traceback, TRACEBACK_CHARS),
        log=log_view(a.log) if a.log is not None else None,
        open=i == newest or a.outcome == "RUNNING",
    ) for i, a in enumerate(rows)]
    instance = f"{page.task.name}[{page.instance}]" if page.instance is not None else None
    shown = instance or (f"{page.task.name}[N]" if page.task.mapped else page.task.name)
    command = " ".join(shlex.quote(p) for p in ("orchestrator", "logs", page.batch_id, shown,
                                                "--pipeline", page.pipeline))
    return {"attempts": views, "more": more, "instance": instance, "command": command,
            "log_attempts": LOG_ATTEMPTS}


def load_task_data(s: Session, page: TaskPage) -> dict[str, Any]:
    t = page.task
    return {"input": None if t.input is None else pretty_json(t.input),
            "output": None if t.output is None else pretty_json(t.output)}


def load_instances(s: Session, page: TaskPage) -> dict[str, Any]:
    if not page.task.mapped:
        return {"instances": None}
    rows, total = reads.instances(s, page.pk, page.task.task_id, INSTANCES_LIMIT)
    return {"instances": rows, "total": total}


def load_task_events(s: Session, page: TaskPage) -> dict[str, Any]:
    rows, more = reads.events_page(s, page.pk, limit=TASK_EVENTS_LIMIT, task_id=page.task.task_id)
    return {"events": rows, "more": more}


TASK_PANELS = [
    Panel("panels/task_summary.html", load_task_summary),
    Panel("panels/attempts.html", load_attempts),
    Panel("panels/task_data.html", load_task_data),
    Panel("panels/instances.html", load_instances),
    Panel("panels/task_events.html", load_task_events),
]


# -- a pipeline ---------------------------------------------------------------------------


@dataclass
class PipelinePage:
    info: reads.PipelineInfo
    version: int  # the version shown (the current one unless asked)
    now: datetime
    tasks: list[reads.TaskDefinition] = field(default_factory=list)
    counts: reads.CountsCache | None = None


def pipeline_page(s: Session, name: str, now: datetime, version: int | None = None) -> PipelinePage:
    info = reads.pipeline_info(s, name)
    shown = version if version is not None else info.version
    tasks = reads.pipeline_tasks(s, info.id, shown)
    if not tasks:
        raise NotFound(f"pipeline {name!r} has no version {shown}")
    return PipelinePage(info, shown, now, tasks)


def load_pipeline_graph(s: Session, page: PipelinePage) -> dict[str, Any]:
    if len(page.tasks) > GRAPH_LIMIT:
        return {"graph": None, "tasks": len(page.tasks), "limit": GRAPH_LIMIT}
    graph = layout.dag([t.name for t in page.tasks],
                       [(p, t.name) for t in page.tasks for p in t.depends_on],
                       None, {t.name: t.handler for t in page.tasks})
    return {"graph": graph, "tasks": len(page.tasks), "limit": GRAPH_LIMIT}


def load_definition(s: Session, page: PipelinePage) -> dict[str, Any]:
    # The stored definition is the whole validated file, so whatever a pipeline may
    # declare (triggers, limits, retry policies, schedules) shows here as written.
    text = (yaml.safe_dump(page.info.definition, sort_keys=False, allow_unicode=True)
            if page.version == page.info.version else None)
    return {"tasks": page.tasks, "yaml": text}


def load_versions(s: Session, page: PipelinePage) -> dict[str, Any]:
    return {"versions": reads.pipeline_versions(s, page.info.id)}


def load_schedule(s: Session, page: PipelinePage) -> dict[str, Any]:
    # The same listing as `orchestrator schedules` (times in the schedule's zone).
    from orchestrator import schedules

    found = [r for r in schedules.listing(s, page.now) if r["pipeline"] == page.info.name]
    return {"schedule": found[0] if found else None}


def load_pipeline_batches(s: Session, page: PipelinePage) -> dict[str, Any]:
    rows, more = reads.batch_list(s, reads.BatchFilter(pipeline=page.info.name), RECENT_RUNS,
                                  page.counts)
    return {"rows": rows, "more": more, "filt": reads.BatchFilter(pipeline=page.info.name)}


PIPELINE_PANELS = [
    Panel("panels/schedule.html", load_schedule),
    Panel("panels/pipeline_graph.html", load_pipeline_graph),
    Panel("panels/pipeline_batches.html", load_pipeline_batches),
    Panel("panels/definition.html", load_definition),
    Panel("panels/versions.html", load_versions),
]


def render_panels(s: Session, panels: list[Panel], page: Any) -> list[tuple[str, dict[str, Any]]]:
    return [(p.template, p.load(s, page)) for p in panels]
