"""The ``Tracker`` facade: commands append events, queries read snapshots.

Every command validates first (nothing invalid reaches the log), appends, then catches
the projection up before it returns, so its effect is visible at once.
"""

from __future__ import annotations

import logging
import secrets
import string
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import cast

import msgspec
import redis
from msgspec import Struct, structs

from tracker.embedded import EmbeddedRedis
from tracker.errors import (
    InvalidInputError,
    SessionExistsError,
    SessionNotFoundError,
    SnapshotStoreError,
    TrackerError,
)
from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    Position,
    SessionCreated,
    SessionDeleted,
    TitleChanged,
    decode_event_lean,
    describe_validation_error,
    encode_event,
    encode_validated,
    new_event_ids,
    utcnow,
)
from tracker.fold import BatchFolder, SessionState, fold_all, visible
from tracker.keys import Keys, partition_for
from tracker.logs import LogBackend, open_log
from tracker.model import AgentId, ConsumerName, Offset, SessionDTO, SessionId, Title, checked
from tracker.projector import Progress, Projector, decode_batches
from tracker.settings import Settings, mask_url
from tracker.snapshots import (
    SCHEMA_VERSION,
    SnapshotStore,
    check_redis,
    drop_other_generations,
    parse_partial,
    redis_boundary,
)

log = logging.getLogger("tracker")

_ID_ALPHABET = string.ascii_letters + string.digits


def new_id() -> str:
    """A 10-character id of ``[A-Za-z0-9]``, the shape flux0 generates."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


class CommitResult(Struct, frozen=True):
    """What a single commit did; ``changed`` is false for a stale or repeated offset."""

    session_id: str
    consumer: str
    offset: int
    previous: int | None
    current: int
    position: Position

    @property
    def changed(self) -> bool:
        return self.current == self.offset and self.previous != self.offset

    @property
    def stale(self) -> bool:
        return self.previous is not None and self.offset < self.previous


class AppendResult(Struct, frozen=True):
    """How many events a command appended, and the last one's position (read-your-writes)."""

    count: int
    last: Position | None


class ResetPlan(Struct, frozen=True):
    """An offset reset, shown before it is applied (as ``kafka-consumer-groups`` does)."""

    session_id: str
    consumer: str
    current: int | None
    target: int
    applied: bool = False
    position: Position | None = None


class Difference(Struct, frozen=True):
    session_id: str
    problem: str


class VerifyReport(Struct, frozen=True):
    events: int
    sessions: int
    differences: list[Difference]
    seconds: float


class ReplayReport(Struct, frozen=True):
    events: int
    sessions: int
    seconds: float
    redis_calls: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Tracker:
    """Sessions and their consumption offsets, event-sourced; open with :meth:`open`."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.warnings: list[str] = []
        self._embedded: EmbeddedRedis | None = None
        self._client: redis.Redis | None = None
        self._foreign: str | None = None
        self._log: LogBackend = open_log(settings)
        try:
            repaired = getattr(self._log, "repaired", None)
            if repaired:
                self.warnings.append(f"event log repaired: {repaired}")
            self._client = self._connect()
            self.warnings.extend(check_redis(self._client))
            for warning in self.warnings:
                log.warning("%s", warning)
            self._store = SnapshotStore(self._client, self._bind())
            self._projector = Projector(self._log, self._store)
            if self._foreign is None:
                self._check_checkpoints()
            if self._foreign is None:
                self._projector.catch_up()
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
        store: SnapshotStore | None = getattr(self, "_store", None)
        if store is not None:
            store.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        self._log.close()

    # -- wiring ------------------------------------------------------------------------

    def _connect(self) -> redis.Redis:
        url = self.settings.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(self.settings.data_dir / "redis")
            url = self._embedded.start()
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            client.ping()
        except redis.RedisError as exc:
            client.close()
            raise SnapshotStoreError(f"cannot reach Redis at {mask_url(url)}: {exc}") from exc
        return client

    @property
    def client(self) -> redis.Redis:
        if self._client is None:
            raise TrackerError("the tracker is closed")
        return self._client

    @property
    def _meta_key(self) -> str:
        return Keys.meta(self.settings.prefix)

    @redis_boundary("reading the projection's meta hash")
    def _bind(self) -> Keys:
        """Find (or start) the active generation, and check it projects this log."""
        partitions = self._log.partitions
        meta = cast(dict[str, str], self.client.hgetall(self._meta_key))
        if not meta:
            self.client.hset(
                self._meta_key,
                mapping={
                    "generation": "1",
                    "next_generation": "1",
                    "log_id": self._log.log_id,
                    "partitions": str(partitions),
                    "schema": SCHEMA_VERSION,
                },
            )
            meta = cast(dict[str, str], self.client.hgetall(self._meta_key))
        if meta.get("log_id") != self._log.log_id or meta.get("partitions") != str(partitions):
            self._foreign = (
                f"Redis prefix {self.settings.prefix!r} holds the projection of another log "
                f"(log {meta.get('log_id')}, {meta.get('partitions')} partitions); run "
                "`tracker replay` to rebuild it from this log, or use another --prefix"
            )
        return Keys(self.settings.prefix, int(meta["generation"]), partitions)

    def _check_checkpoints(self) -> None:
        for partition in range(self._log.partitions):
            token = self._store.checkpoint(partition)
            partial = parse_partial(token)
            if partial is not None:
                token = partial[1]
            end = self._log.end(partition)
            if token and (end is None or Position.parse(token) > end):
                self._foreign = (
                    f"partition {partition}: Redis has applied up to {token} but the log ends "
                    f"at {end.token() if end else 'nothing'}; the log was replaced or cut, "
                    "run `tracker replay` to rebuild the projection"
                )

    def _check_projection(self) -> None:
        """Refuse to use a projection of another log (or of a cut one) until a replay."""
        if self._foreign is not None:
            raise SnapshotStoreError(self._foreign)

    @property
    def store(self) -> SnapshotStore:
        self._check_projection()
        return self._store

    def _partition(self, session_id: str) -> int:
        return partition_for(session_id, self._log.partitions)

    def _append(
        self,
        events: list[AnyEvent],
        *,
        what: str = "item",
        records: list[bytes] | None = None,
        commits: list[tuple[str, str, int]] | None = None,
    ) -> AppendResult:
        """Validate, append, and project; the single write path.

        ``records`` are the events already encoded by a caller that validated them
        itself; ``commits`` the same events as tuples, which fold faster.
        """
        self._check_projection()
        if records is None:
            records = encode_validated(events, what=what)
        if not records:
            return AppendResult(0, None)
        groups: dict[int, tuple[list[AnyEvent], list[bytes]]] = {}
        if self._log.partitions == 1:
            groups[0] = (events, records)
        else:
            commits = None
            for event, record in zip(events, records, strict=True):
                group = groups.setdefault(self._partition(event.session_id), ([], []))
                group[0].append(event)
                group[1].append(record)
        last: Position | None = None
        for partition, (group_events, group_records) in groups.items():
            before = self._log.end(partition)
            batches = self._log.append(partition, group_records)
            upto = batches[-1].last
            folder = BatchFolder()
            if commits is not None:
                folder.add_commits(commits)
            else:
                folder.add(group_events)
            self._projector.apply_appended(partition, before, folder, upto)
            last = upto if last is None else max(last, upto)
        return AppendResult(len(records), last)

    def _state(self, session_id: str) -> SessionState | None:
        """The snapshot of an id; the id is checked against the model only when none is found.

        Every stored id passed that check when it was written, so the regex stays off the
        path of successful reads.
        """
        if not isinstance(cast(object, session_id), str):
            checked(session_id, SessionId, "session_id")
        state = self.store.get(self._partition(session_id), session_id)
        if state is None:
            checked(session_id, SessionId, "session_id")
        return state

    def _live(self, session_id: str) -> SessionState:
        state = self._state(session_id)
        if state is None or not state.created:
            if state is not None and not state.deleted and state.offsets:
                raise SessionNotFoundError(
                    f"session {session_id} has offsets but was never created"
                )
            if state is None or not state.deleted:
                raise SessionNotFoundError(f"session {session_id} not found")
        if state.deleted:
            raise SessionNotFoundError(f"session {session_id} was deleted")
        return state

    # -- queries -----------------------------------------------------------------------

    def session_state(self, session_id: str) -> SessionState | None:
        """Everything the projection knows about an id, tombstones and never-created included."""
        return self._state(session_id)

    def get_session(self, session_id: str) -> SessionDTO | None:
        """The session, or ``None`` if it is unknown, deleted or was never created."""
        state = self._state(session_id)
        return state.to_dto() if state is not None else None

    def list_sessions(
        self, *, user_id: str | None = None, agent_id: str | None = None
    ) -> list[SessionDTO]:
        """Sessions of a user and/or an agent (all sessions when neither is given), oldest first."""
        if user_id is not None:
            checked(user_id, SessionId, "user_id")
        if agent_id is not None:
            checked(agent_id, SessionId, "agent_id")
        if user_id is None and agent_id is None:
            states: Iterable[SessionState] = self.store.scan()
        else:
            states = self.store.list_by(user_id=user_id, agent_id=agent_id)
        dtos = [dto for state in states if (dto := state.to_dto()) is not None]
        dtos.sort(key=lambda dto: (dto.created_at, dto.id))
        return dtos

    def offsets(self, session_id: str) -> dict[str, int]:
        """A session's offsets; also for a session that has offsets but was never created."""
        state = self._state(session_id)
        if state is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if state.deleted:
            raise SessionNotFoundError(f"session {session_id} was deleted")
        return dict(state.offsets)

    def applied_position(self, partition: int = 0) -> Position | None:
        """The last log position applied to Redis for a partition."""
        token = self.store.checkpoint(partition)
        partial = parse_partial(token)
        if partial is not None:
            token = partial[0]
        return Position.parse(token) if token else None

    # -- commands ----------------------------------------------------------------------

    def create_session(
        self,
        agent_id: str,
        user_id: str,
        *,
        session_id: str | None = None,
        title: str | None = None,
    ) -> SessionDTO:
        """Create a session; ``session_id`` defaults to a new 10-character id."""
        checked(agent_id, AgentId, "agent_id")
        checked(user_id, SessionId, "user_id")
        if title is not None:
            checked(title, Title, "title")
        sid = new_id() if session_id is None else str(checked(session_id, SessionId, "session_id"))
        existing = self._state(sid)
        if existing is not None and existing.deleted:
            raise SessionExistsError(f"session {sid} was deleted; ids are never reused")
        if existing is not None and existing.created:
            raise SessionExistsError(f"session {sid} already exists")
        (event_id,) = new_event_ids(1)
        now = utcnow()
        created = SessionCreated(
            session_id=sid, agent_id=agent_id, user_id=user_id, created_at=now,
            title=title, event_id=event_id, recorded_at=now,
        )  # fmt: skip
        self._append([created])
        dto = self.get_session(sid)
        assert dto is not None
        return dto

    def rename(self, session_id: str, title: str | None) -> SessionDTO:
        """Set (or with ``None`` clear) the title; the last rename in log order wins."""
        if title is not None:
            checked(title, Title, "title")
        self._live(session_id)
        (event_id,) = new_event_ids(1)
        self._append(
            [
                TitleChanged(
                    session_id=session_id, title=title, event_id=event_id, recorded_at=utcnow()
                )
            ]
        )
        dto = self.get_session(session_id)
        assert dto is not None
        return dto

    def delete_session(self, session_id: str) -> Position:
        """Delete a session; it disappears from queries and later events change nothing."""
        state = self._state(session_id)
        if state is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if state.deleted:
            raise SessionNotFoundError(f"session {session_id} was already deleted")
        (event_id,) = new_event_ids(1)
        result = self._append(
            [SessionDeleted(session_id=session_id, event_id=event_id, recorded_at=utcnow())]
        )
        assert result.last is not None
        return result.last

    def commit(
        self, session_id: str, consumer: str, offset: int, *, strict: bool = True
    ) -> CommitResult:
        """Record that ``consumer`` processed ``session_id`` up to ``offset`` (inclusive).

        Offsets only move forward: a lower value is recorded but changes nothing (see
        :attr:`CommitResult.stale`). With ``strict`` the session must exist.
        """
        checked(consumer, ConsumerName, "consumer")
        checked(offset, Offset, "offset")
        if strict:
            state: SessionState | None = self._live(session_id)
        else:
            state = self._state(session_id)
        previous = state.offsets.get(consumer) if state is not None else None
        (event_id,) = new_event_ids(1)
        event = OffsetCommitted(
            session_id=session_id, consumer=consumer, offset=offset,
            event_id=event_id, recorded_at=utcnow(),
        )  # fmt: skip
        result = self._append([event])
        assert result.last is not None
        current = previous if previous is not None and previous > offset else offset
        return CommitResult(session_id, consumer, offset, previous, current, result.last)

    def commit_many(
        self, commits: Iterable[tuple[str, str, int]], *, strict: bool = False
    ) -> AppendResult:
        """Append many ``(session_id, consumer, offset)`` commits as one log append.

        Validated as a whole first: one bad item rejects them all. With ``strict`` every
        session must exist.
        """
        items = validate_commits(commits)
        ids = new_event_ids(len(items))
        now = utcnow()
        events: list[AnyEvent] = [
            OffsetCommitted(
                session_id=sid, consumer=consumer, offset=offset, event_id=eid, recorded_at=now
            )
            for (sid, consumer, offset), eid in zip(items, ids, strict=True)
        ]
        if strict:
            self._require_live({event.session_id for event in events})
        return self._append(events, records=list(map(encode_event, events)), commits=items)

    def _require_live(self, session_ids: set[str]) -> None:
        """Refuse unless every (already validated) id is a created, undeleted session."""
        wanted = sorted(session_ids)
        missing = self.store.not_live([(self._partition(sid), sid) for sid in wanted])
        if missing:
            raise SessionNotFoundError(
                f"session {missing[0]} not found "
                "(use strict=False to keep offsets of unknown sessions)"
            )

    def plan_reset(self, session_id: str, consumer: str, offset: int) -> ResetPlan:
        """What :meth:`reset_offset` would do, without doing it."""
        checked(consumer, ConsumerName, "consumer")
        checked(offset, Offset, "offset")
        state = self._state(session_id)
        if state is None or state.deleted:
            raise SessionNotFoundError(f"session {session_id} not found")
        return ResetPlan(session_id, consumer, state.offsets.get(consumer), offset)

    def reset_offset(
        self,
        session_id: str,
        consumer: str,
        offset: int,
        *,
        reason: str | None = None,
        actor: str | None = None,
    ) -> ResetPlan:
        """Set an offset, backwards too: an operator's act, recorded with who and why."""
        plan = self.plan_reset(session_id, consumer, offset)
        (event_id,) = new_event_ids(1)
        event = OffsetReset(
            session_id=session_id, consumer=consumer, offset=offset, actor=actor, reason=reason,
            event_id=event_id, recorded_at=utcnow(),
        )  # fmt: skip
        result = self._append([event])
        return structs.replace(plan, applied=True, position=result.last)

    def import_events(self, events: Iterable[AnyEvent]) -> AppendResult:
        """Append events as given (e.g. from another log's export); all validated first.

        Missing ``event_id``/``recorded_at`` are filled in; a ``position`` is dropped,
        since the events get new positions in this log.
        """
        batch = list(events)
        ids = new_event_ids(len(batch))
        now = utcnow()
        prepared: list[AnyEvent] = [
            structs.replace(
                event,
                event_id=event.event_id or eid,
                recorded_at=event.recorded_at or now,
                position=None,
            )
            for event, eid in zip(batch, ids, strict=True)
        ]
        return self._append(prepared, what="event")

    def export_events(self) -> Iterator[AnyEvent]:
        """Every event in log order, each with its ``position``."""
        for partition in range(self._log.partitions):
            after: Position | None = None
            while batches := self._log.read(partition, after, 10_000):
                for batch in batches:
                    for position, event in zip(
                        batch.positions(), decode_batches([batch]), strict=True
                    ):
                        yield structs.replace(event, position=position)
                after = batches[-1].last

    def event_count(self) -> int:
        return sum(self._log.count(p) for p in range(self._log.partitions))

    # -- rebuild and check -------------------------------------------------------------

    @redis_boundary("rebuilding the projection")
    def replay(self, progress: Progress | None = None) -> ReplayReport:
        """Rebuild the projection from the start of the log in a new generation, then promote it."""
        client = self.client
        started = time.perf_counter()
        generation = int(client.hincrby(self._meta_key, "next_generation", 1))
        active = int(client.hget(self._meta_key, "generation") or 0)
        floor = max(active, self._store.keys.generation) + 1
        if generation < floor:
            generation = floor
            client.hset(self._meta_key, "next_generation", generation)
        store = SnapshotStore(client, Keys(self.settings.prefix, generation, self._log.partitions))
        store.drop()
        projector = Projector(self._log, store)
        events = projector.catch_up(progress)
        client.hset(
            self._meta_key,
            mapping={
                "generation": str(generation),
                "log_id": self._log.log_id,
                "partitions": str(self._log.partitions),
                "schema": SCHEMA_VERSION,
            },
        )
        self._store.close()
        self._store, self._projector, self._foreign = store, projector, None
        seconds = time.perf_counter() - started
        calls = store.calls
        drop_other_generations(client, self.settings.prefix, keep=generation)
        sessions = store.count()
        return ReplayReport(events, sessions, seconds, calls)

    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Fold the log in memory up to the applied checkpoint; compare every session with Redis."""
        started = time.perf_counter()
        store = self.store
        folded: dict[str, SessionState] = {}
        events = 0
        for partition in range(self._log.partitions):
            upto = self.applied_position(partition)
            after: Position | None = None
            while upto is not None and (batches := self._log.read(partition, after, 100_000)):
                for batch in batches:
                    records = batch.records
                    if batch.last > upto:  # past the checkpoint: keep what was applied
                        keep = upto.index - batch.first_index + 1
                        records = records[:keep] if batch.offset == upto.offset else []
                    fold_all(map(decode_event_lean, records), folded)
                    events += len(records)
                    if progress is not None:
                        progress(len(records))
                after = batches[-1].last
                if after >= upto:
                    break
        expected = visible(folded)
        actual = {state.session_id: state for state in store.scan()}
        differences = [
            Difference(sid, problem)
            for sid in sorted(expected.keys() | actual.keys())
            if (problem := describe_difference(expected.get(sid), actual.get(sid)))
        ]
        return VerifyReport(events, len(expected), differences, time.perf_counter() - started)


def validate_commits(commits: Iterable[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Check ``(session_id, consumer, offset)`` items against the model, each distinct value once.

    Thousands of commits share a few sessions and consumers, so checking each distinct
    string once keeps the declared (regex) validation off the hot path. Errors name the
    first bad item by its 1-based number.
    """
    items = list(commits)
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
        distinct = list(dict.fromkeys(column))
        try:
            msgspec.convert(distinct, list[kind])  # type: ignore[valid-type]
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


def _reject_shape(items: list[tuple[str, str, int]]) -> None:
    """Raise for the first item that is not a 3-tuple (or list); only on the error path."""
    for number, item in enumerate(items, start=1):
        if not (isinstance(item, tuple | list) and len(item) == 3):
            raise InvalidInputError(
                f"commit {number}: expected (session_id, consumer, offset), got {item!r}"
            )


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
