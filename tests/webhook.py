"""A real HTTP server on 127.0.0.1 standing in for a Slack incoming webhook.

It records every POST, and answers `fail_with` (e.g. 500) to the next `failures`
requests before it answers 200, as a receiver that is down for a while would.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class WebhookReceiver:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # every request, answered or not
        self.accepted: list[dict[str, Any]] = []  # the ones answered 200
        self.failures = 0
        self.fail_with = 500
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    doc = {"path": self.path, "content_type": self.headers.get("Content-Type"),
                           "body": json.loads(body)}
                    receiver.received.append(doc)
                    failing = receiver.failures > 0
                    if failing:
                        receiver.failures -= 1
                    else:
                        receiver.accepted.append(doc)
                code = receiver.fail_with if failing else 200
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"error" if failing else b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/secret"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def texts(self) -> list[str]:
        with self._lock:
            return [d["body"]["text"] for d in self.accepted]

    def fail_next(self, n: int, status: int = 500) -> None:
        with self._lock:
            self.failures, self.fail_with = n, status


@contextmanager
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    receiver._thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()
