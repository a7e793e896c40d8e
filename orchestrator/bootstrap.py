"""The runtime behind the Cloud Function entry points: built once per instance.

A function instance handles many requests, so the database pool and the Pub/Sub
client are built on the first request and reused. `ORCHESTRATOR_RUNTIME` picks
`cloud` (Postgres + Pub/Sub) or `embedded` (the local default: SQLite and the
in-process bus); unset, an instance with `ORCHESTRATOR_GCP_PROJECT` is `cloud`.
Tests install their own runtime with `use()`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from orchestrator.settings import Settings, cloud

if TYPE_CHECKING:
    from orchestrator.router import Router
    from orchestrator.runtime import Runtime


class BootstrapSettings(Settings):
    runtime: Literal["cloud", "embedded"] | None = Field(default=None,
                                                         json_schema_extra=cloud("cloud"))

    def runtime_kind(self) -> str:
        if self.runtime is not None:
            return self.runtime
        return "cloud" if self.gcp_project else "embedded"


_lock = threading.Lock()
_runtime: Runtime | None = None


def build(settings: BootstrapSettings | None = None) -> Runtime:
    from orchestrator.runtime import Runtime

    settings = settings or BootstrapSettings()
    if settings.runtime_kind() == "cloud":
        return Runtime.cloud(settings)
    return Runtime.embedded(settings)


def runtime() -> Runtime:
    """The instance's runtime, built from the environment on first use."""
    global _runtime
    if _runtime is None:
        with _lock:
            if _runtime is None:
                _runtime = build()
    return _runtime


def router() -> Router:
    return runtime().router


def install(rt: Runtime | None) -> Runtime | None:
    """Replace the instance's runtime (None: build from settings again); returns the old one."""
    global _runtime
    with _lock:
        old, _runtime = _runtime, rt
    return old


@contextmanager
def use(rt: Runtime) -> Iterator[Runtime]:
    """Route the entry points through `rt` for the duration of the block."""
    old = install(rt)
    try:
        yield rt
    finally:
        install(old)
