"""The production path end to end, on this machine: Postgres, the official Pub/Sub
emulator pushing into a functions-framework `route`, gcp-storage-emulator whose
uploads become `on_object_finalized` CloudEvents, and bqemulator loading the
storage emulator's files. A user uploads a month of Parquet files through
google-cloud-storage; the batch runs to SUCCESS and the profit rows are right.
And the clock: the `sweep` function, called as Cloud Scheduler calls it, starts a
scheduled batch, whose failure reaches the alerts topic and a webhook once."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.engine import Engine

from orchestrator.adapters.gcp.pubsub import PubSubPublisher
from orchestrator.db.models import ScheduleState
from orchestrator.examples_data import write_monthly_files
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import binary_request, object_data, reset_process_caches, storage_source
from tests import reliability as rel
from tests.emulators import BqEmulator, GcsEmulator, bq_emulator, gcs_emulator  # noqa: F401
from tests.pubsub_emulator import FunctionServer, PubSubEmulator, pubsub_emulator  # noqa: F401
from tests.webhook import WebhookReceiver, webhook_receiver

pytestmark = [pytest.mark.emulator, pytest.mark.postgres]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "monthly_profit.yaml"
BUCKET = "landing"
# A month no other emulator test writes: the emulators live for the whole session.
BATCH = "2030-11"
PROFIT_SQL = ("SELECT month, region, revenue, expenses, profit FROM analytics.profit "
              "WHERE month = @m ORDER BY region")


class FinalizeNotifier:
    """What Eventarc does for GCS, which the storage emulator does not: it lists the
    bucket every 200 ms and posts a `finalized` CloudEvent for every new object
    generation to the `on_object_finalized` function."""

    def __init__(self, gcs: GcsEmulator, bucket: str, endpoint: str):
        self.gcs, self.bucket, self.endpoint = gcs, bucket, endpoint
        self.seen: set[tuple[str, str]] = set()
        self.posted: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gcs-notifier", daemon=True)
        self.errors: list[str] = []

    def __enter__(self) -> FinalizeNotifier:
        # Objects already there (earlier runs) are not news.
        self.seen = self._listing()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _listing(self) -> set[tuple[str, str]]:
        return {(b.name, str(b.generation))
                for b in self.gcs.client().list_blobs(self.bucket)}

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            try:
                for name, generation in sorted(self._listing() - self.seen):
                    self._post(name, generation)
                    self.seen.add((name, generation))
            except Exception as exc:  # keep polling; the test reports what went wrong
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def _post(self, name: str, generation: str) -> None:
        headers, body = binary_request(
            "google.cloud.storage.object.v1.finalized", storage_source(self.bucket),
            object_data(self.bucket, name, generation=generation), subject=f"objects/{name}")
        req = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=60) as resp:
            self.posted.append((name, resp.status))


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
def cloud(pg_engine: Engine, pg_url: str, pubsub_emulator: PubSubEmulator,  # noqa: F811
          gcs_emulator: GcsEmulator, bq_emulator: BqEmulator,  # noqa: F811
          receiver: WebhookReceiver) -> Iterator[dict[str, Any]]:
    """Topics, a push subscription into `route`, the functions running (sweep as
    Cloud Scheduler reaches it, over HTTP), the pipeline synced, and the storage
    notifier polling. Alerts go to a topic of their own and to a webhook."""
    reset_process_caches()
    gcs_emulator.ensure_bucket(BUCKET)
    bq_emulator.ensure_dataset("analytics")
    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    pubsub_emulator.create_topic(topic)
    pubsub_emulator.create_topic(f"{topic}-events")
    pubsub_emulator.create_topic(f"{topic}-alerts")
    pubsub_emulator.create_subscription(f"{topic}-alerts", f"{topic}-alerts-pull")
    env = {
        "DATABASE_URL": pg_url,
        "ORCHESTRATOR_RUNTIME": "cloud",
        "ORCHESTRATOR_GCP_PROJECT": pubsub_emulator.project,
        "ORCHESTRATOR_TASKS_TOPIC": topic,
        "ORCHESTRATOR_EVENTS_TOPIC": f"{topic}-events",
        "ORCHESTRATOR_ALERTS_TOPIC": f"{topic}-alerts",
        "ORCHESTRATOR_ALERT_WEBHOOK_URL": receiver.url,
        "ORCHESTRATOR_LOG_FORMAT": "json",
        "ORCHESTRATOR_WAREHOUSE": "bigquery",
        "ORCHESTRATOR_BQ_DATASET": "analytics",
        "ORCHESTRATOR_BQ_PARTITION_DECORATORS": "false",
        "ORCHESTRATOR_OBJECT_STORE": "gcs",
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
        "BIGQUERY_EMULATOR_HOST": bq_emulator.endpoint,
        "STORAGE_EMULATOR_HOST": gcs_emulator.endpoint,
    }
    # The operator's side: the same database, publishing (for the sweeper) to the emulator.
    operator = Runtime(Settings(database_url=pg_url), pg_engine,
                       PubSubPublisher(pubsub_emulator.project, topic))
    operator.sync(EXAMPLE)
    with FunctionServer("route", env) as route, \
            FunctionServer("on_object_finalized", env) as finalized, \
            FunctionServer("sweep", env, signature_type="http") as sweep:
        pubsub_emulator.create_subscription(
            topic, f"{topic}-push", ack_deadline_s=60,
            push_endpoint=f"{route.url}/projects/{pubsub_emulator.project}/topics/{topic}")
        with FinalizeNotifier(gcs_emulator, BUCKET, finalized.url) as notifier:
            yield {"operator": operator, "route": route, "finalized": finalized,
                   "sweep": sweep, "notifier": notifier, "gcs": gcs_emulator, "bq": bq_emulator,
                   "alerts": f"{topic}-alerts-pull", "pubsub": pubsub_emulator,
                   "receiver": receiver}


def test_uploaded_parquet_files_run_the_monthly_profit_batch_to_success_on_emulators(
        cloud: dict[str, Any], pg_engine: Engine) -> None:
    """Upload through google-cloud-storage -> finalized events -> route over Pub/Sub
    push -> loads and the query on bqemulator -> SUCCESS, with the expected rows."""
    operator: Runtime = cloud["operator"]
    started = time.monotonic()
    expected = write_monthly_files(cloud["gcs"].object_store(), BATCH, seed=17)

    status = None
    last_sweep = time.monotonic()
    while time.monotonic() - started < 180:
        status = operator.batch_status("monthly_profit", BATCH)
        if status in ("SUCCESS", "FAILED", "CANCELLED"):
            break
        if time.monotonic() - last_sweep > 5:
            operator.router.sweep()  # Cloud Scheduler's job, every minute in production
            last_sweep = time.monotonic()
        time.sleep(0.25)
    logs = "\n".join([cloud["route"].output()[-4000:], cloud["finalized"].output()[-2000:],
                      *cloud["notifier"].errors])
    with pg_engine.connect() as conn:
        errors = conn.execute(text("SELECT error FROM task_log WHERE error IS NOT NULL")).all()
    assert status == "SUCCESS", (errors, logs)
    elapsed = time.monotonic() - started

    states = {t: s for (b, t), (s, _) in rel.task_states(pg_engine).items() if b == BATCH}
    assert states == {"load_sales": "SUCCESS", "load_expenses": "SUCCESS",
                      "calculate_profit": "SUCCESS"}
    markers = [n for n, code in cloud["notifier"].posted if n.endswith("_SUCCESS")]
    assert sorted(markers) == [f"expenses/{BATCH}/_SUCCESS", f"sales/{BATCH}/_SUCCESS"]
    assert all(200 <= code < 300 for _, code in cloud["notifier"].posted)
    rows = cloud["bq"].warehouse().fetch(PROFIT_SQL, {"m": expected[0]["month"]})
    assert rows == expected
    entries = [json.loads(line) for line in cloud["route"].output().splitlines()
               if line.startswith("{")]
    assert {"succeeded"} <= {e.get("outcome") for e in entries}
    print(f"\ne2e: batch SUCCESS {elapsed:.1f}s after the upload")


SCHEDULED = """\
name: nightly_report
schedule:
  cron: "* * * * *"
  batch_id: "{datetime}"
alerts:
  events: [batch_failed, task_failed]
tasks:
  - name: report
    handler: python
    config: {callable: "reports.missing:build"}
"""


def call_sweep(cloud: dict[str, Any]) -> dict[str, Any]:
    """What Cloud Scheduler does every minute: POST to the sweep function."""
    req = urllib.request.Request(cloud["sweep"].url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=60) as resp:
        return dict(json.loads(resp.read()))


def test_the_sweep_function_starts_a_scheduled_batch_and_its_failure_alerts_once(
        cloud: dict[str, Any], pg_engine: Engine, tmp_path: Path) -> None:
    """A tick is due; the sweep function (HTTP, as Cloud Scheduler calls it) starts its
    batch; route runs it over Pub/Sub push and it fails; the next sweeps send
    task_failed and batch_failed once each to the alerts topic and to the webhook."""
    operator: Runtime = cloud["operator"]
    path = tmp_path / "nightly_report.yaml"
    path.write_text(SCHEDULED)
    operator.sync(path)
    # As if synced two minutes ago: a tick is due now, so the test need not wait for one.
    with pg_engine.begin() as conn:
        conn.execute(update(ScheduleState).values(
            last_tick_at=operator.clock.now() - timedelta(minutes=2)))
    first = call_sweep(cloud)
    assert first["scheduled"] == 1, (first, cloud["sweep"].output()[-3000:])
    with pg_engine.connect() as conn:
        batch_id = conn.execute(text("SELECT batch_id FROM batches")).scalar_one()
    assert batch_id.startswith(str(operator.clock.now().year))
    receiver: WebhookReceiver = cloud["receiver"]
    deadline = time.monotonic() + 90
    while len(receiver.accepted) < 2 and time.monotonic() < deadline:
        time.sleep(1.0)
        call_sweep(cloud)
    for _ in range(2):
        assert call_sweep(cloud)["alerts_delivered"] == 0
    logs = cloud["route"].output()[-3000:] + cloud["sweep"].output()[-3000:]
    assert operator.batch_status("nightly_report", batch_id) == "FAILED", logs
    texts = sorted(receiver.texts())
    assert [t.splitlines()[0] for t in texts] == [
        f"[error] batch_failed: nightly_report/{batch_id}: batch FAILED: report failed",
        f"[error] task_failed: nightly_report/{batch_id}: task report failed on attempt 1"]
    assert all(t.splitlines()[1].startswith("PermanentError: python: cannot load") for t in texts)
    got = cloud["pubsub"].pull(cloud["alerts"], want=3, timeout=10)
    assert sorted(m.attributes["kind"] for m in got) == ["batch_failed", "task_failed"]
    doc = json.loads(next(m.data for m in got if m.attributes["kind"] == "task_failed"))
    assert doc["command"] == f"orchestrator why {batch_id} report -p nightly_report"
