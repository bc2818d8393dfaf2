"""The log protocol: append batches of records to a partition, read them back in order.

A :class:`Batch` is what one append wrote to one place: a file-log frame or (with Kafka)
one record carrying many events. A record's :class:`~tracker.events.Position` is
``(partition, batch offset, index inside the batch)``, so both backends share one
position scheme. :func:`open_log` picks the backend from the settings.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Protocol

from msgspec import Struct, structs

from tracker.events import AnyEvent, Position, decode_event

if TYPE_CHECKING:
    from tracker.settings import Settings


class Batch(Struct, frozen=True, gc=False):
    """A run of records from one appended batch; ``first_index`` > 0 when read from its middle."""

    partition: int
    offset: int
    first_index: int
    records: list[bytes]

    @property
    def first(self) -> Position:
        return Position(self.partition, self.offset, self.first_index)

    @property
    def last(self) -> Position:
        return Position(self.partition, self.offset, self.first_index + len(self.records) - 1)

    def positions(self) -> list[Position]:
        return [
            Position(self.partition, self.offset, self.first_index + i)
            for i in range(len(self.records))
        ]


class Appended(Struct, frozen=True):
    """What one append wrote to one partition, all or nothing.

    ``after`` is the record just before the first one appended (``None``: the start of
    the log) when ``after_known``: the file log knows it exactly, under its lock. A
    projector may then fence on it; where it is unknown (other producers append between
    any two calls) the projector reads the log from its checkpoint instead.
    ``batches`` holds the records as written, except for streamed appends.
    """

    partition: int
    count: int
    last: Position | None
    after: Position | None = None
    after_known: bool = False
    batches: list[Batch] = []


class LogBackend(Protocol):
    """What the tracker needs from a log; ``FileLog`` and ``KafkaLog`` provide it.

    Every method is safe to call from several threads and several processes at once.
    """

    @property
    def log_id(self) -> str:
        """A stable identity, so Redis can tell which log it holds a projection of."""
        ...

    @property
    def partitions(self) -> int: ...

    def append(self, partition: int, records: Sequence[bytes]) -> Appended:
        """Durably append records in order, all or nothing."""
        ...

    def append_stream(self, partition: int, chunks: Iterable[Sequence[bytes]]) -> Appended:
        """Append every record of ``chunks`` as one all-or-nothing append, in bounded memory.

        If the iterator raises (bad input, Ctrl-C) or the write fails, nothing is appended.
        """
        ...

    def appends_held(self) -> AbstractContextManager[object]:
        """Keep every process from appending until the block ends, where the log can
        (``replay`` promotes a generation in one); with Kafka, nothing can: a no-op."""
        ...

    def read(self, partition: int, after: Position | None, max_records: int) -> list[Batch]:
        """Up to about ``max_records`` records after ``after`` (``None``: from the start)."""
        ...

    def end(self, partition: int) -> Position | None:
        """The position of the last record, or ``None`` for an empty partition."""
        ...

    def count(self, partition: int, after: Position | None = None) -> int:
        """How many records follow ``after``: for progress bars."""
        ...

    def close(self) -> None: ...


def events_of(log: LogBackend) -> Iterator[AnyEvent]:
    """Every event of ``log`` in log order, each with its ``position``; reads only the log."""
    for partition in range(log.partitions):
        after: Position | None = None
        while batches := log.read(partition, after, 10_000):
            for batch in batches:
                for position, record in zip(batch.positions(), batch.records, strict=True):
                    yield structs.replace(decode_event(record), position=position)
            after = batches[-1].last


def open_log(settings: Settings, *, create: bool = True) -> LogBackend:
    """The event log the settings ask for: Kafka when a bootstrap is set, else the file log.

    With ``create=False`` a log that does not exist yet is refused
    (:class:`~tracker.errors.LogNotFoundError`), so a mistyped data dir is not taken for
    an empty log. The Kafka log's topic must have ``settings.partitions`` partitions.
    """
    if settings.kafka_bootstrap:
        from tracker.logs.kafka import KafkaLog

        return KafkaLog(
            settings.kafka_bootstrap,
            settings.event_topic,
            partitions=settings.partitions,
            create=create,
            timeout=settings.kafka_timeout,
        )
    from tracker.logs.file import FileLog

    return FileLog(
        settings.data_dir / "log",
        fsync=settings.fsync,
        create=create,
        lock_timeout=settings.lock_timeout,
    )
