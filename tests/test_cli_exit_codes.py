"""Exit codes a script can rely on: a failure already known, a timeout, an interrupt."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any

from tests.test_cli import BIN, clean_env, cli, status_json, write_yaml

__all__ = ["clean_env"]

HALF_WAITING = """
name: half
tasks:
  - name: waits
    handler: noop
    gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
  - name: breaks
    handler: python
    config: {callable: "tests.test_cli:always_fails"}
    retry: {max_attempts: 1}
  - name: after
    handler: noop
    depends_on: [breaks]
"""

SLOW = """
name: slow
tasks:
  - name: naps
    handler: python
    config: {callable: "tests.test_cli_exit_codes:nap"}
"""


def nap(ctx: Any) -> dict[str, Any]:
    while ctx.is_active():  # until its timeout or the batch's end; never a timed assert
        time.sleep(0.05)
    return {}


def test_batch_start_exits_3_when_a_task_failed_while_another_waits_for_its_file(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "half.yaml", HALF_WAITING)))
    result = cli("batch", "start", "half", "h1", code=3)
    assert "ERROR" in result.stdout and "UPSTREAM_FAILED" in result.stdout
    doc = status_json("h1")
    assert doc["status"] == "RUNNING"  # still open: `waits` waits for its file
    assert doc["counts"] == {"PENDING": 1, "ERROR": 1, "UPSTREAM_FAILED": 1}
    # `batch retry` of the failed part returns with the same knowledge, and says so.
    cli("batch", "retry", "h1", code=3)
    # A backfill over such batches says it too.
    assert "still open" in cli("batch", "backfill", "half", "--ids", "h2", code=3).stderr


def test_a_timeout_has_its_own_exit_code(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "slow.yaml", SLOW)))
    result = cli("batch", "backfill", "slow", "--ids", "s1", "--timeout", "0.2", code=4)
    assert "timed out after 0.2 s" in result.stderr
    result = cli("batch", "start", "slow", "s2", "--timeout", "0.2", code=4)
    assert "stopped waiting (--timeout)" in result.stderr
    cli("batch", "cancel", "s1")
    cli("batch", "cancel", "s2")


def test_ctrl_c_stops_dev_with_exit_code_130(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(BIN), "dev", "--poll", "0.1"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while "watching" not in line:
            assert line, proc.stderr.read() if proc.stderr else ""
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGINT)
        out, errs = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, out, errs)
    assert "Traceback" not in errs, errs


def test_drop_exits_3_when_the_file_it_delivers_fails(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "onfile.yaml", """
        name: onfile
        tasks:
          - name: load
            handler: python
            gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
            config: {callable: "tests.test_cli:always_fails"}
            retry: {max_attempts: 1}
    """)))
    (tmp_path / "_SUCCESS").write_text("")
    result = cli("drop", "_SUCCESS", "gs://landing/in/f1/_SUCCESS", code=3)
    assert "ERROR" in result.stdout
    assert status_json("f1")["status"] == "FAILED"
