"""Hypothesis strategies for the fuzz tests: arbitrary bytes and JSON, and near-valid inputs
(flux0 events, tracker events, request bodies) with one field mutated, whose fate the
documented contract decides (:func:`expected_ids`), not the code under test."""

from __future__ import annotations

import json
import re
from datetime import UTC, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

from hypothesis import strategies as st

from consumers.messages import StreamRecord

EVENT: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "flux0" / "event-schema.json").read_text()
)["EventDTO"]["example"]
"""flux0's own example ``EventDTO``."""

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
CONSUMER = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_OFFSET = 2**63 - 1

ids = st.from_regex(r"\A[A-Za-z0-9_-]{1,12}\Z")
consumers = st.from_regex(r"\A[A-Za-z0-9_.-]{1,12}\Z")
offsets = st.integers(0, MAX_OFFSET)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
"""Arbitrary JSON values (the standard's: no NaN, no infinities)."""


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


odd_json = (
    json_values.map(dumps)
    | st.recursive(  # Python's own extensions: NaN, Infinity, huge numbers
        st.floats() | st.integers(min_value=2**63 - 2) | scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
        max_leaves=6,
    ).map(dumps)
    | st.sampled_from([b"{", b"[]", b"{}", b"null", b"1e999", b'{"offset": 1e999}',
                       b'{"offset": 1, "x": 1e999}', b'{"offset": 1, "x": "\\ud800"}',
                       b'{"offset": -0}', b'{"offset": 0.0}', b'\xef\xbb\xbf{"offset": 1}'])
)  # fmt: skip
"""JSON-ish bytes: arbitrary JSON, non-standard numbers, and hand-picked edge cases."""

bad_offsets = (
    st.integers(max_value=-1)
    | st.integers(min_value=MAX_OFFSET + 1)
    | st.floats()
    | st.text(max_size=5)
    | st.booleans()
    | st.none()
    | st.lists(st.integers(0, 5), max_size=2)
)


@st.composite
def flux0_events(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """A flux0 ``EventDTO`` with fields mutated; and whether its offset is valid."""
    event = dict(EVENT)
    for name in draw(st.lists(st.sampled_from(sorted(EVENT)), max_size=3, unique=True)):
        if draw(st.booleans()):
            del event[name]
        else:
            event[name] = draw(json_values)
    event.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=2)))
    valid = draw(st.booleans())
    if valid:
        event["offset"] = draw(offsets)
    elif draw(st.booleans()):
        event.pop("offset", None)
    else:
        event["offset"] = draw(bad_offsets)
    return event, valid


session_texts = ids | st.text(max_size=70) | st.just("")
id_keys = ids.map(str.encode)
session_fields = st.none() | session_texts | json_values


@st.composite
def near_valid_messages(draw: st.DrawFn) -> StreamRecord:
    """A flux0 event as a stream message: key, ``session_id`` header and field each
    present or not, valid or not."""
    event, _ = draw(flux0_events())
    if draw(st.booleans()):
        event["session_id"] = draw(session_fields)
    key = draw(
        st.one_of(id_keys, id_keys, st.none(), session_texts.map(str.encode), st.binary(max_size=8))
    )
    headers = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["session_id", "trace", "session_id "]) | st.text(max_size=8),
                session_texts.map(str.encode) | st.binary(max_size=8),
            ),
            max_size=3,
        )
    )
    return StreamRecord(key, dumps(event), headers)


def _session_id(raw: bytes) -> str | None:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    return text if ID.fullmatch(text) else None


def expected_ids(record: StreamRecord) -> tuple[str, int] | None:
    """What the README promises for a message whose value is a JSON object: the session id
    is the key, else the first ``session_id`` header, else the ``session_id`` field (the
    first non-empty one decides); the offset is the event's ``offset``, an integer
    0 <= n < 2**63. ``None``: a dead letter."""
    event = json.loads(record.value)
    offset = event.get("offset")
    if type(offset) is not int or not 0 <= offset <= MAX_OFFSET:
        return None
    if record.key:
        session = _session_id(record.key)
    else:
        header = next((v for k, v in record.headers if k == "session_id"), None)
        if header:
            session = _session_id(header)
        else:
            field = event.get("session_id")
            session = field if isinstance(field, str) and ID.fullmatch(field) else None
    return None if session is None else (session, offset)


keys = st.none() | st.binary(max_size=10) | ids.map(str.encode)
header_lists = st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=10)), max_size=3)
valid_messages = st.builds(
    StreamRecord, id_keys, st.builds(lambda o: dumps({**EVENT, "offset": o}), offsets)
)
stream_records: st.SearchStrategy[StreamRecord | bytes] = st.one_of(
    valid_messages,
    near_valid_messages(),
    st.builds(StreamRecord, keys, st.binary(max_size=60), header_lists),
    st.builds(StreamRecord, keys, odd_json, header_lists),
    st.binary(max_size=60),  # a record that is not a StreamRecord at all
)
"""One record of a file stream: a message (near-valid, bytes, JSON) or raw bytes."""


# -- tracker events (``events import``) -------------------------------------------------

times = st.datetimes(timezones=st.just(UTC)).map(lambda t: t.isoformat().replace("+00:00", "Z"))
titles = st.none() | st.text(max_size=200)
zoned_times = st.builds(
    lambda t, minutes: t.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes(),
    st.integers(-1439, 1439),
)
"""Times with any zone, the edges of the calendar included (0001-01-01 east of UTC)."""
positions = st.from_regex(r"\A-?[0-9]{1,22}:-?[0-9]{1,22}:-?[0-9]{1,22}\Z")
"""Position tokens, of any size."""
valid_events = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("offset_committed"), "session_id": ids, "consumer": consumers,
         "offset": offsets}
    ),
    st.fixed_dictionaries(
        {"type": st.just("session_created"), "session_id": ids, "agent_id": ids, "user_id": ids,
         "created_at": times},
        optional={"title": titles},
    ),
    st.fixed_dictionaries({"type": st.just("title_changed"), "session_id": ids, "title": titles}),
    st.fixed_dictionaries(
        {"type": st.just("offset_reset"), "session_id": ids, "consumer": consumers,
         "offset": offsets, "actor": st.text(max_size=20)},
        optional={"reason": st.none() | st.text(max_size=50)},
    ),
    st.fixed_dictionaries({"type": st.just("session_deleted"), "session_id": ids}),
)  # fmt: skip
"""Events the README's JSON form says are valid."""

BREAKS: dict[str, Any] = {
    "type": st.sampled_from(["", "offset_commited", "SESSION_DELETED", 1, None]),
    "session_id": st.sampled_from(["", "a b", "x" * 65, 7, None, "é"]),
    "consumer": st.sampled_from(["", "a b", "c" * 65, 1.5, None]),
    "offset": bad_offsets,
    "created_at": st.sampled_from(["2025-01-25T22:41:41", "yesterday", 0, ""]),
    "title": st.sampled_from(["t" * 201, 5, ["a"]]),
    "agent_id": st.sampled_from(["", "x" * 65, "/"]),
}


@st.composite
def broken_events(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event made invalid: a field broken, a required field dropped, or an unknown
    field added (the README: unknown fields are refused)."""
    event = dict(draw(valid_events))
    how = draw(st.sampled_from(["break", "drop", "extra"]))
    breakable = [name for name in event if name in BREAKS]
    if how == "break" and breakable:
        name = draw(st.sampled_from(breakable))
        value = draw(BREAKS[name])
        if name == "title" and event["type"] != "session_created":
            value = "t" * 201  # other events' titles may be null
        event[name] = value
    elif how == "drop":
        event.pop(draw(st.sampled_from(["session_id", "type"])))
    else:
        name = draw(st.text(min_size=1, max_size=8).filter(lambda n: n not in KNOWN))
        event[name] = draw(json_values)
    return event


KNOWN = {"type", "session_id", "consumer", "offset", "agent_id", "user_id", "created_at",
         "title", "actor", "reason", "event_id", "recorded_at", "position"}  # fmt: skip


def _not_an_event(line: bytes) -> bool:
    """Arbitrary JSON or bytes, but never by chance a valid line: no ``type`` key."""
    try:
        value = json.loads(line)
    except ValueError:
        return True
    return not (isinstance(value, dict) and "type" in value)


bad_lines = st.one_of(
    broken_events().map(dumps),
    st.binary(max_size=40).filter(_not_an_event),
    odd_json.filter(_not_an_event),
).filter(lambda line: b"\n" not in line and bool(line.strip()))
"""A line ``events import`` must refuse (never blank: blank lines are skipped)."""


# -- HTTP requests ----------------------------------------------------------------------


def _header_safe(raw: bytes) -> bytes:
    """Bytes an HTTP client may send as a header value: no control characters, no
    surrounding blanks (h11 refuses the rest before anything is sent)."""
    cleaned = bytes(b if b >= 0x20 and b != 0x7F else 0x3F for b in raw)
    return cleaned.strip(b" \t")


header_values = st.binary(max_size=40).map(_header_safe)

PERCENT = ["%ED%A0%80", "%FF", "%00", "%2F", "%25", "..", ".", "%C3%A9", "a%20b", "%0A"]
path_segments = st.one_of(
    ids,
    st.text(max_size=20).map(lambda t: quote(t, safe="")),
    st.lists(st.sampled_from([*PERCENT, "s1", "x"]), min_size=1, max_size=3).map("".join),
    st.text(alphabet="abc/?#;=&", max_size=8),
)
"""A path segment: an id, quoted text, raw percent escapes (invalid UTF-8, surrogates, NUL)
and characters that end or split a path."""

create_bodies = st.fixed_dictionaries(
    {},
    optional={
        "agent_id": ids | json_values,
        "user_id": ids | json_values,
        "id": ids | json_values,
        "title": titles | json_values,
        "extra": json_values,
    },
).map(dumps)
patch_bodies = st.fixed_dictionaries(
    {},
    optional={
        "title": titles | json_values,
        "consumption_offsets": json_values
        | st.dictionaries(consumers | st.text(max_size=5), offsets | bad_offsets, max_size=3),
        "extra": json_values,
    },
).map(dumps)  # fmt: skip
reset_bodies = st.fixed_dictionaries(
    {},
    optional={
        "reason": st.text(max_size=20) | json_values,
        "to_offset": offsets | bad_offsets,
        "shift_by": st.integers() | json_values,
        "to_time": times | zoned_times | st.text(max_size=30) | json_values,
        "execute": st.booleans() | json_values,
    },
).map(dumps)
bodies = st.one_of(
    create_bodies, patch_bodies, reset_bodies, odd_json, st.binary(max_size=80), st.just(b"")
)
QUERY_KEYS = ["consumers", "min_position", "as_of", "user_id", "agent_id", "limit", "cursor"]
queries = st.lists(
    st.tuples(
        st.sampled_from(QUERY_KEYS) | st.text(max_size=5),
        st.text(max_size=20) | positions | zoned_times | st.integers().map(str),
    ),
    max_size=3,
)


# -- ``streams append`` input lines -------------------------------------------------------

stream_lines = st.builds(
    lambda session, offset: dumps({**EVENT, "offset": offset, "session_id": session}), ids, offsets
)
"""A flux0 event with its ``session_id``: what ``streams append`` takes."""


@st.composite
def bad_stream_lines(draw: st.DrawFn) -> bytes:
    """A line ``streams append`` must refuse: a flux0 event whose offset or session id is
    wrong or missing, or JSON and bytes that are no such event."""
    event, valid = draw(flux0_events())
    session = draw(st.none() | session_fields)
    if session is not None:
        event["session_id"] = session
    else:
        event.pop("session_id", None)
    if valid and isinstance(session, str) and ID.fullmatch(session):
        event["offset"] = -1  # one of the two must be wrong
    return dumps(event)


def _no_event_fields(line: bytes) -> bool:
    try:
        value = json.loads(line)
    except ValueError:
        return True
    return not (isinstance(value, dict) and "offset" in value and "session_id" in value)


bad_input_lines = st.one_of(
    bad_stream_lines(),
    st.binary(max_size=40).filter(_no_event_fields),
    odd_json.filter(_no_event_fields),
).filter(lambda line: b"\n" not in line and bool(line.strip()))
