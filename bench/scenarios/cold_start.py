"""Cold start of `route` as deployed: a fresh functions-framework process, start to its
first acknowledged push.

The function source is the archive terraform builds (`scripts.deployment`), installed
as the Python buildpack installs it (`pip install -r requirements.txt` into a folder
of its own; its dependencies are this environment's), and served from that folder by
`functions-framework --target route` with the environment terraform gives the
function: the cloud runtime, PostgreSQL (a scratch database) and Pub/Sub (the official
emulator, which the function publishes to over REST as it would to Google, but with
`http.client` and no credentials: against Google the first publish also imports
google-auth and requests and fetches a token).

Each run starts a new process and POSTs the push of one task of a fresh batch as soon
as the port accepts: `cold_first_ack_ms` is the process start to that push's 2xx. It
is split into the start to listening (interpreter, functions-framework, the import of
`functions.main`), the first request, and a second push right after (a request with
everything built), whose difference from the first is the first request's setup. Beside
the wall time, the CPU time the instance's processes (gunicorn's arbiter and its worker)
spent up to the acknowledgement, which other load on the machine leaves alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.core import Context, Metric, Skipped, skipped

PROJECT = "bench-project"
TOPICS = {"tasks": "bench-tasks", "events": "bench-events", "alerts": "bench-alerts"}
PIPELINE = {"name": "cold_start", "tasks": [{"name": "first", "handler": "noop"},
                                            {"name": "second", "handler": "noop"}]}
TARGET = "cold_first_ack_ms"


def _emulator_missing() -> str | None:
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not installed (the Pub/Sub emulator)"
    if shutil.which("java") is None:
        return "java is not installed (the Pub/Sub emulator)"
    sdk = Path(os.path.realpath(gcloud)).parents[1]
    if not any(p.is_dir() for p in (sdk / "platform" / "pubsub-emulator",
                                    Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator"))):
        return "the gcloud pubsub-emulator component is not installed"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def _pubsub_emulator(tmp: Path) -> Iterator[str]:
    host = f"127.0.0.1:{_free_port()}"
    data = tmp / "pubsub"
    data.mkdir()
    with (tmp / "pubsub.log").open("wb") as log:
        proc = subprocess.Popen(
            ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={host}",
             f"--project={PROJECT}", f"--data-dir={data}", "--quiet"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not _answers(f"http://{host}/"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the Pub/Sub emulator did not start: "
                                   + (tmp / "pubsub.log").read_text()[-300:])
            time.sleep(0.2)
        previous = os.environ.get("PUBSUB_EMULATOR_HOST")
        os.environ["PUBSUB_EMULATOR_HOST"] = host
        try:
            from google.cloud import pubsub_v1

            publisher = pubsub_v1.PublisherClient()
            for topic in TOPICS.values():
                publisher.create_topic(name=f"projects/{PROJECT}/topics/{topic}")
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous
        yield host
    finally:
        _stop(proc)


def _installed_source(tmp: Path) -> tuple[Path, Path]:
    """The function source archive, unpacked, and the folder its requirements went to."""
    from scripts.deployment import Deployment, function_archive

    archive = function_archive(Deployment.minimal(), tmp / "source.zip")
    root = tmp / "workspace"
    with zipfile.ZipFile(archive.path) as zf:
        zf.extractall(root)
    site = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), "-r", "requirements.txt"],
                   cwd=root, check=True, capture_output=True, timeout=600)
    return root, site


def _environment(url: str, emulator: str, site: Path, home: Path) -> dict[str, str]:
    """terraform's `local.function_environment` for route, with the stand-ins."""
    return {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home), "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(site),
        "ORCHESTRATOR_RUNTIME": "cloud",
        "ORCHESTRATOR_GCP_PROJECT": PROJECT,
        "ORCHESTRATOR_TASKS_TOPIC": TOPICS["tasks"],
        "ORCHESTRATOR_EVENTS_TOPIC": TOPICS["events"],
        "ORCHESTRATOR_ALERTS_TOPIC": TOPICS["alerts"],
        "ORCHESTRATOR_DB_POOL_SIZE": "5", "ORCHESTRATOR_DB_MAX_OVERFLOW": "2",
        "ORCHESTRATOR_PIPELINES_DIR": "pipelines",
        "ORCHESTRATOR_WAREHOUSE": "bigquery", "ORCHESTRATOR_OBJECT_STORE": "gcs",
        "ORCHESTRATOR_BUCKETS": "{}", "ORCHESTRATOR_DATASETS": "{}",
        "ORCHESTRATOR_LOG_FORMAT": "json",
        "DATABASE_URL": url, "ORCHESTRATOR_DB_PASSWORD": "",
        "PUBSUB_EMULATOR_HOST": emulator,
    }


def _cpu_ms(pid: int) -> float:
    """User plus system CPU time of a process and its live children (Linux /proc), ms;
    NaN where /proc is not available."""
    pids = [pid]
    try:
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return float("nan")
    ticks = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _post(port: int, message: dict[str, Any]) -> int:
    from orchestrator.testing import pubsub_request

    headers, body = pubsub_request(message, topic=TOPICS["tasks"])
    req = urllib.request.Request(f"http://127.0.0.1:{port}/", data=body, headers=headers,
                                 method="POST")
    with urllib.request.urlopen(req, timeout=120) as resp:
        return int(resp.status)


def _one_run(root: Path, env: dict[str, str], messages: list[dict[str, Any]],
             log: Path) -> dict[str, float]:
    port = _free_port()
    cmd = [str(Path(sys.executable).parent / "functions-framework"), "--target", "route",
           "--source", "functions/main.py", "--signature-type", "http",
           "--host", "127.0.0.1", "--port", str(port)]
    with log.open("ab") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.perf_counter() - t0 > 60:
                raise RuntimeError("functions-framework did not listen: "
                                   + log.read_text()[-500:])
            time.sleep(0.002)
        listening = time.perf_counter()
        first = _post(port, messages[0])
        acked = time.perf_counter()
        cpu = _cpu_ms(proc.pid)
        second = _post(port, messages[1])
        warm = time.perf_counter()
    finally:
        _stop(proc)
    if not (200 <= first < 300 and 200 <= second < 300):
        raise RuntimeError(f"route answered {first} and {second}")
    return {"first_ack": (acked - t0) * 1000, "listen": (listening - t0) * 1000,
            "first_request": (acked - listening) * 1000, "warm_request": (warm - acked) * 1000,
            "cpu": cpu}


def cold_first_ack(ctx: Context) -> list[Metric]:
    from sqlalchemy import text

    from orchestrator.db.session import make_engine
    from orchestrator.pipeline.load import build_pipeline
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings
    from orchestrator.testing import RecordingPublisher

    missing = _emulator_missing()
    if missing:
        return [skipped(TARGET, missing, "ms", "<= 800")]
    try:
        ctx.require_postgres()
    except Skipped as exc:
        return [skipped(TARGET, str(exc), "ms", "<= 800")]
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-cold-start-") as tmp_name:
        tmp = Path(tmp_name)
        root, site = _installed_source(tmp)
        with _pubsub_emulator(tmp) as emulator, ctx.scratch_url("postgresql", "cold") as url:
            engine = make_engine(url, pool_size=1, max_overflow=0)
            try:
                published = RecordingPublisher()
                operator = Runtime(Settings(database_url=url, home=tmp / "home"), engine,
                                   published)
                operator.sync_specs([build_pipeline(PIPELINE)])
                env = _environment(url, emulator, site, tmp / "home")
                for i in range(ctx.sizes.cold_ack_runs):
                    published.messages.clear()
                    assert operator.start_batch("cold_start", f"run-{i}")
                    runs.append(_one_run(root, env, list(published.data), tmp / "route.log"))
                with engine.connect() as c:
                    done = c.execute(text("SELECT count(*) FROM task_log "
                                          "WHERE status = 'SUCCESS'")).scalar_one()
                if done != 2 * len(runs):
                    raise RuntimeError(f"{done} of {2 * len(runs)} tasks succeeded: "
                                       + (tmp / "route.log").read_text()[-500:])
            finally:
                engine.dispose()
    params = {"runs": len(runs), "target": "route", "source": "function source archive, "
              "installed with pip --target", "runtime": "cloud (PostgreSQL, Pub/Sub emulator)"}

    def metric(name: str, key: str, measured: str, target: str | None = None) -> Metric:
        return Metric(name, "ms", [r[key] for r in runs], {**params, "measured": measured},
                      target=target)

    return [
        metric(TARGET, "first_ack", "process start to the first push's 2xx", "<= 800"),
        metric("cold_listen_ms", "listen", "process start to the port accepting "
               "(interpreter, functions-framework, import of functions.main)"),
        metric("cold_first_request_ms", "first_request", "the first push, POST to 2xx"),
        metric("cold_warm_request_ms", "warm_request", "a second push right after it"),
        Metric("cold_first_request_setup_ms", "ms",
               [r["first_request"] - r["warm_request"] for r in runs],
               {**params, "measured": "first request minus second: the lazy setup"}),
        *([metric("cold_first_ack_cpu_ms", "cpu", "CPU time (user + system) of the "
                  "instance's processes from start to the first push's 2xx, which other "
                  "load on the machine leaves alone")]
          if all(math.isfinite(r["cpu"]) for r in runs) else []),
    ]
