"""The engine: guarded state transitions over the metadata database.

It imports no adapter and no Google library; callers pass a session (and own
its transaction) and publish the `Dispatch`es it returns after commit.

Two kinds of transaction, and how they stay out of each other's way:

- Per-task transitions (claim, succeed, fail, requeue, and the promotion of the
  children they finish) lock only the task_log rows they change: their own row,
  then their children's, deeper at each step. They never lock the batch row, so
  the workers of one batch never wait on each other unless they share a child.
  Each is a guarded UPDATE (see `transitions`), which is what makes it safe
  against duplicates and zombies. On PostgreSQL a plain task's claim, and its
  SUCCESS, are that UPDATE with its event and record in one statement (`hot`); the
  children's decrement stays a statement of its own, after the parent's lock.
- Whole-batch operations read or change many rows of one batch and need them to
  hold still: `cancel_batch`, `retry_batch`, `close_batch_if_done`, and a mapped
  task's `expansion.expand`. Each takes the batch row's lock first (exclusive,
  `FOR NO KEY UPDATE`; expansion shared, `FOR SHARE`), so they are serialized
  against each other, and each reads the batch's status under that lock.

What a whole-batch operation must see of the per-task transitions, and why the
narrow rule suffices:

- Only a retry turns a terminal row open again, and only a retry or an expansion
  adds open rows; both take the batch lock. So while a cancel or a close holds
  it, the set of open rows can only shrink. A close checks "nothing open" without
  the lock (the usual answer, "still open", costs nothing), and again under it.
- A retry resets rows that are all terminal, which no per-task transition touches.
  The parents of those rows outside the reset may still move: the retry locks
  their rows (shared) before it counts them, so a transition in flight is waited
  for and seen, and a later one waits for the retry and then finds the child
  PENDING, to decrement as usual.
- A mapped task's instances are new rows; the expansion that adds them holds the
  batch lock (shared), so a cancel either sees all of them or none exist yet.
  Their attempts keep rising across retries (`task_log.map_attempt_base`), so the
  (row, attempt) fencing of every transition holds for every instance that ever ran.

Lock order, everywhere: the batch row, then task_log rows by depth in the DAG (a
mapped task's instances before its own row), then concurrency_locks rows; see
`locks`. A whole-batch operation never waits for the batch lock while holding a
row, and a per-task transition never waits for the batch lock at all (the
foreign-key checks of its inserts take `FOR KEY SHARE`, which `FOR NO KEY UPDATE`
does not block), so the two kinds cannot deadlock on each other. On SQLite a
transaction holds the whole database (one writer at a time), which gives every
one of these guarantees by itself.
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
