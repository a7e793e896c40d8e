"""Values the engine returns to its callers."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from orchestrator.status import BatchStatus, TaskStatus


@dataclass(frozen=True)
class Dispatch:
    """A task the engine has just made QUEUED: the caller publishes its run message
    after the transaction commits (the outbox rule)."""

    pipeline: str
    batch_id: str
    task: str
    attempt: int
    map_index: int = -1

    def message(self) -> dict[str, Any]:
        msg: dict[str, Any] = {
            "type": "run_task",
            "pipeline": self.pipeline,
            "batch_id": self.batch_id,
            "task": self.task,
            "attempt": self.attempt,
        }
        if self.map_index >= 0:
            msg["map_index"] = self.map_index
        return msg

    @property
    def display_name(self) -> str:
        return f"{self.task}[{self.map_index}]" if self.map_index >= 0 else self.task


@dataclass(frozen=True)
class TaskRow:
    """One task of one batch, resolved from names, with its definition."""

    log_id: int
    batch_pk: int
    task_id: int
    pipeline: str
    batch_id: str
    task: str
    handler: str
    config: dict[str, Any]
    status: TaskStatus
    attempt: int
    retry_base: int
    max_attempts: int
    retry_initial_delay_s: float
    retry_backoff_factor: float
    retry_max_delay_s: float
    timeout_s: float
    params: dict[str, Any]
    batch_status: BatchStatus
    input: dict[str, Any] | None = None
    map_index: int = -1
    # Limits on RUNNING attempts: this task's (across batches), and its pipeline
    # version's per batch.
    concurrency: int | None = None
    pipeline_concurrency: int | None = None
    pipeline_pk: int = 0
    map_over: dict[str, Any] | None = None

    @property
    def display_name(self) -> str:
        return f"{self.task}[{self.map_index}]" if self.map_index >= 0 else self.task

    def retry_delay(self, failed_attempt: int) -> float | None:
        """Backoff before the next attempt, or None when the attempts are spent."""
        used = failed_attempt - self.retry_base
        if used >= self.max_attempts:
            return None
        delay = self.retry_initial_delay_s * self.retry_backoff_factor ** (used - 1)
        return float(min(delay, self.retry_max_delay_s))


@dataclass(frozen=True)
class Claimed:
    row: TaskRow
    attempt: int
    lease_expires_at: datetime
    # The task's input: batch params, the parents' outputs by name, and the trigger.
    input: dict[str, Any]


@dataclass
class Outcome:
    """What a transition did: tasks to publish, and whether the batch may be done."""

    applied: bool
    queued: list[Dispatch] = field(default_factory=list)
    reason: str = ""
    # A terminal transition that queued nothing may have been the batch's last.
    check_batch: bool = False


@dataclass(frozen=True)
class BatchFinished:
    batch_pk: int
    pipeline: str
    batch_id: str
    status: BatchStatus
    created_at: datetime
    finished_at: datetime

    @property
    def duration_s(self) -> float:
        return (self.finished_at - self.created_at).total_seconds()
