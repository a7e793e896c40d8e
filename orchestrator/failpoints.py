"""Failpoints: named places where a test makes the process fail or die.

Off in production. `hit(name)` costs one truthiness check of an empty dict unless
a test armed a point, in process with `arm()`, or for a subprocess with the
environment, read once per process:

    ORCHESTRATOR_FAILPOINTS=after_claim:raise,before_publish:kill

Actions:
- `raise`: raise `FailpointError`, an ordinary exception (a bug or a failing call);
- `crash`: raise `Crash`, a `BaseException` that no `except Exception` swallows, so
  the work is abandoned and open transactions roll back, as if the process died;
- `kill`: `os._exit(137)`, the process really dies (use in a subprocess only).

The points, in the order a delivery meets them: `after_claim` (the claim has
committed), `in_handler` (the handler is about to run), `before_success_commit`
(the handler's effect is done, the SUCCESS transaction not yet committed),
`before_publish` (a transition has committed, its run messages are not yet
published) and `mid_sweep` (a sweep has requeued and re-published, but has not
yet expired leases or closed batches).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

ENV = "ORCHESTRATOR_FAILPOINTS"
POINTS = ("after_claim", "in_handler", "before_success_commit", "before_publish", "mid_sweep")
ACTIONS = ("raise", "crash", "kill")


class Crash(BaseException):
    """The process died here (simulated): nothing after this point happens."""


class FailpointError(RuntimeError):
    """An injected ordinary failure."""


@dataclass
class _Armed:
    action: str
    # Fire on the `skip`+1-th hit, then `times` hits in all (None: every hit).
    skip: int = 0
    times: int | None = None
    hits: int = 0
    fired: int = 0


_armed: dict[str, _Armed] = {}
_lock = threading.Lock()


def parse(spec: str) -> dict[str, str]:
    """`point:action,point:action` -> {point: action}; a clear error for anything else."""
    out: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in spec.split(","))):
        point, _, action = item.partition(":")
        action = action or "raise"
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown failpoint {point!r} (known: {', '.join(POINTS)})")
        if action not in ACTIONS:
            raise ValueError(f"{ENV}: unknown action {action!r} (known: {', '.join(ACTIONS)})")
        out[point] = action
    return out


def _load_env() -> None:
    for point, action in parse(os.environ.get(ENV, "")).items():
        _armed[point] = _Armed(action)


_load_env()


def arm(point: str, action: str = "crash", *, skip: int = 0, times: int | None = 1) -> None:
    """Fire `action` at `point` after `skip` hits, `times` times (None: always)."""
    parse(f"{point}:{action}")
    with _lock:
        _armed[point] = _Armed(action, skip=skip, times=times)


def disarm(point: str | None = None) -> None:
    with _lock:
        if point is None:
            _armed.clear()
        else:
            _armed.pop(point, None)


def fired(point: str) -> int:
    """How often `point` has fired since it was armed."""
    with _lock:
        armed = _armed.get(point)
        return armed.fired if armed else 0


def hit(point: str) -> None:
    """Fail here if a test armed `point`; otherwise return at once."""
    if not _armed:
        return
    with _lock:
        armed = _armed.get(point)
        if armed is None:
            return
        armed.hits += 1
        if armed.hits <= armed.skip or (armed.times is not None and armed.fired >= armed.times):
            return
        armed.fired += 1
        action = armed.action
    if action == "kill":
        os._exit(137)
    if action == "crash":
        raise Crash(point)
    raise FailpointError(f"failpoint {point}")
