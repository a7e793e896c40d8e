"""The append-only transition log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import event as sa_event
from sqlalchemy import insert
from sqlalchemy.orm import Session

from orchestrator.db.models import task_events_table


def event(
    batch_pk: int,
    task_id: int | None,
    attempt: int | None,
    from_status: str | None,
    to_status: str,
    at: datetime,
    detail: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "batch_pk": batch_pk,
        "task_id": task_id,
        "attempt": attempt,
        "from_status": from_status,
        "to_status": to_status,
        "at": at,
        "detail": detail,
    }


_PENDING = "orchestrator.pending_events"


def record(session: Session, events: list[dict[str, Any]]) -> None:
    """Queue events for this transaction: they are written together, in one INSERT,
    just before it commits (and dropped with it if it rolls back)."""
    if events:
        session.info.setdefault(_PENDING, []).extend(events)


def flush_events(session: Session) -> None:
    events = session.info.pop(_PENDING, None)
    if events:
        session.connection().execute(insert(task_events_table), events)


@sa_event.listens_for(Session, "before_commit")
def _write_before_commit(session: Session) -> None:
    flush_events(session)


@sa_event.listens_for(Session, "after_rollback")
def _forget_on_rollback(session: Session) -> None:
    session.info.pop(_PENDING, None)
