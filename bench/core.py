"""What every scenario shares: metrics, repetition, sizes, scratch databases and runtimes."""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


class Skipped(Exception):
    """A scenario that cannot run here (a missing module, no server): reported, not fatal."""


@dataclass
class Metric:
    name: str
    unit: str
    samples: list[float]
    params: dict[str, Any] = field(default_factory=dict)
    target: str | None = None  # e.g. "<= 0.45"
    status: str = "ok"  # ok | skipped | failed
    reason: str = ""

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def met(self) -> bool | None:
        if self.target is None or self.value is None:
            return None
        op, _, bound = self.target.partition(" ")
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "value": self.value, "unit": self.unit,
            "median": self.value,
            "min": min(self.samples) if self.samples else None,
            "max": max(self.samples) if self.samples else None,
            "n": len(self.samples), "params": self.params, "target": self.target,
            "met": self.met, "status": self.status, "reason": self.reason,
            "samples": [round(s, 6) for s in self.samples],
        }


def skipped(name: str, reason: str, unit: str = "", target: str | None = None,
            status: str = "skipped") -> Metric:
    return Metric(name, unit, [], target=target, status=status, reason=reason)


@dataclass(frozen=True)
class Sizes:
    """One profile of scenario sizes; `full` is what the README quotes."""

    repeats: int
    chain_len: int
    chain_sleep_s: float
    noop_chain_len: int
    throughput_window_s: float
    throughput_window_sqlite_s: float
    throughput_workers: tuple[int, ...]
    pg_limit_s: float
    fan_10k: int
    fan_1000: int
    fan_budget_s: float  # stop repeating a fan scenario once its runs took this long
    fan_timeout_s: float
    status_rows: int
    status_batch: int
    status_queries: int
    cold_runs: int
    cold_ack_runs: int
    parquet_rows: int


FULL = Sizes(repeats=3, chain_len=40, chain_sleep_s=0.01, noop_chain_len=200,
             throughput_window_s=20.0, throughput_window_sqlite_s=6.0,
             throughput_workers=(1, 2, 4), pg_limit_s=3.0, fan_10k=10_000, fan_1000=1000,
             fan_budget_s=40.0, fan_timeout_s=240.0, status_rows=5_000_000, status_batch=10_000,
             status_queries=25, cold_runs=10, cold_ack_runs=7, parquet_rows=5_000_000)
QUICK = Sizes(repeats=3, chain_len=40, chain_sleep_s=0.01, noop_chain_len=50,
              throughput_window_s=4.0, throughput_window_sqlite_s=2.0,
              throughput_workers=(1, 2, 4), pg_limit_s=1.0, fan_10k=1000, fan_1000=200,
              fan_budget_s=10.0, fan_timeout_s=60.0, status_rows=200_000, status_batch=1000,
              status_queries=15, cold_runs=5, cold_ack_runs=3, parquet_rows=500_000)
TINY = Sizes(repeats=1, chain_len=3, chain_sleep_s=0.001, noop_chain_len=4,
             throughput_window_s=0.6, throughput_window_sqlite_s=0.6, throughput_workers=(2,),
             pg_limit_s=0.2, fan_10k=20, fan_1000=10, fan_budget_s=0.0, fan_timeout_s=30.0,
             status_rows=2000, status_batch=100, status_queries=3, cold_runs=1,
             cold_ack_runs=1,
             parquet_rows=1000)


def admin_url() -> str:
    # `make bench` passes the server that `make postgres` found or started.
    if os.environ.get("TEST_DATABASE_URL"):
        return os.environ["TEST_DATABASE_URL"]
    found = REPO / ".tmp" / "test-database-url"
    if found.exists():
        return found.read_text().strip()
    return DEFAULT_ADMIN_URL


@dataclass
class Context:
    sizes: Sizes
    backends: tuple[str, ...] = ("postgresql", "sqlite")
    admin: str = field(default_factory=admin_url)
    keep_status_db: bool = True
    results: list[Metric] = field(default_factory=list)
    _pg_error: str | None = None
    _pg_checked: bool = False

    # -- Postgres ---------------------------------------------------------------------

    def require_postgres(self) -> None:
        if not self._pg_checked:
            self._pg_checked = True
            try:
                with self.admin_engine() as eng, eng.connect() as c:
                    from sqlalchemy import text

                    c.execute(text("SELECT 1"))
            except Exception as exc:
                self._pg_error = f"PostgreSQL not reachable at {self.admin}: {exc}".splitlines()[0]
        if self._pg_error:
            raise Skipped(self._pg_error)

    @contextmanager
    def admin_engine(self) -> Iterator[Any]:
        from sqlalchemy import create_engine

        eng = create_engine(self.admin, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 5})
        try:
            yield eng
        finally:
            eng.dispose()

    def url_for(self, database: str) -> str:
        from sqlalchemy.engine import make_url

        return make_url(self.admin).set(database=database).render_as_string(hide_password=False)

    def create_database(self, name: str) -> str:
        from sqlalchemy import text

        with self.admin_engine() as eng, eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        from sqlalchemy import text

        with self.admin_engine() as eng, eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def database_exists(self, name: str) -> bool:
        from sqlalchemy import text

        with self.admin_engine() as eng, eng.connect() as c:
            return c.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"),
                             {"n": name}).first() is not None

    @contextmanager
    def scratch_url(self, backend: str, tag: str) -> Iterator[str]:
        """A fresh, migrated metadata database for one scenario, removed afterwards."""
        from orchestrator.db.migrate import upgrade
        from orchestrator.db.session import make_engine

        if backend == "postgresql":
            self.require_postgres()
            name = f"bench_{tag}_{uuid.uuid4().hex[:8]}"
            url = self.create_database(name)
            try:
                eng = make_engine(url, pool_size=1, max_overflow=0)
                upgrade(eng)
                eng.dispose()
                yield url
            finally:
                self.drop_database(name)
        else:
            with tempfile.TemporaryDirectory(prefix=f"bench-{tag}-") as tmp:
                url = f"sqlite:///{Path(tmp) / 'metadata.db'}"
                eng = make_engine(url)
                upgrade(eng)
                eng.dispose()
                yield url


class StatementCounter:
    """Counts statements sent to the database (an executemany counts once)."""

    def __init__(self, engine: Any):
        from sqlalchemy import event

        self.count = 0
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._on_execute)

    def _on_execute(self, *_args: Any) -> None:
        with self._lock:
            self.count += 1

    def reset(self) -> int:
        with self._lock:
            n, self.count = self.count, 0
        return n


class BenchRuntime:
    """The embedded runtime (in-process bus, real router, engine and handlers), plus
    a completion signal per batch so that waiting costs no polling queries."""

    def __init__(self, url: str, workers: int, *, processes: bool = False):
        from orchestrator.runtime import Runtime
        from orchestrator.settings import Settings

        self._home = tempfile.TemporaryDirectory(prefix="bench-home-")
        # The database was migrated when it was created; do not time alembic here.
        # With `processes`, `workers` worker processes (PostgreSQL); else threads. The
        # statement counter sees this process only: the threads' figures are complete.
        self.rt = Runtime.embedded(Settings(home=Path(self._home.name), database_url=url),
                                   workers=workers, migrate_db=False,
                                   processes=workers if processes else 0)
        self.statements = StatementCounter(self.rt.db)
        self._done: dict[str, threading.Event] = {}
        self.finished: dict[str, Any] = {}
        self.rt.on_batch_finished(self._on_finished)

    def _on_finished(self, finished: Any) -> None:
        key = f"{finished.pipeline}/{finished.batch_id}"
        self.finished[key] = finished
        ev = self._done.get(key)
        if ev is not None:
            ev.set()

    def run_batch(self, pipeline: str, batch_id: str, timeout: float) -> float:
        """Start a batch and return its wall time to the terminal state, in seconds."""
        key = f"{pipeline}/{batch_id}"
        ev = self._done.setdefault(key, threading.Event())
        t0 = time.perf_counter()
        if not self.rt.start_batch(pipeline, batch_id):
            raise RuntimeError(f"batch {batch_id} was not started")
        if not ev.wait(timeout):
            raise TimeoutError(f"batch {pipeline}/{batch_id} not finished after {timeout:g}s")
        elapsed = time.perf_counter() - t0
        status = str(self.finished[key].status)
        if status != "SUCCESS":
            raise RuntimeError(f"batch {pipeline}/{batch_id} ended {status}")
        return elapsed

    def close(self) -> None:
        self.rt.close()
        self._home.cleanup()

    def __enter__(self) -> BenchRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def repeat(fn: Callable[[int], Any], n: int, budget_s: float | None = None) -> list[Any]:
    """`fn(i)` for i in range(n); with a budget, stop early (after at least one run)
    once the runs so far took that long, so slow cases stay within `make bench`."""
    out = []
    t0 = time.perf_counter()
    for i in range(n):
        out.append(fn(i))
        if budget_s is not None and time.perf_counter() - t0 >= budget_s:
            break
    return out


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        raise ValueError("no values")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def suffix(backend: str) -> str:
    """Headline names are the Postgres figures; SQLite ones carry a suffix."""
    return "" if backend == "postgresql" else "_sqlite"


def chain_parents(n: int, prefix: str = "t") -> dict[str, list[str]]:
    return {f"{prefix}{i}": ([f"{prefix}{i - 1}"] if i else []) for i in range(n)}


def pipeline(name: str, parents: dict[str, list[str]],
             task: Callable[[str], dict[str, Any]] | None = None) -> Any:
    """A pipeline spec from a parents map; `task(name)` adds fields (handler, config)."""
    from orchestrator.pipeline.load import build_pipeline

    tasks = [{"name": t, "handler": "noop", "depends_on": ps, **(task(t) if task else {})}
             for t, ps in parents.items()]
    return build_pipeline({"name": name, "tasks": tasks})
