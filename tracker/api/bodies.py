"""Request bodies: msgspec Structs decoded strictly, errors in flux0's (pydantic's) shape.

Bodies are decoded here rather than by Litestar so that a bad body is a 422 whose
``detail`` is a list of ``{"type", "loc", "msg", "input"}`` naming the field, as flux0
answers, and so that ``"7"`` is not taken for ``7``. :func:`body_operation` puts each
body's JSON Schema into the OpenAPI document all the same.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from litestar.openapi.spec import OpenAPIMediaType, Operation, RequestBody, Schema

from tracker.model import AgentId, ConsumptionOffsets, Offset, Reason, SessionId, Title, UserId

T = TypeVar("T")

MAX_BODY = 64 * 1024
"""Bytes a request body may have (larger ones are refused with 413)."""


class CreateSession(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST /api/sessions``: flux0's ``SessionCreationParamsDTO`` plus an optional ``user_id``."""

    agent_id: AgentId
    user_id: UserId | None = None
    id: SessionId | None = None
    title: Title | None = None


class PatchSession(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``PATCH /api/sessions/{id}``: a new title (null clears it) and/or offsets to commit."""

    title: Title | msgspec.UnsetType | None = msgspec.UNSET
    consumption_offsets: ConsumptionOffsets | msgspec.UnsetType = msgspec.UNSET


class ResetOffset(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """``POST .../offsets/{consumer}/reset``: exactly one of ``to_offset``, ``shift_by`` and
    ``to_time`` (an ISO 8601 time with a zone: the offset the consumer had then)."""

    reason: Reason
    to_offset: Offset | None = None
    shift_by: int | None = None
    to_time: str | None = None
    execute: bool = False


class BodyError(Exception):
    """A request that fails validation: flux0's 422 ``detail`` list."""

    def __init__(self, detail: list[dict[str, Any]]) -> None:
        super().__init__(detail)
        self.detail = detail

    def also(self, kind: str, loc: list[str | int], msg: str, value: Any = None) -> BodyError:
        """This error with one more entry (a request can fail on several fields)."""
        self.detail.append({"type": kind, "loc": loc, "msg": msg, "input": value})
        return self


def problem(kind: str, loc: list[str | int], msg: str, value: Any = None) -> BodyError:
    """One validation error, e.g. ``problem("value_error", ["query", "user_id"], "...")``."""
    return BodyError([{"type": kind, "loc": loc, "msg": msg, "input": value}])


_AT = re.compile(r" - at `(?:key` in `)?\$(?P<path>[^`]*)`$")
_FIELD = re.compile(r"field `(?P<name>[^`]+)`")
_STEP = re.compile(r"\.([A-Za-z0-9_]+)|\[(\d+)\]|\[\.\.\.\]")


def _locate(message: str) -> tuple[list[str | int], str]:
    """The field path of a msgspec error message, and the message without it."""
    loc: list[str | int] = ["body"]
    match = _AT.search(message)
    if match is not None:
        message = message[: match.start()]
        for step in _STEP.finditer(match.group("path")):
            if step.group(1) is not None:
                loc.append(step.group(1))
            elif step.group(2) is not None:
                loc.append(int(step.group(2)))
    if (field := _FIELD.search(message)) is not None:
        loc.append(field.group("name"))
    return loc, message


def _value_at(raw: Any, loc: list[str | int]) -> Any:
    for step in loc[1:]:
        if isinstance(raw, dict) and isinstance(step, str):
            raw = raw.get(step)
        elif isinstance(raw, list) and isinstance(step, int) and step < len(raw):
            raw = raw[step]
        else:
            return None
    return raw


def decode_body(body: bytes, kind: type[T]) -> T:
    """``body`` as ``kind``; raises :class:`BodyError` naming the field that fails."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        loc, message = _locate(str(exc))
        if message.startswith("Object missing required field"):
            kind_name = "missing"
        elif message.startswith("Object contains unknown field"):
            kind_name = "extra_forbidden"
        else:
            kind_name = "value_error"
        try:
            raw = msgspec.json.decode(body)
        except (RecursionError, msgspec.DecodeError):  # nested too deeply, or a number
            raw = None  # out of range (1e999): the value that failed cannot be shown
        raise BodyError(
            [{"type": kind_name, "loc": loc, "msg": message, "input": _value_at(raw, loc)}]
        ) from None
    except msgspec.DecodeError as exc:
        text = body[:200].decode(errors="replace")
        raise problem("json_invalid", ["body"], str(exc), text) from None
    except RecursionError:  # msgspec's answer to nesting deeper than the interpreter allows
        text = body[:200].decode(errors="replace")
        raise problem("json_invalid", ["body"], "JSON is nested too deeply", text) from None


# -- OpenAPI ---------------------------------------------------------------------------

_RENAME = {
    "anyOf": "any_of",
    "oneOf": "one_of",
    "minLength": "min_length",
    "maxLength": "max_length",
    "additionalProperties": "additional_properties",
    "propertyNames": "property_names",
    "exclusiveMinimum": "exclusive_minimum",
    "exclusiveMaximum": "exclusive_maximum",
}
_SKIP = {"$ref", "$defs"}


def _schema(node: Any, defs: dict[str, Any]) -> Any:
    """A msgspec JSON Schema node as Litestar's :class:`Schema` (references inlined)."""
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _schema(defs[node["$ref"].rsplit("/", 1)[1]], defs)
    values: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SKIP:
            continue
        name: str = _RENAME.get(key) or key
        if key == "properties":
            values[name] = {k: _schema(v, defs) for k, v in value.items()}
        elif key in {"anyOf", "oneOf"}:
            values[name] = [_schema(v, defs) for v in value]
        elif isinstance(value, dict):
            values[name] = _schema(value, defs)
        else:
            values[name] = value
    return Schema(**values)


def body_operation(kind: type[Any]) -> type[Operation]:
    """An :class:`Operation` class whose request body is ``kind``'s JSON Schema."""
    full = msgspec.json.schema(kind)
    schema = _schema(full, full.get("$defs", {}))

    @dataclass
    class WithBody(Operation):
        def __post_init__(self) -> None:
            self.request_body = RequestBody(
                required=True, content={"application/json": OpenAPIMediaType(schema=schema)}
            )

    return WithBody
