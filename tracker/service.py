"""The ``Tracker``: a writer, a projector and a reader composed for the embedded default.

Every command validates first (nothing invalid reaches the log), appends, and, unless
told not to wait, projects its events before it returns, so its effect is visible at
once. With ``wait=False`` it returns as soon as the log has acknowledged the append and
a background thread projects. Safe to share between threads; any number of processes
may open the same data dir.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

from tracker.commands import Commands, Fold, open_only
from tracker.connection import REDIS_ERRORS, Client, check_redis, connect, unavailable
from tracker.embedded import EmbeddedRedis
from tracker.errors import (
    ClosedError,
    GenerationRetiredError,
    NotYetVisibleError,
    SessionNotFoundError,
    SnapshotStoreError,
    SnapshotUnavailableError,
    TrackerError,
)
from tracker.events import (
    AnyEvent,
    Position,
)
from tracker.fold import BatchFolder, SessionState
from tracker.generations import Generations
from tracker.history import (
    AsOf,
    HistoryEntry,
    check_as_of,
    check_position,
    history_entries,
    session_events,
)
from tracker.history import session_as_of as fold_as_of
from tracker.logs import Appended, LogBackend, events_of, open_log
from tracker.model import SessionDTO, SessionId, checked
from tracker.projector import BackgroundProjector, Progress, Projector, Tailer
from tracker.reader import Reader
from tracker.rebuild import ReplayReport, VerifyReport, foreign_projection, replay, verify
from tracker.results import AppendResult
from tracker.settings import Settings, mask_url
from tracker.snapshots import SCHEMA_VERSION, SnapshotStore
from tracker.status import Status, batches_behind, describe_lag, status, unprojected
from tracker.writer import Writer

log = logging.getLogger("tracker")

PROMOTION_TRIES = 20
"""Times an opening process checks the projection again when a newer generation replaced
the one it bound to meanwhile (others starting at once, or a replay)."""
TAIL_BATCH_RECORDS = 100_000
"""Records per batch of ``tracker project``: small enough to poll the group often."""


class Tracker(Commands):
    """Sessions and their consumption offsets, event-sourced; open with :meth:`open`.

    ``catch_up=False`` skips projecting the log at open (``replay`` and ``verify`` do
    not need it); ``create=False`` refuses a data dir that holds no log yet.
    """

    def __init__(self, settings: Settings, *, catch_up: bool = True, create: bool = True) -> None:
        self.settings = settings
        self.warnings: list[str] = []
        self._closed = False
        self._embedded: EmbeddedRedis | None = None
        self._client: Client | None = None
        self._generations: Generations | None = None
        self._background: BackgroundProjector | None = None
        self._closers: list[Callable[[], None]] = []
        self.self_projecting = settings.kafka_bootstrap is None
        """Embedded mode: this process projects what it writes. With Kafka, separate
        ``tracker project`` processes do, and commands wait for them."""
        self._foreign: str | None = None
        self._log: LogBackend = open_log(settings, create=create)
        try:
            repaired = getattr(self._log, "repaired", None)
            if repaired:
                self.warnings.append(f"event log repaired: {repaired}")
            self._client = self._connect()
            self.warnings.extend(check_redis(self._client))
            for warning in self.warnings:
                log.warning("%s", warning)
            self._generations = Generations(self._client, settings.prefix)
            self.writer = Writer(self._log)
            self.projector = Projector(self._log, self._generations)
            on_lost = self._rebuild_lost if self.self_projecting else None
            self.reader = Reader(self._generations, on_lost=on_lost)
            self._background = BackgroundProjector(self.projector)
            self._bind(catch_up=catch_up)
            if catch_up and self.self_projecting and self._foreign is None:
                self.projector.catch_up()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        data_dir: str | Path | None = None,
        redis_url: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> Tracker:
        """Open the tracker: ``None`` reads ``TRACKER_DATA_DIR`` / ``TRACKER_REDIS_URL``."""
        base = settings or Settings.from_env()
        return cls(
            base.with_overrides(
                data_dir=Path(data_dir) if data_dir is not None else None, redis_url=redis_url
            )
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish projecting what was appended without waiting, and release everything."""
        if self._closed:
            return
        self._closed = True
        for closer in self._closers:
            closer()
        if self._background is not None:
            self._background.stop()
            if self._background.notified:
                self._project_before_closing()
        if self._generations is not None:
            self._generations.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self._log.close()

    def _project_before_closing(self) -> None:
        """Make what was appended without waiting visible before the process goes."""
        try:
            self.projector.catch_up()
        except TrackerError as error:
            log.warning("closing with events not yet projected (the log has them): %s", error)

    # -- wiring ------------------------------------------------------------------------

    def _connect(self) -> Client:
        url = self.settings.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(self.settings.data_dir / "redis")
            url = self._embedded.start()
        self.redis_url = url
        """The Redis this tracker uses (the embedded server's socket if none is configured),
        for a caller that needs a client of its own, e.g. an asyncio one."""
        client: Client | None = None
        try:
            client = connect(url)  # a cluster client asks for the cluster's layout here
            client.ping()
        except REDIS_ERRORS as exc:
            if client is not None:
                client.close()
            if unavailable(exc):
                raise SnapshotUnavailableError(
                    f"cannot reach Redis at {mask_url(url)}: {exc}; is it running?"
                ) from exc
            raise SnapshotStoreError(f"Redis at {mask_url(url)} refused: {exc}") from exc
        return client

    def _bind(self, *, catch_up: bool) -> None:
        """Bind to the active generation (built first if there is none and ``catch_up``),
        and check that it is this log's projection."""
        generations = self.generations
        self._foreign = foreign_projection(generations, self._log)
        if self._foreign is not None:
            self._foreign += (
                "; use another --prefix for this data dir, or `tracker replay --force` to "
                "replace that projection with this log's"
            )
            generations.refresh()
            return
        meta = generations.read()
        if meta is not None and meta.schema != SCHEMA_VERSION:
            self._foreign = (
                f"the projection under the prefix {generations.prefix!r} was written by "
                f"another version of the tracker (schema {meta.schema}; this one writes "
                f"{SCHEMA_VERSION}): run `tracker replay` to rebuild it from the log"
            )
            return
        generations.log_id = self._log.log_id
        if not generations.refresh():
            if catch_up:
                self.projector.ensure_projection()
            return
        for _ in range(PROMOTION_TRIES):
            try:
                self._foreign = self._cut_log(generations.store)
                return
            except GenerationRetiredError:
                # processes starting together each built a projection, or a replay runs:
                # a newer generation replaced the one just bound; check that one. If none
                # comes (a replay died between retiring and promoting), there is nothing
                # to check: the projector rebuilds.
                time.sleep(0.05)
                generations.refresh()

    def _cut_log(self, store: SnapshotStore) -> str | None:
        """Why the projection is ahead of the log (the log was replaced or cut), if it is."""
        for partition in range(self._log.partitions):
            applied = store.applied(partition)
            end = self._log.end(partition)
            if applied is not None and (end is None or applied > end):
                return (
                    f"partition {partition}: Redis has applied up to {applied.token()} but the "
                    f"log ends at {end.token() if end else 'nothing'}; the log was replaced or "
                    "cut: run `tracker replay --force` to rebuild the projection from it"
                )
        return None

    def _rebuild_lost(self) -> None:
        """Redis holds no projection (it restarted empty): rebuild it from the log."""
        if self.projector.ensure_projection():
            log.warning("Redis held no projection; it was rebuilt from the log")

    @property
    def generations(self) -> Generations:
        if self._generations is None:
            raise ClosedError("the tracker is closed")
        return self._generations

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ClosedError("the tracker is closed; open a new one with Tracker.open()")
        return self._client

    @property
    def store(self) -> SnapshotStore:
        self._check_projection()
        return self.generations.store

    @property
    def projection_problem(self) -> str | None:
        """Why the projection in Redis cannot be used (another log's, or a cut one's), if so."""
        return self._foreign

    def _check_projection(self) -> None:
        """Refuse to use a projection of another log (or of a cut one) until a replay."""
        if self._foreign is not None:
            raise SnapshotStoreError(self._foreign)

    # -- the write path ----------------------------------------------------------------

    def _project(self, appended: list[Appended], fold: Fold | None, *, wait: bool) -> AppendResult:
        """After an append: project it (``wait``) or leave it to the background thread."""
        positions = [a.last for a in appended if a.last is not None]
        result = AppendResult(
            sum(a.count for a in appended), max(positions) if positions else None, positions
        )
        if not positions:
            return result
        if not self.self_projecting:
            if wait:
                for position in positions:
                    self._wait_for_projectors(position, self.settings.wait_timeout)
            return result
        if not wait:
            assert self._background is not None
            self._background.notify()
            return result
        try:
            for part in appended:
                if fold is not None and len(appended) == 1:
                    folder = BatchFolder()
                    fold(folder)
                    self.projector.apply_appended(part, folder)
                else:
                    self.projector.catch_up_partition(part.partition)
        except Exception as error:
            if not (isinstance(error, TrackerError) or self._closed):
                raise
            cause = "the tracker was closed meanwhile" if self._closed else str(error)
            raise NotYetVisibleError(
                f"appended {result.count} events (durable, last position "
                f"{max(positions).token()}) but could not project them: {cause}; do not "
                "append them again, they become visible once the projection catches up",
                positions,
            ) from error
        return result

    def _append(self, events: list[AnyEvent], *, wait: bool) -> AppendResult:
        self._check_projection()
        appended = self.writer.append(events)
        return self._project(appended, lambda folder: folder.add(events), wait=wait)

    @open_only
    def wait_for(self, position: Position, timeout: float | None = None) -> None:
        """Block until ``position`` is visible to reads (read-your-writes).

        This process projects what it can first, so in embedded mode no other process
        is needed; raises :class:`NotYetVisibleError` after ``timeout`` seconds.
        """
        self._check_projection()
        check_position(position, self._log.partitions, "position")
        seconds = self.settings.wait_timeout if timeout is None else timeout
        if not self.self_projecting:
            self._wait_for_projectors(position, seconds)
            return
        applied = self.reader.applied_position(position.partition)
        if applied is None or applied < position:
            try:
                self.projector.catch_up_partition(position.partition)
            except TrackerError as error:
                raise NotYetVisibleError(
                    f"position {position.token()} is not visible yet: {error}", [position]
                ) from error
        try:
            self.reader.wait_for(position, seconds)
        except NotYetVisibleError as error:
            end = self._log.end(position.partition)
            if end is not None and end >= position:
                raise
            raise NotYetVisibleError(
                f"position {position.token()} is not visible after {seconds:g} s: it is past "
                f"the end of the log ({end.token() if end else 'empty'}); was it written to "
                "this data dir?",
                error.positions,
            ) from error

    def _wait_for_projectors(self, position: Position, timeout: float) -> None:
        """Kafka mode: wait for the ``tracker project`` processes to apply ``position``."""
        try:
            self.reader.wait_for(position, timeout)
        except NotYetVisibleError as error:
            partition = position.partition
            applied = self.reader.applied_position(partition)
            lag = self._log.count(partition, applied)
            raise NotYetVisibleError(
                f"position {position.token()} (durable) is not visible after {timeout:g} s: "
                f"partition {partition} is {lag} events behind; is `tracker project` running?",
                error.positions,
            ) from error

    # -- queries -----------------------------------------------------------------------

    @open_only
    def session_state(self, session_id: str) -> SessionState | None:
        """Everything the projection knows about an id, tombstones and never-created included."""
        self._check_projection()
        return self.reader.session_state(session_id)

    @open_only
    def get_session(self, session_id: str) -> SessionDTO | None:
        """The session, or ``None`` if it is unknown, deleted or was never created."""
        self._check_projection()
        return self.reader.get_session(session_id)

    @open_only
    def get_session_and_position(
        self, session_id: str
    ) -> tuple[SessionDTO | None, Position | None]:
        """:meth:`get_session` and :meth:`applied_position` of its partition, one Redis round
        trip: a read at least as new as that position (see ``wait_for``)."""
        self._check_projection()
        state, applied = self.reader.session_and_applied(session_id)
        return (state.to_dto() if state is not None else None), applied

    @open_only
    def list_sessions(
        self, *, user_id: str | None = None, agent_id: str | None = None
    ) -> list[SessionDTO]:
        """Sessions of a user and/or an agent (all sessions when neither is given), oldest first."""
        self._check_projection()
        return self.reader.list_sessions(user_id=user_id, agent_id=agent_id)

    @open_only
    def offsets(self, session_id: str) -> dict[str, int]:
        """A session's offsets; also for a session that has offsets but was never created."""
        self._check_projection()
        return self.reader.offsets(session_id)

    @open_only
    def applied_position(self, partition: int = 0) -> Position | None:
        """The last log position applied to Redis for a partition."""
        self._check_projection()
        return self.reader.applied_position(partition)

    @open_only
    def export_events(self) -> Iterator[AnyEvent]:
        """Every event in log order, each with its ``position``."""
        return events_of(self._log)

    @open_only
    def history(self, session_id: str) -> list[HistoryEntry]:
        """Every event of a session in log order, with its position and recorded time.

        Read from the log (its partition only), not Redis: deleted sessions and ids that
        only have offsets have a history too. Raises :class:`SessionNotFoundError` if the
        log holds no event for the id.
        """
        checked(session_id, SessionId, "session_id")
        entries = history_entries(session_events(self._log, session_id))
        if not entries:
            raise SessionNotFoundError(f"session {session_id} not found: no event in the log")
        return entries

    @open_only
    def session_as_of(self, session_id: str, as_of: AsOf) -> SessionDTO | None:
        """The session as it was at a position (inclusive) or a time (events recorded at or
        before it), folded from the log with the projection's fold; ``None`` if it was not
        created yet then, or already deleted. A position must be in the session's partition.
        """
        checked(session_id, SessionId, "session_id")
        check_as_of(as_of, session_id, self._log.partitions)
        upto = as_of if isinstance(as_of, Position) else None
        return fold_as_of(session_events(self._log, session_id, upto), as_of)

    @open_only
    def event_count(self) -> int:
        return sum(self._log.count(p) for p in range(self._log.partitions))

    # -- rebuild and check -------------------------------------------------------------

    @open_only
    def replay(self, progress: Progress | None = None, *, force: bool = False) -> ReplayReport:
        """Rebuild the projection from the start of the log in a new generation, then promote it.

        Other processes keep reading and writing meanwhile. Refuses to replace another
        log's projection unless ``force``.
        """
        report = replay(self._log, self.generations, progress=progress, force=force)
        self._foreign = None
        return report

    @open_only
    def status(self) -> Status:
        """Per partition: the log's end, the applied checkpoint and the lag."""
        self._check_projection()
        if not self.generations.refresh():  # nothing projected yet: generation 0
            return Status(0, [unprojected(self._log, p) for p in range(self._log.partitions)])
        return status(self._log, self.generations.store)

    @open_only
    def lag_report(self) -> str:
        """One cheap line on how far the projection is behind (``tracker project``'s log)."""
        try:
            return describe_lag(batches_behind(self._log, self.generations.store))
        except GenerationRetiredError:
            # a replay (or a first start racing this one) replaced the generation while
            # this process applied nothing that would have rebound it: follow it
            self.generations.refresh()
            return "the projection was replaced by a replay; following it"

    @open_only
    def tailer(
        self, *, report: Callable[[], None] | None = None, report_seconds: float = 10.0
    ) -> Tailer:
        """A long-running projector (``tracker project``): over every partition of the file
        log; with Kafka, over the partitions the projectors' consumer group assigns."""
        self._check_projection()
        settings = self.settings
        if settings.kafka_bootstrap is None:
            every = range(self._log.partitions)
            return Tailer(
                self.projector, lambda: every, report=report, report_seconds=report_seconds
            )
        from tracker.assignments import GroupAssignment

        group = GroupAssignment(
            settings.kafka_bootstrap, settings.event_topic, f"{settings.prefix}.projectors"
        )
        self._closers.append(group.close)
        projector = Projector(self._log, self.generations, batch_records=TAIL_BATCH_RECORDS)
        return Tailer(projector, group.partitions, report=report, report_seconds=report_seconds)

    @open_only
    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Fold the log in memory up to the applied checkpoint; compare every session with Redis."""
        return verify(self._log, self.store, progress)
