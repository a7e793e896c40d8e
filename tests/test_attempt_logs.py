"""Each attempt keeps its traceback and what the task printed and logged (bounded, the
cut marked), in task_attempts; `orchestrator logs` shows them; a task's print() no
longer mixes into the command line's output; in the cloud each line is a JSON
entry labelled with its batch, task and attempt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from orchestrator import handlers, logs, queries
from orchestrator.cli.app import app
from orchestrator.errors import PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.messages import StartBatch
from orchestrator.pipeline.load import build_pipeline
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.dags import sync

BIN = Path(sys.executable).parent / "orchestrator"
module_log = logging.getLogger("tests.attempt_logs")


def flaky(ctx: TaskContext) -> dict[str, Any]:
    print(f"attempt {ctx.attempt} starting")
    ctx.log.info("reading %d files", 3)
    print("a warning on stderr", file=sys.stderr)
    module_log.warning("the module's own logger")
    if ctx.attempt == 1:
        raise RuntimeError("disk full")
    return {"ok": True}


@pytest.fixture
def router(sessions: sessionmaker[Session], clock: Any) -> Iterator[tuple[Router, Any]]:
    reset_process_caches()
    published = RecordingPublisher()
    yield Router(sessions, published, clock=clock, attempt_log_bytes=4096), published
    handlers.unregister("flaky")
    handlers.unregister("chatty")


def run_one(router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any,
            handler: str, fn: Any, attempts: int = 2) -> None:
    rt, published = router
    handlers.register(handler, fn)
    spec = build_pipeline({"name": "p", "tasks": [{
        "name": "t", "handler": handler,
        "retry": {"max_attempts": attempts, "initial_delay_s": 0}}]}, known_handlers={handler})
    sync(sessions, spec, clock.now())
    rt.start_batch(StartBatch(type="start_batch", pipeline="p", batch_id="b1"))
    published.pump(rt)


def test_every_attempt_keeps_its_traceback_and_its_own_lines(
        router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any,
        capfd: pytest.CaptureFixture[str]) -> None:
    capfd.readouterr()
    run_one(router, sessions, clock, "flaky", flaky)
    with sessions() as s:
        doc = queries.task_attempts(s, "b1", "t")
    assert doc["status"] == "SUCCESS"
    first, second = doc["attempts"]
    assert (first["attempt"], first["outcome"]) == (1, "RETRYING")
    assert (second["attempt"], second["outcome"]) == (2, "SUCCESS")
    line = flaky.__code__.co_firstlineno + 6
    assert first["error"] == f"RuntimeError: disk full (at {__file__}:{line} in flaky)"
    assert f'File "{__file__}", line {line}, in flaky' in first["traceback"]
    assert first["traceback"].rstrip().endswith("RuntimeError: disk full")
    assert second["error"] is None and second["traceback"] is None
    for n, attempt in enumerate((first, second), start=1):
        assert [(e["stream"], e.get("level"), e["line"]) for e in attempt["log"]] == [
            ("stdout", None, f"attempt {n} starting"),
            ("log", "INFO", "reading 3 files"),
            ("stderr", None, "a warning on stderr"),
            ("log", "WARNING", "the module's own logger")]
        assert attempt["log_dropped"] == 0 and attempt["worker"]
    # None of it went to this process's own output.
    out, err = capfd.readouterr()
    assert "starting" not in out + err and "a warning on stderr" not in out + err


def chatty(ctx: TaskContext) -> dict[str, Any]:
    for i in range(5000):
        print(f"line {i:05d} " + "x" * 40)
    raise PermanentError("gave up")


def test_the_log_keeps_its_first_and_last_lines_and_marks_the_cut(
        router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any) -> None:
    run_one(router, sessions, clock, "chatty", chatty, attempts=1)
    with sessions() as s:
        [attempt] = queries.task_attempts(s, "b1", "t")["attempts"]
    lines = [e["line"] for e in attempt["log"]]
    assert lines[0].startswith("line 00000") and lines[-1].startswith("line 04999")
    marker = [line for line in lines if "left out" in line]
    assert len(marker) == 1 and f"{attempt['log_dropped']:,} line(s)" in marker[0]
    assert attempt["log_dropped"] + len(lines) - 1 == 5000
    assert sum(len(e["line"]) + 48 for e in attempt["log"]) <= 4096 + 200
    assert attempt["outcome"] == "ERROR" and attempt["error"] == "PermanentError: gave up"


def test_a_running_attempt_saves_its_lines_as_it_goes(
        router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any) -> None:
    """For `logs --follow`: the lines of a long attempt are in the table while it runs."""
    seen: list[Any] = []

    def slow(ctx: TaskContext) -> dict[str, Any]:
        print("first half done")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with sessions() as s:
                attempts = queries.task_attempts(s, "b1", "t")["attempts"]
            if attempts and attempts[0]["log"]:
                seen.append(attempts[0])
                break
            time.sleep(0.1)
        return {}

    run_one(router, sessions, clock, "chatty", slow, attempts=1)
    assert seen and seen[0]["outcome"] == "RUNNING"
    assert [e["line"] for e in seen[0]["log"]] == ["first half done"]


def test_in_the_cloud_every_task_line_is_json_labelled_with_its_attempt(
        router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any,
        capfd: pytest.CaptureFixture[str]) -> None:
    logs.configure("json", logging.INFO)
    try:
        capfd.readouterr()
        run_one(router, sessions, clock, "flaky", flaky)
        out = capfd.readouterr().out
    finally:
        logs.configure("text", logging.ERROR)
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    task_lines = [e for e in entries if e.get("stream")]
    assert [(e["message"], e["logging.googleapis.com/labels"]["attempt"]) for e in task_lines] == [
        ("attempt 1 starting", "1"), ("reading 3 files", "1"), ("a warning on stderr", "1"),
        ("the module's own logger", "1"),
        ("attempt 2 starting", "2"), ("reading 3 files", "2"), ("a warning on stderr", "2"),
        ("the module's own logger", "2")]
    for e in task_lines:
        assert e["logging.googleapis.com/labels"] | {"attempt": "x"} == {
            "pipeline": "p", "batch_id": "b1", "task": "t", "attempt": "x"}
    assert [e["severity"] for e in task_lines[:4]] == ["INFO", "INFO", "WARNING", "WARNING"]


def test_threads_that_capture_nothing_write_where_they_always_did() -> None:
    """In a plain process (no test harness handlers): another thread's print goes to
    stdout, and a library's warning with no handler of its own is still printed by
    Python's last resort, though the capture handler sits on the root logger."""
    script = textwrap.dedent("""\
        import logging, threading
        from orchestrator import capture
        log = capture.AttemptLog()
        def task():
            with capture.capturing(log):
                print("kept")
                logging.getLogger("lib").warning("kept too")
        t = threading.Thread(target=task); t.start(); t.join()
        print("not kept")
        logging.getLogger("lib").warning("a library warning, outside any task")
        print([e["line"] for e in log.entries()])
    """)
    done = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["not kept", "['kept', 'kept too']"]
    assert done.stderr.strip() == "a library warning, outside any task"


# -- the command line ----------------------------------------------------------------------


CHATTY = """\
    name: chatty
    tasks:
      - name: talk
        handler: python
        retry: {max_attempts: 2, initial_delay_s: 0}
        config: {callable: "talk:run"}
"""
TALK = """\
    import time


    def run(ctx):
        print(f"hello from attempt {ctx.attempt}")
        if ctx.attempt == 1:
            raise ValueError("bad row 7")
        time.sleep(float(ctx.params.get("sleep", 0)))
        print("bye")
        return {"said": 2}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "chatty.yaml").write_text(textwrap.dedent(CHATTY))
    (tmp_path / "pipelines" / "talk.py").write_text(textwrap.dedent(TALK))
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    return result


def test_logs_prints_each_attempt_and_the_task_output_stays_out_of_the_cli(
        project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(project)}
    subprocess.run([str(BIN), "pipelines", "sync"], cwd=project, env=env, check=True,
                   capture_output=True)
    started = subprocess.run([str(BIN), "batch", "start", "chatty", "c1"], cwd=project,
                             env=env, text=True, capture_output=True)
    assert started.returncode == 0, started.stderr
    assert "hello from attempt" not in started.stdout + started.stderr
    assert "SUCCESS" in started.stdout

    text = cli("logs", "c1", "talk").stdout
    assert text.index("attempt 1/2 · RETRYING") < text.index("hello from attempt 1")
    assert "error: ValueError: bad row 7 (at " in text
    assert 'talk.py", line 7, in run' in text
    assert text.index("attempt 2/2 · SUCCESS") < text.index("hello from attempt 2") < \
        text.index("bye")
    only = cli("logs", "c1", "talk", "--attempt", "2").stdout
    assert "hello from attempt 2" in only and "attempt 1" not in only
    doc = json.loads(cli("logs", "c1", "talk", "--json").stdout)
    assert doc["schema"] == "orchestrator.task_attempts/v1"
    assert [a["outcome"] for a in doc["attempts"]] == ["RETRYING", "SUCCESS"]
    assert "no attempt 3" in cli("logs", "c1", "talk", "--attempt", "3", code=1).stderr

    # With a Google Cloud project, the same lines are in Cloud Logging: say how to find them.
    monkeypatch.setenv("ORCHESTRATOR_GCP_PROJECT", "acme-data")
    err = cli("logs", "c1", "talk", "--attempt", "2").stderr
    assert ('labels.pipeline="chatty" AND labels.batch_id="c1" AND labels.task="talk" '
            'AND labels.attempt="2"') in err
    assert "https://console.cloud.google.com/logs/query;query=labels.pipeline%3D%22chatty" in err
    assert "?project=acme-data" in err


def test_logs_follow_prints_the_lines_of_a_running_task_until_it_is_done(
        project: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(project)}
    subprocess.run([str(BIN), "pipelines", "sync"], cwd=project, env=env, check=True,
                   capture_output=True)
    batch = subprocess.Popen([str(BIN), "batch", "start", "chatty", "f1", "--param",
                              "sleep=4"], cwd=project, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while cli("status", "--json").stdout.count('"f1"') == 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        follow = subprocess.run([str(BIN), "logs", "f1", "talk", "--follow", "--interval",
                                 "0.2"], cwd=project, env=env, text=True, capture_output=True,
                                timeout=30)
        assert batch.wait(30) == 0
    finally:
        batch.kill()
    out = follow.stdout
    assert follow.returncode == 0, follow.stderr
    assert out.index("hello from attempt 1") < out.index("ValueError: bad row 7") < \
        out.index("hello from attempt 2") < out.index("bye") < out.index(
            "attempt 2 ended: SUCCESS")


def test_sys_exit_in_a_task_fails_the_task_not_the_worker(
        router: tuple[Router, Any], sessions: sessionmaker[Session], clock: Any) -> None:
    def exits(ctx: TaskContext) -> dict[str, Any]:
        print("giving up")
        sys.exit(2)

    run_one(router, sessions, clock, "chatty", exits, attempts=1)
    with sessions() as s:
        [attempt] = queries.task_attempts(s, "b1", "t")["attempts"]
    assert attempt["outcome"] == "ERROR"
    assert attempt["error"].startswith("RuntimeError: the handler called sys.exit(2)")
    assert [e["line"] for e in attempt["log"]] == ["giving up"]
