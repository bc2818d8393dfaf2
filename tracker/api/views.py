"""How sessions are shown: the consumers a response includes, positions, list cursors.

flux0's ``ConsumptionOffsetsDTO`` has one property, ``client``: by default a response
holds only that consumer's offset, so it validates against flux0's schema;
``?consumers=all`` or ``?consumers=a,b`` shows others too.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime

import msgspec
from msgspec import structs

from tracker.api.bodies import problem
from tracker.api.context import Api
from tracker.events import Position
from tracker.model import DEFAULT_CONSUMER, SessionDTO
from tracker.tokens import Grant

POSITION_HEADER = "X-Tracker-Position"
CURSOR_HEADER = "X-Next-Cursor"
_POSITION = re.compile(r"(0|[1-9][0-9]{0,8}):(0|[1-9][0-9]{0,18}):(0|[1-9][0-9]{0,8})")


def shown(session: SessionDTO, consumers: str | None) -> SessionDTO:
    """The session with only the requested consumers' offsets (default: ``client``)."""
    if consumers == "all":
        return session
    wanted = {DEFAULT_CONSUMER} if consumers is None else set(consumers.split(","))
    offsets = {c: o for c, o in session.consumption_offsets.items() if c in wanted}
    return structs.replace(session, consumption_offsets=offsets)


def visible(api: Api, grant: Grant, session_id: str) -> SessionDTO:
    """The session if this token may see it; else "not found" (never "forbidden")."""
    from tracker.api.errors import SessionHidden

    session = api.tracker.get_session(session_id)
    if session is None or (grant.user_id is not None and session.user_id != grant.user_id):
        raise SessionHidden(session_id)
    return session


def visible_with_position(
    api: Api, grant: Grant, session_id: str
) -> tuple[SessionDTO, dict[str, str]]:
    """:func:`visible` and its :func:`position_headers`, read in one Redis round trip."""
    from tracker.api.errors import SessionHidden

    session, applied = api.tracker.get_session_and_position(session_id)
    if session is None or (grant.user_id is not None and session.user_id != grant.user_id):
        raise SessionHidden(session_id)
    return session, {POSITION_HEADER: applied.token()} if applied is not None else {}


def position_headers(api: Api, session_ids: list[str]) -> dict[str, str]:
    """``X-Tracker-Position``: the applied position of the sessions' partitions (comma-separated
    when a list spans several); a later read with ``?min_position=`` sees at least this."""
    tracker = api.tracker
    partitions = sorted({tracker.reader.partition(sid) for sid in session_ids})
    tokens = [p.token() for n in partitions if (p := tracker.applied_position(n)) is not None]
    return {POSITION_HEADER: ",".join(tokens)} if tokens else {}


def parse_position(api: Api, text: str) -> Position:
    """A ``P:O:I`` token of a partition this log has, else 422 naming ``min_position``."""
    match = _POSITION.fullmatch(text)
    partitions = api.tracker.store.keys.partitions
    if match is None or int(match.group(1)) >= partitions:
        raise problem(
            "value_error",
            ["query", "min_position"],
            f"expected a position partition:offset:index with a partition below {partitions}",
            text,
        )
    return Position.parse(text)


def wait_min_position(api: Api, text: str | None) -> None:
    """Block (at most ``api.wait_seconds``) until the position is applied; else 503."""
    if text is not None:
        api.tracker.wait_for(parse_position(api, text), api.wait_seconds)


class _Key(msgspec.Struct, array_like=True, frozen=True):
    created_at: datetime
    id: str


def encode_cursor(session: SessionDTO) -> str:
    raw = msgspec.json.encode(_Key(session.created_at, session.id))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str) -> tuple[datetime, str]:
    try:
        key = msgspec.json.decode(
            base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), type=_Key
        )
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise problem(
            "value_error", ["query", "cursor"], "not a cursor of this API", text
        ) from None
    return key.created_at, key.id


def page(
    sessions: list[SessionDTO], limit: int, cursor: str | None
) -> tuple[list[SessionDTO], str | None]:
    """Sessions sorted by ``(created_at, id)`` after ``cursor``; the next cursor if more remain."""
    if cursor is not None:
        after = decode_cursor(cursor)
        sessions = [s for s in sessions if (s.created_at, s.id) > after]
    chosen = sessions[:limit]
    more = len(sessions) > limit
    return chosen, encode_cursor(chosen[-1]) if more and chosen else None
