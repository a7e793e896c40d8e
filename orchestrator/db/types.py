"""Column types that behave the same on PostgreSQL and SQLite."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# JSONB on Postgres (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every dialect.

    SQLite has no time zones: values are stored as naive UTC so that string
    comparison in SQL orders them correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(DateTime(timezone=False))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# What the task log can hold. Postgres refuses a NUL character in text and jsonb, and
# jsonb refuses NaN, the infinities and lone surrogates, all of which Python's json
# module produces without complaint; a value nested deeper than this is refused too,
# before any recursive code (ours, the driver's, the server's) meets it.
MAX_JSON_DEPTH = 100


def json_problem(value: Any, where: str = "$", max_depth: int = MAX_JSON_DEPTH) -> str | None:
    """Why `value` cannot be stored as JSON in the task log, naming where; None if it can."""
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, float):
            if item != item or item in (float("inf"), float("-inf")):
                name = "NaN" if item != item else "Infinity" if item > 0 else "-Infinity"
                return f"{_short(path)} is {name}, which JSON cannot hold"
            continue
        if isinstance(item, str):
            if (problem := text_problem(item)) is not None:
                return f"{_short(path)} {problem}"
            continue
        if depth >= max_depth:
            return f"{_short(path)} nests deeper than {max_depth} levels"
        if isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    return (f"{_short(path)} has a key of type {type(key).__name__}, "
                            "not a string")
                if (problem := text_problem(key)) is not None:
                    return f"a key of {_short(path)} {problem}"
                stack.append((child, f"{path}.{key[:40]}", depth + 1))
            continue
        if isinstance(item, list | tuple):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
            continue
        return f"{_short(path)} is a {type(item).__name__}, not a JSON value"
    return None


def _short(path: str) -> str:
    return path if len(path) <= 60 else path[:57] + "..."


def text_problem(text: str) -> str | None:
    """Why `text` cannot be stored (a NUL character, a lone surrogate); None if it can."""
    if text.isascii():
        return "holds a NUL character" if "\x00" in text else None
    if "\x00" in text:
        return "holds a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate (U+{ord(text[exc.start]):04X})"
    return None


def storable_text(text: str) -> str:
    """`text` with what the database cannot store (NUL, lone surrogates) escaped
    visibly, for messages that must be kept whatever they hold (errors, reasons)."""
    if text_problem(text) is None:
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
