"""BigQuery warehouse: load jobs straight from `gs://`, and query jobs.

Every job is first written down as plain data (`JobSpec`, the REST API's own
`configuration` shape), then submitted; tests assert on that data without a
network. Job ids are deterministic: a redelivered or retried attempt finds its
job already there and waits on it instead of loading twice.

`google.cloud.bigquery` is imported inside methods only, so that importing
this module (or the function entry point) stays cheap at cold start.
"""

from __future__ import annotations

import os
import time as _time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from orchestrator.errors import PermanentError, RetryableError
from orchestrator.handlers import _sql
from orchestrator.identifiers import TableRef, check_identifier, parse_table, safe_job_id
from orchestrator.names import NameMap
from orchestrator.ports import WRITE_MODES, Column, JobState, LoadResult, Partition, QueryResult

DISPOSITIONS = {
    "append": "WRITE_APPEND",
    "truncate": "WRITE_TRUNCATE",
    "truncate_partition": "WRITE_TRUNCATE",
    "empty": "WRITE_EMPTY",
}
# Google's "retry these" reasons in a job's errorResult.
RETRYABLE_REASONS = {"backendError", "rateLimitExceeded", "internalError", "jobInternalError",
                     "quotaExceeded", "resourcesExceeded", "timeout"}


@dataclass(frozen=True)
class JobSpec:
    """One BigQuery job as data: `config` is `configuration.load` or `configuration.query`."""

    job_id: str
    kind: str  # "load" | "query"
    config: dict[str, Any]
    source_uris: tuple[str, ...] = ()
    destination: str | None = None  # `project.dataset.table[$partition]`
    sql: str | None = None
    # Skip the job when the table it would touch does not exist yet (a DELETE before
    # the first load of a table).
    only_if_table_exists: str | None = None
    table_to_create: dict[str, Any] | None = field(default=None)


# -- pure builders ---------------------------------------------------------------------


def table_ref_repr(ref: TableRef, project: str, partition_suffix: str = "") -> dict[str, str]:
    return {"projectId": ref.project or project, "datasetId": ref.dataset,
            "tableId": ref.table + partition_suffix}


def time_partitioning(partition: Partition) -> dict[str, str]:
    return {"type": partition.granularity, "field": check_identifier(partition.field, "partition field")}


def schema_repr(schema: Sequence[Column]) -> dict[str, Any]:
    return {"fields": [
        {"name": check_identifier(c.name, "column name"), "type": c.type.upper(),
         "mode": c.mode.upper()} for c in schema
    ]}


def load_job_config(
    *,
    write: str,
    partition: Partition | None = None,
    schema: Sequence[Column] | None = None,
    allow_field_addition: bool = False,
    use_decorator: bool = True,
) -> dict[str, Any]:
    """`configuration.load` (without the destination) for a Parquet load."""
    if write not in WRITE_MODES:
        raise PermanentError(f"unknown write mode {write!r}")
    disposition = DISPOSITIONS[write]
    if write == "truncate_partition" and not use_decorator:
        disposition = "WRITE_APPEND"  # after the DELETE job that empties the partition
    config: dict[str, Any] = {
        "sourceFormat": "PARQUET",
        "writeDisposition": disposition,
        # A declared schema creates a missing table; without one BigQuery takes the
        # Parquet schema, which is what a first load of a new table wants too.
        "createDisposition": "CREATE_IF_NEEDED",
        "parquetOptions": {"enableListInference": True},
    }
    if schema:
        config["schema"] = schema_repr(schema)
    if partition is not None:
        config["timePartitioning"] = time_partitioning(partition)
    # BigQuery accepts schema updates only when appending or replacing one partition.
    if allow_field_addition and (disposition == "WRITE_APPEND" or write == "truncate_partition"):
        config["schemaUpdateOptions"] = ["ALLOW_FIELD_ADDITION", "ALLOW_FIELD_RELAXATION"]
    return config


def query_parameter(name: str, value: Any) -> dict[str, Any]:
    """A named query parameter in the REST shape; the value is never put into the SQL."""
    check_identifier(name, "query parameter name")
    if isinstance(value, list | tuple):
        types = {_scalar_type(v) for v in value} or {"STRING"}
        if len(types) != 1:
            raise PermanentError(f"parameter @{name}: a list must hold values of one type")
        (elem,) = types
        return {"name": name,
                "parameterType": {"type": "ARRAY", "arrayType": {"type": elem}},
                "parameterValue": {"arrayValues": [{"value": _scalar_value(v)} for v in value]}}
    return {"name": name, "parameterType": {"type": _scalar_type(value)},
            "parameterValue": {"value": _scalar_value(value)}}


def _scalar_type(value: Any) -> str:
    if value is None or isinstance(value, str):
        return "STRING"
    if isinstance(value, bool):
        return "BOOL"
    if isinstance(value, int):
        return "INT64"
    if isinstance(value, float):
        return "FLOAT64"
    if isinstance(value, Decimal):
        return "NUMERIC"
    if isinstance(value, datetime):
        return "TIMESTAMP" if value.tzinfo is not None else "DATETIME"
    if isinstance(value, date):
        return "DATE"
    if isinstance(value, time):
        return "TIME"
    raise PermanentError(f"cannot pass a {type(value).__name__} as a query parameter")


def _scalar_value(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    return str(value)


def query_job_config(
    params: Mapping[str, Any],
    *,
    project: str,
    default_dataset: str,
    destination: TableRef | None = None,
    write: str = "truncate",
    partition: Partition | None = None,
    use_decorator: bool = True,
) -> dict[str, Any]:
    """`configuration.query` without the SQL text (the client adds it)."""
    config: dict[str, Any] = {
        "useLegacySql": False,
        "parameterMode": "NAMED",
        "queryParameters": [query_parameter(k, v) for k, v in params.items()],
        "defaultDataset": {"projectId": project, "datasetId": default_dataset},
    }
    if destination is not None:
        if write not in WRITE_MODES:
            raise PermanentError(f"unknown write mode {write!r}")
        disposition = DISPOSITIONS[write]
        suffix = ""
        if write == "truncate_partition":
            assert partition is not None
            if use_decorator:
                suffix = "$" + _sql.partition_decorator(partition)
            else:
                disposition = "WRITE_APPEND"
        config["destinationTable"] = table_ref_repr(destination, project, suffix)
        config["writeDisposition"] = disposition
        config["createDisposition"] = "CREATE_IF_NEEDED"
        if partition is not None:
            config["timePartitioning"] = time_partitioning(partition)
    return config


def delete_partition_sql(target: str, partition: Partition) -> tuple[str, dict[str, Any]]:
    """A DML statement that empties one partition, its bounds as parameters."""
    check_identifier(partition.field, "partition field")
    start, end = _sql.range_params(partition)
    sql = (f"DELETE FROM `{target}` WHERE {partition.field} >= @partition_start "
           f"AND {partition.field} < @partition_end")
    return sql, {"partition_start": start, "partition_end": end}


def plan_load(
    uris: Sequence[str],
    ref: TableRef,
    *,
    project: str,
    write: str,
    partition: Partition | None,
    schema: Sequence[Column] | None,
    allow_field_addition: bool,
    job_id: str,
    use_decorator: bool = True,
) -> list[JobSpec]:
    """The jobs of one load, in order: a single atomic load job, or (for a BigQuery
    without partition decorators) a DELETE of the partition, then an appending load."""
    job_id = safe_job_id(job_id)
    for uri in uris:
        if not uri.startswith("gs://"):
            raise PermanentError(f"a BigQuery load reads gs:// URIs only, got {uri!r}")
    target = ref.bigquery_id(project)
    jobs: list[JobSpec] = []
    suffix = ""
    if write == "truncate_partition":
        if partition is None:
            raise PermanentError("write 'truncate_partition' needs a partition")
        if use_decorator:
            suffix = "$" + _sql.partition_decorator(partition)
        else:
            sql, params = delete_partition_sql(target, partition)
            jobs.append(JobSpec(
                job_id=safe_job_id(f"{job_id}__delete"), kind="query", sql=sql,
                config=query_job_config(params, project=project, default_dataset=ref.dataset),
                only_if_table_exists=target,
            ))
    table = None
    if schema:
        table = {"tableReference": table_ref_repr(ref, project), "schema": schema_repr(schema)}
        if partition is not None:
            table["timePartitioning"] = time_partitioning(partition)
    jobs.append(JobSpec(
        job_id=job_id, kind="load", source_uris=tuple(uris), destination=target + suffix,
        config=load_job_config(write=write, partition=partition, schema=schema,
                               allow_field_addition=allow_field_addition,
                               use_decorator=use_decorator),
        table_to_create=table,
    ))
    return jobs


def plan_query(
    sql: str,
    params: Mapping[str, Any],
    *,
    project: str,
    default_dataset: str,
    destination: TableRef | None,
    write: str,
    partition: Partition | None,
    job_id: str,
    use_decorator: bool = True,
) -> list[JobSpec]:
    job_id = safe_job_id(job_id)
    # Only the parameters the SQL names: a stray one is harmless to BigQuery but
    # hides typos in pipeline files.
    used = _sql.parameter_names(sql)
    missing = [n for n in used if n not in params]
    if missing:
        raise PermanentError(f"the SQL uses @{', @'.join(missing)} but no such parameter is given")
    bound = {n: params[n] for n in used}
    if destination is not None and not use_decorator:
        return _plan_query_as_dml(sql, bound, project=project, default_dataset=default_dataset,
                                  destination=destination, write=write, partition=partition,
                                  job_id=job_id)
    return [JobSpec(
        job_id=job_id, kind="query", sql=sql,
        config=query_job_config(bound, project=project, default_dataset=default_dataset,
                                destination=destination, write=write, partition=partition,
                                use_decorator=use_decorator),
        destination=destination.bigquery_id(project) if destination else None,
    )]


def _plan_query_as_dml(
    sql: str,
    bound: Mapping[str, Any],
    *,
    project: str,
    default_dataset: str,
    destination: TableRef,
    write: str,
    partition: Partition | None,
    job_id: str,
) -> list[JobSpec]:
    """The same write as DDL/DML jobs: create the table if missing, empty what the write
    mode replaces, then INSERT the SELECT's rows. For BigQuery look-alikes that support
    neither destination tables nor partition decorators; each job keeps its own
    deterministic id, so a redelivery re-attaches step by step."""
    if write not in WRITE_MODES or write == "empty":
        raise PermanentError(f"write {write!r} is not available with DML writes")
    target = destination.bigquery_id(project)
    select = sql.strip().rstrip(";")
    cfg = query_job_config(bound, project=project, default_dataset=default_dataset)
    partition_by = ""
    if partition is not None:
        partition_by = (f" PARTITION BY DATE_TRUNC({check_identifier(partition.field, 'partition field')}, "
                        f"{partition.granularity})")
    jobs = [JobSpec(
        job_id=safe_job_id(f"{job_id}__create"), kind="query", config=cfg,
        sql=f"CREATE TABLE IF NOT EXISTS `{target}`{partition_by} AS SELECT * FROM (\n{select}\n) WHERE FALSE",
    )]
    if write == "truncate":
        jobs.append(JobSpec(
            job_id=safe_job_id(f"{job_id}__delete"), kind="query", sql=f"DELETE FROM `{target}` WHERE TRUE",
            config=query_job_config({}, project=project, default_dataset=default_dataset),
        ))
    elif write == "truncate_partition":
        assert partition is not None
        del_sql, del_params = delete_partition_sql(target, partition)
        jobs.append(JobSpec(
            job_id=safe_job_id(f"{job_id}__delete"), kind="query", sql=del_sql,
            config=query_job_config(del_params, project=project, default_dataset=default_dataset),
        ))
    jobs.append(JobSpec(
        job_id=job_id, kind="query", config=cfg, destination=target,
        sql=f"INSERT INTO `{target}` SELECT * FROM (\n{select}\n)",
    ))
    return jobs


# -- the adapter ----------------------------------------------------------------------


class BigQueryWarehouse:
    def __init__(
        self,
        project: str | None = None,
        default_dataset: str | None = None,
        location: str | None = None,
        *,
        client: Any = None,
        client_options: Mapping[str, Any] | None = None,
        credentials: Any = None,
        job_timeout_s: float = 3600.0,
        partition_decorators: bool = True,
        poll_interval_s: float = 2.0,
        names: NameMap | None = None,
    ):
        self._project = project
        # Pipelines name datasets logically; jobs run against the real datasets.
        self.names = names or NameMap()
        self.logical_default_dataset = check_identifier(default_dataset or "analytics",
                                                        "dataset name")
        self.default_dataset = check_identifier(
            self.names.real_dataset(self.logical_default_dataset), "dataset name")
        self.location = location
        self._client = client
        self._client_options = dict(client_options) if client_options else None
        self._credentials = credentials
        # Always pass a timeout: some failures make the client poll forever otherwise.
        self.job_timeout_s = job_timeout_s
        # False for BigQuery look-alikes (bqemulator) without partition decorators or query
        # destination tables: partitions are then emptied by DELETE and query rows written
        # by INSERT, each a job of its own (not atomic together, unlike the native path).
        self.partition_decorators = partition_decorators
        # How often a running job's state (and the attempt's liveness) is checked.
        self.poll_interval_s = poll_interval_s

    @property
    def client(self) -> Any:
        if self._client is None:
            from google.cloud import bigquery

            options = self._client_options
            credentials = self._credentials
            emulator = os.environ.get("BIGQUERY_EMULATOR_HOST")
            if options is None and emulator:
                from google.auth.credentials import AnonymousCredentials

                host = emulator if "://" in emulator else f"http://{emulator}"
                options = {"api_endpoint": host}
                credentials = credentials or AnonymousCredentials()
            self._client = bigquery.Client(
                project=self._project, location=self.location,
                credentials=credentials, client_options=options,
            )
        return self._client

    @property
    def project(self) -> str:
        return self._project or str(self.client.project)

    def _logical_ref(self, table: str) -> TableRef:
        return parse_table(table, self.logical_default_dataset)

    def _ref(self, table: str) -> TableRef:
        """The real table a pipeline's `dataset.table` names (a project makes it real already)."""
        ref = self._logical_ref(table)
        if ref.project is not None:
            return ref
        return TableRef(dataset=check_identifier(self.names.real_dataset(ref.dataset),
                                                 "dataset name"),
                        table=ref.table)

    # -- jobs -----------------------------------------------------------------------

    def _submit(self, spec: JobSpec) -> Any:
        """Start the job, or find the one this id already names (a redelivery)."""
        from google.api_core import exceptions as gexc
        from google.cloud import bigquery

        client = self.client
        try:
            return client.get_job(spec.job_id, location=self.location)
        except gexc.NotFound:
            pass
        if spec.table_to_create is not None:
            client.create_table(bigquery.Table.from_api_repr(spec.table_to_create), exists_ok=True)
        try:
            if spec.kind == "load":
                cfg = bigquery.LoadJobConfig.from_api_repr({"load": spec.config})
                return client.load_table_from_uri(
                    list(spec.source_uris), spec.destination, job_id=spec.job_id,
                    job_config=cfg, location=self.location,
                )
            cfg = bigquery.QueryJobConfig.from_api_repr({"query": spec.config})
            # A job id names one job forever: the client must not resubmit it on failure.
            return client.query(spec.sql, job_config=cfg, job_id=spec.job_id,
                                location=self.location, job_retry=None)
        except gexc.Conflict:
            # Another delivery of this attempt started it between our look and our insert.
            return client.get_job(spec.job_id, location=self.location)

    def _execute(self, specs: Sequence[JobSpec],
                 is_active: Callable[[], bool] | None = None) -> Any:
        job = None
        try:
            for spec in specs:
                if spec.only_if_table_exists and not self._exists(spec.only_if_table_exists):
                    continue
                job = self._submit(spec)
                self._wait(job, is_active)
                job.result(timeout=self.job_timeout_s)
        except Exception as exc:
            raise _translate(exc, job) from exc
        return job

    def _wait(self, job: Any, is_active: Callable[[], bool] | None) -> None:
        """Poll until the job is done; cancel it once the attempt is no longer active
        (batch cancelled, lease or timeout passed), so no zombie job keeps writing."""
        if is_active is None:
            return
        deadline = _time.monotonic() + self.job_timeout_s
        while not job.done():
            if not is_active():
                self.client.cancel_job(job.job_id, location=self.location)
                raise RetryableError(f"BigQuery job {job.job_id} cancelled: the attempt is "
                                     "no longer active")
            if _time.monotonic() >= deadline:
                return  # result() below raises the timeout
            _time.sleep(self.poll_interval_s)

    def job_state(self, job_id: str) -> str:
        from google.api_core import exceptions as gexc

        try:
            job = self.client.get_job(safe_job_id(job_id), location=self.location)
        except gexc.NotFound:
            return JobState.UNKNOWN
        if job.state == "DONE":
            return JobState.FAILED if job.error_result else JobState.DONE
        return JobState.RUNNING

    # -- the port ---------------------------------------------------------------------

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
        ref = self._ref(table)
        specs = plan_load([self.names.real_uri(u) for u in uris], ref, project=self.project,
                          write=write, partition=partition, schema=schema,
                          allow_field_addition=allow_field_addition, job_id=job_id,
                          use_decorator=self.partition_decorators)
        job = self._execute(specs, is_active)
        return LoadResult(job_id=job.job_id, rows_loaded=int(job.output_rows or 0),
                          table=self._logical_ref(table).name)

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
        ref = self._ref(destination) if destination else None
        specs = plan_query(self.names.rewrite_sql(sql), params, project=self.project,
                           default_dataset=self.default_dataset, destination=ref, write=write,
                           partition=partition, job_id=job_id,
                           use_decorator=self.partition_decorators)
        job = self._execute(specs, is_active)
        rows = job.num_dml_affected_rows
        if rows is None:
            rows = job.result(timeout=self.job_timeout_s).total_rows or 0
        return QueryResult(job_id=job.job_id, rows_affected=int(rows),
                           destination=self._logical_ref(destination).name if destination
                           else None)

    def _exists(self, table_id: str) -> bool:
        from google.api_core import exceptions as gexc

        try:
            self.client.get_table(table_id)
        except gexc.NotFound:
            return False
        return True

    def table_exists(self, table: str) -> bool:
        return self._exists(self._ref(table).bigquery_id(self.project))

    def row_count(self, table: str) -> int:
        ref = self._ref(table)
        rows = self.fetch(f"SELECT COUNT(*) AS n FROM `{ref.bigquery_id(self.project)}`")
        return int(rows[0]["n"])

    def fetch(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        from google.cloud import bigquery

        sql = self.names.rewrite_sql(sql)
        config = query_job_config({k: v for k, v in (params or {}).items()
                                   if k in _sql.parameter_names(sql)},
                                  project=self.project, default_dataset=self.default_dataset)
        try:
            job = self.client.query(sql, job_config=bigquery.QueryJobConfig.from_api_repr(
                {"query": config}), location=self.location)
            return [dict(row.items()) for row in job.result(timeout=self.job_timeout_s)]
        except Exception as exc:
            raise _translate(exc, None) from exc


def _translate(exc: Exception, job: Any) -> Exception:
    """Transient failures retry; bad SQL, bad data and missing tables do not."""
    import concurrent.futures

    from google.api_core import exceptions as gexc

    if isinstance(exc, PermanentError | RetryableError):
        return exc
    reason = ""
    if job is not None and getattr(job, "error_result", None):
        reason = str(job.error_result.get("reason", ""))
    message = getattr(exc, "message", None) or str(exc)
    message = f"BigQuery: {message}"
    if reason:
        message += f" (reason: {reason})"
    if reason in RETRYABLE_REASONS:
        return RetryableError(message)
    if isinstance(exc, concurrent.futures.TimeoutError):
        return RetryableError(f"BigQuery job did not finish in time: {exc}")
    if isinstance(exc, gexc.TooManyRequests | gexc.ServerError | gexc.RetryError):
        return RetryableError(message)
    if isinstance(exc, gexc.ClientError):
        return PermanentError(message)
    if isinstance(exc, ConnectionError | OSError):
        return RetryableError(message)
    return exc
