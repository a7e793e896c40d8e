"""The UI's addresses, relative to its root so that they work behind any proxy."""

from __future__ import annotations

from urllib.parse import quote, urlencode


def _q(part: str) -> str:
    return quote(part, safe="")


def home(**args: object) -> str:
    query = urlencode({k: v for k, v in args.items() if v not in (None, "")})
    return "/" + (f"?{query}" if query else "")


def pipeline_url(pipeline: str, version: int | None = None) -> str:
    base = f"/pipelines/{_q(pipeline)}"
    return base + (f"?version={version}" if version is not None else "")


def batch_url(pipeline: str, batch_id: str, **args: object) -> str:
    query = urlencode({k: v for k, v in args.items() if v not in (None, "")})
    return f"/pipelines/{_q(pipeline)}/batches/{_q(batch_id)}" + (f"?{query}" if query else "")


def task_url(pipeline: str, batch_id: str, task: str, instance: int | None = None) -> str:
    """A task's page; with `instance`, its attempts are those of one mapped instance."""
    return (f"{batch_url(pipeline, batch_id)}/tasks/{_q(task)}"
            + (f"?instance={instance}" if instance is not None else ""))


def task_live_urls(pipeline: str, batch_id: str, task: str,
                   instance: int | None = None) -> tuple[str, str]:
    """(stream, fragment) of a task's page."""
    base = f"{batch_url(pipeline, batch_id)}/tasks/{_q(task)}"
    query = f"?instance={instance}" if instance is not None else ""
    return f"{base}/stream{query}", f"{base}/fragment{query}"


def events_url(pipeline: str, batch_id: str, after: int | None = None) -> str:
    return f"{batch_url(pipeline, batch_id)}/events" + (f"?after={after}" if after else "")


def start_url(pipeline: str) -> str:
    return f"{pipeline_url(pipeline)}/start"


def action_url(pipeline: str, batch_id: str, action: str) -> str:
    return f"{batch_url(pipeline, batch_id)}/{action}"
