"""The Redis projection against a real Redis: whatever the batching, redelivery, racing
projectors or crashes mid-batch, Redis ends equal to the pure fold of the whole log.
"""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import threading
from collections.abc import Iterator, Sequence
from math import ceil
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.services import spawned_redis
from tests.test_fold import CONSUMERS, T0, any_events, event_lists, split
from tracker.connection import Client
from tracker.errors import CheckpointConflictError
from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    Position,
    SessionCreated,
    SessionDeleted,
    encode_validated,
)
from tracker.fold import BatchFolder, Delta, SessionState, fold_all, fold_batch, visible
from tracker.keys import SLOTS, Keys, hash_slot, partition_tags
from tracker.logs.file import FileLog
from tracker.model import MAX_OFFSET
from tracker.projector import Projector
from tracker.snapshots import CHUNK_SESSIONS, SnapshotStore, partial_checkpoint

REDIS_PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

batch_records = st.integers(1, 12)
chunk_sizes = st.integers(1, 5)


class World:
    """Fresh log + store per hypothesis example, under this test's Redis prefix."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self._numbers = itertools.count()

    def keys(self) -> Keys:
        return Keys(f"{self.prefix}:x{next(self._numbers)}", 1, 1)

    @contextlib.contextmanager
    def example(self) -> Iterator[tuple[FileLog, SnapshotStore]]:
        keys = self.keys()
        with tempfile.TemporaryDirectory(prefix="proj-") as directory:
            store = SnapshotStore(self.client, keys)
            try:
                with FileLog(Path(directory) / "log", fsync=False) as log:
                    yield log, store
            finally:
                store.drop()
                store.close()


@pytest.fixture
def world(redis_client: redis.Redis, prefix: str) -> World:
    return World(redis_client, prefix)


def append(log: FileLog, events: Sequence[AnyEvent], sizes: Sequence[int] = ()) -> None:
    """Append ``events`` in batches of the given sizes (cycled; one batch if none)."""
    records = encode_validated(events)
    cycle = itertools.cycle(sizes or [max(len(records), 1)])
    start = 0
    while start < len(records):
        size = next(cycle)
        log.append(0, records[start : start + size])
        start += size


def redis_state(store: SnapshotStore) -> dict[str, SessionState]:
    return {state.session_id: state for state in store.scan()}


def expected_state(events: Sequence[AnyEvent]) -> dict[str, SessionState]:
    return visible(fold_all(events))


def assert_projection(store: SnapshotStore, log: FileLog, events: Sequence[AnyEvent]) -> None:
    expected = expected_state(events)
    assert redis_state(store) == expected
    end = log.end(0)
    assert store.checkpoint(0) == (end.token() if end else "")
    users = {s.user_id for s in expected.values() if s.created and s.user_id}
    for user in users:
        listed = {s.session_id for s in store.list_by(user_id=user)}
        assert listed == {sid for sid, s in expected.items() if s.user_id == user and not s.deleted}


# -- random batching, live catch-up, redelivery -------------------------------------------


@REDIS_PROPERTY
@given(
    events=event_lists,
    append_sizes=st.lists(st.integers(1, 9), max_size=4),
    batch=st.integers(1, 40),
    chunk=chunk_sizes,
    max_sessions=st.integers(1, 6),
)
def test_projection_equals_the_fold(
    world: World,
    events: list[AnyEvent],
    append_sizes: list[int],
    batch: int,
    chunk: int,
    max_sessions: int,
) -> None:
    with world.example() as (log, store):
        append(log, events, append_sizes)
        projector = Projector(
            log, store, batch_records=batch, chunk_sessions=chunk, max_sessions=max_sessions
        )
        assert projector.catch_up() == len(events)
        assert_projection(store, log, events)
        # redelivery: the same projector again, then another one with other sizes
        assert projector.catch_up() == 0
        other = Projector(log, store, batch_records=batch + 3, chunk_sessions=chunk + 1)
        assert other.catch_up() == 0
        assert_projection(store, log, events)


@REDIS_PROPERTY
@given(data=st.data(), batch=batch_records, chunk=chunk_sizes)
def test_live_catch_up_between_appends_equals_the_fold(
    world: World, data: st.DataObject, batch: int, chunk: int
) -> None:
    events = data.draw(event_lists, label="events")
    appends = data.draw(split(events), label="appends")
    with world.example() as (log, store):
        projector = Projector(log, store, batch_records=batch, chunk_sessions=chunk)
        appended: list[AnyEvent] = []
        for part in appends:
            append(log, part)
            appended.extend(part)
            if data.draw(st.booleans(), label="catch up now"):
                projector.catch_up()
                assert redis_state(store) == expected_state(appended)
        projector.catch_up()
        assert_projection(store, log, events)


@REDIS_PROPERTY
@given(data=st.data(), chunk=chunk_sizes)
def test_projecting_appended_events_without_reading_them_back(
    world: World, data: st.DataObject, chunk: int
) -> None:
    """The write path: each append is merged from memory; a skipped merge (Redis was down)
    or a rival that got there first makes the next one fall back to catching up."""
    events = data.draw(event_lists, label="events")
    appends = [part for part in data.draw(split(events), label="appends") if part]
    with world.example() as (log, store):
        projector = Projector(log, store, chunk_sessions=chunk)
        rival = Projector(log, store, batch_records=3, chunk_sessions=2)
        appended: list[AnyEvent] = []
        for part in appends:
            appended_now = log.append(0, encode_validated(part))
            appended.extend(part)
            action = data.draw(st.sampled_from(["apply", "skip", "rival first"]), label="action")
            if action == "rival first":
                rival.catch_up()
            if action != "skip":
                folder = BatchFolder()
                folder.add(part)
                projector.apply_appended(appended_now, folder)
                assert redis_state(store) == expected_state(appended)
        projector.catch_up()
        assert_projection(store, log, events)


# -- racing projectors ----------------------------------------------------------------------


class InterleavingStore(SnapshotStore):
    """A real store whose ``merge`` first lets another projector run (a chosen race)."""

    def __init__(self, client: Client, keys: Keys, cut_in: Sequence[int]) -> None:
        super().__init__(client, keys)
        self.cut_in = set(cut_in)
        self.merges = 0
        self.rival: Projector | None = None
        self.conflicts = 0

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
        self.merges += 1
        if self.merges in self.cut_in and self.rival is not None:
            self.rival.catch_up_partition(partition)
        try:
            super().merge(
                partition,
                deltas,
                after=after,
                upto=upto,
                chunk_sessions=chunk_sessions,
                first_chunk=first_chunk,
            )
        except CheckpointConflictError:
            self.conflicts += 1
            raise


@REDIS_PROPERTY
@given(
    events=event_lists,
    sizes=st.lists(st.integers(1, 6), max_size=3),
    batches=st.tuples(batch_records, batch_records),
    chunks=st.tuples(chunk_sizes, chunk_sizes),
    cut_in=st.lists(st.integers(1, 8), max_size=4),
)
def test_a_rival_projector_cutting_in_between_read_and_merge(
    world: World,
    events: list[AnyEvent],
    sizes: list[int],
    batches: tuple[int, int],
    chunks: tuple[int, int],
    cut_in: list[int],
) -> None:
    """Projector A reads a batch; before it merges, B applies as much as it can (a zombie A)."""
    with world.example() as (log, store):
        append(log, events, sizes)
        a_store = InterleavingStore(store.client, store.keys, cut_in)
        a = Projector(log, a_store, batch_records=batches[0], chunk_sessions=chunks[0])
        b = Projector(log, store, batch_records=batches[1], chunk_sessions=chunks[1])
        a_store.rival = b
        a.catch_up()
        if events and 1 in cut_in:
            assert a_store.conflicts >= 1, "B applied everything first, so A was fenced out"
        assert_projection(store, log, events)


@settings(REDIS_PROPERTY, max_examples=20)
@given(events=event_lists, sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_projectors_in_threads_race_to_the_same_state(
    world: World, events: list[AnyEvent], sizes: list[int]
) -> None:
    log_events = events * 3
    with world.example() as (log, store):
        append(log, log_events, sizes)
        log.read(0, None, 1)  # open the read descriptor before threads share the log
        errors: list[BaseException] = []
        barrier = threading.Barrier(3, timeout=30)

        def run(batch: int, chunk: int) -> None:
            try:
                mine = SnapshotStore(store.client, store.keys)
                barrier.wait()
                Projector(log, mine, batch_records=batch, chunk_sessions=chunk).catch_up()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(b, c)) for b, c in [(1, 1), (5, 2), (50, 3)]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        assert_projection(store, log, log_events)


def test_threads_racing_over_many_sessions(world: World) -> None:
    """Many small batches of many sessions, four projectors at once, checked against the fold."""
    events: list[AnyEvent] = []
    for i in range(300):
        sid = f"s{i % 97}"
        if i % 97 == i:
            events.append(
                SessionCreated(
                    session_id=sid, agent_id="a", user_id=f"u{i % 5}", created_at=T0, title=None
                )
            )
        events.append(OffsetCommitted(session_id=sid, consumer=CONSUMERS[i % 3], offset=i))
        if i % 41 == 0:
            events.append(OffsetReset(session_id=sid, consumer=CONSUMERS[i % 3], offset=1))
        if i % 89 == 88:
            events.append(SessionDeleted(session_id=f"s{i % 13}"))
    with world.example() as (log, store):
        append(log, events, [7, 30, 1])
        log.read(0, None, 1)
        errors: list[BaseException] = []

        def run(batch: int, chunk: int) -> None:
            try:
                mine = SnapshotStore(store.client, store.keys)
                Projector(log, mine, batch_records=batch, chunk_sessions=chunk).catch_up()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [
            threading.Thread(target=run, args=args) for args in [(3, 1), (17, 4), (64, 2), (9, 9)]
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        assert_projection(store, log, events)


# -- zombies and crashes mid-batch --------------------------------------------------------


def raw_dump(client: Client, keys: Keys) -> dict[str, object]:
    """Every key of the generation with its value, to show that nothing changed."""
    out: dict[str, object] = {}
    for key in client.scan_iter(match=keys.generation_pattern()):
        out[key] = client.get(key) if client.type(key) == "string" else client.hgetall(key)
    return out


def test_a_zombie_with_a_stale_checkpoint_is_fenced_out(world: World) -> None:
    with world.example() as (log, store):
        first: list[AnyEvent] = [
            SessionCreated(session_id="s1", agent_id="a", user_id="u", created_at=T0),
            OffsetCommitted(session_id="s1", consumer="client", offset=5),
        ]
        append(log, first)
        Projector(log, store).catch_up()
        stale_after = store.checkpoint(0)
        assert stale_after == Position(0, 0, 1).token()
        later: list[AnyEvent] = [
            OffsetReset(session_id="s1", consumer="client", offset=2),
            OffsetCommitted(session_id="s2", consumer="client", offset=1),
        ]
        append(log, later)
        zombie_batches = log.read(0, Position.parse(stale_after), 100)
        Projector(log, store).catch_up()  # the live projector moves on
        before = raw_dump(store.client, store.keys)
        assert before
        # the zombie re-applies the batch it read earlier, from its stale checkpoint...
        zombie_deltas = list(fold_batch(later).values())
        with pytest.raises(CheckpointConflictError) as info:
            store.merge(
                0,
                zombie_deltas,
                after=stale_after,
                upto=zombie_batches[-1].last.token(),
                chunk_sessions=1,
            )
        assert info.value.retriable
        # ... and also a batch from the very start
        with pytest.raises(CheckpointConflictError):
            store.merge(0, list(fold_batch(first).values()), after="", upto=stale_after)
        assert raw_dump(store.client, store.keys) == before
        assert_projection(store, log, first + later)


class Crash(Exception):
    """The projector process 'died' after sending some of a batch's chunk calls."""


class CrashingStore(SnapshotStore):
    """The real merge, in a process that 'dies' between two of a batch's chunk calls.

    Each chunk call is its own round trip (``chunks_per_round_trip = 1``), so a crash at
    the round-trip seam (:meth:`SnapshotStore._execute`) can fall between any two of them.
    Lets ``spare`` multi-chunk merges through; in the next one, lets the first round trips
    through (at least one, never all; how many depends on ``seed``), then fails this one
    and every later one, as a dead process sends nothing more.
    """

    def __init__(self, client: Client, keys: Keys, *, spare: int, seed: int) -> None:
        super().__init__(client, keys)
        self.chunks_per_round_trip = 1
        self.spare = spare
        self.seed = seed
        self.crashed = False
        self.sends_left: int | None = None

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
        remaining = max(ceil(len(deltas) / chunk_sessions), 1) - first_chunk
        if remaining >= 2 and self.sends_left is None:
            if self.spare > 0:
                self.spare -= 1
            else:
                self.sends_left = 1 + self.seed % (remaining - 1)
        super().merge(
            partition,
            deltas,
            after=after,
            upto=upto,
            chunk_sessions=chunk_sessions,
            first_chunk=first_chunk,
        )

    def _execute(self, pipe: redis.client.Pipeline) -> list[Any]:
        if self.sends_left == 0:
            self.crashed = True
            raise Crash("died between two chunk calls")
        if self.sends_left is not None:
            self.sends_left -= 1
        return super()._execute(pipe)


many_session_events = st.lists(
    any_events(st.sampled_from([f"s{i}" for i in range(12)])), min_size=10, max_size=60
)


@REDIS_PROPERTY
@given(
    events=many_session_events,
    warm_quarters=st.integers(0, 2),
    sizes=st.lists(st.integers(1, 15), max_size=3),
    batch=st.integers(2, 12),
    chunk=st.integers(1, 3),
    spare=st.integers(0, 3),
    seed=st.integers(0, 10),
    crashes=st.integers(1, 3),
    finisher=st.tuples(batch_records, chunk_sizes),
    max_sessions=st.integers(2, 50),
)
def test_a_crash_mid_batch_is_finished_by_a_fresh_projector(
    world: World,
    events: list[AnyEvent],
    warm_quarters: int,
    sizes: list[int],
    batch: int,
    chunk: int,
    spare: int,
    seed: int,
    crashes: int,
    finisher: tuple[int, int],
    max_sessions: int,
) -> None:
    with world.example() as (log, store):
        # up to half of the log is already projected, so crashes happen past its start too
        warm = len(events) * warm_quarters // 4
        append(log, events[:warm], sizes)
        Projector(log, store, batch_records=5).catch_up()
        append(log, events[warm:], sizes)
        for _ in range(crashes):
            crashing = CrashingStore(store.client, store.keys, spare=spare, seed=seed)
            projector = Projector(
                log, crashing, batch_records=batch, chunk_sessions=chunk, max_sessions=max_sessions
            )
            with contextlib.suppress(Crash), contextlib.closing(crashing):
                projector.catch_up()
            token = store.checkpoint(0)
            event(f"crashed mid-batch: {crashing.crashed}")
            if crashing.crashed:
                event(f"crashed after the first batch: {not token.startswith('>')}")
                assert "#" in token, f"a partial checkpoint, not {token!r}"
        fresh = Projector(log, store, batch_records=finisher[0], chunk_sessions=finisher[1])
        fresh.catch_up()
        assert "#" not in store.checkpoint(0)
        assert_projection(store, log, events)


def test_a_partial_checkpoint_names_the_batch_and_is_finished(world: World) -> None:
    events: list[AnyEvent] = [
        OffsetCommitted(session_id=f"s{i}", consumer="client", offset=i) for i in range(10)
    ]
    with world.example() as (log, store):
        append(log, events[:4])
        append(log, events[4:])
        crashing = CrashingStore(store.client, store.keys, spare=0, seed=1)
        with pytest.raises(Crash), contextlib.closing(crashing):
            Projector(log, crashing, batch_records=100, chunk_sessions=3).catch_up()
        assert crashing.crashed
        token = store.checkpoint(0)
        assert token == partial_checkpoint("", Position(0, 1, 5).token(), 1, 3)
        partial = redis_state(store)
        assert set(partial) == {f"s{i}" for i in range(6)}, "two chunks of three sessions"
        assert Projector(log, store, batch_records=1, chunk_sessions=50).catch_up() == 10
        assert_projection(store, log, events)


# -- keys and hash slots ------------------------------------------------------------------


@pytest.mark.parametrize("partitions", range(1, 17))
def test_partition_tags_spread_slots_evenly(partitions: int) -> None:
    tags = partition_tags(partitions)
    assert len(tags) == partitions
    assert len(set(tags)) == partitions
    for n, tag in enumerate(tags):
        assert "{" not in tag and "}" not in tag
        slot = hash_slot("{" + tag + "}")
        assert n * SLOTS // partitions <= slot < (n + 1) * SLOTS // partitions


@pytest.mark.parametrize("partitions", [1, 3, 16])
def test_all_keys_of_a_partition_share_its_slot(partitions: int) -> None:
    keys = Keys("trk.test", 4, partitions)
    for partition in range(partitions):
        names = [
            keys.checkpoint(partition),
            keys.session(partition, "zv3h4j5Fjv"),
            keys.session(partition, "x{y}z"),
            keys.by_user(partition, "u-1"),
            keys.by_agent(partition, "a_1"),
        ]
        assert {hash_slot(name) for name in names} == {
            hash_slot("{" + partition_tags(partitions)[partition] + "}")
        }


def test_hash_slot_known_values() -> None:
    # from the Redis Cluster specification and the CLUSTER KEYSLOT documentation
    assert hash_slot("123456789") == 0x31C3 % SLOTS
    assert hash_slot("somekey") == 11058
    assert hash_slot("foo{hash_tag}") == hash_slot("bar{hash_tag}") == 2515
    assert hash_slot("{user1000}.following") == hash_slot("{user1000}.followers")


@pytest.fixture(scope="module")
def cluster_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    """A cluster-enabled redis-server (no slots assigned): it answers CLUSTER KEYSLOT."""
    workdir = tmp_path_factory.mktemp("cluster")
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", str(workdir / "nodes.conf")]
    with spawned_redis(workdir, extra) as (url, _):
        client = redis.Redis.from_url(url, decode_responses=True)
        try:
            yield client
        finally:
            client.close()


@settings(max_examples=100, deadline=None)
@given(
    key=st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=30),
        st.from_regex(r"[a-z]{0,4}\{[a-z0-9]{0,4}\}[a-z{}]{0,6}", fullmatch=True),
    )
)
def test_hash_slot_matches_redis_cluster_keyslot(cluster_redis: redis.Redis, key: str) -> None:
    command: Any = cluster_redis.execute_command
    assert hash_slot(key) == int(command("CLUSTER", "KEYSLOT", key))


# -- offsets are exact up to 2**63 - 1 ----------------------------------------------------


@pytest.mark.parametrize(
    ("commits", "expected"),
    [
        ([MAX_OFFSET - 1, MAX_OFFSET, MAX_OFFSET - 2], MAX_OFFSET),
        ([2**53, 2**53 + 1], 2**53 + 1),  # equal as doubles
        ([2**53 + 1, 2**53], 2**53 + 1),
        ([MAX_OFFSET - 1, MAX_OFFSET - 2], MAX_OFFSET - 1),
        ([9, 10, 99, 100], 100),  # longer decimal strings are larger
        ([100, 99], 100),
        ([0, MAX_OFFSET], MAX_OFFSET),
    ],
)
@pytest.mark.parametrize("per_batch", [1, 10])
def test_offsets_near_2_63_survive_the_lua_merge_exactly(
    world: World, commits: list[int], expected: int, per_batch: int
) -> None:
    events: list[AnyEvent] = [
        OffsetCommitted(session_id="s1", consumer="client", offset=o) for o in commits
    ]
    with world.example() as (log, store):
        append(log, events, [per_batch])
        Projector(log, store, batch_records=1).catch_up()
        (state,) = store.get_many([(0, "s1")])
        assert state is not None
        assert state.offsets == {"client": expected}
        assert store.client.hget(store.keys.session(0, "s1"), "oclient") == str(expected)
        assert_projection(store, log, events)


def test_a_reset_from_a_huge_offset_down_to_a_small_one(world: World) -> None:
    events: list[AnyEvent] = [
        OffsetCommitted(session_id="s1", consumer="client", offset=MAX_OFFSET),
        OffsetReset(session_id="s1", consumer="client", offset=7),
        OffsetCommitted(session_id="s1", consumer="client", offset=6),
    ]
    for per_batch in (1, 2, 3):
        with world.example() as (log, store):
            append(log, events, [per_batch])
            Projector(log, store, batch_records=1).catch_up()
            assert redis_state(store)["s1"].offsets == {"client": 7}
