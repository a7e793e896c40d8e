"""Structured logs: JSON lines Cloud Logging understands, readable text locally."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchestrator import bootstrap, logs
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    RecordingPublisher,
    function_client,
    pubsub_request,
    reset_process_caches,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """JSON logs, written to a buffer the test reads instead of stdout."""
    out = io.StringIO()
    logs.configure("json")
    logs.log.handlers[0].setStream(out)  # type: ignore[attr-defined]
    yield out
    logs.configure("text")


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_json_line_has_severity_message_and_labels(
        json_logs: io.StringIO) -> None:
    """severity and message at the top, pipeline/batch/task/attempt as labels."""
    logs.warning("will retry in 10s", pipeline="sales", batch_id="2024-03", task="load",
                 attempt=2, outcome="retrying")
    (entry,) = lines(json_logs.getvalue())
    assert entry["severity"] == "WARNING"
    assert entry["message"] == "will retry in 10s"
    assert entry["logging.googleapis.com/labels"] == {
        "pipeline": "sales", "batch_id": "2024-03", "task": "load", "attempt": "2"}
    assert entry["outcome"] == "retrying"


def test_json_line_without_labels_has_no_label_block(
        json_logs: io.StringIO) -> None:
    """Labels appear only when known."""
    logs.error("sweep failed")
    (entry,) = lines(json_logs.getvalue())
    assert entry["severity"] == "ERROR" and "logging.googleapis.com/labels" not in entry


def test_text_line_is_readable(capsys: pytest.CaptureFixture[str]) -> None:
    """Locally: level, pipeline/batch/task, message, then the other fields."""
    logs.configure("text")
    logs.info("succeeded in 3.0 ms", pipeline="sales", batch_id="2024-03", task="load",
              attempt=1)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("INFO")
    assert "sales/2024-03/load succeeded in 3.0 ms" in err and "attempt=1" in err


def test_functions_main_configures_json_logs_from_settings() -> None:
    """ORCHESTRATOR_LOG_FORMAT=json at import: the function's logs are JSON on stdout."""
    code = ("import functions.main\nfrom orchestrator import logs\n"
            "logs.info('hello', pipeline='p', batch_id='b', task='t', attempt=3)\n")
    env = {**os.environ, "ORCHESTRATOR_LOG_FORMAT": "json"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True, timeout=60).stdout
    (entry,) = lines(out)
    assert entry["severity"] == "INFO" and entry["message"] == "hello"
    assert entry["logging.googleapis.com/labels"]["attempt"] == "3"


@pytest.mark.postgres
def test_route_logs_each_outcome_as_json_with_labels_and_delivery_attempt(
        json_logs: io.StringIO, pg_engine: Any, pg_url: str) -> None:
    """A routed message's JSON line carries its labels and the Pub/Sub delivery attempt."""
    from tests.dags import spec_from_edges

    reset_process_caches()
    rt = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher())
    rt.sync_specs([spec_from_edges("two", {"a": [], "b": ["a"]})])
    client = function_client("route")
    # Loading functions/main.py configured text logs again.
    logs.configure("json")
    logs.log.handlers[0].setStream(json_logs)  # type: ignore[attr-defined]
    with bootstrap.use(rt):
        headers, body = pubsub_request({"type": "start_batch", "pipeline": "two",
                                        "batch_id": "j1"}, delivery_attempt=2)
        assert client.post("/", headers=headers, data=body).status_code == 200
        headers, body = pubsub_request(b"{oops")
        assert client.post("/", headers=headers, data=body).status_code == 200
    started, rejected = lines(json_logs.getvalue())
    assert started["severity"] == "INFO" and started["outcome"] == "started"
    assert started["delivery_attempt"] == 2
    assert started["logging.googleapis.com/labels"] == {"pipeline": "two", "batch_id": "j1"}
    assert rejected["severity"] == "WARNING" and "not JSON" in rejected["message"]


def test_the_entry_module_reads_log_format_as_the_settings_do() -> None:
    """functions/main.py reads the `log_format` setting without the settings model: the
    same variable, in any case, with the same default."""
    from orchestrator.settings import Settings, environment_name

    assert environment_name(Settings, "log_format") == logs.LOG_FORMAT_ENV
    assert logs.format_from_environment({}) == Settings.model_fields["log_format"].default
    for env in ({"ORCHESTRATOR_LOG_FORMAT": "json"}, {"orchestrator_log_format": "json"}):
        assert logs.format_from_environment(env) == "json"
