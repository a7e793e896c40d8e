"""Contract tests of the Google Cloud adapters against local emulators:
gcp-storage-emulator for GCS and bqemulator (DuckDB-backed) for BigQuery, the
load jobs reading what was uploaded through the GCS API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator import handlers
from orchestrator.adapters.local.object_store import LocalObjectStore
from orchestrator.adapters.local.warehouse import DuckDBWarehouse
from orchestrator.errors import PermanentError
from orchestrator.examples_data import SALES_COLUMNS, write_monthly_files
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.checks import prepare_spec
from orchestrator.pipeline.load import load_pipeline
from orchestrator.pipeline.spec import PipelineSpec
from orchestrator.ports import Column, JobState
from tests.emulators import BqEmulator, GcsEmulator, bq_emulator, gcs_emulator  # noqa: F401

pytestmark = pytest.mark.emulator

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "monthly_profit.yaml"
PROFIT_SQL = "SELECT month, region, revenue, expenses, profit FROM analytics.profit "


@pytest.fixture(scope="module")
def landing(gcs_emulator: GcsEmulator) -> Any:  # noqa: F811
    gcs_emulator.ensure_bucket("landing")
    return gcs_emulator.object_store()


@pytest.fixture(scope="module")
def bq(bq_emulator: BqEmulator) -> BqEmulator:  # noqa: F811
    bq_emulator.ensure_dataset("analytics")
    return bq_emulator


def run_pipeline(spec: PipelineSpec, wh: Any, batch_id: str, attempt: int = 1) -> dict[str, Any]:
    out = {}
    for name in spec.topological_order():
        task = spec.task(name)
        ctx = TaskContext(pipeline=spec.name, batch_id=batch_id, task=name, attempt=attempt,
                          config=task.config, input={"params": {}},
                          deadline=datetime.now(UTC) + timedelta(minutes=5),
                          warehouse_factory=lambda: wh, base_dir=spec.base_dir)
        out[name] = handlers.resolve(task.handler)(ctx)
    return out


def test_gcs_adapter_writes_reads_lists_and_checks_existence(landing):
    landing.write("gs://landing/contract/a/1.bin", b"\x00one")
    landing.write("gs://landing/contract/b.bin", b"two")
    assert landing.read("gs://landing/contract/a/1.bin") == b"\x00one"
    assert landing.exists("gs://landing/contract/b.bin")
    assert not landing.exists("gs://landing/contract/missing")
    assert landing.list("gs://landing/contract/") == [
        "gs://landing/contract/a/1.bin", "gs://landing/contract/b.bin"]
    assert landing.list("gs://landing/contract/a") == ["gs://landing/contract/a/1.bin"]
    assert landing.generation("gs://landing/contract/b.bin")
    with pytest.raises(PermanentError, match="no such object"):
        landing.read("gs://landing/contract/missing")


def test_a_load_from_gs_lands_the_rows_and_a_repeated_job_id_does_not_double_them(bq, landing):
    write_monthly_files(landing, "2023-01", seed=5, sales=30)
    wh = bq.warehouse()
    schema = [Column(**c) for c in SALES_COLUMNS]
    uris = ["gs://landing/sales/2023-01/*.parquet"]
    first = wh.load_parquet(uris, "analytics.load_contract", write="append", schema=schema,
                            job_id="contract__2023-01__load__1")
    assert first.rows_loaded == 30 and wh.row_count("analytics.load_contract") == 30
    again = wh.load_parquet(uris, "analytics.load_contract", write="append", schema=schema,
                            job_id="contract__2023-01__load__1")
    assert again.job_id == first.job_id
    assert wh.row_count("analytics.load_contract") == 30
    assert wh.job_state("contract__2023-01__load__1") == JobState.DONE
    assert wh.job_state("contract__2023-01__load__9") == JobState.UNKNOWN


def test_the_profit_query_with_batch_id_returns_the_expected_figures(bq, landing):
    expected = write_monthly_files(landing, "2024-03", seed=11)
    spec = prepare_spec(load_pipeline(EXAMPLE))
    out = run_pipeline(spec, bq.warehouse(), "2024-03")
    assert out["calculate_profit"]["rows_affected"] == len(expected)
    rows = bq.warehouse().fetch(PROFIT_SQL + "WHERE month = @m ORDER BY region",
                                {"m": expected[0]["month"]})
    assert rows == expected


def test_the_same_pipeline_gives_identical_rows_on_duckdb_and_bqemulator(bq, landing, tmp_path):
    local_store = LocalObjectStore(tmp_path / "buckets")
    spec = prepare_spec(load_pipeline(EXAMPLE))
    emulated = bq.warehouse()
    local = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    try:
        for batch_id, seed in (("2024-05", 3), ("2024-06", 4), ("2024-05", 8)):
            # The last run corrects May: both warehouses must replace it, not add to it.
            a = write_monthly_files(landing, batch_id, seed=seed)
            b = write_monthly_files(local_store, batch_id, seed=seed)
            assert a == b
            run_pipeline(spec, emulated, batch_id, attempt=seed)
            run_pipeline(spec, local, batch_id, attempt=seed)
        query = PROFIT_SQL + "WHERE month >= '2024-05-01' ORDER BY month, region"
        cloud_rows, local_rows = emulated.fetch(query), local.fetch(query)
        assert cloud_rows == local_rows
        assert len(local_rows) == 8
        may = [r for r in local_rows if r["month"].month == 5]
        assert may == write_monthly_files(tmp_path / "scratch", "2024-05", seed=8)
    finally:
        local.close()


def test_the_example_runs_unchanged_on_buckets_and_datasets_with_other_real_names(
        bq_emulator, gcs_emulator, landing):  # noqa: F811
    """`gs://landing/…` and `analytics.*` in the pipeline, `<project>-orch-landing` and
    `orch_analytics` in the cloud: the adapters translate, the file stays as it is."""
    from orchestrator.adapters.gcp.storage import GcsObjectStore
    from orchestrator.names import NameMap

    names = NameMap(buckets={"landing": "test-project-orch-landing"},
                    datasets={"analytics": "orch_analytics"})
    gcs_emulator.ensure_bucket("test-project-orch-landing")
    bq_emulator.ensure_dataset("orch_analytics")
    store = GcsObjectStore(gcs_emulator.project, client=gcs_emulator.client(), names=names)
    expected = write_monthly_files(store, "2024-09", seed=21)
    real = sorted(b.name for b in gcs_emulator.client().list_blobs(
        "test-project-orch-landing", prefix="sales/2024-09/"))
    assert real == ["sales/2024-09/_SUCCESS", "sales/2024-09/part-000.parquet",
                    "sales/2024-09/part-001.parquet"]
    assert store.list("gs://landing/sales/2024-09/") == [f"gs://landing/{n}" for n in real]
    assert not landing.exists("gs://landing/sales/2024-09/_SUCCESS")

    spec = prepare_spec(load_pipeline(EXAMPLE))
    out = run_pipeline(spec, bq_emulator.warehouse("analytics", names=names), "2024-09")
    assert out["load_sales"]["table"] == "analytics.sales"
    assert out["calculate_profit"]["destination"] == "analytics.profit"
    mapped = bq_emulator.warehouse("analytics", names=names)
    rows = mapped.fetch(PROFIT_SQL + "WHERE month = @m ORDER BY region",
                        {"m": expected[0]["month"]})
    assert rows == expected
    direct = bq_emulator.warehouse("orch_analytics").fetch(
        "SELECT COUNT(*) AS n FROM orch_analytics.profit WHERE month = @m",
        {"m": expected[0]["month"]})
    assert direct == [{"n": len(expected)}]
