"""What ships: the function source archive built as terraform builds it (the
repository minus `source_excludes`, with the user's pipelines folder), installed as
the Python buildpack installs it (`pip install -r requirements.txt`, never the
checkout), and `route` served from it by functions-framework with terraform's
settings. A `python` task whose module sits in the shipped pipelines folder runs,
and every line it prints reaches the function's log as a Cloud Logging JSON entry
labelled with its batch, task and attempt."""

from __future__ import annotations

import fnmatch
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher, pubsub_request, reset_process_caches
from tests.pubsub_emulator import PubSubEmulator, pubsub_emulator  # noqa: F401
from tests.test_terraform import expr, locals_, variables

pytestmark = [pytest.mark.emulator, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

PIPELINE = """\
    name: shipped
    tasks:
      - name: report
        handler: python
        config: {callable: "shipped_tasks:report"}
"""
MODULE = """\
    import logging

    import orchestrator


    def report(ctx):
        print("computing the report")
        ctx.log.warning("two regions are late")
        return {"regions": 2, "orchestrator_from": orchestrator.__file__}
"""


def excluded(rel: str, patterns: list[str]) -> bool:
    """archive_file's `excludes`: a path, a folder (and all below it), or a glob."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        for i, prefix in enumerate(prefixes):
            if prefix == pat or fnmatch.fnmatch(prefix, pat):
                return True
            if pat.startswith("**/") and fnmatch.fnmatch(parts[i], pat[3:]):
                return True
    return False


def build_archive(out: Path, pipelines_dir: str) -> Path:
    """The zip terraform uploads: every file of the repository not excluded, and a
    pipelines folder with a pipeline and its module, as a user's repository has."""
    patterns = [str(p) for p in variables()["source_excludes"]["default"]]
    archive = out / "function-source.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(ROOT.rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if path.is_file() and not excluded(rel, patterns) \
                    and not rel.startswith(f"{pipelines_dir}/"):
                zf.write(path, rel)
        zf.writestr(f"{pipelines_dir}/shipped.yaml", textwrap.dedent(PIPELINE))
        zf.writestr(f"{pipelines_dir}/shipped_tasks.py", textwrap.dedent(MODULE))
    return archive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """/workspace as the buildpack leaves it: the archive unpacked, requirements
    installed (into `site`, with the dependencies this environment already has)."""
    tmp = tmp_path_factory.mktemp("function")
    pipelines_dir = str(variables()["pipelines_dir"]["default"])
    archive = build_archive(tmp, pipelines_dir)
    root = tmp / "workspace"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root)
    assert not (root / "tests").exists() and (root / "orchestrator").is_dir()
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(site), "-r", "requirements.txt"],
                   cwd=root, check=True, capture_output=True, timeout=300)
    return root, site, pipelines_dir


@pytest.fixture
def route(workspace: tuple[Path, Path, str], pg_url: str,
          pubsub_emulator: PubSubEmulator) -> Iterator[dict[str, Any]]:  # noqa: F811
    root, site, pipelines_dir = workspace
    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    pubsub_emulator.create_topic(topic)
    pubsub_emulator.create_topic(f"{topic}-events")
    settings_env = locals_()["settings_environment"]
    assert expr(settings_env["ORCHESTRATOR_PIPELINES_DIR"]) == "var.pipelines_dir"
    source = str(locals_()["build_environment"]["GOOGLE_FUNCTION_SOURCE"])
    env = {
        "PATH": os.environ["PATH"],
        # The installed package only: the buildpack's site-packages.
        "PYTHONPATH": str(site),
        "DATABASE_URL": pg_url,
        "ORCHESTRATOR_RUNTIME": "cloud",
        "ORCHESTRATOR_GCP_PROJECT": pubsub_emulator.project,
        "ORCHESTRATOR_TASKS_TOPIC": topic,
        "ORCHESTRATOR_EVENTS_TOPIC": f"{topic}-events",
        "ORCHESTRATOR_PIPELINES_DIR": pipelines_dir,
        "ORCHESTRATOR_LOG_FORMAT": str(variables()["log_format"]["default"]),
        "ORCHESTRATOR_WAREHOUSE": "bigquery",
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
    }
    port = free_port()
    log = root.parent / f"route-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "functions-framework"), "--target", "route", "--source", source,
             "--signature-type", "cloudevent", "--host", "127.0.0.1", "--port", str(port)],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield {"url": f"http://127.0.0.1:{port}", "log": log, "root": root, "site": site}
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_module_in_the_shipped_pipelines_folder_runs_and_logs_labelled_json(
        route: dict[str, Any], pg_engine: Engine, pg_url: str) -> None:
    reset_process_caches()
    published = RecordingPublisher()
    # The deploy job's side: sync the shipped folder, start a batch.
    operator = Runtime(Settings(database_url=pg_url), pg_engine, published)
    operator.sync(route["root"] / "pipelines")
    assert operator.start_batch("shipped", "2024-03")
    [message] = published.data
    headers, body = pubsub_request(message)
    request = urllib.request.Request(route["url"], data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200

    with pg_engine.connect() as conn:
        status, output, error = conn.execute(text(
            "SELECT status, output, error FROM task_log")).one()
    assert (status, error) == ("SUCCESS", None), route["log"].read_text()
    assert output["regions"] == 2
    assert output["orchestrator_from"].startswith(str(route["site"]))

    entries = [json.loads(line) for line in route["log"].read_text().splitlines()
               if line.startswith("{")]
    task_lines = [e for e in entries if e.get("stream")]
    assert [(e["message"], e["severity"]) for e in task_lines] == [
        ("computing the report", "INFO"), ("two regions are late", "WARNING")]
    for e in task_lines:
        assert e["logging.googleapis.com/labels"] == {
            "pipeline": "shipped", "batch_id": "2024-03", "task": "report", "attempt": "1"}
    with pg_engine.connect() as conn:
        log = conn.execute(text("SELECT log FROM task_attempts")).scalar_one()
    assert [e["line"] for e in log] == ["computing the report", "two regions are late"]
