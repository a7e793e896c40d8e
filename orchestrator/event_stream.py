"""The event stream: every transition in `task_events`, relayed to subscribers.

Locally, `Runtime.subscribe(callback)` calls `callback(event)` from a thread of
its own; on Google Cloud a relay publishes each event to the `batch-events`
Pub/Sub topic (ORCHESTRATOR_EVENTS_TOPIC). Both read the same append-only table,
so the stream cannot disagree with the task log, and neither adds work to a
transition: the engine only appends its event row, as it always did.

Shape (schema `orchestrator.event/v1`; a field may be added within a version,
never renamed or removed)::

    {
      "schema": "orchestrator.event/v1",
      "id": 1234,                      # task_events.id: increasing, the stream's order
      "type": "task" | "batch_started" | "batch_finished" | "batch_reopened",
      "pipeline": "monthly_profit",
      "batch_id": "2024-03",
      "task": "load_sales" | "load_sales[3]" | null,   # null for batch events
      "map_index": null | 3,           # the instance of a mapped task
      "attempt": 1 | null,
      "from": "QUEUED" | null,
      "to": "RUNNING",
      "at": "2024-04-01T00:00:00+00:00",
      "status": null | "SUCCESS" | "FAILED" | "CANCELLED",   # batch_finished only
      "duration_s": null | 12.5,                             # batch_finished only
      "detail": {...} | null           # e.g. the error, the retry delay, the reason
    }

A batch emits one `batch_finished` per run; `batch retry` emits `batch_reopened`
and, later, another `batch_finished`.

Delivery follows the outbox rule. A relay reads events after its cursor (a row
of `event_cursors`, locked FOR UPDATE so that two relays never publish the same
range), publishes them in id order, and moves the cursor only after the publish
succeeded: a failed publish is retried from the same place, and a crash between
publish and commit publishes again (at least once; `id` is the dedup key).
A slow subscriber delays only its own thread (locally) or its own subscription
(Pub/Sub), never a transition.

Ordering. Event ids come from a sequence when the row is inserted, but
transactions commit in any order, so "id > cursor" alone could step over an id
whose transaction commits a moment later, and lose it. The relay therefore
treats a gap in the ids as unknown until it is settled: it waits for the
transactions that were open in this database when it read (they hold every id
that could still appear below the newest one it saw; later transactions draw
larger ids), then reads the range again, which is now final. A gap that
outlives the wait (a long transaction) holds the stream back at the gap rather
than skip it; the ids before it go out at once. This relies on every
transaction that appends events having written before (the transition itself),
so that it already holds a transaction id when it draws an event id. On SQLite
a reader holds the single write lock, so what it sees is final already.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import logs
from orchestrator.db.dialect import insert_ignore
from orchestrator.db.models import Batch, EventCursor, Pipeline, Task, TaskEvent
from orchestrator.db.session import transaction
from orchestrator.ports import OutboundMessage, Publisher
from orchestrator.status import BATCH_TERMINAL

SCHEMA = "orchestrator.event/v1"
DEFAULT_CURSOR = "batch-events"
PAGE = 500
# How long a reader waits for open transactions to settle a gap in the ids.
GAP_WAIT_S = 2.0
_FINISHED = {s.value for s in BATCH_TERMINAL}


# -- reading ------------------------------------------------------------------------------


def _select(session: Session, after: int, *, limit: int | None, upto: int | None = None) -> list[Any]:
    stmt = (
        select(TaskEvent.id, TaskEvent.task_id, TaskEvent.attempt, TaskEvent.from_status,
               TaskEvent.to_status, TaskEvent.at, TaskEvent.detail, Batch.batch_id,
               Batch.created_at, Pipeline.name, Task.name)
        .join(Batch, Batch.id == TaskEvent.batch_pk)
        .join(Pipeline, Pipeline.id == Batch.pipeline_id)
        .outerjoin(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.id > after)
        .order_by(TaskEvent.id)
    )
    if upto is not None:
        stmt = stmt.where(TaskEvent.id <= upto)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.execute(stmt).all())


def _contiguous(rows: list[Any], after: int) -> int:
    """How many rows follow `after` with no id missing."""
    n = 0
    for row in rows:
        if row[0] != after + n + 1:
            break
        n += 1
    return n


def _open_xids(session: Session) -> list[str]:
    session.execute(text("SELECT pg_stat_clear_snapshot()"))
    return [str(x) for x in session.execute(text(
        "SELECT backend_xid::text FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_xid IS NOT NULL AND pid <> pg_backend_pid()")).scalars()]


def _settled(session: Session, xids: list[str], wait_s: float) -> bool:
    """True once none of `xids` is still running (within `wait_s`)."""
    deadline = time.monotonic() + wait_s
    while True:
        # pg_stat_activity is a per-transaction snapshot unless cleared.
        session.execute(text("SELECT pg_stat_clear_snapshot()"))
        running = session.execute(
            text("SELECT count(*) FROM pg_stat_activity WHERE backend_xid::text = ANY(:x)"),
            {"x": xids},
        ).scalar_one()
        if not running:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def read_after(session: Session, after: int, *, limit: int = PAGE,
               gap_wait_s: float = GAP_WAIT_S) -> list[dict[str, Any]]:
    """The events after id `after` that can no longer change, in id order, as
    schema v1 documents (see the module docstring for why gaps wait)."""
    rows = _select(session, after, limit=limit)
    if not rows:
        return []
    n = _contiguous(rows, after)
    if n < len(rows) and session.get_bind().dialect.name == "postgresql":
        xids = _open_xids(session)
        if not xids or _settled(session, xids, gap_wait_s):
            rows = _select(session, after, limit=None, upto=rows[-1][0])
        else:
            rows = rows[:n]
    return [to_document(r) for r in rows]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def to_document(row: Any) -> dict[str, Any]:
    (event_id, task_id, attempt, from_status, to_status, at, detail, batch_id, created_at,
     pipeline, task) = row
    detail = dict(detail) if detail else None
    map_index = detail.get("map_index") if detail else None
    if task_id is not None:
        kind = "task"
    elif from_status is None:
        kind = "batch_started"
    elif to_status in _FINISHED:
        kind = "batch_finished"
    else:
        kind = "batch_reopened"
    duration = None
    if kind == "batch_finished":
        # The close records its duration; a cancel does not, so derive it the same way.
        duration = (detail or {}).get("duration_s")
        if duration is None and at is not None and created_at is not None:
            duration = (at - created_at).total_seconds()
    name = task
    if task is not None and isinstance(map_index, int) and map_index >= 0:
        name = f"{task}[{map_index}]"
    return {
        "schema": SCHEMA,
        "id": event_id,
        "type": kind,
        "pipeline": pipeline,
        "batch_id": batch_id,
        "task": name,
        "map_index": map_index if isinstance(map_index, int) and map_index >= 0 else None,
        "attempt": attempt,
        "from": from_status,
        "to": to_status,
        "at": _iso(at),
        "status": to_status if kind == "batch_finished" else None,
        "duration_s": round(duration, 3) if duration is not None else None,
        "detail": detail,
    }


def last_event_id(session: Session) -> int:
    return int(session.execute(select(TaskEvent.id).order_by(TaskEvent.id.desc()).limit(1))
               .scalar_one_or_none() or 0)


# -- the relay (outbox) -------------------------------------------------------------------


def event_message(doc: dict[str, Any]) -> OutboundMessage:
    """One event as a message to the events topic; attributes allow subscription filters
    (e.g. `attributes.type = "batch_finished"`)."""
    attributes = {"schema": SCHEMA, "type": doc["type"], "pipeline": doc["pipeline"],
                  "batch_id": doc["batch_id"], "to": str(doc["to"]), "event_id": str(doc["id"])}
    if doc["task"] is not None:
        attributes["task"] = doc["task"]
    return OutboundMessage(data=doc, attributes=attributes)


def _lock_cursor(session: Session, name: str, now: datetime, skip_locked: bool) -> int | None:
    session.execute(insert_ignore(session, EventCursor, ["name"])
                    .values(name=name, last_event_id=0, updated_at=now))
    stmt = select(EventCursor.last_event_id).where(EventCursor.name == name)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update(skip_locked=skip_locked)
    value = session.execute(stmt).scalar_one_or_none()
    return None if value is None else int(value)


def relay_once(
    sessions: sessionmaker[Session],
    publisher: Publisher,
    *,
    name: str = DEFAULT_CURSOR,
    now: Callable[[], datetime],
    limit: int = PAGE,
    pages: int = 20,
    skip_if_busy: bool = False,
    gap_wait_s: float = GAP_WAIT_S,
) -> int:
    """Publish the events after cursor `name`, a page per transaction; returns how many.

    The cursor row stays locked while a page is published and moves in the same
    transaction, so a publish that raises leaves it where it was (retried on the
    next pass). `skip_if_busy` returns at once when another relay holds the
    cursor: it will publish these events too.
    """
    total = 0
    for _ in range(pages):
        def page(s: Session) -> int | None:
            cursor = _lock_cursor(s, name, now(), skip_if_busy)
            if cursor is None:
                return None
            docs = read_after(s, cursor, limit=limit, gap_wait_s=gap_wait_s)
            if not docs:
                return 0
            publisher.publish([event_message(d) for d in docs])
            s.execute(update(EventCursor).where(EventCursor.name == name)
                      .values(last_event_id=docs[-1]["id"], updated_at=now())
                      .execution_options(synchronize_session=False))
            return len(docs)

        done = transaction(sessions, page)
        if not done:
            break
        total += done
        if done < limit:
            break
    return total


# -- local subscribers ----------------------------------------------------------------------


Callback = Callable[[dict[str, Any]], None]


class Subscription:
    """One local subscriber: a thread that reads events after its own cursor and hands
    them to `callback` in order. A callback that raises gets the same event again
    (up to `max_tries`, then the event is skipped with an error logged)."""

    def __init__(self, hub: EventHub, callback: Callback, after: int, max_tries: int = 3):
        self._hub = hub
        self.callback = callback
        self.cursor = after
        self.max_tries = max_tries
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchestrator-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._hub.poke()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def _run(self) -> None:
        seen = self._hub.generation
        while not self._stop.is_set():
            try:
                delivered = self.drain()
            except Exception as exc:  # the database is away: try again on the next tick
                logs.warning(f"event subscriber could not read events: {exc}")
                delivered = 0
            if delivered:
                continue
            seen = self._hub.wait(seen)

    def drain(self) -> int:
        """Deliver everything final after the cursor; returns how many events."""
        total = 0
        while not self._stop.is_set():
            with self._hub.sessions() as s:
                docs = read_after(s, self.cursor)
            if not docs:
                return total
            for doc in docs:
                if self._stop.is_set():
                    return total
                self._deliver(doc)
                self.cursor = doc["id"]
                total += 1
        return total

    def _deliver(self, doc: dict[str, Any]) -> None:
        for attempt in range(1, self.max_tries + 1):
            try:
                self.callback(doc)
                return
            except Exception as exc:  # a subscriber's bug never reaches the engine
                if attempt == self.max_tries:
                    logs.error(f"event subscriber failed {attempt} times on event "
                               f"{doc['id']}; skipping it: {exc}")
                    return
                time.sleep(0.01 * attempt)


class EventHub:
    """The embedded runtime's subscribers, woken when a transition may have committed
    (`poke`) and on a periodic tick, so none waits on a poke that never came."""

    def __init__(self, sessions: sessionmaker[Session], tick_s: float = 0.25):
        self.sessions = sessions
        self.tick_s = tick_s
        self._cv = threading.Condition()
        self.generation = 0
        self._subs: list[Subscription] = []

    def subscribe(self, callback: Callback, *, from_start: bool = False) -> Subscription:
        """Events committed from now on (or all of them, `from_start`), in id order."""
        after = 0
        if not from_start:
            with self.sessions() as s:
                after = last_event_id(s)
        sub = Subscription(self, callback, after)
        self._subs.append(sub)
        sub.start()
        return sub

    def poke(self) -> None:
        with self._cv:
            self.generation += 1
            self._cv.notify_all()

    def wait(self, seen: int) -> int:
        with self._cv:
            if self.generation == seen:
                self._cv.wait(self.tick_s)
            return self.generation

    def flush(self, timeout: float = 10.0) -> bool:
        """Until every subscriber has delivered what is committed now (tests, shutdown)."""
        with self.sessions() as s:
            target = last_event_id(s)
        deadline = time.monotonic() + timeout
        while any(sub.cursor < target and not sub.closed for sub in self._subs):
            if time.monotonic() >= deadline:
                return False
            self.poke()
            time.sleep(0.005)
        return True

    def close(self) -> None:
        for sub in self._subs:
            sub.close()
        self._subs.clear()

