"""The engine: guarded state transitions over the metadata database.

It imports no adapter and no Google library; callers pass a session (and own
its transaction) and publish the `Dispatch`es it returns after commit.
"""

from orchestrator.engine.batches import (
    Started,
    cancel_batch,
    close_batch_if_done,
    retry_batch,
    start_batch,
)
from orchestrator.engine.dag import check_and_trigger_children
from orchestrator.engine.lookup import find_batch, resolve_task
from orchestrator.engine.transitions import claim, fail, release_waiting_root, succeed
from orchestrator.engine.types import BatchFinished, Claimed, Dispatch, Outcome, TaskRow

__all__ = [
    "BatchFinished",
    "Claimed",
    "Dispatch",
    "Outcome",
    "Started",
    "TaskRow",
    "cancel_batch",
    "check_and_trigger_children",
    "claim",
    "close_batch_if_done",
    "fail",
    "find_batch",
    "release_waiting_root",
    "resolve_task",
    "retry_batch",
    "start_batch",
    "succeed",
]
