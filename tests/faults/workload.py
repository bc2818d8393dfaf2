"""Seeded randomness and a mixed event load for the fault tests; a process that appends it.

``python -m tests.faults.workload`` (the tracker's settings from the environment) appends
batches of mixed events until SIGTERM, then exits 0; after each acknowledged append it
prints the total number of events appended, one line each.
"""

from __future__ import annotations

import os
import random
import signal
import sys
from datetime import UTC, datetime

from tracker import Settings, Tracker
from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    SessionCreated,
    SessionDeleted,
    TitleChanged,
)


def seeded(name: str) -> tuple[int, random.Random]:
    """The run's seed (``FAULTS_SEED``, else a random one), printed, and its RNG."""
    seed = int(os.environ.get("FAULTS_SEED") or 0) or random.SystemRandom().randrange(1, 2**31)
    print(f"{name}: seed {seed} (FAULTS_SEED={seed} repeats the run)", file=sys.stderr)
    return seed, random.Random(seed)


CONSUMERS = ("client", "notifier", "indexer")
CREATED_AT = datetime(2025, 1, 25, 22, 41, 41, tzinfo=UTC)


def session_names(count: int) -> list[str]:
    return [f"s{n:06d}" for n in range(count)]


def creations(sessions: list[str]) -> list[AnyEvent]:
    return [
        SessionCreated(session_id=sid, agent_id="vUfk4PgjTm", user_id=f"u{n % 97:04d}",
                       created_at=CREATED_AT, title=f"chat {n}")
        for n, sid in enumerate(sessions)
    ]  # fmt: skip


def mixed(rng: random.Random, sessions: list[str], count: int) -> list[AnyEvent]:
    """``count`` events on ``sessions``: mostly commits (in any order: offsets are
    max-registers), some resets (backwards), title changes and a few deletions."""
    events: list[AnyEvent] = []
    for _ in range(count):
        sid = rng.choice(sessions)
        roll = rng.random()
        if roll < 0.86:
            consumer = rng.choice(CONSUMERS)
            events.append(OffsetCommitted(session_id=sid, consumer=consumer,
                                          offset=rng.randrange(100_000)))  # fmt: skip
        elif roll < 0.93:
            events.append(OffsetReset(session_id=sid, consumer=rng.choice(CONSUMERS),
                                      offset=rng.randrange(1_000), actor="ops",
                                      reason="reprocess"))  # fmt: skip
        elif roll < 0.998:
            title = None if rng.random() < 0.2 else f"title {rng.randrange(10**6)}"
            events.append(TitleChanged(session_id=sid, title=title))
        else:
            events.append(SessionDeleted(session_id=sid))
    return events


def main() -> None:
    """Append batches of mixed events until SIGTERM; print the running total after each."""
    seed = int(os.environ["WORKLOAD_SEED"])
    sessions = session_names(int(os.environ["WORKLOAD_SESSIONS"]))
    batch = int(os.environ.get("WORKLOAD_BATCH", "500"))
    rng = random.Random(seed)
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    total = 0
    with Tracker(Settings.from_env(), catch_up=False) as tracker:
        while not stopping:
            total += tracker.import_events(mixed(rng, sessions, batch), wait=False).count
            print(total, flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
