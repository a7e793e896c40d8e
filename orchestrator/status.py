"""Task and batch states, and the trigger rules that move children on.

Stored by value (the strings below) so the task log reads well in plain SQL.
"""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    PENDING = "PENDING"  # waiting for parents (or, for a file-triggered root, its file)
    QUEUED = "QUEUED"  # ready; a run message is (being) published
    RUNNING = "RUNNING"  # claimed by one attempt, under a lease
    RETRYING = "RETRYING"  # failed, waiting for its backoff
    SUCCESS = "SUCCESS"
    ERROR = "ERROR"
    UPSTREAM_FAILED = "UPSTREAM_FAILED"
    SKIPPED = "SKIPPED"  # its trigger rule did not fire (e.g. one_failed when nothing failed)
    CANCELLED = "CANCELLED"


TERMINAL: frozenset[TaskStatus] = frozenset(
    {
        TaskStatus.SUCCESS,
        TaskStatus.ERROR,
        TaskStatus.UPSTREAM_FAILED,
        TaskStatus.SKIPPED,
        TaskStatus.CANCELLED,
    }
)
OPEN: frozenset[TaskStatus] = frozenset(set(TaskStatus) - TERMINAL)
# A parent in one of these counts as failed for its children's trigger rules.
FAILED: frozenset[TaskStatus] = frozenset(
    {TaskStatus.ERROR, TaskStatus.UPSTREAM_FAILED, TaskStatus.CANCELLED}
)


class BatchStatus(StrEnum):
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


BATCH_TERMINAL: frozenset[BatchStatus] = frozenset(
    {BatchStatus.SUCCESS, BatchStatus.FAILED, BatchStatus.CANCELLED}
)


class TriggerRule(StrEnum):
    ALL_SUCCESS = "all_success"  # run when every parent succeeded (the default)
    ALL_DONE = "all_done"  # run when every parent finished, whatever the outcome
    ONE_FAILED = "one_failed"  # run as soon as one parent failed (alerting); else skipped
