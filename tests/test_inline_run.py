"""`orchestrator run`: one batch, to the end, in this process; exit code 0 or 1."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.errors import PermanentError

pytestmark = pytest.mark.postgres


def ok(ctx: Any) -> dict[str, Any]:
    return {"n": len(ctx.parents), "params": ctx.params, "trigger": ctx.trigger}


def broken(ctx: Any) -> dict[str, Any]:
    raise PermanentError("the report server said no")


PIPELINE = """
name: inline
tasks:
  - name: extract
    handler: python
    config: {callable: "tests.test_inline_run:ok"}
  - name: report
    handler: python
    depends_on: [extract]
    config: {callable: "tests.test_inline_run:REPORT"}
    retry: {max_attempts: 1}
"""

FILE_TRIGGERED = """
name: landed
tasks:
  - name: load
    handler: python
    config: {callable: "tests.test_inline_run:ok"}
    gcs_trigger: {bucket: landing, pattern: "sales/{batch_id}/_SUCCESS"}
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_engine: Engine, pg_url: str) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DATABASE_URL", pg_url)
    return tmp_path


def run(*args: str) -> Any:
    result = CliRunner().invoke(app, ["run", *args])
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


def write(folder: Path, name: str, text: str, **subst: str) -> Path:
    path = folder / name
    body = textwrap.dedent(text)
    for k, v in subst.items():
        body = body.replace(k, v)
    path.write_text(body)
    return path


def test_a_batch_that_succeeds_exits_0_and_prints_the_status_table(env: Path) -> None:
    f = write(env, "inline.yaml", PIPELINE, REPORT="ok")
    result = run("inline", "ci-1", "--file", str(f), "--param", "region=north")
    assert result.exit_code == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "extract" in result.stdout and "report" in result.stdout


def test_a_batch_that_fails_exits_1(env: Path) -> None:
    f = write(env, "inline.yaml", PIPELINE, REPORT="broken")
    result = run("inline", "ci-2", "--file", str(f))
    assert result.exit_code == 1
    assert "ERROR" in result.stdout and "the report server said no" in result.stdout


def test_a_batch_id_that_exists_is_refused(env: Path) -> None:
    f = write(env, "inline.yaml", PIPELINE, REPORT="ok")
    assert run("inline", "ci-3", "--file", str(f)).exit_code == 0
    again = run("inline", "ci-3")
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_a_root_waiting_for_its_file_fails_the_run_unless_forced(env: Path) -> None:
    f = write(env, "landed.yaml", FILE_TRIGGERED)
    waiting = run("landed", "2024-03", "--file", str(f), "--timeout", "5")
    assert waiting.exit_code == 1 and "waiting for a file: load" in waiting.stderr
    forced = run("landed", "2024-04", "--force")
    assert forced.exit_code == 0, forced.stdout + forced.stderr
    assert "released without their file: load" in forced.stderr
