"""The benchmark code itself keeps working: every scenario at a tiny size, no timings checked."""

from __future__ import annotations

import json
from pathlib import Path

from bench import scenarios
from bench.cli import main

HEADLINE = ("chain40_total_s_sqlite", "hop_overhead_ms_sqlite", "fanout_fanin_1000_s_sqlite",
            "pg_limit_per_s", "fan_in_10k_s", "fan_out_10k_s", "fan_in_vs_fan_out",
            "status_10k_ms", "ui_batch_10k_ms", "cold_import_ms", "cold_first_ack_ms",
            "parquet_load_ratio")


def test_every_scenario_runs_at_a_tiny_size_and_writes_its_metrics(tmp_path: Path) -> None:
    out = tmp_path / "latest.json"
    # SQLite for the runtime scenarios keeps this fast; pg_limit, the fans and status_10k
    # still go to the test server.
    code = main(["--tiny", "--backends", "sqlite", "--output", str(out)])
    report = json.loads(out.read_text())
    metrics = {m["name"]: m for m in report["metrics"]}
    failed = {n: m["reason"] for n, m in metrics.items() if m["status"] == "failed"}
    assert not failed
    assert code == 0
    assert set(scenarios.SCENARIOS) == set(report["meta"]["scenario_s"])
    for name in HEADLINE:
        assert name in metrics, name
    for m in metrics.values():
        assert {"name", "value", "unit", "params", "median", "min", "max", "n"} <= set(m)
        if m["status"] == "ok":
            assert m["n"] >= 1 and m["min"] <= m["median"] <= m["max"]
