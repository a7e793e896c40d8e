"""Contract tests against the official Pub/Sub emulator: the adapter's wire format,
and a push subscription into a running `route` that drives a pipeline to SUCCESS."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from orchestrator.adapters.gcp.pubsub import PubSubPublisher
from orchestrator.db.models import Batch, Task, TaskLog
from orchestrator.engine.types import Dispatch
from orchestrator.router import dispatch_message
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.dags import spec_from_edges
from tests.pubsub_emulator import FunctionServer, PubSubEmulator, pubsub_emulator  # noqa: F401

pytestmark = pytest.mark.emulator


def test_adapter_publishes_the_message_data_and_attributes(
        pubsub_emulator: PubSubEmulator) -> None:  # noqa: F811
    """What PubSubPublisher sends is what a subscriber receives, attributes included."""
    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    pubsub_emulator.create_topic(topic)
    pubsub_emulator.create_subscription(topic, f"{topic}-pull")
    publisher = PubSubPublisher(pubsub_emulator.project, topic)
    dispatches = [Dispatch("sales", "2024-03", "load", 1), Dispatch("sales", "2024-03", "sum", 2)]
    publisher.publish([dispatch_message(d) for d in dispatches])

    got = pubsub_emulator.pull(f"{topic}-pull", want=2)
    by_task = {m.attributes["task"]: m for m in got}
    assert set(by_task) == {"load", "sum"}
    assert json.loads(by_task["sum"].data) == {
        "type": "run_task", "pipeline": "sales", "batch_id": "2024-03", "task": "sum",
        "attempt": 2}
    assert dict(by_task["sum"].attributes) == {
        "type": "run_task", "pipeline": "sales", "batch_id": "2024-03", "task": "sum",
        "attempt": "2"}


@pytest.mark.postgres
def test_push_subscription_into_route_drives_a_two_task_pipeline_to_success(
        pubsub_emulator: PubSubEmulator, pg_engine: Engine, pg_url: str) -> None:  # noqa: F811
    """start_batch published to the emulator -> push -> route -> publish -> push -> SUCCESS."""
    reset_process_caches()
    setup = Runtime(Settings(database_url=pg_url), pg_engine, RecordingPublisher())
    setup.sync_specs([spec_from_edges("two", {"extract": [], "load": ["extract"]})])

    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    pubsub_emulator.create_topic(topic)
    env = {
        "DATABASE_URL": pg_url,
        "ORCHESTRATOR_RUNTIME": "cloud",
        "ORCHESTRATOR_GCP_PROJECT": pubsub_emulator.project,
        "ORCHESTRATOR_TASKS_TOPIC": topic,
        "ORCHESTRATOR_LOG_FORMAT": "json",
        "PUBSUB_EMULATOR_HOST": pubsub_emulator.host,
    }
    with FunctionServer("route", env) as route:
        pubsub_emulator.create_subscription(
            topic, f"{topic}-push",
            push_endpoint=f"{route.url}/projects/{pubsub_emulator.project}/topics/{topic}")
        start = {"type": "start_batch", "pipeline": "two", "batch_id": "2024-03"}
        pubsub_emulator.publish(topic, json.dumps(start).encode(), type="start_batch")

        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            status = setup.batch_status("two", "2024-03")
            if status == "SUCCESS":
                break
            time.sleep(0.2)
        assert status == "SUCCESS", route.output()
        log = route.output()

    with setup.sessions() as s:
        rows = dict(s.execute(
            select(Task.name, TaskLog.status).join(TaskLog, TaskLog.task_id == Task.id)
            .join(Batch, Batch.id == TaskLog.batch_pk)).all())
    assert rows == {"extract": "SUCCESS", "load": "SUCCESS"}
    entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert {e.get("outcome") for e in entries} >= {"started", "succeeded"}
