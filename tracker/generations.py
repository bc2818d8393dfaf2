"""Which generation of the projection is active, and moving every process to a new one.

``<prefix>:meta`` names the active generation and the log it projects. ``replay``
builds a new generation and promotes it while other processes keep running; they find
out and rebind, never reading "not found" for a session that exists:

* a projector bound to a retired generation fails its next fenced merge: retiring a
  generation first sets its checkpoints to ``retired`` (they are kept; they are tiny),
  and only then drops its other keys;
* a reader whose read misses re-reads the meta hash and retries in the new generation.

If the meta hash is gone (Redis restarted empty, or was flushed) it is created again,
in a generation number no process is bound to, and the projection is rebuilt from the
log by whoever projects.
"""

from __future__ import annotations

import re
import threading
from typing import cast

from msgspec import Struct

from tracker.connection import Client, redis_boundary
from tracker.errors import SnapshotStoreError
from tracker.keys import Keys
from tracker.snapshots import (
    READ_CHUNK,
    RETIRED,
    SCHEMA_VERSION,
    SnapshotStore,
    unlink_matching,
)

_BEGIN = """
local n = redis.call('HINCRBY', KEYS[1], 'next_generation', 1)
local active = redis.call('HGET', KEYS[1], 'generation') or '0'
local floor = math.max(tonumber(ARGV[1]), tonumber(active))
if n <= floor then
  n = floor + 1
  redis.call('HSET', KEYS[1], 'next_generation', n)
end
return n
"""

_PROMOTE = """
local active = tonumber(redis.call('HGET', KEYS[1], 'generation') or '0')
local owner = redis.call('HGET', KEYS[1], 'log_id')
if owner and owner ~= ARGV[2] and ARGV[5] ~= '1' then
  return -1
end
if active >= tonumber(ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'log_id', ARGV[2], 'partitions', ARGV[3],
           'schema', ARGV[4])
return 1
"""


class Meta(Struct, frozen=True):
    """The meta hash: the active generation and the log it is a projection of."""

    generation: int
    log_id: str
    partitions: int
    schema: str = SCHEMA_VERSION


def _parse(values: dict[str, str]) -> Meta | None:
    """The meta hash's fields; ``None`` if there is none (or only a rebuild's counter)."""
    if "generation" not in values:
        return None
    try:
        return Meta(
            int(values["generation"]),
            values["log_id"],
            int(values["partitions"]),
            values.get("schema", "1"),
        )
    except (KeyError, ValueError):
        raise SnapshotStoreError(f"the projection's meta hash is damaged: {values!r}") from None


class Generations:
    """The active generation's :class:`SnapshotStore`, shared by a process's roles.

    ``store`` is swapped (never mutated) when the active generation changes, so threads
    can read it without a lock.
    """

    def __init__(self, client: Client, prefix: str, *, log_id: str | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.log_id = log_id
        """The log this process projects: binding to another log's projection is refused."""
        self.meta_key = Keys.meta(prefix)
        self._begin = client.register_script(_BEGIN)
        self._promote = client.register_script(_PROMOTE)
        self._mutex = threading.Lock()
        self.meta: Meta | None = None
        self._store: SnapshotStore | None = None

    @property
    def store(self) -> SnapshotStore:
        if self._store is None:
            raise SnapshotStoreError(
                f"Redis holds no projection under the prefix {self.prefix!r} yet: nothing was "
                "ever written there, or Redis was flushed (a projector rebuilds it)"
            )
        return self._store

    @redis_boundary("reading the projection's meta hash")
    def read(self) -> Meta | None:
        return _parse(cast(dict[str, str], self.client.hgetall(self.meta_key)))

    def refresh(self) -> bool:
        """Re-read the meta hash and rebind if the active generation changed; False if none."""
        meta = self.read()
        if meta is None:
            return False
        self._bind(meta)
        return True

    def _bind(self, meta: Meta) -> None:
        if self.log_id is not None and meta.log_id != self.log_id:
            raise SnapshotStoreError(
                f"Redis prefix {self.prefix!r} holds the projection of another log "
                f"(log {meta.log_id}; this one is {self.log_id}): use another --prefix for "
                "this data dir, or `tracker replay --force` to replace that projection"
            )
        with self._mutex:
            if self.meta == meta and self._store is not None:
                return
            old = self._store
            self.meta = meta
            self._store = SnapshotStore(
                self.client, Keys(self.prefix, meta.generation, meta.partitions)
            )
            if old is not None:
                old.close()

    # -- rebuilds --------------------------------------------------------------------

    @redis_boundary("starting a new generation")
    def begin(self, partitions: int) -> SnapshotStore:
        """An empty store for a new generation, above every generation ever used here."""
        bound = self.meta.generation if self.meta is not None else 0
        generation = int(self._begin(keys=[self.meta_key], args=[bound]))
        store = SnapshotStore(self.client, Keys(self.prefix, generation, partitions))
        store.drop()
        # every checkpoint exists from the start (empty: nothing applied), so that retiring
        # this generation poisons a partition even if nothing was ever merged into it
        pipe = self.client.pipeline(transaction=False)
        for partition in range(partitions):
            pipe.set(store.keys.checkpoint(partition), "")
        pipe.execute()
        return store

    @redis_boundary("promoting the new generation")
    def promote(self, store: SnapshotStore, log_id: str, *, force: bool = False) -> bool:
        """Make ``store``'s generation the active one, unless a newer one already is.

        Generations only move forward, so of two replays running at once the later one
        wins and the other's work is retired: never an active generation that another
        replay retired. The generation it replaces is retired *before* it is promoted, so
        that no merge can land in it once readers have moved on: a process still bound to
        it fails its next merge, waits for the promotion and rebinds. Binds to whichever
        generation is active afterwards.
        """
        keys = store.keys
        active = self.read()
        if active is not None and active.generation < keys.generation:
            self._poison(active)
        outcome = int(
            self._promote(
                keys=[self.meta_key],
                args=[keys.generation, log_id, keys.partitions, SCHEMA_VERSION, int(force)],
            )
        )
        if outcome < 0:
            raise SnapshotStoreError(
                f"Redis prefix {self.prefix!r} holds the projection of another log: use "
                "another --prefix for this data dir, or `tracker replay --force` to replace it"
            )
        self.log_id = log_id
        self.refresh()
        return outcome > 0

    def _poison(self, meta: Meta) -> None:
        """Set every checkpoint of ``meta``'s generation to ``retired`` (names known: no SCAN)."""
        keys = Keys(self.prefix, meta.generation, meta.partitions)
        pipe = self.client.pipeline(transaction=False)
        for partition in range(meta.partitions):
            pipe.set(keys.checkpoint(partition), RETIRED)
        pipe.execute()

    @redis_boundary("retiring old generations")
    def retire_older(self) -> int:
        """Poison the checkpoints of every generation older than the active one, then drop
        their other keys. Newer ones (a replay still running) are left alone."""
        meta = self.meta
        assert meta is not None
        pattern = re.compile(rf"{re.escape(self.prefix)}:g(\d+):")

        def older(key: str) -> bool:
            match = pattern.match(key)
            return match is not None and int(match.group(1)) < meta.generation

        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(match=f"{self.prefix}:g*:cp", count=READ_CHUNK):
            if older(str(key)):
                pipe.set(key, RETIRED)
        pipe.execute()
        return unlink_matching(
            self.client, f"{self.prefix}:g*", lambda key: older(key) and not key.endswith(":cp")
        )

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
