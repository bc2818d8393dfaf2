"""``tracker demo``: a realistic workload on a fresh embedded tracker, then replay and verify.

Three consumers (a client, a notifier and a search indexer) follow thousands of
session streams at different lags and flush their offsets in batches, as workers do;
some flushes are redelivered (duplicates) and some arrive late (stale). Afterwards the
Redis projection is wiped, rebuilt from the log by replay, and verified against an
in-memory fold of the log.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tracker.service import Tracker
from tracker.settings import Settings

CONSUMERS = ("client", "notifier", "indexer")
FLUSH = 5_000


def workload(
    session_ids: list[str], commits: int, rng: random.Random
) -> list[list[tuple[str, str, int]]]:
    """Worker flushes of ``(session, consumer, offset)``: mostly forward, some repeated or stale."""
    heads = dict.fromkeys(session_ids, 0)
    progress = {(sid, c): -1 for sid in session_ids for c in CONSUMERS}
    flushes: list[list[tuple[str, str, int]]] = []
    batch: list[tuple[str, str, int]] = []
    for _ in range(commits):
        sid = rng.choice(session_ids)
        consumer = rng.choices(CONSUMERS, weights=(5, 3, 2))[0]
        heads[sid] += rng.randint(0, 3)
        roll = rng.random()
        done = progress[sid, consumer]
        if roll < 0.04 and done >= 0:
            offset = done  # redelivered: the same offset again
        elif roll < 0.08 and done > 0:
            offset = rng.randint(0, done - 1)  # a late, stale flush
        else:
            offset = max(done, rng.randint(max(0, heads[sid] - 5), heads[sid]))
            progress[sid, consumer] = offset
        batch.append((sid, consumer, offset))
        if len(batch) == FLUSH:
            flushes.append(batch)
            batch = []
    if batch:
        flushes.append(batch)
    return flushes


def run_demo(out: Console, *, sessions: int, commits: int, seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tracker-demo-") as directory:
        settings = Settings(data_dir=Path(directory))
        out.print(f"demo: embedded file log and redis-server in {directory}", markup=False)
        with Tracker(settings) as tracker:
            started = time.perf_counter()
            users = [f"user{n:06d}" for n in range(max(1, sessions // 10))]
            agents = [f"agent{n:05d}" for n in range(20)]
            ids = [
                tracker.create_session(rng.choice(agents), rng.choice(users), title=f"chat {n}").id
                for n in range(sessions)
            ]
            created = time.perf_counter() - started
            out.print(f"created {sessions:,} sessions in {created:.2f} s", markup=False)

            flushes = workload(ids, commits, rng)
            started = time.perf_counter()
            for flush in flushes:
                tracker.commit_many(flush, strict=True)
            seconds = time.perf_counter() - started
            out.print(
                f"committed {commits:,} offsets from {len(CONSUMERS)} consumers in "
                f"{len(flushes)} flushes: {seconds:.2f} s ({commits / seconds:,.0f} commits/s)",
                markup=False,
            )

            table = Table("session", "user", *CONSUMERS, title="some sessions")
            for sid in ids[:5]:
                session = tracker.get_session(sid)
                assert session is not None
                offsets = session.consumption_offsets
                table.add_row(sid, session.user_id, *(str(offsets.get(c, "-")) for c in CONSUMERS))
            out.print(table)

            tracker.client.flushdb()
            out.print("wiped the Redis projection (FLUSHDB)", markup=False)
            report = tracker.replay()
            out.print(
                f"replay: {report.events:,} events, {report.sessions:,} sessions, "
                f"{report.seconds:.2f} s, {report.rate:,.0f} events/s, "
                f"{report.redis_calls / max(report.events, 1) * 1000:.2f} Redis calls "
                "per 1,000 events",
                markup=False,
            )
            check = tracker.verify()
            for difference in check.differences[:20]:
                out.print(f"{difference.session_id}: {difference.problem}", markup=False)
            out.print(
                f"verified {check.events:,} events over {check.sessions:,} sessions "
                f"in {check.seconds:.2f} s",
                markup=False,
            )
            out.print(f"verify: {len(check.differences)} differences", markup=False)
