"""Logical bucket and dataset names and the real names the settings map them to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.names import NameMap
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.storage_events import StorageObject
from orchestrator.testing import (
    RecordingPublisher,
    function_client,
    reset_process_caches,
    storage_request,
)

NAMES = NameMap(buckets={"landing": "acme-prod-orch-landing"},
                datasets={"analytics": "orch_analytics", "same": "same"})


def test_uris_translate_both_ways_and_unmapped_buckets_are_their_own_names() -> None:
    assert NAMES.real_uri("gs://landing/sales/2024-03/x.parquet") == (
        "gs://acme-prod-orch-landing/sales/2024-03/x.parquet")
    assert NAMES.logical_uri("gs://acme-prod-orch-landing/sales/") == "gs://landing/sales/"
    assert NAMES.real_uri("gs://landing") == "gs://acme-prod-orch-landing"
    assert NAMES.real_uri("gs://other/a") == "gs://other/a"
    assert NAMES.logical_uri("gs://other/a") == "gs://other/a"
    assert NAMES.real_uri("/tmp/not-a-uri") == "/tmp/not-a-uri"


def test_a_finalized_object_in_the_real_bucket_is_seen_in_its_logical_one() -> None:
    obj = StorageObject(bucket="acme-prod-orch-landing", name="sales/2024-03/_SUCCESS",
                        generation="7", size=0)
    logical = NAMES.logical_object(obj)
    assert (logical.bucket, logical.name, logical.generation) == (
        "landing", "sales/2024-03/_SUCCESS", "7")
    assert logical.uri == "gs://landing/sales/2024-03/_SUCCESS"
    other = StorageObject(bucket="elsewhere", name="a")
    assert NAMES.logical_object(other) is other


def test_sql_naming_a_mapped_dataset_is_rewritten_and_any_other_sql_kept_byte_for_byte() -> None:
    sql = "SELECT region, SUM(amount) AS s FROM analytics.sales JOIN analytics.expenses USING (region)"
    out = NAMES.rewrite_sql(sql)
    assert "orch_analytics.sales" in out and "orch_analytics.expenses" in out
    assert "analytics.sales" not in out.replace("orch_analytics.sales", "")
    untouched = [
        "SELECT * FROM sales WHERE batch_id = @batch_id",  # the default dataset's business
        "SELECT * FROM `acme-prod.analytics.sales`",  # a project makes the name real already
        "SELECT 'analytics.sales' AS label FROM sales",  # a string, not a table
        "SELECT * FROM elsewhere.t",
    ]
    for kept in untouched:
        assert NAMES.rewrite_sql(kept) == kept
    assert NameMap().rewrite_sql(sql) == sql


def test_settings_read_the_maps_as_json_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHESTRATOR_BUCKETS", '{"landing": "acme-prod-orch-landing"}')
    monkeypatch.setenv("ORCHESTRATOR_DATASETS", "")
    s = Settings()
    assert (s.buckets, s.datasets) == ({"landing": "acme-prod-orch-landing"}, {})
    assert NameMap.from_settings(s).real_bucket("landing") == "acme-prod-orch-landing"


@pytest.mark.parametrize(("field", "value", "says"), [
    ("buckets", '{"a-1": "same-real", "b-1": "same-real"}', "both map to bucket"),
    ("buckets", '{"landing": "Not A Bucket"}', "not a valid bucket name"),
    ("buckets", "[1, 2]", "dictionary"),
    ("buckets", "{landing", "JSON object"),
    ("datasets", '{"analytics": "orch-analytics"}', "not a valid dataset name"),
])
def test_a_bad_map_is_refused_with_the_name_at_fault(
        monkeypatch: pytest.MonkeyPatch, field: str, value: str, says: str) -> None:
    monkeypatch.setenv(f"ORCHESTRATOR_{field.upper()}", value)
    with pytest.raises(ValidationError, match=says):
        Settings()


@pytest.mark.postgres
def test_a_file_finalized_in_the_real_bucket_releases_the_task_waiting_on_the_logical_one(
        pg_engine: Engine, pg_url: str) -> None:
    """Eventarc names the real bucket; the pipeline's trigger names `landing`."""
    reset_process_caches()
    published = RecordingPublisher()
    settings = Settings(database_url=pg_url, buckets={"landing": "acme-prod-orch-landing"})
    runtime = Runtime(settings, pg_engine, published)
    runtime.sync_specs([build_pipeline({"name": "sales", "tasks": [{
        "name": "load", "handler": "noop",
        "gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}}]})])
    with bootstrap.use(runtime):
        headers, body = storage_request("acme-prod-orch-landing", "sales/2024-03/_SUCCESS")
        assert function_client("on_object_finalized").post(
            "/", headers=headers, data=body).status_code == 200
    assert published.tasks() == [("sales", "2024-03", "load", 1)]
    with pg_engine.connect() as conn:
        trigger = conn.execute(text("SELECT input FROM task_log")).scalar_one()
    assert "gs://landing/sales/2024-03/_SUCCESS" in str(trigger)


def test_a_cloud_runtime_reads_gcs_and_bigquery_unless_told_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment that forgot ORCHESTRATOR_OBJECT_STORE must not list an empty local
    folder and report zero files; one that chose a value keeps it."""
    for key in ("ORCHESTRATOR_OBJECT_STORE", "ORCHESTRATOR_WAREHOUSE", "ORCHESTRATOR_LOG_FORMAT"):
        monkeypatch.delenv(key, raising=False)
    cloud = Settings().for_cloud()
    assert (cloud.object_store, cloud.warehouse, cloud.log_format) == ("gcs", "bigquery", "json")
    monkeypatch.setenv("ORCHESTRATOR_WAREHOUSE", "local")
    assert Settings().for_cloud().warehouse == "local"
    assert Settings().object_store == "local"
