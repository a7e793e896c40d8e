"""Support for the reliability tests: a handler whose side effects are counted in
the database, its deterministic failure plan, random DAGs, and the model of what
the engine must make of them."""

from __future__ import annotations

import hashlib
import random
import threading
from collections import Counter
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from orchestrator import handlers
from orchestrator.errors import PermanentError
from orchestrator.handlers.context import TaskContext
from orchestrator.pipeline.load import build_pipeline
from orchestrator.pipeline.spec import PipelineSpec

HANDLER = "effect"
EFFECTS_DDL = (
    # Every execution of a handler's side effect, as it happened.
    "CREATE TABLE IF NOT EXISTS test_effects (id BIGSERIAL PRIMARY KEY, batch_id TEXT NOT NULL,"
    " task TEXT NOT NULL, attempt INT NOT NULL)",
    # The effect as the outside world keeps it: an idempotency key of (batch, task),
    # as a BigQuery job id derived from the batch and task would be.
    "CREATE TABLE IF NOT EXISTS test_applied (batch_id TEXT NOT NULL, task TEXT NOT NULL,"
    " attempt INT NOT NULL, PRIMARY KEY (batch_id, task))",
)


class FlakyFailure(RuntimeError):
    """A transient failure of the fake service (goes through the retry policy)."""


def _unit(*parts: object) -> float:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def outcome_of(config: dict[str, Any], batch_id: str, task: str, attempt: int) -> str:
    """What the handler does on this attempt: 'permanent', 'flaky' or 'ok'."""
    if task in config.get("permanent", ()) or _unit("perm", batch_id, task) < config.get(
            "permanent_p", 0.0):
        return "permanent"
    if attempt in config.get("flaky_attempts", ()) or _unit(
            "flaky", batch_id, task, attempt) < config.get("flaky_p", 0.0):
        return "flaky"
    return "ok"


class EffectHandler:
    """Fails per the plan, else writes its effect on its own connection and returns."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.calls: Counter[tuple[str, str, int]] = Counter()
        self._lock = threading.Lock()

    def __call__(self, ctx: TaskContext) -> dict[str, Any]:
        with self._lock:
            self.calls[(ctx.batch_id, ctx.task, ctx.attempt)] += 1
        kind = outcome_of(ctx.config, ctx.batch_id, ctx.task, ctx.attempt)
        if kind == "permanent":
            raise PermanentError(f"{ctx.task}: the service rejected the request")
        if kind == "flaky":
            raise FlakyFailure(f"{ctx.task}: the service timed out")
        with self.engine.begin() as conn:
            params = {"b": ctx.batch_id, "t": ctx.task, "a": ctx.attempt}
            conn.execute(text("INSERT INTO test_effects (batch_id, task, attempt) "
                              "VALUES (:b, :t, :a)"), params)
            conn.execute(text("INSERT INTO test_applied (batch_id, task, attempt) "
                              "VALUES (:b, :t, :a) ON CONFLICT DO NOTHING"), params)
        return {"task": ctx.task, "attempt": ctx.attempt}


def install(engine: Engine) -> EffectHandler:
    """Create (and empty) the effect tables and register a fresh handler."""
    with engine.begin() as conn:
        for ddl in EFFECTS_DDL:
            conn.execute(text(ddl))
        conn.execute(text("TRUNCATE test_effects, test_applied"))
    handler = EffectHandler(engine)
    handlers.register(HANDLER, handler)
    return handler


def effects(engine: Engine) -> Counter[tuple[str, str, int]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT batch_id, task, attempt FROM test_effects")).all()
    return Counter((r[0], r[1], r[2]) for r in rows)


def applied(engine: Engine) -> dict[tuple[str, str], int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT batch_id, task, attempt FROM test_applied")).all()
    return {(r[0], r[1]): r[2] for r in rows}


def pipeline(name: str, tasks: list[dict[str, Any]]) -> PipelineSpec:
    return build_pipeline({"name": name, "tasks": tasks}, known_handlers=handlers.names())


def random_dag(rng: random.Random, name: str, *, flaky_p: float = 0.25,
               permanent_p: float = 0.06, max_attempts: int = 3) -> PipelineSpec:
    """3 to 10 tasks, edges only to earlier tasks, a mix of trigger rules."""
    n = rng.randint(3, 10)
    tasks = []
    for i in range(n):
        earlier = [f"t{j}" for j in range(i)]
        parents = sorted(rng.sample(earlier, k=min(len(earlier), rng.choice([0, 1, 1, 2, 3]))))
        if i > 0 and not parents:
            parents = [rng.choice(earlier)] if rng.random() < 0.8 else []
        rule = rng.choices(["all_success", "all_done", "one_failed"], [8, 2, 1])[0]
        tasks.append({
            "name": f"t{i}", "handler": HANDLER, "depends_on": parents,
            "trigger_rule": rule if parents else "all_success",
            "config": {"flaky_p": flaky_p, "permanent_p": permanent_p},
            "retry": {"max_attempts": max_attempts, "initial_delay_s": 0},
            "timeout_s": 600,
        })
    return pipeline(name, tasks)


FAILED_KINDS = {"ERROR", "UPSTREAM_FAILED", "CANCELLED"}


def expected_run(spec: PipelineSpec, batch_id: str) -> tuple[str, dict[str, tuple[str, int]]]:
    """The batch status and each task's (status, final attempt), computed without the
    engine from the failure plan and the trigger rules."""
    out: dict[str, tuple[str, int]] = {}
    for name in spec.topological_order():
        task = spec.task(name)
        kinds = [out[p][0] for p in task.depends_on]
        failed = any(k in FAILED_KINDS for k in kinds)
        skipped = any(k == "SKIPPED" for k in kinds)
        rule = task.trigger_rule.value
        if rule == "all_success" and failed:
            out[name] = ("UPSTREAM_FAILED", 1)
            continue
        if (rule == "all_success" and skipped) or (rule == "one_failed" and not failed):
            out[name] = ("SKIPPED", 1)
            continue
        final = ("ERROR", task.retry.max_attempts)
        for attempt in range(1, task.retry.max_attempts + 1):
            kind = outcome_of(task.config, batch_id, name, attempt)
            if kind == "permanent":
                final = ("ERROR", attempt)
                break
            if kind == "ok":
                final = ("SUCCESS", attempt)
                break
        out[name] = final
    status = "FAILED" if any(s in FAILED_KINDS for s, _ in out.values()) else "SUCCESS"
    return status, out


def task_states(engine: Engine) -> dict[tuple[str, str], tuple[str, int]]:
    """(batch_id, task) -> (status, attempt), over every batch."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT b.batch_id, t.name, l.status, l.attempt FROM task_log l "
            "JOIN batches b ON b.id = l.batch_pk JOIN tasks t ON t.id = l.task_id")).all()
    return {(r[0], r[1]): (str(r[2]), r[3]) for r in rows}


def batch_states(engine: Engine) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT batch_id, status FROM batches")).all()
    return {r[0]: str(r[1]) for r in rows}


def claims(engine: Engine) -> Counter[tuple[str, str, int]]:
    """QUEUED -> RUNNING transitions per (batch_id, task, attempt), from task_events."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT b.batch_id, t.name, e.attempt FROM task_events e "
            "JOIN batches b ON b.id = e.batch_pk JOIN tasks t ON t.id = e.task_id "
            "WHERE e.from_status = 'QUEUED' AND e.to_status = 'RUNNING'")).all()
    return Counter((r[0], r[1], r[2]) for r in rows)


def rule_violations(spec: PipelineSpec, states: dict[str, str]) -> list[str]:
    """Tasks whose final status their parents' final statuses and trigger rule do not
    allow, whatever happened in between (retries, cancels): a task that ran had parents
    that let it run, an UPSTREAM_FAILED one a failed parent, and none is left open."""
    bad = []
    for name in spec.topological_order():
        task = spec.task(name)
        status = states[name]
        parents = [states[p] for p in task.depends_on]
        failed = any(p in FAILED_KINDS for p in parents)
        skipped = any(p == "SKIPPED" for p in parents)
        done = all(p in {"SUCCESS", "SKIPPED"} | FAILED_KINDS for p in parents)
        rule = task.trigger_rule.value
        if status in ("SUCCESS", "ERROR"):  # it ran
            ok = {"all_success": done and not failed and not skipped, "all_done": done,
                  "one_failed": failed}[rule]
        elif status == "UPSTREAM_FAILED":
            ok = rule == "all_success" and failed
        elif status == "SKIPPED":
            ok = done and ((rule == "all_success" and skipped and not failed)
                           or (rule == "one_failed" and not failed))
        else:
            ok = status == "CANCELLED"
        if not ok:
            seen = dict(zip(task.depends_on, parents, strict=True))
            bad.append(f"{name} {status} ({rule}) with parents {seen}")
    return bad


def batch_violation(states: dict[str, str], status: str) -> str | None:
    """What is wrong with a batch's status given its tasks' (None if nothing)."""
    if any(s not in {"SUCCESS", "SKIPPED"} | FAILED_KINDS for s in states.values()):
        return f"batch {status} with open tasks {states}"
    failed = any(s in FAILED_KINDS for s in states.values())
    if failed and status not in ("FAILED", "CANCELLED"):
        return f"batch {status} although a task failed: {states}"
    if not failed and status != "SUCCESS":
        return f"batch {status} although every task succeeded or was skipped: {states}"
    return None


def last_batch_events(engine: Engine) -> dict[str, str]:
    """batch_id -> the status its last batch-level event moved it to."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT DISTINCT ON (e.batch_pk) b.batch_id, e.to_status FROM task_events e "
            "JOIN batches b ON b.id = e.batch_pk WHERE e.task_id IS NULL "
            "ORDER BY e.batch_pk, e.id DESC")).all()
    return {r[0]: str(r[1]) for r in rows}

