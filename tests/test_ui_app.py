"""The web UI through its HTTP interface, on PostgreSQL and SQLite: what each page
shows, that the actions make the CLI's engine calls, and every refusal."""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from orchestrator.db.models import Batch, TaskLog
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher
from orchestrator.ui.actions import RuntimeActions
from orchestrator.ui.app import UiConfig, create_app
from orchestrator.ui.security import COOKIE
from tests.ui_support import HOSTILE, event_count, failed_diamond

BASE = "http://127.0.0.1:8080"
BATCH = "/pipelines/diamond/batches/b1"


@pytest.fixture
def runtime(any_engine: Engine, tmp_path: Path, clock: Any) -> Iterator[Runtime]:
    rt = Runtime(Settings(home=tmp_path), any_engine, RecordingPublisher(), clock=clock)
    yield rt
    rt.events.close()


def _client(rt: Runtime, *, read_only: bool = False, hosts: list[str] | None = None) -> TestClient:
    config = UiConfig(rt.sessions, None if read_only else RuntimeActions(rt), "test-db",
                      clock=rt.clock.now, allowed_hosts=hosts, stream_interval_s=0.05,
                      stream_max_s=0.3)
    return TestClient(create_app(config), base_url=BASE)


def _token(client: TestClient, path: str) -> str:
    page = client.get(path)
    assert page.status_code == 200, page.text
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
    assert found and client.cookies.get(COOKIE)
    return found.group(1)


def _status(sessions: sessionmaker[Session], task: str, batch_id: str = "b1") -> str:
    from orchestrator.db.models import Task

    with sessions() as s:
        value = s.execute(
            select(TaskLog.status).join(Task, Task.id == TaskLog.task_id)
            .join(Batch, Batch.id == TaskLog.batch_pk)
            .where(Batch.batch_id == batch_id, Task.name == task, TaskLog.map_index == -1)
        ).scalar_one()
    return str(getattr(value, "value", value))


SAME_ORIGIN = {"sec-fetch-site": "same-origin", "origin": BASE}


def _post(client: TestClient, path: str, token: str, accept_json: bool = True,
          headers: dict[str, str] | None = None, **fields: str) -> Any:
    return client.post(path, data={"csrf_token": token, **fields}, follow_redirects=False,
                       headers={**SAME_ORIGIN, **({"accept": "application/json"}
                                                  if accept_json else {}), **(headers or {})})


# -- pages --------------------------------------------------------------------------------


def test_the_batch_page_shows_the_dag_coloured_by_status_the_timeline_and_the_table(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client:
        page = client.get(BATCH)
    assert page.status_code == 200
    html = page.text
    node = {m[0]: m[1] for m in re.findall(
        r'<g class="node s-[a-z_]+" data-task="(\w+)" data-status="(\w+)"', html)}
    assert node == {"extract": "SUCCESS", "load_a": "ERROR", "load_b": "SUCCESS",
                    "combine": "UPSTREAM_FAILED"}
    rows = dict(re.findall(r'<tr data-task="(\w+)" data-status="(\w+)"', html))
    assert rows == node
    assert re.search(r"<h1>b1 <span class=\"status s-failed\">FAILED</span>", html)
    assert html.count('class="span s-') == 3  # three attempts ran: two succeeded, one failed
    assert "Retry failed tasks" in html and "Cancel batch" not in html  # nothing left open
    assert 'data-status="FAILED"' in html  # the script stops listening to a finished batch


def test_the_task_page_shows_why_the_error_every_attempt_and_the_json(runtime, clock):
    failed_diamond(runtime.sessions, clock.now(), error="RuntimeError: disk full\n  at line 3")
    with _client(runtime) as client:
        a = client.get(f"{BATCH}/tasks/load_a").text
        c = client.get(f"{BATCH}/tasks/combine").text
        b = client.get(f"{BATCH}/tasks/load_b").text
    assert "load_a: failed on attempt 1/3 at 12:00:03 with: RuntimeError: disk full" in a
    assert "RuntimeError: disk full\n  at line 3</pre>" in a  # the whole error, as text
    assert re.search(r'<tr data-attempt="1">.*?s-error.*?disk full', a, re.S)
    assert "combine: will not run: upstream load_a failed with: RuntimeError: disk full" in c
    assert '"rows": 3' in html.unescape(b) and "Rerun this task and downstream" in b


def test_every_page_of_a_batch_and_its_pipeline_renders(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client:
        for path, expect in [("/", "diamond"), ("/pipelines/diamond", "Start a batch"),
                             ("/pipelines/diamond?version=1", "version 1"),
                             (f"{BATCH}/events", "RUNNING"), (f"{BATCH}/fragment", 'id="live"'),
                             (f"{BATCH}/tasks/load_a/fragment", "load_a")]:
            page = client.get(path)
            assert page.status_code == 200, (path, page.text)
            assert expect in page.text, path
        events = client.get(f"{BATCH}/events").text
        rows = re.findall(r"<tr>(.*?)</tr>", events, re.S)
        load_a = [re.findall(r"s-(\w+)", r)[-1] for r in rows if "<td>load_a</td>" in r]
        assert load_a == ["queued", "running", "error"]
        css = client.get("/static/ui.css")
        assert css.status_code == 200 and ".s-error" in css.text
        for path in ("/pipelines/nope", "/pipelines/diamond/batches/nope",
                     f"{BATCH}/tasks/nope", "/pipelines/diamond?version=7", "/nowhere"):
            assert client.get(path).status_code == 404, path
        assert client.get("/?since=yesterday").status_code == 400
        assert client.get(f"{BATCH}?status=GREEN").status_code == 400


def test_user_text_is_escaped_everywhere_it_is_shown(runtime, clock):
    failed_diamond(runtime.sessions, clock.now(), pipeline="hostile", error=HOSTILE,
                   params={"region": HOSTILE}, description=HOSTILE)
    with _client(runtime) as client:
        pages = [client.get(p).text for p in (
            "/", "/pipelines/hostile", "/pipelines/hostile/batches/b1",
            "/pipelines/hostile/batches/b1/tasks/load_a",
            "/pipelines/hostile/batches/b1/tasks/combine",
            "/pipelines/hostile/batches/b1/events")]
    for text in pages:
        assert "<script>window" not in text and "<img src=x" not in text
    escaped = "&lt;script&gt;window.__pwned = 1&lt;/script&gt;"
    assert escaped in pages[2]  # the param and the error line in the table
    assert escaped in pages[3] and escaped in pages[4] and escaped in pages[5]
    assert escaped in pages[1]  # the description
    # The only scripts a page loads are our own file, never inline code.
    assert re.findall(r"<script[^>]*>", pages[3]) == [
        re.search(r'<script src="/static/ui.js\?v=\w+" defer>', pages[3]).group(0)]


def test_every_response_carries_a_strict_content_security_policy(runtime, clock):
    with _client(runtime) as client:
        for path in ("/", "/nowhere", "/static/ui.js"):
            r = client.get(path)
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "unsafe-inline" not in csp
            assert r.headers["x-frame-options"] == "DENY"


def test_the_batches_page_filters_by_pipeline_status_and_date_and_pages_back(runtime, clock):
    failed_diamond(runtime.sessions, clock.now(), pipeline="alpha", batch_id="a1")
    from orchestrator.db.session import transaction
    from orchestrator.engine import start_batch
    from tests.ui_support import close, run_task, spec_from_edges, sync

    sync(runtime.sessions, spec_from_edges("beta", {"only": []}), clock.now())
    for day in range(3):
        at = clock.advance(86400)
        transaction(runtime.sessions, lambda s, d=day, at=at: start_batch(s, "beta", f"d{d}", {}, at))
        if day < 2:
            run_task(runtime.sessions, "beta", f"d{day}", "only", at)
            close(runtime.sessions, "beta", f"d{day}", at)
    with _client(runtime) as client:
        def shown(query: str) -> list[str]:
            html = client.get("/" + query).text
            return re.findall(r'<tr data-batch="([\w.-]+)">', html)

        assert shown("") == ["d2", "d1", "d0", "a1"]
        assert shown("?pipeline=beta") == ["d2", "d1", "d0"]
        assert shown("?status=FAILED") == ["a1"]
        assert shown("?status=RUNNING") == ["d2"]
        assert shown("?since=2024-03-03&until=2024-03-03") == ["d1"]
        page = client.get("/").text
        marks = re.findall(r'class="mark s-(\w+)" href="/pipelines/beta/', page)
        assert marks == ["running", "success", "success"]  # newest first

    import orchestrator.ui.pages as pages

    old, pages.BATCHES_PAGE = pages.BATCHES_PAGE, 2
    try:
        with _client(runtime) as client:
            first = client.get("/").text
            assert re.findall(r'<tr data-batch="([\w.-]+)">', first) == ["d2", "d1"]
            older = re.search(r'href="(/\?before=\d+)"', first).group(1)
            assert re.findall(r'<tr data-batch="([\w.-]+)">', client.get(older).text) == [
                "d0", "a1"]
    finally:
        pages.BATCHES_PAGE = old


def test_the_batch_list_reads_one_indexed_page_and_counts_each_finished_batch_once(
        runtime, clock, any_engine):
    from orchestrator.db.session import transaction
    from orchestrator.engine import start_batch
    from orchestrator.ui import reads
    from tests.ui_support import close, run_task, spec_from_edges, sync

    sync(runtime.sessions, spec_from_edges("many", {"a": [], "b": ["a"], "c": []}), clock.now())
    for b in range(8):
        at = clock.advance(1)
        transaction(runtime.sessions, lambda s, b=b, at=at: start_batch(s, "many", f"b{b}", {}, at))
        if b % 2 == 0:  # the even ones finish
            for task in ("a", "b", "c"):
                run_task(runtime.sessions, "many", f"b{b}", task, at)
            close(runtime.sessions, "many", f"b{b}", at)
    seen: list[tuple[str, Any]] = []

    def count(_c: Any, _cur: Any, statement: str, parameters: Any, *_a: Any) -> None:
        if not statement.startswith("BEGIN"):  # SQLite's own transaction start
            seen.append((statement, parameters))

    cache = reads.CountsCache()

    def listed(**filt: Any) -> list[reads.BatchRow]:
        seen.clear()
        sa_event.listen(any_engine, "before_cursor_execute", count)
        try:
            with runtime.sessions() as s:
                rows, more = reads.batch_list(s, reads.BatchFilter(pipeline="many", **filt),
                                              limit=6, cache=cache)
        finally:
            sa_event.remove(any_engine, "before_cursor_execute", count)
        assert more is (not filt)
        return rows

    rows = listed()
    assert [r.batch_id for r in rows] == ["b7", "b6", "b5", "b4", "b3", "b2"]
    assert {r.batch_id: r.counts for r in rows}["b6"] == {"SUCCESS": 3}
    assert {r.batch_id: r.counts for r in rows}["b7"] == {"PENDING": 1, "QUEUED": 2}
    assert len(seen) == 2  # the page, then the counts of its six batches
    rows = listed()
    assert {r.batch_id: r.counts for r in rows}["b6"] == {"SUCCESS": 3}  # from the cache
    assert len(seen) == 2 and "b7" in {r.batch_id for r in rows}
    params = seen[1][1]
    values = list(params.values()) if isinstance(params, dict) else list(params)
    counted = {v for x in values for v in (x if isinstance(x, list | tuple) else [x])} - {-1}
    assert counted == {r.pk for r in rows if r.status == "RUNNING"} and len(counted) == 3
    rows = listed(status="SUCCESS")
    assert [r.batch_id for r in rows] == ["b6", "b4", "b2", "b0"]
    assert len(seen) == 2  # b0 was never counted
    rows = listed(status="SUCCESS")
    assert len(seen) == 1 and all(r.counts == {"SUCCESS": 3} for r in rows)


def test_the_stream_announces_the_batch_version_and_a_change(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client, client.stream("GET", f"{BATCH}/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    changes = re.findall(r"event: change\ndata: (\{.*?\})", body)
    assert changes and '"status": "FAILED"' in changes[0]
    assert client.get("/pipelines/diamond/batches/nope/stream").status_code == 404


# -- actions ------------------------------------------------------------------------------


def test_retry_from_the_page_requeues_the_failed_part_as_the_cli_does(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    publisher = runtime.publisher
    with _client(runtime) as client:
        token = _token(client, BATCH)
        assert "1 ERROR" in client.get("/").text  # counted, and kept: the batch is finished
        r = _post(client, f"{BATCH}/retry", token, confirmed="1")
        listed = client.get("/").text  # reopened, so counted again
        assert "1 QUEUED" in listed and "1 ERROR" not in listed
    assert r.status_code == 200 and r.json()["ok"], r.text
    assert r.json()["message"] == "diamond/b1: retrying the failed part, 1 task(s) queued again"
    assert _status(runtime.sessions, "load_a") == "QUEUED"
    assert _status(runtime.sessions, "combine") == "PENDING"
    assert ("diamond", "b1", "load_a", 2) in publisher.tasks()  # type: ignore[attr-defined]


def test_retry_of_one_task_reruns_it_and_its_downstream_only(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client:
        token = _token(client, f"{BATCH}/tasks/load_b")
        r = _post(client, f"{BATCH}/retry", token, confirmed="1", task="load_b")
    assert r.status_code == 200, r.text
    assert _status(runtime.sessions, "load_b") == "QUEUED"
    assert _status(runtime.sessions, "load_a") == "ERROR"
    assert _status(runtime.sessions, "extract") == "SUCCESS"


def test_cancel_and_start_from_the_pages(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client:
        token = _token(client, "/pipelines/diamond")
        r = _post(client, "/pipelines/diamond/start", token, confirmed="1", batch_id="b2",
                  params="region=north\nday = 3\n")
        assert r.status_code == 200 and r.json()["location"] == "/pipelines/diamond/batches/b2"
        with runtime.sessions() as s:
            assert s.execute(select(Batch.params).where(Batch.batch_id == "b2")).scalar_one() == {
                "region": "north", "day": "3"}
        assert _status(runtime.sessions, "extract", "b2") == "QUEUED"
        again = _post(client, "/pipelines/diamond/start", token, confirmed="1", batch_id="b2")
        assert again.status_code == 400 and "already exists" in again.json()["error"]
        for bad in ("bad id", "../x", "", "x" * 129):
            r = _post(client, "/pipelines/diamond/start", token, confirmed="1", batch_id=bad)
            assert r.status_code == 400 and "invalid batch id" in r.json()["error"], bad
        r = _post(client, "/pipelines/diamond/start", token, confirmed="1", batch_id="b3",
                  params="no equals sign")
        assert r.status_code == 400 and "not key=value" in r.json()["error"]
        r = _post(client, "/pipelines/diamond/batches/b2/cancel", token, confirmed="1",
                  accept_json=False)
        assert r.status_code == 303 and r.headers["location"] == "/pipelines/diamond/batches/b2"
    with runtime.sessions() as s:
        assert {str(getattr(v, "value", v)) for v in s.execute(
            select(TaskLog.status).join(Batch, Batch.id == TaskLog.batch_pk)
            .where(Batch.batch_id == "b2")).scalars()} == {"CANCELLED"}
        assert s.execute(select(Batch.batch_id).where(Batch.batch_id == "b3")).first() is None


def test_an_action_without_confirmation_only_asks(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    before = event_count(runtime.sessions)
    with _client(runtime) as client:
        token = _token(client, BATCH)
        page = _post(client, f"{BATCH}/retry", token, accept_json=False)
        assert page.status_code == 200 and "Rerun the failed" in page.text
        assert 'name="confirmed" value="1"' in page.text
        assert _post(client, f"{BATCH}/retry", token).status_code == 400
    assert event_count(runtime.sessions) == before
    assert _status(runtime.sessions, "load_a") == "ERROR"


@pytest.mark.parametrize("headers, why", [
    ({"sec-fetch-site": "cross-site", "origin": "https://evil.example"}, "Sec-Fetch-Site"),
    ({"sec-fetch-site": "same-site", "origin": "http://127.0.0.1:9999"}, "Sec-Fetch-Site"),
    ({"sec-fetch-site": None, "origin": "http://localhost:8080"}, "Origin"),  # another origin
    ({"sec-fetch-site": None, "origin": "null"}, "Origin"),
])
def test_a_cross_site_request_is_refused_and_changes_nothing(runtime, clock, headers, why):
    failed_diamond(runtime.sessions, clock.now())
    before = event_count(runtime.sessions)
    with _client(runtime) as client:
        token = _token(client, BATCH)
        sent = {**SAME_ORIGIN, "accept": "application/json", **headers}
        r = client.post(f"{BATCH}/retry", data={"csrf_token": token, "confirmed": "1"},
                        headers={k: v for k, v in sent.items() if v is not None})
    assert r.status_code == 403 and why in r.json()["error"]
    assert event_count(runtime.sessions) == before
    assert _status(runtime.sessions, "load_a") == "ERROR"


def test_a_request_without_the_pages_token_is_refused(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    before = event_count(runtime.sessions)
    with _client(runtime) as client:
        token = _token(client, BATCH)
        assert _post(client, f"{BATCH}/retry", "", confirmed="1").status_code == 403
        assert _post(client, f"{BATCH}/retry", "0" * 64, confirmed="1").status_code == 403
        client.cookies.clear()  # the token belongs to the browser that got the page
        r = _post(client, f"{BATCH}/retry", token, confirmed="1")
        assert r.status_code == 403 and "token" in r.json()["error"]
        # Another server (another secret) never accepts this one's tokens.
    with _client(runtime) as other:
        _token(other, BATCH)
        assert _post(other, f"{BATCH}/retry", token, confirmed="1").status_code == 403
    assert event_count(runtime.sessions) == before


def test_read_only_shows_no_action_and_refuses_every_one(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    before = event_count(runtime.sessions)
    with _client(runtime, read_only=True) as client:
        html = client.get(BATCH).text
        assert "read-only" in html and "Retry failed tasks" not in html
        assert "Start a batch" not in client.get("/pipelines/diamond").text
        assert 'name="csrf_token"' not in html  # no form at all
        token = ""
        for path, fields in ((f"{BATCH}/retry", {}), (f"{BATCH}/cancel", {}),
                             ("/pipelines/diamond/start", {"batch_id": "b9"})):
            r = _post(client, path, token, confirmed="1", **fields)
            assert r.status_code == 403 and "read-only" in r.json()["error"], path
    assert event_count(runtime.sessions) == before
    with runtime.sessions() as s:
        assert s.execute(select(Batch.batch_id).where(Batch.batch_id == "b9")).first() is None


def test_a_host_name_other_than_its_own_is_refused(runtime, clock):
    with _client(runtime, hosts=["127.0.0.1", "localhost"]) as client:
        assert client.get("/").status_code == 200
        assert client.get("/", headers={"host": "rebound.example:8080"}).status_code == 421


def test_get_on_an_action_is_not_allowed(runtime, clock):
    failed_diamond(runtime.sessions, clock.now())
    with _client(runtime) as client:
        assert client.get(f"{BATCH}/retry").status_code == 405
    assert _status(runtime.sessions, "load_a") == "ERROR"


def test_the_batch_page_is_a_handful_of_statements_for_a_batch_of_thousands(runtime, clock,
                                                                          any_engine):
    from tests.ui_support import big_batch

    big_batch(any_engine, 3000, clock.now() - timedelta(minutes=5))
    seen: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_a: Any) -> None:
        if not statement.startswith("BEGIN"):
            seen.append(statement)

    with _client(runtime) as client:
        sa_event.listen(any_engine, "before_cursor_execute", count)
        try:
            page = client.get("/pipelines/wide/batches/big-1")
        finally:
            sa_event.remove(any_engine, "before_cursor_execute", count)
    assert page.status_code == 200
    assert len(seen) <= 10, seen
    assert "3000 tasks: too many to draw" in page.text
    assert page.text.count("<tr data-task=") == 200 and "page 1 of 15" in page.text
    assert page.text.count('class="span s-') == 200  # the first 200 attempts, by start


def test_the_cli_command_refuses_a_missing_database_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli.app import app

    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "nothing-here"))
    result = CliRunner().invoke(app, ["ui", "--read-only", "--port", "1"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no metadata database at ")
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "nothing-here").exists()  # read-only creates nothing
    bad = CliRunner().invoke(app, ["ui", "--port", "70000"])
    assert bad.exit_code == 2


def test_allowed_hosts_follow_the_address_it_listens_on():
    from orchestrator.ui.server import allowed_hosts

    assert allowed_hosts("127.0.0.1", []) == ["localhost", "127.0.0.1", "[::1]"]
    assert allowed_hosts("::1", ["ui.internal"])[-1] == "ui.internal"
    assert allowed_hosts("0.0.0.0", []) is None  # behind a proxy that authenticates
    assert allowed_hosts("0.0.0.0", ["UI.example"]) == ["ui.example"]


@pytest.mark.postgres
def test_a_mapped_task_shows_its_instance_counts_and_its_failed_instance_first(
        pg_engine, pg_url, tmp_path):
    from tests.embedded import pg_runtime
    from tests.test_mapping import _parent_output_spec

    with pg_runtime(pg_url, tmp_path, workers=4) as rt:
        rt.sync_specs([_parent_output_spec()])
        rt.start_batch("by_region", "bad", {"break_east": True})
        assert rt.wait("by_region", "bad", timeout=20) == "FAILED"
        with _client(rt, read_only=True) as client:
            batch = client.get("/pipelines/by_region/batches/bad").text
            load = client.get("/pipelines/by_region/batches/bad/tasks/load").text
    node = re.search(r'data-task="load" data-status="ERROR">.*?</g>', batch, re.S)
    assert node and "ERROR · 3/4 · 1 failed" in node.group(0)
    assert re.search(r'<tr data-task="load" data-status="ERROR">.*?ERROR · 3/4 · 1 failed',
                     batch, re.S)
    assert batch.count(">load[") >= 4  # each instance's attempt in the timeline
    instances = re.search(r'<section class="panel" id="instances">.*?</section>', load, re.S)
    assert instances and "(4)" in instances.group(0)
    rows = re.findall(r"<tr><td class=\"num\">(\d)</td><td><span class=\"status s-(\w+)\"",
                      instances.group(0))
    assert rows[0][1] == "error" and [r[1] for r in rows[1:]] == ["success"] * 3
    assert "east is broken" in instances.group(0)


def test_a_scheduled_pipeline_shows_its_schedule_and_a_batch_its_deadline(runtime, clock):
    from orchestrator.pipeline.spec import build_pipeline
    from tests.dags import spec_from_edges

    spec = build_pipeline({
        "name": "daily_sales",
        "schedule": {"cron": "0 6 * * *", "timezone": "Europe/Paris", "batch_id": "{date}"},
        "tasks": [{"name": "report", "handler": "noop"}],
    }, known_handlers={"noop"})
    runtime.sync_specs([spec])
    assert runtime.start_batch("daily_sales", "by-hand", deadline_s=3600)
    with _client(runtime) as client:
        pipeline = client.get("/pipelines/daily_sales").text
        batch = client.get("/pipelines/daily_sales/batches/by-hand").text
        runtime.sync_specs([spec_from_edges("plain", {"only": []})])
        unscheduled = client.get("/pipelines/plain").text
    schedule = re.search(r'<section class="panel" id="schedule">.*?</section>', pipeline, re.S)
    assert schedule, pipeline
    text = html.unescape(re.sub(r"<[^>]+>", " ", schedule.group(0)))
    assert "0 6 * * *" in text and "Europe/Paris" in text and "{date}" in text
    # The next three 06:00 ticks in Paris after the clock's 2024-03-01 12:00 UTC.
    assert re.findall(r"2024-03-0(\d)T06:00:00\+01:00", text) == ["2", "3", "4"]
    assert "pause daily_sales" in text and "paused" not in text.split("Schedule")[1][:20]
    deadline = re.search(r'<dd id="deadline">(.*?)</dd>', batch, re.S)
    assert deadline and deadline.group(1).startswith("2024-03-01 13:00:00 UTC")
    assert "the batch fails" in deadline.group(1)
    assert 'id="schedule"' not in unscheduled and 'id="graph"' in unscheduled
