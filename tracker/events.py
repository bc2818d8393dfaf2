"""The event log's records: five event Structs in one tagged union, and their codecs.

The log stores each event as msgpack; ``events export`` / ``events import`` use the
same Structs as JSON, one per line, and an import line with a field the Struct does not
declare is refused. Schema evolution: add optional fields only, never reuse a tag, never
check on read what older versions did not check on append, so that old logs replay
forever.
"""

from __future__ import annotations

import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from tracker.errors import InvalidInputError
from tracker.model import (
    Actor,
    AgentId,
    ConsumerName,
    EventId,
    Offset,
    Reason,
    SessionId,
    Timestamp,
    Title,
    UserId,
)


class Position(Struct, frozen=True, order=True, omit_defaults=True):
    """Where a record sits in the log: partition, offset in it, index inside a batched record."""

    partition: int
    offset: int
    index: int = 0

    def token(self) -> str:
        """Compact form used as a Redis checkpoint and a read-your-writes token."""
        return f"{self.partition}:{self.offset}:{self.index}"

    @classmethod
    def parse(cls, token: str) -> Position:
        partition, offset, index = (int(part) for part in token.split(":"))
        return cls(partition, offset, index)


class Event(Struct, frozen=True, tag_field="type", omit_defaults=True, gc=False):
    """Envelope shared by every event; ``position`` is set only on events read back from the log."""

    session_id: SessionId
    event_id: EventId | None = None
    recorded_at: Timestamp | None = None
    position: Position | None = None


class SessionCreated(Event, frozen=True, tag="session_created", kw_only=True):
    """Sets the immutable fields; a second create of the same id changes nothing."""

    agent_id: AgentId
    user_id: UserId
    created_at: Timestamp
    title: Title | None = None


class TitleChanged(Event, frozen=True, tag="title_changed", kw_only=True):
    """Last write in log order wins; ``None`` clears the title."""

    title: Title | None = None


class OffsetCommitted(Event, frozen=True, tag="offset_committed", kw_only=True):
    """Offsets are max-registers: a stale or repeated commit is kept but changes nothing."""

    consumer: ConsumerName
    offset: Offset


class OffsetReset(Event, frozen=True, tag="offset_reset", kw_only=True):
    """The only way to move an offset backwards: an operator's act, with who and why."""

    consumer: ConsumerName
    offset: Offset
    actor: Actor | None = None
    reason: Reason | None = None


class SessionDeleted(Event, frozen=True, tag="session_deleted", kw_only=True):
    """The session is gone for queries; later events for it change nothing."""


AnyEvent = SessionCreated | TitleChanged | OffsetCommitted | OffsetReset | SessionDeleted


SIZED_SINCE_APPENDED = ("event_id", "actor", "reason")
"""Free text whose size limits came after records were appended without them."""


def _checked_on_read(meta: object, *, sizes: bool) -> bool:
    """Whether the log decoders keep a constraint (see :func:`_stored_form`)."""
    if not isinstance(meta, Meta):
        return True
    return not (meta.pattern or meta.tz or (not sizes and meta.max_length is not None))


def _relaxed(kind: Any, *, sizes: bool = True) -> Any:
    """``kind`` without the constraints the log decoders skip (see :func:`_stored_form`)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        base, *metas = args
        kept = [meta for meta in metas if _checked_on_read(meta, sizes=sizes)]
        return Annotated[(base, *kept)] if kept else base
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_relaxed(arg, sizes=sizes) for arg in args)]  # noqa: UP007
    return kind


ENVELOPE = ("event_id", "recorded_at", "position")


def _stored_form(cls: type[Event], *, lean: bool) -> type[Event]:
    """A subclass of ``cls`` for decoding records read back from the log.

    Records in the log were fully validated when they were appended and are checked by
    CRC when read, while regex checks cost 3x the decode itself, so these subclasses
    skip the charset patterns (lengths and ranges are still checked). Old logs must replay
    forever, so they also accept what earlier versions appended: times without a zone
    and free text of any size (:data:`SIZED_SINCE_APPENDED`). Unknown fields (added by a
    later version) are skipped. A ``lean`` form also leaves the envelope undecoded (its
    fields keep their defaults), for the fold, which does not need it. Both are instances
    of the declared classes, so the fold and everything else treat them alike.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    overrides: list[Any] = []
    for field in msgspec.structs.fields(cls):
        relaxed = _relaxed(hints[field.name], sizes=field.name not in SIZED_SINCE_APPENDED)
        if lean and field.name in ENVELOPE:
            # renamed to a key the log never holds, so the decoder skips the real one
            overrides.append(
                (field.name, relaxed, msgspec.field(default=None, name="~" + field.name))
            )
        elif relaxed is not hints[field.name]:
            overrides.append(
                (field.name, relaxed) if field.required else (field.name, relaxed, field.default)
            )
    config = cls.__struct_config__
    stored = msgspec.defstruct(
        cls.__name__,
        overrides,
        bases=(cls,),
        tag=config.tag,
        frozen=True,
        kw_only=True,
        gc=False,
        module=cls.__module__,
    )
    stored.__qualname__ = f"{cls.__qualname__}.{'lean' if lean else 'stored'}"
    return typing.cast(type[Event], stored)


def _stored_decoder(*, lean: bool) -> Callable[[bytes], AnyEvent]:
    forms = tuple(_stored_form(cls, lean=lean) for cls in typing.get_args(AnyEvent))
    decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(typing.Union[forms])  # noqa: UP007
    return decoder.decode


class _ImportedPosition(Position, frozen=True, forbid_unknown_fields=True):
    """A ``position`` in an ``events import`` line (dropped on import), with no unknown keys."""


def _import_form(cls: type[Event]) -> type[Event]:
    """A subclass of ``cls`` for ``events import`` lines, which refuses unknown fields.

    A misspelt optional field (``"tilte"``) would otherwise be dropped without a word.
    Records in the log are decoded leniently instead (:func:`_stored_form`), so that a
    field added by a later version does not stop an older one from replaying.
    """
    config = cls.__struct_config__
    imported = msgspec.defstruct(
        cls.__name__,
        [("position", _ImportedPosition | None, None)],
        bases=(cls,),
        tag=config.tag,
        frozen=True,
        kw_only=True,
        gc=False,
        forbid_unknown_fields=True,
        module=cls.__module__,
    )
    imported.__qualname__ = f"{cls.__qualname__}.imported"
    return typing.cast(type[Event], imported)


_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(AnyEvent)
_json_encoder = msgspec.json.Encoder()
_import_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(
    typing.Union[tuple(_import_form(cls) for cls in typing.get_args(AnyEvent))]  # noqa: UP007
)

encode_event: Callable[[Any], bytes] = _msgpack_encoder.encode
decode_event: Callable[[bytes], AnyEvent] = _stored_decoder(lean=False)
"""Decode a record read from the log (already validated when appended)."""
decode_event_lean: Callable[[bytes], AnyEvent] = _stored_decoder(lean=True)
"""Decode a record from the log for folding: the envelope is left out (``None``)."""
decode_event_strict: Callable[[bytes], AnyEvent] = _msgpack_decoder.decode
encode_event_json: Callable[[Any], bytes] = _json_encoder.encode


def utcnow() -> datetime:
    """The current UTC time, to the millisecond (as flux0 writes it)."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def new_event_ids(count: int) -> list[str]:
    """``count`` random 128-bit ids, as hex; one ``urandom`` call for the lot."""
    raw = os.urandom(16 * count).hex()
    return [raw[i : i + 32] for i in range(0, 32 * count, 32)]


MESSAGE_CHARS = 160
_PATH = re.compile(r" - at `\$(?:\[(\d+)\])?\.?([A-Za-z_]*)")
_UNKNOWN = re.compile(r"Object contains unknown field `(.*)`", re.DOTALL)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _field_name(name: str) -> str:
    """A field name from the input, made safe for a one-line message of bounded size."""
    if _PLAIN_NAME.fullmatch(name):
        return name
    return repr(name[:64]) + ("..." if len(name) > 64 else "")


def describe_validation_error(exc: Exception) -> tuple[int | None, str]:
    """Turn msgspec's message into ``(item index, "field: what is wrong")``."""
    text = str(exc)
    at = text.rfind(" - at `$")
    match = _PATH.match(text, at) if at >= 0 else None
    what = text[:at] if match else text
    index = int(match.group(1)) if match and match.group(1) is not None else None
    parent = match.group(2) if match else ""
    if unknown := _UNKNOWN.fullmatch(what):
        name = _field_name(unknown.group(1))
        return index, f"{parent}.{name}: unknown field" if parent else f"{name}: unknown field"
    if len(what) > MESSAGE_CHARS:  # e.g. a huge value echoed back by msgspec
        what = what[:MESSAGE_CHARS] + "..."
    if match is None:
        return None, what
    return index, f"{parent or 'value'}: {what}"


def encode_validated(events: Sequence[AnyEvent], *, what: str = "item") -> list[bytes]:
    """Encode events built in Python into log records, validating each by decoding it back.

    msgspec checks constraints only when decoding, so this round trip is how the model's
    declared constraints are enforced on values that did not come from bytes; nothing
    that fails here can reach the log.
    """
    records: list[bytes] = []
    try:
        for record in map(_msgpack_encoder.encode, events):
            _msgpack_decoder.decode(record)
            records.append(record)
    except UnicodeEncodeError:
        where = f"{what} {len(records) + 1}: " if len(events) > 1 else ""
        raise InvalidInputError(
            f"{where}text is not valid Unicode (a lone surrogate, or bytes that were not UTF-8)"
        ) from None
    except (OverflowError, TypeError) as exc:
        where = f"{what} {len(records) + 1}: " if len(events) > 1 else ""
        field = "offset: must be an integer 0 <= n < 2**63" if "int" in str(exc) else "a value"
        raise InvalidInputError(f"{where}{field} is out of range ({exc})") from None
    except msgspec.ValidationError as exc:
        _, message = describe_validation_error(exc)
        where = f"{what} {len(records) + 1}: " if len(events) > 1 else ""
        raise InvalidInputError(where + message) from None
    return records


def decode_event_json_line(line: bytes, line_number: int) -> AnyEvent:
    """Decode one line of ``events import``; errors name the line."""
    try:
        event: AnyEvent = _import_decoder.decode(line)
    except msgspec.ValidationError as exc:
        _, message = describe_validation_error(exc)
        raise InvalidInputError(f"line {line_number}: {message}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"line {line_number}: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidInputError(f"line {line_number}: nested too deeply") from None
    return event
