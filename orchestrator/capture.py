"""What a task prints and logs, kept per attempt.

While a handler runs, the thread that runs it has an `AttemptLog`: that thread's
writes to `sys.stdout` and `sys.stderr`, and the log records it emits (through
`ctx.log`, or any logger at the level it is configured for), go into the attempt's
log instead of the process's own output. Other threads write where they always did,
so a task's `print()` never mixes into the command line's own output.

The log is bounded: past `limit_bytes`, the first half is kept, then a marker of
what was left out, then the most recent lines, as `tail -f` would show them.

Each line may also be echoed to the process's log stream (`logs.task_line`): in the
cloud that is one JSON entry per line, with the batch, task and attempt as labels.

Threads a task starts itself are not followed (their output goes to the process's
streams), nor is output written to the file descriptors directly (subprocesses).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

# `ctx.log`: a logger of its own at INFO, whatever the root logger's level.
TASK_LOGGER = "orchestrator.task"
DEFAULT_LIMIT_BYTES = 64 * 1024
# One line longer than this is cut (a dumped blob must not evict every other line).
MAX_LINE_CHARS = 4000
# The bytes an entry costs beyond its text (time, stream, level), for the bound.
_ENTRY_OVERHEAD = 48

Entry = dict[str, Any]

_local = threading.local()
_install_lock = threading.Lock()


class AttemptLog:
    """The bounded lines of one attempt: its head, a marker, and its tail."""

    def __init__(self, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                 echo: Callable[[Entry], None] | None = None):
        self.limit_bytes = max(1024, limit_bytes)
        self.echo = echo
        self._head: list[Entry] = []
        self._head_bytes = 0
        self._tail: deque[tuple[Entry, int]] = deque()
        self._tail_bytes = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self._partial = {"stdout": "", "stderr": ""}
        self._lock = threading.Lock()
        # Bumped by every new line: a writer saves only a log that changed.
        self.version = 0

    def write(self, stream: str, text: str) -> None:
        """Text written to a stream: complete lines become entries."""
        with self._lock:
            buf = self._partial[stream] + text
            lines = buf.split("\n")
            rest = lines.pop()
            if len(rest) > MAX_LINE_CHARS:  # no newline in sight: keep it as a line
                lines.append(rest)
                rest = ""
            self._partial[stream] = rest
        for line in lines:
            self.add(stream, line.rstrip("\r"))

    def add(self, stream: str, line: str, *, level: str | None = None,
            logger: str | None = None, at: datetime | None = None) -> None:
        if len(line) > MAX_LINE_CHARS:
            line = (f"{line[:MAX_LINE_CHARS]}… ({len(line) - MAX_LINE_CHARS:,} more "
                    "characters cut)")
        entry: Entry = {"at": (at or datetime.now(UTC)).isoformat(timespec="milliseconds"),
                        "stream": stream, "line": line}
        if level is not None:
            entry["level"] = level
        if logger is not None:
            entry["logger"] = logger
        size = len(line.encode("utf-8", "replace")) + _ENTRY_OVERHEAD
        half = self.limit_bytes // 2
        with self._lock:
            if not self._tail and self._head_bytes + size <= half:
                self._head.append(entry)
                self._head_bytes += size
            else:
                self._tail.append((entry, size))
                self._tail_bytes += size
                while self._tail_bytes > half and len(self._tail) > 1:
                    _, gone = self._tail.popleft()
                    self._tail_bytes -= gone
                    self.dropped += 1
                    self.dropped_bytes += gone
            self.version += 1
        if self.echo is not None:
            with quiet():
                self.echo(entry)

    def close(self) -> None:
        """Lines still without their newline become entries."""
        with self._lock:
            pending = [(s, t) for s, t in self._partial.items() if t]
            self._partial = {"stdout": "", "stderr": ""}
        for stream, text in pending:
            self.add(stream, text)

    def entries(self) -> list[Entry]:
        with self._lock:
            out = list(self._head)
            if self.dropped:
                out.append({"at": self._tail[0][0]["at"] if self._tail else out[-1]["at"],
                            "stream": "orchestrator",
                            "line": f"… {self.dropped:,} line(s), about "
                                    f"{self.dropped_bytes // 1024:,} KiB, left out …"})
            out.extend(e for e, _ in self._tail)
        return out

    def text(self) -> str:
        return "\n".join(e["line"] for e in self.entries())


# -- routing a thread's output into its attempt's log --------------------------------------


def current() -> AttemptLog | None:
    """The attempt log of this thread, unless it is writing its own echo."""
    if getattr(_local, "quiet", False):
        return None
    log: AttemptLog | None = getattr(_local, "log", None)
    return log


@contextmanager
def quiet() -> Iterator[None]:
    """Writes of this block go to the real streams, even on a capturing thread."""
    before = getattr(_local, "quiet", False)
    _local.quiet = True
    try:
        yield
    finally:
        _local.quiet = before


@contextmanager
def capturing(log: AttemptLog) -> Iterator[AttemptLog]:
    """Route this thread's output and log records into `log` for the block."""
    install()
    before = getattr(_local, "log", None)
    _local.log = log
    try:
        yield log
    finally:
        _local.log = before
        log.close()


class _Tee:
    """Stands in for sys.stdout or sys.stderr: a capturing thread's writes go to its
    attempt's log, every other thread's to the stream it replaced."""

    def __init__(self, name: str, original: Any):
        self._name = name
        self.original = original

    def write(self, text: str) -> int:
        log = current()
        if log is None:
            return int(self.original.write(text) or 0)
        log.write(self._name, str(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if current() is None:
            self.original.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def real_stream(stream: Any) -> Any:
    """The stream behind a stand-in (for handlers that must never be captured)."""
    return stream.original if isinstance(stream, _Tee) else stream


class _CaptureHandler(logging.Handler):
    """Log records of a capturing thread go into its attempt's log."""

    def emit(self, record: logging.LogRecord) -> None:
        log = current()
        name = record.name
        if log is None:
            if name == TASK_LOGGER or name.startswith(TASK_LOGGER + "."):
                _propagate_outside_an_attempt(record, self)
            elif not _handled_elsewhere(name, self):
                _last_resort(record)
            return
        if name == "orchestrator" or (name.startswith("orchestrator.")
                                      and not name.startswith(TASK_LOGGER)):
            return  # the orchestrator's own lines have their own output
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line
            message = str(record.msg)
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        log.add("log", message, level=record.levelname, logger=name)


def _handled_elsewhere(name: str, me: logging.Handler) -> bool:
    """Whether another handler on the record's way up saw it: if none did, Python
    would have printed it with its last resort, which this handler must not silence."""
    logger: logging.Logger | None = logging.getLogger(name)
    while logger is not None:
        if any(h is not me for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def _last_resort(record: logging.LogRecord) -> None:
    if logging.lastResort is not None and record.levelno >= logging.lastResort.level:
        logging.lastResort.handle(record)


def _propagate_outside_an_attempt(record: logging.LogRecord, me: logging.Handler) -> None:
    # `ctx.log` in a unit test, or in a thread the task started: behave as a logger
    # that propagates to the root logger would (pytest's caplog sees it).
    handlers = [h for h in logging.getLogger().handlers if h is not me]
    if not handlers:
        _last_resort(record)
    for h in handlers:
        if record.levelno >= h.level:
            h.handle(record)


_handler = _CaptureHandler()


def install() -> None:
    """Put the stand-in streams and the capture handler in place (idempotent; a test
    harness that swapped the streams meanwhile gets them wrapped again)."""
    if (isinstance(sys.stdout, _Tee) and isinstance(sys.stderr, _Tee)
            and _handler in logging.getLogger().handlers):
        return
    with _install_lock:
        if not isinstance(sys.stdout, _Tee):
            sys.stdout = _Tee("stdout", sys.stdout)
        if not isinstance(sys.stderr, _Tee):
            sys.stderr = _Tee("stderr", sys.stderr)
        root = logging.getLogger()
        if _handler not in root.handlers:
            root.addHandler(_handler)
        task = logging.getLogger(TASK_LOGGER)
        if _handler not in task.handlers:
            task.addHandler(_handler)
            task.setLevel(logging.INFO)
            task.propagate = False


def task_logger(task: str) -> logging.Logger:
    """`ctx.log`: records at INFO and above are kept with the attempt."""
    install()
    return logging.getLogger(f"{TASK_LOGGER}.{task}")
