"""Deliveries in, frozen typed objects out: the only code that reads an event's body.

Pub/Sub reaches `route` over HTTP. Terraform's push subscriptions send Pub/Sub's own
push body (`{"message": …, "subscription": …, "deliveryAttempt": …}`, the topic in
the endpoint's path); an Eventarc Pub/Sub trigger would send a
`google.cloud.pubsub.topic.v1.messagePublished` CloudEvent instead, in binary mode
(attributes in `ce-*` headers, the envelope as the body) or structured mode (one
JSON document). `pubsub_push` reads all three from the raw request, so nothing is
lost on the way (functions-framework's own conversion of a raw push drops
`deliveryAttempt`, answers 400 to a message without `data` and 500 to JSON nested
deeper than Python's recursion limit, each of which Pub/Sub would redeliver until it
gives up). GCS reaches `on_object_finalized` as
`google.cloud.storage.object.v1.finalized`. Anything that cannot be decoded raises
`InvalidEvent`, which the entry point logs and acknowledges: a delivery that is
malformed now will be malformed on every redelivery too.
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
# The base64 of the largest accepted message, plus the envelope around it.
MAX_BODY_BYTES = (MAX_DATA_BYTES * 4) // 3 + 65_536

_TOPIC_RE = re.compile(r"projects/([^/]+)/topics/([^/?#]+)")


class InvalidEvent(InvalidInput):
    """A delivery that cannot be decoded into a Pub/Sub message or a storage object;
    `context` says what it was (message id, subscription, attributes), for the log."""

    def __init__(self, message: str, context: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.context = dict(context or {})


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


def _json_document(raw: bytes | bytearray | str, what: str = "event body") -> Any:
    """JSON text -> a value, with every way it can fail as `InvalidEvent`."""
    raw = bytes(raw, "utf-8") if isinstance(raw, str) else bytes(raw)
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidEvent(f"{what} of {len(raw)} bytes exceeds {MAX_BODY_BYTES}")
    try:
        return json.loads(raw)
    except UnicodeDecodeError as exc:
        raise InvalidEvent(f"{what} is not valid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise InvalidEvent(f"{what} is not JSON: {exc.msg} at position {exc.pos}") from exc
    except RecursionError:
        raise InvalidEvent(f"{what} is nested too deeply to be a message") from None


def _object_data(data: Any) -> dict[str, Any]:
    if data is None:
        raise InvalidEvent("event has no data")
    if not isinstance(data, dict):
        raise InvalidEvent(f"event data must be a JSON object, got {type(data).__name__}")
    return data


def _event_data(event: Any) -> dict[str, Any]:
    data = getattr(event, "data", None)
    if isinstance(data, bytes | bytearray | str):
        # Binary mode with a body that cloudevents could not read as JSON.
        data = _json_document(data)
    return _object_data(data)


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
    return _delivery(_event_data(event), str(_attr(event, "source") or ""), _attr(event, "id"))


def pubsub_push(headers: Mapping[str, str], body: bytes, path: str = "") -> PubSubDelivery:
    """One HTTP request to `route` -> `PubSubDelivery`: Pub/Sub's own push (the topic
    taken from the endpoint's path `…/projects/P/topics/T`), or a messagePublished
    CloudEvent in binary or structured mode."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    if "ce-type" in lower or "ce-specversion" in lower:
        kind = lower.get("ce-type")
        if kind != PUBSUB_PUBLISHED:
            raise InvalidEvent(f"unexpected event type {kind!r} (expected {PUBSUB_PUBLISHED})")
        return _delivery(_object_data(_json_document(body)), lower.get("ce-source", ""),
                         lower.get("ce-id"))
    if lower.get("content-type", "").startswith("application/cloudevents+json"):
        event = _object_data(_json_document(body, "event"))
        if event.get("type") != PUBSUB_PUBLISHED:
            raise InvalidEvent(f"unexpected event type {event.get('type')!r} "
                               f"(expected {PUBSUB_PUBLISHED})")
        inner = event.get("data")
        if inner is None and isinstance(event.get("data_base64"), str):
            inner = _json_document(decode_base64(event["data_base64"], "data_base64"))
        return _delivery(_object_data(inner), str(event.get("source") or ""), event.get("id"))
    envelope = _object_data(_json_document(body, "push body"))
    match = _TOPIC_RE.search(path or "")
    source = f"//pubsub.googleapis.com/{match.group(0)}" if match else ""
    return _delivery(envelope, source, None)


def _delivery(data: dict[str, Any], source: str, event_id: Any) -> PubSubDelivery:
    """The push envelope (`message`, `subscription`, `deliveryAttempt`) -> `PubSubDelivery`."""
    message = data.get("message")
    if not isinstance(message, dict):
        raise InvalidEvent("event data has no 'message' object")
    subscription = data.get("subscription")
    attributes = message.get("attributes") or {}
    context: dict[str, Any] = {
        "message_id": str(message.get("messageId", message.get("message_id")) or event_id or ""),
        "subscription": subscription if isinstance(subscription, str) else None,
        "delivery_attempt": data.get("deliveryAttempt", message.get("deliveryAttempt")),
    }
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise InvalidEvent("message.attributes must map strings to strings", context)
    context["attributes"] = {k: v[:200] for k, v in list(attributes.items())[:20]}
    if "data" not in message:
        # Pub/Sub allows a message of attributes alone; no command is one.
        raise InvalidEvent("message has no 'data' (attributes only)", context)
    payload = decode_base64(message.get("data"))
    attempt = context["delivery_attempt"]
    if attempt is not None:
        try:
            attempt = int(attempt)
        except (TypeError, ValueError):
            raise InvalidEvent(f"deliveryAttempt must be an integer, got {attempt!r}",
                               context) from None
    match = _TOPIC_RE.search(source)
    try:
        return PubSubDelivery(
            message_id=context["message_id"],
            data=payload,
            attributes=attributes,
            delivery_attempt=attempt,
            publish_time=message.get("publishTime", message.get("publish_time")),
            source=source,
            topic=match.group(2) if match else None,
            subscription=context["subscription"],
        )
    except ValidationError as exc:
        raise InvalidEvent(f"invalid Pub/Sub message: {_problems(exc)}", context) from exc


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


def describe_push(headers: Mapping[str, str], path: str, size: int) -> dict[str, Any]:
    """Where a rejected push came from, for its log line (never its payload)."""
    lower = {str(k).lower(): str(v) for k, v in headers.items()}
    return {"event_id": lower.get("ce-id"), "event_type": lower.get("ce-type"),
            "event_source": lower.get("ce-source") or path, "body_bytes": size}


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
