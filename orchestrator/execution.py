"""Running one attempt's handler: under its timeout, with what it prints and logs
captured, and its failure described with a traceback.

The handler runs on the thread that claimed the attempt, so a quick task costs no
hand-over between threads. One watchdog thread keeps the deadlines of every
running attempt. When an attempt's timeout passes, or `watch()` says it was fenced
off meanwhile (the batch was cancelled, the task moved on), the watchdog abandons
it: `on_abandon` records the outcome at once (`timed out after 2s`, with where the
handler was), `ctx.is_active()` turns false, and the listeners (the embedded bus)
learn that the thread is lost to that handler, so that nothing waits for it.

A Python thread cannot be killed, so an abandoned handler runs on until it returns;
then `run_handler` raises `Abandoned` and the caller keeps what it did only as a
note on its attempt, never as the task's result (the attempt number fences it off,
as it does any late result). In the cloud the function instance stays busy with it
until then (one request per instance, so no new task shares it).
"""

from __future__ import annotations

import heapq
import itertools
import os
import sys
import threading
import time
import traceback as tb_module
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.capture import AttemptLog, capturing
from orchestrator.errors import PermanentError, RetryableError

# A traceback longer than this keeps its first and last frames.
MAX_TRACEBACK_CHARS = 32 * 1024
# How often the watchdog looks at its deadlines: a timeout fires at most this late.
TICK_S = 0.1


class TimedOut(RetryableError):
    """The handler did not return within the task's timeout; `frames` is where it was."""

    def __init__(self, timeout_s: float, frames: list[tb_module.FrameSummary] | None = None):
        super().__init__(f"timed out after {timeout_s:g}s")
        self.frames = frames or []


class Fenced(Exception):
    """The attempt no longer holds its task (cancelled, or moved on) while it ran."""


class Abandoned(Exception):
    """The handler returned after the watchdog had given its attempt up: `output` and
    `error` are what it did then, `reason` why it was given up."""

    def __init__(self, reason: BaseException, output: Any, error: BaseException | None,
                 late_s: float):
        super().__init__(f"abandoned: {reason}")
        self.reason = reason
        self.output = output
        self.error = error
        self.late_s = late_s


@dataclass
class Failure:
    """A failed attempt as the task log and the attempt record show it."""

    error: str  # one line, e.g. "RuntimeError: disk full (at /p/mytasks.py:12 in load)"
    traceback: str | None
    permanent: bool


def describe(exc: BaseException) -> Failure:
    """The one-line error (with the innermost user-code location, if any) and the
    traceback, bounded, without the orchestrator's own frames above the handler."""
    from orchestrator.usercode import frame_location, location

    if isinstance(exc, TimedOut):
        where = frame_location([(f.filename, f.lineno or 0, f.name) for f in exc.frames],
                               prefer_user=True)
        stack = "".join(tb_module.format_list(exc.frames))
        return Failure(error=f"{exc} (at {where})" if where else str(exc),
                       traceback=bound(f"{exc}; the handler was still running, here:\n{stack}"
                                       if stack else None),
                       permanent=False)
    message = str(exc).strip()
    line = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    where = location(exc.__traceback__, prefer_user=True)
    if where and not isinstance(exc, PermanentError):
        line = f"{line} (at {where})"
    return Failure(error=line, traceback=bound(format_traceback(exc)),
                   permanent=isinstance(exc, PermanentError))


def format_traceback(exc: BaseException) -> str:
    from orchestrator.usercode import ImportFailed

    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ImportFailed):
        cause = cause.__cause__
    if cause is not None and cause.__cause__ is not None:
        # A module that cannot load: its own error, in its own file, is the whole story.
        return _import_traceback(cause.__cause__)
    return "".join(tb_module.format_exception(type(exc), exc, _skip_own(exc.__traceback__)))


def _import_traceback(exc: BaseException) -> str:
    import importlib

    from orchestrator import usercode

    machinery = (usercode.__file__, importlib.__file__)
    te = tb_module.TracebackException(type(exc), exc, exc.__traceback__)
    te.stack = tb_module.StackSummary.from_list(
        [f for f in te.stack if not f.filename.startswith("<frozen")
         and f.filename not in machinery])
    return "".join(te.format(chain=False))


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _skip_own(tb: Any) -> Any:
    """From the user's own code on, when the error passed through it (a `python`
    task): the orchestrator's frames above it say nothing about the task. Otherwise
    from the handler's own frame on (a load or SQL step has no user frame)."""
    start, cur = tb, tb
    while cur is not None:
        code = cur.tb_frame.f_code
        if code.co_filename == __file__ and code.co_name == "run_handler":
            start = cur.tb_next
        cur = cur.tb_next
    cur = start
    while cur is not None:
        if not os.path.abspath(cur.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR):
            return cur
        cur = cur.tb_next
    return start


def bound(text: str | None, limit: int = MAX_TRACEBACK_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    half = limit // 2
    cut = len(text) - 2 * half
    return f"{text[:half]}\n… {cut:,} characters left out …\n{text[-half:]}"


def stack_of(ident: int | None) -> list[tb_module.FrameSummary]:
    """Where a thread is now (the frames of a handler that timed out), from the
    handler's call on."""
    frame = sys._current_frames().get(ident) if ident is not None else None
    if frame is None:
        return []
    stack = tb_module.extract_stack(frame)
    for i, f in enumerate(stack):
        if f.filename == __file__ and f.name == "run_handler":
            return list(stack[i + 1:])
    return list(stack)


# -- the watchdog ---------------------------------------------------------------------------


@dataclass
class _Watch:
    ident: int
    deadline: float
    timeout_s: float
    watch: Callable[[], bool] | None
    watch_every_s: float
    next_watch: float
    on_abandon: Callable[[BaseException], None] | None
    stop: threading.Event | None
    done: bool = False
    abandoned: BaseException | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_listeners: list[weakref.WeakMethod[Callable[[int], None]]] = []
_listeners_lock = threading.Lock()
_abandoned_threads: set[int] = set()


def add_abandon_listener(method: Callable[[int], None]) -> None:
    """`method(thread_ident)` is called when a thread's handler is abandoned (a bound
    method, held weakly: a bus that is gone stops listening)."""
    with _listeners_lock:
        _listeners.append(weakref.WeakMethod(method))


def is_abandoned(ident: int | None) -> bool:
    """Whether this thread is still running a handler that was given up."""
    return ident in _abandoned_threads


class _Watchdog:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Watch]] = []
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, w: _Watch) -> None:
        # No wake-up: the watchdog looks every TICK_S anyway, and a wake-up per
        # attempt would cost a thread switch on every quick task.
        with self._lock:
            heapq.heappush(self._heap, (min(w.deadline, w.next_watch), next(self._seq), w))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="orchestrator-watchdog",
                                                daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        tick = threading.Event()  # never set: a wait that a patched time.sleep cannot skip
        while True:
            tick.wait(TICK_S)
            now = time.monotonic()
            due: list[_Watch] = []
            with self._lock:
                while self._heap and self._heap[0][0] <= now:
                    _, _, w = heapq.heappop(self._heap)
                    if not w.done:
                        due.append(w)
            for w in due:
                self._check(w, now)

    def _check(self, w: _Watch, now: float) -> None:
        reason: BaseException | None = None
        if now >= w.deadline:
            reason = TimedOut(w.timeout_s, stack_of(w.ident))
        elif w.watch is not None:
            try:
                still = w.watch()
            except Exception:  # a failed check (the database is away) is no verdict
                still = True
            if not still:
                reason = Fenced("the attempt no longer holds its task")
        if reason is None:
            w.next_watch = now + w.watch_every_s
            with self._lock:
                if not w.done:
                    heapq.heappush(self._heap, (min(w.deadline, w.next_watch),
                                                next(self._seq), w))
            return
        with w.lock:
            if w.done:
                return
            w.abandoned = reason
            _abandoned_threads.add(w.ident)
        if w.stop is not None:
            w.stop.set()
        # Recording the outcome is a transaction: not on the watchdog's own thread.
        threading.Thread(target=_give_up, args=(w, reason), daemon=True,
                         name="orchestrator-abandon").start()


_watchdog = _Watchdog()


def reset_in_worker_process() -> None:
    """In a worker process forked from a runtime: it has none of its parent's threads
    nor their attempts, so its watchdog starts anew on first use."""
    global _watchdog
    _watchdog = _Watchdog()


def _give_up(w: _Watch, reason: BaseException) -> None:
    """Record the outcome of an abandoned attempt, then tell the listeners (the bus
    counts its message done only once that outcome is in the task log)."""
    try:
        if w.on_abandon is not None:
            w.on_abandon(reason)
    finally:
        with _listeners_lock:
            _listeners[:] = [ref for ref in _listeners if ref() is not None]
            listeners = [ref() for ref in _listeners]
        for listener in listeners:
            if listener is not None:
                listener(w.ident)


def run_handler(fn: Callable[..., Any], ctx: Any, log: AttemptLog, *, timeout_s: float,
                watch: Callable[[], bool] | None = None, watch_every_s: float = 2.0,
                on_abandon: Callable[[BaseException], None] | None = None,
                stop: threading.Event | None = None) -> Any:
    """Call `fn(ctx)` on this thread with its output captured in `log`, and return its
    result or raise its exception.

    The watchdog gives the call up after `timeout_s`, or when `watch()` (called every
    `watch_every_s` from the watchdog's thread) returns False: it then sets `stop`
    and calls `on_abandon(TimedOut(...) or Fenced(...))` on a thread of its own. A
    call given up raises `Abandoned` here when `fn` finally returns.
    """
    now = time.monotonic()
    w = _Watch(ident=threading.get_ident(), deadline=now + timeout_s, timeout_s=timeout_s,
               watch=watch, watch_every_s=watch_every_s, next_watch=now + watch_every_s,
               on_abandon=on_abandon, stop=stop)
    _watchdog.add(w)
    output: Any = None
    error: BaseException | None = None
    try:
        with capturing(log):
            output = fn(ctx)
    except BaseException as exc:  # the task's failure, whatever it is, is its result
        error = exc
    with w.lock:
        w.done = True
        reason = w.abandoned
    if reason is not None:
        _abandoned_threads.discard(w.ident)
        raise Abandoned(reason, output, error, time.monotonic() - w.deadline + timeout_s)
    if isinstance(error, SystemExit):
        # sys.exit() in a task ends the task, never the worker that runs it.
        raise RuntimeError(f"the handler called sys.exit({error.code!r})") from error
    if error is not None:
        raise error
    return output


def run_in_thread(fn: Callable[..., Any], ctx: Any, log: AttemptLog, *, timeout_s: float,
                  ) -> Any:
    """`run_handler` on a thread of its own, for a caller that must return at the
    timeout (a command line): raises `TimedOut` then, leaving the handler behind."""
    result: dict[str, Any] = {}
    finished = threading.Event()

    def given_up(exc: BaseException) -> None:
        result.setdefault("abandoned", exc)
        finished.set()

    def body() -> None:
        try:
            result["output"] = run_handler(fn, ctx, log, timeout_s=timeout_s,
                                           on_abandon=given_up)
        except Abandoned:
            return
        except BaseException as exc:
            result["error"] = exc
        finished.set()

    threading.Thread(target=body, name="orchestrator-task", daemon=True).start()
    finished.wait()
    if "abandoned" in result:
        raise result["abandoned"]
    if "error" in result:
        raise result["error"]
    return result.get("output")
