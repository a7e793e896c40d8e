"""BigQuery SQL as text: where it comes from, which parameters it names, and
its DuckDB translation for the local warehouse.

Kept apart from the adapters so the sync-time checks and the local warehouse
agree on what "will not transpile" means. sqlglot is imported lazily: only
handlers and checks need it, never the message router.
"""

from __future__ import annotations

import calendar
from collections.abc import Mapping
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

from orchestrator.errors import PermanentError
from orchestrator.ports import PARTITION_GRANULARITIES, WRITE_MODES, Partition


class SqlError(PermanentError):
    """SQL that cannot be parsed, or not translated for the local warehouse."""


def looks_like_sql_file(value: str) -> bool:
    v = value.strip()
    return v.lower().endswith(".sql") and not any(c.isspace() for c in v)


def sql_file_of(config: Mapping[str, Any]) -> str | None:
    """The SQL file a config names (`sql_file`, or `sql` that is a `*.sql` path)."""
    if isinstance(config.get("sql_file"), str):
        return str(config["sql_file"])
    sql = config.get("sql")
    if isinstance(sql, str) and looks_like_sql_file(sql):
        return sql
    return None


def resolve_sql_path(file: str, base_dir: Path | None) -> Path:
    path = Path(file)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    return path


def parse_bigquery(sql: str) -> list[Any]:
    import sqlglot
    from sqlglot.errors import ErrorLevel, ParseError

    try:
        statements = sqlglot.parse(sql, read="bigquery", error_level=ErrorLevel.RAISE)
    except ParseError as exc:
        raise SqlError(f"invalid BigQuery SQL: {_first_error(exc)}") from exc
    statements = [s for s in statements if s is not None]
    if not statements:
        raise SqlError("the SQL is empty")
    return statements


def parameter_names(sql: str) -> list[str]:
    """Named parameters (`@name`) the SQL uses, in order of first use."""
    from sqlglot import exp

    names: list[str] = []
    for statement in parse_bigquery(sql):
        for node in statement.find_all(exp.Parameter):
            name = node.name
            if name and name not in names:
                names.append(name)
    return names


def is_select(sql: str) -> bool:
    from sqlglot import exp

    statements = parse_bigquery(sql)
    return len(statements) == 1 and isinstance(statements[0], exp.Query)


def to_duckdb(sql: str) -> list[str]:
    """BigQuery SQL as DuckDB statements, `@name` as `$name`.

    Project qualifiers are dropped (`project.dataset.table` → `dataset.table`)
    because locally a dataset is a schema of the one warehouse file.
    """
    from sqlglot import exp
    from sqlglot.errors import ErrorLevel, UnsupportedError

    out: list[str] = []
    for statement in parse_bigquery(sql):
        for table in statement.find_all(exp.Table):
            if table.args.get("catalog") is not None and table.args.get("db") is not None:
                table.set("catalog", None)
        try:
            out.append(
                statement.sql(dialect="duckdb", unsupported_level=ErrorLevel.RAISE)
            )
        except UnsupportedError as exc:
            raise SqlError(
                f"the local warehouse cannot run this BigQuery SQL: {_first_error(exc)}"
            ) from exc
    return out


def _first_error(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


# -- write modes and partitions shared by both handlers ------------------------------


def write_mode_problems(write: object) -> list[str]:
    if write not in WRITE_MODES:
        return [f"'write' must be one of {', '.join(WRITE_MODES)}, got {write!r}"]
    return []


def partition_problems(raw: object, write: object) -> list[str]:
    from orchestrator.identifiers import IDENT_RE

    if raw is None:
        if write == "truncate_partition":
            return ["write 'truncate_partition' needs 'partition: {field, granularity}'"]
        return []
    if not isinstance(raw, Mapping):
        return [f"'partition' must be a mapping with 'field' and 'granularity', got {raw!r}"]
    problems = []
    field = raw.get("field")
    if not isinstance(field, str) or not IDENT_RE.match(field):
        problems.append(f"partition 'field' must be a column name, got {field!r}")
    gran = str(raw.get("granularity", "MONTH")).upper()
    if gran not in PARTITION_GRANULARITIES:
        problems.append(
            f"partition 'granularity' must be one of {', '.join(PARTITION_GRANULARITIES)}, "
            f"got {raw.get('granularity')!r}"
        )
    return problems


def build_partition(raw: Mapping[str, Any] | None, values: Mapping[str, Any]) -> Partition | None:
    if raw is None:
        return None
    value = render(str(raw.get("value", "{batch_id}")), values)
    part = Partition(
        field=str(raw["field"]),
        granularity=str(raw.get("granularity", "MONTH")).upper(),
        value=value,
    )
    partition_range(part)  # fail now, before any job starts
    return part


def render(template: str, values: Mapping[str, Any]) -> str:
    """`{batch_id}` and `{param}` placeholders; an unknown one is a config error."""
    try:
        return template.format_map(dict(values))
    except (KeyError, IndexError, ValueError) as exc:
        raise PermanentError(f"cannot fill in {template!r}: unknown or bad placeholder {exc}") from exc


_FORMATS = {
    "YEAR": ("%Y",),
    "MONTH": ("%Y-%m", "%Y%m", "%Y-%m-%d"),
    "DAY": ("%Y-%m-%d", "%Y%m%d"),
    "HOUR": ("%Y-%m-%dT%H", "%Y%m%d%H", "%Y-%m-%d %H", "%Y-%m-%dT%H:%M:%S"),
}


def partition_start(part: Partition) -> datetime:
    for fmt in _FORMATS[part.granularity]:
        try:
            start = datetime.strptime(part.value, fmt)
        except ValueError:
            continue
        if part.granularity == "MONTH" and start.day != 1:
            break
        return start
    raise PermanentError(
        f"partition value {part.value!r} does not name one {part.granularity} "
        f"(expected e.g. {_example(part.granularity)})"
    )


def partition_range(part: Partition) -> tuple[datetime, datetime]:
    """[start, end) of the partition."""
    start = partition_start(part)
    if part.granularity == "YEAR":
        return start, start.replace(year=start.year + 1)
    if part.granularity == "MONTH":
        days = calendar.monthrange(start.year, start.month)[1]
        return start, start + timedelta(days=days)
    step = timedelta(days=1) if part.granularity == "DAY" else timedelta(hours=1)
    return start, start + step


def partition_decorator(part: Partition) -> str:
    """BigQuery's `$…` suffix that addresses one time partition."""
    start = partition_start(part)
    fmt = {"YEAR": "%Y", "MONTH": "%Y%m", "DAY": "%Y%m%d", "HOUR": "%Y%m%d%H"}[part.granularity]
    return start.strftime(fmt)


def _example(granularity: str) -> str:
    return {"YEAR": "'2024'", "MONTH": "'2024-03'", "DAY": "'2024-03-31'",
            "HOUR": "'2024-03-31T13'"}[granularity]


def range_params(part: Partition) -> tuple[date | datetime, date | datetime]:
    start, end = partition_range(part)
    if part.granularity == "HOUR":
        return start, end
    return start.date(), end.date()
