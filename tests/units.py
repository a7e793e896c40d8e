"""Building blocks for the tests of one router unit at a time: a dispatcher over a
recording publisher, and a pipeline synced and started without a router."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine
from orchestrator.db.models import Task, TaskLog
from orchestrator.db.session import transaction
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine.types import BatchFinished
from orchestrator.testing import RecordingPublisher
from tests.dags import spec_from_edges, sync


def dispatcher(sessions: sessionmaker[Session], clock: Any,
               finished: list[BatchFinished] | None = None) -> tuple[Dispatcher, RecordingPublisher]:
    published = RecordingPublisher()
    sink = finished if finished is not None else []
    return Dispatcher(sessions, published, clock, on_batch_finished=sink.append), published


def started(sessions: sessionmaker[Session], now: datetime, name: str,
            parents: dict[str, list[str]], batch_id: str = "b1",
            **fields: dict[str, Any]) -> engine.Started:
    """Sync a pipeline from its edges and start one batch of it, engine calls only."""
    sync(sessions, spec_from_edges(name, parents, **fields), now)
    return transaction(sessions, lambda s: engine.start_batch(s, name, batch_id, {}, now))


def statuses(sessions: sessionmaker[Session]) -> dict[str, str]:
    """Task name -> status of every task's own row (instances left out)."""
    with sessions() as s:
        rows = s.execute(select(Task.name, TaskLog.status).join(Task, Task.id == TaskLog.task_id)
                         .where(TaskLog.map_index == -1)).all()
    return {name: str(status) for name, status in rows}
