"""SnapshotStore.merge on large batches: several round trips, sent from the merge thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import redis

from tracker.errors import CheckpointConflictError
from tracker.events import OffsetCommitted, SessionCreated, utcnow
from tracker.fold import fold_all, fold_batch, visible
from tracker.keys import Keys
from tracker.snapshots import (
    CHUNK_SESSIONS,
    CHUNKS_PER_ROUND_TRIP,
    SnapshotStore,
    parse_created,
    to_micros,
)

SESSIONS = CHUNK_SESSIONS * CHUNKS_PER_ROUND_TRIP * 2 + 7  # three round trips, the last short


@pytest.fixture
def store(redis_client: redis.Redis, prefix: str) -> Iterator[SnapshotStore]:
    snapshots = SnapshotStore(redis_client, Keys(prefix, 1, 1))
    yield snapshots
    snapshots.close()


def events() -> list[SessionCreated | OffsetCommitted]:
    now = utcnow()
    batch: list[SessionCreated | OffsetCommitted] = []
    for n in range(SESSIONS):
        sid = f"s{n}"
        batch.append(
            SessionCreated(session_id=sid, agent_id="a", user_id=f"u{n % 7}", created_at=now)
        )
        batch += [OffsetCommitted(session_id=sid, consumer=c, offset=n) for c in ("x", "y")]
    return batch


def test_a_batch_of_several_round_trips_equals_the_fold(store: SnapshotStore) -> None:
    batch = events()
    before = threading.active_count()
    store.merge(0, list(fold_batch(batch).values()), after="", upto="0:0:9")
    assert threading.active_count() == before + 1  # the merge thread, kept for the next batch
    assert store.checkpoint(0) == "0:0:9"
    assert {s.session_id: s for s in store.scan()} == visible(fold_all(batch))
    assert len(store.list_by(user_id="u3")) == len([n for n in range(SESSIONS) if n % 7 == 3])
    store.close()
    assert threading.active_count() == before


def test_a_fenced_out_batch_of_several_round_trips_changes_nothing(
    store: SnapshotStore, redis_client: redis.Redis, prefix: str
) -> None:
    store.merge(0, list(fold_batch(events()[:3]).values()), after="", upto="0:0:1")
    dump = {key: redis_client.dump(key) for key in redis_client.scan_iter(match=f"{prefix}:*")}
    with pytest.raises(CheckpointConflictError, match="0:0:1"):
        store.merge(0, list(fold_batch(events()).values()), after="", upto="0:0:9")
    after = {key: redis_client.dump(key) for key in redis_client.scan_iter(match=f"{prefix}:*")}
    assert after == dump


@pytest.mark.parametrize(
    "value",
    [
        datetime(2025, 1, 25, 22, 41, 41, tzinfo=UTC),
        datetime(2025, 1, 25, 22, 41, 41, 123456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1, 1, 1, tzinfo=UTC),
    ],
)
def test_created_at_is_stored_as_exact_microseconds(value: datetime) -> None:
    stored = str(to_micros(value))
    assert stored.lstrip("-").isdigit()
    assert parse_created(stored) == value


def test_created_at_stored_as_text_by_earlier_versions_still_reads() -> None:
    assert parse_created("2025-01-25T22:41:41.123Z") == datetime(
        2025, 1, 25, 22, 41, 41, 123000, tzinfo=UTC
    )
