"""Upsert validated pipelines into the metadata database.

A changed definition becomes a new version (new task rows and edges); batches
keep the version they started with, so editing a pipeline never corrupts a
running batch's dependency counters. Syncing an unchanged file writes nothing.
"""

from __future__ import annotations

import heapq
import json
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from orchestrator.db.dialect import insert_ignore
from orchestrator.db.models import (
    Pipeline,
    PipelineVersion,
    ScheduleState,
    Task,
    TaskDependency,
)
from orchestrator.errors import PipelineConflict
from orchestrator.pipeline.spec import PipelineSpec


@dataclass(frozen=True)
class SyncResult:
    name: str
    version: int
    changed: bool


def sync_pipeline(session: Session, spec: PipelineSpec, now: datetime, *,
                  replace: bool = False) -> SyncResult:
    """Store the spec as the pipeline's newest version (unless it is unchanged). A spec
    read from a file other than the one the pipeline was last synced from is refused
    unless `replace`: two files naming one pipeline would replace each other in turn."""
    digest = spec.definition_hash()
    row = session.execute(
        select(Pipeline).where(Pipeline.name == spec.name).with_for_update()
    ).scalar_one_or_none()
    if row is not None and spec.source_file is not None:
        if row.source_file not in (None, spec.source_file) and not replace:
            raise PipelineConflict(
                f"pipeline {spec.name!r} was synced from {row.source_file}, not "
                f"{spec.source_file}: rename the pipeline in {spec.source_file}, or sync it "
                f"with --replace to define {spec.name!r} from {spec.source_file} from now on")
        if row.source_file != spec.source_file:
            session.execute(update(Pipeline).where(Pipeline.id == row.id)
                            .values(source_file=spec.source_file))
    if row is not None and row.definition_hash == digest:
        return SyncResult(spec.name, row.version, changed=False)
    if row is None:
        row = Pipeline(
            name=spec.name, description=spec.description, version=1,
            definition_hash=digest, definition=spec.canonical(),
            concurrency=spec.concurrency, source_file=spec.source_file,
            created_at=now, updated_at=now,
        )
        session.add(row)
        session.flush()
    else:
        session.execute(
            update(Pipeline).where(Pipeline.id == row.id).values(
                version=Pipeline.version + 1, description=spec.description,
                definition_hash=digest, definition=spec.canonical(),
                concurrency=spec.concurrency, updated_at=now,
            )
        )
        session.refresh(row)
    ids: dict[str, int] = {}
    positions = topological_positions(spec)
    for t in spec.tasks:
        ids[t.name] = session.execute(
            insert(Task).values(
                pipeline_id=row.id, version=row.version, name=t.name, handler=t.handler,
                position=positions[t.name],
                depends_on_json=json.dumps(sorted(t.depends_on), ensure_ascii=False),
                config=t.config, max_attempts=t.retry.max_attempts,
                retry_initial_delay_s=t.retry.initial_delay_s,
                retry_backoff_factor=t.retry.backoff_factor,
                retry_max_delay_s=t.retry.max_delay_s, timeout_s=t.timeout_s,
                trigger_rule=t.trigger_rule, concurrency=t.concurrency,
                map_over=t.map_over.model_dump() if t.map_over else None,
                gcs_bucket=t.gcs_trigger.bucket if t.gcs_trigger else None,
                gcs_pattern=t.gcs_trigger.pattern if t.gcs_trigger else None,
            ).returning(Task.id)
        ).scalar_one()
    edges = [
        {"child_task_id": ids[t.name], "parent_task_id": ids[p]}
        for t in spec.tasks for p in t.depends_on
    ]
    if edges:
        session.execute(insert(TaskDependency), edges)
    _sync_time_rules(session, spec, row.id, row.version, now)
    return SyncResult(spec.name, row.version, changed=True)


def topological_positions(spec: PipelineSpec) -> dict[str, int]:
    """Each task's place in the version's order: parents before children, the ready
    task defined first taking the next place (Kahn's algorithm). Tasks are stored in the
    order of the definition, so this is the order of their ids as well."""
    index = {t.name: i for i, t in enumerate(spec.tasks)}
    waiting = [len(set(t.depends_on)) for t in spec.tasks]
    children: dict[int, list[int]] = {}
    for i, t in enumerate(spec.tasks):
        for p in set(t.depends_on):
            children.setdefault(index[p], []).append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children.get(i, ()):
            waiting[c] -= 1
            if waiting[c] == 0:
                heapq.heappush(ready, c)
    if len(order) < len(spec.tasks):
        raise ValueError(f"pipeline {spec.name!r} has a dependency cycle")
    return {spec.tasks[i].name: n for n, i in enumerate(order)}


def _sync_time_rules(session: Session, spec: PipelineSpec, pipeline_pk: int, version: int,
                     now: datetime) -> None:
    """The version's schedule, deadline, alerts and file expectations; and the schedule's
    state, which belongs to the pipeline rather than the version: a new version goes on
    from the last tick handled, and a schedule (re)appearing starts from now rather than
    catching up on ticks from before it existed."""
    files = {
        t.name: t.gcs_trigger.model_dump(mode="json", include={"expected_by", "fail_after"})
        for t in spec.tasks
        if t.gcs_trigger is not None and (t.gcs_trigger.expected_by or t.gcs_trigger.fail_after)
    }
    previous = session.execute(
        select(PipelineVersion.schedule).where(PipelineVersion.pipeline_id == pipeline_pk,
                                               PipelineVersion.version == version - 1)
    ).first()
    rules = {
        "schedule": spec.schedule.model_dump(mode="json") if spec.schedule else None,
        "deadline": spec.deadline.model_dump(mode="json") if spec.deadline else None,
        "alerts": spec.alerts.model_dump(mode="json") if spec.alerts else None,
        "files": files or None,
    }
    # An absent rule is SQL NULL (a None would be stored as JSON null), so a query for
    # the versions that have one can use IS NOT NULL.
    session.execute(insert(PipelineVersion).values(
        pipeline_id=pipeline_pk, version=version, created_at=now,
        timezone=spec.schedule.timezone if spec.schedule else "UTC",
        concurrency=spec.concurrency,
        **{k: v for k, v in rules.items() if v is not None},
    ))
    if spec.schedule is None:
        return
    session.execute(insert_ignore(session, ScheduleState, ["pipeline_id"]).values(
        pipeline_id=pipeline_pk, paused=False, last_tick_at=now, updated_at=now))
    if previous is not None and previous[0] is None:
        session.execute(update(ScheduleState).where(ScheduleState.pipeline_id == pipeline_pk)
                        .values(last_tick_at=now, updated_at=now))
