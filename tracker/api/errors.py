"""Errors as HTTP responses, in flux0's shapes.

* a body or parameter that fails validation: 422 ``{"detail": [{"type", "loc", "msg",
  "input"}]}`` naming the field (pydantic's shape, as flux0 answers);
* a session that is unknown, deleted or another user's: 404 ``{"detail": "Session not
  found"}`` (flux0's text; it does not reveal whether the id exists);
* an id that is taken: 409; a retriable tracker error: 503 with ``Retry-After: 1``;
* every other HTTP error: its status and ``{"detail": "..."}``.

Nothing is appended for a rejected request: commands validate before they append.
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from tracker.api.bodies import BodyError
from tracker.errors import InvalidInputError, SessionExistsError, SessionNotFoundError, TrackerError

NOT_FOUND = "Session not found"
PATH_FIELDS = {"session_id", "consumer"}


class SessionHidden(Exception):
    """The session is unknown, deleted, or belongs to another user than the token's."""


def _json(status: int, detail: Any, headers: dict[str, str] | None = None) -> Response[Any]:
    return Response({"detail": detail}, status_code=status, headers=headers)


def on_body_error(_: Request[Any, Any, Any], exc: BodyError) -> Response[Any]:
    return _json(422, exc.detail)


def on_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    """Litestar's own parameter checks (query and path), reshaped as flux0's 422."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    detail = [
        {
            "type": "value_error",
            "loc": [item.get("source", "query"), item.get("key", "")],
            "msg": item.get("message", exc.detail),
            "input": None,
        }
        for item in extra
        if isinstance(item, dict)
    ] or [{"type": "value_error", "loc": [], "msg": exc.detail, "input": None}]
    return _json(422, detail)


def on_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    return _json(exc.status_code, exc.detail, exc.headers)


def on_hidden(_: Request[Any, Any, Any], exc: SessionHidden) -> Response[Any]:
    return _json(404, NOT_FOUND)


def on_tracker(_: Request[Any, Any, Any], exc: TrackerError) -> Response[Any]:
    if isinstance(exc, SessionNotFoundError):
        return _json(404, NOT_FOUND)
    if isinstance(exc, InvalidInputError):
        message = str(exc)
        field, sep, rest = message.partition(": ")
        if sep and field.isidentifier():
            loc = ["path" if field in PATH_FIELDS else "body", field]
            return _json(422, [{"type": "value_error", "loc": loc, "msg": rest, "input": None}])
        return _json(422, [{"type": "value_error", "loc": [], "msg": message, "input": None}])
    if isinstance(exc, SessionExistsError):
        return _json(409, str(exc))
    if exc.retriable:
        return _json(503, str(exc), {"Retry-After": "1"})
    return _json(500, str(exc))


HANDLERS: ExceptionHandlersMap = {
    BodyError: on_body_error,
    ValidationException: on_validation,
    HTTPException: on_http,
    SessionHidden: on_hidden,
    TrackerError: on_tracker,
}
"""The app's exception handlers (Litestar picks the most specific class)."""
