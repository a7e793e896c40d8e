"""Time in a pipeline file: its schedule, its deadline, when its files are due, and
which events alert.

```yaml
schedule:
  cron: "0 6 * * *"          # five fields (cronsim), or @hourly, @daily, @weekly, @monthly
  timezone: Europe/Paris     # the cron's, the deadline's and the files' clock (default UTC)
  batch_id: "{date}"         # from the tick's logical time
  catchup: latest            # after an outage: latest | all (at most catchup_limit) | none
  params: {region: eu}
deadline:
  after_start: 2h            # or at: "07:30" (the first 07:30 at or after the logical time)
  warn_after: 1h             # or warn_at: "07:00": alert without cancelling
alerts:
  events: [batch_failed, task_failed, deadline_missed, deadline_warning, file_late]
  to: [pubsub, webhook]
```

and on a `gcs_trigger`, `expected_by: "06:30"` and `fail_after: "08:00"` (a clock
time, or a duration after the batch starts such as `30m`).

Everything here is pure: the sweeper's units store the normalized form per
pipeline version and evaluate it against an injected clock.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

from orchestrator.identifiers import valid_batch_id

ALERT_KINDS = ("batch_failed", "task_failed", "deadline_missed", "deadline_warning", "file_late",
               "batch_succeeded")
AlertKind = Literal["batch_failed", "task_failed", "deadline_missed", "deadline_warning",
                    "file_late", "batch_succeeded"]
Channel = Literal["pubsub", "webhook"]
CHANNELS: tuple[Channel, ...] = ("pubsub", "webhook")
CATCHUP = ("latest", "all", "none")

# The usual cron nicknames; cronsim takes the five fields only.
NICKNAMES = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)\s*([smhd]))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_CLOCK_RE = re.compile(r"^([01]?\d|2[0-3]):([0-5]\d)(?::([0-5]\d))?$")
_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
# The placeholders of a schedule's batch id, from the tick's local (logical) time.
PLACEHOLDERS = {
    "date": "%Y-%m-%d",
    "month": "%Y-%m",
    "datetime": "%Y-%m-%dT%H:%M",
}
# How many upcoming ticks validation renders to prove a template gives each its own id.
_DISTINCT_SAMPLE = 200
_SAMPLE_FROM = datetime(2001, 1, 1, tzinfo=UTC)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


# -- durations and clock times --------------------------------------------------------------


def parse_duration(value: Any) -> float:
    """`90` (seconds), `"45s"`, `"30m"`, `"2h"`, `"1d"`, `"1h30m"` -> seconds (> 0)."""
    if isinstance(value, bool):
        raise ValueError(f"a duration such as '30m' or '2h', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value.strip().lower()):
        seconds = sum(float(n) * _UNITS[u]
                      for n, u in _DURATION_PART.findall(value.strip().lower()))
    else:
        raise ValueError(f"a duration such as '45s', '30m', '2h' or '1h30m', got {value!r}")
    if seconds <= 0:
        raise ValueError(f"a duration must be positive, got {value!r}")
    return seconds


def parse_clock(value: Any) -> time:
    """`"07:30"` or `"07:30:15"` -> a time of day."""
    if isinstance(value, int) and not isinstance(value, bool):
        # YAML 1.1 reads an unquoted 17:30 as the base-60 number 1050.
        raise ValueError(f"write clock times in quotes, e.g. \"17:30\" (YAML read {value!r} "
                         "as a number)")
    m = _CLOCK_RE.match(value.strip()) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"a clock time such as \"07:30\", got {value!r}")
    return time(int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))


def format_duration(seconds: float) -> str:
    whole = int(seconds)
    if whole != seconds:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts) or "0s"


def format_clock(t: time) -> str:
    return t.strftime("%H:%M:%S" if t.second else "%H:%M")


def local_clock(at: datetime, tz: ZoneInfo) -> str:
    """A moment as the pipeline's clock shows it, e.g. `07:30 Europe/Paris`."""
    return f"{format_clock(at.astimezone(tz).time().replace(microsecond=0))} {tz.key}"


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as "
                         "'Europe/Paris' or 'UTC')") from exc


def clock_at_or_after(t: time, ref: datetime, tz: ZoneInfo) -> datetime:
    """The first moment at or after `ref` whose wall clock in `tz` reads `t` (UTC).

    A time that a spring-forward skips resolves past the gap; one that a fall-back
    repeats resolves to its first occurrence.
    """
    local = ref.astimezone(tz)
    for days in range(3):
        wall = datetime.combine(local.date() + timedelta(days=days), t).replace(tzinfo=tz)
        at = wall.astimezone(UTC)
        if at >= ref:
            return at
    raise AssertionError("unreachable: a clock time recurs every day")


class TimeRule(_Frozen):
    """A moment relative to a batch: a clock time (`"06:30"`: the first at or after its
    logical time, in the pipeline's time zone) or a duration after it starts (`"30m"`)."""

    at: time | None = None
    after_s: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        if isinstance(value, str) and _CLOCK_RE.match(value.strip()):
            return {"at": parse_clock(value)}
        if isinstance(value, int | float) and not isinstance(value, bool):
            # Unquoted 6:30 is 390 in YAML 1.1: refuse rather than guess.
            raise ValueError(f"write a clock time in quotes (\"06:30\") or a duration with "
                             f"its unit (\"30m\"), got the number {value!r}")
        return {"after_s": parse_duration(value)}

    @model_validator(mode="after")
    def _one(self) -> TimeRule:
        if (self.at is None) == (self.after_s is None):
            raise ValueError("give a clock time (\"06:30\") or a duration (\"30m\")")
        return self

    @model_serializer
    def _text(self) -> str:
        return format_clock(self.at) if self.at is not None else format_duration(
            self.after_s or 0)

    def resolve(self, started_at: datetime, logical_at: datetime, tz: ZoneInfo) -> datetime:
        if self.at is not None:
            return clock_at_or_after(self.at, logical_at, tz)
        return started_at + timedelta(seconds=self.after_s or 0)

    def describe(self, tz: ZoneInfo) -> str:
        if self.at is not None:
            return f"{format_clock(self.at)} {tz.key}"
        return f"{format_duration(self.after_s or 0)} after the batch started"


# -- schedules ------------------------------------------------------------------------------


def cron_fields(expr: str) -> str:
    text = " ".join(expr.split())
    return NICKNAMES.get(text.lower(), text)


def render_batch_id(template: str, tick: datetime, tz: ZoneInfo) -> str:
    """The batch id of the tick at `tick` (any aware time) in `tz`: `{date}`, `{month}`,
    `{datetime}`, or strftime codes (`%Y%m%d`) on the local time. The second pass of an
    hour that a fall-back repeats gets `_2`, so an hourly tick there is not lost."""
    local = tick.astimezone(tz)

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in PLACEHOLDERS:
            raise ValueError(f"unknown placeholder {{{name}}} in batch_id (use "
                             f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)} or strftime "
                             "codes such as %Y%m%d)")
        return local.strftime(PLACEHOLDERS[name])

    rendered = local.strftime(_PLACEHOLDER_RE.sub(lambda m: sub(m).replace("%", "%%"),
                                                  template))
    if local.fold and _repeated(local):
        rendered += "_2"
    return rendered


def _repeated(local: datetime) -> bool:
    """True if the wall time happens twice (the second pass of a fall-back hour)."""
    first = local.replace(fold=0)
    return first.utcoffset() != local.utcoffset()


class ScheduleSpec(_Frozen):
    cron: str
    timezone: str = "UTC"
    batch_id: str = "{datetime}"
    catchup: Literal["latest", "all", "none"] = "latest"
    # With `all`, the most recent missed ticks started after an outage, at most this many.
    catchup_limit: int = Field(default=24, ge=1, le=1000)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        expr = cron_fields(v)
        try:
            CronSim(expr, _SAMPLE_FROM)
        except CronSimError as exc:
            raise ValueError(f"invalid cron expression {v!r}: {exc} (five fields: minute "
                             "hour day-of-month month day-of-week, or @daily, @hourly, …)") from exc
        return " ".join(v.split())

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, v: str) -> str:
        zone(v)
        return v

    @model_validator(mode="after")
    def _template(self) -> ScheduleSpec:
        tz = zone(self.timezone)
        seen: dict[str, datetime] = {}
        for tick in self.ticks_after(_SAMPLE_FROM, limit=_DISTINCT_SAMPLE):
            batch_id = render_batch_id(self.batch_id, tick, tz)
            if not valid_batch_id(batch_id):
                raise ValueError(f"batch_id {self.batch_id!r} renders {batch_id!r}, which is not "
                                 "a valid batch id (letters, digits and . _ - = :)")
            if batch_id in seen:
                raise ValueError(
                    f"batch_id {self.batch_id!r} gives two ticks the same id {batch_id!r} "
                    f"({seen[batch_id].astimezone(tz):%Y-%m-%d %H:%M} and "
                    f"{tick.astimezone(tz):%Y-%m-%d %H:%M}); use a finer one such as "
                    "'{datetime}'")
            seen[batch_id] = tick
        return self

    @property
    def tz(self) -> ZoneInfo:
        return zone(self.timezone)

    def ticks_after(self, after: datetime, *, limit: int) -> Iterator[datetime]:
        """Up to `limit` ticks strictly after `after`, oldest first, in UTC."""
        it = CronSim(cron_fields(self.cron), after.astimezone(self.tz))
        for _ in range(limit):
            yield next(it).astimezone(UTC)

    def ticks_until(self, now: datetime, after: datetime | None, *,
                    limit: int) -> list[datetime]:
        """The latest `limit` ticks in (after, now], oldest first, in UTC. Walks back
        from `now`, so a long outage costs `limit` steps, not one per missed tick."""
        # cronsim goes back from strictly before its start; a tick at `now` counts.
        it = CronSim(cron_fields(self.cron), (now + timedelta(seconds=1)).astimezone(self.tz),
                     reverse=True)
        out: list[datetime] = []
        while len(out) < limit:
            tick = next(it).astimezone(UTC)
            if after is not None and tick <= after:
                break
            out.append(tick)
        return out[::-1]

    def describe(self) -> str:
        return f"{self.cron} ({self.timezone})"


# -- deadlines ------------------------------------------------------------------------------


class DeadlineSpec(_Frozen):
    """When a batch must be done (the open tasks are cancelled then and the batch ends
    FAILED), and when to warn that it is not yet. Both forms may be given: the
    earlier moment applies."""

    after_start: float | None = None
    at: time | None = None
    warn_after: float | None = None
    warn_at: time | None = None

    @field_validator("after_start", "warn_after", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    @field_validator("at", "warn_at", mode="before")
    @classmethod
    def _clock(cls, v: Any) -> Any:
        return None if v is None else parse_clock(v)

    @model_validator(mode="after")
    def _some(self) -> DeadlineSpec:
        if not any(v is not None for v in (self.after_start, self.at, self.warn_after,
                                             self.warn_at)):
            raise ValueError("a deadline needs after_start, at, warn_after or warn_at")
        return self

    def times(self, started_at: datetime, logical_at: datetime,
              tz: ZoneInfo) -> tuple[datetime | None, datetime | None]:
        """(deadline, warning) of a batch started at `started_at` for `logical_at`."""
        return (_earliest(self.after_start, self.at, started_at, logical_at, tz),
                _earliest(self.warn_after, self.warn_at, started_at, logical_at, tz))

    def describe(self, tz: ZoneInfo) -> str:
        parts = []
        if self.at is not None:
            parts.append(f"at {format_clock(self.at)} {tz.key}")
        if self.after_start is not None:
            parts.append(f"{format_duration(self.after_start)} after start")
        return " or ".join(parts)


def _earliest(after_s: float | None, at: time | None, started_at: datetime,
              logical_at: datetime, tz: ZoneInfo) -> datetime | None:
    found = []
    if after_s is not None:
        found.append(started_at + timedelta(seconds=after_s))
    if at is not None:
        found.append(clock_at_or_after(at, logical_at, tz))
    return min(found) if found else None


# -- alerts ---------------------------------------------------------------------------------


class AlertsSpec(_Frozen):
    """Which events alert, and where (the channels the deployment configures: the
    `alerts` Pub/Sub topic and a webhook whose URL is a setting, never in the file)."""

    events: tuple[AlertKind, ...] = ()
    to: tuple[Channel, ...] = CHANNELS

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        # `alerts: [batch_failed, file_late]` lists the events.
        if isinstance(value, list | tuple):
            return {"events": value}
        return value

    @field_validator("events", "to")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(dict.fromkeys(v))


def parse_alert_events(text: str) -> tuple[str, ...]:
    """A comma-separated list of alert kinds (a setting), checked."""
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in ALERT_KINDS]
    if unknown:
        raise ValueError(f"unknown alert event(s) {', '.join(unknown)} (known: "
                         f"{', '.join(ALERT_KINDS)})")
    return kinds
