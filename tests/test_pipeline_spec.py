"""Pipelines as code: bad files are one clear error that writes nothing; good files
sync idempotently and version on change; triggers and retry policies behave."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.models import Pipeline, Task, TaskDependency
from orchestrator.db.session import transaction
from orchestrator.errors import PipelineValidationError
from orchestrator.pipeline.load import build_pipeline, load_pipeline, load_pipelines
from orchestrator.pipeline.spec import GcsTrigger, RetryPolicy
from orchestrator.pipeline.sync import SyncResult, sync_pipeline

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "monthly_profit.yaml"

BAD = """\
name: bad pipeline
tasks:
  - name: a
    handler: noop
    depends_on: [c]
  - name: b
    handler: noop
    depends_on: [a]
  - name: c
    handler: noop
    depends_on: [b]
  - name: a
    handler: noop
  - name: d
    handler: no_such_handler
    depends_on: [ghost]
  - name: "bad name!"
    handler: noop
"""

GOOD = """\
name: good
tasks:
  - name: extract
    handler: noop
  - name: load
    handler: noop
    depends_on: [extract]
"""


def counts(sessions: sessionmaker[Session]) -> tuple[int, int, int]:
    def read(s: Session) -> tuple[int, int, int]:
        return tuple(  # type: ignore[return-value]
            s.execute(select(func.count()).select_from(t)).scalar_one()
            for t in (Pipeline, Task, TaskDependency))

    return transaction(sessions, read)


def load_and_sync(sessions: sessionmaker[Session], path: Path, now: Any,
                  sync_fn: Callable[..., SyncResult] = sync_pipeline) -> list[SyncResult]:
    """What `orchestrator pipelines sync PATH` does: validate everything, then store."""
    specs = load_pipelines(path)
    return transaction(sessions, lambda s: [sync_fn(s, spec, now) for spec in specs])


def problems_of(path: Path) -> list[str]:
    with pytest.raises(PipelineValidationError) as info:
        load_pipeline(path)
    assert str(path) in str(info.value)
    return info.value.problems


def test_every_problem_of_a_bad_file_is_reported_at_once(tmp_path: Path):
    """Unknown parent, cycle, duplicate, unknown handler and bad names: one error, all listed."""
    path = tmp_path / "bad.yaml"
    path.write_text(BAD)
    problems = problems_of(path)
    text = "\n".join(problems)
    assert "invalid pipeline name 'bad pipeline'" in text
    assert "duplicate task name 'a'" in text
    assert "task 'd': unknown handler 'no_such_handler'" in text
    assert "task 'd': depends on unknown task 'ghost'" in text
    assert "invalid task name 'bad name!'" in text
    cycles = [p for p in problems if p.startswith("cycle: ")]
    assert len(cycles) == 1
    assert len(problems) == 6, problems


def test_a_cycle_is_reported_with_its_path(tmp_path: Path):
    """The cycle error names a closed path along the depends_on edges."""
    path = tmp_path / "cycle.yaml"
    path.write_text("""\
name: loop
tasks:
  - {name: start, handler: noop}
  - {name: a, handler: noop, depends_on: [start, c]}
  - {name: b, handler: noop, depends_on: [a]}
  - {name: c, handler: noop, depends_on: [b]}
""")
    (problem,) = problems_of(path)
    nodes = problem.removeprefix("cycle: ").split(" -> ")
    assert nodes[0] == nodes[-1] and sorted(set(nodes)) == ["a", "b", "c"] and len(nodes) == 4
    deps = {"a": {"start", "c"}, "b": {"a"}, "c": {"b"}}
    forward = all(y in deps[x] for x, y in itertools.pairwise(nodes))
    backward = all(x in deps[y] for x, y in itertools.pairwise(nodes))
    assert forward or backward, problem


@pytest.mark.parametrize(("tasks", "expected"), [
    ([{"name": "a", "handler": "noop", "depends_on": ["a"]}], "task 'a': depends on itself"),
    ([{"name": "a", "handler": "noop", "config": {"seconds": -1}}],
     "task 'a': noop: 'seconds' must be a non-negative number"),
    ([{"name": "a", "handler": "noop"},
      {"name": "b", "handler": "noop", "depends_on": ["a"],
       "gcs_trigger": {"bucket": "landing", "pattern": "x/{batch_id}"}}],
     "task 'b': only a root task (no depends_on) may have a gcs_trigger"),
    ([{"name": "a", "handler": "noop",
       "gcs_trigger": {"bucket": "landing", "pattern": "x/_SUCCESS"}}],
     "pattern must contain {batch_id} exactly once"),
    ([{"name": "a", "handler": "noop", "retry": {"max_attempts": 0}}], "task 'a' retry.max_attempts"),
    ([{"name": "a", "handler": "noop", "trigger_rule": "sometimes"}], "task 'a' trigger_rule"),
    ([{"name": "a", "handler": "noop", "colour": "red"}], "task 'a' colour"),
    ([], "a pipeline needs at least one task"),
])
def test_each_kind_of_problem_is_named(tasks: list[dict[str, Any]], expected: str):
    """Each validation rule produces a message naming the task and what is wrong."""
    with pytest.raises(PipelineValidationError) as info:
        build_pipeline({"name": "p", "tasks": tasks})
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_a_bad_file_never_reaches_the_database(pg_sessions: Any, tmp_path: Path, clock: Any):
    """Loading a bad file fails before any sync: pipelines, tasks and edges are unchanged."""
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    load_and_sync(pg_sessions, good, clock.now())
    before = counts(pg_sessions)
    (tmp_path / "zz_bad.yaml").write_text(BAD)
    calls: list[str] = []

    def spy(s: Session, spec: Any, now: Any) -> SyncResult:
        calls.append(spec.name)
        return sync_pipeline(s, spec, now)

    # The good file changed too, but one bad file in the folder stops them all.
    good.write_text(GOOD.replace("name: good\n", "name: good\ndescription: changed\n"))
    with pytest.raises(PipelineValidationError) as info:
        load_and_sync(pg_sessions, tmp_path, clock.now(), spy)
    assert all(p.startswith("zz_bad.yaml: ") for p in info.value.problems)
    assert calls == []
    assert counts(pg_sessions) == before


def test_syncing_the_same_file_twice_changes_nothing(sessions: Any, tmp_path: Path, clock: Any):
    """A second sync of an unchanged file keeps the version and writes no rows."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    (first,) = load_and_sync(sessions, path, clock.now())
    assert (first.version, first.changed) == (1, True)
    before = counts(sessions)
    assert before == (1, 2, 1)
    (second,) = load_and_sync(sessions, path, clock.advance(60))
    assert (second.version, second.changed) == (1, False)
    assert counts(sessions) == before


def test_a_changed_file_makes_a_new_version(sessions: Any, tmp_path: Path, clock: Any):
    """Changing a pipeline adds a version with its own tasks; the old version stays intact."""
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    load_and_sync(sessions, path, clock.now())
    path.write_text(GOOD + "  - name: report\n    handler: noop\n    depends_on: [load]\n")
    (result,) = load_and_sync(sessions, path, clock.advance(60))
    assert (result.version, result.changed) == (2, True)
    assert counts(sessions) == (1, 2 + 3, 1 + 2)
    versions = transaction(sessions, lambda s: sorted(s.execute(
        select(Task.version, Task.name)).all()))
    assert versions == [(1, "extract"), (1, "load"),
                        (2, "extract"), (2, "load"), (2, "report")]


def test_the_monthly_profit_example_loads():
    """The shipped example validates against the real handler registry."""
    spec = load_pipeline(EXAMPLE)
    assert spec.name == "monthly_profit"
    assert {t.name for t in spec.tasks} == {"load_sales", "load_expenses", "calculate_profit"}
    assert set(spec.task("calculate_profit").depends_on) == {"load_sales", "load_expenses"}
    assert spec.topological_order()[-1] == "calculate_profit"
    sales = spec.task("load_sales").gcs_trigger
    assert sales is not None and sales.match("landing", "sales/2024-03/_SUCCESS") == "2024-03"


def test_tasks_may_be_written_as_a_mapping():
    """`tasks: {name: {...}}` is the same pipeline as the list form."""
    as_list = build_pipeline({"name": "p", "tasks": [
        {"name": "a", "handler": "noop"}, {"name": "b", "handler": "noop", "depends_on": ["a"]}]})
    as_map = build_pipeline({"name": "p", "tasks": {
        "a": {"handler": "noop"}, "b": {"handler": "noop", "depends_on": ["a"]}}})
    assert as_map.definition_hash() == as_list.definition_hash()


def test_unreadable_or_invalid_yaml_is_a_validation_error(tmp_path: Path):
    """A missing file or broken YAML is the same clear error, not a traceback."""
    assert problems_of(tmp_path / "missing.yaml")[0].startswith("cannot read")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    assert "invalid YAML" in problems_of(broken)[0]


# --- GCS triggers -----------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "bucket", "name", "batch_id"), [
    ("sales/{batch_id}/_SUCCESS", "landing", "sales/2024-03/_SUCCESS", "2024-03"),
    ("sales/{batch_id}/_SUCCESS", "landing", "sales/2024-03/part-0.parquet", None),
    ("sales/{batch_id}/_SUCCESS", "landing", "expenses/2024-03/_SUCCESS", None),
    ("sales/{batch_id}/_SUCCESS", "other-bucket", "sales/2024-03/_SUCCESS", None),
    ("sales/{batch_id}/_SUCCESS", "landing", "sales/2024/03/_SUCCESS", None),
    ("sales/{batch_id}/_SUCCESS", "landing", "xsales/2024-03/_SUCCESS", None),
    ("sales/{batch_id}/_SUCCESS", "landing", "sales/2024-03/_SUCCESS.tmp", None),
    ("sales/{batch_id}/*.parquet", "landing", "sales/2024-03/part-0.parquet", "2024-03"),
    ("sales/{batch_id}/*.parquet", "landing", "sales/2024-03/sub/part-0.parquet", None),
    ("exports/day={batch_id}.csv", "landing", "exports/day=2024-03-01.csv", "2024-03-01"),
])
def test_gcs_trigger_extracts_the_batch_id_or_rejects(pattern: str, bucket: str, name: str,
                                                      batch_id: str | None):
    """A trigger matches only its bucket and pattern, and yields the batch id from the path."""
    trig = GcsTrigger(bucket="landing", pattern=pattern)
    assert trig.match(bucket, name) == batch_id


@pytest.mark.parametrize(("bucket", "pattern"), [
    ("Landing", "x/{batch_id}"),
    ("landing", "x/{batch_id}/{batch_id}"),
    ("landing", "/x/{batch_id}"),
    ("landing", "../{batch_id}"),
])
def test_gcs_trigger_rejects_bad_buckets_and_patterns(bucket: str, pattern: str):
    """Invalid bucket names and unsafe or ambiguous patterns are refused."""
    with pytest.raises(ValueError):
        GcsTrigger(bucket=bucket, pattern=pattern)


# --- retry policy -----------------------------------------------------------------------


def test_retry_delay_grows_by_the_factor_up_to_the_cap():
    """delay_after(n) = initial * factor^(n-1), capped at max_delay_s."""
    policy = RetryPolicy(max_attempts=6, initial_delay_s=5, backoff_factor=2, max_delay_s=60)
    assert [policy.delay_after(n) for n in range(1, 7)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    flat = RetryPolicy(initial_delay_s=3, backoff_factor=1)
    assert [flat.delay_after(n) for n in (1, 2, 3)] == [3.0, 3.0, 3.0]
    assert RetryPolicy().delay_after(1) == 10.0
