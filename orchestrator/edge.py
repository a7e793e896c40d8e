"""CloudEvents in, frozen typed objects out: the only code that reads `cloud_event.data`.

Pub/Sub reaches `route` as a `google.cloud.pubsub.topic.v1.messagePublished`
CloudEvent, in binary mode (attributes in `ce-*` headers, the envelope as the
body) or structured mode (one JSON document); a raw push envelope is converted
to the same shape by functions-framework. GCS reaches `on_object_finalized` as
`google.cloud.storage.object.v1.finalized`. Anything that cannot be decoded
raises `InvalidEvent`, which the entry point logs and acknowledges: a delivery
that is malformed now will be malformed on every redelivery too.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import InvalidInput
from orchestrator.storage_events import StorageObject

PUBSUB_PUBLISHED = "google.cloud.pubsub.topic.v1.messagePublished"
STORAGE_FINALIZED = "google.cloud.storage.object.v1.finalized"
# Set by Pub/Sub on a message it forwards to a subscription's dead-letter topic.
DEAD_LETTER_COUNT_ATTRIBUTE = "CloudPubSubDeadLetterSourceDeliveryCount"
DEAD_LETTER_TOPIC_SUFFIX = "dead-letter"
# Pub/Sub's own limit is 10 MB; a task message is a few hundred bytes.
MAX_DATA_BYTES = 1_000_000

_TOPIC_RE = re.compile(r"projects/([^/]+)/topics/([^/?#]+)")


class InvalidEvent(InvalidInput):
    """A CloudEvent that cannot be decoded into a delivery or a storage object."""


class PubSubDelivery(BaseModel):
    """One Pub/Sub message as delivered to `route`."""

    model_config = ConfigDict(frozen=True)

    message_id: str
    data: bytes
    attributes: dict[str, str] = Field(default_factory=dict)
    # Only present when the subscription has a dead-letter policy.
    delivery_attempt: int | None = None
    publish_time: str | None = None
    source: str = ""
    topic: str | None = None
    subscription: str | None = None

    @property
    def dead_letter_count(self) -> int | None:
        """How often Pub/Sub tried the original message before dead-lettering it, or None
        when this is an ordinary delivery."""
        raw = self.attributes.get(DEAD_LETTER_COUNT_ATTRIBUTE)
        from_topic = (self.topic or "").endswith(DEAD_LETTER_TOPIC_SUFFIX)
        if raw is None and not from_topic:
            return None
        try:
            return int(raw) if raw is not None else (self.delivery_attempt or 0)
        except ValueError:
            return self.delivery_attempt or 0

    def log_context(self) -> dict[str, Any]:
        return {"message_id": self.message_id, "delivery_attempt": self.delivery_attempt}


def _attr(event: Any, name: str) -> Any:
    try:
        return event[name]
    except (KeyError, TypeError):
        return None


def _event_data(event: Any) -> Any:
    data = getattr(event, "data", None)
    if isinstance(data, bytes | bytearray | str):
        # Binary mode with a body that cloudevents could not read as JSON.
        raw = bytes(data, "utf-8") if isinstance(data, str) else bytes(data)
        if len(raw) > 2 * MAX_DATA_BYTES:
            raise InvalidEvent(f"event body of {len(raw)} bytes is too large")
        try:
            data = json.loads(raw)
        except UnicodeDecodeError as exc:
            raise InvalidEvent(f"event body is not valid UTF-8 at byte {exc.start}") from exc
        except json.JSONDecodeError as exc:
            raise InvalidEvent(f"event body is not JSON: {exc.msg} at position {exc.pos}") from exc
    if data is None:
        raise InvalidEvent("event has no data")
    if not isinstance(data, dict):
        raise InvalidEvent(f"event data must be a JSON object, got {type(data).__name__}")
    return data


def decode_base64(value: Any, what: str = "message.data") -> bytes:
    """Standard or URL-safe base64, padded or not; a clear error otherwise."""
    if not isinstance(value, str):
        raise InvalidEvent(f"{what} must be a base64 string, got {type(value).__name__}")
    if len(value) > (MAX_DATA_BYTES * 4) // 3 + 4:
        raise InvalidEvent(f"{what} of {len(value)} base64 characters exceeds "
                           f"{MAX_DATA_BYTES} bytes")
    text = value.strip()
    alphabet = "-_" if ("-" in text or "_" in text) else "+/"
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidEvent(f"{what} is not valid base64: {exc}") from exc


def pubsub_delivery(event: Any) -> PubSubDelivery:
    """A messagePublished CloudEvent -> `PubSubDelivery`, or `InvalidEvent` naming the problem."""
    kind = _attr(event, "type")
    if kind != PUBSUB_PUBLISHED:
        raise InvalidEvent(f"unexpected event type {kind!r} (expected {PUBSUB_PUBLISHED})")
    data = _event_data(event)
    message = data.get("message")
    if not isinstance(message, dict):
        raise InvalidEvent("event data has no 'message' object")
    if "data" not in message:
        raise InvalidEvent("message has no 'data'")
    payload = decode_base64(message.get("data"))
    attributes = message.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise InvalidEvent("message.attributes must map strings to strings")
    message_id = message.get("messageId", message.get("message_id")) or _attr(event, "id")
    attempt = data.get("deliveryAttempt", message.get("deliveryAttempt"))
    if attempt is not None:
        try:
            attempt = int(attempt)
        except (TypeError, ValueError):
            raise InvalidEvent(f"deliveryAttempt must be an integer, got {attempt!r}") from None
    source = str(_attr(event, "source") or "")
    match = _TOPIC_RE.search(source)
    subscription = data.get("subscription")
    try:
        return PubSubDelivery(
            message_id=str(message_id or ""),
            data=payload,
            attributes=attributes,
            delivery_attempt=attempt,
            publish_time=message.get("publishTime", message.get("publish_time")),
            source=source,
            topic=match.group(2) if match else None,
            subscription=subscription if isinstance(subscription, str) else None,
        )
    except ValidationError as exc:
        raise InvalidEvent(f"invalid Pub/Sub message: {_problems(exc)}") from exc


def storage_object(event: Any) -> StorageObject:
    """A finalized-object CloudEvent -> `StorageObject`, or `InvalidEvent`."""
    kind = _attr(event, "type")
    if kind != STORAGE_FINALIZED:
        raise InvalidEvent(f"unexpected event type {kind!r} (expected {STORAGE_FINALIZED})")
    data = _event_data(event)
    fields: dict[str, Any] = {k: data.get(k) for k in ("bucket", "name", "generation", "size")
                              if data.get(k) is not None}
    # The GCS JSON API sends int64 values as strings; accept either.
    if isinstance(fields.get("generation"), int) and not isinstance(fields["generation"], bool):
        fields["generation"] = str(fields["generation"])
    if isinstance(fields.get("size"), str):
        if not fields["size"].isdigit():
            raise InvalidEvent(f"invalid object size {fields['size']!r}")
        fields["size"] = int(fields["size"])
    try:
        return StorageObject.model_validate(fields)
    except ValidationError as exc:
        raise InvalidEvent(f"invalid storage object: {_problems(exc)}") from exc


def describe(event: Any) -> dict[str, Any]:
    """Who sent a rejected event, for its log line (never its payload)."""
    return {"event_id": _attr(event, "id"), "event_type": _attr(event, "type"),
            "event_source": _attr(event, "source")}


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
    )


def status_query(args: Mapping[str, str]) -> tuple[str, str | None]:
    """`?batch_id=…&pipeline=…` -> (batch_id, pipeline), checked before any query runs."""
    from orchestrator.identifiers import NAME_RE, valid_batch_id

    batch_id = args.get("batch_id")
    if not batch_id:
        raise InvalidEvent("missing query parameter 'batch_id'")
    if not valid_batch_id(batch_id):
        raise InvalidEvent(f"invalid batch_id {batch_id[:200]!r}")
    pipeline = args.get("pipeline") or None
    if pipeline is not None and not NAME_RE.match(pipeline):
        raise InvalidEvent(f"invalid pipeline name {pipeline[:200]!r}")
    return batch_id, pipeline
