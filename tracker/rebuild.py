"""Rebuild and check the projection: ``replay`` into a new generation, ``verify`` against the log.

``replay`` runs while other processes read and write. It projects the whole log into a
new generation that nobody reads yet, then, holding the log's append lock so that no
event can slip in between, applies the last few events and promotes the generation.
Other processes rebind by themselves (see ``generations.py``); the old generation is
retired (its checkpoints poisoned) before its keys are dropped.
"""

from __future__ import annotations

import time

from msgspec import Struct

from tracker.errors import GenerationRetiredError, SnapshotStoreError
from tracker.events import Position, decode_event_lean
from tracker.fold import SessionState, fold_all, visible
from tracker.generations import Generations
from tracker.keys import partition_for
from tracker.logs import LogBackend
from tracker.projector import Progress, Projector
from tracker.snapshots import SnapshotStore, parse_partial


class ReplayReport(Struct, frozen=True):
    events: int
    sessions: int
    seconds: float
    redis_calls: int
    generation: int
    """The generation active afterwards."""
    superseded: bool = False
    """A replay that ran at the same time promoted a newer generation; this one's was retired."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Difference(Struct, frozen=True):
    session_id: str
    problem: str


class VerifyReport(Struct, frozen=True):
    events: int
    sessions: int
    differences: list[Difference]
    seconds: float


def foreign_projection(generations: Generations, log: LogBackend) -> str | None:
    """Why the projection under this prefix is not this log's, or ``None`` if it is."""
    meta = generations.read()
    if meta is None or (meta.log_id == log.log_id and meta.partitions == log.partitions):
        return None
    return (
        f"Redis prefix {generations.prefix!r} holds the projection of another log "
        f"(log {meta.log_id}, {meta.partitions} partitions; this one is {log.log_id})"
    )


def replay(
    log: LogBackend,
    generations: Generations,
    *,
    progress: Progress | None = None,
    force: bool = False,
) -> ReplayReport:
    """Rebuild the projection from the start of the log in a new generation, then promote it.

    Refuses to replace another log's projection unless ``force``.
    """
    foreign = foreign_projection(generations, log)
    if foreign is not None and not force:
        raise SnapshotStoreError(
            f"{foreign}; replaying would replace it. Use another --prefix for this log, "
            "or pass --force to replace it"
        )
    started = time.perf_counter()
    store = generations.begin(log.partitions)
    projector = Projector(log, store)
    try:
        events = projector.catch_up(progress)
        with log.appends_held():
            events += projector.catch_up(progress)
            promoted = generations.promote(store, log.log_id, force=force)
    except GenerationRetiredError:
        promoted = False  # a newer replay promoted its generation and retired this one
        events = 0
    finally:
        store.close()
    seconds = time.perf_counter() - started
    generations.refresh()  # superseded: bind to the generation that won
    generations.retire_older()
    active = generations.store
    return ReplayReport(
        events, active.count(), seconds, store.calls, active.keys.generation, not promoted
    )


def verify(
    log: LogBackend, store: SnapshotStore, progress: Progress | None = None, *, rounds: int = 8
) -> VerifyReport:
    """Fold the log in memory up to the applied checkpoint; compare every session with Redis.

    Writers may be projecting while it runs, so a snapshot can be ahead of the checkpoint
    read before it. The sessions that differ are read again, with the fold carried on to
    the checkpoint read just before: a real difference stays, one that a concurrent merge
    caused goes away.
    """
    started = time.perf_counter()
    folder = _LogFolder(log, progress)
    for partition in range(log.partitions):
        folder.advance(partition, store.applied(partition))
    expected = visible(folder.states)
    actual = {state.session_id: state for state in store.scan()}
    suspects = _differing(expected, actual, sorted(expected.keys() | actual.keys()))
    for _ in range(rounds):
        if not suspects:
            break
        suspects = _recheck(folder, store, [sid for sid, _ in suspects])
    differences = [Difference(sid, problem) for sid, problem in suspects]
    return VerifyReport(
        folder.events, len(visible(folder.states)), differences, time.perf_counter() - started
    )


def _recheck(folder: _LogFolder, store: SnapshotStore, ids: list[str]) -> list[tuple[str, str]]:
    """Compare ``ids`` again, each partition's snapshots read atomically with its checkpoint."""
    partitions = folder.log.partitions
    by_partition: dict[int, list[str]] = {}
    for sid in ids:
        by_partition.setdefault(partition_for(sid, partitions), []).append(sid)
    still: list[tuple[str, str]] = []
    for partition, sids in by_partition.items():
        for start in range(0, len(sids), 1000):
            chunk = sids[start : start + 1000]
            token, states = store.get_with_checkpoint(partition, chunk)
            if parse_partial(token) is not None:  # mid-batch: try again next round
                still.extend((sid, "changing") for sid in chunk)
                continue
            folder.advance(partition, Position.parse(token) if token else None)
            expected = visible({sid: folder.states[sid] for sid in chunk if sid in folder.states})
            actual = {sid: state for sid, state in zip(chunk, states, strict=True) if state}
            still.extend(_differing(expected, actual, chunk))
    return still


def _differing(
    expected: dict[str, SessionState], actual: dict[str, SessionState], ids: list[str]
) -> list[tuple[str, str]]:
    return [
        (sid, problem)
        for sid in ids
        if (problem := describe_difference(expected.get(sid), actual.get(sid)))
    ]


class _LogFolder:
    """The fold of each partition of the log, carried forward to a position on demand."""

    def __init__(self, log: LogBackend, progress: Progress | None) -> None:
        self.log = log
        self.progress = progress
        self.states: dict[str, SessionState] = {}
        self.events = 0
        self._done: dict[int, Position] = {}

    def advance(self, partition: int, upto: Position | None) -> None:
        after = self._done.get(partition)
        if upto is None or (after is not None and after >= upto):
            return
        while batches := self.log.read(partition, after, 100_000):
            for batch in batches:
                records = batch.records
                if batch.last > upto:  # past the checkpoint: keep what was applied
                    keep = upto.index - batch.first_index + 1
                    records = records[:keep] if batch.offset == upto.offset else []
                fold_all(map(decode_event_lean, records), self.states)
                self.events += len(records)
                if self.progress is not None:
                    self.progress(len(records))
            after = min(batches[-1].last, upto)
            if after >= upto:
                break
        if after is not None:
            self._done[partition] = after


def describe_difference(expected: SessionState | None, actual: SessionState | None) -> str | None:
    """What differs between the fold's state and the snapshot, in words; ``None`` if equal."""
    if expected == actual:
        return None
    if actual is None:
        return "missing from Redis"
    if expected is None:
        return "in Redis but not in the log"
    if expected.deleted != actual.deleted:
        return (
            "deleted in the log but not in Redis"
            if expected.deleted
            else "deleted in Redis but not in the log"
        )
    problems = []
    for name in ("agent_id", "user_id", "created_at", "title"):
        want, have = getattr(expected, name), getattr(actual, name)
        if want != have:
            problems.append(f"{name} {have!r} in Redis, {want!r} in the log")
    for consumer in sorted(expected.offsets.keys() | actual.offsets.keys()):
        want_offset, have_offset = expected.offsets.get(consumer), actual.offsets.get(consumer)
        if want_offset != have_offset:
            problems.append(
                f"offset of {consumer} {have_offset} in Redis, {want_offset} in the log"
            )
    return "; ".join(problems) or "differs"
