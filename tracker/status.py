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


def batches_behind(log: LogBackend, store: SnapshotStore) -> dict[int, int]:
    """Per partition, how many batches (file frames, Kafka records) the checkpoint is behind.

    Cheap (the log's end and a checkpoint per partition, no counting of events), for a
    report that a long-running projector prints often; ``tracker status`` counts events.
    """
    behind: dict[int, int] = {}
    for partition in range(log.partitions):
        end = log.end(partition)
        applied = store.applied(partition)
        if end is None or (applied is not None and applied >= end):
            behind[partition] = 0
        elif applied is None:
            behind[partition] = end.offset + 1
        else:
            behind[partition] = max(end.offset - applied.offset, 1)
    return behind


def describe_lag(behind: dict[int, int]) -> str:
    """One line for a periodic log: caught up, or the partitions that lag and by how much."""
    lagging = [f"p{p}={n}" for p, n in sorted(behind.items()) if n]
    if not lagging:
        return "caught up on every partition"
    return f"behind by {sum(behind.values())} batches ({', '.join(lagging)})"
