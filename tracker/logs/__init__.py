"""The log protocol: append batches of records to a partition, read them back in order.

A :class:`Batch` is what one append wrote to one place: a file-log frame or (with Kafka)
one record carrying many events. A record's :class:`~tracker.events.Position` is
``(partition, batch offset, index inside the batch)``, so both backends share one
position scheme. :func:`open_log` picks the backend from the settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from msgspec import Struct

from tracker.errors import ConfigError
from tracker.events import Position

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


class LogBackend(Protocol):
    """What the tracker needs from a log; ``FileLog`` and (later) ``KafkaLog`` provide it."""

    @property
    def log_id(self) -> str:
        """A stable identity, so Redis can tell which log it holds a projection of."""
        ...

    @property
    def partitions(self) -> int: ...

    def append(self, partition: int, records: Sequence[bytes]) -> list[Batch]:
        """Durably append records in order; return the batches as written (records included)."""
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


def open_log(settings: Settings) -> LogBackend:
    """The event log the settings ask for: Kafka when a bootstrap is set, else the file log."""
    if settings.kafka_bootstrap:
        raise ConfigError(
            "TRACKER_KAFKA_BOOTSTRAP: the Kafka event log is not available in this version; "
            "unset it to use the file log"
        )
    from tracker.logs.file import FileLog

    return FileLog(settings.data_dir / "log", fsync=settings.fsync)
