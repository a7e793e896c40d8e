"""The time rules of a pipeline file, alone: cron ticks in a time zone (daylight-saving
changes both ways), batch ids from a tick's logical time, catch-up after an outage,
deadlines and file expectations on a clock, and the errors a bad file gets."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
import yaml

from orchestrator.errors import PipelineValidationError
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.timing import (
    DeadlineSpec,
    ScheduleSpec,
    TimeRule,
    clock_at_or_after,
    parse_duration,
    render_batch_id,
)
from orchestrator.schedules import ON_TIME_S, due_ticks

PARIS = ZoneInfo("Europe/Paris")
# Europe/Paris in 2024: clocks went forward at 02:00 on 31 March, back at 03:00 on 27 October.
SPRING = datetime(2024, 3, 31, tzinfo=PARIS)
FALL = datetime(2024, 10, 27, tzinfo=PARIS)


def paris(*args: int) -> datetime:
    return datetime(*args, tzinfo=PARIS).astimezone(UTC)  # type: ignore[misc]


def day_of_ticks(schedule: ScheduleSpec, day: datetime) -> list[datetime]:
    """The ticks from the local midnight of `day` to the next local midnight."""
    start = day.replace(hour=0).astimezone(UTC) - timedelta(seconds=1)
    end = (day + timedelta(days=1)).replace(hour=0).astimezone(UTC)
    return [t for t in schedule.ticks_after(start, limit=100) if t < end]


def build(**parts: object) -> object:
    return build_pipeline({"name": "p", "tasks": [{"name": "a", "handler": "noop"}], **parts},
                          known_handlers={"noop"})


# -- daylight saving ------------------------------------------------------------------------


@pytest.mark.parametrize("day", [SPRING, FALL], ids=["spring-forward", "fall-back"])
def test_a_daily_run_in_the_changed_hour_happens_once_on_a_daylight_saving_day(
        day: datetime) -> None:
    """02:30 does not exist on the spring day and happens twice on the fall day: the run
    is neither skipped nor doubled, and the days around it run at 02:30 as usual."""
    schedule = ScheduleSpec(cron="30 2 * * *", timezone="Europe/Paris", batch_id="{date}")
    for d in (day - timedelta(days=1), day, day + timedelta(days=1)):
        ticks = day_of_ticks(schedule, d)
        assert len(ticks) == 1, (d, ticks)
        ids = [render_batch_id(schedule.batch_id, t, PARIS) for t in ticks]
        assert ids == [f"{d:%Y-%m-%d}"]
    spring_tick = day_of_ticks(schedule, SPRING)[0].astimezone(PARIS)
    assert (spring_tick.hour, spring_tick.minute) == (3, 0)  # right after the gap, as cron does


def test_a_morning_run_stays_at_six_local_across_both_changes() -> None:
    schedule = ScheduleSpec(cron="0 6 * * *", timezone="Europe/Paris", batch_id="{date}")
    for day in (SPRING, FALL):
        before, on, after = (day_of_ticks(schedule, day + timedelta(days=k))[0]
                             for k in (-1, 0, 1))
        assert {t.astimezone(PARIS).hour for t in (before, on, after)} == {6}
        # Twenty-three or twenty-five real hours apart across the change, never a skipped day.
        assert {(on - before).total_seconds() / 3600, (after - on).total_seconds() / 3600} <= {
            23.0, 24.0, 25.0}


@pytest.mark.parametrize(("day", "hours"), [(SPRING, 23), (FALL, 25)],
                         ids=["spring-forward", "fall-back"])
def test_an_hourly_schedule_runs_once_per_real_hour_with_distinct_batch_ids(
        day: datetime, hours: int) -> None:
    """An hour that does not exist has no run; the hour that happens twice runs twice,
    the second time with its own id (`_2`)."""
    schedule = ScheduleSpec(cron="0 * * * *", timezone="Europe/Paris")
    ticks = day_of_ticks(schedule, day)
    assert len(ticks) == hours
    assert all((b - a) == timedelta(hours=1) for a, b in itertools.pairwise(ticks))
    ids = [render_batch_id(schedule.batch_id, t, PARIS) for t in ticks]
    assert len(set(ids)) == hours
    if day is FALL:
        assert ids[2:4] == ["2024-10-27T02:00", "2024-10-27T02:00_2"]
    else:
        assert "2024-03-31T02:00" not in ids


def test_walking_back_from_now_finds_the_same_ticks_across_a_change() -> None:
    schedule = ScheduleSpec(cron="*/30 * * * *", timezone="Europe/Paris")
    start = paris(2024, 10, 26, 23, 0)
    forward = list(schedule.ticks_after(start, limit=12))
    back = schedule.ticks_until(forward[-1], start, limit=100)
    assert back == forward


def test_clock_times_resolve_on_the_local_date_and_past_a_gap() -> None:
    ref = paris(2024, 3, 31, 1, 0)
    assert clock_at_or_after(time(7, 30), ref, PARIS) == paris(2024, 3, 31, 7, 30)
    assert clock_at_or_after(time(0, 30), ref, PARIS) == paris(2024, 4, 1, 0, 30)
    skipped = clock_at_or_after(time(2, 30), ref, PARIS)
    assert skipped.astimezone(PARIS).hour == 3
    repeated = clock_at_or_after(time(2, 30), paris(2024, 10, 27, 0, 0), PARIS)
    assert repeated == datetime(2024, 10, 27, 0, 30, tzinfo=UTC)  # the first 02:30 (CEST)


# -- catch-up after an outage -----------------------------------------------------------------

HOURLY = dict(cron="0 * * * *", timezone="Europe/Paris", batch_id="{datetime}")
LAST = paris(2024, 3, 1, 6, 0)
# The sweeper was down from just after 06:00 until 09:05: 07:00, 08:00 and 09:00 were missed.
BACK = paris(2024, 3, 1, 9, 5)


@pytest.mark.parametrize(("policy", "runs", "skipped"), [
    ("latest", [9], [7, 8]),
    ("all", [7, 8, 9], []),
    ("none", [9], [7, 8]),
])
def test_catchup_after_a_three_hour_outage(policy: str, runs: list[int],
                                           skipped: list[int]) -> None:
    schedule = ScheduleSpec(**HOURLY, catchup=policy)  # type: ignore[arg-type]
    run, skip = due_ticks(schedule, LAST, BACK)
    assert [t.astimezone(PARIS).hour for t in run] == runs
    assert [t.astimezone(PARIS).hour for t in skip] == skipped


def test_catchup_none_skips_even_the_latest_tick_once_it_is_late() -> None:
    schedule = ScheduleSpec(**HOURLY, catchup="none")  # type: ignore[arg-type]
    late = paris(2024, 3, 1, 9, 0) + timedelta(seconds=ON_TIME_S + 1)
    run, skip = due_ticks(schedule, LAST, late)
    assert run == [] and len(skip) == 3


def test_catchup_all_is_bounded_to_the_most_recent_ticks() -> None:
    schedule = ScheduleSpec(cron="* * * * *", catchup="all", catchup_limit=5)
    now = datetime(2024, 3, 1, 12, 0, 30, tzinfo=UTC)
    run, skip = due_ticks(schedule, now - timedelta(days=30), now)
    assert run == [now.replace(second=0) - timedelta(minutes=k) for k in range(4, -1, -1)]
    assert skip == []


def test_no_tick_is_due_twice() -> None:
    schedule = ScheduleSpec(**HOURLY)  # type: ignore[arg-type]
    run, _ = due_ticks(schedule, LAST, BACK)
    assert due_ticks(schedule, run[-1], BACK) == ([], [])


# -- batch ids ---------------------------------------------------------------------------------


def test_batch_ids_come_from_the_ticks_local_time() -> None:
    tick = paris(2024, 3, 1, 0, 30)  # still 29 February in UTC
    assert render_batch_id("{date}", tick, PARIS) == "2024-03-01"
    assert render_batch_id("{month}", tick, PARIS) == "2024-03"
    assert render_batch_id("{datetime}", tick, PARIS) == "2024-03-01T00:30"
    assert render_batch_id("sales-%Y%m%d", tick, PARIS) == "sales-20240301"
    assert render_batch_id("{date}", tick, ZoneInfo("UTC")) == "2024-02-29"


@pytest.mark.parametrize(("schedule", "problem"), [
    ({"cron": "0 * * * *", "batch_id": "{date}"}, "gives two ticks the same id"),
    ({"cron": "61 * * * *"}, "invalid cron expression"),
    ({"cron": "0 6 * * *", "timezone": "Mars/Olympus"}, "unknown time zone"),
    ({"cron": "0 6 * * *", "batch_id": "{day}"}, "unknown placeholder {day}"),
    ({"cron": "0 6 * * *", "batch_id": "run {date}"}, "not a valid batch id"),
    ({"cron": "0 6 * * *", "catchup": "sometimes"}, "catchup"),
])
def test_a_bad_schedule_is_a_clear_error(schedule: dict[str, str], problem: str) -> None:
    with pytest.raises(PipelineValidationError) as exc:
        build(schedule=schedule)
    assert problem in "; ".join(exc.value.problems)


def test_cron_nicknames_are_accepted() -> None:
    schedule = ScheduleSpec(cron="@daily", batch_id="{date}")
    assert [t.hour for t in schedule.ticks_after(datetime(2024, 1, 1, tzinfo=UTC), limit=2)] == [
        0, 0]


# -- deadlines and files ------------------------------------------------------------------------


def test_durations_and_clock_times_parse_and_unquoted_times_are_refused() -> None:
    assert parse_duration("1h30m") == 5400 and parse_duration(90) == 90
    with pytest.raises(ValueError, match="duration"):
        parse_duration("soon")
    # YAML 1.1 reads an unquoted 17:30 as the base-60 number 1050: refused, not misread.
    data = yaml.safe_load("deadline: {at: 17:30}\n")
    assert data == {"deadline": {"at": 1050}}
    with pytest.raises(PipelineValidationError, match="in quotes"):
        build(**data)
    with pytest.raises(PipelineValidationError, match="in quotes"):
        build_pipeline(yaml.safe_load(
            "name: p\ntasks:\n- name: a\n  handler: noop\n  gcs_trigger: {bucket: landing, "
            "pattern: 'x/{batch_id}', expected_by: 6:30}\n"), known_handlers={"noop"})


def test_a_deadline_is_the_earlier_of_its_forms_and_a_warning_comes_on_its_own() -> None:
    spec = DeadlineSpec.model_validate({"after_start": "2h", "at": "07:30", "warn_after": "45m"})
    started = paris(2024, 3, 1, 6, 0)
    deadline, warn = spec.times(started, started, PARIS)
    assert deadline == paris(2024, 3, 1, 7, 30) and warn == paris(2024, 3, 1, 6, 45)
    late_start = paris(2024, 3, 1, 7, 0)
    assert spec.times(late_start, started, PARIS)[0] == paris(2024, 3, 1, 7, 30)
    assert spec.times(paris(2024, 3, 1, 8, 0), paris(2024, 3, 1, 8, 0), PARIS)[0] == paris(
        2024, 3, 1, 10, 0)


def test_file_expectations_are_a_clock_time_or_a_duration() -> None:
    start = paris(2024, 3, 1, 6, 0)
    assert TimeRule.model_validate("06:30").resolve(start, start, PARIS) == paris(2024, 3, 1, 6, 30)
    assert TimeRule.model_validate("2h").resolve(start, start, PARIS) == paris(2024, 3, 1, 8, 0)
    assert TimeRule.model_validate("06:30").model_dump() == "06:30"


def test_a_pipeline_without_time_rules_keeps_its_definition_hash() -> None:
    """Adding the optional parts to the model leaves every existing pipeline's stored
    definition, and so its version, as it was."""
    spec = build_pipeline({"name": "p", "tasks": [{"name": "a", "handler": "noop", "gcs_trigger": {
        "bucket": "landing", "pattern": "x/{batch_id}/_S"}}]}, known_handlers={"noop"})
    assert spec.definition_hash() == (
        "04775ea7ee1fc690eb3246734e5d8acbb551fac10f40453a537547f848a7c715")
    assert "schedule" not in spec.canonical()
    assert "expected_by" not in spec.canonical()["tasks"][0]["gcs_trigger"]


def test_the_readme_example_is_a_valid_pipeline() -> None:
    """The "Schedules and alerts" section's file, as a user would copy it."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Schedules and alerts", 1)[1]
    text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = build_pipeline(yaml.safe_load(text))
    assert spec.schedule is not None and spec.schedule.timezone == "Europe/Paris"
    assert spec.deadline is not None and spec.alerts is not None
    trigger = spec.task("load_sales").gcs_trigger
    assert trigger is not None and trigger.expected_by is not None
