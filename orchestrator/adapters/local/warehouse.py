"""The embedded runtime's warehouse: one DuckDB file that runs BigQuery SQL.

Pipelines are written for BigQuery; here the SQL is transpiled by sqlglot and
datasets are DuckDB schemas. Every job writes its rows and its `_jobs` record
in one transaction, so a job id seen twice returns the first result instead of
writing again, and a failed job leaves nothing behind.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.adapters.local.object_store import LocalObjectStore, split_uri
from orchestrator.errors import PermanentError, RetryableError
from orchestrator.handlers import _sql
from orchestrator.identifiers import TableRef, check_identifier, parse_table
from orchestrator.ports import WRITE_MODES, Column, JobState, LoadResult, Partition, QueryResult

# BigQuery column types as DuckDB types, for tables created from a declared schema.
BQ_TO_DUCKDB = {
    "STRING": "VARCHAR",
    "BYTES": "BLOB",
    "INTEGER": "BIGINT",
    "INT64": "BIGINT",
    "FLOAT": "DOUBLE",
    "FLOAT64": "DOUBLE",
    "NUMERIC": "DECIMAL(38, 9)",
    "BIGNUMERIC": "DECIMAL(38, 9)",
    "BOOLEAN": "BOOLEAN",
    "BOOL": "BOOLEAN",
    "DATE": "DATE",
    "DATETIME": "TIMESTAMP",
    "TIMESTAMP": "TIMESTAMPTZ",
    "TIME": "TIME",
    "JSON": "JSON",
}
_STAGE = "_orchestrator_stage"


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DuckDBWarehouse:
    def __init__(
        self,
        path: str | Path,
        *,
        default_dataset: str = "analytics",
        buckets_root: str | Path | None = None,
        read_only: bool = False,
    ):
        self.path = Path(path)
        # For reads alone (`orchestrator sql`): no write lock, nothing created.
        self.read_only = read_only
        self.default_dataset = check_identifier(default_dataset, "dataset name")
        # The runtime keeps its buckets beside the warehouse file (`<home>/buckets`).
        self.store = LocalObjectStore(buckets_root or self.path.parent / "buckets")
        # One connection shared by the worker threads: a DuckDB connection is not
        # safe for concurrent use, and a file admits one writer anyway.
        self._lock = threading.RLock()
        self._con: Any = None

    # -- connection ---------------------------------------------------------------

    def _connection(self) -> Any:
        if self._con is None:
            import duckdb

            if self.read_only:
                con = duckdb.connect(str(self.path), read_only=True)
                found = con.execute("SELECT count(*) FROM information_schema.schemata "
                                    "WHERE schema_name = ?", [self.default_dataset]).fetchone()
                if found and found[0]:
                    con.execute(f"SET schema = '{self.default_dataset}'")
                self._con = con
                return con
            self.path.parent.mkdir(parents=True, exist_ok=True)
            con = duckdb.connect(str(self.path))
            con.execute(
                "CREATE TABLE IF NOT EXISTS main._jobs ("
                " job_id VARCHAR PRIMARY KEY, kind VARCHAR NOT NULL,"
                " result VARCHAR NOT NULL, finished_at TIMESTAMPTZ NOT NULL)"
            )
            con.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(self.default_dataset)}")
            con.execute(f"SET schema = '{self.default_dataset}'")
            self._con = con
        return self._con

    def close(self, timeout: float = -1) -> bool:
        """Close the connection, waiting at most `timeout` seconds (-1: as long as it
        takes) for a job in progress; False if it had to be left open."""
        if not self._lock.acquire(timeout=timeout):
            return False
        try:
            if self._con is not None:
                self._con.close()
                self._con = None
        finally:
            self._lock.release()
        return True

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        import duckdb

        with self._lock:
            con = self._connection()
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException as exc:
                con.execute("ROLLBACK")
                if isinstance(exc, duckdb.Error):
                    raise _translate(exc) from exc
                raise
            else:
                con.execute("COMMIT")

    # -- jobs -----------------------------------------------------------------------

    def _recorded(self, con: Any, job_id: str) -> dict[str, Any] | None:
        row = con.execute("SELECT result FROM main._jobs WHERE job_id = ?", [job_id]).fetchone()
        return json.loads(row[0]) if row else None

    def _record(self, con: Any, job_id: str, kind: str, result: dict[str, Any]) -> None:
        con.execute(
            "INSERT INTO main._jobs VALUES (?, ?, ?, ?)",
            [job_id, kind, json.dumps(result), datetime.now(UTC)],
        )

    def job_state(self, job_id: str) -> str:
        with self._lock:
            con = self._connection()
            # Jobs run inside the caller's thread: a job is either committed or never was.
            return JobState.DONE if self._recorded(con, job_id) is not None else JobState.UNKNOWN

    # -- loads --------------------------------------------------------------------

    def resolve_uris(self, uris: Sequence[str]) -> list[str]:
        """Local files for `gs://` URIs; `*` matches any characters, `/` included, as in BigQuery."""
        files: list[str] = []
        for uri in uris:
            bucket, name = split_uri(uri)
            if "*" not in name:
                if not self.store.exists(uri):
                    raise PermanentError(f"no such object: {uri}")
                files.append(str(self.store.path(uri)))
                continue
            prefix = name.split("*", 1)[0]
            pattern = re.compile(
                "^" + ".*".join(re.escape(p) for p in name.split("*")) + "$"
            )
            matched = [
                u for u in self.store.list(f"gs://{bucket}/{prefix}")
                if pattern.match(u[len(f"gs://{bucket}/"):])
            ]
            if not matched:
                raise PermanentError(f"no objects match {uri}")
            files.extend(str(self.store.path(u)) for u in matched)
        return files

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
    ) -> LoadResult:
        ref = parse_table(table, self.default_dataset)
        _check_write(write, partition)
        with self._transaction() as con:
            done = self._recorded(con, job_id)
            if done is not None:
                return LoadResult(**done)
            files = self.resolve_uris(uris)
            con.execute(f"DROP TABLE IF EXISTS temp.{_STAGE}")
            con.execute(
                f"CREATE TEMP TABLE {_STAGE} AS SELECT * FROM read_parquet($files, union_by_name = true)",
                {"files": files},
            )
            _require_columns(con, ref.name, schema, list(uris))
            rows = self._write_stage(con, ref, write, partition, schema, allow_field_addition)
            result: dict[str, Any] = {"job_id": job_id, "rows_loaded": rows, "table": ref.name}
            _still_active(is_active)
            self._record(con, job_id, "load", result)
        return LoadResult(**result)

    # -- queries ------------------------------------------------------------------

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
    ) -> QueryResult:
        ref = parse_table(destination, self.default_dataset) if destination else None
        if ref is not None:
            _check_write(write, partition)
        statements = _sql.to_duckdb(sql)
        bound = _bind(sql, params)
        if ref is not None and (len(statements) != 1 or not _sql.is_select(sql)):
            raise PermanentError("a query with a 'destination' must be a single SELECT")
        with self._transaction() as con:
            done = self._recorded(con, job_id)
            if done is not None:
                return QueryResult(**done)
            if ref is not None:
                con.execute(f"DROP TABLE IF EXISTS temp.{_STAGE}")
                con.execute(
                    f"CREATE TEMP TABLE {_STAGE} AS {statements[0]}",
                    _used(statements[0], bound),
                )
                rows = self._write_stage(con, ref, write, partition, None, False)
            else:
                rows = 0
                for statement in statements:
                    cur = con.execute(statement, _used(statement, bound))
                    rows += _affected(cur)
            result: dict[str, Any] = {"job_id": job_id, "rows_affected": rows,
                      "destination": ref.name if ref else None}
            _still_active(is_active)
            self._record(con, job_id, "query", result)
        return QueryResult(**result)

    # -- shared write path ----------------------------------------------------------

    def _write_stage(
        self,
        con: Any,
        ref: TableRef,
        write: str,
        partition: Partition | None,
        schema: Sequence[Column] | None,
        allow_field_addition: bool,
    ) -> int:
        target = f"{_q(ref.dataset)}.{_q(ref.table)}"
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(ref.dataset)}")
        staged = _columns(con, "temp", "main", _STAGE)
        existing = _columns(con, None, ref.dataset, ref.table)
        if not existing:
            if schema:
                cols = ", ".join(_column_ddl(c) for c in schema)
                con.execute(f"CREATE TABLE {target} ({cols})")
            else:
                con.execute(f"CREATE TABLE {target} AS SELECT * FROM temp.{_STAGE} LIMIT 0")
            existing = _columns(con, None, ref.dataset, ref.table)
        new = [c for c in staged if c.lower() not in {e.lower() for e in existing}]
        if new and not allow_field_addition:
            raise PermanentError(
                f"{ref.name} has no column(s) {', '.join(new)}; "
                "set allow_field_addition to add them"
            )
        for col in new:
            con.execute(f"ALTER TABLE {target} ADD COLUMN {_q(col)} {staged[col]}")

        if write == "truncate":
            con.execute(f"DELETE FROM {target}")
        elif write == "empty":
            (count,) = con.execute(f"SELECT count(*) FROM {target}").fetchone()
            if count:
                raise PermanentError(f"{ref.name} is not empty and write is 'empty'")
        elif write == "truncate_partition":
            assert partition is not None
            if partition.field not in staged:
                raise PermanentError(
                    f"partition field {partition.field!r} is not a column of the new rows"
                )
            start, end = _sql.range_params(partition)
            inside = f"{_q(partition.field)} >= $start AND {_q(partition.field)} < $end"
            (outside,) = con.execute(
                f"SELECT count(*) FROM temp.{_STAGE} WHERE NOT coalesce({inside}, false)",
                {"start": start, "end": end},
            ).fetchone()
            if outside:
                # BigQuery refuses rows outside a decorated partition, and so do we.
                raise PermanentError(
                    f"{outside} row(s) have {partition.field} outside partition "
                    f"{partition.value} ({partition.granularity}) of {ref.name}"
                )
            con.execute(f"DELETE FROM {target} WHERE {inside}", {"start": start, "end": end})
        (rows,) = con.execute(
            f"INSERT INTO {target} BY NAME SELECT * FROM temp.{_STAGE}"
        ).fetchone()
        con.execute(f"DROP TABLE temp.{_STAGE}")
        return int(rows)

    # -- reads --------------------------------------------------------------------

    def table_exists(self, table: str) -> bool:
        ref = parse_table(table, self.default_dataset)
        with self._lock:
            return bool(_columns(self._connection(), None, ref.dataset, ref.table))

    def row_count(self, table: str) -> int:
        ref = parse_table(table, self.default_dataset)
        with self._lock:
            (n,) = self._connection().execute(
                f"SELECT count(*) FROM {_q(ref.dataset)}.{_q(ref.table)}"
            ).fetchone()
        return int(n)

    def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Rows of a BigQuery SELECT, as dicts."""
        import duckdb

        statements = _sql.to_duckdb(sql)
        if len(statements) != 1:
            raise PermanentError("fetch runs a single statement")
        with self._lock:
            try:
                cur = self._connection().execute(
                    statements[0], _used(statements[0], _bind(sql, params or {}))
                )
                names = [d[0] for d in cur.description or []]
                return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
            except duckdb.Error as exc:
                raise _translate(exc) from exc


def _check_write(write: str, partition: Partition | None) -> None:
    if write not in WRITE_MODES:
        raise PermanentError(f"unknown write mode {write!r} (one of {', '.join(WRITE_MODES)})")
    if write == "truncate_partition":
        if partition is None:
            raise PermanentError("write 'truncate_partition' needs a partition")
        check_identifier(partition.field, "partition field")
        _sql.partition_range(partition)


def _bind(sql: str, params: Mapping[str, Any]) -> dict[str, Any]:
    names = _sql.parameter_names(sql)
    missing = [n for n in names if n not in params]
    if missing:
        raise PermanentError(f"the SQL uses @{', @'.join(missing)} but no such parameter is given")
    return {n: params[n] for n in names}


def _used(statement: str, bound: Mapping[str, Any]) -> dict[str, Any]:
    # DuckDB refuses parameters a statement does not use; a script's statements differ.
    return {k: v for k, v in bound.items() if re.search(rf"\${re.escape(k)}\b", statement)}


def _affected(cur: Any) -> int:
    desc = cur.description or []
    rows = cur.fetchall()
    if [d[0] for d in desc] == ["Count"] and len(rows) == 1:
        return int(rows[0][0])
    return len(rows) if desc else 0


def _columns(con: Any, catalog: str | None, schema: str, table: str) -> dict[str, str]:
    sql = (
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = ? AND table_name = ?"
    )
    args: list[Any] = [schema, table]
    if catalog is not None:
        sql += " AND table_catalog = ?"
        args.append(catalog)
    else:
        sql += " AND table_catalog = current_database()"
    sql += " ORDER BY ordinal_position"
    return {name: dtype for name, dtype in con.execute(sql, args).fetchall()}


def _column_ddl(col: Column) -> str:
    check_identifier(col.name, "column name")
    dtype = BQ_TO_DUCKDB.get(col.type.upper())
    if dtype is None:
        raise PermanentError(f"unsupported column type {col.type!r} for {col.name!r}")
    not_null = " NOT NULL" if col.mode.upper() == "REQUIRED" else ""
    return f"{_q(col.name)} {dtype}{not_null}"


def _translate(exc: Exception) -> Exception:
    import duckdb

    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, duckdb.TransactionException | duckdb.IOException):
        return RetryableError(f"local warehouse: {message}")
    if isinstance(exc, duckdb.CatalogException) and "function" in message.lower():
        return PermanentError(f"the local warehouse cannot run this SQL: {message}")
    return PermanentError(f"local warehouse: {message}")


def _still_active(is_active: Callable[[], bool] | None) -> None:
    """Checked before the commit: the local job is one transaction, so an attempt that
    was cancelled (or timed out) meanwhile rolls back instead of writing."""
    if is_active is not None and not is_active():
        raise RetryableError("local warehouse: job rolled back, the attempt is no longer active")


def _require_columns(con: Any, table: str, schema: Sequence[Column] | None,
                     files: Sequence[str]) -> None:
    """Name the missing columns, as BigQuery's load job would, instead of letting the
    insert fail later on a NOT NULL constraint."""
    if not schema:
        return
    present = {row[0] for row in con.execute(f"DESCRIBE temp.{_STAGE}").fetchall()}
    missing = [c.name for c in schema
               if (c.mode or "").upper() == "REQUIRED" and c.name not in present]
    if missing:
        shown = ", ".join(files[:3]) + (" …" if len(files) > 3 else "")
        raise PermanentError(
            f"{table}: the Parquet source has no column {', '.join(missing)} that the "
            f"table's schema requires (source: {shown})")
