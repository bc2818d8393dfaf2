"""The session routes, flux0-compatible: create, get, list, patch (title, offsets), delete.

Scopes: ``read`` for GETs, ``write`` to create and patch, ``admin`` to delete and reset.
A token bound to a user sees and changes only that user's sessions: another user's is
"not found" (404), a list for another user is empty, and creating one for another user is
forbidden (403). Every response that shows a session carries ``X-Tracker-Position``.
``GET /api/sessions/{id}?as_of=`` shows a session as it was then (:mod:`tracker.api.past`).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, delete, get, patch, post
from litestar.exceptions import PermissionDeniedException
from litestar.params import Parameter

from tracker.api.auth import grant_of
from tracker.api.bodies import CreateSession, PatchSession, body_operation, decode_body, problem
from tracker.api.context import api_of, blocking
from tracker.api.metrics import COMMITS
from tracker.api.past import parse_as_of_query, past_session
from tracker.api.views import (
    CURSOR_HEADER,
    page,
    position_headers,
    shown,
    visible,
    visible_with_position,
    wait_min_position,
)
from tracker.model import SessionDTO

Consumers = Annotated[
    str | None,
    Parameter(
        description="Consumers whose offsets to show: `all`, or names separated by commas "
        "(default: `client` only, as flux0's schema has)"
    ),
]
MinPosition = Annotated[
    str | None,
    Parameter(
        description="Wait (at most a few seconds) until this position (`P:O:I`, e.g. from "
        "X-Tracker-Position) is applied; else 503 with Retry-After"
    ),
]
AsOf = Annotated[
    str | None,
    Parameter(
        description="The session as it was at this time (ISO 8601 with a zone) or log position "
        "(`P:O:I`, in the session's partition), folded from the log; 404 if it did not exist "
        "then. Not with `min_position`"
    ),
]


class SessionsDTO(msgspec.Struct, frozen=True):
    """flux0's list shape: exactly ``{"data": [...]}``; the next page is in ``X-Next-Cursor``."""

    data: list[SessionDTO]


@post(
    "/api/sessions",
    opt={"scope": "write"},
    status_code=201,
    operation_class=body_operation(CreateSession),
)
async def create_session(request: Request[Any, Any, Any]) -> Response[SessionDTO]:
    """Create a session; `user_id` defaults to the token's user, `id` to 10 new characters."""
    api, grant = api_of(request), grant_of(request)
    body = decode_body(await request.body(), CreateSession)
    user_id = body.user_id if body.user_id is not None else grant.user_id
    if user_id is None:
        raise problem("missing", ["body", "user_id"], "Field required (the token has no user)")
    if grant.user_id is not None and user_id != grant.user_id:
        raise PermissionDeniedException("this token may only create sessions of its own user")

    def run() -> tuple[SessionDTO, dict[str, str]]:
        session = api.tracker.create_session(
            body.agent_id, user_id, session_id=body.id, title=body.title
        )
        return session, position_headers(api, [session.id])

    session, headers = await blocking(run)
    return Response(shown(session, None), status_code=201, headers=headers)


@get("/api/sessions/{session_id:str}", opt={"scope": "read"})
async def get_session(
    request: Request[Any, Any, Any],
    session_id: str,
    consumers: Consumers = None,
    min_position: MinPosition = None,
    as_of: AsOf = None,
) -> Response[SessionDTO]:
    """One session; 404 if it is unknown, deleted, or another user's (with `as_of`: if it
    did not exist then, or was another user's)."""
    api, grant = api_of(request), grant_of(request)
    if as_of is not None and min_position is not None:
        message = "give at most one of as_of and min_position"
        raise problem("value_error", ["query", "as_of"], message, as_of).also(
            "value_error", ["query", "min_position"], message, min_position
        )
    if as_of is None and min_position is None:
        # one pipelined Redis read, run on the event loop: the hop to a worker thread and
        # back cost more than the round trip itself (see benchmarks/bench_api.py)
        session, headers = visible_with_position(api, grant, session_id)
    else:
        point = parse_as_of_query(as_of) if as_of is not None else None

        def run() -> tuple[SessionDTO, dict[str, str]]:
            if as_of is not None and point is not None:  # point is parsed from as_of
                past = past_session(api, grant, session_id, point, as_of)
                return past, position_headers(api, [session_id])
            wait_min_position(api, min_position)
            return visible_with_position(api, grant, session_id)

        session, headers = await blocking(run)
    return Response(shown(session, consumers), headers=headers)


@get("/api/sessions", opt={"scope": "read"})
async def list_sessions(
    request: Request[Any, Any, Any],
    user_id: str | None = None,
    agent_id: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    cursor: str | None = None,
    consumers: Consumers = None,
    min_position: MinPosition = None,
) -> Response[SessionsDTO]:
    """Sessions of a user and/or an agent, oldest first (`created_at`, then `id`).

    One of `user_id` and `agent_id` is needed (a token bound to a user implies it), since
    listing every session would scan the whole store. Pages of `limit`; the next page's
    `cursor` is in the X-Next-Cursor header (absent on the last page).
    """
    api, grant = api_of(request), grant_of(request)
    if grant.user_id is not None:
        if user_id is not None and user_id != grant.user_id:
            return Response(SessionsDTO([]))
        user_id = grant.user_id
    if user_id is None and agent_id is None:
        message = "give user_id or agent_id: listing every session is not supported"
        raise problem("missing", ["query", "user_id"], message).also(
            "missing", ["query", "agent_id"], message
        )

    def run() -> tuple[list[SessionDTO], str | None, dict[str, str]]:
        wait_min_position(api, min_position)
        everything = api.tracker.list_sessions(user_id=user_id, agent_id=agent_id)
        chosen, following = page(everything, limit, cursor)
        return chosen, following, position_headers(api, [s.id for s in chosen])

    chosen, following, headers = await blocking(run)
    if following is not None:
        headers[CURSOR_HEADER] = following
    return Response(SessionsDTO([shown(s, consumers) for s in chosen]), headers=headers)


@patch(
    "/api/sessions/{session_id:str}",
    opt={"scope": "write"},
    operation_class=body_operation(PatchSession),
)
async def patch_session(
    request: Request[Any, Any, Any], session_id: str, consumers: Consumers = None
) -> Response[SessionDTO]:
    """Set the title (null clears it) and/or commit offsets; an offset never moves back."""
    api, grant = api_of(request), grant_of(request)
    body = decode_body(await request.body(), PatchSession)

    def run() -> tuple[SessionDTO, dict[str, str]]:
        tracker = api.tracker
        session = visible(api, grant, session_id)
        if body.title is not msgspec.UNSET:
            session = tracker.rename(session_id, body.title)
        offsets = body.consumption_offsets
        if offsets is not msgspec.UNSET and offsets:
            items = [(session_id, consumer, offset) for consumer, offset in offsets.items()]
            if len(items) == 1:
                tracker.commit(*items[0])
            else:
                tracker.commit_many(items, strict=True)
            COMMITS.inc(len(items))
            session = visible(api, grant, session_id)
        return session, position_headers(api, [session_id])

    session, headers = await blocking(run)
    return Response(shown(session, consumers), headers=headers)


@delete("/api/sessions/{session_id:str}", opt={"scope": "admin"}, status_code=204)
async def delete_session(request: Request[Any, Any, Any], session_id: str) -> None:
    """Delete a session; its id is never reused."""
    api, grant = api_of(request), grant_of(request)

    def run() -> None:
        visible(api, grant, session_id)
        api.tracker.delete_session(session_id)

    await blocking(run)


ROUTES = [create_session, get_session, list_sessions, patch_session, delete_session]
