"""`python -m bench [--quick] [--only NAME ...]`: run, print the table, write the JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.core import FULL, QUICK, REPO, TINY, Context, Metric, Skipped, skipped

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="smaller sizes (about a minute)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these scenarios (repeatable or comma-separated): "
                        f"{', '.join(scenarios.SCENARIOS)}")
    p.add_argument("--backends", default="postgresql,sqlite",
                   help="metadata stores to run on (default: postgresql,sqlite)")
    p.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    p.add_argument("--drop-status-db", action="store_true",
                   help="drop the kept 5M-row status database at the end")
    return p.parse_args(argv)


def selected(only: list[str]) -> list[str]:
    names = [n.strip() for chunk in only for n in chunk.split(",") if n.strip()]
    unknown = [n for n in names if n not in scenarios.SCENARIOS]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; "
                         f"choose from {', '.join(scenarios.SCENARIOS)}")
    return names or list(scenarios.SCENARIOS)


def derived(results: list[Metric]) -> list[Metric]:
    """Ratios of figures measured in this same run."""
    by = {m.name: m for m in results if m.samples}
    out = []
    tp, lim = by.get("throughput_per_s"), by.get("pg_limit_per_s")
    if tp and lim:
        out.append(Metric("throughput_vs_pg_limit", "x",
                          [s / lim.value for s in tp.samples],  # type: ignore[operator]
                          {"throughput": tp.params, "pg_limit_per_s": lim.value,
                           "measured": "each throughput sample / median pg_limit_per_s"},
                          target=">= 0.25"))
    fi, fo = by.get("fan_in_10k_s"), by.get("fan_out_10k_s")
    if fi and fo:
        out.append(Metric("fan_in_vs_fan_out", "x",
                          [s / fo.value for s in fi.samples],  # type: ignore[operator]
                          {"fan_in_10k_s": fi.value, "fan_out_10k_s": fo.value,
                           "measured": "each fan-in wall time / median fan-out wall time"},
                          target="<= 2"))
        si, so = by.get("fan_in_10k_statements"), by.get("fan_out_10k_statements")
        if si and so:
            out.append(Metric("fan_in_vs_fan_out_statements", "x",
                              [s / so.value for s in si.samples],  # type: ignore[operator]
                              {"fan_in": si.value, "fan_out": so.value}))
    return out


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def _note(m: Metric) -> str:
    if m.status != "ok":
        return f"{m.status}: {m.reason}"
    keys = ("workers", "mode", "tasks", "handler", "method", "statements", "statements_per_task",
            "task_log_rows")
    bits = [f"{k}={m.params[k]}" for k in keys if k in m.params]
    if m.params.get("forbidden_loaded"):
        bits.append(f"loaded {','.join(m.params['forbidden_loaded'])}")
    if m.params.get("seq_scan_on_task_log"):
        bits.append("SEQ SCAN on task_log")
    return " ".join(bits)


def print_table(results: list[Metric], elapsed: float, meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bench ({meta['profile']}, {elapsed:.0f} s, load avg at start "
                        f"{meta['loadavg_at_start']})")
    for col, just in (("metric", "left"), ("median", "right"), ("min", "right"),
                      ("max", "right"), ("n", "right"), ("unit", "left"), ("target", "left"),
                      ("", "left"), ("notes", "left")):
        table.add_column(col, justify=just, overflow="fold")  # type: ignore[arg-type]
    for m in results:
        j = m.as_json()
        mark = {True: "[green]met[/]", False: "[red]MISSED[/]", None: ""}[m.met]
        table.add_row(m.name, _fmt(j["median"]), _fmt(j["min"]), _fmt(j["max"]), str(j["n"]),
                      m.unit, m.target or "", mark, _note(m))
    Console(width=200).print(table)


def _meta(profile: str, ctx: Context) -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  timeout=10).stdout.strip()
        except Exception:
            return ""

    pg = None
    try:
        from sqlalchemy import text

        with ctx.admin_engine() as eng, eng.connect() as c:
            pg = c.execute(text("SHOW server_version")).scalar()
    except Exception:
        pass
    return {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "profile": profile,
        "sizes": dataclasses.asdict(ctx.sizes),
        "backends": list(ctx.backends),
        "cpus": os.cpu_count(),
        "loadavg_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": pg,
        "git_commit": sh("git", "rev-parse", "--short", "HEAD"),
        "git_dirty": bool(sh("git", "status", "--porcelain")),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profile = "tiny" if args.tiny else "quick" if args.quick else "full"
    sizes = {"tiny": TINY, "quick": QUICK, "full": FULL}[profile]
    ctx = Context(sizes=sizes, backends=tuple(b.strip() for b in args.backends.split(",")),
                  keep_status_db=not args.drop_status_db and profile == "full")
    names = selected(args.only)
    meta = _meta(profile, ctx)
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        print(f"bench: {name} …", file=sys.stderr, flush=True)
        try:
            got = scenarios.load(name)(ctx)
        except Skipped as exc:
            got = [skipped(name, str(exc))]
        except Exception as exc:
            traceback.print_exc()
            got = [skipped(name, f"{type(exc).__name__}: {exc}".splitlines()[0],
                           status="failed")]
        ctx.results.extend(got)
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"bench: {name} done in {timings[name]:.1f} s", file=sys.stderr, flush=True)
    ctx.results.extend(derived(ctx.results))
    elapsed = time.perf_counter() - t_all
    meta.update(elapsed_s=round(elapsed, 1), scenario_s=timings)
    print_table(ctx.results, elapsed, meta)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(
        {"meta": meta, "metrics": [m.as_json() for m in ctx.results]}, indent=2, default=str)
        + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    missed = [m.name for m in ctx.results if m.met is False]
    if missed:
        print(f"targets missed: {', '.join(missed)}", file=sys.stderr)
    failed = [m.name for m in ctx.results if m.status == "failed"]
    return 1 if failed else 0
