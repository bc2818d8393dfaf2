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
