"""Dynamic fan-out / fan-in: a task mapped over a run-time list, its child promoted once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from orchestrator import engine, mapping
from orchestrator.db.models import TaskEvent, TaskLog
from orchestrator.db.session import transaction
from orchestrator.engine import expansion
from orchestrator.engine.types import Outcome
from orchestrator.errors import PermanentError
from orchestrator.pipeline.load import build_pipeline
from orchestrator.ports import SystemClock
from orchestrator.testing import reset_process_caches
from tests.dags import spec_from_edges, sync
from tests.embedded import pg_runtime

pytestmark = pytest.mark.postgres

HERE = "tests.test_mapping"


def list_regions(ctx: Any) -> dict[str, Any]:
    return {"regions": ["north", "south", "east", "west"]}


def load_one(ctx: Any) -> dict[str, Any]:
    item = ctx.input["item"]
    if item == "east" and ctx.params.get("break_east"):
        raise PermanentError("east is broken")
    return {"item": item, "index": ctx.input["map_index"]}


def total(ctx: Any) -> dict[str, Any]:
    loaded = ctx.parents["load"]
    return {"n": len(loaded), "first": loaded[0], "last": loaded[-1]}


def alert(ctx: Any) -> dict[str, Any]:
    return {"alerted": True}


def py(fn: str, **extra: Any) -> dict[str, Any]:
    return {"handler": "python", "config": {"callable": f"{HERE}:{fn}"}, **extra}


def _promotions(rt: Any, task: str) -> int:
    with rt.sessions() as s:
        from orchestrator.db.models import Task

        return s.execute(
            select(func.count()).select_from(TaskEvent).join(Task, Task.id == TaskEvent.task_id)
            .where(Task.name == task, TaskEvent.from_status == "PENDING",
                   TaskEvent.to_status == "QUEUED")
        ).scalar_one()


def test_a_map_over_500_objects_runs_500_instances_and_one_fan_in(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "buckets" / "landing" / "sales" / "2024-03"
    folder.mkdir(parents=True)
    for i in range(500):
        (folder / f"part-{i:04d}.csv").write_text(str(i))
    spec = spec_from_edges(
        "mapped", {"start": [], "load": ["start"], "total": ["load"]},
        load=py("load_one", map_over={"gcs_prefix": "gs://landing/sales/{batch_id}/"}),
        total=py("total"))
    with pg_runtime(pg_url, tmp_path, workers=8) as rt:
        rt.sync_specs([spec])
        rt.start_batch("mapped", "2024-03")
        assert rt.wait("mapped", "2024-03", timeout=90) == "SUCCESS"
        with rt.sessions() as s:
            instances = s.execute(
                select(TaskLog.map_index, TaskLog.status, TaskLog.output)
                .where(TaskLog.map_index >= 0).order_by(TaskLog.map_index)).all()
            out = s.execute(select(TaskLog.output).where(TaskLog.map_index == -1)).scalars().all()
        assert [i for i, _, _ in instances] == list(range(500))
        assert {st for _, st, _ in instances} == {"SUCCESS"}
        assert instances[7][2]["item"] == "gs://landing/sales/2024-03/part-0007.csv"
        assert {"n": 500, "first": {"item": "gs://landing/sales/2024-03/part-0000.csv",
                                    "index": 0},
                "last": {"item": "gs://landing/sales/2024-03/part-0499.csv",
                         "index": 499}} in out
        assert _promotions(rt, "total") == 1
        from orchestrator import queries

        with rt.sessions() as s:
            doc = queries.batch_status(s, "2024-03", "mapped")
        load = next(t for t in doc["tasks"] if t["task"] == "load")
        assert load["instances"] == {"total": 500, "counts": {"SUCCESS": 500}}


def _parent_output_spec() -> Any:
    return build_pipeline({"name": "by_region", "tasks": [
        {"name": "regions", **py("list_regions")},
        {"name": "load", "depends_on": ["regions"], "retry": {"max_attempts": 1},
         **py("load_one", map_over={"parent_output": "regions.regions"})},
        {"name": "total", "depends_on": ["load"], **py("total")},
        {"name": "alert", "depends_on": ["load"], "trigger_rule": "one_failed", **py("alert")},
    ]}, known_handlers={"python"})


def test_a_map_over_a_parents_list_fans_in_its_outputs_in_index_order(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    with pg_runtime(pg_url, tmp_path, workers=4) as rt:
        rt.sync_specs([_parent_output_spec()])
        rt.start_batch("by_region", "ok")
        assert rt.wait("by_region", "ok", timeout=20) == "SUCCESS"
        from orchestrator import queries

        with rt.sessions() as s:
            doc = queries.batch_status(s, "ok", "by_region")
        tasks = {t["task"]: t for t in doc["tasks"]}
        assert [o["item"] for o in tasks["load"]["output"]] == ["north", "south", "east", "west"]
        assert tasks["total"]["output"]["n"] == 4 and tasks["alert"]["status"] == "SKIPPED"


def test_a_failed_instance_fails_the_mapped_task_and_trigger_rules_follow(
        pg_engine: Engine, pg_url: str, tmp_path: Path) -> None:
    with pg_runtime(pg_url, tmp_path, workers=4) as rt:
        rt.sync_specs([_parent_output_spec()])
        rt.start_batch("by_region", "bad", {"break_east": True})
        assert rt.wait("by_region", "bad", timeout=20) == "FAILED"
        from orchestrator import queries

        with rt.sessions() as s:
            doc = queries.batch_status(s, "bad", "by_region")
        tasks = {t["task"]: t for t in doc["tasks"]}
        assert tasks["load"]["status"] == "ERROR"
        assert tasks["load"]["error"] == "1 of 4 mapped instances failed"
        assert tasks["load"]["instances"]["counts"] == {"SUCCESS": 3, "ERROR": 1}
        assert tasks["total"]["status"] == "UPSTREAM_FAILED"
        assert tasks["alert"]["status"] == "SUCCESS"


def test_more_items_than_max_instances_fail_the_task() -> None:
    from orchestrator.engine.types import TaskRow

    row = TaskRow(log_id=1, batch_pk=1, task_id=1, pipeline="p", batch_id="b", task="t",
                  handler="python", config={}, status="RUNNING", attempt=1, retry_base=0,
                  max_attempts=1, retry_initial_delay_s=0, retry_backoff_factor=1,
                  retry_max_delay_s=0, timeout_s=10, params={}, batch_status="RUNNING",
                  map_over={"parent_output": "p.items", "max_instances": 3})
    with pytest.raises(PermanentError, match="exceed max_instances=3"):
        mapping.resolve_items(row, {"parents": {"p": {"items": [1, 2, 3, 4]}}}, None)
    with pytest.raises(PermanentError, match="not a list"):
        mapping.resolve_items(row, {"parents": {"p": {"items": "x"}}}, None)


def test_map_over_must_name_a_declared_parent() -> None:
    from orchestrator.errors import PipelineValidationError

    with pytest.raises(PipelineValidationError, match="not in its depends_on"):
        build_pipeline({"name": "x", "tasks": [
            {"name": "a", "handler": "noop"},
            {"name": "b", "handler": "noop", "map_over": {"parent_output": "a.items"}}]},
            known_handlers={"noop"})


# -- exactly-once promotion under concurrent instance completions ---------------------------


@pytest.mark.parametrize("n", [2, 16])
def test_instances_finishing_at_once_promote_the_child_exactly_once(
        pg_sessions: sessionmaker[Session], n: int) -> None:
    reset_process_caches()
    now = SystemClock().now()
    spec = spec_from_edges("mapped_fan_in", {"load": [], "child": ["load"]},
                           load={"map_over": {"gcs_prefix": "gs://b/x/"}})
    sync(pg_sessions, spec, now)
    pool = ThreadPoolExecutor(max_workers=n)
    try:
        for trial in range(8):
            batch_id = f"t{trial}"

            def prepare(s: Session, batch_id: str = batch_id) -> list[Any]:
                engine.start_batch(s, "mapped_fan_in", batch_id, {}, now)
                row = engine.resolve_task(s, "mapped_fan_in", batch_id, "load")
                claimed = engine.claim(s, row, 1, now)
                assert claimed is not None
                assert expansion.expand(s, claimed.row, 1, list(range(n)), now).applied
                rows = []
                for i in range(n):
                    inst = engine.resolve_task(s, "mapped_fan_in", batch_id, "load", map_index=i)
                    assert engine.claim(s, inst, 1, now) is not None
                    rows.append(inst)
                return rows

            instances = transaction(pg_sessions, prepare)
            barrier = threading.Barrier(n, timeout=30)

            def finish(row: Any, barrier: threading.Barrier = barrier) -> Outcome:
                waited = False

                def work(s: Session) -> Outcome:
                    nonlocal waited
                    s.execute(select(1))
                    if not waited:
                        waited = True
                        barrier.wait()
                    return engine.succeed(s, row, 1, {"i": row.map_index}, now)

                return transaction(pg_sessions, work)

            outcomes = list(pool.map(finish, instances))
            assert all(o.applied for o in outcomes)
            assert sum(1 for o in outcomes for d in o.queued if d.task == "child") == 1
            with pg_sessions() as s:
                child = engine.resolve_task(s, "mapped_fan_in", batch_id, "child")
                load = engine.resolve_task(s, "mapped_fan_in", batch_id, "load")
                events = s.execute(
                    select(func.count()).select_from(TaskEvent).where(
                        TaskEvent.batch_pk == child.batch_pk, TaskEvent.task_id == child.task_id,
                        TaskEvent.to_status == "QUEUED")).scalar_one()
                output = s.execute(select(TaskLog.output).where(TaskLog.id == load.log_id)).scalar_one()
            assert child.status == "QUEUED" and events == 1 and load.status == "SUCCESS"
            assert output == [{"i": i} for i in range(n)]
    finally:
        pool.shutdown()
