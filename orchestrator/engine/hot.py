"""The two hottest transitions on PostgreSQL, in as few statements as they allow.

A plain task's claim and its SUCCESS are what every task pays, so on PostgreSQL
they are data-modifying CTEs instead of a guarded UPDATE followed by the reads and
writes that go with it:

- claim, one statement: the guarded QUEUED -> RUNNING, its event, and the parents'
  outputs that make up the task's input (every parent finished, and committed,
  before the task was queued, so the claim's own snapshot holds them);
- succeed, one statement: the guarded RUNNING -> SUCCESS, its event and the
  attempt's record; then, when it applied and the task has children, a second
  one: the decrement of the children's counters (the same guarded decrement as
  `dag`, so exactly-once promotion rests on the same row locks) with the events
  of the children it decided.

The decrement cannot join the first statement: a statement's snapshot is taken when
it starts, and the parent's UPDATE may wait for a whole-batch operation (a retry
holding the parent's row) whose changes to the children the decrement must see.

Guards, locks and effects are those of `transitions` and `dag`: the own row first,
then the children's, as the lock order says; nothing takes the batch row. The
events of one statement are written by one INSERT in their order; events already
recorded in the transaction are written before it, so the log keeps the order of
the transitions. SQLite takes the portable path (`transitions`).

The SQL is sent as written (no compilation per call); parameters are plain values
and JSON text. Each statement is prepared once per connection (`PREPARE`, the first
time that connection runs it) and then sent as `EXECUTE name (values)`, so the server
neither parses nor plans it again: that is about half of what each of these small
statements costs the server. A connection that lost them (a `DEALLOCATE`, a pooler
that switched server connections) fails with SQLSTATE 26000; the names it knew are
forgotten and the transaction runs again, preparing anew.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from orchestrator.db.session import prepares
from orchestrator.engine import catalog
from orchestrator.engine.events import flush_events
from orchestrator.engine.types import TaskRow
from orchestrator.status import TaskStatus

S = TaskStatus


# The parameters' types, for PREPARE (ids, task and child ids are bigint).
_TYPES = {"now": "timestamptz", "lease": "timestamptz", "started_at": "timestamptz",
          "a": "int", "log_dropped": "int", "output": "text", "log": "text",
          "worker": "text", "record": "boolean"}
_PARAM = re.compile(r"%\((\w+)\)s")
_PREPARED = "orchestrator.prepared"


@functools.lru_cache(maxsize=512)
def _prepared(name: str, sql: str) -> tuple[str, str]:
    """The PREPARE of `sql` (psycopg2's paramstyle) as `name`, and the EXECUTE that runs it."""
    order = list(dict.fromkeys(_PARAM.findall(sql)))
    position = {p: i for i, p in enumerate(order, 1)}
    body = _PARAM.sub(lambda m: f"${position[m.group(1)]}", sql)
    types = ", ".join(_TYPES.get(p, "bigint") for p in order)
    args = ", ".join(f"%({p})s" for p in order)
    return f"PREPARE {name} ({types}) AS {body}", f"EXECUTE {name} ({args})"


def _run(session: Session, name: str, sql: str, params: dict[str, Any]) -> Any:
    """Execute `sql` on the session's connection, as a statement prepared there."""
    conn = session.connection()
    if not prepares(conn.engine):
        return conn.exec_driver_sql(sql, params)
    prepare, execute = _prepared(name, sql)
    known: set[str] = conn.info.setdefault(_PREPARED, set())
    if name not in known:
        # Sent on the driver's cursor: no BEGIN goes in front of it, and a PREPARE
        # outlives the transaction it was sent in, even one that rolls back.
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(prepare)
        finally:
            cursor.close()
        known.add(name)
    try:
        return conn.exec_driver_sql(execute, params)
    except DBAPIError as exc:
        if getattr(exc.orig, "pgcode", None) == "26000":
            known.clear()  # the transaction is retried and prepares again
        raise


def available(session: Session, row: TaskRow) -> bool:
    """The one-statement path applies: PostgreSQL, and a task that is no mapped instance."""
    return row.map_index < 0 and session.get_bind().dialect.name == "postgresql"


def _json(value: Any) -> str:
    return json.dumps(value)


def _ids(name: str, n: int) -> str:
    """`IN (…)` of n parameters: an IN list of constants lets the planner find each row by
    the (batch_pk, task_id) key, where an array can make it filter the batch's open rows."""
    return "(" + ", ".join(f"%({name}{i})s" for i in range(n)) + ")"


@functools.lru_cache(maxsize=256)
def _claim_sql(n_parents: int) -> str:
    parents = "" if not n_parents else f"""
LEFT JOIN task_log p
  ON p.batch_pk = %(b)s AND p.task_id IN {_ids("p", n_parents)} AND p.map_index = -1"""
    cols = "p.task_id, p.output, p.status" if n_parents else "NULL, NULL, NULL"
    return f"""
WITH c AS (
  UPDATE task_log SET status = 'RUNNING', started_at = %(now)s, lease_expires_at = %(lease)s,
    finished_at = NULL, error = NULL, next_attempt_at = NULL, updated_at = %(now)s
  WHERE batch_pk = %(b)s AND task_id = %(t)s AND map_index = -1 AND status = 'QUEUED'
    AND attempt = %(a)s
  RETURNING id, retry_base, input
), e AS (
  INSERT INTO task_events (batch_pk, task_id, attempt, from_status, to_status, at, detail)
  SELECT %(b)s, %(t)s, %(a)s, 'QUEUED', 'RUNNING', %(now)s, 'null'::jsonb FROM c
)
SELECT c.id, c.retry_base, c.input, {cols}
FROM c{parents}
"""


def claim(session: Session, row: TaskRow, attempt: int, now: datetime, lease: datetime,
          known_parents: dict[int, tuple[Any, Any]] | None
          ) -> tuple[tuple[int, int, Any], list[tuple[int, Any, Any]]] | None:
    """QUEUED -> RUNNING of a task with no concurrency limit; None if the guard found
    no row. Returns (id, retry_base, input) and the parents' (task_id, output, status)
    that `known_parents` did not hold."""
    flush_events(session)
    known = known_parents or {}
    unknown = [p for p in catalog.task_def(session, row.task_id).parents if p not in known]
    params = {"now": now, "lease": lease, "b": row.batch_pk, "t": row.task_id, "a": attempt}
    params.update({f"p{i}": p for i, p in enumerate(unknown)})
    rows = _run(session, f"orchestrator_claim_{len(unknown)}", _claim_sql(len(unknown)),
                params).all()
    if not rows:
        return None
    first = rows[0]
    parents = [(r[3], r[4], r[5]) for r in rows if r[3] is not None]
    return (first[0], first[1], first[2]), parents


# The status a PENDING child takes once one more parent succeeded (`dag.ready_status`
# with pending - 1, failed and skipped unchanged).
_READY = """CASE
    WHEN trigger_rule = 'all_success' AND failed_parents > 0 THEN 'UPSTREAM_FAILED'
    WHEN trigger_rule = 'all_success' AND pending_parents - 1 <= 0 AND skipped_parents > 0
      THEN 'SKIPPED'
    WHEN trigger_rule = 'all_success' AND pending_parents - 1 <= 0 THEN 'QUEUED'
    WHEN trigger_rule = 'all_done' AND pending_parents - 1 <= 0 THEN 'QUEUED'
    WHEN trigger_rule = 'one_failed' AND failed_parents > 0 THEN 'QUEUED'
    WHEN trigger_rule = 'one_failed' AND pending_parents - 1 <= 0 THEN 'SKIPPED'
    ELSE 'PENDING' END"""

_SUCCEED = """
WITH s AS (
  UPDATE task_log SET status = 'SUCCESS', output = %(output)s::jsonb, finished_at = %(now)s,
    lease_expires_at = NULL, updated_at = %(now)s
  WHERE batch_pk = %(b)s AND task_id = %(t)s AND map_index = -1 AND status = 'RUNNING'
    AND attempt = %(a)s
  RETURNING id
), att AS (
  INSERT INTO task_attempts (batch_pk, task_id, map_index, attempt, outcome, started_at,
    finished_at, error, traceback, log, log_dropped, worker, updated_at)
  SELECT %(b)s, %(t)s, -1, %(a)s,
    CASE WHEN EXISTS (SELECT 1 FROM s) THEN 'SUCCESS' ELSE 'DISCARDED' END,
    %(started_at)s, %(now)s, NULL, NULL, %(log)s::jsonb, %(log_dropped)s, %(worker)s, %(now)s
  WHERE %(record)s
  ON CONFLICT (batch_pk, task_id, map_index, attempt) DO UPDATE SET
    outcome = excluded.outcome, finished_at = excluded.finished_at, error = excluded.error,
    traceback = excluded.traceback, log = excluded.log, log_dropped = excluded.log_dropped,
    worker = excluded.worker, updated_at = excluded.updated_at
), e AS (
  INSERT INTO task_events (batch_pk, task_id, attempt, from_status, to_status, at, detail)
  SELECT %(b)s, %(t)s, %(a)s, 'RUNNING', 'SUCCESS', %(now)s, 'null'::jsonb FROM s
)
SELECT count(*) FROM s
"""


@functools.lru_cache(maxsize=256)
def _decrement_sql(n_children: int) -> str:
    # A statement of its own, after the one that moved the parent: it must start once
    # the parent's row lock is granted, so that its snapshot sees what a whole-batch
    # operation that held that lock committed (say, a retry that reset a child).
    # Postgres then re-reads each child it locks, when a concurrent decrement of the
    # same child committed first, and computes the new status from that version.
    return f"""
WITH d AS (
  UPDATE task_log SET pending_parents = pending_parents - 1,
    status = {_READY}, updated_at = %(now)s,
    queued_at = CASE WHEN {_READY} = 'QUEUED' THEN %(now)s ELSE queued_at END,
    dispatched_at = CASE WHEN {_READY} = 'QUEUED' THEN %(now)s ELSE dispatched_at END,
    finished_at = CASE WHEN {_READY} IN ('UPSTREAM_FAILED', 'SKIPPED') THEN %(now)s
                       ELSE finished_at END
  WHERE batch_pk = %(b)s AND task_id IN {_ids("c", n_children)}
    AND map_index = -1 AND status = 'PENDING'
  RETURNING task_id, attempt, status
), e AS (
  INSERT INTO task_events (batch_pk, task_id, attempt, from_status, to_status, at, detail)
  SELECT %(b)s, d.task_id, d.attempt, 'PENDING', d.status, %(now)s,
    '{{"reason": "parent succeeded"}}'::jsonb
  FROM d WHERE d.status <> 'PENDING' ORDER BY d.task_id
)
SELECT task_id, attempt, status FROM d
"""


def succeed(session: Session, row: TaskRow, attempt: int, output: dict[str, Any] | None,
            now: datetime, record: dict[str, Any] | None
            ) -> tuple[bool, list[tuple[int, int, TaskStatus]]]:
    """RUNNING -> SUCCESS of a task (no mapped instance) and the decrement of its
    children, with the attempt's `record` (started_at, log, log_dropped, worker), if
    given, written in the same statement. Returns whether the guard found the row, and
    each child's (task_id, attempt, new status), PENDING for one still waiting."""
    flush_events(session)
    children = list(catalog.task_def(session, row.task_id).children)
    rec = record or {}
    got = _run(session, "orchestrator_succeed", _SUCCEED, {
        "now": now, "b": row.batch_pk, "t": row.task_id, "a": attempt,
        "output": _json(output), "record": record is not None,
        "started_at": rec.get("started_at", now), "log": _json(rec.get("log", [])),
        "log_dropped": rec.get("log_dropped", 0), "worker": rec.get("worker"),
    }).scalar_one()
    if not got or not children:
        return bool(got), []
    params: dict[str, Any] = {"now": now, "b": row.batch_pk}
    params.update({f"c{i}": c for i, c in enumerate(children)})
    rows = _run(session, f"orchestrator_decrement_{len(children)}",
                _decrement_sql(len(children)), params).all()
    return True, [(r[0], r[1], TaskStatus(r[2])) for r in rows]
