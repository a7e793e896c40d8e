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
from sqlalchemy import select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from orchestrator.db.models import Batch, TaskAttempt, TaskLog
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
    attempt = re.search(r'<article class="attempt" id="attempt-1" data-attempt="1" '
                        r'data-outcome="ERROR">.*?</article>', a, re.S)
    assert attempt and "disk full" in attempt.group(0) and "worker <code>test:1</code>" in (
        attempt.group(0))
    # Its story (from task_attempts): the lines it printed, then the traceback, unfolded.
    story = re.search(r'<details class="story" id="story-1" data-keep open>.*?</details>',
                      attempt.group(0), re.S)
    assert story, attempt.group(0)
    assert re.findall(r'<div class="ln ln-(\w+)">.*?<span class="tx">(.*?)</span></div>',
                      story.group(0)) == [("stdout", "load_a: attempt 1 starting"),
                                          ("stderr", "RuntimeError: disk full")]
    assert ('<pre class="traceback" id="tb-1" data-keep>Traceback (most recent call last):'
            in story.group(0)) and "in load_a\nRuntimeError: disk full\n  at line 3" in (
        html.unescape(story.group(0)))
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
    # What a task logged, in every field of a line: a level or stream that is no
    # level or stream must not reach a class attribute either.
    with runtime.sessions.begin() as s:
        s.execute(update(TaskAttempt).where(TaskAttempt.outcome == "ERROR").values(log=[
            {"at": HOSTILE, "stream": f'x" onclick="{HOSTILE}', "line": HOSTILE},
            {"at": "2024-03-01T12:00:03.000+00:00", "stream": "log",
             "level": '"><script>window.__pwned = 3</script>', "logger": HOSTILE,
             "line": f"{HOSTILE}\n{HOSTILE}"}]))
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
    story = re.search(r'<details class="story".*?</details>', pages[3], re.S).group(0)
    assert story.count(escaped) == 5  # the line, the logger, the two-line line, traceback
    assert re.findall(r'<div class="([^"]*)"><time>', story) == ["ln ln-other", "ln ln-log"]
    assert '<pre class="traceback" id="tb-1" data-keep>' in story and "window.__pwned = 3" in (
        html.unescape(story))
    assert "<script>" not in story and "onclick" not in story
    assert escaped in pages[1]  # the description
    # The only scripts a page loads are our own file, never inline code.
    assert re.findall(r"<script[^>]*>", pages[3]) == [
        re.search(r'<script src="/static/ui.js\?v=\w+" defer>', pages[3]).group(0)]


def _chatty(ctx: Any) -> dict[str, Any]:
    import logging
    import sys

    print(f"attempt {ctx.attempt}: reading 3 files")
    ctx.log.info("rows so far: %d", 42)
    logging.getLogger("vendor.client").warning("slow response")
    print("deprecated option", file=sys.stderr)
    if ctx.attempt == 1:
        for i in range(400):
            print(f"row {i:04d} " + "x" * 60)
        raise KeyError("amount")
    return {"ok": True}


def test_the_task_page_shows_each_attempts_lines_by_stream_and_its_traceback(
        sessions, clock, any_engine, tmp_path):
    """A real handler, run by the worker: what it printed and logged, attempt by
    attempt, the first attempt's cut marked, its traceback."""
    from orchestrator import handlers
    from orchestrator.messages import StartBatch
    from orchestrator.pipeline.load import build_pipeline
    from orchestrator.router import Router
    from orchestrator.testing import reset_process_caches
    from tests.dags import sync

    reset_process_caches()
    published = RecordingPublisher()
    router = Router(sessions, published, clock=clock, attempt_log_bytes=8192)
    handlers.register("chatty_ui", _chatty)
    try:
        sync(sessions, build_pipeline({"name": "p", "tasks": [{
            "name": "t", "handler": "chatty_ui",
            "retry": {"max_attempts": 2, "initial_delay_s": 0}}]},
            known_handlers={"chatty_ui"}), clock.now())
        router.start_batch(StartBatch(type="start_batch", pipeline="p", batch_id="b1"))
        published.pump(router)
    finally:
        handlers.unregister("chatty_ui")
    rt = Runtime(Settings(home=tmp_path), any_engine, RecordingPublisher(), clock=clock)
    try:
        with _client(rt) as client:
            page = client.get("/pipelines/p/batches/b1/tasks/t").text
    finally:
        rt.events.close()
    first, second = re.findall(r'<article class="attempt".*?</article>', page, re.S)
    assert 'data-attempt="1" data-outcome="RETRYING"' in first
    assert 'data-attempt="2" data-outcome="SUCCESS"' in second
    assert "KeyError: &#39;amount&#39; (at " in first  # the error line, with where
    lines = re.findall(r'<div class="(ln[^"]*)"><time>[\d:.]+</time> <span class="tag">(\w+)'
                       r'</span> (?:<span class="logger">([\w.]+):</span> )?'
                       r'<span class="tx">(.*?)</span></div>', second)
    assert lines == [
        ("ln ln-stdout", "stdout", "", "attempt 2: reading 3 files"),
        ("ln ln-log lv-info", "INFO", "", "rows so far: 42"),  # ctx.log needs no name
        ("ln ln-log lv-warning", "WARNING", "vendor.client", "slow response"),
        ("ln ln-stderr", "stderr", "", "deprecated option")]
    assert '<details class="story" id="story-2" data-keep open>' in second  # the newest
    # The first attempt printed more than the worker keeps: its cut is marked, counted.
    dropped = int(re.search(r"· ([\d,]+) left out by the worker", first).group(1)
                  .replace(",", ""))
    assert dropped > 100
    marker = re.findall(r'<div class="ln ln-orchestrator">.*?<span class="tx">(.*?)</span>',
                        first)
    assert len(marker) == 1 and f"… {dropped:,} line(s)" in marker[0]
    assert "row 0399" in first and '<details class="story" id="story-1" data-keep>' in first
    traceback = html.unescape(re.search(r'<pre class="traceback"[^>]*>(.*?)</pre>', first,
                                        re.S).group(1))
    assert traceback.startswith("Traceback (most recent call last):")
    assert 'raise KeyError("amount")' in traceback and traceback.rstrip().endswith(
        "KeyError: 'amount'")
    assert "<pre class=\"traceback\"" not in second


def test_a_huge_log_and_many_attempts_leave_the_task_page_bounded(runtime, clock):
    """However much was stored (`attempt_log_bytes` is the user's to raise): the log and
    traceback of the last five attempts only, each log its first and last lines up to
    1,000 lines and 96 KiB, each traceback its head and tail up to 48 KiB, an error up
    to 4,000 characters (500 for an attempt shown without its log)."""
    from orchestrator.db.session import transaction
    from orchestrator.engine import claim, fail, resolve_task, start_batch
    from orchestrator.engine.attempts import AttemptRecord, finish
    from tests.ui_support import spec_from_edges, sync

    sync(runtime.sessions, spec_from_edges("long", {"t": []}), clock.now())
    transaction(runtime.sessions, lambda s: start_batch(s, "long", "b1", {}, clock.now()))
    at = clock.now().isoformat()
    huge = [{"at": at, "stream": "stdout", "line": f"line {i:05d} " + "<x>" * 60}
            for i in range(20_000)]
    for n in range(1, 9):
        now = clock.advance(1)
        last = n == 8

        def run(s: Session, n: int = n, now: Any = now, last: bool = last) -> None:
            row = resolve_task(s, "long", "b1", "t")
            assert claim(s, row, n, now) is not None
            row = resolve_task(s, "long", "b1", "t")
            fail(s, row, n, f"boom {n}", now, retry_delay_s=None if last else 0)
            finish(s, row, n, AttemptRecord(
                started_at=now, finished_at=now, outcome="ERROR" if last else "RETRYING",
                error=f"boom {n} " + "!" * 7000,
                traceback=("T" * 300_000 if last else f"trace {n}"),
                log=huge if last else [{"at": at, "stream": "stdout", "line": f"try {n}"}]),
                now)

        transaction(runtime.sessions, run)
    with _client(runtime) as client:
        page = client.get("/pipelines/long/batches/b1/tasks/t")
    assert page.status_code == 200
    assert len(page.content) < 600_000  # a 1.4 MB log and a 300 kB traceback stored
    text = page.text
    assert text.count('<article class="attempt"') == 8
    assert text.count('<details class="story"') == 5
    for n in (1, 2, 3):  # earlier attempts: their error, and where to read the rest
        article = re.search(rf'id="attempt-{n}".*?</article>', text, re.S).group(0)
        assert f"boom {n}" in article and "orchestrator logs b1 t --pipeline long " \
            f"--attempt {n}</code>" in article and "try " not in article
        assert "characters not shown here" in article and len(article) < 2000
    last = re.search(r'id="attempt-8".*?</article>', text, re.S).group(0)
    lines = re.findall(r'<div class="ln ln-stdout"><time>[^<]*</time> <span class="tag">stdout'
                       r'</span> <span class="tx">line (\d+) ', last)
    assert len(lines) <= 1000 and lines[0] == "00000" and lines[-1] == "19999"
    cut = re.search(r'<div class="ln ln-cut">… ([\d,]+) lines \(([\d,]+) KiB\) not shown here: '
                    r'<code>orchestrator logs b1 t --pipeline long --attempt 8</code>', last)
    assert cut and int(cut.group(1).replace(",", "")) == 20_000 - len(lines)
    assert "&lt;x&gt;" in last and "<x>" not in last
    traceback = re.search(r'<pre class="traceback"[^>]*>(.*?)</pre>', last, re.S).group(1)
    assert len(traceback) < 50 * 1024 and "characters not shown here" in traceback
    error = re.search(r'<pre class="error-text small" data-role="error">(.*?)</pre>', last,
                      re.S).group(1)
    assert 4000 < len(error) < 4100 and "characters not shown here" in error


def test_a_log_view_keeps_its_first_and_last_lines_within_both_bounds():
    from orchestrator.ui.pages import log_view

    entries = [{"at": "2024-03-01T12:00:00.000+00:00", "stream": "stdout", "line": f"{i:04d}"}
               for i in range(5000)]
    assert len(log_view(entries[:10], lines=10).head) == 10
    v = log_view(entries, lines=100, chars=10_000)
    assert [x.text for x in v.head] == [f"{i:04d}" for i in range(50)]
    assert [x.text for x in v.tail] == [f"{i:04d}" for i in range(4950, 5000)]
    assert v.hidden == 4900 and v.count == 5000 and v.hidden_chars == 4900 * 4
    v = log_view([{"line": "y" * 100}] * 50, lines=1000, chars=1000)
    assert len(v.head) == 5 and len(v.tail) == 5 and v.hidden == 40
    long = log_view([{"line": "z" * 10_000}])
    assert long.head[0].text.startswith("z" * 4000 + "… (6,000 more characters")
    odd = log_view(["not a dict", {"stream": "weird", "level": "NOTICE", "line": 3}])
    assert [(x.css, x.text) for x in odd.head] == [("ln ln-other", "not a dict"),
                                                   ("ln ln-other", "3")]


def test_a_running_attempts_saved_lines_move_its_page_which_stops_following_when_it_ends(
        runtime, clock):
    """The task page follows its batch and its running attempt's log: the stream
    announces the version the page fetched carries; a save of the log moves it;
    when the attempt ends (here after its batch was cancelled) the page stops."""
    from orchestrator.db.session import transaction
    from orchestrator.engine import claim, resolve_task, start_batch
    from orchestrator.engine.attempts import DISCARDED, AttemptRecord, close_running, save_log
    from tests.ui_support import spec_from_edges, sync

    sync(runtime.sessions, spec_from_edges("live", {"t": [], "u": ["t"]}), clock.now())
    transaction(runtime.sessions, lambda s: start_batch(s, "live", "b1", {}, clock.now()))
    began = clock.now()
    transaction(runtime.sessions, lambda s: claim(s, resolve_task(s, "live", "b1", "t"), 1,
                                                  began))
    lines: list[dict[str, Any]] = []

    def save(line: str, closed: bool = False) -> None:
        now = clock.advance(2)
        lines.append({"at": now.isoformat(), "stream": "stdout", "line": line})
        rec = AttemptRecord(started_at=began, log=list(lines), worker="w:1",
                            outcome=DISCARDED if closed else "RUNNING",
                            finished_at=now if closed else None)
        transaction(runtime.sessions, lambda s: (close_running if closed else save_log)(
            s, resolve_task(s, "live", "b1", "t"), 1, rec, now))

    task = "/pipelines/live/batches/b1/tasks/t"

    def look(client: TestClient) -> tuple[str, str, str]:
        fragment = client.get(task + "/fragment").text
        live = re.search(r'data-stream="([^"]+)" data-fragment="[^"]+" data-version="([^"]+)" '
                         r'data-status="\w+" data-following="(\d)"', fragment)
        assert live and live.group(1) == task + "/stream", fragment[:400]
        with client.stream("GET", live.group(1)) as r:
            body = "".join(r.iter_text())
        announced = re.findall(r'event: change\ndata: \{"version": "([^"]+)"', body)
        assert announced and announced[0] == live.group(2), (announced, live.group(2))
        return live.group(2), live.group(3), fragment

    with _client(runtime) as client:
        save("reading 3 files")
        v1, following, page = look(client)
        assert following == "1" and "reading 3 files" in page
        assert re.search(r'<div class="log" id="log-1" role="log" data-keep data-tail>', page)
        save("halfway")
        v2, following, page = look(client)
        assert v2 != v1 and v2.split(".")[0] == v1.split(".")[0]  # only the log moved
        assert "halfway" in page and following == "1"
        runtime.cancel("live", "b1")
        _, following, page = look(client)
        assert 'data-status="CANCELLED"' in page and following == "1"  # still running
        save("done, too late", closed=True)
        v4, following, page = look(client)
        assert following == "0" and "too late" in page and "data-tail" not in page
        assert 'data-outcome="DISCARDED"' in page and "." not in v4
        assert client.get("/pipelines/live/batches/b1/tasks/nope/stream").status_code == 404
        assert client.get(task + "/stream?instance=x").status_code == 400


def test_attempts_that_ran_no_handler_show_from_the_transitions(runtime, clock):
    """A breaker's deferral and a dead letter while queued ran nothing; a dead letter
    of a running attempt ends it, though its record (its worker died) says RUNNING."""
    from orchestrator.db.session import transaction
    from orchestrator.delivery import DEAD_LETTER_FROM
    from orchestrator.engine import claim, fail, resolve_task, start_batch
    from orchestrator.engine.attempts import AttemptRecord, save_log
    from orchestrator.engine.maintenance import requeue_due
    from orchestrator.engine.transitions import defer
    from tests.ui_support import spec_from_edges, sync

    sync(runtime.sessions, spec_from_edges("nr", {"t": [], "u": []}), clock.now())
    transaction(runtime.sessions, lambda s: start_batch(s, "nr", "b1", {}, clock.now()))
    dead = "dead-lettered after 5 delivery attempts"

    def deferred(s: Session) -> None:
        assert defer(s, resolve_task(s, "nr", "b1", "t"), 1, 30,
                     "circuit breaker 'warehouse' is open; next try in 30s", clock.now()).applied

    transaction(runtime.sessions, deferred)
    later = clock.advance(31)
    transaction(runtime.sessions, lambda s: requeue_due(s, later))

    def ran_then_lost(s: Session) -> None:
        row = resolve_task(s, "nr", "b1", "t")
        assert row.attempt == 2 and claim(s, row, 2, later) is not None
        save_log(s, row, 2, AttemptRecord(started_at=later, worker="w:9", log=[
            {"at": later.isoformat(), "stream": "stdout", "line": "loading 3 files"}]), later)

    transaction(runtime.sessions, ran_then_lost)
    for task, attempt in (("t", 2), ("u", 1)):
        transaction(runtime.sessions, lambda s, task=task, attempt=attempt: fail(
            s, resolve_task(s, "nr", "b1", task), attempt, dead, clock.advance(1),
            retry_delay_s=None, from_states=DEAD_LETTER_FROM))
    from tests.ui_support import close

    close(runtime.sessions, "nr", "b1", clock.advance(61))
    with _client(runtime) as client:
        t = client.get("/pipelines/nr/batches/b1/tasks/t").text
        u = client.get("/pipelines/nr/batches/b1/tasks/u").text
    # Its worker died with the record RUNNING: nothing more will come, so the page of
    # the ended batch does not listen.
    assert 'data-status="FAILED" data-following="0"' in t
    first, second = re.findall(r'<article class="attempt".*?</article>', t, re.S)
    assert 'data-attempt="1" data-outcome="RETRYING"' in first and "did not run" in first
    assert "circuit breaker &#39;warehouse&#39; is open" in first
    assert 'data-attempt="2" data-outcome="ERROR"' in second and dead in second
    assert "loading 3 files" in second and "did not run" not in second
    assert "still running" not in second and "data-tail" not in second
    [only] = re.findall(r'<article class="attempt".*?</article>', u, re.S)
    assert 'data-attempt="1" data-outcome="ERROR"' in only and "did not run" in only
    assert dead in only and "<details" not in only


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
            failed = re.search(r'<tr data-instance="(\d)"><td class="num"><a href="([^"]+)"',
                               load)
            assert failed
            east = client.get(html.unescape(failed.group(2))).text
            assert client.get("/pipelines/by_region/batches/bad/tasks/load?instance=9"
                              ).status_code == 404
            assert client.get("/pipelines/by_region/batches/bad/tasks/total?instance=0"
                              ).status_code == 404
            assert client.get("/pipelines/by_region/batches/bad/tasks/load?instance=-1"
                              ).status_code == 400
    node = re.search(r'data-task="load" data-status="ERROR">.*?</g>', batch, re.S)
    assert node and "ERROR · 3/4 · 1 failed" in node.group(0)
    assert re.search(r'<tr data-task="load" data-status="ERROR">.*?ERROR · 3/4 · 1 failed',
                     batch, re.S)
    # The mapped task's own attempt (its expansion) once, and each instance's attempt.
    bars = re.findall(r'class="label"[^>]*>(load[^<]*)</text>', batch)
    assert sorted(bars) == ["load #1", *(f"load[{i}] #1" for i in range(4))], bars
    instances = re.search(r'<section class="panel" id="instances">.*?</section>', load, re.S)
    assert instances and "(4)" in instances.group(0)
    rows = re.findall(r'<tr data-instance="(\d)"><td class="num"><a [^>]+>\d</a></td>'
                      r'<td><span class="status s-(\w+)"', instances.group(0))
    assert rows[0][1] == "error" and [r[1] for r in rows[1:]] == ["success"] * 3
    assert "east is broken" in instances.group(0)
    attempts = re.findall(r'<article class="attempt" id="attempt-([\d-]+)" data-attempt="1" '
                          r'data-outcome="(\w+)"', load)
    assert sorted(attempts) == sorted([("1", "ERROR"), *((f"{i}-1", "ERROR" if i == int(
        rows[0][0]) else "SUCCESS") for i in range(4))])
    assert "expanded into 4 instance(s)" in load
    # One instance's page: its attempt, with the error, the traceback and the log.
    index = rows[0][0]
    assert f"Attempts of load[{index}]" in east
    shown = re.findall(r'<article class="attempt" id="attempt-([\d-]+)"', east)
    assert shown == [f"{index}-1"]
    story = re.search(r'<details class="story".*?</details>', east, re.S)
    assert story and "PermanentError: east is broken" in story.group(0)
    assert '<pre class="traceback"' in story.group(0)
    assert f'data-stream="/pipelines/by_region/batches/bad/tasks/load/stream?instance={index}"' \
        in east


def test_a_scheduled_pipeline_shows_its_schedule_and_a_batch_its_deadline(runtime, clock):
    from orchestrator.pipeline.load import build_pipeline
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
