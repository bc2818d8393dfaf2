"""The ceiling of the ``api`` case: a bare Litestar route answering a constant session.

``GET /api/sessions/{session_id}`` returns the same small JSON object for every id (a
session of the shape ``tracker serve`` answers, with a title and the ``client`` offset),
with no auth, no Redis, no thread hop and no middleware: what Litestar on uvicorn
(uvloop, httptools, one process) costs by itself on this machine. Served as
``uvicorn benchmarks.bare_app:create_app --factory --loop uvloop --http httptools
--no-access-log``.

``create_redis_app`` is a diagnostic floor between the two: the same route doing one
redis-py ``HGETALL`` of the session's real key (``BENCH_REDIS_URL``; ``BENCH_KEYS`` =
``prefix:generation:partitions`` of the tracker's projection) on the event loop and
answering the raw hash: Litestar plus one Redis read, without auth, metrics or the
tracker's shaping.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from litestar import Litestar, get

from tracker.keys import Keys, partition_for

SESSION: dict[str, Any] = {
    "id": "Xq3Lw9pZt2",
    "agent_id": "agentAAAAA",
    "user_id": "userAAAAAA",
    "consumption_offsets": {"client": 1234},
    "created_at": "2025-01-25T22:41:41.123000Z",
    "title": "Quarterly report review for the Q3 roadmap — café notes",
}
"""About the size of a realistic session (title of 20 to 80 characters)."""


@get("/api/sessions/{session_id:str}", sync_to_thread=False)
def get_session(session_id: str) -> dict[str, Any]:
    """The constant session, whatever the id."""
    return SESSION


def create_app() -> Litestar:
    """uvicorn's factory: the app with the one route (no OpenAPI UI, no middleware)."""
    return Litestar(route_handlers=[get_session], openapi_config=None)


def create_redis_app() -> Litestar:
    """uvicorn's factory: the route reading the session's hash with one ``HGETALL``."""
    client = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"], decode_responses=True)
    prefix, generation, partitions = os.environ["BENCH_KEYS"].rsplit(":", 2)
    keys = Keys(prefix, int(generation), int(partitions))

    @get("/api/sessions/{session_id:str}", sync_to_thread=False)
    def get_hash(session_id: str) -> dict[str, Any]:
        """The session's raw hash (empty if there is none)."""
        key = keys.session(partition_for(session_id, keys.partitions), session_id)
        values: dict[str, Any] = client.hgetall(key)  # type: ignore[assignment]
        return values

    return Litestar(route_handlers=[get_hash], openapi_config=None, on_shutdown=[client.close])
