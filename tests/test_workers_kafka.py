"""``tracker worker`` on Kafka, end to end: real broker, real Redis, real processes.

Every worker, projector and command is a ``python -m tracker`` subprocess with its own
environment (the test's Redis prefix, event topic and stream topic); each is stopped by
its PID when the test ends. Waiting is bounded: a wait that runs out fails, saying what
was missing and showing the tail of every process's output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.structs import TopicPartition

from consumers.generate import session_ids
from consumers.kafkastream import ensure_topic
from tests import processes
from tests.conftest import delete_prefix
from tracker import Settings, Tracker
from tracker.fold import SessionState

pytestmark = pytest.mark.timeout(600)  # several bounded waits in a row; each says what it missed

REPO = Path(__file__).resolve().parents[1]
PARTITIONS = 6
WAIT = 180.0
"""Seconds any one wait may take before the test fails."""
GROUP_MS = "6000"
"""Session and rebalance timeouts of the workers' group: a Tansu join takes ~3 s with them."""
HUGE_FLUSH = ("--flush-ms", "600000", "--flush-max", "100000000")
"""A worker that never flushes on its own: only a revocation or SIGTERM makes it."""

HANDLERS = '''
"""Handlers of tests/test_workers_kafka.py, imported by the worker subprocesses."""

import os
import time

from consumers import Message, Retry

_handled = None


def _note(message: Message) -> None:
    """Append "partition position" to this process's file: what it handled, in order."""
    global _handled
    if _handled is None:
        path = os.path.join(os.environ["WORKER_TEST_OUT"], f"{os.getpid()}.handled")
        _handled = open(path, "a", buffering=1)
    _handled.write(f"{message.partition} {message.position}\\n")


def noted(message: Message) -> None:
    _note(message)


def slow(message: Message) -> None:
    _note(message)
    time.sleep(0.001)


def picky(message: Message) -> None:
    data = message.event.get("data") or {}
    if data.get("fail"):
        raise ValueError(f"refused {message.session_id}@{message.offset}")
    if data.get("busy"):
        raise Retry("still busy")
'''

_SUMMARY = re.compile(
    r"^worker (?P<consumer>\S+)(?P<done> done)?: processed (?P<processed>[\d,]+), "
    r"offsets committed (?P<committed>[\d,]+), dead-lettered (?P<dead>[\d,]+), "
    r"retried (?P<retried>[\d,]+), .* lag (?P<lag>\S+)$"
)


@dataclass(frozen=True)
class Summary:
    """One summary line of a worker (``--report-every``, and the last one, ``done``)."""

    done: bool
    processed: int
    committed: int
    dead_lettered: int
    retried: int


class Process(processes.Process):
    """A ``tracker worker`` subprocess, with what its summaries and handlers say."""

    def summaries(self) -> list[Summary]:
        found = []
        for line in self.output().splitlines():
            if match := _SUMMARY.match(line):
                found.append(
                    Summary(
                        done=bool(match["done"]),
                        processed=int(match["processed"].replace(",", "")),
                        committed=int(match["committed"].replace(",", "")),
                        dead_lettered=int(match["dead"].replace(",", "")),
                        retried=int(match["retried"].replace(",", "")),
                    )
                )
        return found

    def last(self) -> Summary | None:
        summaries = self.summaries()
        return summaries[-1] if summaries else None

    def processed(self) -> int:
        last = self.last()
        return last.processed if last else 0

    def handled(self) -> list[tuple[int, int]]:
        """``(partition, position)`` of every message its handler saw (``noted``, ``slow``)."""
        path = self.log.parent / f"{self.pid}.handled"
        if not path.exists():
            return []
        pairs = []
        for line in path.read_text().splitlines():
            if line.count(" ") == 1:  # one write per line (line buffered): never half a line
                partition, position = line.split()
                pairs.append((int(partition), int(position)))
        return pairs


class Harness(processes.Processes[Process]):
    """One test's world: its env, its topics, its processes (all stopped at the end)."""

    process_type = Process
    wait_timeout = WAIT

    def __init__(
        self,
        workdir: Path,
        bootstrap: str,
        redis_url: str,
        prefix: str,
        event_topic: str,
        stream: str,
    ) -> None:
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.stream = stream
        self.dlq = f"{stream}.dlq"
        self.settings = Settings(
            data_dir=workdir / "data",
            kafka_bootstrap=bootstrap,
            event_topic=event_topic,
            partitions=PARTITIONS,
            redis_url=redis_url,
            prefix=prefix,
        )
        handlers = workdir / "handlers"
        handlers.mkdir()
        (handlers / "worker_test_handlers.py").write_text(HANDLERS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        env.update(
            TRACKER_DATA_DIR=str(self.settings.data_dir),
            TRACKER_KAFKA_BOOTSTRAP=bootstrap,
            TRACKER_REDIS_URL=redis_url,
            TRACKER_PREFIX=prefix,
            TRACKER_EVENT_TOPIC=event_topic,
            TRACKER_PARTITIONS=str(PARTITIONS),
            TRACKER_WORKER_SESSION_TIMEOUT_MS=GROUP_MS,
            TRACKER_WORKER_MAX_POLL_INTERVAL_MS=GROUP_MS,
            WORKER_TEST_OUT=str(workdir),
            PYTHONPATH=os.pathsep.join([str(handlers), str(REPO)]),
        )
        super().__init__(workdir, env)
        self._view: Tracker | None = None

    # -- processes ---------------------------------------------------------------------

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command to its end; fail the test unless it exits 0."""
        done = self.run_any(*args, timeout=timeout)
        assert done.returncode == 0, f"tracker {' '.join(args)}: {done.returncode}\n{done.stderr}"
        return done

    def group(self, consumer: str) -> str:
        return f"{self.stream}.{consumer}"

    def worker(self, name: str, consumer: str, *options: str) -> Process:
        return self.start(
            name, "worker", "--stream", self.stream, "--consumer", consumer,
            "--group", self.group(consumer), "--report-every", "0.5", *options,
        )  # fmt: skip

    def append(self, count: int, sessions: int) -> None:
        """``tracker streams append --generate``: session n's highest offset is
        ``(count - 1 - n) // sessions``."""
        done = self.run(
            "streams", "append", "--stream", self.stream, "--generate", str(count),
            "--sessions", str(sessions), "--json",
        )  # fmt: skip
        assert json.loads(done.stdout)["messages"] == count

    def stop_all(self) -> None:
        super().stop_all()
        if self._view is not None:
            self._view.close()

    # -- what Redis and Kafka hold -------------------------------------------------------

    @property
    def view(self) -> Tracker:
        """A tracker of this process on the same topic and prefix, to read Redis."""
        if self._view is None:
            self._view = Tracker(self.settings, catch_up=False)
        return self._view

    def states(self) -> dict[str, SessionState]:
        """Every session Redis holds under the prefix (none if there is no projection)."""
        view = self.view
        if not view.generations.refresh():
            return {}
        return {state.session_id: state for state in view.store.scan()}

    def offsets(self, consumer: str) -> dict[str, int]:
        return {
            sid: state.offsets[consumer]
            for sid, state in self.states().items()
            if consumer in state.offsets
        }

    def committed(self, consumer: str) -> dict[int, int]:
        """The positions the consumer's group has committed on the stream, per partition."""
        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="worker-tests")
        try:
            group = self.group(consumer)
            offsets = admin.list_group_offsets(group).get(group, {})
        finally:
            admin.close()
        return {
            tp.partition: meta.offset
            for tp, meta in offsets.items()
            if tp.topic == self.stream and meta.offset >= 0
        }

    def ends(self, count: int) -> dict[int, int]:
        """Per partition of the stream, the offset after its last message (read, as Tansu's
        ``end_offsets`` is not the high watermark); only partitions holding messages."""
        ends: dict[int, int] = {}
        for record in read_topic(self.bootstrap, self.stream, count, linger=0):
            ends[record.partition] = max(ends.get(record.partition, 0), record.offset + 1)
        return ends


def read_topic(bootstrap: str, topic: str, count: int, *, linger: float = 1.0) -> list[Any]:
    """The first ``count`` records of every partition of ``topic`` (it may not exist yet),
    plus any more that arrive within ``linger`` seconds; fails after ``WAIT`` seconds."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, client_id="worker-tests"
    )
    records: list[Any] = []
    try:
        deadline = time.monotonic() + WAIT
        while not (partitions := consumer.partitions_for_topic(topic)):
            assert time.monotonic() < deadline, f"no topic {topic}"
            time.sleep(0.25)
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        consumer.seek_to_beginning()
        while len(records) < count:
            assert time.monotonic() < deadline, (
                f"{topic}: {len(records)} records after {WAIT:g} s, expected {count}"
            )
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
        until = time.monotonic() + linger
        while time.monotonic() < until:
            for batch in consumer.poll(timeout_ms=200).values():
                records.extend(batch)
    finally:
        consumer.close(autocommit=False)
    return records


def expected_offsets(count: int, sessions: int) -> dict[str, int]:
    """Each session's highest offset in ``synthetic_messages(count, sessions)``."""
    return {sid: (count - 1 - n) // sessions for n, sid in enumerate(session_ids(sessions))}


def behind(actual: dict[str, int], expected: dict[str, int]) -> str:
    wrong = sorted(
        sid for sid in expected.keys() | actual.keys() if actual.get(sid) != expected.get(sid)
    )
    shown = ", ".join(f"{sid}: {actual.get(sid)} (want {expected.get(sid)})" for sid in wrong[:5])
    return f"{len(wrong)} of {len(expected)} sessions differ in Redis: {shown}"


@pytest.fixture
def harness(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, redis_url: str, prefix: str
) -> Iterator[Harness]:
    """The event log is ``kafka_topic``; the stream and its dead letters are topics of
    their own, deleted afterwards."""
    stream = f"{kafka_topic}.stream"
    world = Harness(tmp_path, kafka_bootstrap, redis_url, prefix, kafka_topic, stream)
    try:
        yield world
    finally:
        world.stop_all()
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="worker-tests")
        try:
            admin.delete_topics([stream, world.dlq], raise_errors=False)
        except Exception:  # a topic that was never made: nothing to delete
            pass
        finally:
            admin.close()


def test_a_killed_workers_partitions_are_taken_over_and_nothing_is_lost(harness: Harness) -> None:
    """Two workers in one group; one is SIGKILLed while it works; the other finishes.

    The victim is slow (1 ms a message) and starts alone; the survivor joins, the group
    splits the partitions, and the victim is killed once it handles messages of its new
    share. Both handlers note what they handled, so the test knows which partition the
    victim was in the middle of when it died, and that the survivor read it to the end.
    """
    h = harness
    count, sessions = 50_000, 500
    h.append(count, sessions)
    projector = h.start("projector", "project", "--report-every", "1")
    victim = h.worker("victim", "indexer", "--handler", "worker_test_handlers:slow")
    h.wait_for(
        lambda: len(victim.handled()) > 0,
        lambda: "the victim to handle messages",
        running=[victim, projector],
    )
    survivor = h.worker("survivor", "indexer", "--handler", "worker_test_handlers:noted")
    h.wait_for(
        lambda: len(survivor.handled()) > 0,
        lambda: "the survivor to join the group and handle messages",
        running=[victim, survivor, projector],
    )
    so_far = len(victim.handled())
    h.wait_for(
        lambda: len(victim.handled()) > so_far,
        lambda: "the victim to go on handling messages after the rebalance",
        running=[victim, survivor, projector],
    )
    victim.kill()
    killed_at = victim.handled()
    last_partition, last_position = killed_at[-1]

    expected = expected_offsets(count, sessions)
    h.wait_for(
        lambda: h.offsets("indexer") == expected,
        lambda: behind(h.offsets("indexer"), expected),
        running=[survivor, projector],
    )
    ends = h.ends(count)
    h.wait_for(
        lambda: h.committed("indexer") == ends,
        lambda: f"the group's committed positions {h.committed('indexer')} to reach {ends}",
        running=[survivor],
    )
    assert survivor.terminate() == 0, survivor.tail()
    assert projector.terminate() == 0, projector.tail()

    assert last_position < ends[last_partition] - 1, "the victim was killed mid-partition"
    taken_over = [
        position for partition, position in survivor.handled() if partition == last_partition
    ]
    assert taken_over and max(taken_over) == ends[last_partition] - 1, (
        f"the survivor read partition {last_partition} to its end after the victim died "
        f"at position {last_position} of it"
    )
    everything = {(p, position) for p, end in ends.items() for position in range(end)}
    assert set(killed_at) | set(survivor.handled()) == everything, "every message was handled"
    assert "Traceback" not in survivor.output() + projector.output()


def produce(
    bootstrap: str,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes, list[tuple[str, bytes]]]],
) -> list[tuple[int, int]]:
    """Send ``(key, value, headers)`` in order; their ``(partition, offset)``."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="worker-tests")
    try:
        futures = [producer.send(topic, key=k, value=v, headers=hs) for k, v, hs in messages]
        producer.flush(timeout=30)
        placed = [future.get(timeout=30) for future in futures]
    finally:
        producer.close(timeout=30)
    return [(meta.partition, meta.offset) for meta in placed]


def event(offset: object, **fields: object) -> bytes:
    return json.dumps({"type": "message", "offset": offset, **fields}).encode()


def test_bad_and_failed_messages_are_dead_lettered_and_the_worker_goes_on(
    harness: Harness,
) -> None:
    h = harness
    ensure_topic(h.bootstrap, h.stream, PARTITIONS, timeout=30)
    good: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (b"good-a", event(0), []),
        (b"good-b", event(0), []),
        (b"good-a", event(1), []),
        (b"h-fail", event(0), []),
        (b"h-busy", event(0), []),
        (None, event(7), [("session_id", b"from-header")]),
        (None, event(9, session_id="from-field"), []),
    ]
    bad: list[tuple[bytes | None, bytes, list[tuple[str, bytes]], str]] = [
        (b"bad-json", b"{not json", [("trace", b"t-1")], "not a JSON event"),
        (b"bad-no-offset", json.dumps({"type": "message"}).encode(), [], "invalid event"),
        (b"bad-negative", event(-3), [], "invalid event"),
        (b"bad-array", b"[1, 2]", [], "invalid event"),
        (None, event(4), [], "no session id: no message key, session_id header or field"),
        (b"not a valid id!", event(1), [], "is not 1..64 chars"),
        (
            b"h-fail",
            event(5, data={"fail": True}),
            [],
            "handler raised ValueError: refused h-fail@5",
        ),
        (b"h-busy", event(3, data={"busy": True}), [], "gave up after 3 attempts: still busy"),
    ]
    after: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = [
        (b"good-a", event(2), []),
        (b"good-b", event(4), []),
    ]
    placed = produce(h.bootstrap, h.stream, [*good, *((k, v, hs) for k, v, hs, _ in bad), *after])
    bad_placed = placed[len(good) : len(good) + len(bad)]

    projector = h.start("projector", "project", "--report-every", "1")
    worker = h.worker(
        "worker", "auditor", "--handler", "worker_test_handlers:picky",
        "--max-attempts", "3", "--retry-backoff-ms", "10",
    )  # fmt: skip
    expected = {"good-a": 2, "good-b": 4, "h-fail": 0, "h-busy": 0, "from-header": 7,
                "from-field": 9}  # fmt: skip
    h.wait_for(
        lambda: h.offsets("auditor") == expected,
        lambda: behind(h.offsets("auditor"), expected),
        running=[worker, projector],
    )
    letters = read_topic(h.bootstrap, h.dlq, len(bad))
    assert len(letters) == len(bad), [(r.key, r.value) for r in letters]
    by_message = {(r.key, r.value): r for r in letters}
    assert len(by_message) == len(bad), "each dead letter once"
    for (key, value, headers, reason), (partition, offset) in zip(bad, bad_placed, strict=True):
        letter = by_message.get((key, value))
        assert letter is not None, f"{key!r} {value!r} is not in {h.dlq}"
        names = [name for name, _ in letter.headers]
        assert letter.headers[: len(headers)] == headers, "the original headers come first"
        got = {name: raw.decode() for name, raw in letter.headers[len(headers) :]}
        assert names[len(headers) :] == list(got), "each dlq header once"
        assert reason in got["dlq.reason"], (key, got["dlq.reason"])
        assert got["dlq.partition"] == str(partition) and got["dlq.offset"] == str(offset)
        assert got["dlq.consumer"] == "auditor" and got["dlq.stream"] == h.stream

    assert worker.popen.poll() is None, worker.tail()
    produce(h.bootstrap, h.stream, [(b"good-a", event(11), [])])
    expected["good-a"] = 11
    h.wait_for(
        lambda: h.offsets("auditor") == expected,
        lambda: "a message after the dead letters: " + behind(h.offsets("auditor"), expected),
        running=[worker, projector],
    )
    assert worker.terminate() == 0, worker.tail()
    assert projector.terminate() == 0, projector.tail()
    final = worker.last()
    assert final is not None and final.done, worker.tail()
    assert (final.processed, final.dead_lettered, final.retried) == (len(placed) + 1, len(bad), 2)
    assert len(read_topic(h.bootstrap, h.dlq, len(bad))) == len(bad), "no dead letter twice"
    assert "Traceback" not in worker.output()


def test_sigterm_flushes_and_commits_before_the_worker_exits(harness: Harness) -> None:
    h = harness
    count, sessions = 6_000, 60
    h.append(count, sessions)
    worker = h.worker("worker", "mailer", *HUGE_FLUSH)
    h.wait_for(
        lambda: worker.processed() == count,
        lambda: f"the worker to read all {count} messages",
        running=[worker],
    )
    last = worker.last()
    assert last is not None and last.committed == 0, "nothing flushed before SIGTERM"
    assert h.committed("mailer") == {}, "no position committed before SIGTERM"

    assert worker.terminate() == 0, worker.tail()
    final = worker.last()
    assert final is not None and final.done and final.committed == sessions, worker.tail()
    h.run("project", "--once")
    expected = expected_offsets(count, sessions)
    assert h.offsets("mailer") == expected, behind(h.offsets("mailer"), expected)
    assert h.committed("mailer") == h.ends(count)


def test_a_revocation_flushes_and_commits_before_the_partitions_move(harness: Harness) -> None:
    """Neither worker flushes on its own (huge --flush-ms and --flush-max): only the
    revocation that B's arrival causes can have put A's offsets in the log."""
    h = harness
    count, sessions = 6_000, 60
    h.append(count, sessions)
    first = h.worker("first", "archiver", *HUGE_FLUSH)
    h.wait_for(
        lambda: first.processed() == count,
        lambda: f"the first worker to read all {count} messages",
        running=[first],
    )
    last = first.last()
    assert last is not None and last.committed == 0 and h.committed("archiver") == {}

    second = h.worker("second", "archiver", *HUGE_FLUSH)
    ends = h.ends(count)
    h.wait_for(
        lambda: h.committed("archiver") == ends,
        lambda: f"the committed positions {h.committed('archiver')} to reach {ends}",
        running=[first, second],
    )
    h.run("project", "--once")
    expected = expected_offsets(count, sessions)
    assert h.offsets("archiver") == expected, behind(h.offsets("archiver"), expected)
    assert first.popen.poll() is None and second.popen.poll() is None, h.tails()
    # its main loop reports again once the group has settled (a join blocks its poll)
    h.wait_for(
        lambda: (last := first.last()) is not None and last.committed == sessions,
        lambda: f"the first worker to report the {sessions} offsets it flushed",
        running=[first, second],
    )

    reports = len(second.summaries())
    h.wait_for(
        lambda: len(second.summaries()) >= reports + 4,
        lambda: "the second worker to go on reporting",
        running=[first, second],
    )
    assert first.terminate() == 0 and second.terminate() == 0, h.tails()
    first_done, second_done = first.last(), second.last()
    assert first_done is not None and first_done.done and first_done.processed == count
    assert second_done is not None and second_done.done and second_done.processed == 0, (
        "the second worker started where the first committed: nothing redelivered"
    )


def test_replaying_the_event_log_restores_what_the_workers_recorded(
    harness: Harness, redis_client: redis.Redis
) -> None:
    h = harness
    count, sessions = 5_000, 50
    h.append(count, sessions)
    workers = [h.worker(name, name) for name in ("notifier", "indexer")]
    h.wait_for(
        lambda: all(w.processed() == count for w in workers),
        lambda: "both workers to read every message",
        running=workers,
    )
    for worker in workers:
        assert worker.terminate() == 0, worker.tail()
    h.run("project", "--once")
    before = h.states()
    expected = expected_offsets(count, sessions)
    for name in ("notifier", "indexer"):
        assert h.offsets(name) == expected, behind(h.offsets(name), expected)
    assert len(before) == sessions
    h.run("verify")

    assert delete_prefix(redis_client, h.prefix) > 0
    assert h.states() == {}
    h.run("replay")
    assert h.states() == before
    verified = h.run("verify")
    assert verified.stdout.splitlines()[-1] == "verify: 0 differences"
