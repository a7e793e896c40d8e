"""The official Pub/Sub emulator and a functions-framework server, as fixtures.

`pubsub_emulator` (session scope) starts `gcloud beta emulators pubsub start` on a
free port, waits until it answers, points the Google clients at it with
PUBSUB_EMULATOR_HOST, and kills the whole process group at teardown. Where gcloud,
java or the emulator component is missing, the tests that use it are skipped with
the reason. `FunctionServer` runs one entry point of `functions/main.py` under
functions-framework in a subprocess, so that a push subscription can reach it.

Import the fixture into a test module with
`from tests.pubsub_emulator import pubsub_emulator  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "test-project"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_reason() -> str | None:
    """Why the emulator cannot run here, or None if it can."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return "gcloud is not installed (needed for `gcloud beta emulators pubsub start`)"
    if shutil.which("java") is None:
        return "java is not installed (the Pub/Sub emulator is a Java program)"
    sdk = Path(os.path.realpath(gcloud)).parents[1]
    candidates = [sdk / "platform" / "pubsub-emulator",
                  Path("/usr/lib/google-cloud-sdk/platform/pubsub-emulator")]
    if not any(c.is_dir() for c in candidates):
        return "the gcloud pubsub-emulator component is not installed"
    return None


def _kill_group(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)


def _wait_until(ready: Any, proc: subprocess.Popen[Any], log: Path, what: str,
                timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} not ready after {timeout:g}s:\n{_tail(log)}")


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


@dataclass
class PubSubEmulator:
    host: str
    project: str = PROJECT
    process: subprocess.Popen[Any] | None = field(default=None, repr=False)

    def _clients(self) -> tuple[Any, Any]:
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = self.host
        return pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()

    def topic_path(self, topic: str) -> str:
        return f"projects/{self.project}/topics/{topic}"

    def subscription_path(self, name: str) -> str:
        return f"projects/{self.project}/subscriptions/{name}"

    def create_topic(self, topic: str) -> str:
        publisher, _ = self._clients()
        path = self.topic_path(topic)
        publisher.create_topic(name=path)
        return path

    def create_subscription(self, topic: str, name: str, push_endpoint: str | None = None,
                            ack_deadline_s: int = 10) -> str:
        """A pull subscription, or a push one when `push_endpoint` is given."""
        from google.cloud import pubsub_v1

        _, subscriber = self._clients()
        path = self.subscription_path(name)
        request: dict[str, Any] = {"name": path, "topic": self.topic_path(topic),
                                   "ack_deadline_seconds": ack_deadline_s}
        if push_endpoint:
            request["push_config"] = pubsub_v1.types.PushConfig(push_endpoint=push_endpoint)
        with subscriber:
            subscriber.create_subscription(request=request)
        return path

    def publish(self, topic: str, data: bytes, **attributes: str) -> str:
        publisher, _ = self._clients()
        return str(publisher.publish(self.topic_path(topic), data, **attributes).result(30))

    def pull(self, subscription: str, want: int = 1, timeout: float = 20.0) -> list[Any]:
        """Pull and ack until `want` messages arrived (or the timeout passes)."""
        _, subscriber = self._clients()
        got: list[Any] = []
        deadline = time.monotonic() + timeout
        with subscriber:
            while len(got) < want and time.monotonic() < deadline:
                resp = subscriber.pull(request={"subscription": self.subscription_path(
                    subscription), "max_messages": want - len(got)}, timeout=5)
                if resp.received_messages:
                    subscriber.acknowledge(request={
                        "subscription": self.subscription_path(subscription),
                        "ack_ids": [m.ack_id for m in resp.received_messages]})
                    got.extend(m.message for m in resp.received_messages)
        return got


@contextlib.contextmanager
def start_emulator(project: str = PROJECT) -> Iterator[PubSubEmulator]:
    reason = missing_reason()
    if reason is not None:
        pytest.skip(f"Pub/Sub emulator unavailable: {reason}")
    port = free_port()
    host = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="pubsub-emulator-") as tmp:
        log = Path(tmp) / "emulator.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["gcloud", "beta", "emulators", "pubsub", "start", f"--host-port={host}",
                 f"--project={project}", f"--data-dir={tmp}", "--quiet"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            _wait_until(lambda: _http_ok(f"http://{host}/"), proc, log, "Pub/Sub emulator")
            yield PubSubEmulator(host=host, project=project, process=proc)
        finally:
            _kill_group(proc)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="session")
def pubsub_emulator() -> Iterator[PubSubEmulator]:
    """A running emulator for the session; PUBSUB_EMULATOR_HOST points at it."""
    previous = os.environ.get("PUBSUB_EMULATOR_HOST")
    with start_emulator() as emulator:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        try:
            yield emulator
        finally:
            if previous is None:
                os.environ.pop("PUBSUB_EMULATOR_HOST", None)
            else:
                os.environ["PUBSUB_EMULATOR_HOST"] = previous


class FunctionServer:
    """`functions-framework --target TARGET --source functions/main.py` on a free port."""

    def __init__(self, target: str, env: Mapping[str, str], signature_type: str = "cloudevent"):
        self.target = target
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._env = {**os.environ, **env}
        self._signature_type = signature_type
        self._tmp = tempfile.TemporaryDirectory(prefix=f"ff-{target}-")
        self.log = Path(self._tmp.name) / "function.log"
        self.process: subprocess.Popen[Any] | None = None

    def __enter__(self) -> FunctionServer:
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "functions_framework", "--target", self.target,
                 "--source", str(ROOT / "functions" / "main.py"),
                 "--signature-type", self._signature_type,
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=ROOT, env=self._env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        _wait_until(self._listening, self.process, self.log, f"functions-framework {self.target}")
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def output(self) -> str:
        return _tail(self.log, 200)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            _kill_group(self.process)
        self._tmp.cleanup()
