"""What ships: the function source archive as terraform builds it (the deployment
module reads `data.archive_file.source`), with a pipeline and its Python module in
the deployment's pipelines folder, as a user's repository has them; installed as
the Python buildpack installs it (`pip install -r requirements.txt`, never the
checkout); and `route` served from it by functions-framework with the environment
terraform gives it. The module imports with no PYTHONPATH, and every line the task
prints reaches the function's log as a Cloud Logging JSON entry labelled with its
batch, task and attempt.

The full rehearsal (tests/test_rehearsal.py) runs the deployment's own pipelines;
this one adds a python task, which those pipelines do not have.
"""

from __future__ import annotations

import json
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
from scripts.deployment import Deployment, function_archive
from tests import rehearsal as r
from tests.emulators import PROJECT
from tests.pubsub_emulator import PubSubEmulator, pubsub_emulator  # noqa: F401
from tests.test_rehearsal import Computed

pytestmark = [pytest.mark.emulator, pytest.mark.postgres]

BIN = Path(sys.executable).parent

PIPELINE = """\
    name: shipped
    tasks:
      - name: report
        handler: python
        config: {callable: "shipped_tasks:report"}
"""
MODULE = """\
    import orchestrator


    def report(ctx):
        print("computing the report")
        ctx.log.warning("two regions are late")
        return {"regions": 2, "orchestrator_from": orchestrator.__file__}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """/workspace as the buildpack leaves it, and route's environment from terraform."""
    computed = Computed()
    d = Deployment.minimal(computed, overrides={"project_id": PROJECT})
    fns = r.functions(d)
    for fn in fns:
        computed.function_urls[(fn.resource.name, fn.resource.key)] = fn.url
    [route] = [fn for fn in fns if fn.entry_point() == "route"]
    env = route.environment({"ORCHESTRATOR_DB_PASSWORD": ""})
    pipelines_dir = env["ORCHESTRATOR_PIPELINES_DIR"]

    tmp = tmp_path_factory.mktemp("function")
    built = function_archive(d, tmp / "source.zip")
    archive = tmp / "with-pipeline.zip"
    with zipfile.ZipFile(built.path) as src, zipfile.ZipFile(archive, "w") as out:
        for item in src.infolist():
            out.writestr(item, src.read(item))
        out.writestr(f"{pipelines_dir}/shipped.yaml", textwrap.dedent(PIPELINE))
        out.writestr(f"{pipelines_dir}/shipped_tasks.py", textwrap.dedent(MODULE))
    root = tmp / "workspace"
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root)
    assert not (root / "tests").exists() and (root / "orchestrator").is_dir()
    # requirements.txt installs the package from the archive; its dependencies are
    # this environment's (a full install is the rehearsal's, cached by archive).
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--target", str(site), "-r", "requirements.txt"],
                   cwd=root, check=True, capture_output=True, timeout=300)
    return {"root": root, "site": site, "env": env, "source": route.source(),
            "pipelines_dir": pipelines_dir}


@pytest.fixture
def route(deployed: dict[str, Any], pg_url: str,
          pubsub_emulator: PubSubEmulator) -> Iterator[dict[str, Any]]:  # noqa: F811
    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    pubsub_emulator.create_topic(topic)
    pubsub_emulator.create_topic(f"{topic}-events")
    env = {
        **deployed["env"],
        # The stand-ins: this database, the emulator, topics of this test.
        "DATABASE_URL": pg_url,
        "ORCHESTRATOR_DB_PASSWORD": "",
        "ORCHESTRATOR_GCP_PROJECT": pubsub_emulator.project,
        "ORCHESTRATOR_TASKS_TOPIC": topic,
        "ORCHESTRATOR_EVENTS_TOPIC": f"{topic}-events",
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        **r.base_environment(deployed["root"].parent),
        # The installed package only: the buildpack's site-packages.
        "PYTHONPATH": str(deployed["site"]),
    }
    env["PATH"] = f"{BIN}:{env['PATH']}"
    port = free_port()
    log = deployed["root"].parent / f"route-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "functions-framework"), "--target", "route", "--source",
             deployed["source"], "--signature-type", "cloudevent", "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=deployed["root"], env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield {**deployed, "url": f"http://127.0.0.1:{port}", "log": log}
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_module_in_the_shipped_pipelines_folder_runs_and_logs_labelled_json(
        route: dict[str, Any], pg_engine: Engine, pg_url: str) -> None:
    reset_process_caches()
    published = RecordingPublisher()
    # The deploy job's side: sync the shipped folder, start a batch.
    operator = Runtime(Settings(database_url=pg_url), pg_engine, published)
    operator.sync(route["root"] / route["pipelines_dir"] / "shipped.yaml")
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
