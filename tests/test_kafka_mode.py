"""The tracker on Kafka: commands wait for ``tracker project``, which a consumer group shares out.

Real broker (see conftest: the env override, testcontainers, or the Tansu binary) and real
Redis; the projectors are real processes, killed with SIGKILL as production kills them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import PrivateRedis
from tests.services import free_port, projecting, stop_process
from tracker import NotYetVisibleError, Settings, Tracker
from tracker.fold import fold_all, visible

TRACKER = str(Path(sys.executable).with_name("tracker"))
JOIN_SECONDS = 60


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, redis_url: str,
             prefix: str) -> Settings:  # fmt: skip
    return Settings(
        data_dir=tmp_path / "data", kafka_bootstrap=kafka_bootstrap, event_topic=kafka_topic,
        partitions=6, redis_url=redis_url, prefix=prefix, wait_timeout=JOIN_SECONDS,
    )  # fmt: skip


def env_of(settings: Settings) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    assert settings.kafka_bootstrap is not None and settings.redis_url is not None
    values.update(
        TRACKER_DATA_DIR=str(settings.data_dir), TRACKER_KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        TRACKER_EVENT_TOPIC=settings.event_topic, TRACKER_PARTITIONS=str(settings.partitions),
        TRACKER_REDIS_URL=settings.redis_url, TRACKER_PREFIX=settings.prefix,
        TRACKER_WAIT_TIMEOUT=str(settings.wait_timeout),
    )  # fmt: skip
    return values


@pytest.fixture
def projector(settings: Settings) -> Iterator[Tracker]:
    with projecting(settings) as tracker:
        yield tracker


def test_commands_wait_for_the_projector(settings: Settings, projector: Tracker) -> None:
    with Tracker.open(settings=settings) as tracker:
        assert not tracker.self_projecting
        created = tracker.create_session("agent", "user", session_id="k1", title="t")
        assert tracker.get_session("k1") == created
        result = tracker.commit("k1", "client", 5)
        assert result.changed and tracker.offsets("k1") == {"client": 5}
        many = tracker.commit_many([(f"s{i}", "client", i) for i in range(50)], wait=False)
        assert many.last is not None and len(many.positions) > 1, "spread over partitions"
        for position in many.positions:
            tracker.wait_for(position)
        assert tracker.offsets("s49") == {"client": 49}
        status = tracker.status()
        assert status.lag == 0 and len(status.partitions) == 6
        assert tracker.verify().differences == []


def test_without_a_projector_a_command_says_which_partition_lags(settings: Settings) -> None:
    quick = Settings(**{**{f: getattr(settings, f) for f in settings.__dataclass_fields__},
                        "wait_timeout": 0.5})  # fmt: skip
    with Tracker.open(settings=quick) as tracker:
        started = time.monotonic()
        with pytest.raises(NotYetVisibleError, match=r"partition \d+ is 1 events behind") as info:
            tracker.create_session("agent", "user", session_id="lonely")
        assert time.monotonic() - started < 10
        assert info.value.retriable and len(info.value.positions) == 1
        assert tracker.status().lag == 1, "the create is in the log, durable"


def test_an_unreachable_broker_exits_75_quickly(tmp_path: Path, redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(
        TRACKER_DATA_DIR=str(tmp_path), TRACKER_REDIS_URL=redis_url,
        TRACKER_KAFKA_BOOTSTRAP=f"127.0.0.1:{free_port()}", TRACKER_KAFKA_TIMEOUT="2",
    )  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(
        [TRACKER, "sessions", "list"], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 75, done.stderr
    assert time.monotonic() - started < 30
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and "Traceback" not in done.stderr


WRITER = """
from tracker import Tracker
with Tracker.open() as tracker:
    for i in range(200):
        tracker.commit_many(
            [(f"s{{k}}", "w{w}", i) for k in range(12)]
            + [(f"s{{k}}", "shared", i * 3 + {w}) for k in range(12)],
            wait=False,
        )
        if i % 40 == 0:
            tracker.create_session("agent", "user", session_id=f"c{w}-{{i}}")
"""


def start_projector(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [TRACKER, "project", "--report-every", "1"], env=env, stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def lag(env: dict[str, str]) -> int:
    done = subprocess.run(
        [TRACKER, "status", "--json"], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return sum(p["lag"] for p in json.loads(done.stdout)["partitions"])


def test_writers_and_killed_projectors_end_at_the_fold_of_the_topic(
    settings: Settings, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    """3 writers, 2 projectors on 6 partitions; projectors SIGKILLed and restarted."""
    settings = Settings(**{**{f: getattr(settings, f) for f in settings.__dataclass_fields__},
                           "redis_url": private_redis.url})  # fmt: skip
    env = env_of(settings)
    log = tmp_path / "projectors.log"
    projectors = [start_projector(env, log) for _ in range(2)]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER.format(w=w)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for w in range(3)
    ]
    try:
        for round_ in range(4):
            time.sleep(2.5)
            victim = projectors[round_ % 2]
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            projectors[round_ % 2] = start_projector(env, log)
        for writer in writers:
            _, err = writer.communicate(timeout=180)
            assert writer.returncode == 0, err.decode()
        wait_until(lambda: lag(env) == 0, 120, "the projectors to catch up")
    finally:
        for process in projectors + writers:
            stop_process(process)

    with Tracker(settings, catch_up=False) as tracker:
        expected = visible(fold_all(tracker.export_events()))
        actual = {state.session_id: state for state in tracker.store.scan()}
        assert actual == expected, "Redis is the pure fold of the whole topic"
        assert expected["s3"].offsets == {"shared": 199 * 3 + 2} | {f"w{w}": 199 for w in range(3)}
        assert tracker.verify().differences == []
    with private_redis.client() as client:
        client.flushall()
    done = subprocess.run([TRACKER, "replay", "--json"], env=env, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    with Tracker(settings, catch_up=False) as tracker:
        assert {s.session_id: s for s in tracker.store.scan()} == expected
        assert "Traceback" not in log.read_text()


def test_the_demo_runs_on_a_broker(tmp_path: Path, kafka_bootstrap: str) -> None:
    """``tracker demo --kafka``: workers, a projector, dead letters, replay and verify."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("tracker")), "demo", "--kafka", kafka_bootstrap,
         "--sessions", "20", "--messages", "600"],
        env=env, capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert "exit codes projector 0, notifier 0, indexer 0" in result.stdout, result.stdout
    assert any(line.startswith("replay: ") and " events, 20 sessions" in line for line in lines)
    assert lines[-1] == "verify: 0 differences", result.stdout
