"""The broker stalled under load: SIGSTOP of the only Kafka broker for 10 s, then SIGCONT.

A ``tracker worker`` reads a Kafka stream that grows while the event log sits on the same
broker, a ``tracker project`` applies the log, and ``tracker serve`` answers commits,
reads and ``/readyz`` the whole time. While the broker is frozen nothing can be appended,
read or acknowledged: each process must back off and say so in its log, none may exit,
``/readyz`` must answer 503 promptly (never hang on the frozen broker) and 200 again once
it is back; in the end nothing acknowledged is missing and Redis equals the log's fold.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from kafka import KafkaAdminClient

from consumers.kafkastream import KafkaStream, ensure_topic
from consumers.streams import DeadLetter
from tests.apiserver import AGENT, Server, served
from tests.conftest import PrivateKafka
from tests.faults.report import Figures
from tests.faults.world import (
    BAD_SESSION,
    Feeder,
    World,
    acknowledged,
    caught_up,
    log_ends,
    missing,
    projected,
    pure_fold,
)
from tests.test_workers_kafka import read_topic
from tracker.errors import TrackerError

pytestmark = pytest.mark.timeout(300)

STALL_SECONDS = 10.0
KAFKA_TIMEOUT = "3"
"""TRACKER_KAFKA_TIMEOUT of the worker and the projector: each notices the stall within it."""
READY_BOUND = 3.0
"""Seconds a ``/readyz`` may take, stall or not."""
PARTITIONS = 4
SESSIONS = 100
MESSAGES = 20_000
API_SESSIONS = 20
STREAM = "stall.stream"


class ApiLoad:
    """Commits (PATCH) and reads (GET) against the server from a thread; records what
    was acknowledged (200) and every other answer."""

    def __init__(self, server: Server) -> None:
        self.client = server.client("write")
        self.sessions = [f"api{n:04d}" for n in range(API_SESSIONS)]
        self.acked: dict[str, int] = {}
        self.acks = 0
        self.slowest = 0.0
        self.statuses: dict[int, int] = {}
        self.errors: list[str] = []
        self.refusals: list[str] = []
        """The bodies of the 503 answers."""
        self._next = dict.fromkeys(self.sessions, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="api-load", daemon=True)

    def create(self) -> None:
        for sid in self.sessions:
            response = self.client.post(
                "/api/sessions", json={"agent_id": AGENT, "user_id": "userAAAAAA", "id": sid}
            )
            assert response.status_code == 201, response.text

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        rng = random.Random(4)
        while not self._stop.is_set():
            sid = rng.choice(self.sessions)
            offset = self._next[sid]
            started = time.monotonic()
            try:
                if rng.random() < 0.5:
                    response = self.client.patch(
                        f"/api/sessions/{sid}", json={"consumption_offsets": {"client": offset}}
                    )
                    if response.status_code == 200:
                        self.acked[sid] = max(self.acked.get(sid, -1), offset)
                        self.acks += 1
                    self._next[sid] = offset + 1
                else:
                    response = self.client.get(f"/api/sessions/{sid}")
            except httpx.HTTPError as error:
                self.errors.append(f"{type(error).__name__}: {error}")
                self._stop.wait(0.2)
                continue
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
            if response.status_code == 503:
                self.refusals.append(response.text)
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.client.close()


def readyz(server: Server, details: list[str] | None = None) -> tuple[int, float]:
    started = time.monotonic()
    response = httpx.get(f"{server.url}/readyz", timeout=30)
    if details is not None and response.status_code == 503:
        details.append(response.json()["detail"])
    return response.status_code, time.monotonic() - started


def stream_of(bootstrap: str, feeder: Feeder) -> tuple[dict[int, int], set[tuple[int, int]]]:
    """Per partition of the stream, the offset after its last message (read: Tansu's
    ``end_offsets`` is not the high watermark); and where its undecodable messages are."""
    ends: dict[int, int] = {}
    bad: set[tuple[int, int]] = set()
    count = feeder.appended + feeder.bad_appended
    for record in read_topic(bootstrap, STREAM, count, linger=1.0):
        ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        if record.key == BAD_SESSION.encode():
            bad.add((record.partition, record.offset))
    return ends, bad


def dead_lettered(bootstrap: str, count: int) -> set[tuple[int, int]]:
    """The stream positions the dead letters name."""
    found = set()
    for record in read_topic(bootstrap, f"{STREAM}.dlq", count, linger=1.0):
        headers = {key: value.decode() for key, value in record.headers}
        found.add((int(headers["dlq.partition"]), int(headers["dlq.offset"])))
    return found


def group_offsets(bootstrap: str, group: str) -> dict[int, int]:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="stall-test")
    try:
        offsets = admin.list_group_offsets(group).get(group, {})
    finally:
        admin.close()
    return {tp.partition: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}


@pytest.fixture
def server(
    tmp_path: Path, private_kafka: PrivateKafka, redis_url: str, redis_client: redis.Redis
) -> Iterator[Server]:
    # the default TRACKER_KAFKA_TIMEOUT (10 s): /readyz must not wait for it
    with served(
        tmp_path, redis_url, redis_client, "broker-stall",
        TRACKER_KAFKA_BOOTSTRAP=private_kafka.bootstrap,
        TRACKER_EVENT_TOPIC="stall.events",
        TRACKER_PARTITIONS=str(PARTITIONS),
    ) as running:  # fmt: skip
        yield running


def test_a_stalled_broker_under_load(
    tmp_path: Path, private_kafka: PrivateKafka, server: Server, fault_report: Figures
) -> None:
    world = World(
        tmp_path, server.redis_url, server.prefix, bootstrap=private_kafka.bootstrap,
        event_topic="stall.events", partitions=PARTITIONS, TRACKER_KAFKA_TIMEOUT=KAFKA_TIMEOUT,
    )  # fmt: skip
    feeder = Feeder(MESSAGES, SESSIONS, chunk=100, pause=0.05,
                    bootstrap=private_kafka.bootstrap, topic=STREAM,
                    partitions=PARTITIONS, bad=True)  # fmt: skip
    load = ApiLoad(server)
    try:
        feeder.start()
        world.wait_for(lambda: feeder.appended > 0, "the first messages in the stream")
        projector = world.start("project", "project", "--report-every", "2")
        worker = world.start("worker", "worker", "--stream", STREAM,
                             "--consumer", "notifier", "--report-every", "1")  # fmt: skip
        running = [projector, worker]
        load.create()
        load.start()
        with world.view() as view:
            world.wait_for(
                lambda: any("notifier" in s.offsets for s in projected(view).values()),
                "the worker's first offsets in Redis", running=running,
            )  # fmt: skip
            assert readyz(server)[0] == 200
            appended, acked = feeder.appended, dict(load.acked)

            private_kafka.pause()
            stalled_at = time.monotonic()
            during: list[tuple[int, float]] = []
            details: list[str] = []
            while time.monotonic() - stalled_at < STALL_SECONDS:
                during.append(readyz(server, details))
                time.sleep(0.5)
            private_kafka.resume()
            stall = time.monotonic() - stalled_at

            recovered = world.wait_for(lambda: readyz(server)[0] == 200, "/readyz to be 200",
                                       running=running, timeout=60)  # fmt: skip
            world.wait_for(lambda: feeder.appended > appended and load.acked != acked,
                           "appends and commits to go on after the stall",
                           running=running)  # fmt: skip
            feeder.join()
            load.stop()
            want = feeder.heads()
            world.wait_for(
                lambda: {s: st.offsets.get("notifier") for s, st in projected(view).items()
                         if s in want} == want,
                "every session's highest offset of the stream in Redis", running=running,
            )  # fmt: skip
            for sid, offset in load.acked.items():
                world.wait_for(
                    lambda s=sid, o=offset: projected(view)[s].offsets.get("client", -1) >= o,  # type: ignore[misc]
                    f"the API's commit of {sid}", running=running,
                )  # fmt: skip
            world.wait_for(lambda: caught_up(view, log_ends(view)), "the projection to catch up",
                           running=running)  # fmt: skip
            alive = [p.alive for p in running] + [server.process.poll() is None]
            stream_ends, bad = stream_of(private_kafka.bootstrap, feeder)
            world.wait_for(
                lambda: group_offsets(private_kafka.bootstrap, "notifier") == stream_ends,
                "the worker to commit the end of the stream", running=running,
            )  # fmt: skip
            committed = group_offsets(private_kafka.bootstrap, "notifier")
            letters = dead_lettered(private_kafka.bootstrap, len(bad))
            logs = {p.name: p.output() for p in running}
            logs["serve"] = server.log.read_text(errors="replace")
            assert [p.terminate() for p in running] == [0, 0], world.tails()
            states, fold, commits = projected(view), pure_fold(view), acknowledged(view)
    finally:
        feeder.stop()
        load.stop()
        world.stop_all()
    assert alive == [True, True, True]
    assert states == fold, "Redis differs from the pure fold of the log"
    lost = (
        missing(commits, states)
        + sum(states[sid].offsets.get("client", -1) < offset for sid, offset in load.acked.items())
        + len(bad - letters)
    )
    assert lost == 0
    slow = [(code, round(took, 2)) for code, took in during if took > READY_BOUND]
    assert not slow, f"/readyz took longer than {READY_BOUND} s during the stall: {slow}"
    assert sum(code == 503 for code, _ in during) >= len(during) - 2, during
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert not load.errors, load.errors[:3]
    assert details and all("did not answer" in detail for detail in details), details
    # a commit waits up to TRACKER_KAFKA_TIMEOUT (10 s) for the broker, then answers 503
    assert all("did not answer" in refusal for refusal in load.refusals), load.refusals
    for name, again in (("worker", "flushing works again"), ("project", "projecting again")):
        lines = logs[name].splitlines()
        said = [n for n, line in enumerate(lines) if "did not answer" in line and "retry" in line]
        assert said, f"{name} said nothing of the stall:\n{logs[name][-3000:]}"
        assert any(again in line for line in lines[said[-1] :]), f"{name} never said it recovered"
    assert committed == stream_ends, "the worker's group did not commit the end of the stream"
    verified = world.run("verify")
    assert verified.returncode == 0 and verified.stdout.strip().endswith("verify: 0 differences")

    fault_report.fault = f"SIGSTOP of the only Kafka broker for {STALL_SECONDS:g} s under load"
    fault_report.injected = 1
    fault_report.survived = 1
    fault_report.lost = lost
    fault_report.checked = (
        "worker, projector and API alive, logged the stall; /readyz 503 within "
        f"{READY_BOUND:g} s during it, 200 after; Redis equals the fold; verify 0 differences"
    )
    fault_report.detail = {
        "stall_seconds": round(stall, 1),
        "messages": feeder.appended,
        "undecodable_messages": len(bad),
        "dead_letters": len(letters),
        "api_commits_acknowledged": load.acks,
        "log_commits": len(commits),
        "api_answers": sum(load.statuses.values()),
        "api_503": load.statuses.get(503, 0),
        "api_slowest_s": round(load.slowest, 2),
        "readyz_during": len(during),
        "readyz_503_during": sum(code == 503 for code, _ in during),
        "readyz_slowest_s": round(max(took for _, took in during), 2),
        "readyz_200_after_s": round(recovered, 2),
    }


def test_dead_letters_to_a_stalled_broker_fail_retriably(
    private_kafka: PrivateKafka, fault_report: Figures
) -> None:
    """The worker retries a flush that fails with a retriable TrackerError; any other
    exception ends it. Writing dead letters while the broker is frozen must be the former."""
    bootstrap = private_kafka.bootstrap
    ensure_topic(bootstrap, "dead.stream", 1, timeout=10)
    stream = KafkaStream(bootstrap, "dead.stream", "notifier", timeout=2.0)
    letter = DeadLetter(0, 7, b"s1", b"{not json", [], "not a JSON event")
    try:
        stream.dead_letter([letter], "notifier")  # the producer and the topic exist now
        private_kafka.pause()
        started = time.monotonic()
        try:
            with pytest.raises(TrackerError) as raised:
                stream.dead_letter([letter], "notifier")
        finally:
            private_kafka.resume()
        took = time.monotonic() - started
        assert raised.value.retriable, raised.value
        assert bootstrap in str(raised.value), raised.value
        stream.dead_letter([letter], "notifier")  # and works again once it is back
    finally:
        stream.close()
    fault_report.fault = "SIGSTOP of the broker while dead letters are written"
    fault_report.injected = fault_report.survived = 1
    fault_report.checked = "a retriable error (the worker backs off and retries), no crash"
    fault_report.detail = {"seconds_to_fail": round(took, 2)}
