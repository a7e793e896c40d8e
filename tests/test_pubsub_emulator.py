"""Contract tests against the official Pub/Sub emulator: the adapter's wire format (its
REST publish, through the emulator's transport and through Google's), its limits and
failures, a push subscription into a running `route` that drives a pipeline to
SUCCESS, and a cold `route` that publishes without loading gRPC."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from orchestrator.adapters.gcp import pubsub
from orchestrator.adapters.gcp.pubsub import GoogleHttp, PlainHttp, PubSubPublisher
from orchestrator.db.models import Batch, Task, TaskLog
from orchestrator.engine.types import Dispatch
from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage
from orchestrator.router import dispatch_message
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import RecordingPublisher, reset_process_caches
from tests.dags import spec_from_edges
from tests.pubsub_emulator import (  # noqa: F401
    FunctionServer,
    PubSubEmulator,
    free_port,
    pubsub_emulator,
)

pytestmark = pytest.mark.emulator
ROOT = Path(__file__).resolve().parents[1]


def _topic(emulator: PubSubEmulator) -> str:
    topic = f"tasks-{uuid.uuid4().hex[:8]}"
    emulator.create_topic(topic)
    emulator.create_subscription(topic, f"{topic}-pull")
    return topic


def _google_transport(emulator: PubSubEmulator) -> GoogleHttp:
    """The transport a function uses against Google, pointed at the emulator."""
    from google.auth.credentials import AnonymousCredentials

    return GoogleHttp(f"http://{emulator.host}", credentials=AnonymousCredentials())


@pytest.mark.parametrize("transport", ["emulator", "google"])
def test_adapter_publishes_the_message_data_and_attributes(
        pubsub_emulator: PubSubEmulator, transport: str) -> None:  # noqa: F811
    """What PubSubPublisher sends is what a subscriber receives, attributes included."""
    topic = _topic(pubsub_emulator)
    client = (PlainHttp(pubsub_emulator.host) if transport == "emulator"
              else _google_transport(pubsub_emulator))
    publisher = PubSubPublisher(pubsub_emulator.project, topic, client=client)
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


def test_more_messages_than_one_request_takes_all_arrive_once(
        pubsub_emulator: PubSubEmulator) -> None:  # noqa: F811
    """A fan-out wider than the API's 1,000 messages per request is split, not refused."""
    topic = _topic(pubsub_emulator)
    n = pubsub.MAX_MESSAGES + 234
    PubSubPublisher(pubsub_emulator.project, topic).publish(
        [OutboundMessage({"type": "run_task", "i": i}, {"i": str(i)}) for i in range(n)])
    got = pubsub_emulator.pull(f"{topic}-pull", want=n + 1, timeout=15)
    assert sorted(json.loads(m.data)["i"] for m in got) == list(range(n))
    assert all(m.attributes["i"] == str(json.loads(m.data)["i"]) for m in got)


def test_requests_stay_within_the_apis_limits() -> None:
    """Count and size both split a call into requests, keeping the messages' order."""
    small = [OutboundMessage({"i": i}) for i in range(2 * pubsub.MAX_MESSAGES + 1)]
    assert [len(r) for r in pubsub._requests(small)] == [pubsub.MAX_MESSAGES,
                                                        pubsub.MAX_MESSAGES, 1]
    big = [OutboundMessage({"i": i, "pad": "x" * 1_000_000}) for i in range(12)]
    batches = list(pubsub._requests(big))
    assert len(batches) > 1
    assert all(len(json.dumps({"messages": b})) < 10_000_000 for b in batches)
    order = [json.loads(base64.b64decode(m["data"]))["i"]
             for b in batches for m in b]
    assert order == list(range(12))


def test_a_missing_topic_fails_at_once_with_infrastructure_error(
        pubsub_emulator: PubSubEmulator) -> None:  # noqa: F811
    publisher = PubSubPublisher(pubsub_emulator.project, f"missing-{uuid.uuid4().hex[:8]}")
    start = time.monotonic()
    with pytest.raises(InfrastructureError, match="404"):
        publisher.publish([OutboundMessage({"type": "run_task"})])
    assert time.monotonic() - start < pubsub.PUBLISH_TIMEOUT_S / 2  # not retried to the end


def test_an_unreachable_pubsub_is_retried_then_infrastructure_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing listens: the publisher retries until its deadline, then raises."""
    attempts: list[str] = []

    class Counting(PlainHttp):
        def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
            attempts.append(path)
            return super().post(path, body, timeout)

    monkeypatch.setattr(pubsub, "PUBLISH_TIMEOUT_S", 0.6)
    publisher = PubSubPublisher("p", "t", client=Counting(f"127.0.0.1:{free_port()}"))
    with pytest.raises(InfrastructureError, match="Pub/Sub publish to t failed"):
        publisher.publish([OutboundMessage({"type": "run_task"})])
    assert len(attempts) >= 2


def test_a_transient_answer_is_retried_and_the_message_published_once(
        pubsub_emulator: PubSubEmulator) -> None:  # noqa: F811
    """A 503 before the real answer: retried; the subscriber sees the message once."""
    topic = _topic(pubsub_emulator)
    real = PlainHttp(pubsub_emulator.host)
    answers: list[int] = []

    class FlakyOnce:
        def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
            if not answers:
                answers.append(503)
                return 503, b"unavailable"
            status, data = real.post(path, body, timeout)
            answers.append(status)
            return status, data

    PubSubPublisher(pubsub_emulator.project, topic, client=FlakyOnce()).publish(
        [OutboundMessage({"type": "run_task", "task": "a"})])
    assert answers == [503, 200]
    got = pubsub_emulator.pull(f"{topic}-pull", want=2, timeout=3)
    assert [json.loads(m.data)["task"] for m in got] == ["a"]


COLD_ROUTE = textwrap.dedent("""\
    import json, sys
    from functions_framework import create_app

    headers, body = json.loads(sys.stdin.read())
    client = create_app("route", "functions/main.py").test_client()
    status = client.post("/", data=body.encode(), headers=headers).status_code
    print(json.dumps({"status": status, "modules": sorted(sys.modules)}))
""")


@pytest.mark.postgres
def test_a_cold_route_publishes_the_next_task_without_loading_grpc(
        pubsub_emulator: PubSubEmulator, pg_engine: Engine, pg_url: str) -> None:  # noqa: F811
    """A fresh process, built from the environment as a function instance is, runs one
    task whose completion readies two children: it continues with one and publishes the
    other, which reaches the topic; neither gRPC nor the generated Pub/Sub client was
    ever imported."""
    from orchestrator.testing import pubsub_request

    reset_process_caches()
    operator = Runtime(Settings(database_url=pg_url), pg_engine, published := RecordingPublisher())
    operator.sync_specs([spec_from_edges("cold_pub", {"a": [], "b": ["a"], "c": ["a"]})])
    assert operator.start_batch("cold_pub", "2024-03")
    [message] = published.data
    topic = _topic(pubsub_emulator)
    env = {"PATH": "/usr/bin:/bin", "DATABASE_URL": pg_url, "ORCHESTRATOR_RUNTIME": "cloud",
           "ORCHESTRATOR_GCP_PROJECT": pubsub_emulator.project, "ORCHESTRATOR_TASKS_TOPIC": topic,
           "ORCHESTRATOR_LOG_FORMAT": "json", "PUBSUB_EMULATOR_HOST": pubsub_emulator.host}
    out = subprocess.run([sys.executable, "-c", COLD_ROUTE], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=env,
                         input=json.dumps([*pubsub_request(message)[:1],
                                           pubsub_request(message)[1].decode()]))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["status"] == 200, out.stderr
    got = pubsub_emulator.pull(f"{topic}-pull", want=1, timeout=10)
    assert len(got) == 1, out.stdout[-2000:]
    child = json.loads(got[0].data)
    assert child["type"] == "run_task" and child["task"] in ("b", "c")
    with pg_engine.connect() as conn:
        done = dict(conn.execute(text(
            "SELECT t.name, l.status FROM task_log l JOIN tasks t ON t.id = l.task_id")).all())
    # One child continued in the same delivery; the other waits for its message.
    assert done == {"a": "SUCCESS", child["task"]: "QUEUED",
                    ({"b", "c"} - {child["task"]}).pop(): "SUCCESS"}
    loaded = set(report["modules"])
    assert "orchestrator.adapters.gcp.pubsub" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] == "grpc"
                   or m.startswith(("google.cloud.pubsub", "google.api_core", "google.pubsub")))
    assert heavy == []


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
