"""What a handler receives: its task, its input, the adapters, and liveness."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator.ports import Clock, ObjectStore, SystemClock, Warehouse


def _always_active() -> bool:
    return True


@dataclass(frozen=True)
class TaskContext:
    pipeline: str
    batch_id: str
    task: str
    attempt: int
    config: dict[str, Any]
    # {"params": {...}, "parents": {name: output}, "parent_status": {...}, "trigger": {...}}
    input: dict[str, Any]
    deadline: datetime
    warehouse_factory: Callable[[], Warehouse] | None = None
    object_store_factory: Callable[[], ObjectStore] | None = None
    clock: Clock = field(default_factory=SystemClock)
    # False once the batch is cancelled, the timeout passed, or the worker stopped
    # waiting for this attempt.
    active: Callable[[], bool] = _always_active
    base_dir: Path | None = None

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.input.get("params") or {})

    @property
    def parents(self) -> dict[str, Any]:
        return dict(self.input.get("parents") or {})

    @property
    def trigger(self) -> dict[str, Any]:
        return dict(self.input.get("trigger") or {})

    @property
    def warehouse(self) -> Warehouse:
        if self.warehouse_factory is None:
            raise RuntimeError("no warehouse configured for this runtime")
        return self.warehouse_factory()

    @property
    def object_store(self) -> ObjectStore:
        if self.object_store_factory is None:
            raise RuntimeError("no object store configured for this runtime")
        return self.object_store_factory()

    @property
    def log(self) -> logging.Logger:
        """A logger whose lines (INFO and above) are kept with this attempt: see
        `orchestrator logs BATCH TASK`, and Cloud Logging, labelled, in the cloud."""
        from orchestrator.capture import task_logger

        return task_logger(self.task)

    def is_active(self) -> bool:
        return self.clock.now() < self.deadline and self.active()

    @property
    def map_index(self) -> int | None:
        """The instance of a mapped task this attempt runs, or None."""
        value = self.input.get("map_index")
        return value if isinstance(value, int) else None

    def idempotency_key(self) -> str:
        """Stable per (pipeline, batch, task, instance, attempt): the id of any external job."""
        instance = f"__m{self.map_index}" if self.map_index is not None else ""
        return f"{self.pipeline}__{self.batch_id}__{self.task}{instance}__{self.attempt}"
