"""Cold start: importing the functions' entry module stays cheap, and a request loads
only what it uses.

functions-framework imports `functions/main.py` before the instance listens; the
first request then imports what it needs. Neither ever loads the heavy libraries of
other paths: the warehouse's and the object store's clients, migrations (alembic)
or the pipeline-file model (YAML).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher, pubsub_request
from tests.dags import spec_from_edges

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("google.cloud.bigquery", "google.cloud.pubsub", "google.cloud.pubsub_v1",
         "google.cloud.storage", "google.api_core", "grpc", "pyarrow", "pandas", "duckdb")
# What the first request imports, not the module: settings, the database, the engine.
FIRST_REQUEST = ("pydantic", "pydantic_settings", "sqlalchemy", "psycopg2",
                 "orchestrator.settings", "orchestrator.bootstrap", "orchestrator.runtime",
                 "orchestrator.db", "orchestrator.engine", "orchestrator.edge")
# What no request of route imports: migrations and the pipeline files' model.
NEVER_ON_ROUTE = ("alembic", "mako", "yaml", "orchestrator.db.migrate",
                  "orchestrator.pipeline.spec", "orchestrator.pipeline.sync")


def _under(loaded: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in loaded for p in packages if m == p or m.startswith(p + "."))


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=60)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_importing_functions_main_loads_no_google_client_pyarrow_or_pandas() -> None:
    """`import functions.main` pulls in none of the heavy libraries."""
    loaded = _modules_after("import functions.main")
    assert "functions.main" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("pyarrow", "pandas", "duckdb")]
    assert not _under(loaded, HEAVY)


def test_importing_functions_main_leaves_settings_and_the_database_to_the_first_request() -> None:
    """The module configures its logs and registers its entry points; nothing more."""
    loaded = _modules_after("import functions.main")
    assert "functions_framework" in loaded
    assert not _under(loaded, FIRST_REQUEST)


def test_the_check_would_see_a_heavy_import() -> None:
    """The subprocess probe does report a library that was imported."""
    assert "pyarrow" in _modules_after("import functions.main, pyarrow")
    assert "sqlalchemy" in _modules_after("import functions.main, orchestrator.runtime")


ROUTE_ONE_PUSH = textwrap.dedent("""\
    import json, sys
    from functions_framework import create_app
    from orchestrator import bootstrap
    from orchestrator.db.session import make_engine
    from orchestrator.runtime import Runtime
    from orchestrator.settings import Settings

    url, headers, body = json.loads(sys.stdin.read())

    class Published:
        def publish(self, messages):
            pass

    rt = Runtime(Settings(database_url=url), make_engine(url, pool_size=1, max_overflow=0),
                 Published())
    client = create_app("route", "functions/main.py").test_client()
    with bootstrap.use(rt):
        status = client.post("/", data=body.encode(), headers=headers).status_code
    print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
""")


@pytest.mark.postgres
def test_a_push_through_route_never_imports_migrations_or_pipeline_files(
        pg_engine: Engine, pg_url: str) -> None:
    """A task run through route in a fresh process, on a runtime wired as the cloud's."""
    operator = Runtime(Settings(database_url=pg_url), pg_engine, published := RecordingPublisher())
    operator.sync_specs([spec_from_edges("cold", {"a": [], "b": ["a"]})])
    assert operator.start_batch("cold", "2024-03")
    [message] = published.data
    headers, body = pubsub_request(message)
    out = subprocess.run([sys.executable, "-c", ROUTE_ONE_PUSH], cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         input=json.dumps([pg_url, headers, body.decode()]))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == 200
    with pg_engine.connect() as conn:
        done = dict(conn.execute(text(
            "SELECT t.name, l.status FROM task_log l JOIN tasks t ON t.id = l.task_id")).all())
    assert done["a"] == "SUCCESS"
    loaded = set(report["modules"])
    assert "sqlalchemy" in loaded and "orchestrator.engine" in loaded
    assert not _under(loaded, NEVER_ON_ROUTE)
    assert not _under(loaded, HEAVY)
