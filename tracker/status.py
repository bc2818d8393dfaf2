"""Where the projection stands: per partition, the log's end, what is applied, the lag."""

from __future__ import annotations

from msgspec import Struct

from tracker.logs import LogBackend
from tracker.snapshots import SnapshotStore


class PartitionStatus(Struct, frozen=True):
    """``end`` and ``applied`` are position tokens (``partition:offset:index``) or ``None``."""

    partition: int
    end: str | None
    applied: str | None
    lag: int
    """Events in the log after ``applied``."""


class Status(Struct, frozen=True):
    generation: int
    partitions: list[PartitionStatus]

    @property
    def lag(self) -> int:
        return sum(p.lag for p in self.partitions)


def partition_status(log: LogBackend, store: SnapshotStore, partition: int) -> PartitionStatus:
    applied = store.applied(partition)
    end = log.end(partition)
    return PartitionStatus(
        partition,
        end.token() if end is not None else None,
        applied.token() if applied is not None else None,
        log.count(partition, applied),
    )


def unprojected(log: LogBackend, partition: int) -> PartitionStatus:
    """A partition of which nothing is applied (Redis holds no projection yet)."""
    end = log.end(partition)
    return PartitionStatus(partition, end.token() if end else None, None, log.count(partition))


def status(log: LogBackend, store: SnapshotStore) -> Status:
    """The status of every partition of ``log`` in ``store``'s generation."""
    return Status(
        store.keys.generation,
        [partition_status(log, store, p) for p in range(log.partitions)],
    )


def describe_lag(partitions: list[PartitionStatus]) -> str:
    """One line for a periodic log: the total lag and the partitions that have any."""
    behind = [f"p{p.partition}={p.lag}" for p in partitions if p.lag]
    total = sum(p.lag for p in partitions)
    return f"lag {total} events" + (f" ({', '.join(behind)})" if behind else "")
