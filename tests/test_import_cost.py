"""Cold start: importing the functions' entry module stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("google.cloud.bigquery", "google.cloud.pubsub", "google.cloud.pubsub_v1",
         "google.cloud.storage", "pyarrow", "pandas", "duckdb")


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
    assert not [m for m in loaded for h in HEAVY if m == h or m.startswith(h + ".")]


def test_the_check_would_see_a_heavy_import() -> None:
    """The subprocess probe does report a library that was imported."""
    assert "pyarrow" in _modules_after("import functions.main, pyarrow")
