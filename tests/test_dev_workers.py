"""`orchestrator dev --processes N` on PostgreSQL: its worker processes end with it,
however it ends (SIGTERM, Ctrl-C to the process group, SIGKILL), and a task in hand
when it ends is finished, not abandoned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc"),
]

BIN = Path(sys.executable).parent / "orchestrator"

SLOW = """\
    name: slow
    tasks:
      - name: nap
        handler: python
        gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
        config: {callable: "naps:nap"}
"""
# The task says when it starts and when it ends, in files next to the pipeline.
NAPS = """\
    import time
    from pathlib import Path

    HERE = Path(__file__).parent


    def nap(ctx):
        (HERE / "started").write_text("")
        time.sleep(2)
        (HERE / "ended").write_text("")
        return {"slept": True}
"""


def _state(pid: int) -> str | None:
    """The process's state letter, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _gone(pid: int) -> bool:
    return _state(pid) in (None, "Z", "X")  # a zombie has ended; only its parent may reap it


def _processes(field: int, value: int) -> list[int]:
    """The live processes whose stat field (after the name: 1 ppid, 2 process group) is
    `value`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[field]) == value and not _gone(int(entry)):
            found.append(int(entry))
    return found


def _children(pid: int) -> list[int]:
    return _processes(1, pid)


def _group(pgid: int) -> list[int]:
    return _processes(2, pgid)


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.05)


class Dev:
    def __init__(self, tmp_path: Path, pg_url: str):
        pipelines = tmp_path / "pipelines"
        pipelines.mkdir()
        (pipelines / "slow.yaml").write_text(textwrap.dedent(SLOW))
        (pipelines / "naps.py").write_text(textwrap.dedent(NAPS))
        self.pipelines = pipelines
        self.home = tmp_path
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
               "DATABASE_URL": pg_url}
        # Its own process group, as a terminal's foreground job has: Ctrl-C reaches all of it.
        self.proc = subprocess.Popen(
            [str(BIN), "dev", "--poll", "0.1", "--stop-after", "120", "--processes", "2"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        while "watching" not in line:
            assert line, self.proc.stderr.read() if self.proc.stderr else ""
            line = self.proc.stdout.readline()
        _wait_until(lambda: len(_children(self.proc.pid)) >= 2, "two worker processes")
        self.workers = _children(self.proc.pid)

    def start_task(self, batch_id: str) -> None:
        marker = self.home / ".orchestrator/buckets/landing/in" / batch_id / "_SUCCESS"
        marker.parent.mkdir(parents=True)
        marker.write_text("")
        _wait_until((self.pipelines / "started").exists, "the task to start")

    def all_ended(self) -> bool:
        """dev, the workers seen and any started since: nothing of its group remains."""
        return all(_gone(pid) for pid in self.workers) and not _group(self.proc.pid)

    def stop(self) -> None:
        # Whatever the test found, nothing of the group is left behind.
        if _group(self.proc.pid):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.communicate(timeout=30)


def _task_status(engine: Engine, batch_id: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text(
            "SELECT t.status FROM task_log t JOIN batches b ON b.id = t.batch_pk"
            " WHERE b.batch_id = :b"), {"b": batch_id}).scalar_one()


@pytest.mark.parametrize("how", ["SIGTERM to dev", "Ctrl-C to the process group"])
def test_stopping_dev_stops_its_workers_after_the_task_in_hand(
        tmp_path: Path, pg_engine: Engine, pg_url: str, how: str) -> None:
    dev = Dev(tmp_path, pg_url)
    try:
        dev.start_task("b1")
        if how == "SIGTERM to dev":
            dev.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(dev.proc.pid, signal.SIGINT)
        dev.proc.wait(60)
        # Before reading to the end: a worker left behind keeps dev's output open.
        _wait_until(dev.all_ended, "the workers to end")
        _out, errs = dev.proc.communicate(timeout=30)
    finally:
        dev.stop()
    assert dev.proc.returncode == 130, (dev.proc.returncode, errs)
    assert "Traceback" not in errs and "died" not in errs, errs
    # The task in hand was let finish.
    assert (dev.pipelines / "ended").exists()
    assert _task_status(pg_engine, "b1") == "SUCCESS"


def test_workers_end_on_their_own_when_dev_is_killed(
        tmp_path: Path, pg_engine: Engine, pg_url: str) -> None:
    dev = Dev(tmp_path, pg_url)
    try:
        dev.start_task("b2")
        dev.proc.kill()
        dev.proc.wait(30)
        _wait_until(dev.all_ended, "the workers to end")
    finally:
        dev.stop()
    # The worker that had the task finished it before it left.
    assert (dev.pipelines / "ended").exists()
    assert _task_status(pg_engine, "b2") == "SUCCESS"
