"""Read-only queries over the task log: what the CLI, the `status` function and SQL users see.

Every function takes a session and never writes. Times are ISO 8601 strings in UTC.

`batch_status` returns a stable, versioned shape (`schema` names the version; a
field is only ever added within a version, never renamed or removed)::

    {
      "schema": "orchestrator.batch_status/v1",
      "pipeline": "monthly_profit",
      "batch_id": "2024-03",
      "status": "RUNNING" | "SUCCESS" | "FAILED" | "CANCELLED",
      "params": {...},
      "created_at": "2024-04-01T00:00:00+00:00",
      "finished_at": null | "...",
      "duration_s": null | 12.5,
      "deadline_at": null | "...",    # when it fails if not done (`deadline:`)
      "warn_at": null | "...",        # when `deadline_warning` alerts (cleared once it has)
      "logical_at": null | "...",     # the schedule tick it runs for
      "counts": {"SUCCESS": 2, "PENDING": 1},      # only the statuses present
      "tasks": [                                   # in topological order
        {"task": "load_sales", "status": "SUCCESS",
         "attempt": 1,            # the attempt running, or the next one to run
         "max_attempts": 3,       # the last attempt allowed (counts manual retries)
         "trigger_rule": "all_success", "depends_on": [],
         "waiting_for_file": false,
         "queued_at": "...", "started_at": "...", "finished_at": "...",
         "duration_s": 0.8, "next_attempt_at": null,
         "error": null, "output": {...},
         "instances": null | {"total": 500, "counts": {"SUCCESS": 500}}},  # mapped tasks
        ...
      ]
    }
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from orchestrator.db.models import (
    Batch,
    Pipeline,
    Task,
    TaskAttempt,
    TaskDependency,
    TaskEvent,
    TaskLog,
)
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.pipeline import versions
from orchestrator.pipeline.timing import local_clock
from orchestrator.status import TaskStatus

SCHEMA = "orchestrator.batch_status/v1"

S = TaskStatus


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds to the millisecond, half away from zero (as the database rounds them)."""
    if start is None or end is None:
        return None
    us = (end - start) // timedelta(microseconds=1)
    ms = (abs(us) + 500) // 1000
    return (ms if us >= 0 else -ms) / 1000


def _value(v: Any) -> Any:
    return getattr(v, "value", v)


def _find_batch(session: Session, batch_id: str, pipeline: str | None) -> tuple[Batch, str]:
    stmt = (
        select(Batch, Pipeline.name)
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .where(Batch.batch_id == batch_id)
    )
    if pipeline is not None:
        stmt = stmt.where(Pipeline.name == pipeline)
    rows = session.execute(stmt.order_by(Pipeline.name)).all()
    if not rows:
        if pipeline is not None:
            known = session.execute(
                select(Pipeline.id).where(Pipeline.name == pipeline)
            ).first()
            if known is None:
                raise NotFound(f"unknown pipeline {pipeline!r}")
            raise NotFound(f"no batch {batch_id!r} of pipeline {pipeline!r}")
        raise NotFound(f"no batch {batch_id!r}")
    if len(rows) > 1:
        names = ", ".join(r[1] for r in rows)
        raise InvalidInput(
            f"batch {batch_id!r} exists in several pipelines ({names}); name one with --pipeline"
        )
    return rows[0][0], rows[0][1]


def _task_rows(session: Session, batch: Batch, map_index: int = -1,
               task_id: int | None = None) -> list[Any]:
    # One query, driven by the (batch_pk, task_id, map_index) unique index on task_log;
    # a mapped task's instances are not listed.
    stmt = (
        select(
            Task.id, Task.name, Task.max_attempts, Task.gcs_bucket, Task.gcs_pattern,
            TaskLog.status, TaskLog.attempt, TaskLog.retry_base, TaskLog.trigger_rule,
            TaskLog.waiting_for_file, TaskLog.queued_at, TaskLog.dispatched_at,
            TaskLog.started_at, TaskLog.finished_at, TaskLog.next_attempt_at,
            TaskLog.lease_expires_at, TaskLog.error, TaskLog.output, Task.map_over,
        )
        .join(Task, Task.id == TaskLog.task_id)
        .where(TaskLog.batch_pk == batch.id, TaskLog.map_index == map_index)
    )
    if task_id is not None:
        stmt = stmt.where(TaskLog.task_id == task_id)
    return list(session.execute(stmt).all())


def _parents(session: Session, batch: Batch) -> dict[int, list[int]]:
    child = Task.__table__.alias("child")
    rows = session.execute(
        select(TaskDependency.child_task_id, TaskDependency.parent_task_id)
        .join(child, child.c.id == TaskDependency.child_task_id)
        .where(child.c.pipeline_id == batch.pipeline_id,
               child.c.version == batch.pipeline_version)
    ).all()
    parents: dict[int, list[int]] = {}
    for c, p in rows:
        parents.setdefault(c, []).append(p)
    return parents


def _max_attempts(row: Any) -> int:
    return int(row.retry_base or 0) + int(row.max_attempts)


def batch_status(session: Session, batch_id: str, pipeline: str | None = None) -> dict[str, Any]:
    """The whole batch as JSON-ready data (see the module docstring for the shape)."""
    return json.loads(batch_status_json(session, batch_id, pipeline))


def batch_status_json(session: Session, batch_id: str, pipeline: str | None = None) -> str:
    """`batch_status` as JSON text, the tasks' array written by the database.

    One statement after the batch's lookup: every task of the batch, read through the
    (batch_pk, task_id, map_index) index, with its status and its object as JSON text,
    in the order fixed at sync (`tasks.position`). Python counts the statuses, writes
    the head and joins the objects, so the `status` function and `status --json` serve
    a 10,000-task batch as the database wrote it.
    """
    batch, pipeline_name = _find_batch(session, batch_id, pipeline)
    statement = (_PG_TASKS_JSON if session.get_bind().dialect.name == "postgresql"
                 else _SQLITE_TASKS_JSON)
    rows = session.execute(statement, {"batch_pk": batch.id}).all()
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[0]] = counts.get(r[0], 0) + 1
    head = json.dumps({
        "schema": SCHEMA,
        "pipeline": pipeline_name,
        "batch_id": batch.batch_id,
        "status": _value(batch.status),
        "params": batch.params or {},
        "created_at": _iso(batch.created_at),
        "finished_at": _iso(batch.finished_at),
        "duration_s": _seconds(batch.created_at, batch.finished_at),
        "deadline_at": _iso(batch.deadline_at),
        "warn_at": _iso(batch.warn_at),
        "logical_at": _iso(batch.logical_at),
        "counts": {k.value: counts[k.value] for k in S if k.value in counts},
    })
    tasks = ", ".join(r[1] for r in rows)
    return f'{head[:-1]}, "tasks": [{tasks}]}}'


def _status_order(column: str) -> str:
    """An SQL expression ordering statuses as `TaskStatus` declares them."""
    whens = " ".join(f"WHEN '{s.value}' THEN {i}" for i, s in enumerate(S))
    return f"CASE {column} {whens} END"


def _sqlite_iso(column: str) -> str:
    """`datetime.isoformat()` of SQLAlchemy's SQLite datetime text (naive UTC)."""
    return (f"CASE WHEN {column} IS NULL THEN NULL "
            f"WHEN length({column}) = 19 OR substr({column}, 21) = '000000' "
            f"THEN substr({column}, 1, 10) || 'T' || substr({column}, 12, 8) || '+00:00' "
            f"ELSE substr({column}, 1, 10) || 'T' || substr({column}, 12) || '+00:00' END")


def _sqlite_us(column: str) -> str:
    """Microseconds since the epoch of SQLAlchemy's SQLite datetime text."""
    return (f"(CAST(strftime('%s', substr({column}, 1, 19)) AS INTEGER) * 1000000 "
            f"+ CAST(substr({column} || '.000000', 21, 6) AS INTEGER))")


def _sqlite_seconds(start: str, end: str) -> str:
    """`_seconds` in SQLite: integer microseconds to milliseconds, half away from zero."""
    us = f"({_sqlite_us(end)} - {_sqlite_us(start)})"
    return (f"CASE WHEN {start} IS NULL OR {end} IS NULL THEN NULL "
            f"WHEN {us} >= 0 THEN (({us} + 500) / 1000) / 1000.0 "
            f"ELSE -((500 - {us}) / 1000) / 1000.0 END")


def _pg_json_time(column: str) -> str:
    """A timestamptz as the JSON value `datetime.isoformat()` gives, in UTC: the string
    in its quotes (to_char writes them too; microseconds only when not 0), or null."""
    return (f"""coalesce(replace(to_char({column} AT TIME ZONE 'UTC', """
            f"""'"\\""YYYY-MM-DD"T"HH24:MI:SS.US"+00:00\\""'), '.000000+', '+'), 'null')""")


def _pg_task_object() -> str:
    """One task's object as JSON text, concatenated from its parts (each written as
    row_to_json writes it, with no spaces) rather than built as a json value: per row,
    building costs several times what concatenating does."""
    instances = f"""(
        SELECT json_build_object('total', sum(c.n), 'counts',
                                 json_object_agg(c.status, c.n ORDER BY c.o))
        FROM (SELECT i.status, count(*) AS n, {_status_order('i.status')} AS o
              FROM task_log i
              WHERE i.batch_pk = l.batch_pk AND i.task_id = l.task_id AND i.map_index >= 0
              GROUP BY i.status) c
        HAVING count(*) > 0)::text"""
    # status and trigger_rule are checked enum values: nothing in them needs escaping.
    return f"""'{{"task":' || to_json(l.name)::text
        || ',"status":"' || l.status::text
        || '","attempt":' || l.attempt::text
        || ',"max_attempts":' || (coalesce(l.retry_base, 0) + l.max_attempts)::text
        || ',"trigger_rule":"' || l.trigger_rule::text
        || '","depends_on":' || l.depends_on_json
        || ',"waiting_for_file":' || CASE WHEN l.waiting_for_file THEN 'true' ELSE 'false' END
        || ',"queued_at":' || {_pg_json_time('l.queued_at')}
        || ',"started_at":' || {_pg_json_time('l.started_at')}
        || ',"finished_at":' || {_pg_json_time('l.finished_at')}
        || ',"duration_s":' || coalesce(
            round(extract(epoch FROM l.finished_at - l.started_at)::numeric, 3)::text, 'null')
        || ',"next_attempt_at":' || {_pg_json_time('l.next_attempt_at')}
        || ',"error":' || coalesce(to_json(l.error)::text, 'null')
        || ',"output":' || coalesce(l.output::text, 'null')
        || ',"instances":' || CASE WHEN l.map_over IS NOT NULL
                                        AND jsonb_typeof(l.map_over) <> 'null'
                                   THEN coalesce({instances}, 'null') ELSE 'null' END
        || '}}'"""


# Status and object of each task, in order. The rows are sorted by position before
# their objects are written (the outer ORDER BY is the subquery's order, so it costs
# no second sort): sorting the written objects would move 3-4 MB through the sort.
_PG_TASKS_JSON = text(f"""
SELECT l.status, {_pg_task_object()}
FROM (SELECT l.batch_pk, l.task_id, l.status, l.attempt, l.retry_base, l.trigger_rule,
             l.waiting_for_file, l.queued_at, l.started_at, l.finished_at,
             l.next_attempt_at, l.error, l.output,
             t.position, t.name, t.max_attempts, t.depends_on_json, t.map_over
      FROM task_log l
      JOIN tasks t ON t.id = l.task_id
      WHERE l.batch_pk = :batch_pk AND l.map_index = -1
      ORDER BY t.position, l.task_id) l
ORDER BY l.position, l.task_id
""")

# The same on SQLite, its object built by json_object.
_SQLITE_TASKS_JSON = text(f"""
SELECT l.status, json_object(
    'task', t.name,
    'status', l.status,
    'attempt', l.attempt,
    'max_attempts', ifnull(l.retry_base, 0) + t.max_attempts,
    'trigger_rule', l.trigger_rule,
    'depends_on', json(t.depends_on_json),
    'waiting_for_file', CASE WHEN l.waiting_for_file THEN json('true') ELSE json('false') END,
    {", ".join(f"'{c}', {_sqlite_iso('l.' + c)}" for c in ("queued_at", "started_at",
                                                            "finished_at"))},
    'duration_s', {_sqlite_seconds('l.started_at', 'l.finished_at')},
    'next_attempt_at', {_sqlite_iso('l.next_attempt_at')},
    'error', l.error,
    'output', json(l.output),
    'instances', CASE WHEN t.map_over IS NOT NULL AND t.map_over <> 'null' THEN json((
        SELECT json_object('total', sum(c.n), 'counts', json_group_object(c.status, c.n))
        FROM (SELECT i.status AS status, count(*) AS n FROM task_log i
              WHERE i.batch_pk = l.batch_pk AND i.task_id = l.task_id AND i.map_index >= 0
              GROUP BY i.status ORDER BY {_status_order('i.status')}) c
        HAVING count(*) > 0)) END)
FROM task_log l
JOIN tasks t ON t.id = l.task_id
WHERE l.batch_pk = :batch_pk AND l.map_index = -1
ORDER BY t.position, t.id
""")


def recent_batches(session: Session, limit: int = 20, pipeline: str | None = None) -> list[dict[str, Any]]:
    """The newest batches first, each with its task counts by status."""
    stmt = select(Batch, Pipeline.name).join(Pipeline, Pipeline.id == Batch.pipeline_id)
    if pipeline is not None:
        stmt = stmt.where(Pipeline.name == pipeline)
    rows = session.execute(stmt.order_by(Batch.created_at.desc(), Batch.id.desc()).limit(limit)).all()
    counts: dict[int, dict[str, int]] = {}
    if rows:
        for pk, status, n in session.execute(
            select(TaskLog.batch_pk, TaskLog.status, func.count())
            .where(TaskLog.batch_pk.in_([b.id for b, _ in rows]), TaskLog.map_index == -1)
            .group_by(TaskLog.batch_pk, TaskLog.status)
        ):
            counts.setdefault(pk, {})[_value(status)] = n
    out = []
    for b, name in rows:
        c = counts.get(b.id, {})
        out.append({
            "pipeline": name,
            "batch_id": b.batch_id,
            "status": _value(b.status),
            "params": b.params or {},
            "created_at": _iso(b.created_at),
            "finished_at": _iso(b.finished_at),
            "duration_s": _seconds(b.created_at, b.finished_at),
            "counts": {k.value: c[k] for k in S if k in c},
        })
    return out


def batch_events(session: Session, batch_id: str, pipeline: str | None = None) -> list[dict[str, Any]]:
    """The batch's transition history, oldest first (task is None for batch-level events)."""
    batch, _ = _find_batch(session, batch_id, pipeline)
    rows = session.execute(
        select(TaskEvent, Task.name)
        .outerjoin(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.batch_pk == batch.id)
        .order_by(TaskEvent.id)
    ).all()
    return [
        {
            "id": e.id,
            "at": _iso(e.at),
            "task": _instance_name(name, e.detail),
            "attempt": e.attempt,
            "from": e.from_status,
            "to": e.to_status,
            "detail": e.detail,
        }
        for e, name in rows
    ]


def _instance_name(task: str | None, detail: dict[str, Any] | None) -> str | None:
    index = (detail or {}).get("map_index")
    return f"{task}[{index}]" if task is not None and isinstance(index, int) else task


# -- one task: its attempts, its output -------------------------------------------------

ATTEMPTS_SCHEMA = "orchestrator.task_attempts/v1"
_INSTANCE = re.compile(r"^(?P<task>.+)\[(?P<index>\d+)\]$")


def split_instance(task: str) -> tuple[str, int]:
    """`per_region[3]` -> ("per_region", 3); a plain name -> (name, -1)."""
    m = _INSTANCE.match(task)
    return (m["task"], int(m["index"])) if m else (task, -1)


def _task_log_row(session: Session, batch_id: str, task: str,
                  pipeline: str | None) -> tuple[Batch, str, Any, int]:
    batch, pipeline_name = _find_batch(session, batch_id, pipeline)
    name, index = split_instance(task)
    row = session.execute(
        select(Task.id, Task.name, Task.max_attempts, TaskLog.status, TaskLog.attempt,
               TaskLog.retry_base, TaskLog.output, TaskLog.error, TaskLog.finished_at)
        .join(TaskLog, (TaskLog.task_id == Task.id) & (TaskLog.batch_pk == batch.id)
              & (TaskLog.map_index == index))
        .where(Task.pipeline_id == batch.pipeline_id, Task.version == batch.pipeline_version,
               Task.name == name)
    ).first()
    if row is None:
        raise NotFound(f"no task {task!r} in batch {batch_id!r} of pipeline {pipeline_name!r}")
    return batch, pipeline_name, row, index


def task_attempts(session: Session, batch_id: str, task: str, pipeline: str | None = None,
                  attempt: int | None = None) -> dict[str, Any]:
    """Every attempt of one task (or one mapped instance, `task[3]`) that ran, oldest
    first: outcome, times, error, traceback, and the lines it printed and logged::

        {"schema": "orchestrator.task_attempts/v1", "pipeline", "batch_id", "task",
         "status", "attempt", "max_attempts",           # the task, now
         "attempts": [{"attempt", "outcome",             # RUNNING, SUCCESS, RETRYING,
                                                         # ERROR or DISCARDED
                       "started_at", "finished_at", "duration_s", "error", "traceback",
                       "log": [{"at", "stream", "line", "level"?, "logger"?}],
                       "log_dropped", "worker"}]}

    `log` holds the first and last lines when there were too many; `log_dropped`
    says how many were left out between them (a marker line stands in their place).
    """
    batch, pipeline_name, row, index = _task_log_row(session, batch_id, task, pipeline)
    stmt = (select(TaskAttempt)
            .where(TaskAttempt.batch_pk == batch.id, TaskAttempt.task_id == row.id,
                   TaskAttempt.map_index == index)
            .order_by(TaskAttempt.attempt))
    if attempt is not None:
        stmt = stmt.where(TaskAttempt.attempt == attempt)
    attempts = [{
        "attempt": a.attempt,
        "outcome": a.outcome,
        "started_at": _iso(a.started_at),
        "finished_at": _iso(a.finished_at),
        "duration_s": _seconds(a.started_at, a.finished_at),
        "error": a.error,
        "traceback": a.traceback,
        "log": a.log or [],
        "log_dropped": a.log_dropped,
        "worker": a.worker,
    } for a in session.execute(stmt).scalars()]
    return {
        "schema": ATTEMPTS_SCHEMA,
        "pipeline": pipeline_name,
        "batch_id": batch.batch_id,
        "task": task,
        "status": _value(row.status),
        "attempt": row.attempt,
        "max_attempts": _max_attempts(row),
        "attempts": attempts,
    }


def task_output(session: Session, batch_id: str, task: str,
                pipeline: str | None = None) -> dict[str, Any]:
    """A task's status and output (what its children receive as input)."""
    batch, pipeline_name, row, _ = _task_log_row(session, batch_id, task, pipeline)
    return {"pipeline": pipeline_name, "batch_id": batch.batch_id, "task": task,
            "status": _value(row.status), "attempt": row.attempt, "output": row.output,
            "error": row.error}


# -- why ------------------------------------------------------------------------------


def _hm(value: datetime | None) -> str:
    return value.strftime("%H:%M:%S") if value is not None else "?"


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "an unknown time"
    s = max(0.0, (now - then).total_seconds())
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _and(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _first_line(text: str | None, limit: int = 200) -> str:
    line = (text or "no error recorded").strip().splitlines()[0] if (text or "").strip() else "no error recorded"
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _attempt(r: Any) -> str:
    return f"attempt {r.attempt}/{_max_attempts(r)}"


def _root_failures(tid: int, rows: dict[int, Any], parents: dict[int, list[int]]) -> list[int]:
    """The ERROR (or CANCELLED) ancestors that an UPSTREAM_FAILED task inherits from."""
    found: list[int] = []
    seen: set[int] = set()
    stack = [p for p in parents.get(tid, [])]
    while stack:
        t = stack.pop()
        if t in seen or t not in rows:
            continue
        seen.add(t)
        st = _value(rows[t].status)
        if st in (S.ERROR, S.CANCELLED):
            found.append(t)
        elif st == S.UPSTREAM_FAILED:
            stack.extend(parents.get(t, []))
    return sorted(found)


def why(session: Session, batch_id: str, task: str, now: datetime,
        pipeline: str | None = None) -> str:
    """In plain words, why `task` of the batch (or one mapped instance, `task[3]`) has
    (or has not) run."""
    batch, pipeline_name = _find_batch(session, batch_id, pipeline)
    rows = {r.id: r for r in _task_rows(session, batch)}
    by_name = {r.name: t for t, r in rows.items()}
    name, index = split_instance(task)
    if name not in by_name or (index >= 0 and rows[by_name[name]].map_over is None):
        raise NotFound(f"no task {task!r} in batch {batch_id!r} of pipeline {pipeline_name!r}")
    tid = by_name[name]
    if index >= 0:
        instance = _task_rows(session, batch, map_index=index, task_id=tid)
        if not instance:
            n = session.execute(select(func.count()).select_from(TaskLog).where(
                TaskLog.batch_pk == batch.id, TaskLog.task_id == tid, TaskLog.map_index >= 0)
            ).scalar_one()
            raise NotFound(f"no instance {task!r} in batch {batch_id!r}: {name} has {n} "
                           f"instance(s), {name}[0] to {name}[{n - 1}]" if n else
                           f"no instance {task!r} in batch {batch_id!r}: {name} has no "
                           "instances yet")
        rows[tid] = instance[0]
    r = rows[tid]
    parents = _parents(session, batch)
    status = _value(r.status)
    rules = versions.rules(session, batch.pipeline_id, batch.pipeline_version)
    answer = _why(batch, rows, tid, parents, now, rules, label=task)
    if (status in (S.PENDING, S.QUEUED, S.RUNNING, S.RETRYING)
            and batch.deadline_at is not None and _value(batch.status) == "RUNNING"):
        answer = answer if answer.endswith(".") else answer + "."
        answer += (f" The batch's deadline is {local_clock(batch.deadline_at, rules.tz)} "
                   f"({_until(now, batch.deadline_at)}): its open tasks are cancelled then and "
                   "it fails.")
    return answer


def _until(now: datetime, then: datetime) -> str:
    if then <= now:
        return f"passed {_ago(now, then)} ago"
    return f"in {_ago(then, now)}"


def _file_wait(batch: Batch, r: Any, now: datetime, rules: versions.VersionRules) -> str:
    """When a waited-for file is due, and whether it is late."""
    f = rules.files.get(r.name)
    if f is None:
        return ""
    logical = batch.logical_at or batch.created_at
    expected = f.expected_by.resolve(batch.created_at, logical, rules.tz) if f.expected_by else None
    fail = f.fail_after.resolve(batch.created_at, logical, rules.tz) if f.fail_after else None
    parts = []
    if expected is not None:
        parts.append(f"late since {local_clock(expected, rules.tz)}" if expected <= now
                     else f"expected by {local_clock(expected, rules.tz)}")
    if fail is not None:
        parts.append(f"the task fails at {local_clock(fail, rules.tz)}")
    return f" ({'; '.join(parts)})" if parts else ""


def _why(batch: Batch, rows: dict[int, Any], tid: int, parents: dict[int, list[int]],
         now: datetime, rules: versions.VersionRules, label: str | None = None) -> str:
    r = rows[tid]
    status = _value(r.status)
    head = f"{label or r.name}: "

    if status == S.SUCCESS:
        took = _seconds(r.started_at, r.finished_at)
        extra = f" in {took:.1f} s" if took is not None else ""
        return head + f"succeeded at {_hm(r.finished_at)} on attempt {r.attempt}{extra}."
    if status == S.CANCELLED:
        reason = f" ({_first_line(r.error)})" if r.error and r.error != "cancelled" else ""
        return head + f"cancelled at {_hm(r.finished_at)}{reason}; `batch retry` runs it again."
    if status == S.ERROR:
        return head + (f"failed on {_attempt(r)} at {_hm(r.finished_at)} with: "
                       f"{_first_line(r.error)}")
    if status == S.UPSTREAM_FAILED:
        roots = _root_failures(tid, rows, parents)
        if not roots:
            return head + "will not run: an upstream task failed."
        parts = []
        for p in roots:
            pr = rows[p]
            if _value(pr.status) == S.CANCELLED:
                parts.append(f"upstream {pr.name} was cancelled")
            else:
                parts.append(f"upstream {pr.name} failed with: {_first_line(pr.error)}")
        return head + "will not run: " + "; ".join(parts) + "."
    if status == S.SKIPPED:
        rule = _value(r.trigger_rule)
        return head + f"skipped: its trigger rule {rule} did not fire."
    if status == S.RUNNING:
        lease = f", lease until {_hm(r.lease_expires_at)}" if r.lease_expires_at else ""
        return head + (f"running since {_hm(r.started_at)} ({_ago(now, r.started_at)}), "
                       f"{_attempt(r)}{lease}.")
    if status == S.RETRYING:
        return head + (f"retrying at {_hm(r.next_attempt_at)} ({_attempt(r)}) after error: "
                       f"{_first_line(r.error)}")
    if status == S.QUEUED:
        since = r.dispatched_at or r.queued_at
        return head + (f"queued but not claimed for {_ago(now, since)} "
                       f"(queued at {_hm(r.queued_at)}, {_attempt(r)}).")
    # PENDING
    if r.waiting_for_file:
        uri = f"gs://{r.gcs_bucket}/{(r.gcs_pattern or '').replace('{batch_id}', batch.batch_id)}"
        return head + f"waiting for its file {uri}{_file_wait(batch, r, now, rules)}"
    waiting = [p for p in sorted(parents.get(tid, [])) if p in rows
               and _value(rows[p].status) not in (S.SUCCESS, S.ERROR, S.UPSTREAM_FAILED,
                                                  S.SKIPPED, S.CANCELLED)]
    if not waiting:
        return head + "pending; its parents are done, so the sweeper will move it on."
    details = []
    for p in waiting:
        pr = rows[p]
        st = _value(pr.status)
        if st == S.RUNNING:
            details.append(f"{pr.name} RUNNING since {_hm(pr.started_at)}, {_attempt(pr)}")
        elif st == S.RETRYING:
            details.append(f"{pr.name} RETRYING at {_hm(pr.next_attempt_at)}, {_attempt(pr)}")
        elif st == S.QUEUED:
            details.append(f"{pr.name} QUEUED since {_hm(pr.queued_at)}")
        elif pr.waiting_for_file:
            uri = f"gs://{pr.gcs_bucket}/{(pr.gcs_pattern or '').replace('{batch_id}', batch.batch_id)}"
            details.append(f"{pr.name} waiting for its file {uri}"
                           f"{_file_wait(batch, pr, now, rules)}")
        else:
            details.append(f"{pr.name} PENDING")
    word = "parent" if len(waiting) == 1 else "parents"
    return head + (f"waiting on {word} {_and([rows[p].name for p in waiting])} "
                   f"({'; '.join(details)}).")


# -- pipelines ------------------------------------------------------------------------


def list_pipelines(session: Session) -> list[dict[str, Any]]:
    """Every synced pipeline with its current version and task count."""
    n_tasks = (
        select(func.count()).select_from(Task)
        .where(Task.pipeline_id == Pipeline.id, Task.version == Pipeline.version)
        .scalar_subquery()
    )
    rows = session.execute(
        select(Pipeline.name, Pipeline.version, Pipeline.description, Pipeline.updated_at,
               n_tasks).order_by(Pipeline.name)
    ).all()
    return [{"pipeline": r[0], "version": r[1], "description": r[2] or "",
             "updated_at": _iso(r[3]), "tasks": r[4]} for r in rows]


def pipeline_definition(session: Session, name: str) -> dict[str, Any]:
    """The current version of one pipeline: its tasks in topological order."""
    pipe = session.execute(select(Pipeline).where(Pipeline.name == name)).scalar_one_or_none()
    if pipe is None:
        raise NotFound(f"unknown pipeline {name!r} (run `orchestrator pipelines sync` first)")
    # In the order and with the parents sync stored for the version.
    tasks = session.execute(
        select(Task).where(Task.pipeline_id == pipe.id, Task.version == pipe.version)
        .order_by(Task.position, Task.id)
    ).scalars()
    out = []
    for t in tasks:
        out.append({
            "task": t.name,
            "handler": t.handler,
            "depends_on": json.loads(t.depends_on_json),
            "trigger_rule": _value(t.trigger_rule),
            "max_attempts": t.max_attempts,
            "timeout_s": t.timeout_s,
            "gcs_trigger": (f"gs://{t.gcs_bucket}/{t.gcs_pattern}" if t.gcs_bucket else None),
            "concurrency": t.concurrency,
            "map_over": t.map_over,
            "config": t.config or {},
        })
    schedule = versions.rules(session, pipe.id, pipe.version).schedule
    return {"pipeline": pipe.name, "version": pipe.version,
            "description": pipe.description or "", "updated_at": _iso(pipe.updated_at),
            "source_file": pipe.source_file, "concurrency": pipe.concurrency,
            "schedule": schedule.model_dump(mode="json") if schedule else None,
            "tasks": out}
