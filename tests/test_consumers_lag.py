"""``tracker consumers lag``: per partition and per session, against real streams.

A file stream read by a real ``tracker worker`` process (consumer A, to the end) and by a
worker in this process (consumer B, part of the way); a Kafka topic written in several
produce calls (so a partition's last record batch holds many records: on Tansu
``end_offsets()`` answers that batch's base offset + 1, not the end) read by two workers
in this process, with a projector thread applying their offsets. Every figure is
checked exactly against what the test wrote.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from consumers.filestream import FileStream, append_messages, open_stream_log
from consumers.kafkastream import KafkaStream, produce_messages
from consumers.lag import StreamScan, lag_report
from consumers.streams import Stream
from consumers.worker import Worker
from tests.services import projecting, stop_process
from tests.test_cli import Cli, describe, one_line_error
from tracker import Settings, Tracker
from tracker.keys import partition_for

TRACKER = str(Path(sys.executable).with_name("tracker"))
JOIN_SECONDS = 60


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Messages:
    """Messages written to a stream, in order, each session's offsets counting up from 0."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int]] = []

    def make(self, session_ids: list[str]) -> list[tuple[str, int]]:
        made = []
        for sid in session_ids:
            offset = sum(1 for s, _ in self.sent if s == sid)
            self.sent.append((sid, offset))
            made.append((sid, offset))
        return made

    @staticmethod
    def lines(made: list[tuple[str, int]]) -> str:
        return "".join(
            json.dumps({"session_id": sid, "offset": o, "type": "message", "source": "user"}) + "\n"
            for sid, o in made
        )

    @staticmethod
    def values(made: list[tuple[str, int]]) -> list[tuple[str, bytes]]:
        return [(sid, json.dumps({"offset": o, "type": "message"}).encode()) for sid, o in made]

    def heads(self, upto: int | None = None) -> dict[str, int]:
        heads: dict[str, int] = {}
        for sid, offset in self.sent[:upto]:
            heads[sid] = max(heads.get(sid, -1), offset)
        return heads


def expected_sessions(heads: Mapping[str, int], offsets: Mapping[str, int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [
        {
            "session_id": sid,
            "head": head,
            "offset": offsets.get(sid),
            "unread": head + 1 if sid not in offsets else head - offsets[sid],
        }
        for sid, head in heads.items()
    ]
    rows.sort(key=lambda row: (-row["unread"], row["session_id"]))
    return rows


def expected_report(
    stream: str,
    consumer: str,
    partitions: list[dict[str, Any]],
    heads: Mapping[str, int],
    offsets: Mapping[str, int],
    undecodable: int = 0,
) -> dict[str, Any]:
    sessions = expected_sessions(heads, offsets)
    return {
        "stream": stream,
        "consumer": consumer,
        "lag": sum(p["lag"] for p in partitions),
        "unread": sum(s["unread"] for s in sessions),
        "sessions": len(sessions),
        "sessions_behind": sum(1 for s in sessions if s["unread"]),
        "undecodable": undecodable,
        "partitions": partitions,
        "top_sessions": sessions,
    }


def run_in_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run, name="test-worker", daemon=True)
    thread.start()
    return thread


def work_through(stream: Stream, settings: Settings, consumer: str, count: int) -> None:
    """Run a worker in this process until it has handled ``count`` messages, then stop it."""
    tracker = Tracker(settings)
    try:
        worker = Worker(stream, tracker, consumer, flush_ms=50, report_every=0)
        thread = run_in_thread(worker)
        try:
            wait_until(lambda: worker.stats.processed >= count, JOIN_SECONDS, f"{consumer} to read")
        finally:
            worker.stop()
            thread.join(JOIN_SECONDS)
        assert not thread.is_alive()
        assert worker.stats.processed == count
    finally:
        stream.close()
        tracker.close()


def lag_json(cli: Cli, *args: str) -> list[dict[str, Any]]:
    result = cli.ok("consumers", "lag", *args, "--json")
    return [json.loads(line) for line in result.stdout.splitlines()]


# -- the computation ---------------------------------------------------------------------


def test_the_report_from_plain_values() -> None:
    scan = StreamScan(
        "t",
        starts={0: 0, 1: 5},
        ends={0: 10, 1: 9},
        heads={"a": 4, "b": 2, "gone": 7, "new": 0},
        messages=14,
        undecodable=1,
    )
    committed: dict[str, dict[int, int | None]] = {
        "x": {0: 10, 1: None},  # never committed on 1: lag from its start, 5
        "y": {0: 12, 1: 7},  # ahead of the end read (appended since): no negative lag
    }
    offsets = {"a": {"x": 4, "y": 1}, "b": {"y": 9}, "gone": None}
    reports = lag_report(scan, committed, offsets, sessions_limit=2)
    assert [r.consumer for r in reports] == ["x", "y"]
    x, y = reports
    assert [(p.partition, p.end, p.committed, p.lag) for p in x.partitions] == [
        (0, 10, 10, 0),
        (1, 9, None, 4),
    ]
    assert x.lag == 4
    # the deleted session is left out; without an offset a session's unread is head + 1
    assert (x.sessions, x.sessions_behind, x.unread, x.undecodable) == (3, 2, 4, 1)
    assert [(s.session_id, s.offset, s.unread) for s in x.top_sessions] == [
        ("b", None, 3),
        ("new", None, 1),
    ]
    assert [(p.committed, p.lag) for p in y.partitions] == [(12, 0), (7, 2)]
    assert [(s.session_id, s.unread) for s in y.top_sessions] == [("a", 3), ("new", 1)]
    assert (y.unread, y.sessions_behind) == (4, 2), "an offset past the head is 0 unread"


# -- file streams --------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Cli:
    return Cli(tmp_path / "data", redis_url, prefix)


def settings_of(cli: Cli) -> Settings:
    return Settings(data_dir=cli.data_dir, redis_url=cli.redis_url, prefix=cli.prefix)


def worker_process(cli: Cli, stream: Path, consumer: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update({k: v for k, v in cli.env().items() if v is not None})
    argv = [TRACKER, "worker", "--stream-dir", str(stream), "--consumer", consumer]
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*argv, "--flush-ms", "50", "--report-every", "0.1"],
            env=env, stdout=out, stderr=out, start_new_session=True,
        )  # fmt: skip


def test_file_stream(cli: Cli, tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    sent = Messages()
    first = sent.make([f"s{n % 4}" for n in range(30)])  # s0, s1: 0..7; s2, s3: 0..6
    cli.ok("streams", "append", "--stream-dir", str(stream), "-", stdin=Messages.lines(first))

    # B reads the first 30 messages, in this process
    work_through(FileStream(stream, "B"), settings_of(cli), "B", 30)
    b_offsets = sent.heads()

    second = sent.make(["s0"] * 12 + ["s1"] * 5 + ["s4"] * 3)
    cli.ok("streams", "append", "--stream-dir", str(stream), "-", stdin=Messages.lines(second))
    log = open_stream_log(stream, create=False)
    try:
        append_messages(log, [[("s0", b"not an event")]])  # dead-lettered, in no session
    finally:
        log.close()

    # A reads all 51, in a `tracker worker` process stopped by SIGTERM
    output = tmp_path / "worker-a.log"
    process = worker_process(cli, stream, "A", output)
    try:
        wait_until(
            lambda: "processed 51," in output.read_text(), JOIN_SECONDS, "worker A to read all"
        )
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(JOIN_SECONDS) == 0, output.read_text()
    finally:
        stop_process(process)
    assert "dead-lettered 1" in output.read_text()

    heads = sent.heads()
    name = str(stream)
    a = expected_report(name, "A", [_p(0, 51, 51)], heads, heads, undecodable=1)
    b = expected_report(name, "B", [_p(0, 51, 30)], heads, b_offsets, undecodable=1)
    assert lag_json(cli, "--stream-dir", name) == [a, b]
    assert a["unread"] == 0 and a["lag"] == 0
    assert b["unread"] == 20 and b["lag"] == 21 and b["sessions_behind"] == 3
    assert [s["session_id"] for s in b["top_sessions"]][:3] == ["s0", "s1", "s4"]

    # a consumer without a position: from the start, every message unread
    c = expected_report(name, "C", [_p(0, 51, 0)], heads, {}, undecodable=1)
    assert c["unread"] == 50
    assert lag_json(cli, "--stream-dir", name, "--consumer", "C", "--consumer", "B") == [b, c]
    limited = lag_json(cli, "--stream-dir", name, "--consumer", "B", "--sessions-limit", "1")
    assert limited == [{**b, "top_sessions": b["top_sessions"][:1]}]

    table = cli.ok("consumers", "lag", "--stream-dir", name, "--sessions-limit", "2")
    lines = [line.split() for line in table.stdout.splitlines()]
    assert f"lag of {name} (51 messages)" in table.stdout
    assert ["│", "A", "│", "0", "│", "51", "│", "51", "│", "0", "│"] in lines
    assert ["│", "B", "│", "0", "│", "51", "│", "30", "│", "21", "│"] in lines
    assert "A: no unread messages in 5 sessions" in table.stdout
    assert "B: 20 unread in 3 of 5 sessions (the 2 with the most)" in table.stdout
    assert ["│", "s0", "│", "19", "│", "7", "│", "12", "│"] in lines
    assert ["│", "s1", "│", "12", "│", "7", "│", "5", "│"] in lines
    assert not any("s4" in line for line in lines), "only the 2 with the most unread"
    assert "1 of 51 messages have no session id" in table.stderr


def _p(partition: int, end: int, committed: int | None, start: int = 0) -> dict[str, Any]:
    lag = end - (start if committed is None else committed)
    return {"partition": partition, "end": end, "committed": committed, "lag": lag}


def test_file_stream_errors(cli: Cli, tmp_path: Path) -> None:
    help_text = cli.ok("consumers", "lag", "--help").stdout
    for option in ("--stream TOPIC", "--stream-dir DIR", "--consumer NAME", "--sessions-limit N"):
        assert option in help_text, option
    assert "lag" in cli.ok("consumers", "--help").stdout
    stream = tmp_path / "stream"
    for args in ([], ["--stream-dir", str(stream), "--stream", "t"]):
        result = cli.fails(2, "consumers", "lag", *args)
        one_line_error(result, "give one of --stream TOPIC (Kafka) or --stream-dir DIR (files)")
    result = cli.fails(1, "consumers", "lag", "--stream-dir", str(stream))
    one_line_error(result, f"no stream in {stream}")
    assert not stream.exists() and not cli.data_dir.exists(), "nothing is created"

    cli.ok("streams", "append", "--stream-dir", str(stream), "--generate", "3")
    result = cli.fails(2, "consumers", "lag", "--stream-dir", str(stream), "--consumer", "a b")
    one_line_error(result, "--consumer")
    none = cli.ok("consumers", "lag", "--stream-dir", str(stream))
    assert none.stdout == "" and "no consumer has a position" in none.stderr
    assert cli.ok("consumers", "lag", "--stream-dir", str(stream), "--json").stdout == ""
    # a position file of another stream is refused, as the worker refuses it
    (stream / "consumers").mkdir()
    (stream / "consumers" / "old.json").write_text('{"log_id": "x", "next": 1}')
    result = cli.fails(2, "consumers", "lag", "--stream-dir", str(stream))
    one_line_error(result, "belongs to another stream")
    result = cli.fails(2, "consumers", "lag", "--stream", "t")
    one_line_error(result, "TRACKER_KAFKA_BOOTSTRAP")


# -- Kafka ---------------------------------------------------------------------------------


class KafkaCli(Cli):
    def __init__(self, settings: Settings) -> None:
        assert settings.redis_url is not None
        super().__init__(settings.data_dir, settings.redis_url, settings.prefix)
        self.settings = settings

    def env(self, overrides: Mapping[str, str | None] | None = None) -> dict[str, str | None]:
        settings = self.settings
        assert settings.kafka_bootstrap is not None
        return super().env(
            {
                "TRACKER_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
                "TRACKER_EVENT_TOPIC": settings.event_topic,
                "TRACKER_PARTITIONS": str(settings.partitions),
                "TRACKER_WAIT_TIMEOUT": str(settings.wait_timeout),
                **(overrides or {}),
            }
        )


@pytest.fixture
def settings(tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, redis_url: str,
             prefix: str) -> Settings:  # fmt: skip
    return Settings(
        data_dir=tmp_path / "data", kafka_bootstrap=kafka_bootstrap, event_topic=kafka_topic,
        partitions=2, redis_url=redis_url, prefix=prefix, wait_timeout=JOIN_SECONDS,
    )  # fmt: skip


@pytest.fixture
def stream_topic(kafka_bootstrap: str, kafka_topic: str) -> Iterator[str]:
    """The stream's topic (the event log has ``kafka_topic``); deleted afterwards."""
    topic = f"{kafka_topic}.stream"
    yield topic
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, bootstrap_timeout_ms=5000)
    try:
        admin.delete_topics([topic, f"{topic}.dlq"], raise_errors=False)
    finally:
        admin.close()


@pytest.fixture
def projector(settings: Settings) -> Iterator[Tracker]:
    with projecting(settings) as tracker:
        yield tracker


def kafka_stream(settings: Settings, topic: str, consumer: str) -> KafkaStream:
    assert settings.kafka_bootstrap is not None
    return KafkaStream(
        settings.kafka_bootstrap, topic, consumer,
        session_timeout_ms=6000, heartbeat_interval_ms=1000, max_poll_interval_ms=6000,
    )  # fmt: skip


def test_kafka_stream(settings: Settings, stream_topic: str, projector: Tracker) -> None:
    bootstrap = settings.kafka_bootstrap
    assert bootstrap is not None
    sent = Messages()
    calls = [
        sent.make([f"k{n % 5}" for n in range(20)]),
        sent.make([f"k{n % 3}" for n in range(9)]),
        sent.make(["k0"] * 6 + ["k3"] * 4 + ["k5"] * 2 + ["k1"] * 3),
    ]
    per_partition = [sum(1 for sid, _ in sent.sent if partition_for(sid, 2) == p) for p in (0, 1)]
    last_call = [sum(1 for sid, _ in calls[2] if partition_for(sid, 2) == p) for p in (0, 1)]
    assert min(last_call) >= 2, "each partition's last batch holds several records"
    for made in calls[:2]:
        produce_messages(bootstrap, stream_topic, [Messages.values(made)], partitions=2,
                         timeout=10)  # fmt: skip

    work_through(kafka_stream(settings, stream_topic, "B"), settings, "B", 29)
    b_offsets = sent.heads(29)
    produce_messages(bootstrap, stream_topic, [Messages.values(calls[2])], partitions=2,
                     timeout=10)  # fmt: skip
    work_through(kafka_stream(settings, stream_topic, "A"), settings, "A", 44)
    wait_until(lambda: projector.status().lag == 0, JOIN_SECONDS, "the projector")

    cli = KafkaCli(settings)
    heads = sent.heads()
    b_committed = [e - n for e, n in zip(per_partition, last_call, strict=True)]
    a = expected_report(
        stream_topic, "A", [_p(p, per_partition[p], per_partition[p]) for p in (0, 1)],
        heads, heads,
    )  # fmt: skip
    b = expected_report(
        stream_topic, "B", [_p(p, per_partition[p], b_committed[p]) for p in (0, 1)],
        heads, b_offsets,
    )  # fmt: skip
    assert b["lag"] == 15 and b["unread"] == 15 and b["sessions"] == 6
    assert lag_json(cli, "--stream", stream_topic) == [a, b]

    c = expected_report(
        stream_topic, "C", [_p(p, per_partition[p], None) for p in (0, 1)], heads, {}
    )
    assert c["lag"] == 44 and c["unread"] == 44
    assert lag_json(cli, "--stream", stream_topic, "--consumer", "C") == [c]

    table = cli.ok("consumers", "lag", "--stream", stream_topic)
    lines = [line.split() for line in table.stdout.splitlines()]
    assert ["│", "B", "│", "all", "│", "44", "│", "│", "15", "│"] in lines, describe(table)
    assert "B: 15 unread in 4 of 6 sessions" in table.stdout

    result = cli.fails(1, "consumers", "lag", "--stream", f"{stream_topic}.none")
    one_line_error(result, "no topic", f"{stream_topic}.none")
