"""Pipeline files as a user writes them, through the `orchestrator` command: broken
or hostile files are refused with one clear line and change nothing."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.app import app


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def error_line(result: Any) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_broken_yaml_is_one_line_naming_the_file_line_and_column(tmp_path):
    path = write(tmp_path / "broken.yaml", """\
        name: orders
        tasks:
          - name: a
            handler: noop
           oops: [1
    """)
    line = error_line(cli("pipelines", "sync", str(path), code=1))
    assert line.startswith(f"error: {path}: line 5, column 4: invalid YAML: ")
    assert "<unicode string>" not in line
    folder = error_line(cli("pipelines", "sync", str(tmp_path), code=1))
    assert "broken.yaml: line 5, column 4: invalid YAML" in folder
