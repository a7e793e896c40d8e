"""The web UI's pages over the status scenario's task log: a batch of 10,000 tasks in a
log of millions of rows.

Each page is requested through the ASGI app in this process (Starlette's test client,
no network, no browser), so the time is the server's: the queries, the layout and the
template rendering, up to the last byte of the response.
"""

from __future__ import annotations

import time
from typing import Any

from bench.core import Context, Metric, Skipped, skipped


def ui_batch_10k(ctx: Context) -> list[Metric]:
    from sqlalchemy import event

    from bench.scenarios.status import ensure_database
    from orchestrator.db.session import make_engine, make_sessionmaker

    try:
        ctx.require_postgres()
    except Skipped as exc:
        return [skipped("ui_batch_10k_ms", str(exc), "ms", "<= 1000")]
    from starlette.testclient import TestClient

    from orchestrator.ui.app import UiConfig, create_app

    z = ctx.sizes
    name, batch_id, generated_s = ensure_database(ctx)
    engine = make_engine(ctx.url_for(name), pool_size=2, max_overflow=0)
    batch = f"/pipelines/status_bench/batches/{batch_id}"
    middle = f"t{z.status_batch // 2}"
    pages = [
        ("ui_batch_10k_ms", batch, "<= 1000", "the batch page (graph, timeline, first 200 rows)"),
        ("ui_batch_10k_fragment_ms", batch + "/fragment", None,
         "the region a live page fetches again after a change"),
        ("ui_batch_10k_errors_ms", batch + "?status=ERROR&page=2", None,
         "the ERROR tasks, second page"),
        ("ui_task_10k_ms", f"{batch}/tasks/{middle}", None,
         "a task of the batch: its row, why, attempts, events"),
        ("ui_batches_ms", "/", None, "the batches page: the 25 newest batches with their "
         "counts (a finished batch's counts come from the app's cache after its first view)"),
        ("ui_batches_cold_ms", "/", None, "the batches page with an empty cache: every "
         "batch's tasks counted (25 x 10,000 rows here)"),
    ]
    base = {"backend": "postgresql", "task_log_rows": z.status_rows,
            "batch_tasks": z.status_batch, "database": name, "reused": generated_s is None}
    out: list[Metric] = []
    try:
        app = create_app(UiConfig(make_sessionmaker(engine), None, "bench"))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            for metric, path, target, what in pages:
                statements: list[str] = []

                def count(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
                    statements.append(statement)  # noqa: B023 (used within the loop turn)

                first = client.get(path)  # warm: caches, compiled templates, plans
                if first.status_code != 200:
                    out.append(skipped(metric, f"GET {path}: {first.status_code}", "ms", target,
                                       status="failed"))
                    continue
                if metric.endswith("_cold_ms"):
                    app.state.counts.clear()
                event.listen(engine, "before_cursor_execute", count)
                client.get(path)
                event.remove(engine, "before_cursor_execute", count)
                samples = []
                for _ in range(z.status_queries):
                    if metric.endswith("_cold_ms"):
                        app.state.counts.clear()
                    t0 = time.perf_counter()
                    r = client.get(path)
                    samples.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200
                out.append(Metric(metric, "ms", samples, {
                    **base, "path": path, "measured": what, "bytes": len(first.content),
                    "statements": len(statements)}, target=target))
    finally:
        engine.dispose()
        if not ctx.keep_status_db:
            ctx.drop_database(name)
    return out
