"""``POST /api/sessions/{id}/offsets/{consumer}/reset``: plan an offset reset, or apply it.

The operator's tool for moving an offset back (a commit never does): by default it only
answers with the plan; ``"execute": true`` applies it, recorded with the token's name as
the actor and the given reason. Needs the ``admin`` scope. The target is one of
``to_offset``, ``shift_by`` (from the current offset) and ``to_time`` (the offset the
consumer had then, read from the log: kafka-consumer-groups' ``--to-datetime``).
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, post

from tracker.api.auth import grant_of
from tracker.api.bodies import BodyError, ResetOffset, body_operation, decode_body, problem
from tracker.api.context import Api, api_of, blocking
from tracker.api.past import offset_at
from tracker.api.views import position_headers, visible
from tracker.results import ResetPlan


class ResetDTO(msgspec.Struct, frozen=True):
    """A reset plan (``applied`` false) or what a reset did; ``position`` is ``P:O:I``."""

    session_id: str
    consumer: str
    current: int | None
    target: int
    applied: bool
    position: str | None
    actor: str
    reason: str


TARGETS = ("to_offset", "shift_by", "to_time")


def _target(
    api: Api, body: ResetOffset, session_id: str, consumer: str, current: int | None
) -> int:
    given = [name for name in TARGETS if getattr(body, name) is not None]
    if len(given) != 1:
        message = "give exactly one of to_offset, shift_by and to_time"
        error = BodyError([])
        for name in given or TARGETS:
            error.also("value_error", ["body", name], message, getattr(body, name))
        raise error
    if body.to_time is not None:
        return offset_at(api, session_id, consumer, body.to_time)
    if body.to_offset is not None:
        return body.to_offset
    assert body.shift_by is not None
    if current is None:
        message = "the consumer has no offset to shift; use to_offset"
        raise problem("value_error", ["body", "shift_by"], message, body.shift_by)
    target = current + body.shift_by
    if target < 0:
        message = f"shifts the offset {current} below 0"
        raise problem("value_error", ["body", "shift_by"], message, body.shift_by)
    return target


@post(
    "/api/sessions/{session_id:str}/offsets/{consumer:str}/reset",
    opt={"scope": "admin"},
    status_code=200,
    operation_class=body_operation(ResetOffset),
)
async def reset_offset(
    request: Request[Any, Any, Any], session_id: str, consumer: str
) -> Response[ResetDTO]:
    """Plan (default) or, with `execute: true`, apply an offset reset (backwards too)."""
    api, grant = api_of(request), grant_of(request)
    body = decode_body(await request.body(), ResetOffset)

    def run() -> tuple[ResetPlan, dict[str, str]]:
        tracker = api.tracker
        session = visible(api, grant, session_id)
        current = session.consumption_offsets.get(consumer)
        target = _target(api, body, session_id, consumer, current)
        if body.execute:
            plan = tracker.reset_offset(
                session_id, consumer, target, reason=body.reason, actor=grant.name
            )
        else:
            plan = tracker.plan_reset(session_id, consumer, target)
        return plan, position_headers(api, [session_id])

    plan, headers = await blocking(run)
    position = plan.position.token() if plan.position is not None else None
    dto = ResetDTO(
        plan.session_id, plan.consumer, plan.current, plan.target, plan.applied, position,
        grant.name, body.reason,
    )  # fmt: skip
    return Response(dto, headers=headers)


ROUTES = [reset_offset]
