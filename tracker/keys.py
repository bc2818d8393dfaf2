"""Every Redis key the tracker writes, and how sessions map to partitions and hash slots.

::

    <prefix>:meta                          hash: generation, log_id, partitions, schema
    <prefix>:g<G>:{<tag N>}:cp             partition N's checkpoint (last applied position)
    <prefix>:g<G>:{<tag N>}:s:<session>    hash: a, u, c (microseconds), t, d, o<consumer>
    <prefix>:g<G>:{<tag N>}:u:<user>       hash: session id -> 1 (sessions of a user)
    <prefix>:g<G>:{<tag N>}:a:<agent>      hash: session id -> 1 (sessions of an agent)

All keys of one partition share the hash tag ``{<tag N>}``, so one Lua call can update a
partition's sessions and its checkpoint atomically, in Redis Cluster too. Tags are chosen
so that the P partitions' slots spread evenly over 0..16383.
"""

from __future__ import annotations

from functools import lru_cache

SLOTS = 16384

AGENT, USER, CREATED_AT, TITLE, DELETED = "a", "u", "c", "t", "d"
OFFSET_PREFIX = "o"
"""Offset fields are "o" + the consumer: longer than the one-letter fixed fields, so
unambiguous, and a byte shorter than "o:" (which moves many hashes to a smaller
allocation)."""


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16 = _crc16_table()


def hash_slot(key: str) -> int:
    """Redis Cluster's slot of a key (CRC16/XMODEM of its first non-empty ``{...}``)."""
    data = key.encode()
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc % SLOTS


@lru_cache(maxsize=16)
def partition_tags(partitions: int) -> tuple[str, ...]:
    """Hash-tag strings, one per partition, whose slots fall in evenly spaced ranges."""
    tags = []
    for n in range(partitions):
        low, high = n * SLOTS // partitions, (n + 1) * SLOTS // partitions
        candidate, k = f"p{n}", 0
        while not low <= hash_slot("{" + candidate + "}") < high:
            candidate, k = f"p{n}.{k}", k + 1
        tags.append(candidate)
    return tuple(tags)


def partition_for(session_id: str, partitions: int) -> int:
    """Kafka's default partitioner for a key: murmur2 of the session id, mod P."""
    if partitions == 1:
        return 0
    from kafka.partitioner.default import murmur2

    return int(murmur2(session_id.encode()) & 0x7FFFFFFF) % partitions


class Keys:
    """Key names for one generation of one prefix."""

    __slots__ = ("_bases", "generation", "partitions", "prefix")

    def __init__(self, prefix: str, generation: int, partitions: int) -> None:
        self.prefix = prefix
        self.generation = generation
        self.partitions = partitions
        self._bases = [f"{prefix}:g{generation}:{{{tag}}}" for tag in partition_tags(partitions)]

    @staticmethod
    def meta(prefix: str) -> str:
        return f"{prefix}:meta"

    def checkpoint(self, partition: int) -> str:
        return self._bases[partition] + ":cp"

    def session(self, partition: int, session_id: str) -> str:
        return f"{self._bases[partition]}:s:{session_id}"

    def session_prefix(self, partition: int) -> str:
        return self._bases[partition] + ":s:"

    def by_user(self, partition: int, user_id: str) -> str:
        return f"{self._bases[partition]}:u:{user_id}"

    def by_agent(self, partition: int, agent_id: str) -> str:
        return f"{self._bases[partition]}:a:{agent_id}"

    def generation_pattern(self) -> str:
        return f"{self.prefix}:g{self.generation}:*"
