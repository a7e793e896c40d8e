"""`parquet_to_bigquery`: load Parquet objects into a warehouse table.

The warehouse reads the objects itself (a BigQuery load job from `gs://`, or
DuckDB's Parquet reader locally): the rows never pass through this process.

Config:
  source: URI or list of URIs; `*` wildcards; placeholders `{batch_id}`, batch
          params, and the triggering object's `{trigger_uri}`, `{trigger_bucket}`,
          `{trigger_name}`, `{trigger_dir}` (its folder). Default: the triggering object.
  table:  `dataset.table` or `table` (default dataset from settings).
  write:  append (default) | truncate | truncate_partition | empty
  partition: {field, granularity: HOUR|DAY|MONTH|YEAR, value: "{batch_id}"}
  schema: [{name, type, mode}] to create the table if it is missing.
  allow_field_addition: let new Parquet columns be added to the table.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.errors import PermanentError
from orchestrator.handlers import _sql
from orchestrator.handlers.context import TaskContext
from orchestrator.identifiers import IDENT_RE, parse_table, safe_job_id, table_problems
from orchestrator.ports import Column

_KNOWN_KEYS = {"source", "table", "write", "partition", "schema", "allow_field_addition"}
_TYPES = {"STRING", "BYTES", "INTEGER", "INT64", "FLOAT", "FLOAT64", "NUMERIC", "BIGNUMERIC",
          "BOOLEAN", "BOOL", "DATE", "DATETIME", "TIMESTAMP", "TIME", "JSON"}


def check_config(config: Mapping[str, Any], base_dir: Path | None) -> list[str]:
    problems = [f"parquet_to_bigquery: unknown key {k!r}" for k in config if k not in _KNOWN_KEYS]
    source = config.get("source")
    sources = [source] if isinstance(source, str) else source
    if source is not None and (
        not isinstance(sources, list) or not sources
        or not all(isinstance(s, str) and s.startswith(("gs://", "{trigger_")) for s in sources)
    ):
        problems.append(f"'source' must be a gs:// URI or a list of them, got {source!r}")
    if "table" not in config:
        problems.append("'table' is required")
    elif "{" in str(config["table"]):
        problems.append(f"'table' cannot hold placeholders, got {config['table']!r}")
    else:
        problems.extend(table_problems(config["table"]))
    write = config.get("write", "append")
    problems.extend(_sql.write_mode_problems(write))
    problems.extend(_sql.partition_problems(config.get("partition"), write))
    problems.extend(_schema_problems(config.get("schema")))
    if not isinstance(config.get("allow_field_addition", False), bool):
        problems.append("'allow_field_addition' must be true or false")
    return problems


def _schema_problems(schema: object) -> list[str]:
    if schema is None:
        return []
    if not isinstance(schema, list) or not schema:
        return ["'schema' must be a list of {name, type, mode}"]
    problems = []
    for col in schema:
        if not isinstance(col, Mapping) or not isinstance(col.get("name"), str):
            problems.append(f"schema column {col!r} needs a 'name'")
            continue
        if not IDENT_RE.match(col["name"]):
            problems.append(f"invalid column name {col['name']!r}")
        if str(col.get("type", "")).upper() not in _TYPES:
            problems.append(f"column {col['name']!r}: unknown type {col.get('type')!r}")
        if str(col.get("mode", "NULLABLE")).upper() not in {"NULLABLE", "REQUIRED"}:
            problems.append(f"column {col['name']!r}: mode must be NULLABLE or REQUIRED")
    return problems


def template_values(ctx: TaskContext) -> dict[str, Any]:
    trigger = ctx.trigger
    uri = str(trigger.get("uri") or "")
    if not uri and trigger.get("bucket") and trigger.get("name"):
        uri = f"gs://{trigger['bucket']}/{trigger['name']}"
    name = str(trigger.get("name") or "")
    folder = uri.rsplit("/", 1)[0] if "/" in uri[5:] else uri
    return {
        **ctx.params,
        "batch_id": ctx.batch_id,
        "pipeline": ctx.pipeline,
        "trigger_uri": uri,
        "trigger_bucket": str(trigger.get("bucket") or ""),
        "trigger_name": name,
        "trigger_dir": folder,
    }


def job_key(ctx: TaskContext) -> str:
    """The load's job id: per attempt, and per source generation when a file triggered it,
    so a redelivered event re-attaches while a re-uploaded file loads again."""
    key = ctx.idempotency_key()
    generation = ctx.trigger.get("generation")
    if generation not in (None, ""):
        key += f"__g{generation}"
    return safe_job_id(key)


def run(ctx: TaskContext) -> dict[str, Any]:
    config = ctx.config
    problems = check_config(config, ctx.base_dir)
    if problems:
        raise PermanentError("parquet_to_bigquery: " + "; ".join(problems))
    values = template_values(ctx)
    raw = config.get("source") or values["trigger_uri"]
    if not raw:
        raise PermanentError("parquet_to_bigquery: no 'source' and no triggering object")
    uris = [_sql.render(s, values) for s in ([raw] if isinstance(raw, str) else raw)]
    for uri in uris:
        if not uri.startswith("gs://") or len(uri) <= 5:
            raise PermanentError(f"parquet_to_bigquery: source {uri!r} is not a gs:// URI")
    write = config.get("write", "append")
    partition = _sql.build_partition(config.get("partition"), values)
    schema = [
        Column(str(c["name"]), str(c["type"]).upper(), str(c.get("mode", "NULLABLE")).upper())
        for c in config.get("schema") or []
    ]
    parse_table(config["table"])
    result = ctx.warehouse.load_parquet(
        uris,
        config["table"],
        write=write,
        partition=partition if write == "truncate_partition" else None,
        schema=schema or None,
        allow_field_addition=bool(config.get("allow_field_addition", False)),
        job_id=job_key(ctx),
        is_active=ctx.is_active,
    )
    return {"job_id": result.job_id, "rows_loaded": result.rows_loaded, "table": result.table,
            "source": uris}
