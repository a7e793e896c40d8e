"""Sequential chains: total wall time with real work, and the hop latency of no-ops."""

from __future__ import annotations

import importlib.util
import statistics
from typing import Any

from bench.core import (
    BenchRuntime,
    Context,
    Metric,
    Skipped,
    chain_parents,
    percentile,
    pipeline,
    repeat,
    skipped,
    suffix,
)

CHAIN_WORKERS = 4


def chain40(ctx: Context) -> list[Metric]:
    z = ctx.sizes
    out: list[Metric] = []
    variants: list[tuple[str, dict[str, Any]]] = [
        ("noop", {"handler": "noop", "config": {"seconds": z.chain_sleep_s}}),
    ]
    if importlib.util.find_spec("orchestrator.handlers.python") is not None:
        variants.append(("python", {"handler": "python", "config": {
            "callable": "bench.work:sleep", "kwargs": {"seconds": z.chain_sleep_s}}}))
    work_s = z.chain_len * z.chain_sleep_s
    for backend in ctx.backends:
        sfx = suffix(backend)
        try:
            with ctx.scratch_url(backend, "chain40") as url, \
                    BenchRuntime(url, CHAIN_WORKERS) as br:
                for handler, fields in variants:
                    name = f"chain_{handler}"
                    br.rt.sync_specs([pipeline(name, chain_parents(z.chain_len),
                                               lambda _t, f=fields: f)])
                    # One unmeasured batch: first-use costs (handler import, statement
                    # compilation caches) are cold start, not per-hop overhead.
                    br.run_batch(name, "warmup", timeout=60)
                    per_task: list[float] = []

                    def once(i: int, n: str = name, br: BenchRuntime = br,
                             per_task: list[float] = per_task) -> float:
                        br.statements.reset()
                        wall = br.run_batch(n, f"r{i}", timeout=120)
                        per_task.append(br.statements.reset() / z.chain_len)
                        return wall

                    totals = repeat(once, z.repeats)
                    params = {"backend": backend, "tasks": z.chain_len, "handler": handler,
                              "task_sleep_s": z.chain_sleep_s, "workers": CHAIN_WORKERS,
                              "statements_per_task": round(statistics.median(per_task), 2)}
                    hname = "" if handler == "noop" else "_python"
                    out.append(Metric(f"chain40{hname}_total_s{sfx}", "s", totals, params,
                                      target="<= 0.45" if not sfx and not hname else None))
                    out.append(Metric(
                        f"chain40{hname}_hop_overhead_ms{sfx}", "ms",
                        [(t - work_s) / z.chain_len * 1000 for t in totals], params))
        except Skipped as exc:
            out.append(skipped(f"chain40_total_s{sfx}", str(exc), "s"))
    return out


def noop_chain(ctx: Context) -> list[Metric]:
    from sqlalchemy import text

    z = ctx.sizes
    out: list[Metric] = []
    for backend in ctx.backends:
        sfx = suffix(backend)
        try:
            with ctx.scratch_url(backend, "noopchain") as url, \
                    BenchRuntime(url, CHAIN_WORKERS) as br:
                br.rt.sync_specs([pipeline(
                    "noop_chain", chain_parents(z.noop_chain_len),
                    lambda _t: {"handler": "python", "config": {"callable": "bench.work:stamp"}})])
                br.run_batch("noop_chain", "warmup", timeout=60)
                medians, p95s, per_task = [], [], []

                statements: list[float] = []

                def once(i: int, br: BenchRuntime = br, per_task: list[float] = per_task,
                         medians: list[float] = medians, p95s: list[float] = p95s,
                         statements: list[float] = statements) -> None:
                    bid = f"r{i}"
                    br.statements.reset()
                    total = br.run_batch("noop_chain", bid, timeout=120)
                    statements.append(br.statements.reset() / z.noop_chain_len)
                    per_task.append(total / z.noop_chain_len * 1000)
                    with br.rt.db.connect() as c:
                        hops = _hops(c, text, bid)
                    medians.append(percentile(hops, 0.5))
                    p95s.append(percentile(hops, 0.95))

                repeat(once, z.repeats)
                params = {"backend": backend, "tasks": z.noop_chain_len,
                          "workers": CHAIN_WORKERS,
                          "statements_per_task": round(statistics.median(statements), 2),
                          "measured": "child handler start minus parent handler end"}
                out.append(Metric(f"hop_overhead_ms{sfx}", "ms", medians,
                                  {**params, "statistic": "median hop per run"},
                                  target="<= 2" if not sfx else None))
                out.append(Metric(f"hop_latency_p95_ms{sfx}", "ms", p95s,
                                  {**params, "statistic": "p95 hop per run"}))
                out.append(Metric(f"noop_chain_per_task_ms{sfx}", "ms", per_task,
                                  {**params, "measured": "batch wall time / tasks"}))
        except Skipped as exc:
            out.append(skipped(f"hop_overhead_ms{sfx}", str(exc), "ms"))
    return out


def _hops(conn: Any, text: Any, batch_id: str) -> list[float]:
    """Per edge: when the child's handler started minus when the parent's returned.

    Timestamps come from the handlers themselves (`bench.work:stamp`), so the hop
    covers the parent's SUCCESS commit, the child's claim and the dispatch between,
    whether the child was published or claimed by the same worker in that commit.
    """
    outputs = dict(conn.execute(text("""
        SELECT l.task_id, l.output FROM task_log l JOIN batches b ON b.id = l.batch_pk
        WHERE b.batch_id = :b AND l.map_index = -1
    """), {"b": batch_id}).all())
    edges = conn.execute(text("""
        SELECT d.parent_task_id, d.child_task_id
        FROM task_dependencies d JOIN task_log l ON l.task_id = d.child_task_id
        JOIN batches b ON b.id = l.batch_pk WHERE b.batch_id = :b
    """), {"b": batch_id}).all()

    def stamp(task_id: int, key: str) -> float | None:
        out = outputs.get(task_id)
        if isinstance(out, str):
            import json

            out = json.loads(out)
        return out.get(key) if isinstance(out, dict) else None

    hops = []
    for p, c in edges:
        ended, started = stamp(p, "ended"), stamp(c, "started")
        if ended is not None and started is not None:
            hops.append((started - ended) * 1000)
    if not hops:
        raise RuntimeError(f"no hops found in task_log for batch {batch_id}")
    return hops


def _as_dt(value: Any) -> Any:
    # SQLite returns the stored text through a raw text() query.
    if isinstance(value, str):
        from datetime import datetime

        return datetime.fromisoformat(value)
    return value
