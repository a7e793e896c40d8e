"""Circuit breakers: stop hammering a service that keeps failing.

Opt in per task, in its config:

    config:
      circuit_breaker: {key: billing-api, failures: 5, window_s: 60, open_s: 30}

(`circuit_breaker: true` takes every default.) `key` names what is protected:
by default the task's handler (`handler:<name>`), or a named dependency shared by
several tasks and pipelines (`billing-api`). The breaker counts consecutive
handler failures under its key; `failures` of them within `window_s` seconds
open it. While it is open, a delivery of any task under that key is not claimed:
the task goes QUEUED -> RETRYING with the remaining open time as its delay, and
the sweeper requeues it then (a deferral does not use up a retry). After
`open_s`, one claim is let through as a probe (half-open): its success closes the
breaker, its failure opens it again for another `open_s`. A probe that never
reports back (its worker died) is replaced by another after `open_s`.

One row per key in `circuit_breakers`; every change is taken under that row's
lock, so concurrent workers agree on the state and elect one probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from orchestrator.db.dialect import insert_ignore
from orchestrator.db.models import CircuitBreaker

CONFIG_KEY = "circuit_breaker"
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_FIELDS = {"key": str, "failures": int, "window_s": float, "open_s": float}


@dataclass(frozen=True)
class Policy:
    key: str
    failures: int = 5
    window_s: float = 60.0
    open_s: float = 30.0


def check_config(config: dict[str, Any]) -> list[str]:
    """Problems with a task's `circuit_breaker` setting (checked at sync time)."""
    raw = config.get(CONFIG_KEY)
    if raw is None or isinstance(raw, bool):
        return []
    if not isinstance(raw, dict):
        return [f"{CONFIG_KEY}: must be true or a mapping of {', '.join(_FIELDS)}"]
    problems = [f"{CONFIG_KEY}: unknown key {k!r}" for k in raw if k not in _FIELDS]
    key = raw.get("key")
    if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 200):
        problems.append(f"{CONFIG_KEY}.key: must be a non-empty string of at most 200 characters")
    for name in ("failures", "window_s", "open_s"):
        value = raw.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or value <= 0):
            problems.append(f"{CONFIG_KEY}.{name}: must be a positive number, got {value!r}")
    return problems


def policy_for(handler: str, config: dict[str, Any]) -> Policy | None:
    """The task's breaker, or None when it has none (or a malformed one)."""
    raw = config.get(CONFIG_KEY)
    if raw is None or raw is False or check_config(config):
        return None
    raw = {} if raw is True else raw
    return Policy(key=str(raw.get("key") or f"handler:{handler}"),
                  failures=int(raw.get("failures", Policy.failures)),
                  window_s=float(raw.get("window_s", Policy.window_s)),
                  open_s=float(raw.get("open_s", Policy.open_s)))


def _locked(session: Session, key: str, now: datetime) -> CircuitBreaker:
    session.execute(insert_ignore(session, CircuitBreaker, ["key"]).values(
        key=key, state=CLOSED, consecutive_failures=0, updated_at=now))
    return session.execute(
        select(CircuitBreaker).where(CircuitBreaker.key == key).with_for_update()
    ).scalar_one()


def _set(session: Session, key: str, **values: Any) -> None:
    session.execute(update(CircuitBreaker).where(CircuitBreaker.key == key).values(**values)
                    .execution_options(synchronize_session=False))


def gate(session: Session, policy: Policy, now: datetime) -> float | None:
    """None: the claim may go ahead (closed, or this claim is the half-open probe).
    Otherwise the seconds the task should wait before it is tried again."""
    state = session.execute(
        select(CircuitBreaker.state).where(CircuitBreaker.key == policy.key)
    ).scalar_one_or_none()
    if state is None or state == CLOSED:
        return None
    row = _locked(session, policy.key, now)
    if row.state == CLOSED:
        return None
    # Open: wait out open_s from the opening. Half-open: wait for the probe, but no
    # longer than open_s, in case the probe's worker died without a word.
    since = row.opened_at if row.state == OPEN else row.updated_at
    reopen_at = (since or now) + timedelta(seconds=policy.open_s)
    if now < reopen_at:
        return (reopen_at - now).total_seconds()
    _set(session, policy.key, state=HALF_OPEN, updated_at=now)
    return None


def record_failure(session: Session, policy: Policy, now: datetime) -> str:
    """Count a failed attempt under the key; returns the breaker's new state."""
    row = _locked(session, policy.key, now)
    if row.state == HALF_OPEN:
        _set(session, policy.key, state=OPEN, opened_at=now, updated_at=now,
             consecutive_failures=row.consecutive_failures + 1)
        return OPEN
    if row.state == OPEN:
        # An attempt that started before the breaker opened: already counted against it.
        return OPEN
    fresh = (row.window_started_at is None
             or now - row.window_started_at > timedelta(seconds=policy.window_s))
    count = 1 if fresh else row.consecutive_failures + 1
    window_start = now if fresh else row.window_started_at
    state = OPEN if count >= policy.failures else CLOSED
    _set(session, policy.key, state=state, consecutive_failures=count,
         window_started_at=window_start, opened_at=now if state == OPEN else None,
         updated_at=now)
    return state


def record_success(session: Session, policy: Policy, now: datetime) -> None:
    """A success under the key closes its breaker and forgets the failures."""
    state = session.execute(
        select(CircuitBreaker.state, CircuitBreaker.consecutive_failures)
        .where(CircuitBreaker.key == policy.key)
    ).first()
    if state is None or (state[0] == CLOSED and state[1] == 0):
        return
    _set(session, policy.key, state=CLOSED, consecutive_failures=0, window_started_at=None,
         opened_at=None, updated_at=now)


def state_of(session: Session, key: str) -> str:
    return session.execute(
        select(CircuitBreaker.state).where(CircuitBreaker.key == key)
    ).scalar_one_or_none() or CLOSED
