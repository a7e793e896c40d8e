"""The DuckDB warehouse and the folder-of-buckets object store of the embedded runtime."""

from __future__ import annotations

import threading
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.adapters.local.object_store import LocalObjectStore
from orchestrator.adapters.local.warehouse import DuckDBWarehouse
from orchestrator.errors import PermanentError
from orchestrator.examples_data import SALES_COLUMNS, parquet_bytes
from orchestrator.identifiers import InvalidIdentifier
from orchestrator.ports import Column, JobState, Partition


def sale(i: int, day: date, region: str = "north", amount: str = "10.00", **extra: object) -> dict:
    return {"sale_id": f"s{i}", "sale_date": day, "region": region,
            "amount": Decimal(amount), "batch_id": day.strftime("%Y-%m"), **extra}


@pytest.fixture
def store(tmp_path: Path) -> LocalObjectStore:
    return LocalObjectStore(tmp_path / "buckets")


@pytest.fixture
def wh(tmp_path: Path) -> DuckDBWarehouse:
    w = DuckDBWarehouse(tmp_path / "warehouse.duckdb")
    yield w
    w.close()


def put(store: LocalObjectStore, uri: str, rows: list[dict], columns=SALES_COLUMNS) -> None:
    store.write(uri, parquet_bytes(rows, columns))


def test_object_store_maps_gs_uris_into_a_folder_per_bucket(store: LocalObjectStore, tmp_path: Path):
    store.write("gs://landing/a/b/c.txt", b"hi")
    assert (tmp_path / "buckets" / "landing" / "a" / "b" / "c.txt").read_bytes() == b"hi"
    assert store.read("gs://landing/a/b/c.txt") == b"hi"
    assert store.exists("gs://landing/a/b/c.txt") and not store.exists("gs://landing/a/b")
    store.write("gs://landing/a/d.txt", b"")
    assert store.list("gs://landing/a/") == ["gs://landing/a/b/c.txt", "gs://landing/a/d.txt"]
    assert store.list("gs://landing/a/b") == ["gs://landing/a/b/c.txt"]
    assert store.list("gs://other/") == []


@pytest.mark.parametrize("uri", ["gs://landing/../x", "gs://landing/a/../../x", "s3://b/x", "gs://B/x"])
def test_object_store_refuses_uris_that_escape_or_are_not_gcs(store: LocalObjectStore, uri: str):
    with pytest.raises(PermanentError):
        store.write(uri, b"x")


def test_load_lands_rows_from_a_wildcard_that_crosses_folders_like_bigquery(store, wh):
    put(store, "gs://landing/sales/2024-03/a/part-0.parquet", [sale(1, date(2024, 3, 1))])
    put(store, "gs://landing/sales/2024-03/part-1.parquet", [sale(2, date(2024, 3, 2))])
    store.write("gs://landing/sales/2024-03/_SUCCESS", b"")
    result = wh.load_parquet(["gs://landing/sales/2024-03/*.parquet"], "sales", job_id="j1")
    assert (result.rows_loaded, result.table) == (2, "analytics.sales")
    assert wh.row_count("analytics.sales") == 2
    assert wh.table_exists("sales") and not wh.table_exists("expenses")


def test_a_repeated_job_id_returns_the_first_result_without_loading_again(store, wh):
    put(store, "gs://landing/x.parquet", [sale(1, date(2024, 3, 1)), sale(2, date(2024, 3, 2))])
    first = wh.load_parquet(["gs://landing/x.parquet"], "sales", write="append", job_id="same")
    again = wh.load_parquet(["gs://landing/x.parquet"], "sales", write="append", job_id="same")
    assert again == first
    assert wh.row_count("sales") == 2
    assert wh.job_state("same") == JobState.DONE
    wh.load_parquet(["gs://landing/x.parquet"], "sales", write="append", job_id="other")
    assert wh.row_count("sales") == 4


def test_truncate_partition_replaces_one_month_and_keeps_the_others(store, wh):
    march = Partition("sale_date", "MONTH", "2024-03")
    put(store, "gs://lake/m1.parquet", [sale(1, date(2024, 3, 1)), sale(2, date(2024, 3, 31))])
    put(store, "gs://lake/f.parquet", [sale(3, date(2024, 2, 29))])
    wh.load_parquet(["gs://lake/f.parquet"], "sales", job_id="feb")
    wh.load_parquet(["gs://lake/m1.parquet"], "sales", write="truncate_partition", partition=march,
                    job_id="m1")
    put(store, "gs://lake/m2.parquet", [sale(4, date(2024, 3, 15), amount="99.00")])
    wh.load_parquet(["gs://lake/m2.parquet"], "sales", write="truncate_partition", partition=march,
                    job_id="m2")
    rows = wh.fetch("SELECT sale_id FROM sales ORDER BY sale_id")
    assert [r["sale_id"] for r in rows] == ["s3", "s4"]


def test_rows_outside_the_partition_fail_the_load_and_write_nothing(store, wh):
    put(store, "gs://lake/ok.parquet", [sale(1, date(2024, 3, 1))])
    wh.load_parquet(["gs://lake/ok.parquet"], "sales", job_id="ok")
    put(store, "gs://lake/bad.parquet", [sale(2, date(2024, 3, 5)), sale(3, date(2024, 4, 1))])
    with pytest.raises(PermanentError, match=r"1 row.*outside partition 2024-03"):
        wh.load_parquet(["gs://lake/bad.parquet"], "sales", write="truncate_partition",
                        partition=Partition("sale_date", "MONTH", "2024-03"), job_id="bad")
    assert [r["sale_id"] for r in wh.fetch("SELECT sale_id FROM sales")] == ["s1"]
    assert wh.job_state("bad") == JobState.UNKNOWN


def test_a_new_column_is_refused_unless_field_addition_is_allowed(store, wh):
    put(store, "gs://lake/a.parquet", [sale(1, date(2024, 3, 1))])
    wh.load_parquet(["gs://lake/a.parquet"], "sales", job_id="a")
    cols = [*SALES_COLUMNS, {"name": "channel", "type": "STRING"}]
    put(store, "gs://lake/b.parquet", [sale(2, date(2024, 3, 2), channel="web")], cols)
    with pytest.raises(PermanentError, match="channel"):
        wh.load_parquet(["gs://lake/b.parquet"], "sales", job_id="b")
    assert wh.row_count("sales") == 1
    wh.load_parquet(["gs://lake/b.parquet"], "sales", allow_field_addition=True, job_id="b")
    assert wh.fetch("SELECT channel FROM sales WHERE sale_id = 's2'") == [{"channel": "web"}]


def test_a_declared_schema_creates_the_missing_table_with_its_types(store, wh):
    put(store, "gs://lake/a.parquet", [sale(1, date(2024, 3, 1), amount="1.25")])
    wh.load_parquet(["gs://lake/a.parquet"], "raw.sales",
                    schema=[Column(**c) for c in SALES_COLUMNS], job_id="a")
    (row,) = wh.fetch("SELECT amount, sale_date FROM raw.sales")
    assert row == {"amount": Decimal("1.25"), "sale_date": date(2024, 3, 1)}


def test_a_source_missing_a_required_column_is_named_and_nothing_is_written(store, wh):
    put(store, "gs://lake/a.parquet", [sale(1, date(2024, 3, 1), amount="1.25")])
    schema = [Column(**c) for c in SALES_COLUMNS]
    wh.load_parquet(["gs://lake/a.parquet"], "raw.sales", schema=schema, job_id="a")
    without_amount = [c for c in SALES_COLUMNS if c["name"] != "amount"]
    put(store, "gs://lake/b.parquet", [sale(2, date(2024, 3, 2))], columns=without_amount)
    with pytest.raises(PermanentError, match=r"raw\.sales: the Parquet source has no column "
                                             r"amount .*gs://lake/b\.parquet"):
        wh.load_parquet(["gs://lake/b.parquet"], "raw.sales", schema=schema, job_id="b")
    assert wh.row_count("raw.sales") == 1


def test_a_load_with_no_matching_objects_is_a_clear_error(wh):
    with pytest.raises(PermanentError, match=r"no objects match gs://lake/none/\*.parquet"):
        wh.load_parquet(["gs://lake/none/*.parquet"], "sales", job_id="x")


@pytest.mark.parametrize("name", ["sales;drop", "a.b.c.d", "1abc", "ds.ta-ble", 'x"y', ""])
def test_table_names_outside_the_identifier_alphabet_are_refused(wh, name):
    with pytest.raises(InvalidIdentifier):
        wh.load_parquet(["gs://lake/a.parquet"], name, job_id="x")


def test_query_binds_batch_id_as_a_parameter_never_as_text(store, wh):
    put(store, "gs://lake/a.parquet", [sale(1, date(2024, 3, 1)), sale(2, date(2024, 4, 1))])
    wh.load_parquet(["gs://lake/a.parquet"], "sales", job_id="a")
    sql = "SELECT region, SUM(amount) AS total FROM sales WHERE batch_id = @batch_id GROUP BY region"
    res = wh.run_query(sql, {"batch_id": "2024-03"}, destination="out", job_id="q1")
    assert (res.rows_affected, res.destination) == (1, "analytics.out")
    assert wh.fetch("SELECT total FROM out") == [{"total": Decimal("10.00")}]
    hostile = wh.run_query(sql, {"batch_id": "x' OR '1'='1"}, destination="out2", job_id="q2")
    assert hostile.rows_affected == 0


def test_dml_without_destination_reports_rows_affected_and_is_recorded_once(store, wh):
    put(store, "gs://lake/a.parquet", [sale(i, date(2024, 3, 1)) for i in range(5)])
    wh.load_parquet(["gs://lake/a.parquet"], "sales", job_id="a")
    res = wh.run_query("DELETE FROM sales WHERE sale_id IN ('s1', 's2')", {}, job_id="d")
    assert res.rows_affected == 2 and res.destination is None
    put(store, "gs://lake/b.parquet", [sale(1, date(2024, 3, 1))])
    wh.load_parquet(["gs://lake/b.parquet"], "sales", job_id="b")
    assert wh.run_query("DELETE FROM sales WHERE sale_id = 's1'", {}, job_id="d").rows_affected == 2
    assert wh.row_count("sales") == 4  # the repeated job id did not delete again


def test_sql_that_does_not_transpile_is_a_permanent_error_naming_the_construct(wh):
    with pytest.raises(PermanentError, match="APPROX_TOP_K"):
        wh.run_query("SELECT APPROX_TOP_COUNT(x, 2) FROM t", {}, destination="o", job_id="q")


def test_a_missing_parameter_is_named(wh):
    with pytest.raises(PermanentError, match="@region"):
        wh.run_query("SELECT @region AS r", {"batch_id": "b"}, destination="o", job_id="q")


def test_a_failing_script_rolls_back_every_statement(store, wh):
    put(store, "gs://lake/a.parquet", [sale(1, date(2024, 3, 1))])
    wh.load_parquet(["gs://lake/a.parquet"], "sales", job_id="a")
    with pytest.raises(PermanentError):
        wh.run_query("DELETE FROM sales WHERE TRUE; SELECT * FROM no_such_table", {}, job_id="s")
    assert wh.row_count("sales") == 1


def test_concurrent_jobs_from_worker_threads_all_land(store, wh):
    for i in range(8):
        put(store, f"gs://lake/{i}.parquet", [sale(i * 10 + k, date(2024, 3, 1)) for k in range(3)])
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            wh.load_parquet([f"gs://lake/{i}.parquet"], "sales", job_id=f"j{i}")
            wh.load_parquet([f"gs://lake/{i}.parquet"], "sales", job_id=f"j{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert wh.row_count("sales") == 24
