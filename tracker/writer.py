"""Commands' write side: validate, build events, append them, return what was appended.

A writer never assumes it is the only one: it neither reads Redis nor uses "the end of
the log before my append" for anything; the log tells it where its records went. It is
safe from any number of threads (the log serialises appends).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import msgspec
from msgspec import structs

from tracker.errors import InvalidInputError, PartialAppendError, TrackerError
from tracker.events import (
    AnyEvent,
    Event,
    OffsetCommitted,
    describe_validation_error,
    encode_event,
    encode_validated,
    new_event_ids,
    utcnow,
)
from tracker.keys import partition_for
from tracker.logs import Appended, LogBackend
from tracker.model import ConsumerName, Offset, SessionId, checked

Commit = tuple[str, str, int]

STREAM_CHUNK = 16_384
"""Events validated and encoded at a time by a streamed append (bounds its memory)."""


class Writer:
    """Appends events to the log; every method returns one :class:`Appended` per partition."""

    def __init__(self, log: LogBackend) -> None:
        self.log = log

    def partition(self, session_id: str) -> int:
        return partition_for(session_id, self.log.partitions)

    def append(
        self, events: Sequence[AnyEvent], *, records: list[bytes] | None = None, what: str = "item"
    ) -> list[Appended]:
        """Validate (unless ``records`` are given, already encoded and checked) and append."""
        if records is None:
            records = encode_validated(events, what=what)
        if not records:
            return []
        if self.log.partitions == 1:
            return [self.log.append(0, records)]
        groups: dict[int, list[bytes]] = {}
        for event, record in zip(events, records, strict=True):
            groups.setdefault(self.partition(event.session_id), []).append(record)
        return self._append_groups(groups)

    def _append_groups(self, groups: dict[int, list[bytes]]) -> list[Appended]:
        """One append per partition; if one fails after others, say which were written.

        There is no transaction across partitions. Every event can be applied twice in a
        row without changing the result (offsets are max-registers, a second create or
        delete changes nothing, a reset or title sets the same value), so the remedy for
        a partial append is to append the whole batch again.
        """
        done: list[Appended] = []
        for partition, group in groups.items():
            try:
                done.append(self.log.append(partition, group))
            except TrackerError as error:
                if not done:
                    raise
                raise PartialAppendError(
                    f"appended to partition(s) {', '.join(str(a.partition) for a in done)} "
                    f"but not to {partition}: {error}; append the whole batch again (safe: "
                    "applying an event twice in a row changes nothing)",
                    [a.last for a in done if a.last is not None],
                ) from error
        return done

    def commit_many(self, commits: Iterable[Commit]) -> tuple[list[Commit], list[Appended]]:
        """Append ``(session_id, consumer, offset)`` commits; validated as a whole first."""
        items = validate_commits(commits)
        return items, self.append_commits(items)

    def append_commits(self, items: list[Commit]) -> list[Appended]:
        """Append commits that :func:`validate_commits` accepted."""
        ids = new_event_ids(len(items))
        now = utcnow()
        events: list[AnyEvent] = [
            OffsetCommitted(
                session_id=sid, consumer=consumer, offset=offset, event_id=eid, recorded_at=now
            )
            for (sid, consumer, offset), eid in zip(items, ids, strict=True)
        ]
        return self.append(events, records=list(map(encode_event, events)))

    def import_events(self, events: Iterable[object]) -> list[Appended]:
        """Append events as given (another log's export), all or nothing, in bounded memory.

        Missing ``event_id``/``recorded_at`` are filled in; a ``position`` is dropped, since
        the events get new positions in this log. A bad event (or an error of the iterator,
        such as a bad line of a file) rejects the whole import: nothing is appended.
        """
        if self.log.partitions != 1:
            prepared = list(self._prepared(events))
            return self.append(prepared, what="event")
        return [self.log.append_stream(0, self._encoded(events))]

    def _prepared(self, events: Iterable[object]) -> Iterator[AnyEvent]:
        now = utcnow()
        try:
            iterator = iter(events)
        except TypeError:
            raise InvalidInputError(
                f"events: expected an iterable of events, got {type(events).__name__}"
            ) from None
        for number, event in enumerate(iterator, start=1):
            if not isinstance(event, Event):
                raise InvalidInputError(
                    f"event {number}: expected an event (SessionCreated, ...), "
                    f"got {type(event).__name__}"
                )
            yield structs.replace(  # type: ignore[misc]
                event,
                event_id=event.event_id or new_event_ids(1)[0],
                recorded_at=event.recorded_at or now,
                position=None,
            )

    def _encoded(self, events: Iterable[object]) -> Iterator[list[bytes]]:
        chunk: list[AnyEvent] = []
        done = 0
        for event in self._prepared(events):
            chunk.append(event)
            if len(chunk) == STREAM_CHUNK:
                yield self._encode_chunk(chunk, done)
                done += len(chunk)
                chunk = []
        if chunk:
            yield self._encode_chunk(chunk, done)

    @staticmethod
    def _encode_chunk(chunk: list[AnyEvent], done: int) -> list[bytes]:
        try:
            return encode_validated(chunk, what="event")
        except InvalidInputError as error:
            message = str(error)
            if message.startswith("event "):
                number, _, rest = message[len("event ") :].partition(": ")
                if number.isdigit():
                    raise InvalidInputError(f"event {done + int(number)}: {rest}") from None
            raise InvalidInputError(f"event {done + 1}: {message}") from None


def validate_commits(commits: Iterable[Commit]) -> list[Commit]:
    """Check ``(session_id, consumer, offset)`` items against the model, each distinct value once.

    Thousands of commits share a few sessions and consumers, so checking each distinct
    string once keeps the declared (regex) validation off the hot path. Errors name the
    first bad item by its 1-based number.
    """
    try:
        items = list(commits)
    except TypeError:
        raise InvalidInputError(
            f"commits: expected an iterable of (session_id, consumer, offset), "
            f"got {type(commits).__name__}"
        ) from None
    try:
        columns = list(zip(*items, strict=True)) if items else [(), (), ()]
    except (TypeError, ValueError):
        columns = []
    if len(columns) != 3:
        _reject_shape(items)
        raise InvalidInputError("commits: expected (session_id, consumer, offset) items")
    for column, kind, field in zip(
        columns, (SessionId, ConsumerName), ("session_id", "consumer"), strict=False
    ):
        known = _VALID[field]
        try:
            distinct = [value for value in dict.fromkeys(column) if value not in known]
        except TypeError:  # an unhashable value
            distinct = list(column)
        try:
            msgspec.convert(distinct, list[kind])  # type: ignore[valid-type]
            _remember(known, distinct)
        except msgspec.ValidationError as exc:
            _reject_shape(items)
            index, _ = describe_validation_error(exc)
            value = distinct[index or 0]
            try:
                checked(value, kind, field)
            except InvalidInputError as error:
                raise InvalidInputError(f"commit {column.index(value) + 1}: {error}") from None
    try:
        msgspec.convert(columns[2], list[Offset])
    except msgspec.ValidationError as exc:
        _reject_shape(items)
        index, message = describe_validation_error(exc)
        number = 1 if index is None else index + 1
        raise InvalidInputError(
            f"commit {number}: offset: {message.split(': ', 1)[-1]} "
            f"(got {columns[2][number - 1]!r})"
        ) from None
    return items


_VALID: dict[str, dict[str, None]] = {"session_id": {}, "consumer": {}}
"""Strings that passed validation lately, per field: a worker commits the same sessions
call after call, and their regex check was most of ``validate_commits``' time."""
VALID_REMEMBERED = 100_000


def _remember(known: dict[str, None], values: list[str]) -> None:
    if len(known) + len(values) > VALID_REMEMBERED:
        for stale in list(known)[: len(known) // 2]:  # the oldest half
            known.pop(stale, None)
    known.update(dict.fromkeys(value for value in values if type(value) is str))


def _reject_shape(items: list[Commit]) -> None:
    """Raise for the first item that is not a 3-tuple (or list); only on the error path."""
    for number, item in enumerate(items, start=1):
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise InvalidInputError(
                f"commit {number}: expected (session_id, consumer, offset), got {item!r}"
            )
