"""The time rules of one pipeline version, read back from the database.

A version never changes once synced, so its rules are read once per process
(per database) and kept; a batch is always judged by its own version's rules,
even after a newer version changed them.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.db.models import PipelineVersion
from orchestrator.pipeline.timing import AlertsSpec, DeadlineSpec, ScheduleSpec, TimeRule, zone


@dataclass(frozen=True)
class FileRules:
    expected_by: TimeRule | None = None
    fail_after: TimeRule | None = None


@dataclass(frozen=True)
class VersionRules:
    tz: ZoneInfo = field(default_factory=lambda: zone("UTC"))
    schedule: ScheduleSpec | None = None
    deadline: DeadlineSpec | None = None
    alerts: AlertsSpec | None = None
    files: dict[str, FileRules] = field(default_factory=dict)


NO_RULES = VersionRules()

_cache: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], VersionRules]] = (
    weakref.WeakKeyDictionary())
_lock = threading.Lock()


def clear() -> None:
    _cache.clear()


def _build(row: PipelineVersion | None) -> VersionRules:
    if row is None:
        return NO_RULES
    files = {
        task: FileRules(
            expected_by=TimeRule.model_validate(f["expected_by"]) if f.get("expected_by") else None,
            fail_after=TimeRule.model_validate(f["fail_after"]) if f.get("fail_after") else None,
        )
        for task, f in (row.files or {}).items()
    }
    return VersionRules(
        tz=zone(row.timezone or "UTC"),
        schedule=ScheduleSpec.model_validate(row.schedule) if row.schedule else None,
        deadline=DeadlineSpec.model_validate(row.deadline) if row.deadline else None,
        alerts=AlertsSpec.model_validate(row.alerts) if row.alerts else None,
        files=files,
    )


def rules(session: Session, pipeline_pk: int, version: int) -> VersionRules:
    """The rules of `version` of the pipeline (none, for a version synced before them)."""
    bind = session.get_bind()
    with _lock:
        cache = _cache.setdefault(bind, {})
    found = cache.get((pipeline_pk, version))
    if found is None:
        row = session.execute(
            select(PipelineVersion).where(PipelineVersion.pipeline_id == pipeline_pk,
                                          PipelineVersion.version == version)
        ).scalar_one_or_none()
        found = _build(row)
        if row is not None:
            cache[(pipeline_pk, version)] = found
    return found
