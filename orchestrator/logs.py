"""Structured logs: JSON lines for Cloud Logging, readable lines locally.

Cloud Logging reads `severity` and `message` from a JSON line on stdout, and
labels under `logging.googleapis.com/labels`, so a batch's whole story can be
filtered by pipeline, batch, task and attempt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "orchestrator"
# The `log_format` setting's variable, read here without the settings model so that an
# entry point can configure its logs before it imports anything heavy.
LOG_FORMAT_ENV = "ORCHESTRATOR_LOG_FORMAT"
log = logging.getLogger(LOGGER_NAME)
_LABELS = ("pipeline", "batch_id", "task", "attempt")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = dict(getattr(record, "fields", {}) or {})
        labels = {k: str(fields[k]) for k in _LABELS if fields.get(k) is not None}
        entry: dict[str, Any] = {
            "severity": record.levelname,
            "message": record.getMessage(),
            "logger": record.name,
            **fields,
        }
        if labels:
            entry["logging.googleapis.com/labels"] = labels
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        where = "/".join(str(fields[k]) for k in ("pipeline", "batch_id", "task") if fields.get(k))
        extra = " ".join(f"{k}={v}" for k, v in fields.items()
                         if k not in ("pipeline", "batch_id", "task") and v is not None)
        text = f"{record.levelname:<7} {where + ' ' if where else ''}{record.getMessage()}"
        if extra:
            text += f"  [{extra}]"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


# Whether the lines a task prints and logs are echoed here as well as kept with its
# attempt: always as JSON (Cloud Logging keeps them, labelled); as text, only when
# the orchestrator's own INFO lines are shown (`-v`), so they never mix into a
# command's output otherwise.
_echo_task_lines = False


def configure(fmt: str = "text", level: int = logging.INFO) -> None:
    global _echo_task_lines
    from orchestrator.capture import real_stream

    # The real stream, not a capture's stand-in: these lines are never a task's.
    handler = logging.StreamHandler(real_stream(sys.stdout if fmt == "json" else sys.stderr))
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = fmt != "json"
    _echo_task_lines = fmt == "json" or level <= logging.INFO


def format_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """The `log_format` setting as `Settings` reads it (the name in any case; "text" unset)."""
    for name, value in environ.items():
        if name.upper() == LOG_FORMAT_ENV:
            return value
    return "text"


def emit(level: int, message: str, **fields: Any) -> None:
    log.log(level, message, extra={"fields": fields})


def info(message: str, **fields: Any) -> None:
    emit(logging.INFO, message, **fields)


def warning(message: str, **fields: Any) -> None:
    emit(logging.WARNING, message, **fields)


def error(message: str, **fields: Any) -> None:
    emit(logging.ERROR, message, **fields)


_STREAM_LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING}


def task_line(entry: dict[str, Any], **labels: Any) -> None:
    """One line a task printed or logged, echoed with its attempt's labels (pipeline,
    batch_id, task, attempt), so Cloud Logging can filter a task's lines by attempt."""
    if not _echo_task_lines:
        return
    level = logging.getLevelName(entry.get("level") or "") if entry.get("level") else None
    if not isinstance(level, int):
        level = _STREAM_LEVELS.get(entry.get("stream", ""), logging.INFO)
    fields = {**labels, "stream": entry.get("stream")}
    if entry.get("logger"):
        fields["task_logger"] = entry["logger"]
    record = log.makeRecord(log.name, level, "(task)", 0, entry.get("line", ""), (), None,
                            extra={"fields": fields})
    # Straight to this logger's handlers: a propagated copy would reach the root
    # logger, where the capture would take it for a new line of the task.
    for handler in log.handlers:
        if level >= handler.level:
            handler.handle(record)
