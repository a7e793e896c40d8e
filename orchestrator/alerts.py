"""Alerts: created once per (batch, kind, task), delivered from an outbox.

Where an alert comes from:

- a transition (`batch_failed`, `task_failed` after the last retry, `deadline_missed`,
  `batch_succeeded`) is read back from `task_events`, which every transition
  appends to in its own transaction. The sweeper reads the events after the
  `alerts` cursor (the event stream's reader, which never steps over an id whose
  transaction has not committed yet), inserts the alerts they call for, and moves
  the cursor, in one transaction. So an alert exists if and only if its transition
  committed, and the engine's hot path does not pay a statement for it;
- a time rule with no transition (`deadline_warning`, `file_late`) inserts its
  alert in the transaction that decides it (see `orchestrator.deadlines`).

The unique key (batch, kind, task) makes creation exactly-once whoever gets there
first. Each alert then has one delivery row per channel (the `alerts` Pub/Sub
topic, the webhook): claimed by a guarded UPDATE, sent outside any transaction,
and marked delivered, or retried with backoff while the receiver is down. A
receiver that refuses it for good (a 4xx) is logged and given up on. Delivery is
at least once: a crash between the send and its record sends again, with the same
`id`, which receivers may use to drop a duplicate. Nothing here ever holds a lock
a task transition waits for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import logs
from orchestrator.db.dialect import insert_ignore, lock_skip_locked
from orchestrator.db.models import (
    Alert,
    AlertDelivery,
    Batch,
    EventCursor,
    Pipeline,
    Task,
    TaskLog,
)
from orchestrator.db.session import transaction
from orchestrator.engine import catalog
from orchestrator.errors import PermanentError
from orchestrator.event_stream import read_after
from orchestrator.pipeline.timing import ALERT_KINDS, CHANNELS, format_clock
from orchestrator.pipeline.versions import rules
from orchestrator.ports import AlertSink, Clock, OutboundMessage, Publisher

SCHEMA = "orchestrator.alert/v1"
CURSOR = "alerts"
# When a pipeline says nothing (and ORCHESTRATOR_ALERT_EVENTS is unset).
DEFAULT_EVENTS = ("batch_failed", "deadline_missed", "deadline_warning", "file_late")
SEVERITY = {"batch_failed": "error", "task_failed": "error", "deadline_missed": "error",
            "deadline_warning": "warning", "file_late": "warning", "batch_succeeded": "info"}
PAGE = 500
# A claimed delivery is sent within this long, or claimed again (a sweeper that died).
CLAIM_S = 120.0
BACKOFF_S = 30.0
MAX_BACKOFF_S = 3600.0
# A receiver down for longer than this: the alert is given up on, with an error logged.
GIVE_UP_AFTER = timedelta(days=3)


def first_line(text: str | None, limit: int = 300) -> str:
    lines = (text or "").strip().splitlines()
    line = lines[0].strip() if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def document(kind: str, pipeline: str, batch_id: str, task: str | None, title: str,
             at: datetime, *, error: str | None = None, command: str | None = None,
             detail: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An alert as every channel gets it (schema `orchestrator.alert/v1`; `id` is added
    when it is sent). `text` is the message a person reads: what failed, the error's
    first line and the command that shows more."""
    where = f"{pipeline}/{batch_id}"
    lines = [f"[{SEVERITY[kind]}] {kind}: {where}: {title}"]
    if error:
        lines.append(first_line(error))
    if command:
        lines.append(f"More: `{command}`")
    return {
        "schema": SCHEMA, "kind": kind, "severity": SEVERITY[kind], "pipeline": pipeline,
        "batch_id": batch_id, "task": task, "title": title,
        "error": first_line(error) if error else None, "command": command,
        "at": at.isoformat(), "detail": dict(detail or {}), "text": "\n".join(lines),
    }


def why_command(pipeline: str, batch_id: str, task: str) -> str:
    return f"orchestrator why {batch_id} {task} -p {pipeline}"


def status_command(pipeline: str, batch_id: str) -> str:
    return f"orchestrator status {batch_id} -p {pipeline}"


def topic_message(doc: Mapping[str, Any]) -> OutboundMessage:
    """The alert on the `alerts` topic; attributes allow subscription filters
    (`attributes.kind = "batch_failed"`)."""
    attributes = {"schema": SCHEMA, "kind": doc["kind"], "severity": doc["severity"],
                  "pipeline": doc["pipeline"], "batch_id": doc["batch_id"],
                  "alert_id": str(doc["id"])}
    if doc.get("task"):
        attributes["task"] = doc["task"]
    return OutboundMessage(data=doc, attributes=attributes)


class TopicSink:
    """The `alerts` Pub/Sub topic, through any `Publisher`."""

    def __init__(self, publisher: Publisher):
        self.publisher = publisher

    def send(self, alert: Mapping[str, Any]) -> None:
        self.publisher.publish([topic_message(alert)])


@dataclass
class DeliveryReport:
    delivered: int = 0
    retrying: int = 0
    given_up: int = 0


class Alerts:
    """Which events alert (a pipeline version's `alerts.events`, else the project's
    default), the outbox, and its delivery to the configured channels."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, *,
                 sinks: Mapping[str, AlertSink] | None = None,
                 default_events: Iterable[str] = DEFAULT_EVENTS,
                 on_alert: Callable[[dict[str, Any]], None] | None = None):
        self.sessions = sessions
        self.clock = clock
        self.sinks = dict(sinks or {})
        unknown = sorted(set(self.sinks) - set(CHANNELS))
        if unknown:
            raise ValueError(f"unknown alert channel(s) {', '.join(unknown)}")
        self.default_events = tuple(default_events)
        self._listeners: list[Callable[[dict[str, Any]], None]] = [on_alert] if on_alert else []

    def on_alert(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call `callback(alert)` once for each alert this process creates (the `dev`
        console), after its transaction commits."""
        self._listeners.append(callback)

    # -- creation --------------------------------------------------------------------

    def channels(self, session: Session, pipeline_pk: int, version: int,
                 kind: str) -> list[str] | None:
        """The channels an alert of `kind` goes to for this version, or None when the
        version does not alert on it."""
        spec = rules(session, pipeline_pk, version).alerts
        events = spec.events if spec is not None else self.default_events
        if kind not in events:
            return None
        wanted = spec.to if spec is not None else CHANNELS
        return [c for c in wanted if c in self.sinks]

    def record(self, session: Session, batch: catalog.BatchRef, kind: str, task: str | None,
               doc: dict[str, Any], now: datetime) -> dict[str, Any] | None:
        """Create the alert in the caller's transaction, unless the batch's version does
        not alert on `kind` or it exists already; returns it if this call created it."""
        assert kind in ALERT_KINDS, kind
        channels = self.channels(session, batch.pipeline_pk, batch.version, kind)
        if channels is None:
            return None
        alert_id = session.execute(
            insert_ignore(session, Alert, ["batch_pk", "kind", "task"])
            .values(batch_pk=batch.batch_pk, kind=kind, task=task or "", message=doc,
                    created_at=now)
            .returning(Alert.id)
        ).scalar_one_or_none()
        if alert_id is None:
            return None
        if channels:
            session.execute(insert_ignore(session, AlertDelivery, ["alert_id", "channel"]),
                            [{"alert_id": alert_id, "channel": c, "attempts": 0,
                              "next_attempt_at": now} for c in channels])
        level = logs.error if SEVERITY[kind] == "error" else logs.warning
        level(f"alert {kind}: {doc['title']}", event="alert", alert_kind=kind, alert_id=alert_id,
              pipeline=batch.pipeline, batch_id=batch.batch_id, task=task,
              channels=",".join(channels) or "none")
        return {**doc, "id": alert_id}

    def notify(self, created: Iterable[dict[str, Any]]) -> None:
        for doc in created:
            for cb in list(self._listeners):
                try:
                    cb(doc)
                except Exception as exc:  # a listener never breaks the sweeper
                    logs.warning(f"alert listener failed: {exc}")

    # -- derived from transitions --------------------------------------------------------

    def derive(self, *, pages: int = 20) -> int:
        """Create the alerts the transitions since the cursor call for; returns how many.
        A second sweeper at the same moment skips (the cursor row is locked)."""
        total: list[dict[str, Any]] = []
        for _ in range(pages):
            now = self.clock.now()

            def page(s: Session, now: datetime = now) -> tuple[int, list[dict[str, Any]]] | None:
                cursor = _lock_cursor(s, now)
                if cursor is None:
                    return None
                docs = read_after(s, cursor, limit=PAGE)
                if not docs:
                    return 0, []
                created = [c for d in docs for c in [self._from_event(s, d, now)] if c]
                s.execute(update(EventCursor).where(EventCursor.name == CURSOR)
                          .values(last_event_id=docs[-1]["id"], updated_at=now)
                          .execution_options(synchronize_session=False))
                return len(docs), created

            done = transaction(self.sessions, page)
            if done is None:
                break
            self.notify(done[1])
            total.extend(done[1])
            if done[0] < PAGE:
                break
        return len(total)

    def _from_event(self, s: Session, ev: dict[str, Any], now: datetime) -> dict[str, Any] | None:
        kind = _kind_of(ev)
        if kind is None:
            return None
        batch = catalog.batch_ref(s, ev["pipeline"], ev["batch_id"])
        if batch is None:
            return None
        pipeline, batch_id, detail = ev["pipeline"], ev["batch_id"], ev.get("detail") or {}
        if kind in ("task_failed", "batch_failed") and _undone(s, batch.batch_pk, ev):
            return None
        if kind == "task_failed":
            task = ev["task"]
            doc = document(kind, pipeline, batch_id, task,
                           f"task {task} failed on attempt {ev['attempt']}", now,
                           error=detail.get("error"), command=why_command(pipeline, batch_id, task))
            return self.record(s, batch, kind, task, doc, now)
        if kind == "batch_failed":
            culprit = _first_failure(s, batch.batch_pk)
            if culprit is not None:
                task, error = culprit
                doc = document(kind, pipeline, batch_id, None, f"batch FAILED: {task} failed", now,
                               error=error, command=why_command(pipeline, batch_id, task))
            else:
                doc = document(kind, pipeline, batch_id, None, "batch FAILED", now,
                               error=detail.get("reason"),
                               command=status_command(pipeline, batch_id))
            return self.record(s, batch, kind, None, doc, now)
        if kind == "deadline_missed":
            tz = rules(s, batch.pipeline_pk, batch.version).tz
            when = datetime.fromisoformat(detail["deadline_at"]).astimezone(tz)
            doc = document(kind, pipeline, batch_id, None,
                           f"missed its deadline {format_clock(when.time())} {tz.key}: open "
                           f"tasks cancelled, batch FAILED", now,
                           error=detail.get("reason"), command=status_command(pipeline, batch_id),
                           detail={"deadline_at": detail["deadline_at"]})
            return self.record(s, batch, kind, None, doc, now)
        doc = document(kind, pipeline, batch_id, None,
                       f"batch succeeded in {ev.get('duration_s') or 0:.1f} s", now,
                       command=status_command(pipeline, batch_id))
        return self.record(s, batch, kind, None, doc, now)

    # -- delivery --------------------------------------------------------------------------

    def deliver(self, *, limit: int = 100) -> DeliveryReport:
        """Send what is due on each configured channel, oldest first. A channel that
        fails is not tried again in this pass (its receiver is likely down)."""
        report = DeliveryReport()
        if not self.sinks:
            return report
        now = self.clock.now()
        with self.sessions() as s:
            due = s.execute(
                select(AlertDelivery.alert_id, AlertDelivery.channel)
                .where(AlertDelivery.delivered_at.is_(None), AlertDelivery.failed_at.is_(None),
                       AlertDelivery.next_attempt_at <= now,
                       AlertDelivery.channel.in_(list(self.sinks)))
                .order_by(AlertDelivery.next_attempt_at, AlertDelivery.alert_id)
                .limit(limit)
            ).all()
        down: set[str] = set()
        for alert_id, channel in due:
            if channel in down:
                continue
            claimed = transaction(self.sessions, partial(_claim, alert_id=alert_id,
                                                         channel=channel, now=now))
            if claimed is None:
                continue  # another sweeper has it
            doc, attempts, created_at = claimed
            try:
                self.sinks[channel].send(doc)
            except Exception as exc:
                permanent = isinstance(exc, PermanentError)
                expired = self.clock.now() - created_at > GIVE_UP_AFTER
                self._record_failure(alert_id, channel, attempts, exc, give_up=permanent or expired)
                if permanent or expired:
                    report.given_up += 1
                else:
                    report.retrying += 1
                    down.add(channel)
                continue
            transaction(self.sessions, partial(_delivered, alert_id=alert_id, channel=channel,
                                               now=self.clock.now()))
            report.delivered += 1
        return report

    def _record_failure(self, alert_id: int, channel: str, attempts: int, exc: Exception, *,
                        give_up: bool) -> None:
        now = self.clock.now()
        error = f"{type(exc).__name__}: {first_line(str(exc))}"[:2000]
        delay = min(BACKOFF_S * 2 ** (attempts - 1), MAX_BACKOFF_S)
        values: dict[str, Any] = {"last_error": error}
        if give_up:
            values["failed_at"] = now
            logs.error(f"alert {alert_id} not delivered to {channel}, giving up: {error}",
                       event="alert_undeliverable", alert_id=alert_id, channel=channel)
        else:
            values["next_attempt_at"] = now + timedelta(seconds=delay)
            logs.warning(f"alert {alert_id} not delivered to {channel} (attempt {attempts}); "
                         f"next try in {delay:g}s: {error}", alert_id=alert_id, channel=channel)
        transaction(self.sessions, lambda s: s.execute(
            update(AlertDelivery).where(AlertDelivery.alert_id == alert_id,
                                        AlertDelivery.channel == channel)
            .values(**values).execution_options(synchronize_session=False)))


def _kind_of(ev: dict[str, Any]) -> str | None:
    if ev["type"] == "task":
        # A mapped task's own row fails when an instance does: one alert, for the task.
        return "task_failed" if ev["to"] == "ERROR" and ev["map_index"] is None else None
    if ev["type"] != "batch_finished":
        return None
    if ev["status"] == "FAILED":
        return "deadline_missed" if (ev.get("detail") or {}).get("deadline_at") else "batch_failed"
    return "batch_succeeded" if ev["status"] == "SUCCESS" else None


def _undone(session: Session, batch_pk: int, ev: dict[str, Any]) -> bool:
    """A failure already retried by the time the sweep reads it (the task's row has
    moved past that attempt, or the batch is no longer FAILED) pages no one: the
    problem it names is being handled, and the rerun's own failure alerts if it fails."""
    if ev["type"] == "task":
        row = session.execute(
            select(TaskLog.status, TaskLog.attempt).join(Task, Task.id == TaskLog.task_id)
            .where(TaskLog.batch_pk == batch_pk, Task.name == ev["task"],
                   TaskLog.map_index == -1)
        ).first()
        return row is None or (row[0], row[1]) != ("ERROR", ev["attempt"])
    status = session.execute(select(Batch.status).where(Batch.id == batch_pk)).scalar_one()
    return bool(status != "FAILED")


def _first_failure(session: Session, batch_pk: int) -> tuple[str, str | None] | None:
    """The task whose failure failed the batch (the earliest ERROR), and its error."""
    row = session.execute(
        select(Task.name, TaskLog.error).join(Task, Task.id == TaskLog.task_id)
        .where(TaskLog.batch_pk == batch_pk, TaskLog.map_index == -1,
               TaskLog.status == "ERROR")
        .order_by(TaskLog.finished_at, TaskLog.id).limit(1)
    ).first()
    return (row[0], row[1]) if row is not None else None


def _lock_cursor(session: Session, now: datetime) -> int | None:
    """The alerts cursor, locked for this transaction (None: another sweeper holds it)."""
    session.execute(insert_ignore(session, EventCursor, ["name"])
                    .values(name=CURSOR, last_event_id=0, updated_at=now))
    value = session.execute(lock_skip_locked(session, select(EventCursor.last_event_id)
                                             .where(EventCursor.name == CURSOR))
                            ).scalar_one_or_none()
    return None if value is None else int(value)


def _delivered(session: Session, alert_id: int, channel: str, now: datetime) -> None:
    session.execute(update(AlertDelivery)
                    .where(AlertDelivery.alert_id == alert_id, AlertDelivery.channel == channel)
                    .values(delivered_at=now, last_error=None)
                    .execution_options(synchronize_session=False))


def _claim(session: Session, alert_id: int, channel: str,
           now: datetime) -> tuple[dict[str, Any], int, datetime] | None:
    """Take one due delivery for this pass: a guarded UPDATE, so two sweepers never
    send it at once; the claim lapses after CLAIM_S if this one dies mid-send."""
    got = session.execute(
        update(AlertDelivery)
        .where(AlertDelivery.alert_id == alert_id, AlertDelivery.channel == channel,
               AlertDelivery.delivered_at.is_(None), AlertDelivery.failed_at.is_(None),
               AlertDelivery.next_attempt_at <= now)
        .values(attempts=AlertDelivery.attempts + 1,
                next_attempt_at=now + timedelta(seconds=CLAIM_S))
        .returning(AlertDelivery.attempts)
        .execution_options(synchronize_session=False)
    ).first()
    if got is None:
        return None
    message, created_at = session.execute(
        select(Alert.message, Alert.created_at).where(Alert.id == alert_id)).one()
    return {**message, "id": alert_id}, int(got[0]), created_at


def recent(session: Session, limit: int = 20, pipeline: str | None = None) -> list[dict[str, Any]]:
    """The newest alerts first, each with its delivery state per channel."""
    stmt = select(Alert)
    if pipeline is not None:
        stmt = stmt.join(Batch, Batch.id == Alert.batch_pk).join(
            Pipeline, Pipeline.id == Batch.pipeline_id).where(Pipeline.name == pipeline)
    alerts = session.execute(stmt.order_by(Alert.id.desc()).limit(limit)).scalars().all()
    deliveries: dict[int, list[dict[str, Any]]] = {}
    if alerts:
        for d in session.execute(select(AlertDelivery).where(
                AlertDelivery.alert_id.in_([a.id for a in alerts]))
                .order_by(AlertDelivery.channel)).scalars():
            state = ("delivered" if d.delivered_at else "given up" if d.failed_at
                     else f"retrying ({d.attempts} attempt(s))" if d.attempts else "pending")
            deliveries.setdefault(d.alert_id, []).append({
                "channel": d.channel, "state": state, "attempts": d.attempts,
                "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                "last_error": d.last_error})
    return [{"id": a.id, "kind": a.kind, "severity": a.message.get("severity"),
             "pipeline": a.message.get("pipeline"), "batch_id": a.message.get("batch_id"),
             "task": a.task or None, "title": a.message.get("title"),
             "error": a.message.get("error"), "command": a.message.get("command"),
             "created_at": a.created_at.isoformat(), "deliveries": deliveries.get(a.id, [])}
            for a in alerts]
