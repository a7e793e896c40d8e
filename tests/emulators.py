"""Launchers and pytest fixtures for the local Google Cloud emulators.

- `gcs_emulator`: gcp-storage-emulator (PyPI), files kept on disk.
- `bq_emulator`: bqemulator (PyPI, DuckDB-backed), reading `gs://` URIs from the
  storage emulator's data folder (BQEMU_GCS_LOCAL_ROOT), so a load job sees
  exactly what was uploaded through the GCS API.

Each runs from its own virtualenv (`.venv-gcs`, `.venv-bqemu`, made by
`scripts/emulators-venv.sh`, which the fixtures run when a venv is missing) on
a free port, and is stopped at the end of the session. A test is skipped, with
the reason, only when an emulator cannot be installed or started here.

Use from a test module: `from tests.emulators import bq_emulator, gcs_emulator  # noqa: F401`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = ROOT / "scripts" / "emulators-venv.sh"
BQ_VENV = Path(os.environ.get("BQEMU_VENV", ROOT / ".venv-bqemu"))
GCS_VENV = Path(os.environ.get("GCS_EMULATOR_VENV", ROOT / ".venv-gcs"))
PROJECT = "test-project"
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_venv(which: str, venv: Path, binary: str) -> Path:
    """The emulator's executable, installing its venv first if needed (about 40 s)."""
    exe = venv / "bin" / binary
    if not SETUP_SCRIPT.exists() or shutil.which("bash") is None:
        pytest.skip(f"{binary}: {venv} is missing and {SETUP_SCRIPT} cannot be run")
    # One installer at a time: parallel test processes may each start the emulators.
    locks = ROOT / ".tmp"
    locks.mkdir(exist_ok=True)
    with open(locks / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.run(
            ["bash", str(SETUP_SCRIPT), which], capture_output=True, text=True, timeout=900,
            env={**os.environ, "PYTHON": os.environ.get("EMULATOR_PYTHON", sys.executable)},
        )
    if proc.returncode != 0 or not exe.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        pytest.skip(f"{binary} could not be installed into {venv}: {' | '.join(tail)}")
    return exe


def wait_http(url: str, proc: subprocess.Popen[Any], log: Path, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the emulator exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise RuntimeError(f"{url}: not ready after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is not None:
        return
    # Each emulator runs in its own process group: stop it and whatever it spawned.
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass
class GcsEmulator:
    endpoint: str
    data_dir: Path
    project: str = PROJECT

    @property
    def objects_root(self) -> Path:
        """Where the emulator keeps `<bucket>/<object name>` on disk."""
        return self.data_dir / ".cloudstorage"

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(project=self.project, credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def object_store(self) -> Any:
        from orchestrator.adapters.gcp.storage import GcsObjectStore

        return GcsObjectStore(self.project, client=self.client())

    def ensure_bucket(self, name: str) -> None:
        from google.api_core.exceptions import Conflict

        with contextlib.suppress(Conflict):
            self.client().create_bucket(name)


@dataclass
class BqEmulator:
    endpoint: str
    project: str = PROJECT

    def client(self) -> Any:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import bigquery

        return bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": self.endpoint})

    def warehouse(self, dataset: str = "analytics", **kwargs: Any) -> Any:
        from orchestrator.adapters.gcp.bigquery import BigQueryWarehouse

        # bqemulator has no `table$partition` decorators: partitions are emptied by DELETE.
        kwargs.setdefault("partition_decorators", False)
        kwargs.setdefault("job_timeout_s", 60.0)
        return BigQueryWarehouse(self.project, dataset, client=self.client(), **kwargs)

    def ensure_dataset(self, name: str) -> None:
        self.client().create_dataset(f"{self.project}.{name}", exists_ok=True)


def start_gcs(tmp: Path) -> tuple[subprocess.Popen[Any], GcsEmulator]:
    exe = ensure_venv("gcs", GCS_VENV, "gcp-storage-emulator")
    port = free_port()
    data_dir = tmp / "gcs"
    data_dir.mkdir(parents=True, exist_ok=True)
    log = tmp / "gcs.log"
    proc = subprocess.Popen(
        [str(exe), "start", "--host", "127.0.0.1", "--port", str(port), "-q"],
        cwd=data_dir, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "STORAGE_BASE": str(data_dir)},
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/storage/v1/b?project={PROJECT}", proc, log)
    return proc, GcsEmulator(endpoint, data_dir)


def start_bq(tmp: Path, gcs_root: Path | None) -> tuple[subprocess.Popen[Any], BqEmulator]:
    exe = ensure_venv("bq", BQ_VENV, "bqemulator")
    port = free_port()
    home = BQ_VENV / "home"  # holds the spatial extension imported by the setup script
    log = tmp / "bqemulator.log"
    env = {**os.environ, "HOME": str(home)}
    if gcs_root is not None:
        env["BQEMU_GCS_LOCAL_ROOT"] = str(gcs_root)
    proc = subprocess.Popen(
        [str(exe), "start", "--rest-host", "127.0.0.1", "--rest-port", str(port),
         "--grpc-port", str(free_port()), "--project", PROJECT, "--ephemeral",
         "--log-level", "warning"],
        cwd=tmp, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(f"{endpoint}/readyz", proc, log)
    return proc, BqEmulator(endpoint)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GcsEmulator]:
    proc, emu = start_gcs(tmp_path_factory.mktemp("gcs-emulator"))
    try:
        yield emu
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def bq_emulator(
    tmp_path_factory: pytest.TempPathFactory, gcs_emulator: GcsEmulator
) -> Iterator[BqEmulator]:
    proc, emu = start_bq(tmp_path_factory.mktemp("bqemulator"), gcs_emulator.objects_root)
    try:
        yield emu
    finally:
        stop(proc)
