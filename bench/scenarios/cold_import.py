"""Cold start of the Cloud Function: importing the entry module in a fresh process."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections import defaultdict

from bench.core import REPO, Context, Metric, skipped

ENTRY = "functions.main"
# Modules the entry point must not pull in at import time (the Design's cold-start rule).
FORBIDDEN = ("google.cloud.bigquery", "pyarrow", "pandas")
WATCH = (*FORBIDDEN, "google.cloud.pubsub", "google.cloud.storage", "grpc", "duckdb",
         "sqlglot", "sqlalchemy", "pydantic", "alembic", "psycopg2", "functions_framework",
         "flask", "yaml", "typer", "rich")


def _one_run() -> tuple[float, float, dict[str, int]]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {ENTRY}"],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    wall = (time.perf_counter() - t0) * 1000
    if res.returncode != 0:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr else "import failed")
    # "import time: self [us] | cumulative | imported package", nested by indentation.
    cumulative: dict[str, int] = {}
    for line in res.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, _self_us, cum_us, name = _split(line)
        cumulative[name] = int(cum_us)
    entry = cumulative.get(ENTRY)
    if entry is None:
        raise RuntimeError(f"{ENTRY} not in -X importtime output")
    return entry / 1000, wall, cumulative


def _split(line: str) -> tuple[str, str, str, str]:
    head, cum, name = line.split("|")
    return "", head.split(":")[1].strip(), cum.strip(), name.strip()


def cold_import(ctx: Context) -> list[Metric]:
    if not (REPO / "functions" / "main.py").exists():
        return [skipped("cold_import_ms", "functions/main.py is not there yet", "ms", "<= 200")]
    z = ctx.sizes
    # One unmeasured run, so that every measured run finds compiled bytecode on disk.
    if z.cold_runs > 1:
        subprocess.run([sys.executable, "-c", f"import {ENTRY}"], cwd=REPO, capture_output=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    try:
        runs = [_one_run() for _ in range(z.cold_runs)]
    except RuntimeError as exc:
        return [skipped("cold_import_ms", f"import {ENTRY} failed: {exc}", "ms", "<= 200",
                        status="failed")]
    last = runs[-1][2]
    # Heaviest top-level packages by cumulative import time (median over the runs).
    by_top: dict[str, list[int]] = defaultdict(list)
    for _, _, cum in runs:
        tops: dict[str, int] = {}
        for name, us in cum.items():
            top = name.split(".")[0]
            if name == top or name.startswith("google.cloud."):
                key = ".".join(name.split(".")[:3]) if name.startswith("google.cloud.") else top
                tops[key] = max(tops.get(key, 0), us)
        for k, us in tops.items():
            by_top[k].append(us)
    heavy = sorted(((k, statistics.median(v) / 1000) for k, v in by_top.items()),
                   key=lambda kv: -kv[1])[:12]
    loaded_forbidden = sorted(m for m in FORBIDDEN if any(n == m or n.startswith(m + ".")
                                                         for n in last))
    watched = sorted(m for m in WATCH if any(n == m or n.startswith(m + ".") for n in last))
    params = {"runs": z.cold_runs, "python": sys.version.split()[0],
              "heavy_modules_ms": {k: round(v, 1) for k, v in heavy},
              "forbidden_loaded": loaded_forbidden, "watched_loaded": watched,
              "modules_imported": len(last)}
    return [
        Metric("cold_import_ms", "ms", [r[0] for r in runs],
               {**params, "measured": f"-X importtime cumulative time of {ENTRY}"},
               target="<= 200"),
        Metric("cold_import_process_ms", "ms", [r[1] for r in runs],
               {**params, "measured": "whole interpreter process, start to exit"}),
        Metric("cold_import_forbidden_modules", "modules", [float(len(loaded_forbidden))],
               {"forbidden": list(FORBIDDEN), "loaded": loaded_forbidden}, target="<= 0"),
    ]
