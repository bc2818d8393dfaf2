"""Stream messages: what a worker reads, how it finds the session and offset, the file format.

A message is a flux0 ``EventDTO`` as JSON; flux0 events carry no session id, so it comes
from the message key, else a ``session_id`` header, else a ``session_id`` field. The worker
needs only the session id and ``offset``; the handler gets the whole decoded event.

A file stream is a file log whose records are :class:`StreamRecord` s (key, value,
headers, msgpack-encoded), so both kinds of stream carry the same three parts.
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from msgspec import Struct

from tracker.errors import InvalidInputError
from tracker.model import Offset, SessionId

Headers = list[tuple[str, bytes]]

SESSION_HEADER = "session_id"


class StreamRecord(Struct, array_like=True, gc=False):
    """One record of a file stream (and of a file dead-letter stream)."""

    key: bytes | None
    value: bytes
    headers: Headers = []


encode_record = msgspec.msgpack.Encoder().encode
decode_record = msgspec.msgpack.Decoder(StreamRecord).decode


class _Fields(Struct, gc=False):
    """The two fields the worker reads; every other field is skipped unread. The
    ``session_id`` field is checked only when it is used (no key, no header): a message
    keyed by its session is never refused for a field it does not need."""

    offset: Offset
    session_id: msgspec.Raw = msgspec.Raw()


_decode_fields = msgspec.json.Decoder(_Fields).decode
_TOO_DEEP = "nested too deeply"
"""msgspec raises RecursionError for nesting deeper than the interpreter's limit."""
_decode_json = msgspec.json.Decoder().decode


class Undecodable(Exception):
    """A message the worker cannot use; the text is the dead letter's reason."""


class Message:
    """A stream message handed to a handler, in partition order.

    ``event`` is the whole decoded flux0 event (a dict), decoded on first use: a handler
    that needs only the session and offset never pays for the rest.
    """

    __slots__ = (
        "__dict__",
        "headers",
        "key",
        "offset",
        "partition",
        "position",
        "session_id",
        "value",
    )

    def __init__(
        self,
        partition: int,
        position: int,
        key: bytes | None,
        value: bytes,
        headers: Headers,
        session_id: str,
        offset: int,
    ) -> None:
        self.partition = partition
        self.position = position
        self.key = key
        self.value = value
        self.headers = headers
        self.session_id = session_id
        self.offset = offset

    @functools.cached_property
    def event(self) -> dict[str, Any]:
        """The whole event. Raises :class:`Undecodable` (the message becomes a dead letter
        with that reason, as any undecodable one) for a value the worker skipped unread but
        that cannot be decoded, such as ``1e999``."""
        try:
            decoded: dict[str, Any] = _decode_json(self.value)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise Undecodable(f"not a JSON event: {exc}") from None
        return decoded

    def __repr__(self) -> str:
        return (
            f"Message(partition={self.partition}, position={self.position}, "
            f"session_id={self.session_id!r}, offset={self.offset})"
        )


@functools.lru_cache(maxsize=65_536)
def _session_id(raw: bytes) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise Undecodable(f"the session id {raw!r} is not UTF-8") from None
    try:
        return str(msgspec.convert(text, SessionId))
    except msgspec.ValidationError:
        raise Undecodable(f"the session id {text!r} is not 1..64 chars of [A-Za-z0-9_-]") from None


def _field_session_id(raw: msgspec.Raw) -> str | None:
    """The ``session_id`` field, decoded only now that it decides (``null``: none)."""
    try:
        value: str | None = _decode_session_field(raw)
    except msgspec.ValidationError as exc:
        raise Undecodable(f"invalid event: {exc} - at `$.session_id`") from None
    except RecursionError:
        raise Undecodable(f"invalid event: the session_id field is {_TOO_DEEP}") from None
    return value


_decode_session_field = msgspec.json.Decoder(SessionId | None).decode


def message_ids(key: bytes | None, value: bytes, headers: Headers) -> tuple[str, int]:
    """The message's session id and offset, or :class:`Undecodable` saying why not.

    All the worker needs when the handler is the default one (no :class:`Message` made).
    """
    try:
        fields = _decode_fields(value)
    except msgspec.ValidationError as exc:
        raise Undecodable(f"invalid event: {exc}") from None
    except msgspec.DecodeError as exc:
        raise Undecodable(f"not a JSON event: {exc}") from None
    except RecursionError:
        raise Undecodable(f"not a JSON event: {_TOO_DEEP}") from None
    if key:
        return _session_id(key), fields.offset
    if headers:
        header = next((v for k, v in headers if k == SESSION_HEADER), None)
        if header:
            return _session_id(header), fields.offset
    if fields.session_id and (session_id := _field_session_id(fields.session_id)) is not None:
        return session_id, fields.offset
    raise Undecodable("no session id: no message key, session_id header or field")


def decode_message(
    partition: int, position: int, key: bytes | None, value: bytes, headers: Headers
) -> Message:
    """The message with its session id and offset, or :class:`Undecodable` saying why not."""
    session_id, offset = message_ids(key, value, headers)
    return Message(partition, position, key, value, headers, session_id, offset)


class _InputEvent(Struct):
    session_id: SessionId
    offset: Offset


_decode_input = msgspec.json.Decoder(_InputEvent).decode
_encode_json = msgspec.json.Encoder().encode


def input_message(line: bytes, where: str) -> tuple[str, bytes]:
    """``(session_id, value)`` of a ``streams append`` input line.

    The line is a flux0 event with an added ``session_id``; the value written is the
    event without it (the session id travels as the key), as flux0 clients expect.
    """
    try:
        fields = _decode_input(line)
        event = _decode_json(line)
    except msgspec.ValidationError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidInputError(f"{where}: not a JSON object ({exc})") from None
    except RecursionError:
        raise InvalidInputError(f"{where}: not a JSON object ({_TOO_DEEP})") from None
    if not isinstance(event, dict):  # pragma: no cover - _InputEvent accepts only objects
        raise InvalidInputError(f"{where}: expected a JSON object")
    del event["session_id"]
    return fields.session_id, _encode_json(event)
