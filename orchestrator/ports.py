"""Ports: the small interfaces the core needs from the outside world.

The engine and router depend on these Protocols only; adapters under
`orchestrator.adapters` implement them for Google Cloud and for the local
embedded runtime, and `orchestrator.testing` holds fakes for tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable


class Clock(Protocol):
    def now(self) -> datetime: ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


@dataclass(frozen=True)
class OutboundMessage:
    """A message to the tasks topic: JSON `data` plus string attributes for filtering."""

    data: Mapping[str, Any]
    attributes: Mapping[str, str] = field(default_factory=dict)
    ordering_key: str = ""


@runtime_checkable
class Publisher(Protocol):
    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        """Publish all messages; raise `InfrastructureError` if any could not be."""
        ...


@runtime_checkable
class AlertSink(Protocol):
    def send(self, alert: Mapping[str, Any]) -> None:
        """Deliver one alert (schema `orchestrator.alert/v1`); raise `PermanentError` if
        the receiver refuses it for good, anything else to be retried later."""
        ...


@runtime_checkable
class ObjectStore(Protocol):
    def list(self, uri_prefix: str) -> list[str]: ...
    def read(self, uri: str) -> bytes: ...
    def write(self, uri: str, data: bytes) -> None: ...
    def exists(self, uri: str) -> bool: ...


WRITE_MODES = ("append", "truncate", "truncate_partition", "empty")
PARTITION_GRANULARITIES = ("HOUR", "DAY", "MONTH", "YEAR")


@dataclass(frozen=True)
class Partition:
    """One time partition of a table: `field` truncated to `granularity` equals `value`.

    `value` is the partition's start in any of `2024-03`, `202403`, `2024-03-01`
    (for MONTH), so a batch id such as `2024-03` can name it directly.
    """

    field: str
    granularity: str = "MONTH"
    value: str = ""


@dataclass(frozen=True)
class Column:
    """A declared column (BigQuery type names), to create a missing table."""

    name: str
    type: str
    mode: str = "NULLABLE"


@dataclass(frozen=True)
class LoadResult:
    job_id: str
    rows_loaded: int
    table: str


@dataclass(frozen=True)
class QueryResult:
    job_id: str
    rows_affected: int
    destination: str | None = None


class JobState:
    """What a lease-expiry check learns about a job it started earlier."""

    UNKNOWN = "UNKNOWN"  # no such job: the attempt died before starting it
    RUNNING = "RUNNING"  # still pending or running: the worker may be gone, the job is not
    DONE = "DONE"
    FAILED = "FAILED"


@runtime_checkable
class Warehouse(Protocol):
    """Write modes: `append`, `truncate` (the whole table), `truncate_partition`
    (only `partition`, atomically with the new rows) and `empty` (refuse a
    non-empty table). A `job_id` that was already used re-attaches to that job
    and returns its result instead of writing again. `is_active` (the handler's
    `ctx.is_active`) is polled while a job runs: once it turns false the job is
    cancelled (or rolled back) and the call raises."""

    def load_parquet(
        self,
        uris: Sequence[str],
        table: str,
        *,
        write: str = "append",
        partition: Partition | None = None,
        schema: Sequence[Column] | None = None,
        allow_field_addition: bool = False,
        job_id: str,
        is_active: Callable[[], bool] | None = None,
    ) -> LoadResult: ...

    def run_query(
        self,
        sql: str,
        params: Mapping[str, Any],
        *,
        destination: str | None = None,
        write: str = "truncate",
        partition: Partition | None = None,
        job_id: str,
        is_active: Callable[[], bool] | None = None,
    ) -> QueryResult: ...

    def job_state(self, job_id: str) -> str: ...
    def table_exists(self, table: str) -> bool: ...
    def row_count(self, table: str) -> int: ...
    def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]: ...


def chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
