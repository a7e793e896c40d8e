"""A bad batch id on the command line: one line saying what is wrong, and nothing changed."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import _one_error_line, clean_env, cli, write_yaml

__all__ = ["clean_env"]

FILES = """
name: files
tasks:
  - name: load
    handler: noop
    gcs_trigger: {bucket: landing, pattern: "in/{batch_id}/_SUCCESS"}
  - name: after
    handler: noop
    depends_on: [load]
"""

BAD = [
    ("bad id", "it contains a space"),
    ("a/b", "it contains a slash"),
    ("it's", "it contains a quote"),
    ('say"hi', "it contains a quote"),
    ("été-2024", "it contains the non-ASCII character 'é'"),
    ("", "it is empty"),
    ("x" * 129, "it is 129 characters long, at most 128"),
    ("2024-03\n", "it contains a line break"),
]


def _listing() -> list[dict[str, object]]:
    return json.loads(cli("status", "--json").stdout)["batches"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("batch_id, why", BAD)
def test_a_bad_batch_id_is_one_line_that_says_what_is_wrong(tmp_path, batch_id, why):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "files.yaml", FILES)))
    for args in (["batch", "start", "files", batch_id], ["run", "files", batch_id],
                 ["status", batch_id], ["batch", "retry", batch_id], ["why", batch_id, "load"],
                 ["logs", batch_id, "load"]):
        line = _one_error_line(cli(*args, code=2))
        assert line.startswith("error: invalid batch id "), (args, line)
        assert why in line and "pydantic" not in line and "http" not in line, (args, line)
    assert _listing() == []


def test_backfill_checks_every_id_before_starting_any(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "files.yaml", FILES)))
    line = _one_error_line(cli("batch", "backfill", "files", "--ids", "ok1,bad id,ok2", code=2))
    assert "invalid batch id 'bad id': it contains a space" in line
    assert "no batch was started" in line
    assert _listing() == []


def test_a_file_dropped_where_its_trigger_reads_a_bad_batch_id_is_not_stored(tmp_path):
    cli("pipelines", "sync", str(write_yaml(tmp_path / "files.yaml", FILES)))
    (tmp_path / "_SUCCESS").write_text("")
    line = _one_error_line(cli("drop", "_SUCCESS", "gs://landing/in/bad id/_SUCCESS", code=2))
    assert "not stored" in line and "invalid batch id 'bad id': it contains a space" in line
    assert not (tmp_path / ".orchestrator/buckets/landing/in/bad id").exists()
    assert _listing() == []
    # A good id on the same path pattern goes through.
    cli("drop", "_SUCCESS", "gs://landing/in/ok-1/_SUCCESS")
    assert [b["batch_id"] for b in _listing()] == ["ok-1"]
