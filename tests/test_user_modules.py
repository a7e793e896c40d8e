"""A pipeline's Python modules: they import from the pipelines folder with no
PYTHONPATH, a module that cannot load fails its task at once saying where, and
`orchestrator dev` reloads a module that changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import usercode
from orchestrator.db.models import TaskAttempt
from orchestrator.messages import StartBatch
from orchestrator.router import Router
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.conftest import FakeClock
from tests.dags import sync
from tests.units import statuses

BIN = Path(sys.executable).parent / "orchestrator"


def clean_env(home: Path) -> dict[str, str]:
    """No PYTHONPATH, no ORCHESTRATOR_* settings: a new user's shell."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "PYTHONUNBUFFERED": "1"}


def run(cwd: Path, *args: str, code: int = 0, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(BIN), *args], cwd=cwd, env=clean_env(cwd), text=True,
                          capture_output=True, timeout=timeout)
    assert done.returncode == code, (done.returncode, done.stdout, done.stderr)
    return done


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


ORDERS = """\
    name: orders
    tasks:
      - name: load
        handler: python
        config: {callable: "mytasks:load"}
      - name: enrich
        handler: python
        depends_on: [load]
        config: {callable: "mytasks:enrich", kwargs: {factor: 10}}
"""
MYTASKS = """\
    def load(ctx):
        return {"rows": 3}


    def enrich(ctx, factor):
        return {"rows": ctx.parents["load"]["rows"] * factor}
"""


def test_a_module_beside_the_pipeline_imports_in_every_command_without_pythonpath(
        tmp_path: Path) -> None:
    """pipelines/orders.yaml names mytasks:load; mytasks.py is beside it. Synced in one
    process and run in another (as a user does), the batch succeeds."""
    write(tmp_path / "pipelines" / "orders.yaml", ORDERS)
    write(tmp_path / "pipelines" / "mytasks.py", MYTASKS)
    assert "orders: synced" in run(tmp_path, "pipelines", "sync", "pipelines/").stdout
    run(tmp_path, "batch", "start", "orders", "b1")
    doc = json.loads(run(tmp_path, "status", "b1", "--json").stdout)
    assert doc["status"] == "SUCCESS", doc
    assert doc["tasks"][1]["output"] == {"rows": 30}


def test_run_with_a_file_elsewhere_imports_its_folder_and_warns_about_other_processes(
        tmp_path: Path) -> None:
    """`run --file other/orders.yaml` runs its tasks itself, so it finds other/mytasks.py;
    it also says that workers elsewhere will not."""
    write(tmp_path / "other" / "orders.yaml", ORDERS)
    write(tmp_path / "other" / "mytasks.py", MYTASKS)
    done = run(tmp_path, "run", "orders", "r1", "--file", "other/orders.yaml")
    assert "SUCCESS" in done.stdout
    warning = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 2 and "not the pipelines folder" in warning[0], done.stderr
    assert "ORCHESTRATOR_PIPELINES_DIR" in warning[0]


# -- a module that cannot load -------------------------------------------------------------


BROKEN = {
    "syntax": ("def run(ctx)\n    return {}\n", "SyntaxError: expected ':'", "line 1"),
    "raises": ("import json\nLIMIT = 1 / 0\n\ndef run(ctx):\n    return {}\n",
               "ZeroDivisionError while importing", ":2"),
    "missing": ("import no_such_dependency_xyz\n\ndef run(ctx):\n    return {}\n",
                "imports 'no_such_dependency_xyz', which is not installed", ":1"),
}


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "code"
    folder.mkdir()
    usercode.add_path(folder)
    yield folder
    sys.path.remove(str(folder.resolve()))


@pytest.mark.postgres
@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_a_module_that_cannot_load_fails_the_task_at_once_naming_file_and_line(
        kind: str, module_dir: Path, pg_sessions: sessionmaker[Session],
        clock: FakeClock) -> None:
    """A SyntaxError (or any error while importing the module) is no transient failure:
    attempt 1 ends in ERROR with the file and line, though two more attempts were left."""
    source, message, line = BROKEN[kind]
    name = f"broken_{kind}_{uuid.uuid4().hex[:8]}"
    (module_dir / f"{name}.py").write_text(source)
    reset_process_caches()
    published = RecordingPublisher()
    router = Router(pg_sessions, published, clock=clock)
    spec = {"name": "p", "tasks": [{"name": "t", "handler": "python",
                                    "config": {"callable": f"{name}:run"},
                                    "retry": {"max_attempts": 3}}]}
    from orchestrator.pipeline.load import build_pipeline

    sync(pg_sessions, build_pipeline(spec), clock.now())
    router.start_batch(StartBatch(type="start_batch", pipeline="p", batch_id="b1"))
    published.pump(router)
    assert statuses(pg_sessions) == {"t": "ERROR"}
    with pg_sessions() as s:
        attempts = s.execute(select(TaskAttempt)).scalars().all()
    assert [(a.attempt, a.outcome) for a in attempts] == [(1, "ERROR")]
    error = attempts[0].error or ""
    assert message in error and f"{module_dir.resolve() / name}.py" in error and line in error
    # The traceback is the module's own: its file, not the import machinery.
    assert f'File "{module_dir.resolve() / name}.py", line' in (attempts[0].traceback or "")
    assert "importlib" not in (attempts[0].traceback or "")


def test_an_unknown_module_says_where_it_was_looked_for(module_dir: Path) -> None:
    with pytest.raises(usercode.ImportFailed) as info:
        usercode.load_callable("no_module_by_this_name:run")
    assert "no module named 'no_module_by_this_name'" in str(info.value)
    assert str(module_dir.resolve()) in str(info.value)


# -- reloading in `orchestrator dev` ---------------------------------------------------------


def bump(path: Path, text: str) -> None:
    """Rewrite a file with a later mtime (a quick edit may not move it on a coarse clock)."""
    before = path.stat().st_mtime
    path.write_text(text)
    os.utime(path, (before + 2, before + 2))


def test_a_changed_module_is_reloaded_and_a_broken_edit_keeps_the_old_one(
        module_dir: Path) -> None:
    name = f"edited_{uuid.uuid4().hex[:8]}"
    path = module_dir / f"{name}.py"
    path.write_text("def run(ctx):\n    return {'v': 1}\n")
    assert usercode.load_callable(f"{name}:run")(None) == {"v": 1}
    assert usercode.reload_changed() == []
    bump(path, "def run(ctx):\n    return {'v': 2}\n")
    assert usercode.reload_changed() == [(name, None)]
    assert usercode.load_callable(f"{name}:run")(None) == {"v": 2}
    bump(path, "def run(ctx)\n    return {'v': 3}\n")
    [(reloaded, problem)] = usercode.reload_changed()
    assert reloaded == name and problem is not None and "SyntaxError" in problem
    assert usercode.load_callable(f"{name}:run")(None) == {"v": 2}


WAITS = """\
    name: files
    tasks:
      - name: load
        handler: python
        gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
        config: {callable: "version:run"}
"""


def test_dev_reloads_a_changed_module_and_the_next_run_uses_it(tmp_path: Path) -> None:
    write(tmp_path / "pipelines" / "files.yaml", WAITS)
    module = write(tmp_path / "pipelines" / "version.py",
                   "def run(ctx):\n    return {'version': 1}\n")
    proc = subprocess.Popen(
        [str(BIN), "dev", "--poll", "0.1", "--stop-after", "30"], cwd=tmp_path,
        env=clean_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def wait_for(text: str) -> None:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        while not any(text in line for line in lines):
            assert time.monotonic() < deadline, lines
            line = proc.stdout.readline()
            assert line, (lines, proc.stderr.read() if proc.stderr else "")
            lines.append(line)

    def drop(batch: str) -> None:
        marker = tmp_path / ".orchestrator" / "buckets" / "landing" / "in" / batch / "_SUCCESS"
        marker.parent.mkdir(parents=True)
        marker.write_text("")

    try:
        wait_for("watching")
        drop("d1")
        wait_for("batch files/d1 finished")
        bump(module, "def run(ctx):\n    return {'version': 2}\n")
        wait_for("reloaded module version")
        drop("d2")
        wait_for("batch files/d2 finished")
    finally:
        proc.terminate()
        proc.wait(10)
    outputs = {}
    for batch in ("d1", "d2"):
        doc: dict[str, Any] = json.loads(run(tmp_path, "status", batch, "--json").stdout)
        outputs[batch] = doc["tasks"][0]["output"]
    assert outputs == {"d1": {"version": 1}, "d2": {"version": 2}}
