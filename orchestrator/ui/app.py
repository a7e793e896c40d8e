"""The web app: Starlette routes over the task log, pages rendered by Jinja2.

Pages are server-rendered HTML (the DAG and the timeline as inline SVG), so they
show the same thing with or without script. A little script of our own adds live
updates (server-sent events say "the batch moved", then the changed region is
fetched again) and confirmation dialogs for the actions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import jinja2
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from orchestrator import logs
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.identifiers import NAME_RE
from orchestrator.ui import layout, pages, reads, urls
from orchestrator.ui.actions import Actions, Done, check_batch_id, parse_params
from orchestrator.ui.security import COOKIE, FIELD, Guard, Refused, Tokens, check_same_origin

MAX_FORM_BYTES = 64 * 1024


@dataclass
class UiConfig:
    sessions: sessionmaker[Session]
    actions: Actions | None  # None: read-only
    db_label: str = ""
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    secret: str | None = None
    allowed_hosts: list[str] | None = None  # None: any Host header
    stream_interval_s: float = 1.0
    stream_max_s: float = 600.0  # the browser reconnects by itself after this

    @property
    def read_only(self) -> bool:
        return self.actions is None


# -- rendering ----------------------------------------------------------------------------


def _hms(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%H:%M:%S")


def _when(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _iso(value: datetime | str | None) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else value.isoformat()


def _text(value: Any) -> str:
    """A value as people read it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, default=str,
                                                           ensure_ascii=False)


def _static_versions() -> dict[str, str]:
    root = resources.files("orchestrator.ui") / "static"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()[:12]
            for f in root.iterdir() if f.is_file()}


def make_environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator.ui", "templates"),
        autoescape=True,  # every template is HTML or SVG: escape everything by default
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    versions = _static_versions()
    env.globals.update(
        urls=urls, seconds=layout.seconds, clip=layout.clip, first_line=pages.first_line,
        static=lambda name: f"/static/{name}?v={versions.get(name, '0')}",
        TASK_STATUSES=reads.TASK_STATUSES, BATCH_STATUSES=reads.BATCH_STATUSES,
    )
    env.filters.update(hms=_hms, when=_when, iso=_iso, text=_text)
    return env


class Renderer:
    def __init__(self, config: UiConfig):
        self.config = config
        self.env = make_environment()
        self.tokens = Tokens(config.secret)

    def html(self, request: Request, template: str, context: dict[str, Any],
             status: int = 200) -> HTMLResponse:
        nonce, new = self.tokens.nonce(request)
        body = self.env.get_template(template).render(
            read_only=self.config.read_only, db_label=self.config.db_label,
            csrf_field=FIELD, csrf=self.tokens.token(nonce), **context)
        response = HTMLResponse(body, status_code=status, headers={"cache-control": "no-store"})
        if new:
            # Not Secure: behind `gcloud run services proxy` the browser is on plain
            # http://localhost. The nonce is no credential; a token needs the server's key.
            response.set_cookie(COOKIE, nonce, httponly=True, samesite="strict", path="/")
        return response

    def error(self, request: Request, status: int, message: str) -> Response:
        if _wants_json(request):
            return JSONResponse({"ok": False, "error": message}, status_code=status)
        return self.html(request, "error.html", {"status": status, "message": message}, status)


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


# -- requests -----------------------------------------------------------------------------


def _name(value: str, what: str) -> str:
    if not NAME_RE.match(value):
        raise NotFound(f"no {what} {value[:140]!r}")
    return value


def _int(value: str | None, default: int, what: str) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"{what} must be a whole number, not {value[:40]!r}") from None


def _date(value: str | None, what: str) -> date | None:
    if not value:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{what} must be a date (YYYY-MM-DD), not {value[:40]!r}") from None


def batch_filter(args: Any) -> reads.BatchFilter:
    pipeline = args.get("pipeline") or None
    if pipeline is not None and not NAME_RE.match(pipeline):
        raise InvalidInput(f"no pipeline {pipeline[:140]!r}")
    status = args.get("status") or None
    if status is not None and status not in reads.BATCH_STATUSES:
        raise InvalidInput(f"unknown batch status {status[:40]!r}: use one of "
                           f"{', '.join(reads.BATCH_STATUSES)}")
    before = args.get("before")
    return reads.BatchFilter(pipeline, status, _date(args.get("since"), "since"),
                             _date(args.get("until"), "until"),
                             _int(before, 0, "before") if before else None)


async def read_form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise InvalidInput("send the form as application/x-www-form-urlencoded")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_FORM_BYTES:
        raise InvalidInput("the form is too large")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidInput("the form is too large")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=50)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"unreadable form: {exc}") from None
    return {k: v[-1] for k, v in parsed.items()}


# -- the app ------------------------------------------------------------------------------


def create_app(config: UiConfig) -> Starlette:
    r = Renderer(config)
    sessions = config.sessions
    counts = reads.CountsCache()

    def guarded(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def page(request: Request) -> Response:
            try:
                return fn(request)
            except NotFound as exc:
                return r.error(request, 404, str(exc))
            except InvalidInput as exc:
                return r.error(request, 400, str(exc))
            except (DBAPIError, SQLAlchemyError) as exc:
                logs.error(f"ui: database error: {exc}")
                return r.error(request, 503, "the metadata database cannot be read right now: "
                               + str(getattr(exc, "orig", exc)).strip().splitlines()[0][:300])
        page.__name__ = fn.__name__
        return page

    # -- pages ----------------------------------------------------------------------------

    @guarded
    def batches(request: Request) -> Response:
        filt = batch_filter(request.query_params)
        with sessions() as s:
            page = pages.BatchesPage(filt, config.clock(), counts)
            panels = pages.render_panels(s, pages.BATCHES_PANELS, page)
        return r.html(request, "batches.html", {"panels": panels, "filt": filt, "now": page.now})

    def _batch(request: Request) -> tuple[pages.BatchPage, list[tuple[str, dict[str, Any]]]]:
        args = request.query_params
        status = args.get("status") or None
        if status is not None and status not in reads.TASK_STATUSES:
            raise InvalidInput(f"unknown task status {status[:40]!r}")
        pipeline = _name(request.path_params["pipeline"], "pipeline")
        with sessions() as s:
            page = pages.batch_page(s, pipeline, request.path_params["batch_id"],
                                    config.clock(), status, _int(args.get("page"), 1, "page"))
            return page, pages.render_panels(s, pages.BATCH_PANELS, page)

    @guarded
    def batch(request: Request) -> Response:
        page, panels = _batch(request)
        return r.html(request, "batch.html", {"page": page, "panels": panels})

    @guarded
    def batch_fragment(request: Request) -> Response:
        page, panels = _batch(request)
        return r.html(request, "partials/batch_live.html", {"page": page, "panels": panels})

    def _instance(request: Request) -> int | None:
        value = request.query_params.get("instance")
        if value in (None, ""):
            return None
        index = _int(value, 0, "instance")
        if index < 0:
            raise InvalidInput("instance must be 0 or more")
        return index

    def _task(request: Request) -> tuple[pages.TaskPage, list[tuple[str, dict[str, Any]]]]:
        pipeline = _name(request.path_params["pipeline"], "pipeline")
        task = _name(request.path_params["task"], "task")
        instance = _instance(request)
        with sessions() as s:
            page = pages.task_page(s, pipeline, request.path_params["batch_id"], task,
                                   config.clock(), instance)
            return page, pages.render_panels(s, pages.TASK_PANELS, page)

    @guarded
    def task(request: Request) -> Response:
        page, panels = _task(request)
        return r.html(request, "task.html", {"page": page, "panels": panels})

    @guarded
    def task_fragment(request: Request) -> Response:
        page, panels = _task(request)
        return r.html(request, "partials/task_live.html", {"page": page, "panels": panels})

    @guarded
    def events(request: Request) -> Response:
        pipeline = _name(request.path_params["pipeline"], "pipeline")
        batch_id = request.path_params["batch_id"]
        after = _int(request.query_params.get("after"), 0, "after")
        with sessions() as s:
            pk, status, _, _ = reads.batch_key(s, pipeline, batch_id)
            rows, more = reads.events_page(s, pk, after, pages.EVENTS_PAGE)
        return r.html(request, "events.html", {
            "pipeline": pipeline, "batch_id": batch_id, "status": status, "events": rows,
            "more": more, "after": after, "next_after": rows[-1].id if rows else after})

    @guarded
    def pipeline(request: Request) -> Response:
        name = _name(request.path_params["pipeline"], "pipeline")
        version = request.query_params.get("version")
        with sessions() as s:
            page = pages.pipeline_page(s, name, config.clock(),
                                       _int(version, 0, "version") if version else None)
            page.counts = counts
            panels = pages.render_panels(s, pages.PIPELINE_PANELS, page)
        return r.html(request, "pipeline.html", {"page": page, "panels": panels})

    # -- live updates ---------------------------------------------------------------------

    def announce(what: str, version: Callable[[], tuple[str, str]]) -> Response:
        """Server-sent events: `change` with the page's version whenever it moves."""
        async def changes() -> AsyncIterator[str]:
            # One cheap indexed read per interval; a change is announced, not shipped:
            # the page fetches its own fragment, so it renders exactly as a reload would.
            last: tuple[str, str] | None = None
            started = quiet = time.monotonic()
            yield "retry: 2000\n\n"
            while time.monotonic() - started < config.stream_max_s:
                try:
                    now = await run_in_threadpool(version)
                except NotFound:
                    yield "event: gone\ndata: {}\n\n"
                    return
                except SQLAlchemyError as exc:  # end here; the browser reconnects by itself
                    logs.warning(f"ui: stream of {what} stopped: {exc}")
                    return
                if now != last:
                    last = now
                    quiet = time.monotonic()
                    data = json.dumps({"version": now[0], "status": now[1]})
                    yield f"event: change\ndata: {data}\n\n"
                elif time.monotonic() - quiet > 15:
                    quiet = time.monotonic()
                    yield ": still here\n\n"
                await asyncio.sleep(config.stream_interval_s)

        return StreamingResponse(changes(), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def stream(request: Request) -> Response:
        pipeline = request.path_params["pipeline"]
        batch_id = request.path_params["batch_id"]

        def key() -> int:
            with sessions() as s:
                return reads.batch_key(s, _name(pipeline, "pipeline"), batch_id)[0]

        try:
            pk = await run_in_threadpool(key)
        except NotFound as exc:
            return r.error(request, 404, str(exc))

        def version() -> tuple[str, str]:
            with sessions() as s:
                newest, status = reads.batch_version(s, pk)
                return str(newest), status

        return announce(f"{pipeline}/{batch_id}", version)

    async def task_stream(request: Request) -> Response:
        """The batch's changes, and the lines a running attempt of the task saves."""
        pipeline = request.path_params["pipeline"]
        batch_id = request.path_params["batch_id"]
        task = request.path_params["task"]

        def key() -> tuple[int, int, int | None]:
            instance = _instance(request)
            with sessions() as s:
                pk = reads.batch_key(s, _name(pipeline, "pipeline"), batch_id)[0]
                return pk, reads.task_key(s, pk, _name(task, "task")), instance

        try:
            pk, task_id, instance = await run_in_threadpool(key)
        except NotFound as exc:
            return r.error(request, 404, str(exc))
        except InvalidInput as exc:
            return r.error(request, 400, str(exc))

        def version() -> tuple[str, str]:
            with sessions() as s:
                return pages.task_version(s, pk, task_id, instance, config.clock())[:2]

        return announce(f"{pipeline}/{batch_id}/{task}", version)

    # -- actions --------------------------------------------------------------------------

    def action(kind: str) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                if config.actions is None:
                    raise Refused("this UI is read-only (started with --read-only): "
                                  "use the CLI to change batches")
                check_same_origin(request)
                form = await read_form(request)
                r.tokens.check(request, form.get(FIELD))
                pipeline = _name(request.path_params["pipeline"], "pipeline")
                if kind == "start":
                    batch_id = check_batch_id(form.get("batch_id", "").strip())
                    params = parse_params(form.get("params", ""))
                else:
                    batch_id = request.path_params["batch_id"]
                task = (form.get("task") or "").strip() or None
                if form.get("confirmed") != "1":
                    if _wants_json(request):
                        raise InvalidInput("not confirmed")
                    return r.html(request, "confirm.html", {
                        "kind": kind, "pipeline": pipeline, "batch_id": batch_id, "task": task,
                        "form": {k: v for k, v in form.items() if k != FIELD}})
                actions = config.actions

                def run() -> Done:
                    if kind == "start":
                        return actions.start(pipeline, batch_id, params)
                    if kind == "retry":
                        return actions.retry(pipeline, batch_id, task)
                    return actions.cancel(pipeline, batch_id)

                done = await run_in_threadpool(run)
            except Refused as exc:
                logs.warning(f"ui: {kind} refused: {exc}")
                return r.error(request, 403, str(exc))
            except NotFound as exc:
                return r.error(request, 404, str(exc))
            except InvalidInput as exc:
                return r.error(request, 400, str(exc))
            except (DBAPIError, SQLAlchemyError) as exc:
                logs.error(f"ui: {kind} failed: {exc}")
                return r.error(request, 503, "the metadata database cannot be written right "
                               "now; nothing was changed")
            logs.info(f"ui: {done.message}", pipeline=pipeline, batch_id=batch_id)
            location = urls.batch_url(pipeline, batch_id)
            if _wants_json(request):
                return JSONResponse({"ok": True, "message": done.message, "location": location})
            return RedirectResponse(location, status_code=303)

        handle.__name__ = kind
        return handle

    batch_path = "/pipelines/{pipeline}/batches/{batch_id}"
    routes = [
        Route("/", batches, name="batches"),
        Route("/pipelines/{pipeline}", pipeline, name="pipeline"),
        Route("/pipelines/{pipeline}/start", action("start"), methods=["POST"]),
        Route(batch_path, batch, name="batch"),
        Route(batch_path + "/fragment", batch_fragment),
        Route(batch_path + "/stream", stream),
        Route(batch_path + "/events", events),
        Route(batch_path + "/retry", action("retry"), methods=["POST"]),
        Route(batch_path + "/cancel", action("cancel"), methods=["POST"]),
        Route(batch_path + "/tasks/{task}", task),
        Route(batch_path + "/tasks/{task}/fragment", task_fragment),
        Route(batch_path + "/tasks/{task}/stream", task_stream),
        Mount("/static", StaticFiles(packages=[("orchestrator.ui", "static")]), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return r.error(request, 404, "no such page")

    async def not_allowed(request: Request, exc: Exception) -> Response:
        return r.error(request, 405, "method not allowed")

    app = Starlette(
        routes=routes,
        middleware=[Middleware(Guard, allowed_hosts=config.allowed_hosts)],
        exception_handlers={404: not_found, 405: not_allowed},
    )
    app.state.counts = counts
    return app
