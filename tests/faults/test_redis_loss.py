"""Redis lost while workers run: FLUSHALL, and a restart of a server without persistence.

Workers keep reading a stream that grows while Redis loses everything, again and again.
On the file log the workers themselves project what they write (the embedded default's
processes are their own projectors); on Kafka ``tracker project`` processes do. Either
way, whoever projects next finds the meta hash gone and rebuilds the projection from the
log (generations.py). After each loss the test waits until Redis has applied everything
the log held before it and ``tracker verify`` finds no difference; at the end Redis must
equal the pure fold of the whole log, hold every acknowledged commit, and every session's
highest offset of the stream, and no process may have exited.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PrivateRedis
from tests.faults.report import Figures
from tests.faults.world import (
    Feeder,
    World,
    acknowledged,
    caught_up,
    log_ends,
    missing,
    projected,
    pure_fold,
)
from tests.processes import Process

pytestmark = pytest.mark.timeout(400)

CONSUMERS = ("notifier", "indexer")
SESSIONS = 200
MESSAGES = 1_000_000
"""At most: the stream grows until the last loss has been recovered from (the workers are
committing all along; on the file log they are the projectors, and only a writing
process notices a lost projection)."""
INJECTIONS = 3
PARTITIONS = 4


@pytest.fixture
def world(
    request: pytest.FixtureRequest, tmp_path: Path, private_redis: PrivateRedis
) -> Iterator[World]:
    log_kind = request.node.callspec.params["log"]
    if log_kind == "kafka":
        bootstrap = request.getfixturevalue("kafka_bootstrap")
        topic = request.getfixturevalue("kafka_topic")
        made = World(tmp_path, private_redis.url, "loss", bootstrap=bootstrap,
                     event_topic=topic, partitions=PARTITIONS)  # fmt: skip
    else:
        made = World(tmp_path, private_redis.url, "loss")
    try:
        yield made
    finally:
        made.stop_all()


def inject(fault: str, redis: PrivateRedis) -> None:
    if fault == "flushall":
        with redis.client() as client:
            client.flushall()
    else:
        redis.restart()


def verified(world: World) -> str | None:
    """``tracker verify``'s complaint, or ``None`` if it exits 0 with 0 differences."""
    done = world.run("verify")
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if done.returncode != 0 or last != "verify: 0 differences":
        return f"exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return None


@pytest.mark.parametrize("fault", ["flushall", "restart"])
@pytest.mark.parametrize("log", ["file", "kafka"])
def test_redis_lost_while_workers_run(
    world: World, private_redis: PrivateRedis, fault: str, log: str, fault_report: Figures
) -> None:
    rng = random.Random(f"{fault}-{log}")
    kafka = log == "kafka"
    stream_dir = world.workdir / "stream"
    if kafka:
        stream = f"{world.settings.event_topic}.stream"
        assert world.settings.kafka_bootstrap is not None
        feeder = Feeder(MESSAGES, SESSIONS, bootstrap=world.settings.kafka_bootstrap,
                        topic=stream, partitions=PARTITIONS)  # fmt: skip
        source = ["--stream", stream]
    else:
        feeder = Feeder(MESSAGES, SESSIONS, stream_dir=stream_dir)
        source = ["--stream-dir", str(stream_dir)]
    feeder.chunk, feeder.pause = 100, 0.05
    feeder.start()
    world.wait_for(lambda: feeder.appended > 0, "the first messages in the stream")
    running: list[Process] = []
    if kafka:
        running += [world.start(f"project{n}", "project", "--report-every", "1") for n in (1, 2)]
    running += [
        world.start(
            name, "worker", *source, "--consumer", name, "--flush-ms", "50", "--report-every", "1"
        )
        for name in CONSUMERS
    ]
    with world.view() as view:
        world.wait_for(lambda: bool(projected(view)), "the first offsets in Redis",
                       running=running)  # fmt: skip
        survived, restore_seconds = 0, []
        for _ in range(INJECTIONS):
            time.sleep(rng.uniform(0.5, 1.5))
            before = log_ends(view)
            inject(fault, private_redis)
            restore_seconds.append(
                world.wait_for(
                    lambda ends=before: caught_up(view, ends),  # type: ignore[misc]
                    "Redis to hold again what the log held before the loss",
                    running=running,
                )
            )
            complaint = verified(world)
            assert complaint is None, complaint
            assert projected(view), "a projection with sessions in it"
            survived += 1
        assert not feeder.done, "the feeder ran out before the last loss: make it longer"
        feeder.stop()
        assert not feeder.errors, feeder.errors[:3]
        want = feeder.heads()
        for consumer in CONSUMERS:
            world.wait_for(
                lambda c=consumer: (
                    {s: st.offsets.get(c) for s, st in projected(view).items()}  # type: ignore[misc]
                    == {s: h for s, h in want.items()}
                ),
                f"every session's highest offset of {consumer} in Redis",
                running=running,
            )
        world.wait_for(lambda: caught_up(view, log_ends(view)), "the projection to catch up",
                       running=running)  # fmt: skip
        assert all(p.alive for p in running), world.tails()
        said = [p.name for p in running if "Redis lost the projection" in p.output()]
        assert said, f"no process said it rebuilt the projection:\n{world.tails()}"
        assert [p.terminate() for p in running] == [0] * len(running), world.tails()
        states, fold = projected(view), pure_fold(view)
        commits = acknowledged(view)
        assert states == fold, "Redis differs from the pure fold of the log"
        lost = missing(commits, states)
        assert lost == 0
        assert {c: {s: st.offsets[c] for s, st in states.items()} for c in CONSUMERS} == {
            c: want for c in CONSUMERS
        }
        complaint = verified(world)
        assert complaint is None, complaint

        # once more with nothing running: `tracker replay` restores it
        inject(fault, private_redis)
        assert world.wait_for(lambda: not projected(view), "Redis to be empty") >= 0
        replayed = world.run("replay")
        assert replayed.returncode == 0, replayed.stderr
        assert projected(view) == fold, "the replay differs from the pure fold of the log"
        complaint = verified(world)
        assert complaint is None, complaint
        survived += 1
    fault_report.fault = (
        "FLUSHALL of Redis" if fault == "flushall" else "restart of Redis (no persistence)"
    ) + f" while workers run ({'Kafka log' if kafka else 'file log'})"
    fault_report.injected = INJECTIONS + 1
    fault_report.survived = survived
    fault_report.lost = lost
    fault_report.checked = (
        "Redis restored to the pure fold by the projectors' own catch-up (and, the last "
        "time, with nothing running, by tracker replay); verify 0 differences; no "
        "acknowledged commit missing; no process exited"
    )
    fault_report.detail = {
        "messages": feeder.appended,
        "sessions": SESSIONS,
        "workers": len(CONSUMERS),
        "projectors": 2 if kafka else 0,
        "acknowledged_commits": len(commits),
        "restore_seconds_max": round(max(restore_seconds), 2),
        "rebuilt_by": ",".join(said),
    }
