"""Cloud Function entry points (functions-framework).

Each one decodes its event at the edge, makes one call into the orchestrator and
returns (acknowledge) or raises (ask for redelivery). Only transient
infrastructure failures raise (`InfrastructureError`: the database or Pub/Sub is
unreachable); malformed input is logged and acknowledged, because redelivering
it could never succeed.

`route` is an HTTP function that reads Pub/Sub's push itself (see
`orchestrator.edge`): a 2xx acknowledges, a 5xx asks for redelivery.

Importing this module costs little (functions-framework imports it before the
instance listens): everything else, settings included, is imported by the first
request that needs it, and the runtime is built once, on first use.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import functions_framework

from orchestrator import logs
from orchestrator.errors import InfrastructureError, InvalidInput, NotFound

logs.configure(logs.format_from_environment())


@functions_framework.http
def route(request: Any) -> tuple[str, int]:
    """A Pub/Sub push (tasks topic or dead letters): start a batch or run a task."""
    from orchestrator import bootstrap, edge

    if request.method != "POST":
        return f"method {request.method} not allowed; Pub/Sub pushes with POST", 405
    body = request.get_data(cache=False)
    try:
        delivery = edge.pubsub_push(request.headers, body, request.path)
    except edge.InvalidEvent as exc:
        logs.warning(f"rejected event: {exc}", outcome="invalid",
                     **edge.describe_push(request.headers, request.path, len(body)),
                     **exc.context)
        return "OK", 200
    bootstrap.router().deliver(delivery)
    _relay_events(skip_if_busy=True)
    return "OK", 200


def _relay_events(*, skip_if_busy: bool) -> None:
    # Best effort: the events are in the task log already, and the sweeper's pass
    # publishes whatever this one could not, so a failure here must not redeliver.
    from orchestrator import bootstrap

    try:
        bootstrap.runtime().relay_events(skip_if_busy=skip_if_busy)
    except Exception as exc:
        logs.warning(f"event relay failed; the next pass retries: {exc}")


@functions_framework.cloud_event
def on_object_finalized(cloud_event: Any) -> None:
    """A GCS object landed: release the task whose trigger it matches."""
    from orchestrator import bootstrap, edge
    from orchestrator.names import NameMap

    try:
        obj = edge.storage_object(cloud_event)
    except InvalidInput as exc:
        logs.warning(f"rejected event: {exc}", outcome="invalid", **edge.describe(cloud_event))
        return
    rt = bootstrap.runtime()
    # Pipelines name the bucket logically; the event carries its real name.
    rt.router.object_finalized(NameMap.from_settings(rt.settings).logical_object(obj))
    _relay_events(skip_if_busy=True)


@functions_framework.http
def sweep(request: Any) -> tuple[dict[str, Any], int]:
    """One maintenance pass (Cloud Scheduler, every minute)."""
    from orchestrator import bootstrap

    report = bootstrap.router().sweep()
    _relay_events(skip_if_busy=False)
    return dataclasses.asdict(report), 200


@functions_framework.http
def status(request: Any) -> tuple[Any, ...]:
    """GET ?batch_id=…&pipeline=… -> the batch's status and every task's, as JSON (the
    text the database wrote, served as it is)."""
    from orchestrator import bootstrap, edge, queries
    from orchestrator.db.session import session_scope

    if request.method not in ("GET", "HEAD"):
        return {"error": f"method {request.method} not allowed; use GET"}, 405
    try:
        batch_id, pipeline = edge.status_query(request.args)
        with session_scope(bootstrap.runtime().sessions) as session:
            return (queries.batch_status_json(session, batch_id, pipeline), 200,
                    {"Content-Type": "application/json"})
    except NotFound as exc:
        return {"error": str(exc)}, 404
    except InvalidInput as exc:
        return {"error": str(exc)}, 400
    except InfrastructureError as exc:
        logs.error(f"status unavailable: {exc}")
        return {"error": "metadata database unavailable, try again"}, 503
