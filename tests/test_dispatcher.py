"""The dispatcher alone: what follows a committed transition (publish, close)."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine
from orchestrator.db.session import transaction
from orchestrator.engine.types import BatchFinished, Dispatch, Outcome, TaskRow
from orchestrator.errors import InfrastructureError
from orchestrator.status import BatchStatus
from orchestrator.testing import FailingPublisher
from tests.conftest import FakeClock
from tests.units import dispatcher, started


def test_a_run_task_message_carries_its_routing_attributes(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    d, published = dispatcher(sessions, clock)
    d.publish([Dispatch("p", "b1", "t", 3, 7)])
    (msg,) = published.messages
    assert dict(msg.data) == {"type": "run_task", "pipeline": "p", "batch_id": "b1",
                              "task": "t", "attempt": 3, "map_index": 7}
    assert msg.attributes == {"type": "run_task", "pipeline": "p", "batch_id": "b1",
                              "task": "t", "attempt": "3", "map_index": "7"}


def test_a_failing_publish_is_an_infrastructure_error(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    """The one failure the edge answers with a redelivery."""
    d, _ = dispatcher(sessions, clock)
    d.publisher = FailingPublisher()
    with pytest.raises(InfrastructureError):
        d.publish([Dispatch("p", "b1", "t", 1)])
    d.publish([])  # nothing to publish never touches the publisher


def test_close_finishes_a_batch_once_and_only_when_nothing_is_open(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    finished: list[BatchFinished] = []
    d, _ = dispatcher(sessions, clock, finished)
    start = started(sessions, clock.now(), "one", {"a": []})
    assert d.close(start.batch_pk) is False  # `a` is still QUEUED

    def run(s: Session) -> tuple[Outcome, TaskRow]:
        claimed = engine.claim(s, engine.resolve_task(s, "one", "b1", "a"), 1, clock.now())
        assert claimed is not None
        return engine.succeed(s, claimed.row, 1, {"ok": True}, clock.now()), claimed.row

    outcome, row = transaction(sessions, run)
    assert outcome.check_batch
    d.after(outcome, row)
    assert [(f.batch_id, f.status) for f in finished] == [("b1", BatchStatus.SUCCESS)]
    assert d.close(start.batch_pk) is False  # already closed: no second finish
    assert len(finished) == 1
