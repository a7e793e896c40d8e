"""Operations on a runtime that several commands (and the demo) share: dropping a
file into a local bucket, watching the bucket folders, and date-range batch ids."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.cli.wiring import UsageProblem
from orchestrator.db.models import Pipeline, Task
from orchestrator.identifiers import batch_id_problem
from orchestrator.storage_events import StorageObject
from orchestrator.triggers import UNWATCHED


@dataclass(frozen=True)
class Dropped:
    uri: str
    outcome: str  # the router's: queued, duplicate, invalid, or stored (nothing watches it)
    batches: list[tuple[str, str]]  # (pipeline, batch_id) whose trigger matched

    def summary(self) -> str:
        if self.outcome == "stored":
            return f"{self.uri}: {UNWATCHED}"
        where = ", ".join(f"{p}/{b}" for p, b in self.batches)
        return f"{self.uri} → {where}: {self.outcome}" if where else f"{self.uri}: {self.outcome}"


def sync(rt: Any, path: Path, *, replace: bool = False) -> list[Any]:
    """Validate and store pipeline files, with SQL files inlined into the task configs
    (so a worker never needs the pipeline folder). `replace`: a file may take over a
    pipeline last synced from another file."""
    import typer

    from orchestrator import usercode
    from orchestrator.pipeline.checks import prepare_spec
    from orchestrator.pipeline.load import load_pipelines

    specs = load_pipelines(path)
    # This command may run the tasks itself (`run`, `dev`): their modules import from here.
    usercode.add_path(path if path.is_dir() else path.parent)
    for warning in usercode.outside_pipelines_dir(specs, rt.settings.pipelines_dir):
        typer.echo(f"warning: {warning}", err=True)
    return list(rt.sync_specs([prepare_spec(spec) for spec in specs], replace=replace))


def force_release(rt: Any, pipeline: str, batch_id: str) -> list[str]:
    """Queue the batch's roots that wait for a file, as if their file had arrived; the
    trigger names the object the pattern would match (wildcards kept, which a GCS
    load accepts). Returns the released tasks."""
    from orchestrator import engine
    from orchestrator.db.models import TaskLog
    from orchestrator.db.session import transaction

    def release(s: Any) -> tuple[list[str], list[Any]]:
        batch = engine.find_batch(s, pipeline, batch_id)
        waiting = s.execute(
            select(Task.name, Task.gcs_bucket, Task.gcs_pattern)
            .join(TaskLog, TaskLog.task_id == Task.id)
            .where(TaskLog.batch_pk == batch.id, TaskLog.waiting_for_file.is_(True))
        ).all()
        names, queued = [], []
        for task, bucket, pattern in waiting:
            name = str(pattern or "").replace("{batch_id}", batch_id)
            trigger = {"bucket": bucket, "name": name, "uri": f"gs://{bucket}/{name}",
                       "forced": True}
            row = engine.resolve_task(s, pipeline, batch_id, task)
            outcome = engine.release_waiting_root(s, row, trigger, rt.clock.now())
            if outcome.applied:
                names.append(task)
                queued.extend(outcome.queued)
        return names, queued

    names, queued = transaction(rt.sessions, release)
    rt.router.publish(queued)
    return names


def buckets_root(rt: Any) -> Path:
    return Path(rt.settings.home) / "buckets"


def local_object(rt: Any, bucket: str, name: str) -> StorageObject:
    """The finalize event GCS would send for a local file."""
    path = buckets_root(rt) / bucket / name
    st = path.stat()
    return StorageObject(bucket=bucket, name=name, generation=str(st.st_mtime_ns),
                         size=st.st_size)


def matching_batches(rt: Any, bucket: str, name: str) -> list[tuple[str, str]]:
    """(pipeline, batch_id) of every batch this object's triggers concern: those of the
    current versions, and those of older versions that still have open batches."""
    from orchestrator.triggers import matching_triggers

    with rt.sessions() as s:
        matches = matching_triggers(s, local_object(rt, bucket, name))
    return list(dict.fromkeys((pipeline, batch_id) for pipeline, _, batch_id in matches))


def fire(rt: Any, bucket: str, name: str) -> Dropped:
    obj = local_object(rt, bucket, name)
    # Before the event: a batch that this very file completes no longer has it waiting.
    batches = matching_batches(rt, bucket, name)
    result = rt.router.object_finalized(obj)
    return Dropped(obj.uri, result.outcome, batches)


def refuse_bad_batch_ids(rt: Any, obj: StorageObject) -> None:
    """Before a file is stored: a trigger that would read an invalid batch id from its
    path refuses it, so that bad input leaves nothing behind."""
    from orchestrator.triggers import matching_triggers

    with rt.sessions() as s:
        matches = matching_triggers(s, obj)
    for pipeline, task, batch_id in matches:
        if (problem := batch_id_problem(batch_id)) is not None:
            raise UsageProblem(f"{obj.uri} not stored: the file trigger of {pipeline}.{task} "
                               f"reads its batch id from the path, and {problem}")


def drop(rt: Any, source: Path, uri: str) -> Dropped:
    """Copy `source` to gs://bucket/name in the local buckets, then fire the finalize event."""
    from orchestrator.adapters.local.object_store import LocalObjectStore, split_uri

    if not source.is_file():
        raise FileNotFoundError(2, "no such file", str(source))
    if uri.endswith("/"):
        uri += source.name
    bucket, name = split_uri(uri)
    if not name:
        raise UsageProblem(f"{uri!r} names a bucket, not an object: add the object path")
    refuse_bad_batch_ids(rt, StorageObject(bucket=bucket, name=name))
    target = LocalObjectStore(buckets_root(rt)).path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy then rename, as GCS finalizes an object only once it is whole.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return fire(rt, bucket, name)


class BucketWatcher:
    """Polls `<root>/<bucket>/…` for new or changed files (by mtime and size).

    Files present when the watcher starts are remembered, not fired; temporary
    files of an in-progress copy are skipped until they are renamed into place.
    """

    def __init__(self, root: Path):
        self.root = root
        self._seen: dict[Path, tuple[int, int]] = dict(self._scan())

    def _scan(self) -> list[tuple[Path, tuple[int, int]]]:
        out: list[tuple[Path, tuple[int, int]]] = []
        if not self.root.is_dir():
            return out
        for dirpath, _dirs, files in os.walk(self.root):
            for f in files:
                if f.startswith(".tmp-") or f.startswith("."):
                    continue
                p = Path(dirpath) / f
                try:
                    st = p.stat()
                except FileNotFoundError:
                    continue
                out.append((p, (st.st_mtime_ns, st.st_size)))
        return out

    def poll(self) -> list[tuple[str, str]]:
        """(bucket, object name) of every file new or changed since the last poll."""
        changed = []
        for path, sig in self._scan():
            if self._seen.get(path) != sig:
                self._seen[path] = sig
                rel = path.relative_to(self.root).parts
                if len(rel) >= 2:
                    changed.append((rel[0], "/".join(rel[1:])))
        return sorted(changed)


class PipelineWatcher:
    """Notices a change to the pipeline files `orchestrator dev` synced: the YAML files
    (the one given, or every one of the folder) and the SQL files that syncing inlines,
    in that folder and the folder below it (`sql/…`)."""

    def __init__(self, source: Path):
        self.source = source
        self._seen = self._scan()

    def _scan(self) -> dict[Path, tuple[int, int]]:
        folder = self.source if self.source.is_dir() else self.source.parent
        files = ([*folder.glob("*.yaml"), *folder.glob("*.yml")] if self.source.is_dir()
                 else [self.source])
        files += [*folder.glob("*.sql"), *folder.glob("*/*.sql")]
        out = {}
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out[path] = (st.st_mtime_ns, st.st_size)
        return out

    def poll(self) -> list[Path]:
        """The files added, changed or removed since the last poll."""
        now = self._scan()
        changed = sorted(p for p in {*now, *self._seen} if now.get(p) != self._seen.get(p))
        self._seen = now
        return changed


# -- batch ids from a date range ----------------------------------------------------------

_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")
MAX_BATCHES = 10_000


def _parse(value: str, what: str) -> tuple[str, date]:
    try:
        if m := _MONTH.match(value):
            return "month", date(int(m[1]), int(m[2]), 1)
        if m := _DAY.match(value):
            return "day", date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        pass
    raise UsageProblem(f"malformed {what} date {value!r}: use YYYY-MM (months) or YYYY-MM-DD (days)")


def batch_ids_between(start: str, end: str) -> list[str]:
    """`2024-01`..`2024-06` → six month ids; `2024-01-30`..`2024-02-02` → four day ids."""
    kind, first = _parse(start, "--from")
    kind_end, last = _parse(end, "--to")
    if kind != kind_end:
        raise UsageProblem(f"--from {start} and --to {end} must both be months or both be days")
    if last < first:
        raise UsageProblem(f"--to {end} is before --from {start}")
    ids = []
    d = first
    while d <= last:
        if kind == "month":
            ids.append(f"{d.year:04d}-{d.month:02d}")
            d = (d.replace(day=28) + timedelta(days=4)).replace(day=1)
        else:
            ids.append(d.isoformat())
            d += timedelta(days=1)
        if len(ids) > MAX_BATCHES:
            raise UsageProblem(f"the range {start}..{end} has more than {MAX_BATCHES} batches")
    return ids


def parse_params(items: list[str] | None) -> dict[str, str]:
    params: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageProblem(f"malformed --param {item!r}: use key=value")
        params[key.strip()] = value
    return params


def deadline_seconds(rt: Any, pipeline: str, text: str) -> float:
    """`--deadline`: a duration (`2h`), or a clock time (`07:30`, in the pipeline's time
    zone, the first one from now), as seconds from now."""
    from pydantic import ValidationError

    from orchestrator.errors import NotFound
    from orchestrator.pipeline.timing import TimeRule, clock_at_or_after
    from orchestrator.pipeline.versions import rules

    try:
        rule = TimeRule.model_validate(text)
    except ValidationError:
        raise UsageProblem(f"--deadline {text!r}: give a duration such as 2h or 90m, or a "
                           "clock time such as 07:30") from None
    if rule.after_s is not None:
        return rule.after_s
    assert rule.at is not None
    with rt.sessions() as s:
        found = s.execute(select(Pipeline.id, Pipeline.version)
                          .where(Pipeline.name == pipeline)).first()
        if found is None:
            raise NotFound(f"unknown pipeline {pipeline!r} (run `orchestrator pipelines sync` "
                           "first)")
        tz = rules(s, found[0], found[1]).tz
    now = rt.clock.now()
    return max(1.0, (clock_at_or_after(rule.at, now, tz) - now).total_seconds())
