"""Operations routes: liveness, readiness (Redis and the log, lag per partition), OpenAPI."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from tracker.api.context import api_of

READY_SECONDS = 2.0
"""How long ``/readyz`` waits for Redis and the log before it answers 503."""


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Redis and the event log answer; the body shows the projector's lag per partition.

    503 when either cannot be reached, or does not answer within ``READY_SECONDS`` (a
    frozen broker or Redis: the check never hangs for the log's own timeout). Lag alone
    does not make the server unready: with Kafka, separate projectors catch up.
    """
    api = api_of(request)
    try:
        status = await asyncio.wait_for(asyncio.shield(api.readiness()), READY_SECONDS)
    except TimeoutError:
        detail = f"Redis or the event log did not answer within {READY_SECONDS:g} s"
        return Response({"status": "unavailable", "detail": detail}, status_code=503)
    except Exception as error:  # TrackerErrors, and redis-py's own errors
        return Response({"status": "unavailable", "detail": str(error)}, status_code=503)
    body = {
        "status": "ready",
        "generation": status.generation,
        "lag": status.lag,
        "partitions": [
            {"partition": p.partition, "end": p.end, "applied": p.applied, "lag": p.lag}
            for p in status.partitions
        ],
    }
    return Response(body)


@get("/openapi.json", include_in_schema=False, sync_to_thread=False)
def openapi_json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """The OpenAPI 3.1 document (also at ``/docs/openapi.json``; the UI is ``/docs``)."""
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


ROUTES = [healthz, readyz, openapi_json]
