"""What a session looks like on the wire: flux0's ``SessionDTO``, validated by declaration.

The constrained types below are the single place that says what is valid; every
decoder (events, JSON import, the CLI) validates through them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from msgspec import Meta, Struct

from tracker.errors import InvalidInputError

MAX_OFFSET = 2**63 - 1

SessionId = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}\Z", description="1..64 chars of [A-Za-z0-9_-]")
]
AgentId = SessionId
UserId = SessionId
ConsumerName = Annotated[
    str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z", description="1..64 chars of [A-Za-z0-9_.-]")
]
Offset = Annotated[int, Meta(ge=0, le=MAX_OFFSET, description="inclusive offset, 0 <= n < 2**63")]
Title = Annotated[str, Meta(max_length=200)]
EventId = Annotated[str, Meta(max_length=64, description="at most 64 chars (new ids: 32 hex)")]
Actor = Annotated[str, Meta(max_length=200, description="who reset an offset")]
Reason = Annotated[str, Meta(max_length=1000, description="why an offset was reset")]
Timestamp = Annotated[
    datetime, Meta(tz=True, description="ISO 8601 with a time zone, e.g. 2025-01-25T22:41:41Z")
]
"""A time that names its zone: naive times cannot be ordered against the tracker's own."""
ConsumptionOffsets = dict[ConsumerName, Offset]

DEFAULT_CONSUMER = "client"


class SessionDTO(Struct, frozen=True, omit_defaults=True):
    """A session as flux0 serves it; a null ``title`` is omitted when encoded.

    ``consumption_offsets`` maps a consumer to the offset of the last event it processed
    (inclusive); a consumer that processed nothing is absent.
    """

    id: SessionId
    agent_id: AgentId
    user_id: UserId
    consumption_offsets: ConsumptionOffsets
    created_at: Timestamp
    title: Title | None = None


def format_datetime(value: datetime) -> str:
    """ISO 8601 as flux0 (pydantic) writes it: ``2025-01-25T22:41:41Z``, fractions only if any."""
    return _datetime_encoder.encode(value)[1:-1].decode()


_datetime_encoder = msgspec.json.Encoder()


def checked(value: object, kind: object, field: str) -> object:
    """``value`` validated against a constrained type above; errors name the field."""
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        message = str(exc).split(" - at ", 1)[0]
        raise InvalidInputError(f"{field}: {message} (got {value!r})") from None
