"""Schedules: the sweep is the clock.

Cloud Scheduler calls `sweep` every minute (locally, the sweeper loop of the
embedded runtime); on each call `Schedules.tick` starts the batch of every tick
that came due since the schedule's last one. Nothing else runs in between.

A tick's batch id comes from the tick's logical time (`{date}` of a 06:00 tick is
that day), and a batch id is unique per pipeline, so a tick starts its batch at
most once whoever gets there. Each pipeline's state row is locked (SKIP LOCKED)
while its ticks are started and the state moved on, in one transaction: two
sweeps at once split the pipelines between them, a retried sweep finds the ticks
done, and a crash in between leaves the state where it was (and the batch, if
started, is found existing next time).

After an outage, `catchup` decides: `latest` starts only the most recent missed
tick, `all` the most recent `catchup_limit` of them, `none` only a tick that is
still on time (at most `ON_TIME_S` late). A paused schedule starts nothing, and
resuming it does not catch up on the ticks of the pause.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import deadlines, logs
from orchestrator.db.dialect import insert_ignore, lock_skip_locked
from orchestrator.db.models import Batch, Pipeline, ScheduleState
from orchestrator.db.session import transaction
from orchestrator.dispatcher import Dispatcher
from orchestrator.engine.types import Dispatch
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.pipeline.timing import ScheduleSpec, render_batch_id
from orchestrator.pipeline.versions import rules
from orchestrator.ports import Clock

# With `catchup: none`, a tick first seen later than this after its time is skipped.
ON_TIME_S = 300.0


@dataclass(frozen=True)
class Started:
    pipeline: str
    batch_id: str
    tick: datetime


def current_schedule(session: Session, pipeline_pk: int) -> tuple[str, ScheduleSpec] | None:
    """The pipeline's name and the schedule of its current version, if it has one."""
    row = session.execute(select(Pipeline.name, Pipeline.version)
                          .where(Pipeline.id == pipeline_pk)).first()
    if row is None:
        return None
    schedule = rules(session, pipeline_pk, row[1]).schedule
    return (row[0], schedule) if schedule is not None else None


def due_ticks(schedule: ScheduleSpec, last: datetime | None,
              now: datetime) -> tuple[list[datetime], list[datetime]]:
    """(the ticks to start, the missed ticks that the catch-up policy skips), oldest
    first, of the ticks in (last, now]. Only the most recent `catchup_limit` missed
    ticks are looked at, however long the outage."""
    ticks = schedule.ticks_until(now, last, limit=schedule.catchup_limit)
    if schedule.catchup == "all":
        return ticks, []
    latest = ticks[-1:]
    if schedule.catchup == "none" and latest and now - latest[0] > timedelta(seconds=ON_TIME_S):
        return [], ticks
    return latest, ticks[:-1]


class Schedules:
    def __init__(self, sessions: sessionmaker[Session], dispatcher: Dispatcher, clock: Clock):
        self.sessions = sessions
        self.dispatcher = dispatcher
        self.clock = clock
        self._listeners: list[Callable[[Started], None]] = []

    def on_started(self, callback: Callable[[Started], None]) -> None:
        """Call `callback(started)` for each batch a tick of this process starts."""
        self._listeners.append(callback)

    def tick(self) -> list[Started]:
        """Start every due tick's batch; returns the batches this call started."""
        now = self.clock.now()
        pipelines = transaction(self.sessions, partial(_due_pipelines, now=now))
        started: list[Started] = []
        for pipeline_pk in pipelines:
            got, queued = transaction(self.sessions, partial(self._tick_one,
                                                             pipeline_pk=pipeline_pk, now=now))
            self.dispatcher.publish(queued)
            for st in got:
                logs.info(f"schedule tick {st.tick.isoformat()}: batch started",
                          outcome="scheduled", pipeline=st.pipeline, batch_id=st.batch_id)
                for cb in list(self._listeners):
                    try:
                        cb(st)
                    except Exception as exc:  # a listener never breaks the sweeper
                        logs.warning(f"schedule listener failed: {exc}")
            started.extend(got)
        return started

    def _tick_one(self, s: Session, pipeline_pk: int,
                  now: datetime) -> tuple[list[Started], list[Dispatch]]:
        state = s.execute(lock_skip_locked(s, select(ScheduleState).where(
            ScheduleState.pipeline_id == pipeline_pk,
            ScheduleState.paused.is_(False)))).scalar_one_or_none()
        if state is None:
            return [], []  # another sweep holds it, or it was paused since
        found = current_schedule(s, pipeline_pk)
        if found is None:
            return [], []  # the current version has no schedule
        name, schedule = found
        run, skipped = due_ticks(schedule, state.last_tick_at, now)
        if not run and not skipped:
            return [], []
        if skipped:
            logs.warning(f"schedule: {len(skipped)} missed tick(s) skipped by catchup "
                         f"{schedule.catchup} ({skipped[0].isoformat()} .. "
                         f"{skipped[-1].isoformat()})", pipeline=name)
        out: list[Started] = []
        queued: list[Dispatch] = []
        tz = schedule.tz
        for tick in run:
            batch_id = render_batch_id(schedule.batch_id, tick, tz)
            result = deadlines.start_batch(s, name, batch_id, dict(schedule.params), now,
                                           logical_at=tick)
            if result.created:
                out.append(Started(name, batch_id, tick))
                queued.extend(result.queued)
            else:
                logs.info("schedule tick: batch already exists", outcome="exists",
                          pipeline=name, batch_id=batch_id)
        last = max([*run, *skipped])
        values: dict[str, Any] = {"last_tick_at": last, "updated_at": now}
        if out:
            values.update(last_batch_id=out[-1].batch_id, last_started_at=now)
        s.execute(update(ScheduleState).where(ScheduleState.pipeline_id == pipeline_pk)
                  .values(**values).execution_options(synchronize_session=False))
        return out, queued


def _due_pipelines(session: Session, now: datetime) -> list[int]:
    """The pipelines with a tick due, read without locks in one query, so an idle
    sweep costs one statement however many schedules there are; each is then
    checked again under its lock."""
    rows = session.execute(
        select(ScheduleState.pipeline_id, ScheduleState.last_tick_at, Pipeline.version)
        .join(Pipeline, Pipeline.id == ScheduleState.pipeline_id)
        .where(ScheduleState.paused.is_(False))
    ).all()
    due = []
    for pipeline_pk, last, version in rows:
        schedule = rules(session, pipeline_pk, version).schedule
        if schedule is not None and schedule.ticks_until(now, last, limit=1):
            due.append(pipeline_pk)
    return due


# -- pause, resume and the listing ------------------------------------------------------------


def _scheduled_pipeline(session: Session, pipeline: str) -> tuple[int, ScheduleSpec]:
    pipeline_pk = session.execute(select(Pipeline.id).where(Pipeline.name == pipeline)
                                  ).scalar_one_or_none()
    if pipeline_pk is None:
        raise NotFound(f"unknown pipeline {pipeline!r} (run `orchestrator pipelines sync` first)")
    found = current_schedule(session, pipeline_pk)
    if found is None:
        raise InvalidInput(f"pipeline {pipeline!r} has no schedule (add `schedule:` to its file "
                           "and sync it)")
    return pipeline_pk, found[1]


def set_paused(session: Session, pipeline: str, paused: bool, now: datetime) -> bool:
    """Pause or resume a pipeline's schedule; returns whether it changed. Resuming goes
    on from now: the ticks of the pause are not caught up on."""
    pipeline_pk, _ = _scheduled_pipeline(session, pipeline)
    session.execute(insert_ignore(session, ScheduleState, ["pipeline_id"]).values(
        pipeline_id=pipeline_pk, paused=False, last_tick_at=now, updated_at=now))
    state = session.execute(select(ScheduleState).where(
        ScheduleState.pipeline_id == pipeline_pk).with_for_update()).scalar_one()
    if state.paused == paused:
        return False
    values: dict[str, Any] = {"paused": paused, "updated_at": now}
    if not paused and (state.last_tick_at is None or state.last_tick_at < now):
        values["last_tick_at"] = now
    session.execute(update(ScheduleState).where(ScheduleState.pipeline_id == pipeline_pk)
                    .values(**values).execution_options(synchronize_session=False))
    return True


def listing(session: Session, now: datetime, upcoming: int = 3) -> list[dict[str, Any]]:
    """Every pipeline whose current version has a schedule: its rule, whether it is
    paused, its last run (and that batch's status) and its next runs, in its time zone."""
    rows = session.execute(
        select(Pipeline.id, Pipeline.name, ScheduleState)
        .join(ScheduleState, ScheduleState.pipeline_id == Pipeline.id)
        .order_by(Pipeline.name)
    ).all()
    out = []
    for pipeline_pk, name, state in rows:
        found = current_schedule(session, pipeline_pk)
        if found is None:
            continue
        schedule = found[1]
        tz = schedule.tz
        last_status = None
        if state.last_batch_id is not None:
            last_status = session.execute(select(Batch.status).where(
                Batch.pipeline_id == pipeline_pk, Batch.batch_id == state.last_batch_id)
            ).scalar_one_or_none()
        start = max(now, state.last_tick_at) if state.last_tick_at else now
        nxt = [t.astimezone(tz).isoformat() for t in schedule.ticks_after(start, limit=upcoming)]
        out.append({
            "pipeline": name,
            "cron": schedule.cron,
            "timezone": schedule.timezone,
            "batch_id": schedule.batch_id,
            "catchup": schedule.catchup,
            "paused": bool(state.paused),
            "last_tick_at": (state.last_tick_at.astimezone(tz).isoformat()
                             if state.last_tick_at else None),
            "last_batch_id": state.last_batch_id,
            "last_status": str(last_status) if last_status is not None else None,
            "last_started_at": (state.last_started_at.astimezone(tz).isoformat()
                                if state.last_started_at else None),
            "next": nxt,
        })
    return out
