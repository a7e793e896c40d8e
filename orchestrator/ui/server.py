"""`orchestrator ui`: wire the app to the task log and serve it with uvicorn.

Read-only, it opens the database for reading and nothing else: no migration, no
bus, no sweeper. Otherwise it holds the same runtime the CLI builds: embedded (the
work that a retry or a start queues runs in this process, and a sweeper moves due
retries on, as `orchestrator dev` does), or, with ORCHESTRATOR_GCP_PROJECT and
DATABASE_URL set, the cloud wiring that publishes to Pub/Sub.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.settings import Settings
from orchestrator.ui.actions import RuntimeActions
from orchestrator.ui.app import UiConfig, create_app
from orchestrator.ui.security import LOOPBACK_NAMES, is_loopback


def allowed_hosts(host: str, extra: list[str]) -> list[str] | None:
    """Loopback names when bound to loopback (a rebinding page is refused), the given
    names otherwise; no list at all (any Host) only when bound wide with none given."""
    names = [h.lower() for h in extra]
    if is_loopback(host):
        return [*LOOPBACK_NAMES, *names]
    return names or None


@contextmanager
def ui_config(settings: Settings, *, read_only: bool, host: str = "127.0.0.1",
              extra_hosts: list[str] | None = None, cloud: bool = False) -> Iterator[UiConfig]:
    from sqlalchemy.engine import make_url

    from orchestrator.db.session import make_engine, make_sessionmaker

    url = settings.resolved_database_url()
    label = make_url(url).render_as_string(hide_password=True)
    secret = os.environ.get("ORCHESTRATOR_UI_SECRET") or None
    hosts = allowed_hosts(host, extra_hosts or [])
    if read_only:
        parsed = make_url(url)
        if (parsed.get_backend_name() == "sqlite" and parsed.database
                and not Path(parsed.database).exists()):
            raise OrchestratorError(
                f"no metadata database at {parsed.database}: run `orchestrator pipelines sync` "
                "or the demo first (or set DATABASE_URL)")
        # The same pool as the runtime's, which the deployment's connection budget counts.
        engine = make_engine(url, pool_size=settings.db_pool_size,
                             max_overflow=settings.db_max_overflow,
                             pool_timeout=settings.db_pool_timeout_s,
                             prepared_statements=settings.db_prepared_statements)
        try:
            yield UiConfig(make_sessionmaker(engine), None, label, secret=secret,
                           allowed_hosts=hosts)
        finally:
            engine.dispose()
        return
    from orchestrator.runtime import Runtime

    rt = Runtime.cloud(settings) if cloud else Runtime.embedded(settings)
    try:
        if not cloud:
            rt.start_sweeper()
        yield UiConfig(rt.sessions, RuntimeActions(rt), label, clock=rt.clock.now,
                       secret=secret, allowed_hosts=hosts)
    finally:
        rt.close()


def serve(settings: Settings, *, host: str, port: int, read_only: bool,
          extra_hosts: list[str] | None = None, cloud: bool = False,
          on_ready: object = None) -> None:
    import uvicorn

    with ui_config(settings, read_only=read_only, host=host, extra_hosts=extra_hosts,
                   cloud=cloud) as config:
        app = create_app(config)
        server = uvicorn.Server(uvicorn.Config(
            app, host=host, port=port, log_level="warning", access_log=False,
            timeout_graceful_shutdown=2, proxy_headers=not is_loopback(host),
            forwarded_allow_ips="*" if not is_loopback(host) else None))
        server.run()
