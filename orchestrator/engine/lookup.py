"""Resolving names to rows (immutable definitions come from `catalog`)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Batch, Pipeline, PipelineVersion, Task, TaskLog
from orchestrator.engine import catalog
from orchestrator.engine.types import Dispatch, TaskRow
from orchestrator.errors import NotFound

# Per-engine caches (weakly keyed): a process (a test run, a benchmark) may use several
# databases, and a database emptied and refilled gets a new engine.
_names_lock = threading.Lock()


def db_cache(store: weakref.WeakKeyDictionary[Any, dict[Any, Any]], session: Session) -> dict[Any, Any]:
    key = session.get_bind()
    cache = store.get(key)
    if cache is None:
        with _names_lock:
            cache = store.setdefault(key, {})
    return cache


def task_names(session: Session, task_ids: list[int]) -> dict[int, str]:
    """Names by task id, from the catalog of immutable definitions."""
    return {t: catalog.task_def(session, t).name for t in task_ids}


def dispatches(
    session: Session, pipeline: str, batch_id: str, queued: list[tuple[int, int]]
) -> list[Dispatch]:
    if not queued:
        return []
    names = task_names(session, [t for t, _ in queued])
    return [Dispatch(pipeline, batch_id, names[t], attempt) for t, attempt in queued]


def find_batch(session: Session, pipeline: str, batch_id: str) -> Batch:
    row = session.execute(
        select(Batch)
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no batch {batch_id!r} of pipeline {pipeline!r}")
    return row


def resolve_task(session: Session, pipeline: str, batch_id: str, task: str,
                 map_index: int = -1) -> TaskRow:
    """One indexed query: the task's log row in this batch (or one instance of a mapped
    task), with its definition."""
    row = _resolve(session, map_index, Pipeline.name == pipeline, Batch.batch_id == batch_id,
                   Task.name == task)
    if row is None:
        name = f"{task}[{map_index}]" if map_index >= 0 else task
        raise NotFound(f"no task {name!r} in batch {batch_id!r} of pipeline {pipeline!r}")
    return row


def resolve_task_by_id(session: Session, batch_pk: int, task_id: int,
                       map_index: int = -1) -> TaskRow:
    row = _resolve(session, map_index, Batch.id == batch_pk, Task.id == task_id)
    if row is None:
        raise NotFound(f"no task {task_id}[{map_index}] in batch {batch_pk}")
    return row


def _resolve(session: Session, map_index: int, *where: Any) -> TaskRow | None:
    row = session.execute(
        select(Pipeline.name, Batch.batch_id, Task.name,
            TaskLog.id, Batch.id, Task.id, Task.handler, Task.config, TaskLog.status,
            TaskLog.attempt, TaskLog.retry_base, Task.max_attempts, Task.retry_initial_delay_s,
            Task.retry_backoff_factor, Task.retry_max_delay_s, Task.timeout_s,
            Batch.params, Batch.status, TaskLog.input, TaskLog.map_index, Task.concurrency,
            PipelineVersion.concurrency, Pipeline.id, Task.map_over,
        )
        .select_from(Pipeline)
        .join(Batch, Batch.pipeline_id == Pipeline.id)
        .join(Task, (Task.pipeline_id == Pipeline.id) & (Task.version == Batch.pipeline_version))
        .join(TaskLog, (TaskLog.batch_pk == Batch.id) & (TaskLog.task_id == Task.id))
        .outerjoin(PipelineVersion, (PipelineVersion.pipeline_id == Pipeline.id)
                   & (PipelineVersion.version == Batch.pipeline_version))
        .where(*where, TaskLog.map_index == map_index)
    ).one_or_none()
    if row is None:
        return None
    pipeline, batch_id, task, *cols = row
    row = cols  # type: ignore[assignment]
    return TaskRow(
        log_id=row[0], batch_pk=row[1], task_id=row[2], pipeline=pipeline, batch_id=batch_id,
        task=task, handler=row[3], config=row[4] or {}, status=row[5], attempt=row[6],
        retry_base=row[7], max_attempts=row[8], retry_initial_delay_s=row[9],
        retry_backoff_factor=row[10], retry_max_delay_s=row[11], timeout_s=row[12],
        params=row[13] or {}, batch_status=row[14], input=row[15], map_index=row[16],
        concurrency=row[17], pipeline_concurrency=row[18], pipeline_pk=row[19],
        map_over=row[20],
    )
