"""Typed batch params: what a pipeline declares it takes, and the conversion of what a
start gives (strings from `--param k=v`, JSON from a start message, a schedule's
`params:`) into those types.

A pipeline that declares no params takes any, unchanged. One that declares them gets
each converted, defaults filled in, and every problem reported at once: an unknown
name, a missing required param, a value that is not of its type.
"""

from __future__ import annotations

import re
from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from orchestrator.errors import InvalidInput

ParamType = Literal["string", "int", "float", "bool", "date", "list"]
TYPES: tuple[str, ...] = ParamType.__args__  # type: ignore[attr-defined]
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ParamSpec(BaseModel):
    """One declared param: `region: {type: string, required: true}`, or just its type,
    `region: string`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: ParamType = "string"
    default: Any = None
    required: bool = False
    description: str = ""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"type": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _default(self) -> ParamSpec:
        if self.default is not None:
            if self.required:
                raise ValueError("a required param has no default: drop one of them")
            convert(self.type, self.default)  # a ValueError names what is wrong
        return self


def convert(kind: str, value: Any) -> Any:
    """`value` as a JSON value of type `kind`, or ValueError saying why it is not."""
    if kind == "string":
        if isinstance(value, str):
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _INT_RE.match(value.strip()):
            return int(value)
    elif kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
            else:
                if number == number and abs(number) != float("inf"):  # JSON has no nan or inf
                    return number
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
    elif kind == "date":
        if isinstance(value, date) and not isinstance(value, datetime):
            return value.isoformat()
        if isinstance(value, str) and _DATE_RE.match(value.strip()):
            try:
                return date.fromisoformat(value.strip()).isoformat()
            except ValueError:
                pass
    elif kind == "list":
        if isinstance(value, list):
            return value
        if isinstance(value, str):  # `--param regions=north,south`
            return [item.strip() for item in value.split(",") if item.strip()]
    raise ValueError(f"{_shown(value)} is not {_A[kind]}")


_A = {"string": "a string", "int": "an int", "float": "a float",
      "bool": "a bool (true or false)", "date": "a date (YYYY-MM-DD)",
      "list": "a list (a JSON list, or items separated by commas)"}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check(declared: dict[str, ParamSpec], given: dict[str, Any]
          ) -> tuple[dict[str, Any], list[str]]:
    """The params a batch runs with (converted, defaults filled in), and every problem."""
    out: dict[str, Any] = {}
    found: list[str] = []
    for name in given:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            found.append(f"unknown param {name!r} (declared: {known})")
    for name, spec in declared.items():
        if name in given and given[name] is not None:
            try:
                out[name] = convert(spec.type, given[name])
            except ValueError as exc:
                found.append(f"param {name!r}: {exc}")
        elif spec.default is not None:
            out[name] = convert(spec.type, spec.default)
        elif spec.required:
            found.append(f"missing required param {name!r} ({spec.type})")
    return out, found


def resolve(pipeline: str, declared: dict[str, Any] | None, given: dict[str, Any] | None
            ) -> dict[str, Any]:
    """The params to start a batch of `pipeline` with, or InvalidInput listing every
    problem on one line. `declared` is the stored declaration (None: take any)."""
    if declared is None:
        return dict(given or {})
    specs = {name: ParamSpec.model_validate(spec) for name, spec in declared.items()}
    out, found = check(specs, dict(given or {}))
    if found:
        raise InvalidInput(f"invalid params for pipeline {pipeline!r}: {'; '.join(found)}")
    return out
