"""`orchestrator dev` picks up an edited pipeline file, and the module it names, without a
restart: a real `dev` process, the files changed under it."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
from pathlib import Path

from tests.test_cli import BIN, clean_env, cli, status_json

__all__ = ["clean_env"]

V1 = """
name: files
tasks:
  - name: load
    handler: python
    gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
    config: {callable: "mytasks:stamp"}
"""
V2 = V1 + """
  - name: report
    handler: noop
    depends_on: [load]
"""
MODULE_V1 = "def stamp(ctx):\n    return {'v': 1}\n"
MODULE_V2 = "def stamp(ctx):\n    return {'v': 2, 'edited': True}\n"


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    later = time.time() + 2  # a new mtime whatever the file system's clock granularity
    os.utime(path, (later, later))


class Console:
    def __init__(self, proc: subprocess.Popen[str]):
        self.proc = proc
        self.lines: list[str] = []

    def wait_for(self, *texts: str) -> None:
        assert self.proc.stdout is not None
        while not all(any(t in line for line in self.lines) for t in texts):
            line = self.proc.stdout.readline()
            assert line, (texts, self.lines, self.proc.stderr.read() if self.proc.stderr else "")
            self.lines.append(line)


def test_dev_syncs_an_edited_pipeline_file_and_new_batches_run_the_new_version(tmp_path):
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    _write(pipes / "files.yaml", V1)
    _write(pipes / "mytasks.py", MODULE_V1)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "PYTHONDONTWRITEBYTECODE": "1", "ORCHESTRATOR_PIPELINES_DIR": str(pipes)}
    proc = subprocess.Popen([str(BIN), "dev", "--poll", "0.1", "--stop-after", "90"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    console = Console(proc)
    bucket = tmp_path / ".orchestrator/buckets/landing/in"
    try:
        console.wait_for("pipeline files: version 1", "watching")
        (bucket / "b1").mkdir(parents=True)
        (bucket / "b1/_SUCCESS").write_text("")
        console.wait_for("batch files/b1 finished")

        _write(pipes / "files.yaml", V2)
        _write(pipes / "mytasks.py", MODULE_V2)
        console.wait_for("reloaded pipeline files from files.yaml: version 2",
                         "reloaded module mytasks")
        (bucket / "b2").mkdir()
        (bucket / "b2/_SUCCESS").write_text("")
        console.wait_for("batch files/b2 finished")
    finally:
        proc.terminate()
        proc.wait(30)
    assert "new batches run it, running ones keep theirs" in "".join(console.lines)

    os.environ["ORCHESTRATOR_PIPELINES_DIR"] = str(pipes)
    try:
        assert [t["task"] for t in status_json("b1")["tasks"]] == ["load"]
        b2 = status_json("b2")
        assert [(t["task"], t["status"]) for t in b2["tasks"]] == [
            ("load", "SUCCESS"), ("report", "SUCCESS")]
        assert json.loads(cli("output", "b1", "load").stdout) == {"v": 1}
        assert json.loads(cli("output", "b2", "load").stdout) == {"v": 2, "edited": True}
    finally:
        del os.environ["ORCHESTRATOR_PIPELINES_DIR"]


def test_dev_keeps_the_stored_version_while_the_edited_file_is_invalid(tmp_path):
    pipes = tmp_path / "pipes"
    pipes.mkdir()
    _write(pipes / "files.yaml", V1.replace("mytasks:stamp", "os:getcwd"))
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
           "ORCHESTRATOR_PIPELINES_DIR": str(pipes)}
    proc = subprocess.Popen([str(BIN), "dev", "--poll", "0.1", "--stop-after", "60"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    console = Console(proc)
    try:
        console.wait_for("watching")
        _write(pipes / "files.yaml", V2.replace("depends_on: [load]", "depends_on: [nope]"))
        console.wait_for("files.yaml changed but cannot be synced, keeping the stored versions")
        assert "depends on unknown task 'nope'" in console.lines[-1]
        versions = {p["pipeline"]: p["version"]
                    for p in json.loads(cli("pipelines", "list", "--json").stdout)}
        assert versions == {"files": 1}
        _write(pipes / "files.yaml", V2.replace("mytasks:stamp", "os:getcwd"))
        console.wait_for("reloaded pipeline files from files.yaml: version 2")
    finally:
        proc.terminate()
        proc.wait(30)
