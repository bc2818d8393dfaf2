"""Operations routes: liveness, readiness (Redis and the log, lag per partition), OpenAPI."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get

from tracker.api.context import api_of, blocking
from tracker.status import Status


@get("/healthz", sync_to_thread=False)
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@get("/readyz")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Redis and the event log answer; the body shows the projector's lag per partition.

    503 when either cannot be reached (lag alone does not make the server unready: with
    Kafka, separate projectors catch up).
    """
    api = api_of(request)

    def run() -> Status:
        api.tracker.client.ping()
        return api.tracker.status()

    try:
        status = await blocking(run)
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
