"""The Redis projection: current session snapshots, merged atomically and fenced.

One :class:`SnapshotStore` covers one generation of one key prefix (see ``keys.py``).
:meth:`SnapshotStore.merge` sends a batch's deltas in chunks through ``merge.lua``; each
chunk applies only if the partition checkpoint still equals where it starts, and moves
the checkpoint on in the same call, so replays, restarts and zombie projectors cannot
apply anything twice or out of order.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, cast

import msgspec
import redis
from redis.cluster import RedisCluster
from redis.exceptions import (
    MovedError,
)

from tracker import keys as fields
from tracker.connection import REDIS_ERRORS, Client, redis_boundary, redis_errors
from tracker.errors import (
    CheckpointConflictError,
    GenerationRetiredError,
)
from tracker.events import Position
from tracker.fold import NO_OFFSET, Delta, SessionState, as_utc, tombstone
from tracker.keys import Keys

MERGE_LUA = resources.files("tracker").joinpath("merge.lua").read_text()
MERGE_SHA = hashlib.sha1(MERGE_LUA.encode()).hexdigest()
SCHEMA_VERSION = "2"
"""2: offsets under "o<consumer>" and created_at in microseconds (1: "o:<consumer>", ISO text)."""
RETIRED = "retired"
"""The checkpoint of a generation that ``replay`` replaced: every fenced merge fails on it."""
_encode_strings = msgspec.msgpack.Encoder().encode
CHUNK_SESSIONS = 256
CHUNKS_PER_ROUND_TRIP = 8
READ_CHUNK = 1000


def partial_checkpoint(after: str, upto: str, chunk: int, size: int) -> str:
    """The checkpoint between two chunks of one batch: ``<after>><upto>#<chunk>/<size>``."""
    return f"{after}>{upto}#{chunk}/{size}"


def parse_partial(token: str) -> tuple[str, str, int, int] | None:
    """``(after, upto, chunk, size)`` of a partial checkpoint, or ``None`` for a whole one."""
    if "#" not in token:
        return None
    span, _, progress = token.partition("#")
    after, _, upto = span.partition(">")
    chunk, _, size = progress.partition("/")
    return after, upto, int(chunk), int(size)


def applied_of(token: str) -> Position | None:
    """The position a raw checkpoint token says is applied (a batch in progress counts as
    not); ``None`` for '' (nothing applied yet)."""
    partial = parse_partial(token)
    if partial is not None:
        token = partial[0]
    return Position.parse(token) if token else None


def retired(generation: int) -> GenerationRetiredError:
    return GenerationRetiredError(
        f"generation {generation} of the projection was replaced by a replay; try again"
    )


def _wire(keys: Keys, partition: int, deltas: Sequence[Delta], key_list: list[str]) -> list[str]:
    """The flat argument list of ``merge.lua`` for a chunk of deltas (layout documented there)."""
    args: list[str] = []
    add = args.append
    prefix = fields.OFFSET_PREFIX
    for delta in deltas:
        key_list.append(keys.session(partition, delta.session_id))
        add(str(len(key_list)))
        if delta.deleted:
            args += ("x", "0")
            continue
        create = delta.create
        add(("c" if create is not None else "") + ("t" if delta.title_set else "") or "-")
        offsets = delta.offsets
        add(str(len(offsets)))
        # plain loops: comprehensions would allocate GC-tracked lists per session
        for consumer in offsets:
            add(prefix + consumer)
        for change in offsets.values():
            add("" if change.reset_to == NO_OFFSET else str(change.reset_to))
        for change in offsets.values():
            add("" if change.at_least == NO_OFFSET else str(change.at_least))
        if create is not None:
            key_list.append(keys.by_user(partition, create.user_id))
            key_list.append(keys.by_agent(partition, create.agent_id))
            title = delta.title_after_create if delta.title_after_create_set else create.title
            args += (
                str(len(key_list) - 1),
                str(len(key_list)),
                delta.session_id,
                create.agent_id,
                create.user_id,
                str(to_micros(create.created_at)),
                "0" if title is None else "1",
                title or "",
            )
        if delta.title_set:
            args += ("0" if delta.title is None else "1", delta.title or "")
    return args


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def to_micros(value: datetime) -> int:
    """A time as whole microseconds since the epoch, UTC.

    Stored so in the snapshot hash: Redis keeps an integer in a listpack in 9 bytes at
    most, where the ISO 8601 text takes 24 or more.
    """
    return (as_utc(value) - _EPOCH) // _MICROSECOND


def parse_created(value: str) -> datetime:
    """``created_at`` as stored: microseconds since the epoch (ISO text before that)."""
    if value.lstrip("-").isdigit():
        return _EPOCH + int(value) * _MICROSECOND
    return as_utc(datetime.fromisoformat(value))


def state_from_hash(session_id: str, values: dict[str, str]) -> SessionState | None:
    """Rebuild a :class:`SessionState` from a snapshot hash (``None`` if there is none)."""
    if not values:
        return None
    if values.get(fields.DELETED):
        return tombstone(session_id)
    created = values.get(fields.CREATED_AT)
    offsets = {
        name[len(fields.OFFSET_PREFIX) :]: int(value)
        for name, value in values.items()
        if name.startswith(fields.OFFSET_PREFIX)
    }
    return SessionState(
        session_id,
        agent_id=values.get(fields.AGENT),
        user_id=values.get(fields.USER),
        created_at=parse_created(created) if created else None,
        title=values.get(fields.TITLE),
        offsets=offsets,
    )


class SnapshotStore:
    """Snapshots and checkpoints of one generation; ``calls`` counts Redis commands sent."""

    def __init__(self, client: Client, keys: Keys) -> None:
        self.client = client
        self.keys = keys
        self.calls = 0
        self.chunks_per_round_trip = CHUNKS_PER_ROUND_TRIP
        """Chunk calls per pipelined round trip of :meth:`merge` (see :meth:`_execute`)."""
        self._sender_pool: ThreadPoolExecutor | None = None
        self._sender_mutex = threading.Lock()
        self._script_loaded = False

    @redis_boundary("reading a checkpoint")
    def checkpoint(self, partition: int) -> str:
        """The raw checkpoint token ('' when nothing was applied yet)."""
        self.calls += 1
        value = self.client.get(self.keys.checkpoint(partition))
        if value == RETIRED:
            raise retired(self.keys.generation)
        return str(value) if value else ""

    def applied(self, partition: int) -> Position | None:
        """The last position applied to this generation (a batch in progress counts as not)."""
        return applied_of(self.checkpoint(partition))

    def merge(
        self,
        partition: int,
        deltas: Sequence[Delta],
        *,
        after: str,
        upto: str,
        chunk_sessions: int = CHUNK_SESSIONS,
        first_chunk: int = 0,
    ) -> None:
        """Apply a batch's deltas (the records after ``after`` up to ``upto``), fenced.

        Raises :class:`CheckpointConflictError` if another projector moved the checkpoint;
        the caller re-reads from the checkpoint and tries again.
        """
        cp_key = self.keys.checkpoint(partition)
        if not self._script_loaded:
            self._load_script()
        chunks = [
            deltas[i : i + chunk_sessions] for i in range(0, max(len(deltas), 1), chunk_sessions)
        ]
        last = len(chunks) - 1
        sent: list[Future[list[Any]]] = []
        pipe = self._pipeline_to(cp_key)
        for number in range(first_chunk, len(chunks)):
            if len(pipe) == self.chunks_per_round_trip:
                sent.append(self._sender().submit(self._execute, pipe))
                pipe = self._pipeline_to(cp_key)
            key_list = [cp_key]
            wire = _wire(self.keys, partition, chunks[number], key_list)
            expected = (
                after
                if number == 0
                else partial_checkpoint(after, upto, number - 1, chunk_sessions)
            )
            new = (
                upto if number == last else partial_checkpoint(after, upto, number, chunk_sessions)
            )
            pipe.evalsha(MERGE_SHA, len(key_list), *key_list, expected, new, _encode_strings(wire))
        with redis_errors("merging snapshots"):
            results = [result for future in sent for result in future.result()]
            results += self._execute(pipe)
        for applied, current in results:
            if not int(applied) and current == RETIRED:
                raise retired(self.keys.generation)
            if not int(applied):
                raise CheckpointConflictError(
                    f"partition {partition}: checkpoint is {current!r}, expected {after!r}; "
                    "another projector is applying this partition"
                )

    def _pipeline_to(self, key: str) -> redis.client.Pipeline:
        """A pipeline for :meth:`merge`'s calls, which all touch the slot of ``key``.

        In a cluster, a plain pipeline to the master of that slot: redis-py's cluster
        pipeline would first ask a node (its "default node") for the keys of every
        ``EVALSHA``, one round trip more per call, and fails for good once that node is
        gone. :meth:`_execute` follows a failover.
        """
        client = self.client
        if isinstance(client, RedisCluster):
            node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
            return client.get_redis_connection(node).pipeline(transaction=False)
        return client.pipeline(transaction=False)

    def _execute(self, pipe: redis.client.Pipeline) -> list[Any]:
        """Send one round trip of :meth:`merge`'s chunk calls, in order.

        The seam where tests make a process die between two chunk calls: a subclass
        fails a round trip (and every later one) instead of sending it; with
        ``chunks_per_round_trip = 1`` that can fall between any two chunks of a batch.
        """
        self.calls += len(pipe)
        try:
            return pipe.execute()
        except redis.exceptions.NoScriptError as exc:
            # a restart or failover emptied the script cache: no call of this round trip
            # ran; the caller re-reads the checkpoint and sends it again
            self._load_script()
            raise CheckpointConflictError(
                "Redis lost the merge script; it was loaded again"
            ) from exc
        except MovedError as exc:  # and ASK: a failover, or the slot moved
            self._reroute()
            raise CheckpointConflictError(
                f"the partition's slot moved to another node ({exc}); sending there"
            ) from exc
        except (redis.ConnectionError, redis.TimeoutError):
            self._reroute()  # the master may be gone; the caller tries again later
            raise

    def _reroute(self) -> None:
        """A cluster client asks again which node serves which slot."""
        if isinstance(self.client, RedisCluster):
            with contextlib.suppress(*REDIS_ERRORS):
                self.client.nodes_manager.initialize()

    @redis_boundary("loading the merge script")
    def _load_script(self) -> None:
        """``SCRIPT LOAD`` once, so that merges are plain pipelined ``EVALSHA`` calls.

        redis-py's ``Script`` objects send ``SCRIPT EXISTS`` before every pipeline that
        uses them: one round trip more per command.
        """
        self.client.script_load(MERGE_LUA)
        self._script_loaded = True

    def _sender(self) -> ThreadPoolExecutor:
        """One thread that sends merge round trips in order, while the caller builds the next.

        Redis runs the merges of one round trip while Python encodes the next, so a large
        batch costs about the larger of the two, not their sum. Fencing keeps order: a
        round trip whose first chunk finds an unexpected checkpoint fails as a whole.
        """
        with self._sender_mutex:
            if self._sender_pool is None:
                self._sender_pool = ThreadPoolExecutor(1, thread_name_prefix="tracker-merge")
            return self._sender_pool

    def close(self) -> None:
        with self._sender_mutex:
            if self._sender_pool is not None:
                self._sender_pool.shutdown()
                self._sender_pool = None

    @redis_boundary("reading a session")
    def get_in_generation(
        self, partition: int, session_id: str
    ) -> tuple[SessionState | None, str | None]:
        """A snapshot and, in the same round trip, the active generation in the meta hash.

        A reader bound to a generation that a replay replaced (or that Redis lost) finds
        out from the same reply, at no extra round trip.
        """
        self.calls += 1
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(self.keys.session(partition, session_id))
        pipe.hget(Keys.meta(self.keys.prefix), "generation")
        values, generation = pipe.execute()
        return state_from_hash(session_id, cast(dict[str, str], values)), generation

    @redis_boundary("reading a session")
    def get_one_with_checkpoint(
        self, partition: int, session_id: str
    ) -> tuple[SessionState | None, str | None, str]:
        """:meth:`get_in_generation` plus the partition's raw checkpoint, one round trip.

        The checkpoint is read after the snapshot, so the position it gives is at or past
        what the snapshot shows (as reading it afterwards would); ``RETIRED`` tells the
        caller to rebind.
        """
        self.calls += 1
        pipe = self.client.pipeline(transaction=False)
        self.queue_one_with_checkpoint(pipe, partition, session_id)
        return self.one_with_checkpoint(session_id, pipe.execute())

    def queue_one_with_checkpoint(self, pipe: Any, partition: int, session_id: str) -> None:
        """Queue :meth:`get_one_with_checkpoint`'s reads on a pipeline, sync or asyncio
        (redis-py's share the command methods), for :meth:`one_with_checkpoint`."""
        pipe.hgetall(self.keys.session(partition, session_id))
        pipe.hget(Keys.meta(self.keys.prefix), "generation")
        pipe.get(self.keys.checkpoint(partition))

    def one_with_checkpoint(
        self, session_id: str, replies: Sequence[Any]
    ) -> tuple[SessionState | None, str | None, str]:
        """The replies of :meth:`queue_one_with_checkpoint`'s reads, as
        :meth:`get_one_with_checkpoint` returns them."""
        values, generation, checkpoint = replies
        state = state_from_hash(session_id, cast(dict[str, str], values))
        return state, generation, str(checkpoint) if checkpoint else ""

    def is_current(self, generation: str | None, token: str) -> bool:
        """Whether a read that saw ``generation`` and checkpoint ``token`` read this store's
        generation while it was active (else the reader must rebind)."""
        return generation == str(self.keys.generation) and token != RETIRED

    @redis_boundary("reading sessions")
    def get_many(self, items: Sequence[tuple[int, str]]) -> list[SessionState | None]:
        """States of many ``(partition, session_id)`` pairs, pipelined."""
        states: list[SessionState | None] = []
        for start in range(0, len(items), READ_CHUNK):
            chunk = items[start : start + READ_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for partition, sid in chunk:
                pipe.hgetall(self.keys.session(partition, sid))
            self.calls += len(chunk)
            values = pipe.execute()
            states.extend(
                state_from_hash(sid, v) for (_, sid), v in zip(chunk, values, strict=True)
            )
        return states

    @redis_boundary("reading sessions with their checkpoint")
    def get_with_checkpoint(
        self, partition: int, session_ids: Sequence[str]
    ) -> tuple[str, list[SessionState | None]]:
        """The checkpoint and these sessions of one partition, read atomically (MULTI).

        They share a hash slot, so this works in Redis Cluster too; ``verify`` uses it to
        compare sessions with the fold at exactly that checkpoint while writers go on.
        """
        pipe = self.client.pipeline(transaction=True)
        pipe.get(self.keys.checkpoint(partition))
        for sid in session_ids:
            pipe.hgetall(self.keys.session(partition, sid))
        self.calls += 1
        token, *values = pipe.execute()
        states = [state_from_hash(sid, v) for sid, v in zip(session_ids, values, strict=True)]
        return str(token or ""), states

    @redis_boundary("checking sessions")
    def not_live(self, items: Sequence[tuple[int, str]]) -> list[str]:
        """The ids among ``(partition, session_id)`` that are unknown, never created or deleted."""
        missing: list[str] = []
        for start in range(0, len(items), READ_CHUNK):
            chunk = items[start : start + READ_CHUNK]
            pipe = self.client.pipeline(transaction=False)
            for partition, sid in chunk:
                pipe.hmget(self.keys.session(partition, sid), fields.CREATED_AT, fields.DELETED)
            self.calls += len(chunk)
            for (_, sid), (created, deleted) in zip(chunk, pipe.execute(), strict=True):
                if not created or deleted:
                    missing.append(sid)
        return missing

    @redis_boundary("listing sessions")
    def list_by(
        self, *, user_id: str | None = None, agent_id: str | None = None
    ) -> list[SessionState]:
        """Live sessions of a user and/or agent (indexes keep deleted ids; they are skipped)."""
        items: list[tuple[int, str]] = []
        for partition in range(self.keys.partitions):
            index = (
                self.keys.by_user(partition, user_id)
                if user_id is not None
                else self.keys.by_agent(partition, agent_id or "")
            )
            self.calls += 1
            items.extend((partition, str(sid)) for sid in self.client.hkeys(index))
        states = [s for s in self.get_many(items) if s is not None and not s.deleted]
        if user_id is not None and agent_id is not None:
            states = [s for s in states if s.agent_id == agent_id]
        return states

    def scan(self) -> Iterator[SessionState]:
        """Every snapshot of this generation, tombstones included."""
        for partition in range(self.keys.partitions):
            prefix = self.keys.session_prefix(partition)
            batch: list[tuple[int, str]] = []
            with redis_errors("scanning sessions"):
                keys = list(self.client.scan_iter(match=prefix + "*", count=READ_CHUNK))
            for key in keys:
                batch.append((partition, str(key)[len(prefix) :]))
                if len(batch) >= READ_CHUNK:
                    yield from (s for s in self.get_many(batch) if s is not None)
                    batch = []
            yield from (s for s in self.get_many(batch) if s is not None)

    @redis_boundary("counting sessions")
    def count(self) -> int:
        """How many snapshots (tombstones included) this generation holds; keys only."""
        return sum(
            sum(
                1
                for _ in self.client.scan_iter(
                    match=self.keys.session_prefix(p) + "*", count=READ_CHUNK
                )
            )
            for p in range(self.keys.partitions)
        )

    @redis_boundary("dropping a generation")
    def drop(self) -> int:
        """Delete every key of this generation; returns how many."""
        return unlink_matching(self.client, self.keys.generation_pattern(), lambda _: True)


def unlink_matching(client: Client, pattern: str, wanted: Callable[[str], bool]) -> int:
    """``UNLINK`` the keys matching ``pattern`` that ``wanted`` accepts, a thousand at a
    time as ``SCAN`` finds them (never all of them in memory); returns how many."""
    removed = 0
    pending: list[str] = []
    for key in client.scan_iter(match=pattern, count=READ_CHUNK):
        if wanted(str(key)):
            pending.append(key)
        if len(pending) >= READ_CHUNK:
            removed += int(client.unlink(*pending))
            pending = []
    if pending:
        removed += int(client.unlink(*pending))
    return removed
