"""Bearer tokens: a guard that looks the token up and checks the route's scope.

Each route says the scope it needs in ``opt={"scope": ...}`` (routes without one, such as
``/healthz``, need no token). The grant found is kept in the request's state for the
handlers, which also enforce a token's bound user: another user's session is "not found".
The token itself is never logged or echoed.

A browser cannot send a bearer header from a plain form: routes with ``opt={"cookie":
True}`` (the status page) also accept the token from the HttpOnly ``SameSite=Strict``
cookie that ``POST /login`` sets. The JSON API does not, so a cookie never authorizes a
write there.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from tracker.tokens import Grant, Scope, TokenFile, grants

INSECURE = Grant(name="insecure", scope="admin", user_id=None)
"""The grant of every request when the server runs with ``--insecure``."""

CHALLENGE = {"WWW-Authenticate": "Bearer"}
COOKIE = "tracker_token"
"""The status page's login cookie: the token itself (HttpOnly, SameSite=Strict)."""


class Auth:
    """Looks tokens up in a :class:`TokenFile`, or grants everything when ``tokens`` is None."""

    def __init__(self, tokens: TokenFile | None) -> None:
        self.tokens = tokens

    def grant_of(self, header: str | None, cookie: str | None = None) -> Grant:
        """The grant of the bearer header, else of the login cookie (when given)."""
        if self.tokens is None:
            return INSECURE
        if not header and cookie:
            return self.lookup(cookie)
        if not header:
            raise NotAuthorizedException("missing bearer token", headers=CHALLENGE)
        kind, _, token = header.partition(" ")
        if kind.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException(
                "expected an Authorization: Bearer <token> header", headers=CHALLENGE
            )
        return self.lookup(token.strip())

    def lookup(self, token: str) -> Grant:
        """The grant of ``token``; 401 if it is unknown."""
        if self.tokens is None:
            return INSECURE
        grant = self.tokens.lookup(token)
        if grant is None:
            raise NotAuthorizedException("unknown token", headers=CHALLENGE)
        return grant

    async def guard(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        """Litestar guard: 401 without a known token, 403 when its scope is too low.

        A coroutine although it does not await: Litestar runs a synchronous guard on a
        worker thread, a hop per request that cost more than the check itself (a SHA-256
        and a dict lookup; the tokens file is stat'ed at most once a second).
        """
        needed: Scope | None = handler.opt.get("scope")
        if needed is None:
            return
        cookie = connection.cookies.get(COOKIE) if handler.opt.get("cookie") else None
        grant = self.grant_of(connection.headers.get("authorization"), cookie)
        if not grants(grant, needed):
            raise PermissionDeniedException(f"this token's scope is {grant.scope}; {needed} needed")
        connection.state.grant = grant


def grant_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Grant:
    """The grant the guard found for this request."""
    grant: Grant = connection.state.grant
    return grant
