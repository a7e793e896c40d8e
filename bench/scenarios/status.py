"""The status of one 10,000-task batch in a task log of millions of rows.

The rows are made with set-based SQL (generate_series), not through the engine,
with the secondary indexes dropped during the fill and rebuilt afterwards, exactly
as the migration defines them. The database is kept between runs (named by its
size and schema revision) and reused when its row count and schema revision still match.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any

from bench.core import Context, Metric, Skipped, skipped

GENERATOR_VERSION = "2"  # 2: events for the batch in flight (the UI reads them)


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from orchestrator.db.migrate import alembic_config

    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def _db_name(rows: int, revision: str) -> str:
    """Named by its size and schema revision: a checkout at another revision keeps a
    database of its own instead of rebuilding this one."""
    size = f"{rows // 1_000_000}m" if rows >= 1_000_000 else str(rows)
    return f"bench_status_{size}_r{revision}"


def _fresh_enough(ctx: Context, name: str, rows: int, tasks: int, revision: str) -> bool:
    from sqlalchemy import create_engine, text

    if not ctx.database_exists(name):
        return False
    eng = create_engine(ctx.url_for(name))
    try:
        with eng.connect() as c:
            meta = dict(c.execute(text("SELECT key, value FROM bench_meta")).all())
    except Exception:
        return False
    finally:
        eng.dispose()
    return meta == {"rows": str(rows), "tasks": str(tasks), "revision": revision,
                    "generator": GENERATOR_VERSION}


def _generate(ctx: Context, name: str, rows: int, tasks: int, revision: str) -> float:
    from sqlalchemy import create_engine, text

    from orchestrator.db.migrate import upgrade
    from orchestrator.db.session import make_engine

    t0 = time.perf_counter()
    ctx.drop_database(name)
    url = ctx.create_database(name)
    eng = make_engine(url, pool_size=1, max_overflow=0)
    upgrade(eng)
    eng.dispose()
    batches = rows // tasks
    eng = create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        x = c.execute
        x(text("SET maintenance_work_mem = '256MB'"))
        # Foreign keys are true by construction; checking 5M of them one by one is the slow part.
        x(text("SET session_replication_role = replica"))
        uniques = c.execute(text(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'task_log'::regclass AND contype = 'u'")).all()
        indexes = c.execute(text(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i "
            "WHERE i.tablename = 'task_log' AND i.indexname NOT IN "
            "(SELECT conname FROM pg_constraint WHERE conrelid = 'task_log'::regclass)")).all()
        for con, _ in uniques:
            x(text(f'ALTER TABLE task_log DROP CONSTRAINT "{con}"'))
        for idx, _ in indexes:
            x(text(f'DROP INDEX "{idx}"'))
        x(text("INSERT INTO pipelines (id, name, description, version, definition_hash, "
               "definition, created_at, updated_at) VALUES (1, 'status_bench', '', 1, 'x', "
               "'{}', now(), now())"))
        # A chain: t1 -> t2 -> ... (each task's parents' names are fixed at sync).
        x(text("INSERT INTO tasks (id, pipeline_id, version, name, handler, config, "
               "max_attempts, retry_initial_delay_s, retry_backoff_factor, retry_max_delay_s, "
               "timeout_s, trigger_rule, position, depends_on_json) SELECT g, 1, 1, 't' || g, "
               "'noop', '{}', 3, 10, 2, 600, 600, 'all_success', g - 1, "
               "CASE WHEN g = 1 THEN '[]' ELSE '[\"t' || (g - 1) || '\"]' END "
               "FROM generate_series(1, :t) g"), {"t": tasks})
        x(text("INSERT INTO task_dependencies (child_task_id, parent_task_id) "
               "SELECT g, g - 1 FROM generate_series(2, :t) g"), {"t": tasks})
        x(text("INSERT INTO batches (id, pipeline_id, pipeline_version, batch_id, params, status, "
               "created_at, finished_at) SELECT g, 1, 1, 'b' || lpad(g::text, 6, '0'), '{}', "
               "CASE WHEN g = :b THEN 'RUNNING' ELSE 'SUCCESS' END, "
               "now() - (:b - g) * interval '1 hour', "
               "CASE WHEN g = :b THEN NULL ELSE now() - (:b - g) * interval '1 hour' "
               "+ interval '10 minutes' END FROM generate_series(1, :b) g"), {"b": batches})
        # Old batches are finished; the last one (the one queried) is in flight.
        x(text("""
            INSERT INTO task_log (batch_pk, task_id, status, attempt, retry_base, trigger_rule,
                pending_parents, failed_parents, skipped_parents, waiting_for_file,
                dispatch_count, queued_at, dispatched_at, started_at, finished_at, updated_at)
            SELECT b, t,
                CASE WHEN b < :b THEN 'SUCCESS'
                     ELSE (ARRAY['SUCCESS','SUCCESS','SUCCESS','SUCCESS','SUCCESS','RUNNING',
                                 'QUEUED','PENDING','PENDING','ERROR'])[1 + t % 10] END,
                1, 0, 'all_success', 0, 0, 0, false, 1, ts, ts, ts, ts + interval '1 second',
                ts + interval '1 second'
            FROM generate_series(1, :b) b
            CROSS JOIN LATERAL (SELECT now() - (:b - b) * interval '1 hour' AS ts) s
            CROSS JOIN generate_series(1, :t) t
        """), {"b": batches, "t": tasks})
        # The in-flight batch's start and finish events, as the engine writes them.
        x(text("""
            INSERT INTO task_events (batch_pk, task_id, attempt, from_status, to_status, at)
            SELECT batch_pk, task_id, 1, 'QUEUED', 'RUNNING', started_at FROM task_log
            WHERE batch_pk = :b AND status IN ('RUNNING', 'SUCCESS', 'ERROR')
            UNION ALL
            SELECT batch_pk, task_id, 1, 'RUNNING', status, finished_at FROM task_log
            WHERE batch_pk = :b AND status IN ('SUCCESS', 'ERROR')
            ORDER BY 6, 2
        """), {"b": batches})
        for seq_table in ("pipelines", "tasks", "batches"):
            x(text(f"SELECT setval(pg_get_serial_sequence('{seq_table}', 'id'), "
                   f"(SELECT max(id) FROM {seq_table}))"))
        x(text("SET session_replication_role = DEFAULT"))
        for con, definition in uniques:
            x(text(f'ALTER TABLE task_log ADD CONSTRAINT "{con}" {definition}'))
        for _, definition in indexes:
            x(text(definition))
        # Autovacuum would get there on a real log; index-only scans need the visibility map.
        x(text("VACUUM (ANALYZE) task_log"))
        x(text("ANALYZE"))
        x(text("CREATE TABLE bench_meta (key text PRIMARY KEY, value text NOT NULL)"))
        x(text("INSERT INTO bench_meta VALUES ('rows', :r), ('tasks', :t), ('revision', :v), "
               "('generator', :g)"), {"r": str(rows), "t": str(tasks), "v": revision,
                                      "g": GENERATOR_VERSION})
    eng.dispose()
    return time.perf_counter() - t0


def _plan_summary(conn: Any, statement: str, parameters: Any) -> dict[str, Any]:
    import json

    raw = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + statement, parameters).scalar()
    plan = (raw if isinstance(raw, list) else json.loads(raw))[0]["Plan"]
    nodes: list[str] = []

    def walk(p: dict[str, Any]) -> None:
        label = p["Node Type"]
        if p.get("Index Name"):
            label += f" using {p['Index Name']}"
        if p.get("Relation Name"):
            label += f" on {p['Relation Name']}"
        nodes.append(label)
        for child in p.get("Plans", []):
            walk(child)

    walk(plan)
    return {"plan": nodes,
            "seq_scan_on_task_log": any(n.startswith("Seq Scan") and n.endswith("task_log")
                                        for n in nodes)}


def _time(fn: Any, n: int) -> list[float]:
    fn()  # warm: the first run reads pages from disk and fills caches
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def ensure_database(ctx: Context) -> tuple[str, str, float | None]:
    """The kept status database (made if missing or stale): its name, the id of its
    10,000-task batch in flight, and how long making it took (None if reused)."""
    z = ctx.sizes
    rows, tasks = z.status_rows, z.status_batch
    revision = _head_revision()
    name = _db_name(rows, revision)
    generated_s = None
    if not _fresh_enough(ctx, name, rows, tasks, revision):
        generated_s = _generate(ctx, name, rows, tasks, revision)
    return name, f"b{rows // tasks:06d}", generated_s


def status_10k(ctx: Context) -> list[Metric]:
    from sqlalchemy import event

    from orchestrator.db.session import make_engine, make_sessionmaker

    z = ctx.sizes
    try:
        ctx.require_postgres()
    except Skipped as exc:
        return [skipped("status_10k_ms", str(exc), "ms", "<= 50")]
    rows, tasks = z.status_rows, z.status_batch
    out: list[Metric] = []
    name, batch_id, generated_s = ensure_database(ctx)
    base = {"backend": "postgresql", "task_log_rows": rows, "batch_tasks": tasks,
            "database": name, "reused": generated_s is None,
            "generate_s": round(generated_s, 1) if generated_s else None}
    engine = make_engine(ctx.url_for(name), pool_size=2, max_overflow=0)
    try:
        if generated_s is not None:
            out.append(Metric("status_10k_generate_s", "s", [generated_s], base))
        reference = ("SELECT t.name, l.status, l.attempt, l.started_at, l.finished_at "
                     "FROM task_log l JOIN tasks t ON t.id = l.task_id "
                     "WHERE l.batch_pk = (SELECT id FROM batches WHERE batch_id = %(b)s)")
        with engine.connect() as c:
            plan = _plan_summary(c, reference, {"b": batch_id})

            def ref() -> None:
                got = c.exec_driver_sql(reference, {"b": batch_id}).all()
                assert len(got) == tasks, len(got)

            out.append(Metric("status_10k_reference_ms", "ms", _time(ref, z.status_queries),
                              {**base, **plan, "query": "all task rows of the batch, by "
                               "batch_pk via the (batch_pk, task_id) unique index"}))
        if importlib.util.find_spec("orchestrator.queries") is None:
            out.insert(0, skipped("status_10k_ms", "orchestrator.queries is not there yet",
                                  "ms", "<= 50"))
            return out
        from orchestrator import queries

        if not hasattr(queries, "batch_status_json"):
            out.insert(0, skipped("status_10k_ms", "orchestrator.queries has no "
                                  "batch_status_json", "ms", "<= 50"))
            return out
        captured: list[tuple[str, Any]] = []

        def capture(_conn: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
            captured.append((statement, parameters))

        sessions = make_sessionmaker(engine)
        event.listen(engine, "before_cursor_execute", capture)
        with sessions() as s:
            queries.batch_status_json(s, batch_id, pipeline="status_bench")
        event.remove(engine, "before_cursor_execute", capture)
        sqls = [(st, p) for st, p in captured if not st.lstrip().upper().startswith(("SELECT 1",))]
        with engine.connect() as c:
            plans = [_plan_summary(c, st, p) for st, p in sqls]

            def run_sql() -> None:
                for st, p in sqls:
                    c.exec_driver_sql(st, p).all()

            sql_ms = _time(run_sql, z.status_queries)
        with sessions() as s:
            call_ms = _time(lambda: queries.batch_status_json(s, batch_id,
                                                              pipeline="status_bench"),
                            z.status_queries)
            doc_ms = _time(lambda: queries.batch_status(s, batch_id, pipeline="status_bench"),
                           z.status_queries)
        params = {**base, "statements": len(sqls),
                  "plans": [p["plan"] for p in plans],
                  "seq_scan_on_task_log": any(p["seq_scan_on_task_log"] for p in plans)}
        out.insert(0, Metric("status_10k_ms", "ms", sql_ms,
                             {**params, "measured": "the SQL batch_status_json issues, "
                              "executed and fetched"}, target="<= 50"))
        out.insert(1, Metric("status_10k_call_ms", "ms", call_ms,
                             {**params, "measured": "queries.batch_status_json(), end to end: "
                              "the text `status --json` and the status function serve"},
                             target="<= 50"))
        out.insert(2, Metric("status_10k_doc_ms", "ms", doc_ms,
                             {**params, "measured": "queries.batch_status(), the same parsed "
                              "into a dict (the CLI table, the web UI)"}))
    finally:
        engine.dispose()
        if not ctx.keep_status_db:
            ctx.drop_database(name)
    return out
