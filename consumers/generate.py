"""A synthetic load: flux0 message events spread over sessions, offsets counting up per session."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

import msgspec

from tracker.events import utcnow
from tracker.model import format_datetime

_encode = msgspec.json.Encoder().encode

_LINES = (
    "What's the weather in SF?",
    "The weather in San Francisco is currently 60 degrees and foggy.",
    "Can you summarise the last meeting for me?",
    "Sure: the team agreed to ship the offset tracker on Friday.",
    "Remind me to call Dana tomorrow at 10.",
)


_SPEAKERS = ("John Doe", "Drizzle")
_ALPHABET = string.ascii_letters + string.digits


def _id(rng: random.Random) -> str:
    return "".join(rng.choices(_ALPHABET, k=10))


def session_ids(sessions: int) -> list[str]:
    return [f"session{n:06d}" for n in range(sessions)]


def synthetic_messages(
    count: int, sessions: int, *, seed: int = 0, chunk: int = 1_000
) -> Iterator[list[tuple[str, bytes]]]:
    """``count`` flux0 events as ``(session_id, JSON value)`` chunks, round-robin over
    ``sessions`` sessions, each session's offsets 0, 1, 2, ... in stream order."""
    rng = random.Random(seed)
    ids = session_ids(sessions)
    created_at = format_datetime(utcnow())
    next_offset = dict.fromkeys(ids, 0)
    batch: list[tuple[str, bytes]] = []
    for n in range(count):
        sid = ids[n % sessions]
        offset = next_offset[sid]
        next_offset[sid] = offset + 1
        source = "user" if offset % 2 == 0 else "ai_agent"
        event = {
            "id": _id(rng),
            "correlation_id": f"RID({_id(rng)})::{_id(rng)}",
            "type": "message",
            "source": source,
            "offset": offset,
            "data": {
                "type": "message",
                "parts": [{"type": "content", "content": rng.choice(_LINES)}],
                "participant": {
                    "id": _id(rng),
                    "display_name": "Drizzle" if offset % 2 else "John Doe",
                },
            },
            "deleted": False,
            "metadata": {"agent_id": "vUfk4PgjTm", "agent_name": "Drizzle"},
            "created_at": created_at,
        }
        batch.append((sid, _encode(event)))
        if len(batch) == chunk:
            yield batch
            batch = []
    if batch:
        yield batch
