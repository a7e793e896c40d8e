"""The pieces of the rehearsal (tests/test_rehearsal.py): the function source
installed as the Python buildpack installs it, the deployed processes started from
that installation, the emulators provisioned from terraform, and a database whose
network a test can cut.

Everything the deployment decides is read from terraform by `scripts.deployment`;
this module only substitutes the local stand-ins for what Google runs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.deployment import Archive, Deployment, Resource
from tests.pubsub_emulator import _kill_group, _tail, _wait_until, free_port

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".tmp" / "rehearsal"
DOCKERFILE = ROOT / "terraform" / "migrations" / "Dockerfile"
INSTALL_TIMEOUT_S = 600


# -- the function source, installed as the buildpack does ---------------------------


@dataclass(frozen=True)
class Installed:
    """The unpacked archive (the function's working directory, /workspace) and the
    virtualenv the buildpack made for it."""

    workspace: Path
    venv: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def install(archive: Archive, cache: Path = CACHE) -> Installed:
    """Unpack the archive into an empty folder, make a fresh virtualenv, install
    functions-framework and `pip install -r requirements.txt` from the unpacked
    folder, never from the checkout. The result is kept under the archive's content
    hash, so an unchanged archive is not installed twice; any change installs anew."""
    cache.mkdir(parents=True, exist_ok=True)
    # One installer at a time: parallel test processes share the cache.
    with open(cache.with_name(cache.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _install(archive, cache)


def _install(archive: Archive, cache: Path) -> Installed:
    home = cache / archive.sha256[:24]
    done = home / ".installed"
    if done.exists():
        return Installed(home / "workspace", home / "venv")
    if cache.is_dir():
        for old in cache.iterdir():  # one installation at a time: each is ~400 MB
            shutil.rmtree(old, ignore_errors=True)
    workspace, venv = home / "workspace", home / "venv"
    workspace.mkdir(parents=True)
    with zipfile.ZipFile(archive.path) as zf:
        zf.extractall(workspace)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"

    def run(*cmd: str) -> None:
        proc = subprocess.run(cmd, cwd=workspace, env=env, capture_output=True, text=True,
                              timeout=INSTALL_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n"
                               f"{proc.stderr[-4000:]}")

    base = getattr(sys, "_base_executable", sys.executable)
    run(base, "-m", "venv", str(venv))
    run(str(venv / "bin" / "pip"), "install", "-q", "functions-framework")
    run(str(venv / "bin" / "pip"), "install", "-q", "-r", "requirements.txt")
    done.write_text(archive.sha256)
    return Installed(workspace, venv)


def entrypoint() -> list[str]:
    """The job image's ENTRYPOINT, read from its Dockerfile."""
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return list(json.loads(line.split(None, 1)[1]))
    raise AssertionError(f"{DOCKERFILE} has no ENTRYPOINT")


def base_environment(home: Path) -> dict[str, str]:
    """What a Cloud Run container has besides the deployment's variables."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1"}


# -- the deployed functions -------------------------------------------------------------


@dataclass
class Function:
    """One deployed function: terraform's resource (one for_each instance of it)."""

    resource: Resource
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[Any] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        key = f"[{self.resource.key}]" if self.resource.key is not None else ""
        return f"{self.resource.name}{key}"

    def entry_point(self) -> str:
        return str(self.resource.attribute(("build_config", 0, "entry_point")))

    def source(self) -> str:
        build_env = self.resource.attribute(("build_config", 0, "environment_variables"))
        return str(build_env.get("GOOGLE_FUNCTION_SOURCE", "main.py"))

    def signature_type(self) -> str:
        # Cloud Functions gives an Eventarc-triggered function CloudEvents, any other HTTP.
        return "cloudevent" if "event_trigger" in self.resource.body else "http"

    def environment(self, secrets: Mapping[str, str]) -> dict[str, str]:
        env = dict(self.resource.attribute(("service_config", 0, "environment_variables")))
        for secret in self.resource.body["service_config"][0].get(
                "secret_environment_variables", []):
            key = self.resource.deployment.evaluate(secret["key"])
            env[key] = secrets[key]
        return env

    def start(self, installed: Installed, env: Mapping[str, str], logs: Path) -> None:
        self.log = logs / f"{self.label}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(installed.bin("functions-framework")), "--target", self.entry_point(),
                 "--source", self.source(), "--signature-type", self.signature_type(),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                cwd=installed.workspace, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self) -> None:
        assert self.process is not None and self.log is not None

        def listening() -> bool:
            with socket.socket() as s:
                s.settimeout(0.5)
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        _wait_until(listening, self.process, self.log, f"functions-framework {self.label}")

    def output(self) -> str:
        return _tail(self.log, 400) if self.log else ""

    def stop(self) -> None:
        if self.process is not None:
            _kill_group(self.process)


def functions(deployment: Deployment) -> list[Function]:
    out = []
    for name, body in deployment.module.resources["google_cloudfunctions2_function"].items():
        resource = deployment.resource("google_cloudfunctions2_function", name)
        if "for_each" in body:
            out.extend(Function(r) for r in resource.instances().values())
        else:
            out.append(Function(resource))
    return out


# -- the database, behind a connection that can be cut --------------------------------


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a server; `cut()` drops every connection and
    refuses new ones, as a lost route to Cloud SQL would, until `restore()`."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._closed = False
        threading.Thread(target=self._accept, name="db-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if self._cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._open -= {src, dst}

    def cut(self) -> None:
        self._cut.set()
        with self._lock:
            for s in list(self._open):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._cut.clear()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._server.close()


# -- what Cloud Scheduler and Eventarc do -------------------------------------------


class Scheduler:
    """Calls the sweep target as the scheduler job does (method and URI from terraform),
    every `interval_s` instead of every minute."""

    def __init__(self, method: str, uri: str, interval_s: float = 2.0):
        self.method, self.uri, self.interval_s = method, uri, interval_s
        self.calls: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def __enter__(self) -> Scheduler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        import urllib.error
        import urllib.request

        while not self._stop.wait(self.interval_s):
            req = urllib.request.Request(self.uri, data=b"", method=self.method)
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    self.calls.append(resp.status)
            except urllib.error.HTTPError as exc:
                self.calls.append(exc.code)
            except OSError:
                self.calls.append(0)


def finalized_event(blob_resource: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """The binary CloudEvent Eventarc posts for a finalized object: the object's own
    metadata (the JSON API resource) as the body."""
    bucket, name = blob_resource["bucket"], blob_resource["name"]
    headers = {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-type": "google.cloud.storage.object.v1.finalized",
        "ce-source": f"//storage.googleapis.com/projects/_/buckets/{bucket}",
        "ce-subject": f"objects/{name}",
        "ce-time": str(blob_resource.get("timeCreated") or blob_resource.get("updated")),
        "ce-bucket": bucket,
        "content-type": "application/json",
    }
    return headers, json.dumps(dict(blob_resource)).encode()


def post(url: str, headers: Mapping[str, str], body: bytes, timeout: float = 120) -> int:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=body, headers=dict(headers), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def get_json(url: str, timeout: float = 30) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read() or b"null")


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not after {timeout:g}s (last: {last!r})")


@contextlib.contextmanager
def started(fns: list[Function], installed: Installed, env_of: Callable[[Function], dict[str, str]],
            logs: Path) -> Iterator[list[Function]]:
    try:
        for fn in fns:
            fn.start(installed, env_of(fn), logs)
        for fn in fns:
            fn.wait_ready()
        yield fns
    finally:
        for fn in fns:
            fn.stop()
