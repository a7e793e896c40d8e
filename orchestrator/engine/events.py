"""The append-only transition log."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from orchestrator.db.models import TaskEvent


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


def record(session: Session, events: list[dict[str, Any]]) -> None:
    """One INSERT for all of a transaction's events (executemany, batched by the driver)."""
    if events:
        session.execute(insert(TaskEvent), events)
