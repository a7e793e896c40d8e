"""Pub/Sub publisher (google-cloud-pubsub, imported on first use)."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from typing import Any

from orchestrator.errors import InfrastructureError
from orchestrator.ports import OutboundMessage

PUBLISH_TIMEOUT_S = 30.0


class SharedClient:
    """One `PublisherClient` for every topic a runtime publishes to (its channel, its
    credentials, its batching threads), built by the first publish that needs it."""

    def __init__(self) -> None:
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def built(self) -> bool:
        return self._client is not None

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                from google.cloud import pubsub_v1  # type: ignore[attr-defined]

                # Publish at once: a task waiting for its message is latency we pay per hop.
                self._client = pubsub_v1.PublisherClient(
                    batch_settings=pubsub_v1.types.BatchSettings(max_latency=0.001)
                )
            return self._client


class PubSubPublisher:
    """Publishes to one topic and waits for every message id before returning, so a
    caller that returns has really handed its messages to Pub/Sub."""

    def __init__(self, project: str, topic: str, *, client: Any = None,
                 shared: SharedClient | None = None):
        self.project = project
        self.topic = topic
        self._client = client
        self._shared = shared or SharedClient()

    @property
    def topic_path(self) -> str:
        return f"projects/{self.project}/topics/{self.topic}"

    def _get_client(self) -> Any:
        if self._client is None:
            self._client = self._shared.get()
        return self._client

    def publish(self, messages: Sequence[OutboundMessage]) -> None:
        if not messages:
            return
        client = self._get_client()
        try:
            futures = [
                client.publish(
                    self.topic_path,
                    json.dumps(dict(m.data), separators=(",", ":")).encode(),
                    **dict(m.attributes),
                )
                for m in messages
            ]
            for f in futures:
                f.result(timeout=PUBLISH_TIMEOUT_S)
        except Exception as exc:
            raise InfrastructureError(f"Pub/Sub publish to {self.topic} failed: {exc}") from exc
