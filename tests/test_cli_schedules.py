"""`orchestrator schedules`, `alerts`, `batch start --deadline`, and `dev` running a
schedule on its own, on the embedded runtime in a temporary folder."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from orchestrator.cli.app import app
from orchestrator.errors import PermanentError
from tests.webhook import webhook_receiver

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent / "orchestrator"

DAILY = """\
name: daily_sales
schedule:
  cron: "0 6 * * *"
  timezone: Europe/Paris
  batch_id: "{date}"
deadline: {at: "09:00"}
tasks:
  - name: report
    handler: noop
"""

EVERY_MINUTE = """\
name: minutely
schedule:
  cron: "* * * * *"
  batch_id: "{datetime}"
alerts:
  events: [batch_failed]
tasks:
  - name: report
    handler: python
    config: {callable: "tests.test_cli_schedules:refuse"}
"""


def refuse(ctx: Any) -> dict[str, Any]:
    raise PermanentError("the report server said no\nstack trace follows")


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("ORCHESTRATOR_") or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def cli(*args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return result


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_schedules_lists_each_schedule_and_pause_and_resume_are_stored(tmp_path: Path) -> None:
    cli("pipelines", "sync", str(write(tmp_path / "daily.yaml", DAILY)))
    (row,) = json.loads(cli("schedules", "--json").stdout)["schedules"]
    assert (row["pipeline"], row["cron"], row["timezone"], row["paused"]) == (
        "daily_sales", "0 6 * * *", "Europe/Paris", False)
    assert len(row["next"]) == 3
    assert all(n[11:16] == "06:00" and n[-6:] in ("+01:00", "+02:00") for n in row["next"])
    assert "daily_sales" in cli("schedules").stdout
    assert cli("schedules", "pause", "daily_sales").stdout.strip() == (
        "daily_sales: schedule paused")
    assert json.loads(cli("schedules", "--json").stdout)["schedules"][0]["paused"] is True
    assert "already paused" in cli("schedules", "pause", "daily_sales").stdout
    assert "resumed" in cli("schedules", "resume", "daily_sales").stdout
    missing = cli("schedules", "pause", "nope", code=1)
    assert missing.stderr.strip() == (
        "error: unknown pipeline 'nope' (run `orchestrator pipelines sync` first)")


def test_batch_start_takes_a_deadline(tmp_path: Path) -> None:
    cli("pipelines", "sync", str(write(tmp_path / "daily.yaml", DAILY.replace(
        'deadline: {at: "09:00"}\n', ""))))
    cli("schedules", "pause", "daily_sales")
    cli("batch", "start", "daily_sales", "manual-1", "--deadline", "2h")
    doc = json.loads(cli("status", "manual-1", "--json").stdout)
    created = datetime.fromisoformat(doc["created_at"])
    assert datetime.fromisoformat(doc["deadline_at"]) - created == timedelta(hours=2)
    bad = cli("batch", "start", "daily_sales", "manual-2", "--deadline", "soon", code=2)
    assert "--deadline 'soon'" in bad.stderr


def test_dev_runs_a_schedule_on_its_own_and_prints_and_posts_its_alert_once(
        tmp_path: Path) -> None:
    """`orchestrator dev` and nothing else: the due tick starts its batch, the batch
    fails, the alert prints on the console and reaches the webhook once."""
    cli("pipelines", "sync", str(write(tmp_path / "minutely.yaml", EVERY_MINUTE)))
    # As if synced two minutes ago: a tick is due now, so the test need not wait for one.
    db = sqlite3.connect(tmp_path / ".orchestrator" / "metadata.db")
    earlier = (datetime.now(UTC) - timedelta(minutes=2)).replace(tzinfo=None)
    db.execute("UPDATE schedules SET last_tick_at = ?", (earlier.isoformat(sep=" "),))
    db.commit()
    db.close()
    with webhook_receiver() as receiver:
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": str(REPO), "ORCHESTRATOR_ALERT_WEBHOOK_URL": receiver.url}
        proc = subprocess.Popen(
            [str(BIN), "dev", "--sweep-every", "0.3", "--stop-after", "30"],
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 25
            # The alert's last line: the command that says more.
            while not any("more: orchestrator why" in line for line in lines):
                assert time.monotonic() < deadline, lines
                line = proc.stdout.readline()
                assert line, (lines, proc.stderr.read() if proc.stderr else "")
                lines.append(line)
            while len(receiver.accepted) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)  # a few more sweeps: nothing is sent twice
        finally:
            proc.terminate()
            rest, _ = proc.communicate(timeout=10)
            lines.append(rest)
        texts = receiver.texts()
    out = "".join(lines)
    assert "schedule minutely: started batch" in out
    batch_id = out.split("schedule minutely: started batch ")[1].split()[0]
    assert f"batch minutely/{batch_id} finished: FAILED" in out
    assert f"alert batch_failed: minutely/{batch_id}: batch FAILED: report failed" in out
    assert f"more: orchestrator why {batch_id} report -p minutely" in out
    assert len(texts) == 1
    assert texts[0].splitlines()[1] == "PermanentError: the report server said no"
    (alert,) = json.loads(cli("alerts", "--json").stdout)["alerts"]
    assert alert["deliveries"] == [{"channel": "webhook", "state": "delivered", "attempts": 1,
                                    "delivered_at": alert["deliveries"][0]["delivered_at"],
                                    "last_error": None}]
