"""A session's past over HTTP: its history, its state ``as_of`` a time or position, and the
offset a consumer had at a time (for a reset ``to_time``).

All three read the log (the session's partition), not Redis, with the same pure fold the
projection is checked against (:mod:`tracker.history`).

Who may see a session's past: a token not bound to a user, any session's, deleted ones
too (an audit needs them); a token bound to a user, only sessions of that user, where the
user is the one the log recorded when the session was created. A session's ``user_id``
never changes (a second create changes nothing), so for an ``as_of`` read this is the
user at that time and the live one alike, except that a deleted session has no live user:
its owner may still read its past. Everything else is "not found" (404), as for a live
read.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from litestar import Request, Response, get

from tracker.api.auth import grant_of
from tracker.api.bodies import BodyError, problem
from tracker.api.context import Api, api_of, blocking
from tracker.api.errors import SessionHidden
from tracker.api.views import POSITION_HEADER, position_headers
from tracker.errors import InvalidInputError
from tracker.events import Position
from tracker.history import AsOf, HistoryEntry, parse_as_of
from tracker.model import SessionDTO
from tracker.tokens import Grant


class HistoryDTO(msgspec.Struct, frozen=True):
    """``{"data": [...]}``: a session's events in log order, as ``tracker sessions history
    --json`` prints them (position ``P:O:I``, ``recorded_at``, the event's JSON form)."""

    data: list[HistoryEntry]


def _creator(entries: list[HistoryEntry]) -> str | None:
    """The user the log recorded for the session (its first ``session_created``), if any."""
    for entry in entries:
        if entry.event.get("type") == "session_created":
            user = entry.event.get("user_id")
            return user if isinstance(user, str) else None
    return None


def _as_of_problem(error: InvalidInputError, text: str) -> BodyError:
    """A tracker's ``as_of: ...`` error as flux0's 422 naming the query parameter."""
    message = str(error).removeprefix("as_of: ")
    return problem("value_error", ["query", "as_of"], message, text)


def parse_as_of_query(text: str) -> AsOf:
    """``?as_of=``: an ISO 8601 time with a zone, or ``P:O:I``; else 422 naming ``as_of``."""
    try:
        return parse_as_of(text)
    except InvalidInputError as error:
        raise _as_of_problem(error, text) from None


def past_session(api: Api, grant: Grant, session_id: str, as_of: AsOf, text: str) -> SessionDTO:
    """The session as it was at ``as_of``; "not found" if it did not exist then, or it is
    another user's (by the user it had then, see the module's docstring)."""
    try:
        session = api.tracker.session_as_of(session_id, as_of)
    except InvalidInputError as error:
        if str(error).startswith("as_of: "):
            raise _as_of_problem(error, text) from None
        raise
    if session is None or (grant.user_id is not None and session.user_id != grant.user_id):
        raise SessionHidden(session_id)
    return session


def parse_time(text: str, field: str) -> datetime:
    """A body's ISO 8601 time with a zone (a naive one is refused, not guessed)."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        value = None
    if value is None or value.utcoffset() is None:
        message = "expected an ISO 8601 time with a zone, e.g. 2025-01-29T09:27:41Z"
        raise problem("value_error", ["body", field], message, text)
    return value


def offset_at(api: Api, session_id: str, consumer: str, text: str) -> int:
    """The offset ``consumer`` had at the time ``text`` (a reset's ``to_time``); 422 if the
    session did not exist then or the consumer had no offset then."""
    when = parse_time(text, "to_time")
    past = api.tracker.session_as_of(session_id, when)
    if past is None:
        message = f"session {session_id} did not exist at that time"
        raise problem("value_error", ["body", "to_time"], message, text)
    offset = past.consumption_offsets.get(consumer)
    if offset is None:
        message = f"consumer {consumer} had no offset at that time"
        raise problem("value_error", ["body", "to_time"], message, text)
    return offset


def _history_headers(api: Api, session_id: str, entries: list[HistoryEntry]) -> dict[str, str]:
    """``X-Tracker-Position``: the later of the partition's applied position and the last
    event shown, so a read with ``?min_position=`` sees at least what the history shows."""
    headers = position_headers(api, [session_id])
    last = Position.parse(entries[-1].position)
    applied = headers.get(POSITION_HEADER)
    if applied is None or Position.parse(applied) < last:
        headers[POSITION_HEADER] = last.token()
    return headers


@get("/api/sessions/{session_id:str}/history", opt={"scope": "read"})
async def session_history(request: Request[Any, Any, Any], session_id: str) -> Response[HistoryDTO]:
    """Every event of a session in log order, deleted sessions too; 404 if the log has none
    for it, or it is another user's."""
    api, grant = api_of(request), grant_of(request)

    def run() -> tuple[list[HistoryEntry], dict[str, str]]:
        entries = api.tracker.history(session_id)
        if grant.user_id is not None and _creator(entries) != grant.user_id:
            raise SessionHidden(session_id)
        return entries, _history_headers(api, session_id, entries)

    entries, headers = await blocking(run)
    return Response(HistoryDTO(entries), headers=headers)


ROUTES = [session_history]
