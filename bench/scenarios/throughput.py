"""Completions per second of independent no-op tasks, against the rate of committed
single-row UPDATEs the same server sustains (the physical limit of a durable log)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.core import BenchRuntime, Context, Metric, Skipped, pipeline, repeat, skipped, suffix

LIMIT_CLIENTS = 4


def pg_limit(ctx: Context) -> list[Metric]:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    z = ctx.sizes
    try:
        ctx.require_postgres()
    except Skipped as exc:
        return [skipped("pg_limit_per_s", str(exc), "1/s")]
    out: list[Metric] = []
    name = f"bench_pglimit_{int(time.time())}"
    url = ctx.create_database(name)
    try:
        from sqlalchemy import create_engine

        eng = create_engine(url, isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text("CREATE TABLE limit_rows (id int PRIMARY KEY, v bigint NOT NULL)"))
            c.execute(text("INSERT INTO limit_rows SELECT g, 0 FROM generate_series(0, :n) g"),
                      {"n": LIMIT_CLIENTS})
            durability = {k: c.execute(text(f"SHOW {k}")).scalar() for k in
                          ("fsync", "synchronous_commit", "wal_sync_method", "full_page_writes")}
        eng.dispose()
        params = {"clients": LIMIT_CLIENTS, "seconds": z.pg_limit_s,
                  "statement": "UPDATE limit_rows SET v = v + 1 WHERE id = <client>",
                  **durability}
        pgbench = shutil.which("pgbench")
        loop = repeat(lambda _i: _psycopg2_rate(url, z.pg_limit_s), z.repeats)
        loop_metric = Metric("pg_limit_psycopg2_per_s", "1/s", loop,
                             {**params, "method": "psycopg2, one thread per connection"})
        if pgbench:
            u = make_url(url)
            rates = repeat(lambda _i: _pgbench_rate(pgbench, u, z.pg_limit_s), z.repeats)
            out.append(Metric("pg_limit_per_s", "1/s", rates, {**params, "method": "pgbench"}))
            out.append(loop_metric)
        else:
            loop_metric.name = "pg_limit_per_s"
            out.append(loop_metric)
    finally:
        ctx.drop_database(name)
    return out


def _pgbench_rate(pgbench: str, u: Any, seconds: float) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write("UPDATE limit_rows SET v = v + 1 WHERE id = :client_id;\n")
        script = f.name
    cmd = [pgbench, "-n", "-c", str(LIMIT_CLIENTS), "-j", str(LIMIT_CLIENTS),
           "-T", str(max(1, round(seconds))), "-f", script,
           "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432), "-U", u.username or "postgres",
           u.database]
    env = None
    if u.password:
        import os

        env = {**os.environ, "PGPASSWORD": u.password}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=120)
    finally:
        Path(script).unlink(missing_ok=True)
    m = re.search(r"tps = ([\d.]+) \(without initial connection time\)", res.stdout)
    if not m:
        raise RuntimeError(f"cannot read pgbench output: {res.stdout[-400:]}")
    return float(m.group(1))


def _psycopg2_rate(url: str, seconds: float) -> float:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    dsn = dict(host=u.host, port=u.port or 5432, user=u.username, password=u.password,
               dbname=u.database)
    conns = [psycopg2.connect(**{k: v for k, v in dsn.items() if v is not None})
             for _ in range(LIMIT_CLIENTS)]
    counts = [0] * LIMIT_CLIENTS
    start = threading.Barrier(LIMIT_CLIENTS + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        cur = conns[i].cursor()
        start.wait()
        n = 0
        while time.perf_counter() < stop_at[0]:
            cur.execute("UPDATE limit_rows SET v = v + 1 WHERE id = %s", (i,))
            conns[i].commit()
            n += 1
        counts[i] = n

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(LIMIT_CLIENTS)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    for c in conns:
        c.close()
    return sum(counts) / elapsed


def throughput(ctx: Context) -> list[Metric]:
    z = ctx.sizes
    out: list[Metric] = []
    for backend in ctx.backends:
        sfx = suffix(backend)
        window = z.throughput_window_s if backend == "postgresql" else z.throughput_window_sqlite_s
        # Worker processes are the headline on PostgreSQL, threads beside them; SQLite
        # has one writer and runs threads only.
        modes = ("processes", "threads") if backend == "postgresql" else ("threads",)
        try:
            for mode in modes:
                best = 0.0
                for workers in z.throughput_workers:
                    # Enough tasks that the queue never runs dry inside the window.
                    guess = max(best * 2.5, 150.0 * workers if not best else 0)
                    n_tasks = int(min(60_000, max(200, guess * window)))
                    with ctx.scratch_url(backend, f"tput{workers}") as url:
                        rates, params = _throughput_run(url, workers, n_tasks, window,
                                                        processes=mode == "processes")
                    best = max(best, max(rates, default=0.0))
                    tag = "_threads" if mode == "threads" and backend == "postgresql" else ""
                    name = f"throughput{tag}_per_s{'' if workers == 4 else f'_w{workers}'}{sfx}"
                    out.append(Metric(name, "1/s", rates, {"backend": backend, "mode": mode,
                                                           "workers": workers, **params}))
        except Skipped as exc:
            out.append(skipped(f"throughput_per_s{sfx}", str(exc), "1/s"))
    return out


def _throughput_run(url: str, workers: int, n_tasks: int, window: float, *,
                    processes: bool = False) -> tuple[list[float], dict[str, Any]]:
    from sqlalchemy import text

    from orchestrator.db.types import UTCDateTime  # noqa: F401 - the column type parses timestamps

    parents: dict[str, list[str]] = {f"t{i}": [] for i in range(n_tasks)}
    with BenchRuntime(url, workers, processes=processes) as br:
        br.rt.sync_specs([pipeline("independent", parents)])
        t_start = time.perf_counter()
        br.rt.start_batch("independent", "tput")
        started_s = time.perf_counter() - t_start
        br.statements.reset()
        time.sleep(window)
        statements = br.statements.reset()
        with br.rt.db.connect() as c:
            rows = c.execute(text(
                "SELECT l.finished_at FROM task_log l JOIN batches b ON b.id = l.batch_pk "
                "WHERE b.batch_id = 'tput' AND l.status = 'SUCCESS'")).scalars().all()
    from datetime import datetime

    ts = sorted((datetime.fromisoformat(r) if isinstance(r, str) else r).timestamp() for r in rows)
    if len(ts) < 2:
        raise RuntimeError(f"only {len(ts)} task(s) finished in {window:g}s")
    # Steady state only: skip the first moments (connections, caches) and bin the rest.
    first, last = ts[0], ts[-1]
    warm = min(0.5, (last - first) * 0.1)
    span = last - first - warm
    bin_s = min(2.0, max(0.2, span / 10))
    nbins = max(1, int(span // bin_s))
    counts = [0] * nbins
    for t in ts:
        k = int((t - first - warm) // bin_s)
        if 0 <= k < nbins:
            counts[k] += 1
    rates = [c / bin_s for c in counts]
    params = {"tasks_in_batch": n_tasks, "completed": len(ts), "window_s": window,
              "bin_s": round(bin_s, 3), "start_batch_s": round(started_s, 3),
              "drained_early": len(ts) == n_tasks,
              **({} if processes else {
                  # Every statement sent in the window, over the tasks that finished in it.
                  "statements_per_task": round(statements / max(1, len(ts)), 2)}),
              "mean_rate_per_s": round((len(ts) - 1) / (last - first), 1)}
    return rates, params
