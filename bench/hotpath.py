"""`python -m bench.hotpath [--tasks N] [--workers W]`: where one task's time goes.

Runs one batch of N independent no-op tasks through the embedded runtime on a scratch
PostgreSQL database and prints, per task: the wall time, the statements and round
trips sent, this process's CPU (router, engine, SQLAlchemy, driver), the server's CPU
(its backends, read from /proc when the server runs on this machine), and the floor
those round trips and commits set on this server: a `SELECT 1` round trip and a
committed single-row UPDATE, each timed alone from one connection.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

from bench.core import QUICK, BenchRuntime, Context, pipeline


def _rtt_and_commit_ms(url: str, n: int = 300) -> tuple[float, float]:
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    conn = psycopg2.connect(host=u.host, port=u.port or 5432, user=u.username,
                            password=u.password, dbname=u.database)
    conn.autocommit = True
    cur = conn.cursor()
    cur.execute("CREATE TABLE IF NOT EXISTS hotpath_floor (id int PRIMARY KEY, v bigint)")
    cur.execute("INSERT INTO hotpath_floor VALUES (1, 0) ON CONFLICT DO NOTHING")
    rtt, commit = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        cur.execute("SELECT 1")
        cur.fetchall()
        rtt.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        cur.execute("UPDATE hotpath_floor SET v = v + 1 WHERE id = 1")
        commit.append(time.perf_counter() - t0)
    cur.execute("DROP TABLE hotpath_floor")
    conn.close()
    return statistics.median(rtt) * 1000, statistics.median(commit) * 1000


def _server_cpu_s(pids: list[int]) -> float | None:
    """User + system CPU seconds of these server processes (None: not on this machine)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _backend_pids(br: BenchRuntime) -> list[int]:
    from sqlalchemy import text

    with br.rt.db.connect() as c:
        return [int(p) for p in c.execute(text(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")).scalars()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    ctx = Context(sizes=QUICK, backends=("postgresql",))
    with ctx.scratch_url("postgresql", "hotpath") as url:
        rtt_ms, commit_ms = _rtt_and_commit_ms(url)
        with BenchRuntime(url, args.workers) as br:
            br.rt.sync_specs([pipeline("independent",
                                       {f"t{i}": [] for i in range(args.tasks)})])
            br.run_batch("independent", "warmup", timeout=600)
            trips = _RoundTrips(br.rt.db)
            br.statements.reset()
            cpu0, pids = time.process_time(), _backend_pids(br)
            server0 = _server_cpu_s(pids)
            wall = br.run_batch("independent", "measured", timeout=600)
            cpu = time.process_time() - cpu0
            server1 = _server_cpu_s(pids)
            statements = br.statements.reset()
    n = args.tasks
    per = {
        "wall_ms": wall / n * 1000,
        "statements": statements / n,
        "round_trips": trips.count / n,
        "commits": trips.commits / n,
        "client_cpu_ms": cpu / n * 1000,
        "server_cpu_ms": (server1 - server0) / n * 1000
        if server0 is not None and server1 is not None else None,
    }
    floor = per["round_trips"] * rtt_ms + per["commits"] * max(0.0, commit_ms - rtt_ms)
    print(f"{n} independent no-op tasks, {args.workers} worker(s), load average "
          f"{os.getloadavg()[0]:.2f}; per task:")
    for k, v in per.items():
        print(f"  {k:<16} {'-' if v is None else f'{v:.3f}'}")
    print(f"  one round trip  {rtt_ms:.3f} ms (SELECT 1); one commit {commit_ms:.3f} ms "
          f"(single-row UPDATE, fsync)")
    print(f"  floor           {floor:.3f} ms = round trips x round trip + commits x "
          f"(commit - round trip), on one connection")
    return 0


class _RoundTrips:
    """Queries sent to the server: each cursor execute (several statements in one query
    count once), and which of them commit."""

    def __init__(self, engine: Any):
        from sqlalchemy import event

        self.count = 0
        self.commits = 0
        event.listen(engine, "after_cursor_execute", self._on_execute)
        event.listen(engine, "commit", self._on_commit)

    def _on_execute(self, conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.count += 1
        head = statement.lstrip().upper()
        if head.startswith("COMMIT"):
            self.commits += 1
        elif _autocommit(conn) and not head.startswith(("BEGIN", "SELECT")):
            self.commits += 1  # on an autocommit connection, a statement is a transaction

    def _on_commit(self, conn: Any) -> None:
        if not _autocommit(conn):
            self.count += 2  # psycopg2's BEGIN and COMMIT
            self.commits += 1


def _autocommit(conn: Any) -> bool:
    return bool(conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT")


if __name__ == "__main__":
    raise SystemExit(main())
