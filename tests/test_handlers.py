"""The parquet_to_bigquery and bigquery_query handlers, run on the local warehouse,
and their config checks at `pipelines sync` time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import handlers
from orchestrator.adapters.local.object_store import LocalObjectStore
from orchestrator.adapters.local.warehouse import DuckDBWarehouse
from orchestrator.errors import PermanentError, PipelineValidationError
from orchestrator.examples_data import write_monthly_files
from orchestrator.handlers import bigquery_query, parquet_to_bigquery
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.checks import prepare_spec, prepared_configs
from orchestrator.pipeline.load import build_pipeline, load_pipeline
from orchestrator.pipeline.spec import PipelineSpec
from orchestrator.ports import JobState

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "monthly_profit.yaml"


def ctx_for(spec: PipelineSpec, task: str, wh: Any, *, batch_id: str = "2024-03",
            attempt: int = 1, trigger: dict | None = None) -> TaskContext:
    t = spec.task(task)
    return TaskContext(
        pipeline=spec.name, batch_id=batch_id, task=task, attempt=attempt, config=t.config,
        input={"params": {}, "trigger": trigger or {}},
        deadline=datetime.now(UTC) + timedelta(minutes=5),
        warehouse_factory=lambda: wh, base_dir=spec.base_dir,
    )


def run_pipeline(spec: PipelineSpec, wh: Any, batch_id: str, attempt: int = 1) -> dict[str, Any]:
    out = {}
    for name in spec.topological_order():
        fn = handlers.resolve(spec.task(name).handler)
        out[name] = fn(ctx_for(spec, name, wh, batch_id=batch_id, attempt=attempt))
    return out


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / ".orchestrator"


@pytest.fixture
def wh(home: Path) -> DuckDBWarehouse:
    w = DuckDBWarehouse(home / "warehouse.duckdb")
    yield w
    w.close()


def test_monthly_profit_computes_profit_per_region_equal_to_the_independent_answer(home, wh):
    expected = write_monthly_files(LocalObjectStore(home / "buckets"), "2024-03", seed=7)
    spec = prepare_spec(load_pipeline(EXAMPLE))
    out = run_pipeline(spec, wh, "2024-03")
    assert out["load_sales"]["rows_loaded"] == 40 and out["load_sales"]["table"] == "analytics.sales"
    assert out["load_expenses"]["rows_loaded"] == 12
    assert out["calculate_profit"]["rows_affected"] == len(expected) == 4
    assert out["calculate_profit"]["job_id"] == "monthly_profit__2024-03__calculate_profit__1"
    rows = wh.fetch("SELECT month, region, revenue, expenses, profit FROM profit ORDER BY region")
    assert rows == expected


def test_rerunning_a_month_replaces_it_and_keeps_other_months(home, wh):
    store = LocalObjectStore(home / "buckets")
    spec = prepare_spec(load_pipeline(EXAMPLE))
    feb = write_monthly_files(store, "2024-02", seed=1)
    run_pipeline(spec, wh, "2024-02")
    write_monthly_files(store, "2024-03", seed=1)
    run_pipeline(spec, wh, "2024-03")
    march = write_monthly_files(store, "2024-03", seed=2)  # corrected files, same month
    run_pipeline(spec, wh, "2024-03", attempt=2)
    assert wh.row_count("sales") == 80 and wh.row_count("expenses") == 24
    got = wh.fetch("SELECT month, region, revenue, expenses, profit FROM profit ORDER BY month, region")
    assert got == feb + march


def test_a_redelivered_attempt_does_not_load_twice(home, wh):
    store = LocalObjectStore(home / "buckets")
    store.write("gs://landing/raw/a.parquet", _sales_parquet())
    config = {"source": "gs://landing/raw/*.parquet", "table": "raw_sales", "write": "append"}
    spec = build_pipeline({"name": "p", "tasks": [
        {"name": "load", "handler": "parquet_to_bigquery", "config": config}]})
    first = parquet_to_bigquery.run(ctx_for(spec, "load", wh))
    again = parquet_to_bigquery.run(ctx_for(spec, "load", wh))
    assert first == again and wh.row_count("raw_sales") == 2


def test_source_defaults_to_the_triggering_object_and_the_job_id_follows_its_generation(home, wh):
    store = LocalObjectStore(home / "buckets")
    store.write("gs://landing/in/2024-03/data.parquet", _sales_parquet())
    spec = build_pipeline({"name": "p", "tasks": [
        {"name": "load", "handler": "parquet_to_bigquery", "config": {"table": "t"}}]})
    trigger = {"uri": "gs://landing/in/2024-03/data.parquet", "bucket": "landing",
               "name": "in/2024-03/data.parquet", "generation": 17}
    out = parquet_to_bigquery.run(ctx_for(spec, "load", wh, trigger=trigger))
    assert out["source"] == ["gs://landing/in/2024-03/data.parquet"]
    assert out["job_id"] == "p__2024-03__load__1__g17"
    trigger["generation"] = 18  # the file was uploaded again: load it again
    parquet_to_bigquery.run(ctx_for(spec, "load", wh, trigger=trigger))
    assert wh.row_count("t") == 4


def test_trigger_placeholders_fill_the_source(home, wh):
    store = LocalObjectStore(home / "buckets")
    store.write("gs://landing/in/2024-03/data.parquet", _sales_parquet())
    spec = build_pipeline({"name": "p", "tasks": [{"name": "load", "handler": "parquet_to_bigquery",
                           "config": {"table": "t", "source": "{trigger_dir}/*.parquet"}}]})
    trigger = {"uri": "gs://landing/in/2024-03/_SUCCESS", "bucket": "landing",
               "name": "in/2024-03/_SUCCESS"}
    out = parquet_to_bigquery.run(ctx_for(spec, "load", wh, trigger=trigger))
    assert out["source"] == ["gs://landing/in/2024-03/*.parquet"] and out["rows_loaded"] == 2


def test_loading_a_pipeline_inlines_the_sql_file_and_keeps_its_name():
    spec = load_pipeline(EXAMPLE)
    assert "FULL OUTER JOIN" in spec.task("calculate_profit").config["sql"]
    config = prepared_configs(spec)["calculate_profit"]
    assert config["sql_file"] == "sql/calculate_profit.sql"
    assert "FULL OUTER JOIN" in config["sql"] and "@batch_id" in config["sql"]
    assert prepared_configs(spec)["load_sales"] == dict(spec.task("load_sales").config)
    # Preparing is idempotent, so a re-sync of the same file changes nothing.
    assert prepare_spec(spec).definition_hash() == spec.definition_hash()


def test_a_prepared_config_runs_without_the_pipeline_folder(home, wh, tmp_path):
    write_monthly_files(LocalObjectStore(home / "buckets"), "2024-03", seed=3)
    spec = prepare_spec(load_pipeline(EXAMPLE))
    moved = spec.model_copy(update={"base_dir": tmp_path / "elsewhere"})
    out = run_pipeline(moved, wh, "2024-03")
    assert out["calculate_profit"]["rows_affected"] == 4


def _pipeline(tmp_path: Path, tasks: list[dict]) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "tasks": tasks}))
    return path


@pytest.mark.parametrize(("config", "message"), [
    ({"source": "gs://b/x/*.parquet", "table": "sales-2024"}, "invalid table name 'sales-2024'"),
    ({"source": "gs://b/x/*.parquet", "table": "a.b;c"}, "invalid table name 'b;c'"),
    ({"source": "s3://b/x", "table": "t"}, "gs:// URI"),
    ({"source": "gs://b/x", "table": "t", "write": "replace"}, "'write' must be one of"),
    ({"source": "gs://b/x", "table": "t", "write": "truncate_partition"}, "needs 'partition"),
    ({"source": "gs://b/x", "table": "t", "partition": {"field": "d", "granularity": "WEEK"}},
     "granularity"),
    ({"source": "gs://b/x", "table": "t", "schema": [{"name": "a b", "type": "STRING"}]},
     "invalid column name"),
    ({"source": "gs://b/x", "table": "t", "tabel": "x"}, "unknown key 'tabel'"),
])
def test_bad_load_config_fails_at_sync_time(tmp_path, config, message):
    path = _pipeline(tmp_path, [{"name": "load", "handler": "parquet_to_bigquery", "config": config}])
    with pytest.raises(PipelineValidationError) as exc:
        load_pipeline(path)
    assert any(message in p for p in exc.value.problems), exc.value.problems


@pytest.mark.parametrize(("config", "message"), [
    ({"sql": "sql/missing.sql"}, "cannot read SQL file 'sql/missing.sql'"),
    ({"sql": "SELECT APPROX_TOP_COUNT(x, 2) FROM t", "destination": "o"}, "APPROX_TOP_K"),
    ({"sql": "SELECT FROM WHERE", "destination": "o"}, "invalid BigQuery SQL"),
    ({"sql": "SELECT 1 AS x", "destination": "bad-name"}, "invalid table name"),
    ({"sql": "DELETE FROM t WHERE TRUE", "destination": "o"}, "single SELECT"),
    ({"destination": "o"}, "'sql' is required"),
])
def test_bad_query_config_fails_at_sync_time(tmp_path, config, message):
    path = _pipeline(tmp_path, [{"name": "q", "handler": "bigquery_query", "config": config}])
    with pytest.raises(PipelineValidationError) as exc:
        load_pipeline(path)
    assert any(message in p for p in exc.value.problems), exc.value.problems


def test_the_example_pipeline_passes_the_sync_checks():
    spec = load_pipeline(EXAMPLE)
    assert [t.handler for t in spec.tasks] == ["parquet_to_bigquery"] * 2 + ["bigquery_query"]


def test_at_run_time_a_missing_sql_file_is_a_permanent_error(wh, tmp_path):
    ctx = TaskContext(pipeline="p", batch_id="b", task="q", attempt=1,
                      config={"sql": "gone.sql", "destination": "o"}, input={},
                      deadline=datetime.now(UTC) + timedelta(minutes=1),
                      warehouse_factory=lambda: wh, base_dir=tmp_path)
    with pytest.raises(PermanentError, match=r"cannot read SQL file 'gone\.sql'"):
        bigquery_query.run(ctx)


def test_at_run_time_a_bad_table_name_in_config_writes_nothing(home, wh):
    store = LocalObjectStore(home / "buckets")
    store.write("gs://landing/a.parquet", _sales_parquet())
    ctx = TaskContext(pipeline="p", batch_id="b", task="l", attempt=1,
                      config={"source": "gs://landing/a.parquet", "table": "x; DROP TABLE y"},
                      input={}, deadline=datetime.now(UTC) + timedelta(minutes=1),
                      warehouse_factory=lambda: wh)
    with pytest.raises(PermanentError, match="invalid table name"):
        parquet_to_bigquery.run(ctx)
    assert wh.job_state("p__b__l__1") == JobState.UNKNOWN


def test_query_params_from_config_and_batch_are_bound(wh):
    ctx = TaskContext(pipeline="p", batch_id="2024-03", task="q", attempt=1,
                      config={"sql": "SELECT @batch_id AS b, @label AS l, @n AS n",
                              "destination": "o", "params": {"label": "m-{batch_id}", "n": 3}},
                      input={"params": {"n": 4}}, deadline=datetime.now(UTC) + timedelta(minutes=1),
                      warehouse_factory=lambda: wh)
    bigquery_query.run(ctx)
    assert wh.fetch("SELECT * FROM o") == [{"b": "2024-03", "l": "m-2024-03", "n": 4}]


def _sales_parquet() -> bytes:
    from datetime import date
    from decimal import Decimal

    from orchestrator.examples_data import SALES_COLUMNS, parquet_bytes

    return parquet_bytes([
        {"sale_id": "a", "sale_date": date(2024, 3, 1), "region": "n", "amount": Decimal("1.00"),
         "batch_id": "2024-03"},
        {"sale_id": "b", "sale_date": date(2024, 3, 2), "region": "s", "amount": Decimal("2.00"),
         "batch_id": "2024-03"},
    ], SALES_COLUMNS)
