"""The list a mapped task runs over, resolved when its row is claimed.

`map_over` names the objects under a GCS prefix or a list in a parent's output;
`resolve_items` turns that into the items, and the engine's expansion
(`orchestrator.engine.expansion`) queues one instance per item.
"""

from __future__ import annotations

from typing import Any

from orchestrator.engine.types import TaskRow
from orchestrator.errors import PermanentError
from orchestrator.handlers import _sql
from orchestrator.ports import ObjectStore


def resolve_items(row: TaskRow, task_input: dict[str, Any],
                  object_store: ObjectStore | None) -> list[Any]:
    """The list to map over; PermanentError when it is not a list or is too long."""
    spec = row.map_over or {}
    limit = int(spec.get("max_instances") or 1000)
    if spec.get("gcs_prefix"):
        values = {**row.params, "batch_id": row.batch_id, "pipeline": row.pipeline}
        prefix = _sql.render(str(spec["gcs_prefix"]), values)
        if object_store is None:
            raise PermanentError("map_over.gcs_prefix: no object store configured")
        items: Any = [uri for uri in object_store.list(prefix) if not uri.endswith("/")]
    elif spec.get("parent_output"):
        parent, *path = str(spec["parent_output"]).split(".")
        items = (task_input.get("parents") or {}).get(parent)
        for key in path:
            items = items.get(key) if isinstance(items, dict) else None
        if not isinstance(items, list):
            raise PermanentError(f"map_over.parent_output {spec['parent_output']!r} is "
                                 f"{type(items).__name__}, not a list")
    else:
        raise PermanentError("map_over needs gcs_prefix or parent_output")
    if len(items) > limit:
        raise PermanentError(f"map_over: {len(items)} items exceed max_instances={limit}")
    return list(items)
