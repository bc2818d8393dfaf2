"""A session's past, read from the log: its events, and its state at a position or a time.

Redis holds only the present. The log holds every event with its position and the time
it was recorded, so any earlier state is the same pure fold (:func:`tracker.fold.fold`)
that the projection is checked against, stopped early. Nothing here touches Redis.

A session's events all sit in one partition (the log is keyed by session id), so only
that partition is read. It is still a scan of the partition: fine for an operator or an
audit, not for a hot path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import msgspec
from msgspec import Struct, structs

from tracker.errors import InvalidInputError
from tracker.events import AnyEvent, Position, decode_event
from tracker.fold import SessionState, as_utc, fold
from tracker.keys import partition_for
from tracker.logs import LogBackend
from tracker.model import SessionDTO

AsOf = datetime | Position
"""A point in a session's past: a time (with a zone) or a log position."""

READ_RECORDS = 10_000
"""Records per read of the log while scanning a partition."""

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_POSITION = re.compile(r"([0-9]+):([0-9]+):([0-9]+)")
_SHOWN_CHARS = 100


class HistoryEntry(Struct, frozen=True):
    """One event of a session: where it sits in the log, when it was recorded, what it says.

    ``event`` is the event as ``tracker events export`` writes it (a JSON object).
    """

    position: str
    recorded_at: datetime
    event: dict[str, Any]


def _shown(text: str) -> str:
    """The user's text for a one-line error: quoted, escaped, and bounded."""
    if len(text) > _SHOWN_CHARS:
        return repr(text[:_SHOWN_CHARS]) + "..."
    return repr(text)


def parse_position(text: str, what: str) -> Position:
    """A position token ``PARTITION:OFFSET:INDEX`` (ASCII digits only); errors name ``what``."""
    match = _POSITION.fullmatch(text)
    if match is None:
        raise InvalidInputError(
            f"{what}: expected a position PARTITION:OFFSET:INDEX, got {_shown(text)}"
        )
    partition, offset, index = (int(part) for part in match.groups())
    return Position(partition, offset, index)


def parse_as_of(text: str) -> AsOf:
    """``as_of`` as given by a user: an ISO 8601 time with a zone, or a position token.

    A time without a zone is refused rather than guessed (as the model refuses one).
    """
    if _POSITION.fullmatch(text):
        return parse_position(text, "as_of")
    expected = (
        "as_of: expected an ISO 8601 time with a zone or a position "
        f"PARTITION:OFFSET:INDEX, got {_shown(text)}"
    )
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(expected) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInputError(f"{expected}: it has no time zone (add Z for UTC)")
    return value


def check_position(position: Position, partitions: int, what: str) -> None:
    """Refuse a position in a partition the log does not have."""
    if not 0 <= position.partition < partitions:
        has = "only partition 0" if partitions == 1 else f"partitions 0..{partitions - 1}"
        raise InvalidInputError(
            f"{what}: {position.token()} names partition {position.partition}, "
            f"but the log has {has}"
        )


def check_as_of(as_of: AsOf, session_id: str, partitions: int) -> None:
    """Refuse a naive time, and a position outside the session's partition.

    Positions of different partitions are not ordered against each other, so a position
    says nothing about a session whose events are in another partition.
    """
    if isinstance(as_of, Position):
        check_position(as_of, partitions, "as_of")
        partition = partition_for(session_id, partitions)
        if as_of.partition != partition:
            raise InvalidInputError(
                f"as_of: position {as_of.token()} is in partition {as_of.partition}, but the "
                f"events of session {session_id} are in partition {partition}"
            )
    elif as_of.tzinfo is None or as_of.utcoffset() is None:
        raise InvalidInputError(f"as_of: {as_of.isoformat()} has no time zone")


# -- reading the log -------------------------------------------------------------------


def session_events(
    log: LogBackend, session_id: str, upto: Position | None = None
) -> Iterator[AnyEvent]:
    """The session's events in log order, each with its ``position``; up to ``upto`` if given.

    Reads only the session's partition. A record that does not hold the id's bytes cannot
    be one of its events (msgpack stores strings as they are), so only the others are
    decoded and checked.
    """
    partition = partition_for(session_id, log.partitions)
    needle = session_id.encode()
    after: Position | None = None
    while batches := log.read(partition, after, READ_RECORDS):
        for batch in batches:
            for position, record in zip(batch.positions(), batch.records, strict=True):
                if upto is not None and position > upto:
                    return
                if needle not in record:
                    continue
                event = decode_event(record)
                if event.session_id == session_id:
                    yield structs.replace(event, position=position)
        after = batches[-1].last


# -- the pure parts --------------------------------------------------------------------


def timed(events: Iterable[AnyEvent]) -> Iterator[tuple[AnyEvent, datetime]]:
    """Each event with the time it was recorded, in UTC.

    Every event appended by the tracker carries that time. An event imported by an early
    version may not: it was appended after the session's event before it, so it is given
    that one's time (the epoch if it is the session's first).
    """
    previous = EPOCH
    for event in events:
        recorded = event.recorded_at
        previous = as_utc(recorded) if recorded is not None else previous
        yield event, previous


def state_as_of(events: Iterable[AnyEvent], as_of: AsOf) -> SessionState | None:
    """Fold one session's events (in log order, with positions) as they stood at ``as_of``.

    A position takes the events up to and including it; a time takes the events recorded
    at or before it, in log order (imports can append events recorded earlier than the
    ones before them, so the scan does not stop at the first later one). ``None``: the
    session had no event yet.
    """
    state: SessionState | None = None
    for event, recorded_at in timed(events):
        if isinstance(as_of, Position):
            if event.position is not None and event.position > as_of:
                break
        elif recorded_at > as_of:
            continue
        state = fold(state, event)
    return state


def session_as_of(events: Iterable[AnyEvent], as_of: AsOf) -> SessionDTO | None:
    """The session as it was at ``as_of``; ``None`` if it was not created yet, or deleted."""
    state = state_as_of(events, as_of)
    return state.to_dto() if state is not None else None


def history_entries(events: Iterable[AnyEvent]) -> list[HistoryEntry]:
    """Entries for one session's events (read back from the log, so with positions)."""
    entries = []
    for event, recorded_at in timed(events):
        assert event.position is not None  # read back from the log
        exported: dict[str, Any] = msgspec.to_builtins(event)
        entries.append(HistoryEntry(event.position.token(), recorded_at, exported))
    return entries
