"""The ceiling of the ``api`` case: a bare Litestar route answering a constant session.

``GET /api/sessions/{session_id}`` returns the same small JSON object for every id (a
session of the shape ``tracker serve`` answers, with a title and the ``client`` offset),
with no auth, no Redis, no thread hop and no middleware: what Litestar on uvicorn
(uvloop, httptools, one process) costs by itself on this machine. Served as
``uvicorn benchmarks.bare_app:create_app --factory --loop uvloop --http httptools
--no-access-log``.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, get

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
