"""Immutable definitions, read once per process: the hot path's dictionary.

A pipeline version's tasks and edges never change once synced (a changed file
becomes a new version), and a batch's pipeline, version, params and concurrency cap
never change after it starts. What a sync overwrites in place (the `pipelines` row's
own columns) is never read through here. So the per-delivery work can skip re-reading them: a claim is
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

from orchestrator.db.models import Batch, Pipeline, PipelineVersion, Task, TaskDependency
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
    map_over: dict[str, Any] | None
    parents: tuple[int, ...]
    children: tuple[int, ...]
    # The longest path from a root: every edge leads to a greater depth, which gives
    # whole-batch operations an order to lock rows in that matches the per-task ones.
    depth: int = 0


@dataclass(frozen=True)
class BatchRef:
    batch_pk: int
    pipeline_pk: int
    pipeline: str
    batch_id: str
    version: int
    params: dict[str, Any]
    # The cap on the batch's RUNNING tasks, its pipeline version's.
    concurrency: int | None = None


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
        select(Task, Pipeline.name)
        .join(Pipeline, Pipeline.id == Task.pipeline_id)
        .where(Task.pipeline_id == pipeline_pk, Task.version == version)
    ).all()
    ids = [t.id for t, _ in rows]
    edges = session.execute(
        select(TaskDependency.parent_task_id, TaskDependency.child_task_id)
        .where(TaskDependency.child_task_id.in_(ids))
    ).all() if ids else []
    parents: dict[int, list[int]] = {}
    children: dict[int, list[int]] = {}
    for p, c in edges:
        parents.setdefault(c, []).append(p)
        children.setdefault(p, []).append(c)
    depth: dict[int, int] = {}
    for task_id in _topological(ids, parents):
        depth[task_id] = max((depth[p] + 1 for p in parents.get(task_id, ())), default=0)
    for t, pipeline in rows:
        cat.tasks[t.id] = TaskDef(
            task_id=t.id, name=t.name, pipeline_pk=t.pipeline_id, pipeline=pipeline,
            version=t.version, handler=t.handler, config=t.config or {},
            max_attempts=t.max_attempts, retry_initial_delay_s=t.retry_initial_delay_s,
            retry_backoff_factor=t.retry_backoff_factor, retry_max_delay_s=t.retry_max_delay_s,
            timeout_s=t.timeout_s, concurrency=t.concurrency, map_over=t.map_over,
            parents=tuple(sorted(parents.get(t.id, ()))),
            children=tuple(sorted(children.get(t.id, ()))), depth=depth.get(t.id, 0),
        )
        cat.by_name[(t.pipeline_id, t.version, t.name)] = t.id


def _topological(ids: list[int], parents: dict[int, list[int]]) -> list[int]:
    """`ids` with every task after its parents (a synced version has no cycle)."""
    out: list[int] = []
    done: set[int] = set()
    for start in ids:
        stack = [(start, False)]
        while stack:
            t, expanded = stack.pop()
            if t in done:
                continue
            if expanded:
                done.add(t)
                out.append(t)
                continue
            stack.append((t, True))
            stack.extend((p, False) for p in parents.get(t, ()) if p not in done)
    return out


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
            select(Batch.id, Batch.pipeline_id, Batch.pipeline_version, Batch.params,
                   PipelineVersion.concurrency)
            .join(Pipeline, Pipeline.id == Batch.pipeline_id)
            .outerjoin(PipelineVersion, (PipelineVersion.pipeline_id == Batch.pipeline_id)
                       & (PipelineVersion.version == Batch.pipeline_version))
            .where(Pipeline.name == pipeline, Batch.batch_id == batch_id)
        ).one_or_none()
        if row is None:
            return None  # not cached: the batch may be started a moment later
        found = BatchRef(row[0], row[1], pipeline, batch_id, row[2], row[3] or {}, row[4])
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
        pipeline_concurrency=batch.concurrency, pipeline_pk=task.pipeline_pk,
        map_over=task.map_over,
    )
