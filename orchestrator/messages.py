"""Messages on the tasks topic, parsed into frozen, typed objects.

`{"type": "start_batch", "pipeline": "monthly_profit", "batch_id": "2024-03", "params": {}}`
`{"type": "run_task", "pipeline": "…", "batch_id": "…", "task": "…", "attempt": 1}`
(plus `"map_index": 3` for the instance of a mapped task)
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from orchestrator.db.types import json_problem
from orchestrator.errors import InvalidInput
from orchestrator.identifiers import BATCH_ID_RE, NAME_RE

MAX_MESSAGE_BYTES = 1_000_000
# A deadline further out than this is a mistake (and past datetime's range, a crash).
MAX_DEADLINE_S = 366 * 24 * 3600

Name = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]
BatchId = Annotated[str, StringConstraints(pattern=BATCH_ID_RE.pattern)]


class _Message(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", strict=True)


class StartBatch(_Message):
    type: Literal["start_batch"]
    pipeline: Name
    batch_id: BatchId
    params: dict[str, Any] = Field(default_factory=dict)
    # Optional: cancel the batch if it has not finished this many seconds after start.
    deadline_s: float | None = Field(default=None, gt=0, le=MAX_DEADLINE_S,
                                     allow_inf_nan=False)

    @field_validator("params")
    @classmethod
    def _storable(cls, params: dict[str, Any]) -> dict[str, Any]:
        # Checked here, not when the database refuses them: the sender gets the reason.
        if (problem := json_problem(params, "params")) is not None:
            raise ValueError(problem)
        return params


class RunTask(_Message):
    type: Literal["run_task"]
    pipeline: Name
    batch_id: BatchId
    task: Name
    attempt: int = Field(ge=1, le=10_000)
    # The instance of a mapped task; -1 (the default) for the task's own row.
    map_index: int = Field(default=-1, ge=-1, le=1_000_000)


class UnknownMessage(_Message):
    """A `type` this version does not know: acknowledged and logged, never retried."""

    type: str


Message = StartBatch | RunTask
_adapter: TypeAdapter[Message] = TypeAdapter(
    Annotated[StartBatch | RunTask, Field(discriminator="type")]
)
KNOWN_TYPES = frozenset({"start_batch", "run_task"})


def parse_message(payload: bytes | str | dict[str, Any]) -> Message | UnknownMessage:
    """Bytes (UTF-8 JSON) or a dict -> a typed message; `InvalidInput` naming the problem."""
    if isinstance(payload, bytes | str):
        if len(payload) > MAX_MESSAGE_BYTES:
            raise InvalidInput(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            text = payload.decode("utf-8") if isinstance(payload, bytes) else payload
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"message is not valid UTF-8: {exc.reason} at byte {exc.start}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"message is not JSON: {exc.msg} at position {exc.pos}") from exc
        except RecursionError:
            raise InvalidInput("message is nested too deeply to be a command") from None
    else:
        data = payload
    if not isinstance(data, dict):
        raise InvalidInput(f"message must be a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise InvalidInput("message has no string 'type'")
    if kind not in KNOWN_TYPES:
        return UnknownMessage(type=kind[:100])
    try:
        return _adapter.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'message'}: {e['msg']}"
            for e in exc.errors()
        )
        raise InvalidInput(f"invalid {kind} message: {problems}") from exc


def log_labels(msg: Any) -> dict[str, Any]:
    """The labels that tie a log line to its pipeline, batch, task and attempt."""
    labels = {k: getattr(msg, k) for k in ("pipeline", "batch_id", "task", "attempt")
              if getattr(msg, k, None) is not None}
    if getattr(msg, "map_index", -1) >= 0:
        labels["map_index"] = msg.map_index
    return labels
