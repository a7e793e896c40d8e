"""Pub/Sub publisher over the REST API (`projects.topics.publish`).

A publish is one HTTPS POST per topic carrying every message of the call, so the
instance needs neither gRPC nor the generated client (whose import alone costs a cold
start a third of a second). Against the emulator (`PUBSUB_EMULATOR_HOST`, which serves
REST on the same host and port as gRPC) the requests go out with `http.client` and no
credentials; against Google, through google-auth's `AuthorizedSession` with the
application default credentials. Both are imported by the first publish.

Transient failures (the connection, 408, 429, 5xx) are retried with backoff until
`PUBLISH_TIMEOUT_S`; anything else (a missing topic, a refused permission) fails at
once. Either way the caller gets `InfrastructureError` and its message stays in the
task log for the sweeper to publish again.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage

PUBLISH_TIMEOUT_S = 30.0
GOOGLE_ENDPOINT = "https://pubsub.googleapis.com"
SCOPE = "https://www.googleapis.com/auth/pubsub"
# The API takes at most 1,000 messages and 10 MB per request; base64 grows data by 4/3.
MAX_MESSAGES = 1000
MAX_REQUEST_BYTES = 7_000_000
POOL_SIZE = 32
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_FIRST_BACKOFF_S = 0.1
_MAX_BACKOFF_S = 2.0


class HttpTransport(Protocol):
    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """POST a JSON body to `path` (from the API root); the status and the body."""
        ...


class _Retryable(Exception):
    pass


class PlainHttp:
    """The emulator's transport: HTTP/1.1 keep-alive connections from a small pool, one
    per concurrent caller, no credentials."""

    def __init__(self, host: str):
        self.host = host
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = http.client.HTTPConnection(self.host, timeout=timeout)
        else:
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
        try:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except BaseException:
            conn.close()
            raise
        if resp.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return resp.status, data

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class GoogleHttp:
    """Google's transport: an `AuthorizedSession` (requests) with the application default
    credentials, or the ones given."""

    def __init__(self, endpoint: str = GOOGLE_ENDPOINT, credentials: Any = None):
        from google.auth.transport.requests import AuthorizedSession

        if credentials is None:
            import google.auth

            credentials, _ = google.auth.default(scopes=[SCOPE])
        from requests.adapters import HTTPAdapter

        self.endpoint = endpoint.rstrip("/")
        self._session = AuthorizedSession(credentials)
        # Keep a connection for each of the instance's request threads.
        self._session.mount("https://", HTTPAdapter(pool_maxsize=POOL_SIZE))
        self._session.mount("http://", HTTPAdapter(pool_maxsize=POOL_SIZE))

    def post(self, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        # requests' errors (connection, timeout) are OSErrors, retried like http.client's.
        resp = self._session.post(self.endpoint + path, data=body, timeout=timeout,
                                  headers={"Content-Type": "application/json"})
        return resp.status_code, resp.content

    def close(self) -> None:
        self._session.close()


def default_transport() -> HttpTransport:
    """The emulator's when `PUBSUB_EMULATOR_HOST` is set, Google's otherwise."""
    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    if emulator:
        return PlainHttp(emulator)
    return GoogleHttp()


class SharedClient:
    """One transport (its connections, its credentials) for every topic a runtime
    publishes to, built by the first publish that needs it."""

    def __init__(self, factory: Callable[[], HttpTransport] | None = None) -> None:
        self._factory = factory
        self._transport: HttpTransport | None = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._transport is not None

    def get(self) -> HttpTransport:
        with self._lock:
            if self._transport is None:
                self._transport = (self._factory or default_transport)()
            return self._transport


def _encoded(m: OutboundMessage) -> dict[str, Any]:
    data = json.dumps(dict(m.data), separators=(",", ":")).encode()
    out: dict[str, Any] = {"data": base64.b64encode(data).decode("ascii")}
    if m.attributes:
        out["attributes"] = {str(k): str(v) for k, v in m.attributes.items()}
    return out


def _requests(messages: Sequence[OutboundMessage]) -> Iterator[list[dict[str, Any]]]:
    """The messages in publish requests within the API's limits, in order."""
    batch: list[dict[str, Any]] = []
    size = 0
    for m in messages:
        encoded = _encoded(m)
        n = len(encoded["data"]) + sum(len(k) + len(v) for k, v in
                                       encoded.get("attributes", {}).items()) + 64
        if batch and (len(batch) >= MAX_MESSAGES or size + n > MAX_REQUEST_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(encoded)
        size += n
    if batch:
        yield batch


class PubSubPublisher:
    """Publishes to one topic and waits for every message id before returning, so a
    caller that returns has really handed its messages to Pub/Sub."""

    def __init__(self, project: str, topic: str, *, client: HttpTransport | None = None,
                 shared: SharedClient | None = None):
        self.project = project
        self.topic = topic
        self._client = client
        self._shared = shared or SharedClient()

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    def _get_client(self) -> HttpTransport:
        if self._client is None:
            self._client = self._shared.get()
        return self._client

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        try:
            client = self._get_client()
            for batch in _requests(messages):
                self._send(client, batch, deadline)
        except InfrastructureError:
            raise
        except Exception as exc:
            raise InfrastructureError(f"Pub/Sub publish to {self.topic} failed: {exc}") from exc

    def _send(self, client: HttpTransport, batch: list[dict[str, Any]], deadline: float) -> None:
        path = f"/v1/{self.topic_path}:publish"
        body = json.dumps({"messages": batch}, separators=(",", ":")).encode()
        backoff = _FIRST_BACKOFF_S
        while True:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError(f"no answer within {PUBLISH_TIMEOUT_S:g}s")
                status, data = client.post(path, body, timeout=left)
                if status in RETRY_STATUSES:
                    raise _Retryable(f"HTTP {status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, _Retryable) as exc:
                last = exc
            else:
                if not 200 <= status < 300:
                    raise InfrastructureError(
                        f"Pub/Sub publish to {self.topic} failed: HTTP {status}: "
                        f"{data[:300].decode(errors='replace')}")
                ids = json.loads(data).get("messageIds", [])
                if len(ids) != len(batch):
                    raise InfrastructureError(
                        f"Pub/Sub publish to {self.topic} returned {len(ids)} message ids "
                        f"for {len(batch)} messages")
                return
            sleep = min(backoff * (0.5 + random.random()), deadline - time.monotonic())
            if sleep <= 0:
                raise InfrastructureError(
                    f"Pub/Sub publish to {self.topic} failed: {last}") from last
            time.sleep(sleep)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
