"""What commands return: plain Structs, so callers (and the CLI's JSON) see data, not objects."""

from __future__ import annotations

from msgspec import Struct

from tracker.events import Position


class CommitResult(Struct, frozen=True):
    """What a single commit did; ``changed`` is false for a stale or repeated offset.

    ``current`` is ``None`` for a deleted session: the commit is recorded, nothing changes.
    """

    session_id: str
    consumer: str
    offset: int
    previous: int | None
    current: int | None
    position: Position
    deleted: bool = False

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
    positions: list[Position] = []
    """The last position appended to each partition (one for the file log)."""


class ResetPlan(Struct, frozen=True):
    """An offset reset, shown before it is applied (as ``kafka-consumer-groups`` does)."""

    session_id: str
    consumer: str
    current: int | None
    target: int
    applied: bool = False
    position: Position | None = None
