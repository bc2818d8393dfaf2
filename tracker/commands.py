"""The commands of a :class:`~tracker.service.Tracker`: check, read what they need, append.

Each command validates its input against the model, reads the session it depends on
(one round trip), builds its events and hands them to ``_append``, which the tracker
implements: append, then project or wait, as its mode says.
"""

from __future__ import annotations

import functools
import secrets
import string
from collections.abc import Callable, Iterable
from typing import Concatenate, ParamSpec, TypeVar

from msgspec import structs

from tracker.errors import ClosedError, SessionExistsError, SessionNotFoundError
from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    Position,
    SessionCreated,
    SessionDeleted,
    TitleChanged,
    new_event_ids,
    utcnow,
)
from tracker.fold import BatchFolder, SessionState
from tracker.logs import Appended
from tracker.model import AgentId, ConsumerName, Offset, SessionDTO, SessionId, Title, checked
from tracker.reader import Reader
from tracker.results import AppendResult, CommitResult, ResetPlan
from tracker.snapshots import SnapshotStore
from tracker.writer import Commit, Writer, validate_commits

_ID_ALPHABET = string.ascii_letters + string.digits

Fold = Callable[[BatchFolder], None]
"""Folds a command's own events into a folder, so that it can project them without reading
them back; called only if the tracker projects them itself."""

S = TypeVar("S", bound="Commands")
P = ParamSpec("P")
R = TypeVar("R")


def new_id() -> str:
    """A 10-character id of ``[A-Za-z0-9]``, the shape flux0 generates."""
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(10))


def open_only(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Refuse calls on a closed tracker with a clear, non-retriable error."""

    @functools.wraps(method)
    def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        if self._closed:
            raise ClosedError("the tracker is closed; open a new one with Tracker.open()")
        return method(self, *args, **kwargs)

    return call


class Commands:
    """Session and offset commands; the tracker supplies the roles and ``_append``."""

    reader: Reader
    writer: Writer
    _closed: bool

    @property
    def store(self) -> SnapshotStore:
        raise NotImplementedError

    def _check_projection(self) -> None:
        raise NotImplementedError

    def _append(self, events: list[AnyEvent], *, wait: bool) -> AppendResult:
        raise NotImplementedError

    def _project(self, appended: list[Appended], fold: Fold | None, *, wait: bool) -> AppendResult:
        raise NotImplementedError

    def _live(self, session_id: str) -> SessionState:
        state = self.reader.session_state(session_id)
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

    @open_only
    def create_session(
        self,
        agent_id: str,
        user_id: str,
        *,
        session_id: str | None = None,
        title: str | None = None,
        wait: bool = True,
    ) -> SessionDTO:
        """Create a session; ``session_id`` defaults to a new 10-character id."""
        checked(agent_id, AgentId, "agent_id")
        checked(user_id, SessionId, "user_id")
        if title is not None:
            checked(title, Title, "title")
        sid = new_id() if session_id is None else str(checked(session_id, SessionId, "session_id"))
        self._check_projection()
        existing = self.reader.session_state(sid)
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
        self._append([created], wait=wait)
        offsets = dict(existing.offsets) if existing is not None else {}
        return SessionDTO(sid, agent_id, user_id, offsets, now, title)

    @open_only
    def rename(self, session_id: str, title: str | None, *, wait: bool = True) -> SessionDTO:
        """Set (or with ``None`` clear) the title; the last rename in log order wins."""
        if title is not None:
            checked(title, Title, "title")
        self._check_projection()
        state = self._live(session_id)
        (event_id,) = new_event_ids(1)
        event = TitleChanged(
            session_id=session_id, title=title, event_id=event_id, recorded_at=utcnow()
        )
        self._append([event], wait=wait)
        dto = structs.replace(state, title=title).to_dto()
        assert dto is not None  # _live returned a created, undeleted session
        return dto

    @open_only
    def delete_session(self, session_id: str, *, wait: bool = True) -> Position:
        """Delete a session; it disappears from queries and later events change nothing."""
        self._check_projection()
        state = self.reader.session_state(session_id)
        if state is None:
            raise SessionNotFoundError(f"session {session_id} not found")
        if state.deleted:
            raise SessionNotFoundError(f"session {session_id} was already deleted")
        (event_id,) = new_event_ids(1)
        event = SessionDeleted(session_id=session_id, event_id=event_id, recorded_at=utcnow())
        result = self._append([event], wait=wait)
        assert result.last is not None  # one event was appended
        return result.last

    @open_only
    def commit(
        self, session_id: str, consumer: str, offset: int, *, strict: bool = True, wait: bool = True
    ) -> CommitResult:
        """Record that ``consumer`` processed ``session_id`` up to ``offset`` (inclusive).

        Offsets only move forward: a lower value is recorded but changes nothing (see
        :attr:`CommitResult.stale`). With ``strict`` the session must exist.
        """
        checked(consumer, ConsumerName, "consumer")
        checked(offset, Offset, "offset")
        self._check_projection()
        if strict:
            state: SessionState | None = self._live(session_id)
        else:
            state = self.reader.session_state(session_id)
        (event_id,) = new_event_ids(1)
        event = OffsetCommitted(
            session_id=session_id, consumer=consumer, offset=offset,
            event_id=event_id, recorded_at=utcnow(),
        )  # fmt: skip
        result = self._append([event], wait=wait)
        assert result.last is not None  # one event was appended
        if state is not None and state.deleted:
            return CommitResult(session_id, consumer, offset, None, None, result.last, True)
        previous = state.offsets.get(consumer) if state is not None else None
        current = previous if previous is not None and previous > offset else offset
        return CommitResult(session_id, consumer, offset, previous, current, result.last)

    @open_only
    def commit_many(
        self, commits: Iterable[Commit], *, strict: bool = False, wait: bool = True
    ) -> AppendResult:
        """Append many ``(session_id, consumer, offset)`` commits as one log append.

        Validated as a whole first: one bad item rejects them all. With ``strict`` every
        session must exist. With ``wait=False`` it returns once the log has them (the
        durability point) and a background thread projects them.
        """
        self._check_projection()
        items = validate_commits(commits)
        if strict:
            self._require_live({sid for sid, _, _ in items})
        appended = self.writer.append_commits(items)
        return self._project(appended, lambda folder: folder.add_commits(items), wait=wait)

    def _require_live(self, session_ids: set[str]) -> None:
        """Refuse unless every (already validated) id is a created, undeleted session."""
        wanted = sorted(session_ids)
        store = self.store
        missing = store.not_live([(self.reader.partition(sid), sid) for sid in wanted])
        if missing:
            raise SessionNotFoundError(
                f"session {missing[0]} not found "
                "(use strict=False to keep offsets of unknown sessions)"
            )

    @open_only
    def plan_reset(self, session_id: str, consumer: str, offset: int) -> ResetPlan:
        """What :meth:`reset_offset` would do, without doing it."""
        checked(consumer, ConsumerName, "consumer")
        checked(offset, Offset, "offset")
        self._check_projection()
        state = self.reader.session_state(session_id)
        if state is None or state.deleted:
            raise SessionNotFoundError(f"session {session_id} not found")
        return ResetPlan(session_id, consumer, state.offsets.get(consumer), offset)

    @open_only
    def reset_offset(
        self,
        session_id: str,
        consumer: str,
        offset: int,
        *,
        reason: str | None = None,
        actor: str | None = None,
        wait: bool = True,
    ) -> ResetPlan:
        """Set an offset, backwards too: an operator's act, recorded with who and why."""
        plan = self.plan_reset(session_id, consumer, offset)
        (event_id,) = new_event_ids(1)
        event = OffsetReset(
            session_id=session_id, consumer=consumer, offset=offset, actor=actor, reason=reason,
            event_id=event_id, recorded_at=utcnow(),
        )  # fmt: skip
        result = self._append([event], wait=wait)
        return structs.replace(plan, applied=True, position=result.last)

    @open_only
    def import_events(self, events: Iterable[AnyEvent], *, wait: bool = True) -> AppendResult:
        """Append events as given (e.g. from another log's export): all or nothing.

        Streams: memory stays bounded whatever the size. Missing ``event_id`` and
        ``recorded_at`` are filled in; a ``position`` is dropped (the log assigns new ones).
        """
        self._check_projection()
        return self._project(self.writer.import_events(events), None, wait=wait)
