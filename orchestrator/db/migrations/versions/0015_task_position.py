"""A task knows its place in its version's topological order, and its parents' names.

Both are fixed when the version is synced (a version never changes), so the status
document reads its tasks in order, each with its `depends_on` list, from the task rows
alone. Existing versions are filled in here: tasks in topological order with ties
broken by task id (the order of the definition), parents' names sorted.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _order(ids: list[int], parents: dict[int, list[int]]) -> list[int]:
    """Kahn's algorithm, the ready task with the lowest id first."""
    known = set(ids)
    indegree = dict.fromkeys(ids, 0)
    children: dict[int, list[int]] = {}
    for c in ids:
        for p in parents.get(c, ()):
            if p in known:
                indegree[c] += 1
                children.setdefault(p, []).append(c)
    ready = [t for t, n in indegree.items() if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        t = heapq.heappop(ready)
        order.append(t)
        for c in children.get(t, ()):
            indegree[c] -= 1
            if indegree[c] == 0:
                heapq.heappush(ready, c)
    seen = set(order)
    return order + sorted(t for t in ids if t not in seen)  # a cycle was never synced


def upgrade() -> None:
    # Added in place, with defaults the fill below replaces: cheaper than rebuilding
    # `tasks` (as batch mode does on SQLite), which copies every row of a table that
    # task_log, task_dependencies and task_events reference.
    op.add_column("tasks", sa.Column("position", sa.Integer(), server_default="0",
                                     nullable=False))
    op.add_column("tasks", sa.Column("depends_on_json", sa.Text(), server_default="[]",
                                     nullable=False))
    conn = op.get_bind()
    tasks = sa.table("tasks", sa.column("id", sa.Integer), sa.column("position", sa.Integer),
                     sa.column("depends_on_json", sa.Text))
    versions: dict[tuple[int, int], list[int]] = {}
    names: dict[int, str] = {}
    for tid, pipeline_id, version, name in conn.execute(sa.text(
            "SELECT id, pipeline_id, version, name FROM tasks ORDER BY id")):
        versions.setdefault((pipeline_id, version), []).append(tid)
        names[tid] = name
    parents: dict[int, list[int]] = {}
    for child, parent in conn.execute(sa.text(
            "SELECT child_task_id, parent_task_id FROM task_dependencies")):
        parents.setdefault(child, []).append(parent)
    rows = []
    for ids in versions.values():
        for position, tid in enumerate(_order(ids, parents)):
            rows.append({"tid": tid, "position": position, "depends_on_json": json.dumps(
                sorted(names[p] for p in parents.get(tid, ()) if p in names),
                ensure_ascii=False)})
    if rows:
        conn.execute(tasks.update().where(tasks.c.id == sa.bindparam("tid")), rows)


def downgrade() -> None:
    # In place as well (SQLite drops a column itself since 3.35).
    op.drop_column("tasks", "depends_on_json")
    op.drop_column("tasks", "position")
