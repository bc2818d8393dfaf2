"""What a worker needs from a message stream, whichever kind: the protocol and its pieces.

``FileStream`` (a file log in a directory, the embedded default) and ``KafkaStream`` (a
topic read by a consumer group) provide it; the worker never knows which it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol

from consumers.messages import Headers


class Incoming(NamedTuple):
    """One message as read: its position in its partition and its three parts."""

    position: int
    key: bytes | None
    value: bytes
    headers: Headers


class Chunk(NamedTuple):
    """Messages of one partition, in order, from one poll; ``epoch`` is the assignment
    they were read under (a revocation after the poll makes them stale)."""

    partition: int
    messages: Sequence[Incoming]
    epoch: int


class DeadLetter(NamedTuple):
    partition: int
    position: int
    key: bytes | None
    value: bytes
    headers: Headers
    reason: str


Revoked = Callable[[list[int]], None]
"""Called (on any thread) when partitions are taken away; returns once their positions are
committed, so the next owner starts where this worker stopped."""


class Stream(Protocol):
    """A partitioned message stream read by one consumer (group)."""

    @property
    def description(self) -> str:
        """For logs: which stream and consumer."""
        ...

    @property
    def epoch(self) -> int:
        """Incremented by every revocation: chunks read under an older epoch are stale."""
        ...

    def poll(self, timeout: float) -> list[Chunk]:
        """The next messages, or ``[]`` after ``timeout`` seconds."""
        ...

    def keep_alive(self) -> None:
        """Called while a slow batch is handled: stay in the group without reading more."""
        ...

    def done_keeping_alive(self) -> None:
        """The slow batch ended: read again."""
        ...

    def commit(self, positions: dict[int, int]) -> None:
        """Durably record, per partition, the position of the next message to read."""
        ...

    def dead_letter(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        """Write letters to the dead-letter stream and wait until it has them."""
        ...

    def lag(self) -> int | None:
        """Messages in the stream after this consumer's read position, if known."""
        ...

    def close(self) -> None: ...


DLQ_HEADERS = ("dlq.reason", "dlq.partition", "dlq.offset", "dlq.consumer", "dlq.stream")


def dead_letter_headers(letter: DeadLetter, consumer: str, stream: str) -> Headers:
    """The original headers (a null value as empty) plus why, where from and who
    dead-lettered the message."""
    added = (letter.reason, str(letter.partition), str(letter.position), consumer, stream)
    return [
        *((name, value or b"") for name, value in letter.headers),
        *((name, v.encode()) for name, v in zip(DLQ_HEADERS, added, strict=True)),
    ]
