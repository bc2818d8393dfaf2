"""The event log's records: five event Structs in one tagged union, and their codecs.

The log stores each event as msgpack; ``events export`` / ``events import`` use the
same Structs as JSON, one per line. Schema evolution: add optional fields only, never
reuse a tag, so that old logs replay forever.
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
from tracker.model import AgentId, ConsumerName, Offset, SessionId, Timestamp, Title, UserId


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
    event_id: str | None = msgspec.field(default=None)
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
    actor: str | None = None
    reason: str | None = None


class SessionDeleted(Event, frozen=True, tag="session_deleted", kw_only=True):
    """The session is gone for queries; later events for it change nothing."""


AnyEvent = SessionCreated | TitleChanged | OffsetCommitted | OffsetReset | SessionDeleted


def _checked_on_read(meta: object) -> bool:
    """Whether the log decoders keep a constraint (see :func:`_stored_form`)."""
    return not (isinstance(meta, Meta) and (meta.pattern or meta.tz))


def _relaxed(kind: Any) -> Any:
    """``kind`` without the constraints the log decoders skip (lengths and ranges are kept)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        base, *metas = args
        kept = [meta for meta in metas if _checked_on_read(meta)]
        return Annotated[(base, *kept)] if kept else base
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_relaxed(arg) for arg in args)]  # noqa: UP007
    return kind


ENVELOPE = ("event_id", "recorded_at", "position")


def _stored_form(cls: type[Event], *, lean: bool) -> type[Event]:
    """A subclass of ``cls`` for decoding records read back from the log.

    Records in the log were fully validated when they were appended and are checked by
    CRC when read, while regex checks cost 3x the decode itself, so these subclasses
    skip the charset patterns (lengths and ranges are still checked). They also accept
    times without a zone, which versions before the ``Timestamp`` type appended from
    ``events import``: old logs must replay forever. A ``lean`` form
    also leaves the envelope undecoded (its fields keep their defaults), for the fold,
    which does not need it. Both are instances of the declared classes, so the fold and
    everything else treat them alike.
    """
    hints = typing.get_type_hints(cls, include_extras=True)
    overrides: list[Any] = []
    for field in msgspec.structs.fields(cls):
        relaxed = _relaxed(hints[field.name])
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


_msgpack_encoder = msgspec.msgpack.Encoder()
_msgpack_decoder = msgspec.msgpack.Decoder(AnyEvent)
_json_encoder = msgspec.json.Encoder()
_json_decoder = msgspec.json.Decoder(AnyEvent)

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


_PATH = re.compile(r" - at `\$(?:\[(\d+)\])?\.?([A-Za-z_]*)")


def describe_validation_error(exc: Exception) -> tuple[int | None, str]:
    """Turn msgspec's message into ``(item index, "field: what is wrong")``."""
    text = str(exc)
    match = _PATH.search(text)
    if match is None:
        return None, text
    index = int(match.group(1)) if match.group(1) is not None else None
    field = match.group(2) or "value"
    return index, f"{field}: {text[: match.start()]}"


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
    except (OverflowError, TypeError) as exc:
        where = f"{what} {len(records) + 1}: " if len(events) > 1 else ""
        raise InvalidInputError(
            f"{where}offset: must be an integer 0 <= n < 2**63 ({exc})"
        ) from None
    except msgspec.ValidationError as exc:
        _, message = describe_validation_error(exc)
        where = f"{what} {len(records) + 1}: " if len(events) > 1 else ""
        raise InvalidInputError(where + message) from None
    return records


def decode_event_json_line(line: bytes, line_number: int) -> AnyEvent:
    """Decode one line of ``events import``; errors name the line."""
    try:
        event: AnyEvent = _json_decoder.decode(line)
    except msgspec.ValidationError as exc:
        _, message = describe_validation_error(exc)
        raise InvalidInputError(f"line {line_number}: {message}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"line {line_number}: not valid JSON ({exc})") from None
    return event
