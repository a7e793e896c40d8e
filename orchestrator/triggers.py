"""Storage triggers: a finalized object releases the task waiting for it.

A task with a `gcs_trigger` starts its batch waiting for an object whose path
names the batch (`sales/{batch_id}/_SUCCESS`). When such an object lands, its
batch is started if it does not exist yet, and the waiting task is queued with
the object as its input, in one transaction per matching task. A second event
for the same object finds the task no longer waiting and is a logged duplicate.
"""

from __future__ import annotations

from sqlalchemy import exists, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import deadlines, engine, logs
from orchestrator.db.models import Batch, Pipeline, Task
from orchestrator.db.session import transaction
from orchestrator.dispatcher import Dispatcher, RouteResult
from orchestrator.engine.types import Outcome
from orchestrator.errors import InvalidInput
from orchestrator.ports import Clock
from orchestrator.status import BatchStatus
from orchestrator.storage_events import StorageObject

UNWATCHED = "stored; no trigger watches this path"


class StorageTriggers:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, clock: Clock):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.clock = clock

    def object_finalized(self, obj: StorageObject) -> RouteResult:
        """A file landed: start its batch if needed and release the task waiting for it."""
        matches = transaction(self.sessions, lambda s: matching_triggers(s, obj))
        if not matches:
            # Most objects of a bucket are data files that no task waits for: not a fault.
            logs.info(f"{obj.uri}: {UNWATCHED}", outcome="stored")
            return RouteResult("stored", UNWATCHED)
        now = self.clock.now()
        published = 0
        outcomes = []
        for pipeline, task, batch_id in matches:
            labels = {"pipeline": pipeline, "batch_id": batch_id, "task": task}

            def release(s: Session, pipeline: str = pipeline, task: str = task,
                        batch_id: str = batch_id) -> tuple[engine.Started, Outcome]:
                started = deadlines.start_batch(s, pipeline, batch_id, {}, now)
                row = engine.resolve_task(s, pipeline, batch_id, task)
                return started, engine.release_waiting_root(s, row, obj.as_trigger(), now)

            try:
                started, released = transaction(self.sessions, release)
            except InvalidInput as exc:
                logs.warning(f"cannot start from {obj.uri}: {exc}", outcome="invalid", **labels)
                outcomes.append("invalid")
                continue
            queued = [*started.queued, *released.queued]
            self.dispatcher.publish(queued)
            published += len(queued)
            if released.applied:
                logs.info(f"file {obj.uri} arrived; task queued", outcome="queued", **labels)
                outcomes.append("queued")
            else:
                logs.info(f"file {obj.uri} arrived but {released.reason}", outcome="duplicate",
                          **labels)
                outcomes.append("duplicate")
        best = "queued" if "queued" in outcomes else (outcomes[0] if outcomes else "stored")
        return RouteResult(best, published=published)


def matching_triggers(session: Session, obj: StorageObject) -> list[tuple[str, str, str]]:
    """(pipeline, task, batch_id) for every waiting task this object may release.

    A batch keeps the pipeline version it started with, so the triggers that count
    are those of every version that still has an open batch, each for its own
    batches, and the current version's, which alone may start a new batch. A file
    for a finished batch goes to the current version (its release is a duplicate).
    """
    older_open = exists().where(
        Batch.pipeline_id == Task.pipeline_id, Batch.pipeline_version == Task.version,
        Batch.status == BatchStatus.RUNNING)
    rows = session.execute(
        select(Pipeline.name, Task.name, Task.gcs_bucket, Task.gcs_pattern, Task.version,
               Pipeline.version)
        .join(Task, Task.pipeline_id == Pipeline.id)
        .where(Task.gcs_bucket == obj.bucket, (Task.version == Pipeline.version) | older_open)
        .order_by(Pipeline.name, Task.version.desc(), Task.id)
    ).all()
    # The pipeline-file model (YAML, pydantic) is imported by the object events that use it.
    from orchestrator.pipeline.spec import GcsTrigger

    candidates = []
    for pipeline, task, bucket, pattern, version, current in rows:
        if bucket is None or pattern is None:
            continue
        batch_id = GcsTrigger(bucket=bucket, pattern=pattern).match(obj.bucket, obj.name)
        if batch_id is not None:
            candidates.append((pipeline, task, batch_id, version, version == current))
    if not candidates:
        return []
    batches = {
        (pipeline, batch_id): (version, status)
        for pipeline, batch_id, version, status in session.execute(
            select(Pipeline.name, Batch.batch_id, Batch.pipeline_version, Batch.status)
            .join(Pipeline, Pipeline.id == Batch.pipeline_id)
            .where(tuple_(Pipeline.name, Batch.batch_id).in_(
                sorted({(p, b) for p, _, b, _, _ in candidates})))
        )
    }
    out: list[tuple[str, str, str]] = []
    for pipeline, task, batch_id, version, is_current in candidates:
        found = batches.get((pipeline, batch_id))
        if found is None:
            keep = is_current
        else:
            batch_version, status = found
            keep = batch_version == version or (is_current and status != BatchStatus.RUNNING)
        if keep and (pipeline, task, batch_id) not in out:
            out.append((pipeline, task, batch_id))
    return out
