"""The projector: read the log from each partition's checkpoint, fold, merge into Redis.

Live catch-up and ``replay`` are this same loop; replay only starts it on an empty
generation. A batch is read in log order, pre-folded into one delta per session, and
merged in fenced chunks (see ``snapshots.py``). A checkpoint left between two chunks
of a batch (a crash mid-batch) names the batch, which is re-read and finished.
"""

from __future__ import annotations

from collections.abc import Callable

from tracker.errors import CheckpointConflictError, SnapshotStoreError
from tracker.events import AnyEvent, Position, decode_event, decode_event_lean
from tracker.fold import BatchFolder, Delta, fold_batch
from tracker.logs import Batch, LogBackend
from tracker.snapshots import CHUNK_SESSIONS, SnapshotStore, parse_partial

Progress = Callable[[int], None]

BATCH_RECORDS = 1_000_000
"""Records folded into one batch of deltas (read in pieces of ``READ_RECORDS``)."""
READ_RECORDS = 50_000
MAX_SESSIONS = 100_000
"""A batch also ends once it has deltas for this many sessions, to bound memory."""


def decode_batches(
    batches: list[Batch], decode: Callable[[bytes], AnyEvent] = decode_event
) -> list[AnyEvent]:
    return list(map(decode, [record for batch in batches for record in batch.records]))


def read_range(
    log: LogBackend, partition: int, after: Position | None, upto: Position
) -> list[Batch]:
    """The batches holding exactly the records after ``after`` up to ``upto``."""
    result: list[Batch] = []
    while after is None or after < upto:
        batches = log.read(partition, after, BATCH_RECORDS)
        if not batches:
            raise SnapshotStoreError(
                f"partition {partition}: the checkpoint names position {upto.token()}, "
                "which the log does not have; run `tracker replay`"
            )
        for batch in batches:
            if batch.last <= upto:
                result.append(batch)
            else:
                keep = upto.index - batch.first_index + 1 if batch.offset == upto.offset else 0
                if keep > 0:
                    result.append(
                        Batch(
                            batch.partition, batch.offset, batch.first_index, batch.records[:keep]
                        )
                    )
                return result
            after = batch.last
    return result


class Projector:
    """Applies the log to one :class:`SnapshotStore`, exactly once per record."""

    def __init__(
        self,
        log: LogBackend,
        store: SnapshotStore,
        *,
        batch_records: int = BATCH_RECORDS,
        chunk_sessions: int = CHUNK_SESSIONS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.log = log
        self.max_sessions = max_sessions
        self.store = store
        self.batch_records = batch_records
        self.chunk_sessions = chunk_sessions

    def catch_up(self, progress: Progress | None = None) -> int:
        """Apply everything up to the end of the log; returns how many records were applied."""
        return sum(self.catch_up_partition(p, progress) for p in range(self.log.partitions))

    def catch_up_partition(self, partition: int, progress: Progress | None = None) -> int:
        applied = 0
        while True:
            token = self.store.checkpoint(partition)
            partial = parse_partial(token)
            try:
                if partial is not None:
                    applied += self._finish_partial(partition, *partial)
                    continue
                after = Position.parse(token) if token else None
                deltas, read, upto = self._fold_from(partition, after, progress)
                if upto is None:
                    return applied
                self.store.merge(
                    partition,
                    list(deltas.values()),
                    after=token,
                    upto=upto.token(),
                    chunk_sessions=self.chunk_sessions,
                )
            except CheckpointConflictError:
                continue
            applied += read

    def apply_appended(
        self, partition: int, before: Position | None, folder: BatchFolder, upto: Position
    ) -> None:
        """Project what this process just appended after ``before``, without reading it back.

        ``folder`` holds the appended events, folded. The same fenced merge as
        :meth:`catch_up_partition`; if the checkpoint is not at ``before`` (another
        projector, or an earlier failure), it catches up from the log instead.
        """
        try:
            self.store.merge(
                partition,
                list(folder.finish().values()),
                after="" if before is None else before.token(),
                upto=upto.token(),
                chunk_sessions=self.chunk_sessions,
            )
        except CheckpointConflictError:
            self.catch_up_partition(partition)

    def _fold_from(
        self, partition: int, after: Position | None, progress: Progress | None
    ) -> tuple[dict[str, Delta], int, Position | None]:
        """Read and fold up to ``batch_records`` records after ``after`` into deltas.

        The log is read in pieces and only the deltas are kept, so a batch can be large
        (fewer, fuller merges) without holding its events in memory.
        """
        folder = BatchFolder()
        read = 0
        upto: Position | None = None
        while read < self.batch_records and folder.size < self.max_sessions:
            batches = self.log.read(partition, after, min(READ_RECORDS, self.batch_records - read))
            if not batches:
                break
            events = decode_batches(batches, decode_event_lean)
            folder.add(events)
            read += len(events)
            upto = after = batches[-1].last
            if progress is not None:
                progress(len(events))
        return folder.finish(), read, upto

    def _finish_partial(self, partition: int, after: str, upto: str, chunk: int, size: int) -> int:
        start = Position.parse(after) if after else None
        batches = read_range(self.log, partition, start, Position.parse(upto))
        events = decode_batches(batches, decode_event_lean)
        deltas = list(fold_batch(events).values())
        self.store.merge(
            partition, deltas, after=after, upto=upto, chunk_sessions=size, first_chunk=chunk + 1
        )
        return len(events)
