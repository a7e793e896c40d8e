"""Wide DAGs: a 10,000-child fan-out, a 10,000-parent fan-in, and 1 -> 1,000 -> 1.

Fan-in and fan-out run the same number of tasks; if promotion re-read every
parent, the fan-in would cost quadratically more than the fan-out. The ratio of
their wall times and of their statements shows which it is.
"""

from __future__ import annotations

from bench.core import BenchRuntime, Context, Metric, Skipped, pipeline, repeat, skipped, suffix

FAN_WORKERS = 4

def _fan(ctx: Context, metric: str, parents: dict[str, list[str]], backends: tuple[str, ...],
         target: str | None, shape: str, *, processes: bool = False) -> list[Metric]:
    """With `processes`, the headline runs worker processes (PostgreSQL) and the same
    scenario on threads is reported beside it, as `<metric>_threads`."""
    z = ctx.sizes
    out: list[Metric] = []
    runs = [(b, p) for b in backends
            for p in ((True, False) if processes and b == "postgresql" else (False,))]
    for backend, procs in runs:
        sfx = suffix(backend)
        threads_beside = processes and backend == "postgresql" and not procs
        name = metric.replace("_s", "_threads_s", 1) if threads_beside else metric
        try:
            with ctx.scratch_url(backend, metric.split("_s")[0]) as url, \
                    BenchRuntime(url, FAN_WORKERS, processes=procs) as br:
                br.rt.sync_specs([pipeline("fan", parents)])
                statements: list[float] = []

                def once(i: int, br: BenchRuntime = br, statements: list[float] = statements) -> float:
                    br.statements.reset()
                    wall = br.run_batch("fan", f"r{i}", timeout=z.fan_timeout_s)
                    statements.append(br.statements.reset())
                    return wall

                walls = repeat(once, z.repeats, budget_s=z.fan_budget_s)
                params = {"backend": backend, "tasks": len(parents), "shape": shape,
                          "workers": FAN_WORKERS,
                          "mode": "processes" if procs else "threads"}
                out.append(Metric(f"{name}{sfx}", "s", walls, params,
                                  target=target if not sfx and not threads_beside else None))
                if not procs:  # the counter sees this process's statements only
                    base = metric.removesuffix("_s")
                    out.append(Metric(f"{base}_statements{sfx}", "statements", statements,
                                      params))
                    out.append(Metric(f"{base}_statements_per_task{sfx}", "statements",
                                      [s / len(parents) for s in statements], params))
        except Skipped as exc:
            out.append(skipped(f"{name}{sfx}", str(exc), "s"))
        except TimeoutError as exc:
            out.append(skipped(f"{name}{sfx}", str(exc), "s", target, status="failed"))
    return out

def fan_out_10k(ctx: Context) -> list[Metric]:
    n = ctx.sizes.fan_10k
    parents = {"root": [], **{f"c{i}": ["root"] for i in range(n)}}
    # Postgres only: these are about the engine's statement count, and SQLite's single
    # writer would only make them slower without telling anything new.
    return _fan(ctx, "fan_out_10k_s", parents, ("postgresql",), None, f"1 -> {n}")

def fan_in_10k(ctx: Context) -> list[Metric]:
    n = ctx.sizes.fan_10k
    parents = {**{f"p{i}": [] for i in range(n)}, "child": [f"p{i}" for i in range(n)]}
    return _fan(ctx, "fan_in_10k_s", parents, ("postgresql",), None, f"{n} -> 1")

def fanout_fanin_1000(ctx: Context) -> list[Metric]:
    n = ctx.sizes.fan_1000
    parents = {"root": [], **{f"c{i}": ["root"] for i in range(n)},
               "end": [f"c{i}" for i in range(n)]}
    return _fan(ctx, "fanout_fanin_1000_s", parents, ctx.backends, "<= 1.0", f"1 -> {n} -> 1",
                processes=True)
