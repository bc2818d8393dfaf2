"""A fast path for the hot request, ``GET /api/sessions/{id}``, in front of the Litestar app.

The route answers with one pipelined Redis read, yet Litestar's per-request machinery
(the guard, the exception middleware, parameter parsing, the response, the Prometheus
middleware) cost about twice that read (see benchmarks/RESULTS.md, "HTTP API"). This thin
ASGI wrapper answers exactly the plain request itself: ``GET /api/sessions/<id>`` with no
query string or only ``consumers=<value>``, a bearer token of ``read`` scope or more (or
``--insecure``), and answers what the Litestar route would, byte for byte: the session
(only the consumers asked for, ``client`` by default) with ``X-Tracker-Position``, or 404
``{"detail": "Session not found"}`` when the session is unknown, deleted or another
user's. It counts the request in the same ``tracker_requests_total`` and
``tracker_request_duration_seconds`` series as Litestar's middleware (not in the
in-progress gauge, which would read the same after the request anyway).

Everything else goes to Litestar unchanged: other paths, methods and queries, a missing
or unknown token (401), a low scope (403), and any error of the read (Litestar reads
again and answers its usual 503 or 500). ``TRACKER_API_FASTPATH=0`` turns it off.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgspec
from litestar import Litestar
from litestar.plugins.prometheus import PrometheusMiddleware

from tracker.api.context import Api
from tracker.api.errors import NOT_FOUND
from tracker.api.metrics import PROMETHEUS
from tracker.api.views import POSITION_HEADER, shown
from tracker.connection import AsyncClient, connect_async
from tracker.events import Position
from tracker.keys import partition_for
from tracker.model import SessionDTO, SessionId, checked
from tracker.snapshots import applied_of
from tracker.tokens import grants

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]
"""Plain ASGI types: Litestar's TypedDicts would need a cast for every message."""

FASTPATH_ENV = "TRACKER_API_FASTPATH"
PREFIX = "/api/sessions/"
TEMPLATE = "/api/sessions/{session_id}"
"""The route's template, the ``path`` label Litestar's middleware gives its requests."""
_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
"""Ids taken on the fast path: nothing Litestar's routing or decoding could treat apart."""
_QUERY = re.compile(rb"consumers=([A-Za-z0-9_,.-]+)")
"""The one query taken: ``consumers=`` with a value that needs no unquoting."""
_JSON = (b"content-type", b"application/json")
_NOT_FOUND_BODY = msgspec.json.encode({"detail": NOT_FOUND})
_POSITION = POSITION_HEADER.lower().encode()


def enabled(env: Mapping[str, str]) -> bool:
    """Whether the fast path is on (default yes; ``TRACKER_API_FASTPATH=0`` turns it off)."""
    return env.get(FASTPATH_ENV, "1").lower() not in {"0", "false", "no", "off"}


class FastPath:
    """ASGI app: answers the plain ``GET /api/sessions/{id}`` itself, else calls ``app``."""

    def __init__(self, app: ASGIApp, api: Api) -> None:
        self.app, self.api = app, api
        self._redis: AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # the same metric objects Litestar's middleware creates on its first request
        middleware = PrometheusMiddleware(app, PROMETHEUS)
        labels: dict[str, str | int | float] = {
            "method": "GET",
            "path": TEMPLATE,
            "status_code": 200,
            "app_name": PROMETHEUS.app_name,
        }
        count, duration = middleware.request_count(labels), middleware.request_time(labels)
        self.metrics = {
            status: (
                count.labels("GET", TEMPLATE, str(status), PROMETHEUS.app_name),
                duration.labels("GET", TEMPLATE, str(status), PROMETHEUS.app_name),
            )
            for status in (200, 404)
        }

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":

            async def closing(message: Message) -> None:
                if message["type"] == "lifespan.shutdown.complete":
                    await self.close()
                await send(message)

            await self.app(scope, receive, closing)
        elif scope["type"] != "http" or not await self.answer(scope, send):
            await self.app(scope, receive, send)

    async def answer(self, scope: Message, send: Send) -> bool:
        """Answer the request if it is the plain one; False (nothing sent) to delegate."""
        started = time.perf_counter()
        path: str = scope["path"]
        if (
            scope["method"] != "GET"
            or not path.startswith(PREFIX)
            or scope.get("root_path")
            or (session_id := path[len(PREFIX) :]) is None
            or _ID.fullmatch(session_id) is None
        ):
            return False
        query: bytes = scope.get("query_string", b"")
        consumers: str | None = None
        if query:
            match = _QUERY.fullmatch(query)
            if match is None:
                return False
            consumers = match.group(1).decode()
        authorization: bytes | None = None
        for name, value in scope["headers"]:
            if name.lower() == b"authorization":
                if authorization is not None:
                    return False
                authorization = value
        api = self.api
        try:
            grant = api.auth.grant_of(
                authorization.decode("latin-1") if authorization is not None else None
            )
            if not grants(grant, "read"):
                return False
            read = await self.read(session_id)
        except Exception:
            return False  # Litestar answers errors (and reads again for a tracker error)
        if read is None:
            return False
        session, applied = read
        if session is None or (grant.user_id is not None and session.user_id != grant.user_id):
            status, body, headers = 404, _NOT_FOUND_BODY, []
        else:
            status, body = 200, msgspec.json.encode(shown(session, consumers))
            headers = [(_POSITION, applied.token().encode())] if applied is not None else []
        headers = [*headers, _JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        count, duration = self.metrics[status]
        count.inc()
        duration.observe(time.perf_counter() - started)
        return True

    async def read(self, session_id: str) -> tuple[SessionDTO | None, Position | None] | None:
        """The tracker's one pipelined read (``Tracker.get_session_and_position``), with an
        asyncio client: while Redis answers, the event loop serves other requests (a
        blocking read held it, which cost a third of the throughput). ``None`` when the
        active generation moved or the projection cannot be used: Litestar's route then
        reads the slow way, rebinding as it goes."""
        tracker = self.api.tracker
        if tracker.projection_problem is not None:
            return None
        loop = asyncio.get_running_loop()
        if self._redis is None or self._loop is not loop:  # a client serves one event loop
            self._redis = connect_async(tracker.redis_url)
            self._loop = loop
        store = tracker.store
        partition = partition_for(session_id, store.keys.partitions)
        pipe = self._redis.pipeline(transaction=False)
        store.queue_one_with_checkpoint(pipe, partition, session_id)
        state, generation, token = store.one_with_checkpoint(session_id, await pipe.execute())
        if not store.is_current(generation, token):
            return None
        if state is None:
            checked(session_id, SessionId, "session_id")  # a bad id: Litestar's 422
        return (state.to_dto() if state is not None else None), applied_of(token)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


def wrap(app: Litestar, env: Mapping[str, str]) -> FastPath | Litestar:
    """``app`` behind the fast path, unless ``TRACKER_API_FASTPATH`` turns it off."""
    api: Api = app.state.api
    return FastPath(app, api) if enabled(env) else app
