"""Read-only queries: the batch_status shape, events, recent batches, and `why`."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import queries
from orchestrator.db.session import transaction
from orchestrator.engine import cancel_batch, claim, fail, resolve_task, start_batch, succeed
from orchestrator.errors import InvalidInput, NotFound
from tests.dags import spec_from_edges, sync

DIAMOND = {"extract": [], "load_a": ["extract"], "load_b": ["extract"],
           "combine": ["load_a", "load_b"]}


def _start(sessions: sessionmaker[Session], pipeline: str, batch_id: str, now: datetime) -> None:
    transaction(sessions, lambda s: start_batch(s, pipeline, batch_id, {"k": "v"}, now))


def _claim(sessions: sessionmaker[Session], pipeline: str, batch_id: str, task: str,
           now: datetime) -> int:
    def work(s: Session) -> int:
        row = resolve_task(s, pipeline, batch_id, task)
        assert claim(s, row, row.attempt, now) is not None
        return row.attempt
    return transaction(sessions, work)


def _succeed(sessions: sessionmaker[Session], pipeline: str, batch_id: str, task: str,
             now: datetime) -> None:
    attempt = _claim(sessions, pipeline, batch_id, task, now)
    transaction(sessions, lambda s: succeed(
        s, resolve_task(s, pipeline, batch_id, task), attempt, {"rows": 3}, now))


def _fail(sessions: sessionmaker[Session], pipeline: str, batch_id: str, task: str,
          now: datetime, error: str, delay: float | None) -> None:
    attempt = _claim(sessions, pipeline, batch_id, task, now)
    transaction(sessions, lambda s: fail(
        s, resolve_task(s, pipeline, batch_id, task), attempt, error, now, retry_delay_s=delay))


def _why(sessions: sessionmaker[Session], batch_id: str, task: str, now: datetime) -> str:
    with sessions() as s:
        return queries.why(s, batch_id, task, now)


def test_batch_status_is_the_documented_json_shape_in_topological_order(sessions, clock):
    sync(sessions, spec_from_edges("diamond", DIAMOND), clock.now())
    _start(sessions, "diamond", "b1", clock.now())
    clock.advance(1)
    _succeed(sessions, "diamond", "b1", "extract", clock.now())
    with sessions() as s:
        doc = queries.batch_status(s, "b1")
    assert json.loads(json.dumps(doc)) == doc
    assert doc["schema"] == "orchestrator.batch_status/v1"
    assert (doc["pipeline"], doc["batch_id"], doc["status"]) == ("diamond", "b1", "RUNNING")
    assert doc["params"] == {"k": "v"}
    assert doc["created_at"] == "2024-03-01T12:00:00+00:00"
    assert doc["finished_at"] is None and doc["duration_s"] is None
    assert doc["counts"] == {"PENDING": 1, "QUEUED": 2, "SUCCESS": 1}
    names = [t["task"] for t in doc["tasks"]]
    assert names[0] == "extract" and names[-1] == "combine"
    assert set(names[1:3]) == {"load_a", "load_b"}
    first, last = doc["tasks"][0], doc["tasks"][-1]
    assert set(first) == {"task", "status", "attempt", "max_attempts", "trigger_rule",
                          "depends_on", "waiting_for_file", "queued_at", "started_at",
                          "finished_at", "duration_s", "next_attempt_at", "error", "output",
                          "instances"}
    assert first["status"] == "SUCCESS" and first["output"] == {"rows": 3}
    assert first["started_at"] == "2024-03-01T12:00:01+00:00" and first["duration_s"] == 0.0
    assert (first["attempt"], first["max_attempts"]) == (1, 3)
    assert last["depends_on"] == ["load_a", "load_b"] and last["trigger_rule"] == "all_success"


def test_batch_status_of_a_finished_batch_has_its_duration(sessions, clock):
    sync(sessions, spec_from_edges("one", {"only": []}), clock.now())
    _start(sessions, "one", "b1", clock.now())
    clock.advance(7.5)
    _succeed(sessions, "one", "b1", "only", clock.now())
    from orchestrator.engine import close_batch_if_done

    with sessions() as s:
        pk = resolve_task(s, "one", "b1", "only").batch_pk
    transaction(sessions, lambda s: close_batch_if_done(s, pk, clock.now()))
    with sessions() as s:
        doc = queries.batch_status(s, "b1", "one")
    assert doc["status"] == "SUCCESS" and doc["duration_s"] == 7.5
    assert doc["counts"] == {"SUCCESS": 1}


def test_unknown_batch_or_pipeline_is_not_found(sessions, clock):
    sync(sessions, spec_from_edges("one", {"only": []}), clock.now())
    _start(sessions, "one", "b1", clock.now())
    with sessions() as s, pytest.raises(NotFound, match="no batch 'nope'"):
        queries.batch_status(s, "nope")
    with sessions() as s, pytest.raises(NotFound, match="unknown pipeline 'other'"):
        queries.batch_status(s, "b1", "other")
    with sessions() as s, pytest.raises(NotFound, match="no task 'ghost'"):
        queries.why(s, "b1", "ghost", clock.now())


def test_a_batch_id_in_two_pipelines_needs_the_pipeline_named(sessions, clock):
    for name in ("alpha", "beta"):
        sync(sessions, spec_from_edges(name, {"only": []}), clock.now())
        _start(sessions, name, "2024-03", clock.now())
    with sessions() as s, pytest.raises(InvalidInput, match="alpha, beta"):
        queries.batch_status(s, "2024-03")
    with sessions() as s:
        assert queries.batch_status(s, "2024-03", "beta")["pipeline"] == "beta"


def test_batch_status_costs_the_same_number_of_statements_for_any_batch_size(sessions, clock):
    small = {"only": []}
    big = {f"t{i}": ([f"t{i - 1}"] if i else []) for i in range(300)}
    sync(sessions, spec_from_edges("small", small), clock.now())
    sync(sessions, spec_from_edges("big", big), clock.now())
    _start(sessions, "small", "s", clock.now())
    _start(sessions, "big", "b", clock.now())

    def count(batch_id: str) -> tuple[int, int]:
        with sessions() as s:
            seen: list[str] = []
            bind = s.get_bind()
            listener = lambda *a: seen.append(a[2].lstrip().upper()[:6])  # noqa: E731
            sa_event.listen(bind, "before_cursor_execute", listener)
            try:
                doc = queries.batch_status(s, batch_id)
            finally:
                sa_event.remove(bind, "before_cursor_execute", listener)
            return seen.count("SELECT"), len(doc["tasks"])

    n_small, tasks_small = count("s")
    n_big, tasks_big = count("b")
    assert (tasks_small, tasks_big) == (1, 300)
    assert n_small == n_big <= 3
    with sessions() as s:
        order = [t["task"] for t in queries.batch_status(s, "b")["tasks"]]
    assert order == [f"t{i}" for i in range(300)]


def test_batch_events_are_in_order_with_task_names(sessions, clock):
    sync(sessions, spec_from_edges("one", {"only": []}), clock.now())
    _start(sessions, "one", "b1", clock.now())
    _succeed(sessions, "one", "b1", "only", clock.advance(1))
    with sessions() as s:
        events = queries.batch_events(s, "b1")
    transitions = [(e["task"], e["from"], e["to"]) for e in events]
    assert ("only", "QUEUED", "RUNNING") in transitions
    assert transitions.index(("only", "QUEUED", "RUNNING")) < transitions.index(
        ("only", "RUNNING", "SUCCESS"))
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    json.dumps(events)


def test_recent_batches_lists_newest_first_with_counts(sessions, clock):
    sync(sessions, spec_from_edges("diamond", DIAMOND), clock.now())
    for i in range(3):
        _start(sessions, "diamond", f"b{i}", clock.advance(60))
    with sessions() as s:
        rows = queries.recent_batches(s, limit=2)
        assert queries.recent_batches(s, pipeline="other") == []
    assert [r["batch_id"] for r in rows] == ["b2", "b1"]
    assert rows[0]["counts"] == {"PENDING": 3, "QUEUED": 1}


# -- why, one test per situation it names -------------------------------------------------


def test_why_waiting_on_parents_names_them_and_the_running_attempt(sessions, clock):
    spec = spec_from_edges("w", {"x": [], "y": [], "z": ["x", "y"]},
                           y={"retry": {"max_attempts": 5, "initial_delay_s": 0}})
    sync(sessions, spec, clock.now())
    _start(sessions, "w", "b", clock.now())
    _fail(sessions, "w", "b", "y", clock.now(), "blip", delay=0)  # attempt 2 queued at once
    clock.t = clock.t.replace(hour=12, minute=3, second=0)
    _claim(sessions, "w", "b", "y", clock.now())
    text = _why(sessions, "b", "z", clock.advance(30))
    assert "waiting on parents x and y" in text
    assert "y RUNNING since 12:03:00, attempt 2/5" in text
    assert "x QUEUED" in text


def test_why_upstream_failed_names_the_root_failure_and_its_error(sessions, clock):
    sync(sessions, spec_from_edges("u", {"x": [], "mid": ["x"], "z": ["mid"]}), clock.now())
    _start(sessions, "u", "b", clock.now())
    _fail(sessions, "u", "b", "x", clock.now(), "schema mismatch: no column amount\ntrace", None)
    text = _why(sessions, "b", "z", clock.now())
    assert "upstream x failed with: schema mismatch: no column amount" in text
    assert "trace" not in text


def test_why_queued_but_not_claimed_says_for_how_long(sessions, clock):
    sync(sessions, spec_from_edges("q", {"x": []}), clock.now())
    _start(sessions, "q", "b", clock.now())
    assert "queued but not claimed for 40 s" in _why(sessions, "b", "x", clock.advance(40))


def test_why_waiting_for_its_file_gives_the_object_uri(sessions, clock):
    spec = spec_from_edges("f", {"load": []}, load={
        "gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}})
    sync(sessions, spec, clock.now())
    _start(sessions, "f", "2024-03", clock.now())
    assert "waiting for its file gs://landing/sales/2024-03/_SUCCESS" in _why(
        sessions, "2024-03", "load", clock.now())


def test_why_retrying_says_when_and_after_which_error(sessions, clock):
    spec = spec_from_edges("r", {"x": []}, x={"retry": {"max_attempts": 4}})
    sync(sessions, spec, clock.now())
    _start(sessions, "r", "b", clock.now())
    _fail(sessions, "r", "b", "x", clock.now(), "rate limited", delay=90)
    text = _why(sessions, "b", "x", clock.now())
    assert "retrying at 12:01:30" in text and "attempt 1/4" in text
    assert "after error: rate limited" in text


def test_why_running_says_since_when_and_the_attempt(sessions, clock):
    sync(sessions, spec_from_edges("run", {"x": []}), clock.now())
    _start(sessions, "run", "b", clock.now())
    _claim(sessions, "run", "b", "x", clock.now())
    assert "running since 12:00:00 (15 s), attempt 1/3" in _why(
        sessions, "b", "x", clock.advance(15))


def test_why_cancelled(sessions, clock):
    sync(sessions, spec_from_edges("c", {"x": [], "y": ["x"]}), clock.now())
    _start(sessions, "c", "b", clock.now())
    transaction(sessions, lambda s: cancel_batch(s, "c", "b", clock.now()))
    assert "cancelled" in _why(sessions, "b", "y", clock.now())


def test_why_failed_and_succeeded(sessions, clock):
    sync(sessions, spec_from_edges("d", {"x": [], "y": []}), clock.now())
    _start(sessions, "d", "b", clock.now())
    _succeed(sessions, "d", "b", "x", clock.now())
    _fail(sessions, "d", "b", "y", clock.now(), "division by zero", None)
    assert "succeeded at 12:00:00 on attempt 1" in _why(sessions, "b", "x", clock.now())
    assert "failed on attempt 1/3 at 12:00:00 with: division by zero" in _why(
        sessions, "b", "y", clock.now())


def test_why_skipped_names_the_trigger_rule(sessions, clock):
    spec = spec_from_edges("k", {"x": [], "alert": ["x"]},
                           alert={"trigger_rule": "one_failed"})
    sync(sessions, spec, clock.now())
    _start(sessions, "k", "b", clock.now())
    _succeed(sessions, "k", "b", "x", clock.now())
    assert "skipped: its trigger rule one_failed did not fire" in _why(
        sessions, "b", "alert", clock.now())
