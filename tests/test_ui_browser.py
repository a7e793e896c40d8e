"""The web UI in a real browser (Debian's Chromium, driven by Playwright), served by
`orchestrator ui` from the wheel, installed in a fresh environment: what a person
sees and clicks on the demo's batches.

Screenshots of every page go to the test's temporary folder; with
ORCHESTRATOR_UPDATE_SCREENSHOTS=1 they also replace the README's ones in docs/.
"""

from __future__ import annotations

import html
import http.server
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from orchestrator import queries
from orchestrator.db.models import TaskEvent
from orchestrator.db.session import make_engine, make_sessionmaker
from orchestrator.errors import NotFound
from tests import ui_prepare
from tests.ui_support import HOSTILE

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
DOCS = ROOT / "docs"
APRIL = "/pipelines/monthly_profit/batches/2024-04"
RED = "rgb(248, 113, 113)"  # --error in ui.css
GREEN = "rgb(134, 239, 172)"  # --success


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources, installed into a new environment whose
    only other import path is the test environment's dependencies (not its editable
    install of this project). Returns the environment's `bin/`."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("orchestrator", "functions"):
        shutil.copytree(ROOT / part, src / part, ignore=ignore)
    for part in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / part, src / part)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"),
          str(src)])
    wheel = next((tmp / "dist").glob("orchestrator-*.whl"))
    env = tmp / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)])
    python = env / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          str(wheel)])
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    # A path line, not a site dir: the test environment's .pth hooks do not run there.
    Path(site.stdout.strip(), "_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    where = _run([str(python), "-c", "import orchestrator.ui as u; print(u.__file__)"],
                 cwd=tmp)
    assert where.stdout.strip().startswith(str(env)), where.stdout
    return env / "bin"


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's two months, 2024-04 failed."""
    home = tmp_path_factory.mktemp("home")
    _run([sys.executable, "-m", "tests.ui_prepare", str(home), "failed"], cwd=ROOT)
    return home


@pytest.fixture(scope="module")
def other_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A batch with markup in its error, param and description; one of 10,000 tasks."""
    home = tmp_path_factory.mktemp("other")
    _run([sys.executable, "-m", "tests.ui_prepare", str(home), "extra"], cwd=ROOT)
    return home


class Server:
    def __init__(self, bin_dir: Path, home: Path, *extra: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"ui-{self.port}.log"
        env = {"PATH": os.environ["PATH"], "HOME": str(home), "ORCHESTRATOR_HOME": str(home)}
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [str(bin_dir / "orchestrator"), "ui", "--port", str(self.port), *extra],
                cwd=home.parent, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"orchestrator ui did not start:\n{self.log.read_text()}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="module")
def server(installed: Path, home: Path) -> Iterator[Server]:
    s = Server(installed, home)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def read_only_server(installed: Path, other_home: Path) -> Iterator[Server]:
    s = Server(installed, other_home, "--read-only")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    page = context.new_page()
    page.set_default_timeout(20_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, errors  # no script error on any page


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


DOC_PAGES = {"batches", "batch", "task", "pipeline", "events"}  # one picture of each page


def _shot(page: Any, shots: Path, name: str, full_page: bool = True) -> None:
    path = shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    if name in DOC_PAGES and os.environ.get("ORCHESTRATOR_UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(path, DOCS / f"ui-{name}.png")


def _sessions(home: Path) -> Any:
    return make_sessionmaker(make_engine(f"sqlite:///{home / 'metadata.db'}"))


def _node(page: Any, task: str) -> Any:
    return page.locator(f'svg.dag g.node[data-task="{task}"]')


def _fill(page: Any, task: str) -> str:
    return str(_node(page, task).locator("rect").evaluate("r => getComputedStyle(r).fill"))


# -- what a person sees -------------------------------------------------------------------


def test_the_failed_month_shows_load_expenses_red_and_calculate_profit_upstream_failed(
        server, page, shots):
    page.goto(server.url + APRIL)
    assert page.locator("h1 .status").inner_text() == "FAILED"
    assert _fill(page, "load_expenses") == RED
    assert "s-upstream_failed" in (_node(page, "calculate_profit").get_attribute("class") or "")
    assert _fill(page, "load_sales") == GREEN
    assert "UPSTREAM_FAILED" in (_node(page, "calculate_profit").text_content() or "")
    row = page.locator('tr[data-task="load_expenses"]')
    assert "has no column amount" in row.inner_text()
    # The timeline drew the attempts that ran: both loads, one of them red.
    assert page.locator("svg.timeline rect.span").count() == 2
    assert page.locator("svg.timeline rect.span.s-error").count() == 1
    _shot(page, shots, "batch")


def test_the_batches_page_lists_both_months_with_their_marks(server, page, shots):
    page.goto(server.url + "/")
    rows = page.locator('#batches tr[data-batch]')
    assert rows.count() == 2
    april = page.locator('#batches tr[data-batch="2024-04"]')
    assert april.locator(".status").inner_text() == "FAILED"
    assert page.locator('#batches tr[data-batch="2024-03"] .status').inner_text() == "SUCCESS"
    marks = page.locator('tr[data-pipeline="monthly_profit"] a.mark')
    assert [m.get_attribute("class") for m in marks.all()] == ["mark s-failed", "mark s-success"]
    page.select_option('select[name="status"]', "FAILED")
    page.click("text=Filter")
    page.wait_for_url("**/?*status=FAILED*")
    shown = [r.get_attribute("data-batch") for r in page.locator("#batches tr[data-batch]").all()]
    assert "2024-04" in shown and "2024-03" not in shown
    page.goto(server.url + "/")
    _shot(page, shots, "batches")


def test_the_task_page_says_why_and_shows_the_error_and_the_json(server, page, shots):
    page.goto(server.url + APRIL)
    _node(page, "load_expenses").locator("a").click()
    page.wait_for_url(f"**{APRIL}/tasks/load_expenses")
    assert page.locator("#why").inner_text().startswith(
        "load_expenses: failed on attempt 1/3 at ")
    assert "has no column amount" in page.locator("#error").inner_text()
    attempt = page.locator('#attempts article[data-attempt="1"]')
    assert attempt.locator(".status").inner_text() == "ERROR"
    assert "has no column amount" in attempt.locator('[data-role="error"]').inner_text()
    assert "expenses/2024-04/_SUCCESS" in page.locator("#input").inner_text()
    _shot(page, shots, "task-load")
    page.goto(server.url + APRIL + "/tasks/calculate_profit")
    assert "will not run: upstream load_expenses failed with" in page.locator("#why").inner_text()


def test_the_pipeline_and_events_pages(server, page, shots):
    page.goto(server.url + "/pipelines/monthly_profit")
    assert page.locator("svg.dag g.node").count() == 3
    assert page.locator('#definition tr[data-task="load_sales"]').inner_text().count(
        "gs://landing/sales/{batch_id}/_SUCCESS") == 1
    assert page.locator("#recent tr[data-batch]").count() == 2
    _shot(page, shots, "pipeline")
    page.goto(server.url + APRIL + "/events")
    assert page.locator("#events tbody tr").count() >= 8
    _shot(page, shots, "events")


class _Attacker(http.server.BaseHTTPRequestHandler):
    """A page on another origin that posts to the UI as soon as it loads."""

    target = ""

    def do_GET(self) -> None:
        body = f"""<!doctype html><html><body>
<form id="f" method="post" action="{html.escape(self.target)}">
<input name="confirmed" value="1"><input name="csrf_token" value="{'0' * 64}"></form>
<script>document.getElementById("f").submit()</script></body></html>""".encode()
        self.send_response(200)
        self.send_header("content-type", "text/html")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.parametrize("attacker_host", ["127.0.0.1", "localhost"])
def test_a_page_of_another_origin_cannot_retry_or_cancel(server, home, page, attacker_host):
    sessions = _sessions(home)
    with sessions() as s:
        before = s.execute(select(func.count()).select_from(TaskEvent)).scalar()
    page.goto(server.url + APRIL)  # the victim has the UI's cookie
    _Attacker.target = server.url + APRIL + "/retry"
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Attacker)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        page.goto(f"http://{attacker_host}:{httpd.server_address[1]}/")
        page.wait_for_url(_Attacker.target)
        assert "request refused" in page.locator("#error-message").inner_text()
    finally:
        httpd.shutdown()
        httpd.server_close()
    with sessions() as s:
        after = s.execute(select(func.count()).select_from(TaskEvent)).scalar()
        doc = queries.batch_status(s, "2024-04", "monthly_profit")
    assert after == before and doc["status"] == "FAILED"


def test_retry_reruns_the_failed_part_and_the_page_turns_green_without_a_reload(
        server, home, page, shots):
    _run([sys.executable, "-m", "tests.ui_prepare", str(home), "fixed"], cwd=ROOT)
    page.goto(server.url + APRIL)
    page.evaluate("window.__sameDocument = true")
    page.click("text=Retry failed tasks")
    dialog = page.locator("dialog#confirm")
    assert dialog.is_visible()
    assert "Rerun the 2 failed" in dialog.locator(".message").inner_text()
    dialog.locator("#confirm-ok").click()
    page.wait_for_selector('svg.dag g.node.s-success[data-task="calculate_profit"]',
                           timeout=60_000)
    page.wait_for_selector('h1 .status.s-success')
    assert page.evaluate("window.__sameDocument") is True  # updated in place, not reloaded
    assert _fill(page, "load_expenses") == GREEN
    assert page.locator("#notice").inner_text().endswith("task(s) queued again")
    assert page.locator("svg.timeline rect.span").count() == 4  # the retry's two attempts too
    _shot(page, shots, "batch-retried")
    with _sessions(home)() as s:
        doc = queries.batch_status(s, "2024-04", "monthly_profit")
    assert doc["status"] == "SUCCESS"
    assert {t["task"]: t["attempt"] for t in doc["tasks"]}["load_expenses"] == 2


def test_a_task_error_with_markup_shows_as_text_and_runs_nothing(read_only_server, page, shots):
    server = read_only_server
    page.goto(server.url + "/pipelines/hostile/batches/b1/tasks/load_a")
    assert page.locator("#error").inner_text() == HOSTILE
    assert page.locator("#error img, #error script").count() == 0
    # The attempt's error, the line it wrote on stderr and its traceback: text too.
    attempt = page.locator('#attempts article[data-attempt="1"]')
    assert attempt.locator('[data-role="error"]').inner_text() == HOSTILE
    assert attempt.locator(".log .ln-stderr .tx").inner_text() == HOSTILE
    assert attempt.locator("pre.traceback").inner_text().rstrip().endswith("\n" + HOSTILE)
    assert page.locator("#attempts img, #attempts script").count() == 0
    page.goto(server.url + "/pipelines/hostile/batches/b1")
    assert HOSTILE in page.locator("#summary").inner_text()  # the param
    assert page.locator('tr[data-task="load_a"] .error-line').inner_text() == HOSTILE
    page.goto(server.url + "/pipelines/hostile")
    assert HOSTILE in page.locator("#summary").inner_text()  # the description
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("main img").count() == 0
    _shot(page, shots, "escaping")


def test_read_only_shows_no_button_and_refuses_a_retry(read_only_server, other_home, page):
    page.goto(read_only_server.url + "/pipelines/hostile/batches/b1")
    assert page.locator(".pill").inner_text() == "read-only"
    assert page.locator("form.action").count() == 0
    status, body = page.evaluate("""async () => {
        const r = await fetch(location.pathname + "/retry", {method: "POST",
            headers: {"Accept": "application/json"},
            body: new URLSearchParams({confirmed: "1", csrf_token: ""})});
        return [r.status, await r.text()]; }""")
    assert status == 403 and "read-only" in body
    with _sessions(other_home)() as s:
        assert queries.batch_status(s, "b1", "hostile")["status"] == "FAILED"


def test_a_batch_of_10000_tasks_opens_paged_with_its_counts(read_only_server, page, shots):
    response = page.goto(read_only_server.url + "/pipelines/wide/batches/big-1")
    assert response.ok
    assert "10000 tasks: too many to draw" in page.locator("#graph").inner_text()
    assert page.locator("#tasks tr[data-task]").count() == 200
    assert "page 1 of 50" in page.locator("#tasks .pager").inner_text()
    assert "999 ERROR" in page.locator("#tasks .chips").inner_text()
    page.click("#tasks .chips >> text=ERROR")
    page.wait_for_url("**status=ERROR*")
    assert page.locator("#tasks tr[data-status=ERROR]").count() == 200
    _shot(page, shots, "batch-10k", full_page=False)


# -- a task's attempts: traceback, lines, live ---------------------------------------------

ORDERS = "/pipelines/orders/batches/2024-04/tasks/enrich"
STDERR_RED = "rgb(252, 165, 165)"  # .log .ln-stderr in ui.css
WARNING_AMBER = "rgb(252, 211, 77)"


def _colour(locator: Any) -> str:
    return str(locator.evaluate("e => getComputedStyle(e).color"))


def test_a_failed_python_task_shows_its_traceback_and_the_lines_it_printed(
        read_only_server, page, shots):
    page.goto(read_only_server.url + "/pipelines/orders/batches/2024-04")
    _node(page, "enrich").locator("a").click()
    page.wait_for_url(f"**{ORDERS}")
    assert page.locator("#attempts article.attempt").count() == 2
    last = page.locator('#attempts article[data-attempt="2"]')
    assert last.get_attribute("data-outcome") == "ERROR"
    # The newest attempt is unfolded: its lines, each coloured by where it came from.
    log = last.locator(".log")
    assert log.is_visible()
    assert [ln.inner_text().split(" ", 1)[1] for ln in log.locator(".ln").all()] == [
        "stdout reading 1200 rows from extract",
        "INFO joining 1200 rows with customers",
        "WARNING vendor.currency: slow response from the currency API (2.3 s)",
        "stderr DeprecationWarning: 'currency' is deprecated, use 'currency_code'"]
    assert _colour(log.locator(".ln-stderr .tx")) == STDERR_RED
    assert _colour(log.locator(".ln.lv-warning .tx")) == WARNING_AMBER
    traceback = last.locator("pre.traceback")
    assert traceback.is_visible()
    text = traceback.inner_text()
    assert text.startswith("Traceback (most recent call last):")
    line = ui_prepare.TASKS.splitlines().index("def _amount(row):") + 2
    assert f'uitasks.py", line {line}, in _amount' in text
    assert text.rstrip().endswith("KeyError: 'amount'")
    assert "KeyError: 'amount' (at " in last.locator('[data-role="error"]').inner_text()
    # The first attempt's story is folded; one click shows it.
    first = page.locator('#attempts article[data-attempt="1"]')
    assert first.get_attribute("data-outcome") == "RETRYING"
    assert not first.locator("pre.traceback").is_visible()
    first.locator("summary").click()
    assert first.locator("pre.traceback").is_visible()
    first.locator("summary").click()
    page.locator("#attempts").scroll_into_view_if_needed()
    _shot(page, shots, "task")


# Counts the page's event sources, to see them closed.
WATCH_SOURCES = """(() => {
  const Native = window.EventSource;
  window.__sources = [];
  window.EventSource = class extends Native {
    constructor(url, init) { super(url, init); window.__sources.push(this); }
  };
})();"""


def test_a_running_tasks_lines_appear_as_it_prints_them_and_the_page_then_stops_listening(
        read_only_server, other_home, page, shots):
    """Another process runs the task (as a worker in the cloud would); the page shows
    its lines as the worker saves them, then its end, without a reload."""
    page.add_init_script(WATCH_SOURCES)
    log = other_home.parent / "live-run.log"
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "tests.ui_prepare", str(other_home),
                                "live"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        sessions = _sessions(other_home)
        deadline = time.monotonic() + 60
        while True:
            try:
                with sessions() as s:
                    doc = queries.batch_status(s, "live-1", "ticker")
                if doc["tasks"][0]["status"] == "RUNNING":
                    break
            except (NotFound, SQLAlchemyError):  # not started yet, or the file is busy
                pass
            assert run.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        page.goto(read_only_server.url + "/pipelines/ticker/batches/live-1/tasks/tick")
        page.evaluate("window.__sameDocument = true")
        running = page.locator('#attempts article[data-outcome="RUNNING"]')
        running.locator(".log .ln").first.wait_for(timeout=30_000)
        shown = running.locator(".log .ln").count()
        assert 0 < shown < 30  # some of its lines, while it runs
        _shot(page, shots, "task-running")
        (other_home / "pipelines" / "release-tick").touch()
        done = page.locator('#attempts article[data-attempt="1"][data-outcome="SUCCESS"]')
        done.wait_for(timeout=30_000)
        lines = done.locator(".log .ln .tx")
        assert lines.count() == 30 and lines.last.inner_text() == "tick 29"
        assert page.evaluate("window.__sameDocument") is True  # updated in place
        # The log followed its last line; the page no longer listens.
        assert done.locator(".log").evaluate(
            "e => e.scrollHeight > e.clientHeight && "
            "e.scrollHeight - e.scrollTop - e.clientHeight < 8")
        states = page.evaluate("window.__sources.map(s => [s.url, s.readyState])")
        assert states and all(url.endswith("/tasks/tick/stream") and state == 2
                              for url, state in states), states
        assert run.wait(60) == 0, log.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(10)
