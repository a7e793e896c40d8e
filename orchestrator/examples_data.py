"""Sample data for the `monthly_profit` example: a month of sales and expenses
as Parquet, and the profit rows the pipeline must produce, computed here in
plain Python so a test compares two independent answers.
"""

from __future__ import annotations

import io
import random
from collections import defaultdict
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from orchestrator.ports import ObjectStore

REGIONS = ("north", "south", "east", "west")
AMOUNT_TYPE = (12, 2)  # NUMERIC(12, 2): exact sums on every warehouse
SALES_COLUMNS = [
    {"name": "sale_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "sale_date", "type": "DATE", "mode": "REQUIRED"},
    {"name": "region", "type": "STRING", "mode": "REQUIRED"},
    {"name": "amount", "type": "NUMERIC", "mode": "REQUIRED"},
    {"name": "batch_id", "type": "STRING", "mode": "REQUIRED"},
]
EXPENSES_COLUMNS = [
    {"name": "expense_id", "type": "STRING", "mode": "REQUIRED"},
    {"name": "expense_date", "type": "DATE", "mode": "REQUIRED"},
    {"name": "region", "type": "STRING", "mode": "REQUIRED"},
    {"name": "amount", "type": "NUMERIC", "mode": "REQUIRED"},
    {"name": "batch_id", "type": "STRING", "mode": "REQUIRED"},
]


def month_of(batch_id: str) -> date:
    """`2024-03` → 2024-03-01."""
    year, month = batch_id.split("-")[:2]
    return date(int(year), int(month), 1)


def _days(first: date) -> list[date]:
    nxt = (first.replace(day=28) + timedelta(days=4)).replace(day=1)
    return [first + timedelta(days=i) for i in range((nxt - first).days)]


def _cents(rng: random.Random, low: int, high: int) -> Decimal:
    return Decimal(rng.randint(low * 100, high * 100)) / 100


def make_month(batch_id: str, seed: int, *, sales: int = 40, expenses: int = 12,
               regions: tuple[str, ...] = REGIONS) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(f"{seed}:{batch_id}")
    days = _days(month_of(batch_id))
    return {
        "sales": [
            {"sale_id": f"s-{batch_id}-{i:05d}", "sale_date": rng.choice(days),
             "region": rng.choice(regions), "amount": _cents(rng, 5, 900),
             "batch_id": batch_id}
            for i in range(sales)
        ],
        "expenses": [
            {"expense_id": f"e-{batch_id}-{i:05d}", "expense_date": rng.choice(days),
             # One region never has expenses, so the profit query's outer join matters.
             "region": rng.choice(regions[:-1] if len(regions) > 1 else regions),
             "amount": _cents(rng, 50, 2000), "batch_id": batch_id}
            for i in range(expenses)
        ],
    }


def expected_profit(data: dict[str, list[dict[str, Any]]], batch_id: str) -> list[dict[str, Any]]:
    """Rows of `profit` for one month, ordered by region."""
    revenue: dict[str, Decimal] = defaultdict(Decimal)
    cost: dict[str, Decimal] = defaultdict(Decimal)
    for row in data["sales"]:
        revenue[row["region"]] += row["amount"]
    for row in data["expenses"]:
        cost[row["region"]] += row["amount"]
    month = month_of(batch_id)
    return [
        {"month": month, "region": region, "revenue": revenue[region],
         "expenses": cost[region], "profit": revenue[region] - cost[region]}
        for region in sorted(set(revenue) | set(cost))
    ]


def parquet_bytes(rows: list[dict[str, Any]], columns: list[dict[str, str]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"STRING": pa.string(), "DATE": pa.date32(),
             "NUMERIC": pa.decimal128(*AMOUNT_TYPE)}
    schema = pa.schema(
        [pa.field(c["name"], types[c["type"]], nullable=c.get("mode") != "REQUIRED")
         for c in columns]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_monthly_files(
    target: str | Path | ObjectStore,
    batch_id: str,
    seed: int = 0,
    *,
    bucket: str = "landing",
    files_per_table: int = 2,
    sales: int = 40,
    expenses: int = 12,
    marker: bool = True,
) -> list[dict[str, Any]]:
    """Write `sales/<batch>/part-N.parquet` and `expenses/<batch>/part-N.parquet`
    (then each folder's `_SUCCESS` marker, last) and return the expected profit rows.

    `target` is an object store (objects go to `gs://<bucket>/…`) or a folder
    that stands for the bucket itself.
    """
    data = make_month(batch_id, seed, sales=sales, expenses=expenses)
    columns = {"sales": SALES_COLUMNS, "expenses": EXPENSES_COLUMNS}

    def put(name: str, blob: bytes) -> None:
        if isinstance(target, str | Path):
            path = Path(target) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
        else:
            target.write(f"gs://{bucket}/{name}", blob)

    for kind, rows in data.items():
        n = max(1, files_per_table)
        for part in range(n):
            chunk = rows[part::n]
            put(f"{kind}/{batch_id}/part-{part:03d}.parquet", parquet_bytes(chunk, columns[kind]))
        if marker:
            put(f"{kind}/{batch_id}/_SUCCESS", b"")
    return expected_profit(data, batch_id)
