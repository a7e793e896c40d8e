"""Immutable definitions, read once per process: the hot path's dictionary.

A pipeline version's tasks and edges never change once synced (a changed file
becomes a new version), and a batch's pipeline, version and params never change
after it starts. So the per-delivery work can skip re-reading them: a claim is
then one guarded UPDATE, with no join to find what it is claiming.

Caches are keyed by engine (weakly): a process may talk to several databases.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import Batch, Pipeline, Task, TaskDependency
from orchestrator.status import BatchStatus, TaskStatus


@dataclass(frozen=True)
class TaskDef:
    task_id: int
    name: str
    pipeline_pk: int
    pipeline: str
    version: int
    handler: str
    config: dict[str, Any]
    max_attempts: int
    retry_initial_delay_s: float
    retry_backoff_factor: float
    retry_max_delay_s: float
    timeout_s: float
    concurrency: int | None
    pipeline_concurrency: int | None
    map_over: dict[str, Any] | None
    parents: tuple[int, ...]
    children: tuple[int, ...]


@dataclass(frozen=True)
class BatchRef:
    batch_pk: int
    pipeline_pk: int
    pipeline: str
    batch_id: str
    version: int
    params: dict[str, Any]


class _Catalog:
    def __init__(self) -> None:
        self.tasks: dict[int, TaskDef] = {}
        self.by_name: dict[tuple[int, int, str], int] = {}
        self.batches: dict[tuple[str, str], BatchRef] = {}


_catalogs: weakref.WeakKeyDictionary[Any, _Catalog] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _catalog(session: Session) -> _Catalog:
    bind = session.get_bind()
    cat = _catalogs.get(bind)
    if cat is None:
        with _lock:
            cat = _catalogs.setdefault(bind, _Catalog())
    return cat


def clear() -> None:
    _catalogs.clear()


def _load_version(session: Session, cat: _Catalog, pipeline_pk: int, version: int) -> None:
    """Every task of one pipeline version and its edges: two queries, once."""
    rows = session.execute(
        select(Task, Pipeline.name, Pipeline.concurrency)
        .join(Pipeline, Pipeline.id == Task.pipeline_id)
        .where(Task.pipeline_id == pipeline_pk, Task.version == version)
    ).all()
    ids = [t.id for t, _, _ in rows]
    edges = session.execute(
        select(TaskDependency.parent_task_id, TaskDependency.child_task_id)
        .where(TaskDependency.child_task_id.in_(ids))
    ).all() if ids else []
    parents: dict[int, list[int]] = {}
    children: dict[int, list[int]] = {}
    for p, c in edges:
        parents.setdefault(c, []).append(p)
        children.setdefault(p, []).append(c)
    for t, pipeline, pipeline_concurrency in rows:
        cat.tasks[t.id] = TaskDef(
            task_id=t.id, name=t.name, pipeline_pk=t.pipeline_id, pipeline=pipeline,
            version=t.version, handler=t.handler, config=t.config or {},
            max_attempts=t.max_attempts, retry_initial_delay_s=t.retry_initial_delay_s,
            retry_backoff_factor=t.retry_backoff_factor, retry_max_delay_s=t.retry_max_delay_s,
            timeout_s=t.timeout_s, concurrency=t.concurrency,
            pipeline_concurrency=pipeline_concurrency, map_over=t.map_over,
            parents=tuple(sorted(parents.get(t.id, ()))),
            children=tuple(sorted(children.get(t.id, ()))),
        )
        cat.by_name[(t.pipeline_id, t.version, t.name)] = t.id


def task_def(session: Session, task_id: int) -> TaskDef:
    cat = _catalog(session)
    found = cat.tasks.get(task_id)
    if found is None:
        pv = session.execute(
            select(Task.pipeline_id, Task.version).where(Task.id == task_id)
        ).one()
        _load_version(session, cat, pv[0], pv[1])
        found = cat.tasks[task_id]
    return found


def task_by_name(session: Session, batch: BatchRef, name: str) -> TaskDef | None:
    cat = _catalog(session)
    key = (batch.pipeline_pk, batch.version, name)
    if key not in cat.by_name:
        _load_version(session, cat, batch.pipeline_pk, batch.version)
    task_id = cat.by_name.get(key)
    return cat.tasks[task_id] if task_id is not None else None


def batch_ref(session: Session, pipeline: str, batch_id: str) -> BatchRef | None:
    cat = _catalog(session)
    found = cat.batches.get((pipeline, batch_id))
    if found is None:
        row = session.execute(
            select(Batch.id, Batch.pipeline_id, Batch.pipeline_version, Batch.params)
            .join(Pipeline, Pipeline.id == Batch.pipeline_id)
            .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
        ).one_or_none()
        if row is None:
            return None  # not cached: the batch may be started a moment later
        found = BatchRef(row[0], row[1], pipeline, batch_id, row[2], row[3] or {})
        cat.batches[(pipeline, batch_id)] = found
    return found


def task_row(batch: BatchRef, task: TaskDef, attempt: int, map_index: int = -1) -> Any:
    """A TaskRow built from definitions alone, for a claim to complete: its mutable
    fields (log id, retry base, input) come back from the claim's RETURNING."""
    from orchestrator.engine.types import TaskRow

    return TaskRow(
        log_id=0, batch_pk=batch.batch_pk, task_id=task.task_id, pipeline=batch.pipeline,
        batch_id=batch.batch_id, task=task.name, handler=task.handler, config=task.config,
        status=TaskStatus.QUEUED, attempt=attempt, retry_base=0,
        max_attempts=task.max_attempts, retry_initial_delay_s=task.retry_initial_delay_s,
        retry_backoff_factor=task.retry_backoff_factor,
        retry_max_delay_s=task.retry_max_delay_s, timeout_s=task.timeout_s,
        params=batch.params, batch_status=BatchStatus.RUNNING, input=None,
        map_index=map_index, concurrency=task.concurrency,
        pipeline_concurrency=task.pipeline_concurrency, pipeline_pk=task.pipeline_pk,
        map_over=task.map_over,
    )
