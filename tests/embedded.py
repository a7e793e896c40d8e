"""An embedded runtime (in-process bus, worker threads) on the test's Postgres database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.runtime import Runtime
from orchestrator.settings import Settings


@contextmanager
def pg_runtime(pg_url: str, home: Path, *, workers: int = 8, **settings: Any) -> Iterator[Runtime]:
    s = Settings().model_copy(update={"database_url": pg_url, "home": home, "workers": workers,
                                      **settings})
    rt = Runtime.embedded(s, workers=workers, migrate_db=False)
    try:
        yield rt
    finally:
        rt.close()
