"""Queries: Redis only. A reader never opens the log and holds no lock.

A read that misses makes sure it asked the active generation: if a replay in another
process promoted a new one, the reader rebinds and asks again, so a replay never makes a
session that exists read as "not found". If Redis lost the projection altogether (it
restarted empty), ``on_lost`` rebuilds it where the process can (the :class:`Tracker`
has the log); a bare reader says it is unavailable instead of answering "not found".
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import cast

from tracker.connection import REDIS_ERRORS, connect, translate
from tracker.errors import (
    GenerationRetiredError,
    NotYetVisibleError,
    SessionNotFoundError,
    SnapshotUnavailableError,
)
from tracker.events import Position
from tracker.fold import SessionState
from tracker.generations import Generations
from tracker.keys import partition_for
from tracker.model import SessionDTO, SessionId, checked
from tracker.snapshots import RETIRED, SnapshotStore, applied_of


class Reader:
    """Sessions, offsets and applied positions, read from the active generation."""

    def __init__(
        self, generations: Generations, *, on_lost: Callable[[], None] | None = None
    ) -> None:
        self.generations = generations
        self.on_lost = on_lost

    @classmethod
    def connect(cls, redis_url: str, prefix: str = "trk") -> Reader:
        """A reader of the projection under ``prefix`` in the Redis at ``redis_url``."""
        try:
            client = connect(redis_url)
        except REDIS_ERRORS as exc:
            raise translate(exc, "connecting") from exc
        return cls(Generations(client, prefix))

    def close(self) -> None:
        self.generations.close()
        self.generations.client.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _store(self) -> SnapshotStore:
        if self.generations.meta is None:
            self._rebound()
        return self.generations.store

    def _rebound(self) -> bool:
        """Re-read which generation is active; True if that changed what a read would see."""
        before = self.generations.meta
        if not self.generations.refresh():
            if self.on_lost is None:
                raise SnapshotUnavailableError(
                    f"Redis holds no projection under the prefix {self.generations.prefix!r}: "
                    "it was flushed or restarted empty, or nothing was written yet; a projector "
                    "rebuilds it from the log"
                )
            self.on_lost()
            return True
        return self.generations.meta != before

    def partition(self, session_id: str) -> int:
        store = self._store()
        return partition_for(session_id, store.keys.partitions)

    def session_state(self, session_id: str) -> SessionState | None:
        """Everything the projection knows about an id, tombstones and never-created included.

        The id is checked against the model only when no snapshot is found: every stored
        id passed that check when it was written, so successful reads run no regex.
        """
        if not isinstance(cast(object, session_id), str):
            checked(session_id, SessionId, "session_id")
        try:
            for _ in range(3):
                store = self._store()
                partition = partition_for(session_id, store.keys.partitions)
                state, generation = store.get_in_generation(partition, session_id)
                if generation == str(store.keys.generation):
                    break
                self._rebound()
        except UnicodeEncodeError:  # a lone surrogate (bytes in argv that were not UTF-8)
            checked(session_id, SessionId, "session_id")
            raise
        if state is None:
            checked(session_id, SessionId, "session_id")
        return state

    def session_and_applied(self, session_id: str) -> tuple[SessionState | None, Position | None]:
        """:meth:`session_state` and the applied position of its partition, one round trip.

        What the HTTP API's ``GET /api/sessions/{id}`` answers (the session and its
        ``X-Tracker-Position``): one pipelined read where two calls would take two.
        """
        if not isinstance(cast(object, session_id), str):
            checked(session_id, SessionId, "session_id")
        try:
            for _ in range(3):
                store = self._store()
                partition = partition_for(session_id, store.keys.partitions)
                state, generation, token = store.get_one_with_checkpoint(partition, session_id)
                if store.is_current(generation, token):
                    break
                self._rebound()
        except UnicodeEncodeError:  # as in session_state
            checked(session_id, SessionId, "session_id")
            raise
        if state is None:
            checked(session_id, SessionId, "session_id")
        if token == RETIRED:  # replaced three times over: read the position the slow way
            return state, self.applied_position(partition)
        return state, applied_of(token)

    def get_session(self, session_id: str) -> SessionDTO | None:
        """The session, or ``None`` if it is unknown, deleted or was never created."""
        state = self.session_state(session_id)
        return state.to_dto() if state is not None else None

    def offsets(self, session_id: str) -> dict[str, int]:
        """A session's offsets; also for a session that has offsets but was never created."""
        state = self.session_state(session_id)
        if state is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if state.deleted:
            raise SessionNotFoundError(f"session {session_id} was deleted")
        return dict(state.offsets)

    def list_sessions(
        self, *, user_id: str | None = None, agent_id: str | None = None
    ) -> list[SessionDTO]:
        """Sessions of a user and/or an agent (all sessions when neither is given), oldest first.

        Read again if a replay promoted a new generation while the list was being read.
        """
        if user_id is not None:
            checked(user_id, SessionId, "user_id")
        if agent_id is not None:
            checked(agent_id, SessionId, "agent_id")
        while True:
            store = self._store()
            if user_id is None and agent_id is None:
                states: Iterable[SessionState] = list(store.scan())
            else:
                states = store.list_by(user_id=user_id, agent_id=agent_id)
            if not self._rebound():
                break
        dtos = [dto for state in states if (dto := state.to_dto()) is not None]
        dtos.sort(key=lambda dto: (dto.created_at, dto.id))
        return dtos

    def applied_position(self, partition: int = 0) -> Position | None:
        """The last log position applied to Redis for a partition."""
        while True:
            try:
                return self._store().applied(partition)
            except GenerationRetiredError:
                self._rebound()

    def wait_for(self, position: Position, timeout: float = 30.0) -> None:
        """Block until ``position`` is applied (read-your-writes); raise after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            applied = self.applied_position(position.partition)
            if applied is not None and applied >= position:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotYetVisibleError(
                    f"position {position.token()} is not applied after {timeout:g} s "
                    f"(partition {position.partition} is applied up to "
                    f"{applied.token() if applied else 'nothing'}); is a projector running?",
                    [position],
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.05)
