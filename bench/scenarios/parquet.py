"""A local warehouse load of a Parquet file, against DuckDB loading the same file
itself, in the same run: what the warehouse's bookkeeping costs on top."""

from __future__ import annotations

import tempfile
import time
import uuid
from pathlib import Path

from bench.core import REPO, Context, Metric, skipped

CACHE = REPO / ".tmp" / "bench"
BUCKET = "bench-data"


def _parquet(rows: int) -> Path:
    """A reproducible file, made once by DuckDB and kept under .tmp/bench."""
    import duckdb

    path = CACHE / "buckets" / BUCKET / f"events_{rows}.parquet"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    con = duckdb.connect()
    con.execute(f"""
        COPY (
            SELECT i AS id,
                   'customer_' || (i % 100000) AS customer,
                   (i % 1000) * 1.25 AS amount,
                   DATE '2024-01-01' + CAST(i % 365 AS INTEGER) AS day,
                   i % 7 = 0 AS flagged
            FROM range({rows}) t(i)
        ) TO '{tmp}' (FORMAT parquet)
    """)
    con.close()
    tmp.rename(path)
    return path


def parquet_load(ctx: Context) -> list[Metric]:
    try:
        import duckdb
    except ImportError:
        return [skipped("parquet_load_ratio", "duckdb is not installed", "x", "<= 1.5")]
    try:
        from orchestrator.adapters.local.warehouse import DuckDBWarehouse
    except ImportError as exc:
        return [skipped("parquet_load_ratio", f"local warehouse missing: {exc}", "x", "<= 1.5")]
    z = ctx.sizes
    path = _parquet(z.parquet_rows)
    uri = f"gs://{BUCKET}/{path.name}"
    raw_s: list[float] = []
    wh_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-parquet-") as tmp:
        for i in range(z.repeats):
            # Alternate which goes first, so neither always finds the file in the page cache.
            order = ("raw", "wh") if i % 2 == 0 else ("wh", "raw")
            for which in order:
                db = Path(tmp) / f"{which}{i}.duckdb"
                if which == "raw":
                    con = duckdb.connect(str(db))
                    t0 = time.perf_counter()
                    con.execute(f"CREATE TABLE events AS SELECT * FROM read_parquet('{path}')")
                    raw_s.append(time.perf_counter() - t0)
                    con.close()
                else:
                    wh = DuckDBWarehouse(db, default_dataset="bench",
                                         buckets_root=CACHE / "buckets")
                    wh.job_state("warm")  # opens the file: connecting is not loading
                    t0 = time.perf_counter()
                    res = wh.load_parquet([uri], "bench.events", write="truncate",
                                          job_id=f"bench-{uuid.uuid4().hex}")
                    wh_s.append(time.perf_counter() - t0)
                    wh.close()
                    if res.rows_loaded != z.parquet_rows:
                        raise RuntimeError(f"loaded {res.rows_loaded} rows, "
                                           f"expected {z.parquet_rows}")
                db.unlink(missing_ok=True)
    params = {"rows": z.parquet_rows, "file_mb": round(path.stat().st_size / 1e6, 1),
              "duckdb": duckdb.__version__}
    pairs = list(zip(wh_s, raw_s, strict=True))
    return [
        Metric("parquet_load_ratio", "x", [w / r for w, r in pairs],
               {**params, "measured": "warehouse load_parquet / DuckDB CREATE TABLE AS "
                "read_parquet, per run"}, target="<= 1.5"),
        Metric("parquet_load_s", "s", wh_s, {**params, "path": "DuckDBWarehouse.load_parquet"}),
        Metric("parquet_duckdb_raw_s", "s", raw_s,
               {**params, "path": "CREATE TABLE … AS SELECT * FROM read_parquet(…)"}),
    ]
