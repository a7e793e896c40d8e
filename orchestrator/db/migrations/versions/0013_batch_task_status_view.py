"""The `batch_task_status` view: the task log in plain SQL, one row per task (and per
mapped instance) of every batch, with names instead of keys.

A documented, stable interface (README, "Querying the task log in SQL"): columns may be
added, never renamed or removed. Duration and the error's first line are computed in
each dialect's own SQL. The text is frozen here, as a migration's must be.

On SQLite a later migration may still rebuild a table the view reads (batch mode:
copy, drop, rename into place): env.py runs migrations with SQLite's legacy rename
rule, without which SQLite refuses the rename while the view names the missing table.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = """
SELECT p.name AS pipeline,
       b.pipeline_version AS version,
       b.batch_id AS batch_id,
       b.status AS batch_status,
       t.name AS task,
       CASE WHEN l.map_index >= 0 THEN l.map_index END AS map_index,
       l.status AS status,
       l.attempt AS attempt,
       l.retry_base + t.max_attempts AS max_attempts,
       l.queued_at AS queued_at,
       l.started_at AS started_at,
       l.finished_at AS finished_at,
       {duration} AS duration_s,
       {error_line} AS error_line
FROM task_log AS l
JOIN batches AS b ON b.id = l.batch_pk
JOIN pipelines AS p ON p.id = b.pipeline_id
JOIN tasks AS t ON t.id = l.task_id
"""

POSTGRESQL = _COLUMNS.format(
    duration="ROUND(CAST(EXTRACT(EPOCH FROM l.finished_at - l.started_at) AS NUMERIC), 3)",
    error_line="split_part(l.error, E'\\n', 1)",
)
# SQLite keeps naive UTC text; julianday() reads it (to about a millisecond).
SQLITE = _COLUMNS.format(
    duration="ROUND((julianday(l.finished_at) - julianday(l.started_at)) * 86400.0, 3)",
    error_line="CASE WHEN instr(l.error, char(10)) > 0 "
               "THEN substr(l.error, 1, instr(l.error, char(10)) - 1) ELSE l.error END",
)


def upgrade() -> None:
    body = POSTGRESQL if op.get_bind().dialect.name == "postgresql" else SQLITE
    op.execute(f"CREATE VIEW batch_task_status AS {body}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS batch_task_status")
