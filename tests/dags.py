"""Helpers to build pipelines for tests without YAML files."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from orchestrator.db.session import transaction
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.spec import PipelineSpec
from orchestrator.pipeline.sync import sync_pipeline


def spec_from_edges(
    name: str, parents: dict[str, list[str]], **task_fields: dict[str, Any]
) -> PipelineSpec:
    """`parents` maps each task to its parents; extra per-task fields by task name."""
    tasks = [
        {"name": t, "handler": "noop", "depends_on": ps, **task_fields.get(t, {})}
        for t, ps in parents.items()
    ]
    return build_pipeline({"name": name, "tasks": tasks}, known_handlers={"noop", "python"})


def sync(sessions: sessionmaker[Session], spec: PipelineSpec, now: datetime) -> None:
    transaction(sessions, lambda s: sync_pipeline(s, spec, now))


def fan_in(n: int) -> dict[str, list[str]]:
    parents: dict[str, list[str]] = {f"p{i}": [] for i in range(n)}
    parents["child"] = [f"p{i}" for i in range(n)]
    return parents
