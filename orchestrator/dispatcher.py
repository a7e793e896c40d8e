"""What follows a committed transition: publish the tasks it queued, hand a freed
concurrency slot to a waiting task, and close the batch when nothing is left open.

Every unit that moves tasks (the worker, the sweeper, the storage triggers, the
dead-letter path of the delivery front) ends its transition here, so the three
follow-ups happen the same way whoever caused them. Publishing comes after the
commit (transactional outbox): a row is QUEUED in the database before its message
exists, and the sweeper republishes any message lost in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, failpoints, logs
from orchestrator.db.session import transaction
from orchestrator.engine import concurrency, maintenance
from orchestrator.engine.types import BatchFinished, Dispatch, Outcome, TaskRow
from orchestrator.errors import InfrastructureError
from orchestrator.ports import Clock, OutboundMessage, Publisher
from orchestrator.status import BatchStatus


@dataclass(frozen=True)
class RouteResult:
    """What became of one delivery. `outcome` is one of: started, exists, succeeded,
    failed, retrying, deferred, waiting (no free concurrency slot), expanded (a mapped
    task queued its instances), duplicate, stale, queued, ignored, invalid; for a file, stored
    (no trigger watches its path)."""

    outcome: str
    detail: str = ""
    published: int = 0


def dispatch_message(d: Dispatch) -> OutboundMessage:
    """The run_task message of a queued task, with its routing attributes."""
    attributes = {"type": "run_task", "pipeline": d.pipeline, "batch_id": d.batch_id,
                  "task": d.task, "attempt": str(d.attempt)}
    if d.map_index >= 0:
        attributes["map_index"] = str(d.map_index)
    return OutboundMessage(data=d.message(), attributes=attributes)


class Dispatcher:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        publisher: Publisher,
        clock: Clock,
        *,
        default_concurrency: int | None = None,
        on_batch_finished: Callable[[BatchFinished], None] | None = None,
    ):
        self.sessions = sessions
        self.publisher = publisher
        self.clock = clock
        # The cap on RUNNING attempts of a task that sets none (None: unlimited).
        self.default_concurrency = default_concurrency
        self.on_batch_finished = on_batch_finished

    def publish(self, dispatches: Sequence[Dispatch]) -> None:
        """Publish run_task messages; `InfrastructureError` if the publisher fails."""
        if not dispatches:
            return
        failpoints.hit("before_publish")
        try:
            self.publisher.publish([dispatch_message(d) for d in dispatches])
        except InfrastructureError:
            raise
        except Exception as exc:
            # The rows are QUEUED and committed: the sweeper will publish them again.
            raise InfrastructureError(f"publish failed: {exc}") from exc

    def after(self, outcome: Outcome, row: TaskRow, *, still_open: bool | None = None) -> None:
        """The follow-ups of `row`'s committed transition. `still_open`: a task of the
        batch was seen open after the commit (None: not looked at), so it is not done."""
        self.publish(outcome.queued)
        self.free_slot(row)
        if outcome.check_batch and not still_open:
            self.close(row.batch_pk)

    def free_slot(self, row: TaskRow) -> None:
        """`row` left RUNNING: if it held a limited slot, publish one task waiting for it
        now rather than at the sweeper's next redispatch."""
        if not concurrency.limits(row, self.default_concurrency):
            return
        now = self.clock.now()

        def wake(s: Session) -> list[Dispatch]:
            woken = concurrency.wake(s, row, now, self.default_concurrency)
            return maintenance.dispatches_of(s, woken)

        self.publish(transaction(self.sessions, wake))

    def close(self, batch_pk: int) -> bool:
        """Close the batch if no task is open; True if this call closed it."""
        now = self.clock.now()
        finished = transaction(self.sessions,
                               lambda s: engine.close_batch_if_done(s, batch_pk, now))
        if finished is None:
            return False
        # A failed batch's line is an ERROR with `event`, which a log-based alert matches.
        failed = finished.status == BatchStatus.FAILED
        (logs.error if failed else logs.info)(
            f"batch finished: {finished.status} in {finished.duration_s:.3f}s",
            pipeline=finished.pipeline, batch_id=finished.batch_id,
            event="batch_failed" if failed else "batch_finished")
        if self.on_batch_finished is not None:
            self.on_batch_finished(finished)
        return True
