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

import threading
from typing import cast

import redis
from msgspec import Struct

from tracker.errors import SnapshotStoreError
from tracker.keys import Keys
from tracker.snapshots import READ_CHUNK, RETIRED, SCHEMA_VERSION, SnapshotStore, redis_boundary

_CREATE_META = """
if redis.call('HEXISTS', KEYS[1], 'generation') == 0 then
  redis.call('HSET', KEYS[1], 'generation', ARGV[1], 'next_generation', ARGV[1],
             'log_id', ARGV[2], 'partitions', ARGV[3], 'schema', ARGV[4])
end
return redis.call('HGETALL', KEYS[1])
"""


class Meta(Struct, frozen=True):
    """The meta hash: the active generation and the log it is a projection of."""

    generation: int
    log_id: str
    partitions: int


def _parse(values: dict[str, str]) -> Meta | None:
    """The meta hash's fields; ``None`` if there is none (or only a rebuild's counter)."""
    if "generation" not in values:
        return None
    try:
        return Meta(int(values["generation"]), values["log_id"], int(values["partitions"]))
    except (KeyError, ValueError):
        raise SnapshotStoreError(f"the projection's meta hash is damaged: {values!r}") from None


class Generations:
    """The active generation's :class:`SnapshotStore`, shared by a process's roles.

    ``store`` is swapped (never mutated) when the active generation changes, so threads
    can read it without a lock.
    """

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.meta_key = Keys.meta(prefix)
        self._create = client.register_script(_CREATE_META)
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

    @redis_boundary("creating the projection's meta hash")
    def ensure(self, log_id: str, partitions: int) -> Meta:
        """The meta hash, created (atomically, once) if there is none; binds to it."""
        bound = self.meta.generation if self.meta is not None else 0
        counter = self.client.hget(self.meta_key, "next_generation")
        fresh = max(bound, int(counter or 0)) + 1
        raw = self._create(keys=[self.meta_key], args=[fresh, log_id, partitions, SCHEMA_VERSION])
        values = dict(zip(raw[::2], raw[1::2], strict=True))
        meta = _parse(values)
        assert meta is not None
        self._bind(meta)
        return meta

    def refresh(self) -> bool:
        """Re-read the meta hash and rebind if the active generation changed; False if none."""
        meta = self.read()
        if meta is None:
            return False
        self._bind(meta)
        return True

    def _bind(self, meta: Meta) -> None:
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
        generation = int(self.client.hincrby(self.meta_key, "next_generation", 1))
        meta = self.read()
        floor = max(meta.generation if meta else 0, self.meta.generation if self.meta else 0)
        if generation <= floor:
            generation = floor + 1
            self.client.hset(self.meta_key, "next_generation", generation)
        store = SnapshotStore(self.client, Keys(self.prefix, generation, partitions))
        store.drop()
        return store

    @redis_boundary("promoting the new generation")
    def promote(self, store: SnapshotStore, log_id: str) -> None:
        """Make ``store``'s generation the active one, then retire every other generation."""
        keys = store.keys
        self.client.hset(
            self.meta_key,
            mapping={
                "generation": str(keys.generation),
                "log_id": log_id,
                "partitions": str(keys.partitions),
                "schema": SCHEMA_VERSION,
            },
        )
        self._bind(Meta(keys.generation, log_id, keys.partitions))

    @redis_boundary("retiring old generations")
    def retire_others(self) -> int:
        """Poison every other generation's checkpoints, then drop the rest of its keys."""
        meta = self.meta
        assert meta is not None
        keep = f"{self.prefix}:g{meta.generation}:"
        pipe = self.client.pipeline(transaction=False)
        for key in self.client.scan_iter(match=f"{self.prefix}:g*:cp", count=READ_CHUNK):
            if not str(key).startswith(keep):
                pipe.set(key, RETIRED)
        pipe.execute()
        removed = 0
        pending: list[str] = []
        for key in self.client.scan_iter(match=f"{self.prefix}:g*", count=READ_CHUNK):
            name = str(key)
            if not name.startswith(keep) and not name.endswith(":cp"):
                pending.append(name)
            if len(pending) >= READ_CHUNK:
                removed += int(self.client.unlink(*pending))
                pending = []
        if pending:
            removed += int(self.client.unlink(*pending))
        return removed

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
