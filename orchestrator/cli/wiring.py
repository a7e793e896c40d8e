"""What the commands share: settings, the runtime, error reporting, and waiting for work.

Exit codes a script can rely on:
  0  done
  1  an error: unknown pipeline, batch or task; invalid pipeline; database unreachable
  2  a usage error: a bad option, argument, `--param`, or date range
  3  the batch (or one of the batches) the command waited for ended FAILED or CANCELLED,
     or is bound to: it returned with a task already failed (ERROR, UPSTREAM_FAILED,
     CANCELLED) while another waits for its file
     (`run` is the exception: 1 for any batch that did not succeed, as a test runner would)
  4  timed out: the command stopped waiting (`--timeout`); the work it started goes on
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session

from orchestrator.errors import InfrastructureError, OrchestratorError, PipelineValidationError
from orchestrator.identifiers import batch_id_problem
from orchestrator.settings import Settings

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_BATCH_FAILED = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130

BUSY = ("QUEUED", "RUNNING", "RETRYING")
# A task that ended in one of these decides its batch: it will end FAILED.
FAILED_TASKS = ("ERROR", "UPSTREAM_FAILED", "CANCELLED")

P = ParamSpec("P")
R = TypeVar("R")


class UsageProblem(Exception):
    """A malformed argument found by a command itself (exit code 2)."""


def check_batch_id(batch_id: str) -> str:
    if (problem := batch_id_problem(batch_id)) is not None:
        raise UsageProblem(problem)
    return batch_id


def settings() -> Settings:
    # Fresh on every command: tests and scripts change the environment between calls.
    # An absolute home keeps the database's identity stable if the process changes
    # folder (caches are keyed by the database URL).
    s = Settings()
    return s.model_copy(update={"home": s.home.resolve()})


def is_cloud(s: Settings) -> bool:
    """Publish to Pub/Sub (the deployed functions do the work) instead of running locally."""
    return bool(s.gcp_project) and s.database_url is not None


def db_label(s: Settings) -> str:
    try:
        return make_url(s.resolved_database_url()).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an invalid DATABASE_URL)"


def fail(message: str, code: int = EXIT_ERROR) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _db_message(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()[0] if str(orig).strip() else type(orig).__name__
    return first


# What a database says of a table or column it does not have.
_MISSING = ("does not exist", "no such table", "no such column", "undefinedtable",
            "undefinedcolumn")


def _schema_hint(exc: DBAPIError) -> str | None:
    """For a statement that found no table or column: what to run, if the schema is
    not this version's (asked only after the failure, so a command pays nothing)."""
    if not any(m in str(exc.orig).lower() or m in type(exc.orig).__name__.lower()
               for m in _MISSING):
        return None
    from orchestrator.db import migrate
    from orchestrator.db.session import make_engine

    s = settings()
    try:
        engine = make_engine(s.resolved_database_url(), pool_size=1, max_overflow=0)
        try:
            return migrate.schema_problem(engine, db_label(s))
        finally:
            engine.dispose()
    except SQLAlchemyError:
        return None


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn every expected failure into one `error: …` line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            # A command's batch id is checked before anything is read or changed.
            for key in ("batch_id", "batch"):
                if isinstance(value := kwargs.get(key), str):
                    check_batch_id(value)
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except UsageProblem as exc:
            fail(_one_line(str(exc)), EXIT_USAGE)
        except ValidationError as exc:  # a message built from arguments, refused
            fail("; ".join(f"invalid {'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}"
                           for e in exc.errors()), EXIT_USAGE)
        except PipelineValidationError as exc:
            fail(f"{exc.source}: " + "; ".join(exc.problems))
        except InfrastructureError as exc:
            fail(f"{_one_line(str(exc))} (database: {db_label(settings())})")
        except OrchestratorError as exc:
            fail(_one_line(str(exc)))
        except (DBAPIError, NoSuchModuleError, ArgumentError) as exc:
            if isinstance(exc, DBAPIError) and (hint := _schema_hint(exc)):
                fail(hint)
            fail(f"cannot use the database {db_label(settings())}: {_db_message(exc)}")
        except SQLAlchemyError as exc:
            fail(f"database error: {_one_line(_db_message(exc))}")
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as exc:
            fail(_one_line(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)))
        except Exception as exc:  # never a traceback; ORCHESTRATOR_DEBUG=1 shows it
            if os.environ.get("ORCHESTRATOR_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {_one_line(str(exc))} "
                 "(set ORCHESTRATOR_DEBUG=1 for the traceback)")

    return wrapper


def outcome_code(docs: Iterable[dict[str, Any]], timed_out: bool = False) -> int:
    """The exit code for batches a command waited for (their `batch_status` documents):
    3 once a failure is known, even in a batch still open for a file; else 4 if the
    command stopped waiting; else 0."""
    for doc in docs:
        if doc["status"] in ("FAILED", "CANCELLED") or any(
                doc["counts"].get(s) for s in FAILED_TASKS):
            return EXIT_BATCH_FAILED
    return EXIT_TIMEOUT if timed_out else 0


# -- the database and the runtime -------------------------------------------------------


@contextmanager
def read_session() -> Iterator[Session]:
    """A session for read-only commands: no migration, no bus."""
    from orchestrator.db.session import make_engine, make_sessionmaker

    s = settings()
    url = s.resolved_database_url()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).exists():
        raise OrchestratorError(
            f"no metadata database at {parsed.database}: run `orchestrator pipelines sync` "
            "or `orchestrator dev` first (or set DATABASE_URL)"
        )
    engine = make_engine(url, pool_size=1, max_overflow=0, pool_timeout=s.db_pool_timeout_s,
                         prepared_statements=s.db_prepared_statements)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    finally:
        engine.dispose()


@contextmanager
def runtime(*, embedded_only: bool = False, processes: int | None = None) -> Iterator[Any]:
    """The embedded runtime (bus started, database migrated), or the cloud wiring when
    ORCHESTRATOR_GCP_PROJECT and DATABASE_URL are set. `processes`: worker processes of
    the embedded runtime on PostgreSQL (None: ORCHESTRATOR_WORKER_PROCESSES)."""
    from orchestrator.runtime import Runtime

    s = settings()
    rt = (Runtime.cloud(s) if is_cloud(s) and not embedded_only
          else Runtime.embedded(s, processes=processes))
    try:
        yield rt
    finally:
        rt.close()


def busy_counts(session: Session, batch_pks: Iterable[int]) -> dict[int, int]:
    """Rows still being worked on (queued, running or retrying), per batch."""
    from orchestrator.db.models import TaskLog

    pks = list(batch_pks)
    if not pks:
        return {}
    rows = session.execute(
        select(TaskLog.batch_pk, func.count())
        .where(TaskLog.batch_pk.in_(pks), TaskLog.status.in_(BUSY))
        .group_by(TaskLog.batch_pk)
    ).all()
    return {pk: n for pk, n in rows}


def _open_batches(session: Session, batch_pks: Iterable[int]) -> int:
    from orchestrator.db.models import Batch

    pks = list(batch_pks)
    if not pks:
        return 0
    return int(session.execute(
        select(func.count()).select_from(Batch)
        .where(Batch.id.in_(pks), Batch.status == "RUNNING")
    ).scalar_one())


def batch_pk(rt: Any, pipeline: str, batch_id: str) -> int:
    from orchestrator.engine import find_batch

    with rt.sessions() as s:
        return int(find_batch(s, pipeline, batch_id).id)


def settle(rt: Any, batch_pks: Iterable[int], timeout_s: float) -> bool:
    """Run the embedded bus (and the sweeper, for retries and lost messages) until none
    of the batches has a task queued, running or retrying. Tasks waiting for a file
    or a parent that waits for one do not count. False on timeout.

    A decided batch needs nothing more: a handler its worker stopped waiting for (a
    timeout, a cancellation) may still run on, but its result can change nothing."""
    pks = set(batch_pks)
    deadline = time.monotonic() + timeout_s
    last_sweep = time.monotonic()
    while True:
        if rt.bus is not None:
            rt.bus.drain(timeout=0.2)
        with rt.sessions() as s:
            busy = busy_counts(s, pks)
            decided = not busy and not _open_batches(s, pks)
        if rt.bus is None or (not busy and (decided or rt.bus.idle())):
            return not busy
        if time.monotonic() >= deadline:
            return False
        if time.monotonic() - last_sweep >= 0.25:
            rt.router.sweep()
            last_sweep = time.monotonic()
        else:
            time.sleep(0.01)


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
