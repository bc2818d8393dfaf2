"""The projector: read the log from each partition's checkpoint, fold, merge into Redis.

Live catch-up and ``replay`` are this same loop; replay only starts it on an empty
generation. A batch is read in log order, pre-folded into one delta per session, and
merged in fenced chunks (see ``snapshots.py``). A checkpoint left between two chunks
of a batch (a crash mid-batch) names the batch, which is re-read and finished.

Any number of projectors may run, in threads or processes: the fence makes each record
count once. Within a process one lock keeps a process's own threads from racing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from tracker.errors import (
    CheckpointConflictError,
    GenerationRetiredError,
    SnapshotStoreError,
    TrackerError,
)
from tracker.events import AnyEvent, Position, decode_event, decode_event_lean
from tracker.fold import BatchFolder, Delta, fold_batch
from tracker.generations import Generations
from tracker.logs import Appended, Batch, LogBackend
from tracker.snapshots import CHUNK_SESSIONS, SnapshotStore, parse_partial

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

BATCH_RECORDS = 1_000_000
"""Records folded into one batch of deltas (read in pieces of ``READ_RECORDS``)."""
READ_RECORDS = 50_000
PROMOTION_WAIT = 5.0
"""Seconds a projector bound to a retired generation waits for the replay to promote."""
MAX_RETRY_SECONDS = 5.0
"""The longest wait of a long-running projector between attempts while Redis or the log
does not answer."""
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
    """Applies the log to a projection, exactly once per record.

    ``target`` is either a fixed :class:`SnapshotStore` (a rebuild's new generation) or
    the process's :class:`Generations`, whose active store may change under a replay
    in another process: the projector then rebinds and goes on.
    """

    def __init__(
        self,
        log: LogBackend,
        target: SnapshotStore | Generations,
        *,
        batch_records: int = BATCH_RECORDS,
        chunk_sessions: int = CHUNK_SESSIONS,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self.log = log
        self.target = target
        self.max_sessions = max_sessions
        self.batch_records = batch_records
        self.chunk_sessions = chunk_sessions
        self._mutex = threading.RLock()

    @property
    def store(self) -> SnapshotStore:
        target = self.target
        return target.store if isinstance(target, Generations) else target

    def _rebind(self, error: GenerationRetiredError) -> None:
        """Follow a replay (or a lost Redis) to the active generation.

        A replay retires the generation it replaces just before it promotes its own, so
        the active one may still be the retired one for a moment: wait for the promotion.
        If none comes (the replay died in between), rebuild the projection as a replay
        would, rather than write into a generation nobody reads.
        """
        target = self.target
        if not isinstance(target, Generations):
            raise error
        retired = self.store.keys.generation
        deadline = time.monotonic() + PROMOTION_WAIT
        while True:
            if not target.refresh():
                self.ensure_projection()
                return
            if target.store.keys.generation != retired:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "generation %d was retired and nothing replaced it (a replay died?); "
                    "rebuilding the projection from the log",
                    retired,
                )
                self.ensure_projection(replace=retired)
                return
            time.sleep(0.02)

    def ensure_projection(self, *, replace: int | None = None) -> bool:
        """If Redis holds no projection (a first start, or it lost everything), build one.

        Built as a replay builds it: into a new generation from the start of the log,
        then promoted, so no reader sees a half-built projection. True if it built one.
        ``replace`` names a retired active generation to rebuild (a replay died).
        """
        target = self.target
        if not isinstance(target, Generations):
            return False
        with self._mutex:
            if target.refresh() and (replace is None or target.store.keys.generation != replace):
                return False
            if replace is None and target.meta is not None:
                log.warning(
                    "Redis lost the projection (flushed, or restarted empty): rebuilding it "
                    "from the log"
                )
            store = target.begin(self.log.partitions)
            try:
                Projector(self.log, store, chunk_sessions=self.chunk_sessions).catch_up()
                target.promote(store, self.log.log_id)
            except GenerationRetiredError:
                # another process built one at the same time, promoted it and retired
                # this one while it was being built: bind to theirs
                target.refresh()
                return False
            finally:
                store.close()
            target.retire_older()
            return True

    def catch_up(self, progress: Progress | None = None) -> int:
        """Apply everything up to the end of the log; returns how many records were applied."""
        with self._mutex:
            self.ensure_projection()
            return sum(self._catch_up(p, progress) for p in range(self.log.partitions))

    def catch_up_partition(
        self, partition: int, progress: Progress | None = None, *, batches: int | None = None
    ) -> int:
        """Apply one partition up to its end (or ``batches`` batches); how many records."""
        with self._mutex:
            return self._catch_up(partition, progress, batches)

    def _catch_up(
        self, partition: int, progress: Progress | None = None, batches: int | None = None
    ) -> int:
        applied = 0
        merged = 0
        while batches is None or merged < batches:
            store = self.store
            try:
                token = store.checkpoint(partition)
                if not token and self._projection_lost():
                    continue
                partial = parse_partial(token)
                if partial is not None:
                    applied += self._finish_partial(store, partition, *partial)
                    continue
                after = Position.parse(token) if token else None
                deltas, read, upto = self._fold_from(partition, after, progress)
                if upto is None:
                    return applied
                store.merge(
                    partition,
                    list(deltas.values()),
                    after=token,
                    upto=upto.token(),
                    chunk_sessions=self.chunk_sessions,
                )
            except GenerationRetiredError as error:
                self._rebind(error)
                continue
            except CheckpointConflictError:
                continue
            applied += read
            merged += 1
        return applied

    def _projection_lost(self) -> bool:
        """At the start of the log: is it because Redis lost everything? Then rebuild."""
        target = self.target
        if not isinstance(target, Generations) or target.read() is not None:
            return False
        return self.ensure_projection()

    def apply_appended(self, appended: Appended, folder: BatchFolder) -> None:
        """Project what this process just appended, without reading it back if it can.

        ``folder`` holds the appended events, folded. When the log says exactly what came
        before them, one fenced merge applies them; otherwise, or if the checkpoint is not
        there (another projector, an earlier failure, a replay), it catches up from the log.
        """
        if appended.last is None:
            return
        with self._mutex:
            if appended.after_known:
                try:
                    self.store.merge(
                        appended.partition,
                        list(folder.finish().values()),
                        after="" if appended.after is None else appended.after.token(),
                        upto=appended.last.token(),
                        chunk_sessions=self.chunk_sessions,
                    )
                    return
                except GenerationRetiredError as error:
                    self._rebind(error)
                except CheckpointConflictError:
                    pass
            self._catch_up(appended.partition)

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
            wanted = min(READ_RECORDS, self.batch_records - read)
            batches = self.log.read(partition, after, wanted)
            if not batches:
                break
            events = decode_batches(batches, decode_event_lean)
            folder.add(events)
            read += len(events)
            upto = after = batches[-1].last
            if progress is not None:
                progress(len(events))
            if len(events) < wanted:
                break  # a short read reached the end: asking again would only wait
        return folder.finish(), read, upto

    def _finish_partial(
        self, store: SnapshotStore, partition: int, after: str, upto: str, chunk: int, size: int
    ) -> int:
        start = Position.parse(after) if after else None
        batches = read_range(self.log, partition, start, Position.parse(upto))
        events = decode_batches(batches, decode_event_lean)
        deltas = list(fold_batch(events).values())
        store.merge(
            partition, deltas, after=after, upto=upto, chunk_sessions=size, first_chunk=chunk + 1
        )
        return len(events)


class Tailer:
    """``tracker project``: keep applying the log as it grows, until told to stop.

    ``partitions`` says which partitions this process works on (all of them for the file
    log; a consumer group's assignment with Kafka), asked again at every round. Batches
    are bounded (``batch_records``) so that a live log is applied with little delay, and
    a crash costs at most one batch of work, which the fence makes safe to redo.

    A group can leave a partition with nobody (a member that died and is not yet timed
    out, a broker that does not rebalance): a partition that lags and whose checkpoint
    has not moved for ``takeover_seconds`` is applied by this process too. The fence
    makes that safe whoever else works on it.

    Redis restarting or the brokers stalling never ends it: it logs, backs off and goes
    on (see :meth:`run`); a Redis that came back empty is rebuilt from the log.
    """

    def __init__(
        self,
        projector: Projector,
        partitions: Callable[[], Iterable[int]],
        *,
        idle_seconds: float = 0.05,
        report: Callable[[], None] | None = None,
        report_seconds: float = 10.0,
        takeover_seconds: float = 10.0,
        retry_seconds: float = 0.2,
    ) -> None:
        self.projector = projector
        self.retry_seconds = retry_seconds
        self.partitions = partitions
        self.idle_seconds = idle_seconds
        self.report = report
        self.report_seconds = report_seconds
        self.takeover_seconds = takeover_seconds
        self.stop = threading.Event()
        self._still: dict[int, tuple[Position | None, float]] = {}

    def run(self, *, once: bool = False) -> int:
        """Apply until :attr:`stop` is set (or, with ``once``, until caught up); the count.

        ``once`` applies every partition, not only the group's share: a one-off catch-up
        should not wait for a group to assign it work (the fence keeps it safe).

        A retriable failure (Redis or the brokers not answering) is logged and retried
        with a backoff doubling from ``retry_seconds`` up to ``MAX_RETRY_SECONDS``; the
        first round that works again says so. Only ``once`` gives up, raising it.
        """
        everything = set(range(self.projector.log.partitions))
        applied = failures = 0
        now = time.monotonic()
        next_report = now + self.report_seconds
        next_watch = now + self.takeover_seconds / 4
        started = False
        while not self.stop.is_set():
            try:
                if not started:
                    self.projector.ensure_projection()
                    started = True
                mine = everything if once else set(self.partitions())
                if not once and time.monotonic() >= next_watch:
                    mine |= self._stalled(mine)
                    next_watch = time.monotonic() + self.takeover_seconds / 4
                done = sum(self.projector.catch_up_partition(p, batches=1) for p in sorted(mine))
                if self.report is not None and (once or time.monotonic() >= next_report):
                    self.report()
                    next_report = time.monotonic() + self.report_seconds
            except TrackerError as error:
                if once or not error.retriable:
                    raise
                failures += 1
                delay = min(self.retry_seconds * 2 ** (failures - 1), MAX_RETRY_SECONDS)
                log.warning("projecting failed (%s); retrying in %.1f s", error, delay)
                self.stop.wait(delay)
                continue
            if failures:
                log.warning("projecting again after %d failed attempts", failures)
                failures = 0
            applied += done
            if once and not done:
                break
            if not done:
                self.stop.wait(self.idle_seconds)
        return applied

    def _stalled(self, mine: set[int]) -> set[int]:
        """Partitions of others that lag with a checkpoint that has not moved for a while."""
        event_log, store, now = self.projector.log, self.projector.store, time.monotonic()
        stalled: set[int] = set()
        for partition in range(event_log.partitions):
            if partition in mine:
                self._still.pop(partition, None)
                continue
            try:
                applied = store.applied(partition)
            except GenerationRetiredError:
                continue
            seen, since = self._still.get(partition, (applied, now))
            if seen != applied:
                seen, since = applied, now
            self._still[partition] = (seen, since)
            if now - since < self.takeover_seconds:
                continue
            end = event_log.end(partition)
            if end is not None and (applied is None or applied < end):
                log.warning(
                    "partition %d has not moved for %.0f s; applying it here too",
                    partition,
                    now - since,
                )
                stalled.add(partition)
        return stalled


class BackgroundProjector:
    """A thread that catches the projection up after appends that did not wait for it.

    Appends only signal it; it catches up from the checkpoints, so work that piled up
    while it was busy is folded into fewer, larger merges. Errors (Redis down) are logged
    and retried: the log has every event, nothing is lost.
    """

    def __init__(self, projector: Projector, *, retry_seconds: float = 0.5) -> None:
        self.projector = projector
        self.retry_seconds = retry_seconds
        self.notified = False
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._started = threading.Lock()
        self._thread: threading.Thread | None = None

    def notify(self) -> None:
        if self._stopping.is_set():
            return
        self.notified = True
        with self._started:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="tracker-projector", daemon=True
                )
                self._thread.start()
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping.is_set():
                break
            try:
                self.projector.catch_up()
            except TrackerError as error:
                log.warning("projecting in the background failed (will retry): %s", error)
                self._wake.set()
                self._stopping.wait(self.retry_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the work in hand (not what was signalled after), then stop the thread."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
