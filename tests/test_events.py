"""The event codecs: what the declared types accept on append and import, and what the log
decoders still read back from records that earlier versions appended.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest

from tracker.errors import InvalidInputError
from tracker.events import (
    AnyEvent,
    OffsetReset,
    SessionCreated,
    TitleChanged,
    decode_event,
    decode_event_json_line,
    decode_event_lean,
    decode_event_strict,
    encode_validated,
)

AWARE = datetime(2025, 1, 25, 22, 41, 41, tzinfo=UTC)
NAIVE = datetime(2025, 1, 25, 22, 41, 41)


def created(**fields: Any) -> SessionCreated:
    values: dict[str, Any] = {
        "session_id": "s1",
        "agent_id": "a",
        "user_id": "u",
        "created_at": AWARE,
        **fields,
    }
    return SessionCreated(**values)


def line(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def import_error(raw: bytes, number: int = 3) -> str:
    with pytest.raises(InvalidInputError) as info:
        decode_event_json_line(raw, number)
    return str(info.value)


# -- time zones ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "field"),
    [
        (created(created_at=NAIVE), "created_at"),
        (created(recorded_at=NAIVE), "recorded_at"),
        (TitleChanged(session_id="s1", title="t", recorded_at=NAIVE), "recorded_at"),
    ],
    ids=["created_at", "recorded_at", "title_changed-recorded_at"],
)
def test_a_naive_datetime_is_refused_on_append(event: AnyEvent, field: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^{field}: .*time ?zone"):
        encode_validated([event])


@pytest.mark.parametrize("field", ["created_at", "recorded_at"])
def test_a_naive_datetime_is_refused_on_import_naming_line_and_field(field: str) -> None:
    fields = {
        "type": "session_created",
        "session_id": "s1",
        "agent_id": "a",
        "user_id": "u",
        "created_at": "2025-01-25T22:41:41Z",
        field: "2025-01-25T22:41:41",
    }
    message = import_error(line(**fields))
    assert message.startswith(f"line 3: {field}: "), message
    assert "timezone" in message


@pytest.mark.parametrize(
    "value", ["2025-01-25T22:41:41Z", "2025-01-25T22:41:41.5+00:00", "2025-01-25T23:41:41+01:00"]
)
def test_an_aware_datetime_is_imported(value: str) -> None:
    fields = {"session_id": "s1", "agent_id": "a", "user_id": "u", "created_at": value}
    event = decode_event_json_line(line(type="session_created", **fields), 1)
    assert isinstance(event, SessionCreated)
    assert event.created_at.utcoffset() is not None
    assert event.created_at - AWARE < timedelta(seconds=1)


@pytest.mark.parametrize("decode", [decode_event, decode_event_strict], ids=["stored", "strict"])
def test_aware_records_in_the_log_decode_unchanged(decode: Any) -> None:
    """Every record the tracker appends carries aware times (a msgpack timestamp)."""
    plus_one = timezone(timedelta(hours=1))
    event = created(created_at=AWARE.astimezone(plus_one), recorded_at=AWARE, event_id="e1")
    (record,) = encode_validated([event])
    decoded = decode(record)
    assert isinstance(decoded, SessionCreated)
    assert decoded.created_at == AWARE
    assert decoded.created_at.utcoffset() == timedelta(0)
    assert decoded.recorded_at == AWARE
    lean = decode_event_lean(record)
    assert isinstance(lean, SessionCreated)
    assert lean.created_at == AWARE


# -- sizes --------------------------------------------------------------------------------

LIMITS = [("event_id", 64), ("actor", 200), ("reason", 1000)]


def reset(**fields: Any) -> OffsetReset:
    return OffsetReset(session_id="s1", consumer="client", offset=1, **fields)


@pytest.mark.parametrize(("field", "limit"), LIMITS)
def test_free_text_fields_have_a_size_limit(field: str, limit: int) -> None:
    encode_validated([reset(**{field: "x" * limit})])
    with pytest.raises(InvalidInputError, match=f"^{field}: .*<= {limit}"):
        encode_validated([reset(**{field: "x" * (limit + 1)})])
    raw = line(type="offset_reset", session_id="s1", consumer="c", offset=1, **{field: "x" * 5000})
    assert import_error(raw).startswith(f"line 3: {field}: ")


def test_a_10_mb_event_id_is_refused_with_a_short_message() -> None:
    raw = line(
        type="offset_committed", session_id="s1", consumer="c", offset=1, event_id="e" * 10**7
    )
    message = import_error(raw, 7)
    assert message.startswith("line 7: event_id: "), message[:200]
    assert len(message) < 200, message[:200]


def test_a_huge_unknown_type_is_not_echoed_back() -> None:
    message = import_error(line(type="x" * 10**6, session_id="s1"))
    assert message.startswith("line 3: type: Invalid value 'xxx"), message[:200]
    assert len(message) < 200, message[:200]


# -- unknown fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"type": "session_deleted", "session_id": "s1", "tpye": "x"}, "tpye"),
        ({"type": "offset_committed", "session_id": "s1", "consumer": "c", "offset": 1,
          "offset_": 2}, "offset_"),
        ({"type": "title_changed", "session_id": "s1", "position": {"partition": 0,
          "offset": 3, "extra": 1}}, "position.extra"),
    ],
    ids=["typo", "extra", "nested"],
)  # fmt: skip
def test_an_unknown_field_is_refused_on_import(fields: dict[str, Any], named: str) -> None:
    assert import_error(line(**fields)) == f"line 3: {named}: unknown field"


def test_an_export_line_with_its_position_is_imported() -> None:
    fields = {"session_id": "s1", "title": "t", "position": {"partition": 0, "offset": 3}}
    event = decode_event_json_line(line(type="title_changed", **fields), 1)
    assert isinstance(event, TitleChanged)
    assert event.position is not None
    assert event.position.offset == 3


def test_the_log_decoders_skip_fields_they_do_not_know() -> None:
    """A record appended by a later version, with a field added since, still replays."""
    fields = {"type": "title_changed", "session_id": "s1", "title": "t", "added_later": 1}
    record = msgspec.msgpack.encode(fields)
    for decode in (decode_event, decode_event_lean, decode_event_strict):
        event = decode(record)
        assert isinstance(event, TitleChanged)
        assert event.title == "t"


# -- records appended before these checks -------------------------------------------------


def test_records_appended_with_naive_times_still_replay() -> None:
    """Earlier versions appended naive times (from `events import`); old logs replay forever.

    Only the log decoders are lenient: the strict decoder (the append check) refuses them.
    """
    legacy = msgspec.msgpack.encode(
        {"type": "session_created", "session_id": "s1", "agent_id": "a", "user_id": "u",
         "created_at": NAIVE, "recorded_at": NAIVE}
    )  # fmt: skip
    stored = decode_event(legacy)
    assert isinstance(stored, SessionCreated)
    assert (stored.created_at, stored.recorded_at) == (NAIVE, NAIVE)
    lean = decode_event_lean(legacy)
    assert isinstance(lean, SessionCreated)
    assert lean.created_at == NAIVE
    with pytest.raises(msgspec.ValidationError, match="timezone"):
        decode_event_strict(legacy)


def test_records_appended_before_the_size_limits_still_replay() -> None:
    legacy = msgspec.msgpack.encode(
        {"type": "offset_reset", "session_id": "s1", "consumer": "client", "offset": 4,
         "event_id": "e" * 100, "actor": "a" * 300, "reason": "r" * 2000}
    )  # fmt: skip
    stored = decode_event(legacy)
    assert isinstance(stored, OffsetReset)
    assert (stored.event_id, stored.actor, stored.reason) == ("e" * 100, "a" * 300, "r" * 2000)
    lean = decode_event_lean(legacy)
    assert isinstance(lean, OffsetReset)
    assert (lean.consumer, lean.offset) == ("client", 4)
    with pytest.raises(msgspec.ValidationError, match="event_id"):
        decode_event_strict(legacy)
