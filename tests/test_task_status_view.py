"""The `batch_task_status` view agrees with `orchestrator status --json`, for the demo's
pipeline run for real (a good month, a bad file, its retry), on PostgreSQL and SQLite."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from orchestrator.db.session import make_engine
from orchestrator.errors import PermanentError
from orchestrator.examples_data import (
    EXPENSES_COLUMNS,
    make_month,
    parquet_bytes,
    write_monthly_files,
)
from tests.test_cli import EXAMPLE, clean_env, cli, drop_month, status_json

__all__ = ["clean_env"]


@pytest.fixture(params=["postgresql", "sqlite"])
def metadata_url(request: pytest.FixtureRequest, tmp_path: Path,
                 monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "postgresql":
        request.getfixturevalue("pg_engine")  # emptied, caches reset
        url: str = request.getfixturevalue("pg_url")
        monkeypatch.setenv("DATABASE_URL", url)
        return url
    return f"sqlite:///{tmp_path / '.orchestrator' / 'metadata.db'}"


def _time(value: Any) -> datetime | None:
    if value is None:
        return None
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _view(url: str, batch_id: str) -> list[dict[str, Any]]:
    engine = make_engine(url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(text(
                "SELECT * FROM batch_task_status WHERE batch_id = :b ORDER BY task"),
                {"b": batch_id}).mappings()]
    finally:
        engine.dispose()


def _run_the_demo_months(folder: Path) -> None:
    cli("pipelines", "sync", str(EXAMPLE))
    write_monthly_files(folder / "in", "2024-03", seed=1, sales=200, expenses=30)
    drop_month(folder / "in", "2024-03")
    bad = folder / "bad"
    write_monthly_files(bad, "2024-04", seed=2, sales=200, expenses=30, files_per_table=1)
    rows = make_month("2024-04", 2, sales=200, expenses=30)["expenses"]
    cols = [c for c in EXPENSES_COLUMNS if c["name"] != "amount"]
    (bad / "expenses/2024-04/part-000.parquet").write_bytes(
        parquet_bytes([{k: v for k, v in r.items() if k != "amount"} for r in rows], cols))
    drop_month(bad, "2024-04", last_code=3)
    assert status_json("2024-04")["status"] == "FAILED"
    write_monthly_files(bad, "2024-04", seed=2, sales=200, expenses=30, files_per_table=1,
                        marker=False)
    cli("drop", str(bad / "expenses/2024-04/part-000.parquet"),
        "gs://landing/expenses/2024-04/part-000.parquet")
    cli("batch", "retry", "2024-04")


def _agree(doc: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    assert sorted(t["task"] for t in doc["tasks"]) == [r["task"] for r in rows]
    by_task = {t["task"]: t for t in doc["tasks"]}
    for row in rows:
        t = by_task[row["task"]]
        assert (row["pipeline"], row["version"], row["batch_id"], row["batch_status"]) == (
            doc["pipeline"], 1, doc["batch_id"], doc["status"])
        assert row["map_index"] is None
        assert (row["status"], row["attempt"], row["max_attempts"]) == (
            t["status"], t["attempt"], t["max_attempts"]), row
        for col in ("queued_at", "started_at", "finished_at"):
            assert _time(row[col]) == _time(t[col]), (col, row, t)
        if t["duration_s"] is None:
            assert row["duration_s"] is None
        else:  # SQLite's julianday() reads times to the millisecond
            assert abs(float(row["duration_s"]) - t["duration_s"]) <= 0.002, (row, t)
        want = t["error"].split("\n")[0] if t["error"] is not None else None
        assert row["error_line"] == want, (row, t)


def test_the_view_and_status_json_agree_on_the_demo_batches(tmp_path, metadata_url):
    _run_the_demo_months(tmp_path)
    for batch_id in ("2024-03", "2024-04"):
        doc = status_json(batch_id)
        assert doc["status"] == "SUCCESS"
        _agree(doc, _view(metadata_url, batch_id))
    april = {r["task"]: r for r in _view(metadata_url, "2024-04")}
    assert april["load_expenses"]["attempt"] == 2 and april["load_sales"]["attempt"] == 1


def test_the_view_shows_a_failed_task_with_its_error_first_line(tmp_path, metadata_url):
    cli("pipelines", "sync", str(EXAMPLE))
    bad = tmp_path / "bad"
    write_monthly_files(bad, "2024-04", seed=2, sales=50, expenses=10, files_per_table=1)
    rows = make_month("2024-04", 2, sales=50, expenses=10)["expenses"]
    cols = [c for c in EXPENSES_COLUMNS if c["name"] != "amount"]
    (bad / "expenses/2024-04/part-000.parquet").write_bytes(
        parquet_bytes([{k: v for k, v in r.items() if k != "amount"} for r in rows], cols))
    drop_month(bad, "2024-04", last_code=3)
    doc = status_json("2024-04")
    assert doc["status"] == "FAILED"
    view = _view(metadata_url, "2024-04")
    _agree(doc, view)
    by_task = {r["task"]: r for r in view}
    assert by_task["load_expenses"]["status"] == "ERROR"
    assert "has no column amount" in by_task["load_expenses"]["error_line"]
    assert by_task["calculate_profit"]["status"] == "UPSTREAM_FAILED"


def two_lines(ctx: Any) -> dict[str, Any]:
    raise PermanentError("the first line\nand the second")


def test_the_view_keeps_the_first_line_of_an_error(tmp_path, metadata_url):
    (tmp_path / "two.yaml").write_text(
        "name: two\ntasks:\n  - name: says\n    handler: python\n"
        "    config: {callable: \"tests.test_task_status_view:two_lines\"}\n")
    cli("pipelines", "sync", str(tmp_path / "two.yaml"))
    cli("batch", "start", "two", "t1", code=3)
    doc = status_json("t1")
    assert "\n" in doc["tasks"][0]["error"]
    (row,) = _view(metadata_url, "t1")
    _agree(doc, [row])
    assert row["error_line"].endswith("the first line")


def _readme_queries() -> list[str]:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Querying the task log in SQL", 1)[1]
    block = section.split("```sql", 1)[1].split("```", 1)[0]
    return [q.strip() for q in block.split(";") if q.strip()]


def test_the_readme_queries_run_on_the_view(tmp_path, metadata_url):
    cli("pipelines", "sync", str(EXAMPLE))
    bad = tmp_path / "bad"
    write_monthly_files(bad, "2024-04", seed=2, sales=50, expenses=10)
    (bad / "expenses/2024-04/part-000.parquet").write_bytes(b"not parquet")
    drop_month(bad, "2024-04", last_code=3)
    queries = _readme_queries()
    assert len(queries) == 2
    engine = make_engine(metadata_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            failures = conn.execute(text(queries[0])).mappings().all()
            slowest = conn.execute(text(queries[1])).mappings().all()
    finally:
        engine.dispose()
    assert [(r["batch_id"], r["task"]) for r in failures] == [("2024-04", "load_expenses")]
    assert [r["task"] for r in slowest] == ["load_sales"]


REBUILD = '''
import sqlalchemy as sa
from alembic import op

revision = "9999"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table("task_log", recreate="always") as batch_op:
        batch_op.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade():
    with op.batch_alter_table("task_log", recreate="always") as batch_op:
        batch_op.drop_column("note")
'''


def test_a_later_migration_that_rebuilds_a_table_the_view_reads_runs_on_sqlite(tmp_path):
    from alembic import command
    from alembic.config import Config

    from orchestrator.db.migrate import MIGRATIONS_DIR, head_revision

    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "9999_rebuild_task_log.py").write_text(
        REBUILD.replace("{head}", head_revision()))
    cfg = Config()
    cfg.set_main_option("script_location", str(scripts))
    engine = make_engine(f"sqlite:///{tmp_path / 'later.db'}")
    try:
        for step in (lambda: command.upgrade(cfg, "head"),
                     lambda: command.downgrade(cfg, head_revision())):
            with engine.connect() as conn:
                cfg.attributes["connection"] = conn
                step()
            with engine.connect() as conn:
                assert conn.execute(text("SELECT COUNT(*) FROM batch_task_status")).scalar() == 0
    finally:
        engine.dispose()
