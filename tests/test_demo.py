"""`make demo` (`python -m orchestrator.demo`) on a fresh folder with no environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from orchestrator.examples_data import expected_profit, make_month

BIN = Path(sys.executable).parent
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ["PATH"], "HOME": str(cwd), **env}
    return subprocess.run(args, cwd=cwd, env=base, capture_output=True, text=True, timeout=120)


def test_the_demo_runs_fails_once_recovers_and_reruns_cleanly(tmp_path):
    for _ in range(2):  # a rerun starts from a wiped folder and succeeds again
        demo = _run([sys.executable, "-m", "orchestrator.demo"], tmp_path)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "Traceback" not in demo.stdout + demo.stderr
    out = demo.stdout
    assert out.count("✓ the same figures as computed here from the dropped Parquet files") == 2
    # Why one region has no expenses: the sample data shows off the outer join.
    said = " ".join(out.split())
    assert "west has sales but no expenses" in said and "FULL OUTER JOIN" in said
    # The bad file's error names the missing column (the table wraps long lines).
    assert "UPSTREAM_FAILED" in out and "has no column amount" in " ".join(out.split())
    assert "upstream load_expenses failed with" in out
    assert "demo finished in" in out
    # It ends with the command that opens the same task log in the web UI.
    assert out.strip().splitlines()[-1].strip() == (
        "ORCHESTRATOR_HOME=.orchestrator/demo orchestrator ui")

    home = tmp_path / ".orchestrator" / "demo"
    status = {}
    for batch in ("2024-03", "2024-04"):
        p = _run([str(BIN / "orchestrator"), "status", batch, "--json"], tmp_path,
                 ORCHESTRATOR_HOME=str(home))
        assert p.returncode == 0, p.stderr
        status[batch] = json.loads(p.stdout)
    assert {b: d["status"] for b, d in status.items()} == {"2024-03": "SUCCESS",
                                                           "2024-04": "SUCCESS"}
    april = {t["task"]: t for t in status["2024-04"]["tasks"]}
    assert april["load_expenses"]["attempt"] == 2 and april["load_sales"]["attempt"] == 1

    from orchestrator.adapters.local.warehouse import DuckDBWarehouse

    wh = DuckDBWarehouse(home / "warehouse.duckdb", default_dataset="analytics")
    try:
        for batch, seed in (("2024-03", 1), ("2024-04", 2)):
            want = expected_profit(make_month(batch, seed, sales=2000, expenses=300), batch)
            got = wh.fetch("SELECT region, profit FROM analytics.profit "
                           "WHERE month = CAST(CONCAT(@b, '-01') AS DATE) ORDER BY region",
                           {"b": batch})
            assert [(r["region"], Decimal(str(r["profit"]))) for r in got] == [
                (r["region"], r["profit"]) for r in want]
    finally:
        wh.close()


def _demo_with(tmp_path: Path, prelude: str) -> subprocess.CompletedProcess[str]:
    """The demo, in its own process, after `prelude` changed something it relies on."""
    script = f"import sys\n{prelude}\nimport orchestrator.demo as demo\nsys.exit(demo.main())\n"
    return _run([sys.executable, "-c", script], tmp_path)


@pytest.mark.parametrize("wrong, shows", [
    ("FULL OUTER JOIN", "JOIN"),  # an inner join drops the region without expenses
    ("COALESCE(r.revenue, 0) - COALESCE(c.expenses, 0) AS profit",
     "COALESCE(r.revenue, 0) + COALESCE(c.expenses, 0) AS profit"),
])
def test_the_demo_check_catches_a_wrong_profit(tmp_path, wrong, shows):
    examples = tmp_path / "examples"
    shutil.copytree(EXAMPLES, examples)
    sql = examples / "sql" / "calculate_profit.sql"
    assert wrong in sql.read_text()
    sql.write_text(sql.read_text().replace(wrong, shows))
    demo = _demo_with(tmp_path, f"import orchestrator.demo\n"
                                f"from pathlib import Path\n"
                                f"orchestrator.demo.EXAMPLES = Path({str(examples)!r})")
    assert demo.returncode == 1, demo.stdout + demo.stderr
    assert "✗ the profit rows differ from the figures computed from the dropped Parquet" in (
        demo.stdout)
    assert "demo failed" in demo.stdout


def test_the_demo_check_does_not_use_the_generators_own_figures(tmp_path):
    # The generator's expected rows, made wrong: the check must not notice, since it
    # computes its figures from the Parquet files that landed.
    demo = _demo_with(tmp_path, "import orchestrator.examples_data as data\n"
                                "real = data.expected_profit\n"
                                "data.expected_profit = lambda rows, b: [\n"
                                "    dict(r, profit=r['profit'] + 1) for r in real(rows, b)]")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert demo.stdout.count("✓ the same figures as computed here from the dropped") == 2
