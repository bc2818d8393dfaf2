"""The fold: pure functions from events to session state, and from a batch to deltas.

Everything else derives from here: the projector merges :class:`Delta` values into Redis
(``merge.lua`` mirrors :func:`apply_delta`), ``verify`` folds the log in memory, and the
property tests check that both agree. No I/O in this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from msgspec import Struct, structs

from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    SessionCreated,
    SessionDeleted,
    TitleChanged,
)
from tracker.model import SessionDTO


class SessionState(Struct, frozen=True, gc=False):
    """Everything the log says about one session id.

    A deleted session is a tombstone: only ``deleted`` is kept, since nothing about it can
    be read or changed any more. ``created_at is None`` means the session has offsets
    (or a title) but was never created.
    """

    session_id: str
    agent_id: str | None = None
    user_id: str | None = None
    created_at: datetime | None = None
    title: str | None = None
    offsets: dict[str, int] = {}
    deleted: bool = False

    @property
    def created(self) -> bool:
        return self.created_at is not None

    def to_dto(self) -> SessionDTO | None:
        """The flux0 view, or ``None`` for a deleted or never-created session."""
        if self.deleted or self.agent_id is None or self.user_id is None:
            return None
        assert self.created_at is not None
        return SessionDTO(
            id=self.session_id,
            agent_id=self.agent_id,
            user_id=self.user_id,
            consumption_offsets=dict(self.offsets),
            created_at=self.created_at,
            title=self.title,
        )


def as_utc(value: datetime) -> datetime:
    """A time without a zone, as early versions let into logs, read as UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def tombstone(session_id: str) -> SessionState:
    return SessionState(session_id, deleted=True)


def fold(state: SessionState | None, event: AnyEvent) -> SessionState:
    """Apply one event to one session's state (``None`` before its first event)."""
    if state is None:
        state = SessionState(event.session_id)
    if state.deleted:
        return state
    if isinstance(event, OffsetCommitted):
        current = state.offsets.get(event.consumer)
        if current is not None and current >= event.offset:
            return state
        return structs.replace(state, offsets={**state.offsets, event.consumer: event.offset})
    if isinstance(event, OffsetReset):
        return structs.replace(state, offsets={**state.offsets, event.consumer: event.offset})
    if isinstance(event, SessionCreated):
        if state.created:
            return state
        return structs.replace(
            state,
            agent_id=event.agent_id,
            user_id=event.user_id,
            created_at=as_utc(event.created_at),
            title=event.title,
        )
    if isinstance(event, TitleChanged):
        return structs.replace(state, title=event.title)
    if isinstance(event, SessionDeleted):
        return tombstone(state.session_id)
    raise TypeError(f"unknown event {event!r}")


def fold_all(
    events: Iterable[AnyEvent], states: dict[str, SessionState] | None = None
) -> dict[str, SessionState]:
    """Fold events in log order into a map of session id -> state."""
    result = {} if states is None else states
    for event in events:
        sid = event.session_id
        result[sid] = fold(result.get(sid), event)
    return result


NO_OFFSET = -1
"""Marks "no value" in an :class:`OffsetChange` (valid offsets are never negative)."""


class OffsetChange(Struct, array_like=True, gc=False):
    """A consumer's net change in a batch: set to ``reset_to`` if any, then max ``at_least``."""

    reset_to: int = NO_OFFSET
    at_least: int = NO_OFFSET

    def apply(self, current: int | None) -> int | None:
        value = current if self.reset_to == NO_OFFSET else self.reset_to
        if self.at_least != NO_OFFSET and (value is None or self.at_least > value):
            value = self.at_least
        return value


class Delta(Struct, gc=False):
    """One session's net change over a run of events; deltas compose (see :func:`compose`).

    ``title``/``title_set`` is the last title change in the run; ``title_after_create`` is
    the last one after the run's first create, which wins only if that create takes effect.
    """

    session_id: str
    create: SessionCreated | None = None
    title_set: bool = False
    title: str | None = None
    title_after_create_set: bool = False
    title_after_create: str | None = None
    offsets: dict[str, OffsetChange] = {}
    deleted: bool = False


def add_event(delta: Delta, event: AnyEvent) -> None:
    """Fold one event into a delta that the caller owns (the batch-building step)."""
    if delta.deleted:
        return
    if isinstance(event, OffsetCommitted):
        change = delta.offsets.get(event.consumer)
        if change is None:
            delta.offsets[event.consumer] = OffsetChange(NO_OFFSET, event.offset)
        elif event.offset > change.at_least:
            change.at_least = event.offset
    elif isinstance(event, OffsetReset):
        delta.offsets[event.consumer] = OffsetChange(event.offset, NO_OFFSET)
    elif isinstance(event, SessionCreated):
        if delta.create is None:
            delta.create = event
    elif isinstance(event, TitleChanged):
        delta.title_set, delta.title = True, event.title
        if delta.create is not None:
            delta.title_after_create_set, delta.title_after_create = True, event.title
    elif isinstance(event, SessionDeleted):
        delta.create = None
        delta.title_set = delta.title_after_create_set = False
        delta.title = delta.title_after_create = None
        delta.offsets = {}
        delta.deleted = True


class BatchFolder:
    """Folds a batch, possibly read in pieces, into one :class:`Delta` per session.

    Commits, nearly every event of a busy log, take a fast path: a flat map of
    ``session, consumer`` to the highest offset seen, merged into the deltas by
    :meth:`finish`. A reset drops the commits before it (the reset overrides them) and a
    delete makes every other change irrelevant, so the order of events is kept. The
    result's order depends only on the events, which resuming a half-applied batch needs.
    """

    __slots__ = ("_highest", "deltas")

    def __init__(self, deltas: dict[str, Delta] | None = None) -> None:
        self.deltas: dict[str, Delta] = {} if deltas is None else deltas
        self._highest: dict[str, int] = {}

    @property
    def size(self) -> int:
        """An upper bound of the sessions folded so far (to bound a batch's memory)."""
        return len(self.deltas) + len(self._highest)

    def add(self, events: Iterable[AnyEvent]) -> None:
        deltas, highest = self.deltas, self._highest
        seen = highest.get
        commit = _COMMIT_CLASSES
        for event in events:
            if event.__class__ in commit:
                key = f"{event.session_id}\x00{event.consumer}"  # type: ignore[union-attr]
                offset = event.offset  # type: ignore[union-attr]
                if offset > seen(key, NO_OFFSET):
                    highest[key] = offset
                continue
            sid = event.session_id
            delta = deltas.get(sid)
            if delta is None:
                delta = deltas[sid] = Delta(sid)
            if isinstance(event, OffsetReset):
                highest.pop(sid + _SEP + event.consumer, None)
            add_event(delta, event)

    def add_commits(self, commits: Iterable[tuple[str, str, int]]) -> None:
        """Fold ``(session_id, consumer, offset)`` commits: the same as their events, cheaper."""
        highest = self._highest
        seen = highest.get
        for sid, consumer, offset in commits:
            key = f"{sid}\x00{consumer}"
            if offset > seen(key, NO_OFFSET):
                highest[key] = offset

    def finish(self) -> dict[str, Delta]:
        """The deltas, with the pending commits folded in."""
        deltas = self.deltas
        for key, offset in self._highest.items():
            sid, _, consumer = key.partition(_SEP)
            delta = deltas.get(sid)
            if delta is None:
                delta = deltas[sid] = Delta(sid)
            elif delta.deleted:
                continue
            change = delta.offsets.get(consumer)
            if change is None:
                delta.offsets[consumer] = OffsetChange(NO_OFFSET, offset)
            elif offset > change.at_least:
                change.at_least = offset
        self._highest = {}
        return deltas


_SEP = "\x00"
_COMMIT_CLASSES = frozenset([OffsetCommitted, *(cls for cls in OffsetCommitted.__subclasses__())])


def fold_batch(
    events: Iterable[AnyEvent], deltas: dict[str, Delta] | None = None
) -> dict[str, Delta]:
    """Pre-fold a batch into one delta per session (see :class:`BatchFolder`).

    Pass ``deltas`` to keep folding into the result of an earlier call.
    """
    folder = BatchFolder(deltas)
    folder.add(events)
    return folder.finish()


def apply_delta(state: SessionState | None, delta: Delta) -> SessionState:
    """Merge a delta into a state: the pure twin of ``merge.lua``."""
    if state is None:
        state = SessionState(delta.session_id)
    if state.deleted:
        return state
    if delta.deleted:
        return tombstone(state.session_id)
    changes: dict[str, object] = {}
    create = delta.create
    if create is not None and not state.created:
        changes.update(agent_id=create.agent_id, user_id=create.user_id)
        changes["created_at"] = create.created_at
        changes["title"] = (
            delta.title_after_create if delta.title_after_create_set else create.title
        )
    elif delta.title_set:
        changes["title"] = delta.title
    if delta.offsets:
        offsets = dict(state.offsets)
        for consumer, change in delta.offsets.items():
            value = change.apply(offsets.get(consumer))
            if value is not None:
                offsets[consumer] = value
        changes["offsets"] = offsets
    return structs.replace(state, **changes) if changes else state


def compose(first: Delta, second: Delta) -> Delta:
    """The delta equal to applying ``first`` then ``second``."""
    if first.deleted:
        return first
    if second.deleted:
        return second
    result = Delta(first.session_id)
    result.create = first.create or second.create
    result.title_set = first.title_set or second.title_set
    result.title = second.title if second.title_set else first.title
    if first.create is not None:
        result.title_after_create_set = first.title_after_create_set or second.title_set
        result.title_after_create = second.title if second.title_set else first.title_after_create
    else:
        result.title_after_create_set = second.title_after_create_set
        result.title_after_create = second.title_after_create
    offsets = {name: OffsetChange(c.reset_to, c.at_least) for name, c in first.offsets.items()}
    for name, change in second.offsets.items():
        before = offsets.get(name)
        if before is None or change.reset_to != NO_OFFSET:
            offsets[name] = OffsetChange(change.reset_to, change.at_least)
        else:
            before.at_least = max(before.at_least, change.at_least)
    result.offsets = offsets
    return result


def is_empty(state: SessionState) -> bool:
    """A state with nothing to show (e.g. only a cleared title): no snapshot is stored."""
    return not (state.deleted or state.created or state.offsets or state.title is not None)


def visible(states: dict[str, SessionState]) -> dict[str, SessionState]:
    """The states a projection holds: all but the empty ones."""
    return {sid: state for sid, state in states.items() if not is_empty(state)}
