"""Storage triggers alone: which objects match which waiting task, and what a match
does (Postgres and SQLite)."""

from __future__ import annotations

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.storage_events import StorageObject
from orchestrator.testing import reset_process_caches
from orchestrator.triggers import StorageTriggers, matching_triggers
from tests.conftest import FakeClock
from tests.dags import spec_from_edges, sync
from tests.units import dispatcher, statuses

SALES = {"gcs_trigger": {"bucket": "landing", "pattern": "sales/{batch_id}/_SUCCESS"}}


def triggers(sessions: sessionmaker[Session], clock: FakeClock):
    reset_process_caches()
    sync(sessions, spec_from_edges("sales", {"load": [], "report": ["load"]}, load=SALES),
         clock.now())
    d, published = dispatcher(sessions, clock)
    return StorageTriggers(sessions, d, clock), published


def obj(name: str, bucket: str = "landing") -> StorageObject:
    return StorageObject(bucket=bucket, name=name, generation="7")


def test_only_an_object_on_the_pattern_matches_and_names_its_batch(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    triggers(sessions, clock)
    with sessions() as s:
        assert matching_triggers(s, obj("sales/2024-03/_SUCCESS")) == [("sales", "load", "2024-03")]
        for miss in (obj("sales/2024-03/part-0.parquet"), obj("sales/_SUCCESS"),
                     obj("sales/2024-03/_SUCCESS", bucket="other")):
            assert matching_triggers(s, miss) == []


def test_a_matching_object_starts_its_batch_and_releases_the_task_once(
        sessions: sessionmaker[Session], clock: FakeClock) -> None:
    t, published = triggers(sessions, clock)
    assert t.object_finalized(obj("sales/2024-03/_SUCCESS")).outcome == "queued"
    assert t.object_finalized(obj("sales/2024-03/_SUCCESS")).outcome == "duplicate"
    assert published.tasks() == [("sales", "2024-03", "load", 1)]
    assert statuses(sessions) == {"load": "QUEUED", "report": "PENDING"}
    assert t.object_finalized(obj("elsewhere/x")).outcome == "stored"
