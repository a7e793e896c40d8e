"""BigQuery job configurations as pure data, and the job re-attach logic, without a network."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, date, datetime
from decimal import Decimal
from types import SimpleNamespace

import pytest
from google.api_core import exceptions as gexc
from google.cloud import bigquery

from orchestrator.adapters.gcp.bigquery import (
    BigQueryWarehouse,
    load_job_config,
    plan_load,
    plan_query,
    query_parameter,
)
from orchestrator.errors import PermanentError, RetryableError
from orchestrator.identifiers import InvalidIdentifier, parse_table, safe_job_id
from orchestrator.ports import Column, JobState, Partition

MARCH = Partition("sale_date", "MONTH", "2024-03")
SALES = parse_table("analytics.sales")


def test_truncate_partition_loads_into_the_month_decorator_with_write_truncate():
    (job,) = plan_load(["gs://landing/sales/2024-03/*.parquet"], SALES, project="proj",
                       write="truncate_partition", partition=MARCH, schema=None,
                       allow_field_addition=False, job_id="p__2024-03__load_sales__1")
    assert job.destination == "proj.analytics.sales$202403"
    assert job.source_uris == ("gs://landing/sales/2024-03/*.parquet",)
    assert job.config == {
        "sourceFormat": "PARQUET", "writeDisposition": "WRITE_TRUNCATE",
        "createDisposition": "CREATE_IF_NEEDED", "parquetOptions": {"enableListInference": True},
        "timePartitioning": {"type": "MONTH", "field": "sale_date"},
    }
    cfg = bigquery.LoadJobConfig.from_api_repr({"load": job.config})
    assert cfg.source_format == "PARQUET" and cfg.write_disposition == "WRITE_TRUNCATE"
    assert cfg.time_partitioning.field == "sale_date"


@pytest.mark.parametrize(("write", "disposition"), [
    ("append", "WRITE_APPEND"), ("truncate", "WRITE_TRUNCATE"), ("empty", "WRITE_EMPTY"),
])
def test_write_modes_map_to_dispositions(write, disposition):
    assert load_job_config(write=write)["writeDisposition"] == disposition


def test_unknown_write_mode_is_refused():
    with pytest.raises(PermanentError, match="overwrite"):
        load_job_config(write="overwrite")


def test_schema_updates_only_where_bigquery_accepts_them():
    assert load_job_config(write="append", allow_field_addition=True)["schemaUpdateOptions"] == [
        "ALLOW_FIELD_ADDITION", "ALLOW_FIELD_RELAXATION"]
    assert "schemaUpdateOptions" not in load_job_config(write="truncate", allow_field_addition=True)
    assert "schemaUpdateOptions" in load_job_config(
        write="truncate_partition", partition=MARCH, allow_field_addition=True)


def test_a_declared_schema_is_sent_and_the_table_is_created_with_its_partitioning():
    (job,) = plan_load(["gs://b/x.parquet"], SALES, project="proj", write="truncate_partition",
                       partition=MARCH, schema=[Column("sale_date", "date", "required")],
                       allow_field_addition=False, job_id="j")
    assert job.config["schema"] == {"fields": [
        {"name": "sale_date", "type": "DATE", "mode": "REQUIRED"}]}
    assert job.table_to_create == {
        "tableReference": {"projectId": "proj", "datasetId": "analytics", "tableId": "sales"},
        "schema": {"fields": [{"name": "sale_date", "type": "DATE", "mode": "REQUIRED"}]},
        "timePartitioning": {"type": "MONTH", "field": "sale_date"},
    }


def test_without_decorators_a_partition_is_emptied_by_a_parameterised_delete_then_appended():
    delete, load = plan_load(["gs://b/x.parquet"], SALES, project="proj",
                             write="truncate_partition", partition=MARCH, schema=None,
                             allow_field_addition=False, job_id="j", use_decorator=False)
    assert delete.sql == ("DELETE FROM `proj.analytics.sales` WHERE sale_date >= @partition_start "
                          "AND sale_date < @partition_end")
    assert [p["parameterValue"]["value"] for p in delete.config["queryParameters"]] == [
        "2024-03-01", "2024-04-01"]
    assert delete.job_id == "j__delete" and delete.only_if_table_exists == "proj.analytics.sales"
    assert load.destination == "proj.analytics.sales"
    assert load.config["writeDisposition"] == "WRITE_APPEND"


@pytest.mark.parametrize(("gran", "value", "suffix"), [
    ("DAY", "2024-03-05", "$20240305"), ("YEAR", "2024", "$2024"), ("HOUR", "2024030513", "$2024030513"),
    ("MONTH", "202403", "$202403"),
])
def test_partition_decorators_per_granularity(gran, value, suffix):
    (job,) = plan_load(["gs://b/x"], SALES, project="p", write="truncate_partition",
                       partition=Partition("t", gran, value), schema=None,
                       allow_field_addition=False, job_id="j")
    assert job.destination.endswith(suffix)


def test_a_partition_value_that_names_no_partition_is_refused():
    with pytest.raises(PermanentError, match="2024-3x"):
        plan_load(["gs://b/x"], SALES, project="p", write="truncate_partition",
                  partition=Partition("t", "MONTH", "2024-3x"), schema=None,
                  allow_field_addition=False, job_id="j")


def test_query_params_are_typed_query_parameters_and_never_in_the_sql():
    sql = "SELECT * FROM sales WHERE batch_id = @batch_id AND amount > @min"
    (job,) = plan_query(sql, {"batch_id": "2024-03' --", "min": Decimal("1.5"), "unused": 1},
                        project="proj", default_dataset="analytics",
                        destination=parse_table("profit"), write="truncate", partition=None,
                        job_id="j")
    assert job.sql == sql
    assert job.config["queryParameters"] == [
        {"name": "batch_id", "parameterType": {"type": "STRING"},
         "parameterValue": {"value": "2024-03' --"}},
        {"name": "min", "parameterType": {"type": "NUMERIC"}, "parameterValue": {"value": "1.5"}},
    ]
    cfg = bigquery.QueryJobConfig.from_api_repr({"query": job.config})
    assert cfg.destination.table_id == "profit" and cfg.write_disposition == "WRITE_TRUNCATE"
    assert cfg.default_dataset.dataset_id == "analytics"
    assert cfg.query_parameters[0] == bigquery.ScalarQueryParameter("batch_id", "STRING", "2024-03' --")
    assert cfg.use_legacy_sql is False


@pytest.mark.parametrize(("value", "type_", "text"), [
    (True, "BOOL", "true"), (3, "INT64", "3"), (2.5, "FLOAT64", "2.5"),
    (date(2024, 3, 1), "DATE", "2024-03-01"),
    (datetime(2024, 3, 1, tzinfo=UTC), "TIMESTAMP", "2024-03-01T00:00:00+00:00"),
    (datetime(2024, 3, 1), "DATETIME", "2024-03-01T00:00:00"),
])
def test_parameter_types_follow_python_types(value, type_, text):
    assert query_parameter("p", value) == {
        "name": "p", "parameterType": {"type": type_}, "parameterValue": {"value": text}}


def test_list_parameters_are_arrays():
    assert query_parameter("ids", [1, 2])["parameterType"] == {"type": "ARRAY", "arrayType": {"type": "INT64"}}


def test_query_into_a_partition_uses_the_decorator():
    (job,) = plan_query("SELECT @batch_id AS b", {"batch_id": "2024-03"}, project="p",
                        default_dataset="analytics", destination=parse_table("profit"),
                        write="truncate_partition", partition=Partition("month", "MONTH", "2024-03"),
                        job_id="j")
    assert job.config["destinationTable"]["tableId"] == "profit$202403"


def test_a_query_naming_a_missing_parameter_is_refused():
    with pytest.raises(PermanentError, match="@region"):
        plan_query("SELECT @region", {"batch_id": "b"}, project="p", default_dataset="d",
                   destination=None, write="truncate", partition=None, job_id="j")


def test_job_ids_are_deterministic_and_safe():
    assert safe_job_id("p__2024-03__t__1") == "p__2024-03__t__1"
    a, b = safe_job_id("p__2024.03__t__1"), safe_job_id("p__2024_03__t__1")
    assert a != b and a.startswith("p__2024_03__t__1_") and a == safe_job_id("p__2024.03__t__1")
    assert len(safe_job_id("x" * 2000)) <= 1024


@pytest.mark.parametrize("name", ["a-b.c", "ds.t;drop", "`x`", "a b", "ds.", "p.d.t.x"])
def test_bad_table_names_are_clear_errors(name):
    with pytest.raises(InvalidIdentifier, match="invalid"):
        parse_table(name)


def test_table_names_resolve_with_the_default_dataset():
    assert parse_table("sales", "raw").name == "raw.sales"
    assert parse_table("my-proj.ds.t").bigquery_id("other") == "my-proj.ds.t"


# -- submit / re-attach against a fake client ---------------------------------------------


class FakeJob:
    def __init__(self, job_id, state="DONE", error=None, output_rows=7):
        self.job_id, self.state, self.error_result, self.output_rows = job_id, state, error, output_rows
        self.num_dml_affected_rows = None

    def result(self, timeout=None):
        assert timeout is not None  # never wait forever
        if self.error_result:
            raise gexc.BadRequest(self.error_result["message"])
        return SimpleNamespace(total_rows=3)


class FakeClient:
    project = "proj"

    def __init__(self, existing=(), conflict=False):
        self.jobs = {j.job_id: j for j in existing}
        self.conflict = conflict
        self.inserted: list[str] = []

    def get_job(self, job_id, location=None):
        if job_id not in self.jobs:
            raise gexc.NotFound("no job")
        return self.jobs[job_id]

    def load_table_from_uri(self, uris, destination, job_id, job_config, location=None):
        assert isinstance(job_config, bigquery.LoadJobConfig)
        if self.conflict:
            self.jobs[job_id] = FakeJob(job_id, output_rows=5)
            raise gexc.Conflict("Already Exists: Job")
        self.inserted.append(job_id)
        self.jobs[job_id] = FakeJob(job_id)
        return self.jobs[job_id]

    def query(self, sql, job_config, job_id=None, location=None):
        self.inserted.append(job_id)
        self.jobs[job_id] = FakeJob(job_id)
        return self.jobs[job_id]

    def get_table(self, table_id):
        return object()

    def create_table(self, table, exists_ok=False):
        assert exists_ok


def test_a_new_job_is_inserted_once():
    client = FakeClient()
    wh = BigQueryWarehouse("proj", "analytics", client=client)
    res = wh.load_parquet(["gs://b/x.parquet"], "sales", job_id="j1")
    assert client.inserted == ["j1"] and res.rows_loaded == 7 and res.table == "analytics.sales"


def test_a_redelivered_attempt_re_attaches_to_its_existing_job():
    client = FakeClient(existing=[FakeJob("j1", output_rows=11)])
    res = BigQueryWarehouse("proj", "analytics", client=client).load_parquet(
        ["gs://b/x.parquet"], "sales", job_id="j1")
    assert client.inserted == [] and res.rows_loaded == 11


def test_a_conflict_on_insert_re_attaches_instead_of_failing():
    client = FakeClient(conflict=True)
    res = BigQueryWarehouse("proj", "analytics", client=client).load_parquet(
        ["gs://b/x.parquet"], "sales", job_id="j1")
    assert res.rows_loaded == 5


def test_a_failed_job_is_a_permanent_error_unless_its_reason_is_transient():
    bad = FakeJob("j1", error={"reason": "invalid", "message": "bad parquet"})
    with pytest.raises(PermanentError, match="bad parquet"):
        BigQueryWarehouse("proj", client=FakeClient([bad])).load_parquet(["gs://b/x"], "t", job_id="j1")
    busy = FakeJob("j2", error={"reason": "backendError", "message": "try later"})
    with pytest.raises(RetryableError, match="backendError"):
        BigQueryWarehouse("proj", client=FakeClient([busy])).load_parquet(["gs://b/x"], "t", job_id="j2")


def test_job_state_tells_the_lease_check_what_happened():
    client = FakeClient([FakeJob("run", state="RUNNING"), FakeJob("ok"),
                         FakeJob("bad", error={"reason": "invalid", "message": "x"})])
    wh = BigQueryWarehouse("proj", client=client)
    assert [wh.job_state(j) for j in ("run", "ok", "bad", "none")] == [
        JobState.RUNNING, JobState.DONE, JobState.FAILED, JobState.UNKNOWN]


def test_importing_the_handlers_and_adapters_does_not_import_google_clients_or_pyarrow():
    code = (
        "import sys\n"
        "import orchestrator.handlers.parquet_to_bigquery, orchestrator.handlers.bigquery_query\n"
        "import orchestrator.adapters.gcp.bigquery, orchestrator.adapters.gcp.storage\n"
        "import orchestrator.adapters.local.warehouse, orchestrator.examples_data\n"
        "bad = [m for m in ('google.cloud.bigquery', 'google.cloud.storage', 'pyarrow',"
        " 'pandas', 'duckdb', 'sqlglot') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_without_decorators_a_query_into_a_partition_is_create_delete_insert_jobs():
    create, delete, insert = plan_query(
        "SELECT @batch_id AS b;", {"batch_id": "2024-03"}, project="p", default_dataset="analytics",
        destination=parse_table("profit"), write="truncate_partition",
        partition=Partition("month", "MONTH", "2024-03"), job_id="j", use_decorator=False)
    assert [create.job_id, delete.job_id, insert.job_id] == ["j__create", "j__delete", "j"]
    assert create.sql.startswith("CREATE TABLE IF NOT EXISTS `p.analytics.profit` "
                                 "PARTITION BY DATE_TRUNC(month, MONTH) AS SELECT * FROM (")
    assert "@partition_start" in delete.sql
    assert insert.sql == "INSERT INTO `p.analytics.profit` SELECT * FROM (\nSELECT @batch_id AS b\n)"
    assert "destinationTable" not in insert.config
    assert insert.config["queryParameters"][0]["parameterValue"] == {"value": "2024-03"}
