"""Poison inputs reach `route` as real Pub/Sub CloudEvents: each is acknowledged (2xx),
logged with its reason, and recorded; none is redelivered, and no task is left
RUNNING. `route` raises only when the database or the publisher is out of reach
(tests/test_bad_input.py covers those)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator import bootstrap
from orchestrator.edge import DEAD_LETTER_COUNT_ATTRIBUTE
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.load import build_pipeline
from orchestrator.runtime import Runtime
from orchestrator.settings import Settings
from orchestrator.testing import (
    RecordingPublisher,
    SwitchablePublisher,
    function_client,
    pubsub_request,
    reset_process_caches,
)
from tests.conftest import FakeClock

pytestmark = pytest.mark.postgres

DEEP = 200_000
LONG_PIPELINE = "p" * 128
LONG_TASK = "t" * 128


class Bad:
    """What a handler hands back that the task log cannot store."""

    NUL = "a\x00b"
    SURROGATE = "\ud800"


def emit(ctx: TaskContext) -> dict[str, Any]:
    kind = ctx.params["kind"]
    if kind == "output-nul":
        return {"text": Bad.NUL}
    if kind == "output-nul-key":
        return {Bad.NUL: 1}
    if kind == "output-nan":
        return {"value": float("nan")}
    if kind == "output-infinity":
        return {"value": float("-inf")}
    if kind == "output-surrogate":
        return {"text": Bad.SURROGATE}
    if kind == "output-deep":
        deep: list[Any] = []
        for _ in range(500):
            deep = [deep]
        return {"deep": deep}
    if kind == "error-nul":
        raise ValueError(f"the row said {Bad.NUL}")
    if kind == "error-surrogate":
        raise ValueError(f"the row said {Bad.SURROGATE}")
    if kind == "prints":
        print(f"row {Bad.NUL} and {Bad.SURROGATE}")
    return {"ok": True}


def py(fn: str) -> dict[str, Any]:
    return {"handler": "python", "config": {"callable": f"tests.test_poison_inputs:{fn}"},
            "retry": {"max_attempts": 1}}


@pytest.fixture
def published() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def rt(pg_engine: Engine, pg_url: str, published: RecordingPublisher) -> Iterator[Runtime]:
    reset_process_caches()
    runtime = Runtime(Settings(database_url=pg_url), pg_engine,
                      SwitchablePublisher(published), clock=FakeClock())
    runtime.sync_specs([
        build_pipeline({"name": "poison", "tasks": [{"name": "emit", **py("emit")},
                                                    {"name": "after", "depends_on": ["emit"],
                                                     **py("emit")}]},
                       known_handlers={"python"}),
        build_pipeline({"name": LONG_PIPELINE, "concurrency": 1, "tasks": [
            {"name": LONG_TASK, "concurrency": 1, **py("emit")}]}, known_handlers={"python"}),
    ])
    with bootstrap.use(runtime):
        yield runtime


def route(request: tuple[dict[str, str], bytes]) -> int:
    headers, body = request
    return int(function_client("route").post("/", headers=headers, data=body).status_code)


def drive(published: RecordingPublisher) -> list[int]:
    """Push every published message into `route`; the status code of each delivery."""
    codes = []
    while pending := published.take():
        for m in pending:
            codes.append(route(pubsub_request(dict(m.data), attributes=dict(m.attributes))))
    return codes


def rows(engine: Engine) -> dict[tuple[str, str], tuple[str, str | None]]:
    with engine.connect() as conn:
        found = conn.execute(text(
            "SELECT b.batch_id, t.name, l.status, l.error FROM task_log l "
            "JOIN batches b ON b.id = l.batch_pk JOIN tasks t ON t.id = l.task_id")).all()
    return {(r[0], r[1]): (str(r[2]), r[3]) for r in found}


def batches(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM batches")).scalar_one())


def logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "orchestrator")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


START = '{"type": "start_batch", "pipeline": "poison", "batch_id": "b1", '
# A start_batch message the database would refuse (or that crashed the parser): each
# is acknowledged, says why in the log, and starts nothing.
BAD_STARTS = [
    ("params-nul-value", START + '"params": {"kind": "a\\u0000b"}}', "NUL character"),
    ("params-nul-key", START + '"params": {"a\\u0000b": 1}}', "NUL character"),
    ("params-surrogate-value", START + '"params": {"kind": "\\ud800"}}', "lone surrogate"),
    ("params-surrogate-key", START + '"params": {"\\udfff": 1}}', "lone surrogate"),
    ("params-nan", START + '"params": {"x": NaN}}', "NaN"),
    ("params-infinity", START + '"params": {"x": [1, Infinity]}}', "Infinity"),
    ("params-minus-infinity", START + '"params": {"x": {"y": -Infinity}}}', "-Infinity"),
    ("deadline-1e300", START + '"deadline_s": 1e300}', "deadline_s"),
    ("deadline-infinity", START + '"deadline_s": Infinity}', "deadline_s"),
    ("deadline-nan", START + '"deadline_s": NaN}', "deadline_s"),
    ("params-200000-deep", START + '"params": {"x": ' + nested(DEEP) + "}}", "too deep"),
    ("params-101-deep", START + '"params": {"x": ' + nested(101) + "}}", "deeper than"),
]


@pytest.mark.parametrize(("body", "says"), [c[1:] for c in BAD_STARTS],
                         ids=[c[0] for c in BAD_STARTS])
def test_a_start_batch_the_database_would_refuse_is_acknowledged_and_starts_nothing(
        rt: Runtime, pg_engine: Engine, published: RecordingPublisher,
        caplog: pytest.LogCaptureFixture, body: str, says: str) -> None:
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert route(pubsub_request(body.encode())) == 200
    assert says.lower() in logged(caplog).lower()
    assert batches(pg_engine) == 0 and published.messages == []


@pytest.mark.parametrize("message", [
    START + '"params": {"x": ' + nested(DEEP) + "}}",
    '{"type": "run_task", "pipeline": "poison", "batch_id": "b1", "task": "emit", '
    '"attempt": 1, "trace": ' + nested(DEEP) + "}",
], ids=["start-batch", "run-task"])
def test_a_dead_letter_nested_200000_deep_is_acknowledged(
        rt: Runtime, pg_engine: Engine, caplog: pytest.LogCaptureFixture, message: str) -> None:
    route(pubsub_request({"type": "start_batch", "pipeline": "poison", "batch_id": "b1",
                          "params": {"kind": "ok"}}))
    before = rows(pg_engine)
    request = pubsub_request(message.encode(), topic="tasks-dead-letter", delivery_attempt=1,
                             attributes={DEAD_LETTER_COUNT_ATTRIBUTE: "5"})
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert route(request) == 200
    assert "too deep" in logged(caplog)
    assert rows(pg_engine) == before


# A task whose own result the database would refuse: the task fails, with the real
# reason, in the delivery that ran it (not RUNNING until its lease expires, and not
# "lease expired" in place of the reason), and its batch finishes.
BAD_RESULTS = [
    ("output-nul", "output.text holds a NUL character"),
    ("output-nul-key", "a key of output holds a NUL character"),
    ("output-nan", "output.value is NaN"),
    ("output-infinity", "output.value is -Infinity"),
    ("output-surrogate", "output.text holds a lone surrogate (U+D800)"),
    ("output-deep", "nests deeper than 100 levels"),
    ("error-nul", "ValueError: the row said a\\x00b"),
    ("error-surrogate", "ValueError: the row said \\ud800"),
]


@pytest.mark.parametrize(("kind", "says"), BAD_RESULTS, ids=[c[0] for c in BAD_RESULTS])
def test_a_result_the_database_would_refuse_fails_its_task_with_the_real_reason(
        rt: Runtime, pg_engine: Engine, published: RecordingPublisher,
        caplog: pytest.LogCaptureFixture, kind: str, says: str) -> None:
    assert route(pubsub_request({"type": "start_batch", "pipeline": "poison",
                                 "batch_id": "b1", "params": {"kind": kind}})) == 200
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert drive(published) == [200]
    state = rows(pg_engine)
    status, error = state[("b1", "emit")]
    assert status == "ERROR" and error is not None and says in error, (status, error)
    assert state[("b1", "after")][0] == "UPSTREAM_FAILED"
    # The log line carries the reason as raised (its formatter escapes what it must).
    assert says.partition("\\")[0] in logged(caplog)
    assert rt.batch_status("poison", "b1") == "FAILED"


def test_a_task_that_prints_what_the_database_cannot_hold_succeeds_and_keeps_the_line(
        rt: Runtime, pg_engine: Engine, published: RecordingPublisher) -> None:
    """Its attempt's log is stored with the NUL and the lone surrogate escaped."""
    from orchestrator import queries

    assert route(pubsub_request({"type": "start_batch", "pipeline": "poison",
                                 "batch_id": "b1", "params": {"kind": "prints"}})) == 200
    assert drive(published) == [200]
    assert rows(pg_engine)[("b1", "emit")] == ("SUCCESS", None)
    with rt.sessions() as s:
        lines = [e["line"] for a in queries.task_attempts(s, "b1", "emit")["attempts"]
                 for e in a["log"] if e["stream"] == "stdout"]
    assert lines == ["row a\\x00b and \\ud800"]


def test_a_limited_task_with_two_128_character_names_is_claimed_and_runs(
        rt: Runtime, pg_engine: Engine, published: RecordingPublisher) -> None:
    """Its concurrency key, `task:<pipeline>.<task>`, is 262 characters long."""
    assert route(pubsub_request({"type": "start_batch", "pipeline": LONG_PIPELINE,
                                 "batch_id": "b1", "params": {"kind": "ok"}})) == 200
    assert drive(published) == [200]
    assert rows(pg_engine) == {("b1", LONG_TASK): ("SUCCESS", None)}
    assert rt.batch_status(LONG_PIPELINE, "b1") == "SUCCESS"


def test_a_run_message_that_breaks_before_its_claim_fails_the_waiting_task(
        rt: Runtime, pg_engine: Engine, published: RecordingPublisher,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever else goes wrong before the claim (here, a refused statement) is
    acknowledged too, and recorded on the task the message was for."""
    from sqlalchemy.exc import DataError

    from orchestrator import engine

    route(pubsub_request({"type": "start_batch", "pipeline": "poison", "batch_id": "b1",
                          "params": {"kind": "ok"}}))

    def refused(*_: Any, **__: Any) -> Any:
        raise DataError("UPDATE task_log …", {}, Exception("value too long for type"))

    monkeypatch.setattr(engine, "claim", refused)
    with caplog.at_level(logging.INFO, logger="orchestrator"):
        assert drive(published) == [200]
    status, error = rows(pg_engine)[("b1", "emit")]
    assert status == "ERROR" and "value too long for type" in (error or "")
    assert "value too long for type" in logged(caplog)
    assert rt.batch_status("poison", "b1") == "FAILED"
