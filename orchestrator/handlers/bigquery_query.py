"""`bigquery_query`: run a BigQuery SQL step, into a table or as DML/DDL.

Config:
  sql:         inline SQL, or a `*.sql` path relative to the pipeline file
               (read at sync time by `prepare_config`, kept as `sql_file`).
  destination: `dataset.table` for a SELECT's rows; omit for DML/DDL/scripts.
  write:       truncate (default) | append | truncate_partition | empty
  partition:   {field, granularity, value: "{batch_id}"} for truncate_partition.
  params:      extra named parameters; `@batch_id` and the batch's params are
               always given. Values are bound as query parameters, never pasted in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import PermanentError
from orchestrator.handlers import _sql
from orchestrator.handlers.context import TaskContext
from orchestrator.identifiers import IDENT_RE, parse_table, safe_job_id, table_problems

_KNOWN_KEYS = {"sql", "sql_file", "destination", "write", "partition", "params"}


def prepare_config(config: Mapping[str, Any], base_dir: Path | None) -> dict[str, Any]:
    """The config with a SQL file's text inlined as `sql` (the file is kept as `sql_file`),
    so a deployed function needs no copy of the pipeline folder."""
    out = dict(config)
    file = _sql.sql_file_of(config)
    if file is None:
        return out
    path = _sql.resolve_sql_path(file, base_dir)
    try:
        out["sql"] = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PermanentError(f"cannot read SQL file {file!r} ({path}): {exc.strerror}") from exc
    out["sql_file"] = file
    return out


def check_config(config: Mapping[str, Any], base_dir: Path | None) -> list[str]:
    problems = [f"bigquery_query: unknown key {k!r}" for k in config if k not in _KNOWN_KEYS]
    if not isinstance(config.get("sql"), str) and not isinstance(config.get("sql_file"), str):
        return [*problems, "'sql' is required (inline SQL or a .sql file)"]
    try:
        sql = load_sql(config, base_dir)
    except PermanentError as exc:
        return [*problems, str(exc)]
    destination = config.get("destination")
    write = config.get("write", "truncate")
    if destination is not None:
        problems.extend(table_problems(destination))
        problems.extend(_sql.write_mode_problems(write))
        problems.extend(_sql.partition_problems(config.get("partition"), write))
    params = config.get("params", {})
    if not isinstance(params, Mapping) or not all(
        isinstance(k, str) and IDENT_RE.match(k) for k in params
    ):
        problems.append(f"'params' must map parameter names to values, got {params!r}")
    try:
        if destination is not None and not _sql.is_select(sql):
            problems.append("a query with a 'destination' must be a single SELECT")
        if _local_warehouse():
            _sql.to_duckdb(sql)
    except PermanentError as exc:
        problems.append(str(exc))
    return problems


def _local_warehouse() -> bool:
    # Only the local warehouse needs the DuckDB translation; BigQuery runs the text as is.
    from orchestrator.settings import get_settings

    return get_settings().warehouse != "bigquery"


def load_sql(config: Mapping[str, Any], base_dir: Path | None) -> str:
    sql = config.get("sql")
    file = _sql.sql_file_of(config)
    if isinstance(sql, str) and not _sql.looks_like_sql_file(sql):
        return sql
    assert file is not None
    return str(prepare_config({"sql_file": file}, base_dir)["sql"])


def query_params(ctx: TaskContext) -> dict[str, Any]:
    values = {**ctx.params, "batch_id": ctx.batch_id}
    extra = {
        k: _sql.render(v, values) if isinstance(v, str) else v
        for k, v in (ctx.config.get("params") or {}).items()
    }
    return {**extra, **ctx.params, "batch_id": ctx.batch_id}


def run(ctx: TaskContext) -> dict[str, Any]:
    config = ctx.config
    problems = check_config(config, ctx.base_dir)
    if problems:
        raise PermanentError("bigquery_query: " + "; ".join(problems))
    sql = load_sql(config, ctx.base_dir)
    destination = config.get("destination")
    write = config.get("write", "truncate")
    values = {**ctx.params, "batch_id": ctx.batch_id}
    partition = _sql.build_partition(config.get("partition"), values)
    if destination is not None:
        parse_table(destination)
    result = ctx.warehouse.run_query(
        sql,
        query_params(ctx),
        destination=destination,
        write=write,
        partition=partition if write == "truncate_partition" else None,
        job_id=safe_job_id(ctx.idempotency_key()),
        is_active=ctx.is_active,
    )
    return {"job_id": result.job_id, "rows_affected": result.rows_affected,
            "destination": result.destination}
