"""The log protocol's contract, run against every backend: the file log and the Kafka log.

Each test gets a fresh log: a ``FileLog`` in ``tmp_path``, or a ``KafkaLog`` on a new topic
of the session's broker (see ``conftest.py``). The Kafka-only tests at the end cover what
only a broker can do: refuse a topic, be unreachable, hold other producers' records.
"""

from __future__ import annotations

import gc
import itertools
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from tests.conftest import PrivateKafka
from tests.services import free_port
from tracker.errors import (
    ConfigError,
    LogCorruptError,
    LogError,
    LogNotFoundError,
    LogUnavailableError,
)
from tracker.events import Position
from tracker.logs import Batch, LogBackend, events_of, open_log
from tracker.logs.file import FileLog
from tracker.logs.kafka import KafkaLog
from tracker.settings import Settings

KAFKA_PARTITIONS = 3
Opener = Callable[[], LogBackend]


def records(tag: str, count: int, start: int = 0) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(start, start + count)]


def read_all(
    log: LogBackend, partition: int = 0, after: Position | None = None, max_records: int = 1000
) -> list[Batch]:
    out: list[Batch] = []
    while batches := log.read(partition, after, max_records):
        out.extend(batches)
        after = batches[-1].last
    return out


def flat(batches: Sequence[Batch]) -> list[bytes]:
    return [record for batch in batches for record in batch.records]


def positions(batches: Sequence[Batch]) -> list[Position]:
    return [position for batch in batches for position in batch.positions()]


@pytest.fixture(params=["file", "kafka"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "kafka":
        request.getfixturevalue("kafka_topic")
    return str(request.param)


@pytest.fixture
def opener(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Opener]:
    """Opens this test's log (again); every log it opened is closed afterwards."""
    opened: list[LogBackend] = []

    def open_() -> LogBackend:
        log: LogBackend
        if backend == "file":
            log = FileLog(tmp_path / "log")
        else:
            log = KafkaLog(
                request.getfixturevalue("kafka_bootstrap"),
                request.getfixturevalue("kafka_topic"),
                partitions=KAFKA_PARTITIONS,
                timeout=5.0,
            )
        opened.append(log)
        return log

    yield open_
    for log in opened:
        log.close()


@pytest.fixture
def log(opener: Opener) -> LogBackend:
    return opener()


# -- the contract ----------------------------------------------------------------------


def test_partition_count(log: LogBackend, backend: str) -> None:
    assert log.partitions == (1 if backend == "file" else KAFKA_PARTITIONS)


def test_empty_log(log: LogBackend) -> None:
    for partition in range(log.partitions):
        assert log.read(partition, None, 10) == []
        assert log.end(partition) is None
        assert log.count(partition) == 0
    assert log.read(0, Position(0, 5, 0), 10) == []
    assert list(events_of(log)) == []


def test_append_and_read_back(log: LogBackend) -> None:
    first = log.append(0, records("a", 3))
    second = log.append(0, records("b", 1))
    third = log.append(0, records("c", 5))
    assert (first.count, second.count, third.count) == (3, 1, 5)
    assert first.partition == 0
    batches = log.read(0, None, 1000)
    assert [b.records for b in batches] == [records("a", 3), records("b", 1), records("c", 5)]
    assert [b.first_index for b in batches] == [0, 0, 0]
    assert [first.last, second.last, third.last] == [b.last for b in batches]
    assert first.batches == [batches[0]] and third.batches == [batches[2]]
    assert batches[0].offset < batches[1].offset < batches[2].offset
    assert log.end(0) == third.last
    assert log.count(0) == 9
    for appended in (first, second, third):
        assert appended.after_known or appended.after is None


def test_reads_from_any_position(log: LogBackend) -> None:
    for n, size in enumerate([3, 1, 5, 2]):
        log.append(0, records(str(n), size))
    everything = read_all(log)
    every_position = positions(everything)
    all_records = flat(everything)
    for i, position in enumerate(every_position):
        rest = read_all(log, after=position)
        assert flat(rest) == all_records[i + 1 :]
        assert positions(rest) == every_position[i + 1 :]
        assert log.count(0, position) == len(all_records) - i - 1
    middle = log.read(0, every_position[0], 1000)  # from inside the first batch
    assert middle[0].first_index == 1
    assert middle[0].records == all_records[1:3]
    assert middle[0].offset == every_position[0].offset
    assert log.read(0, every_position[-1], 1000) == []
    beyond = Position(0, every_position[-1].offset + 5, 0)
    assert log.read(0, beyond, 1000) == []


def test_positions_strictly_increase_across_many_small_reads(log: LogBackend) -> None:
    rng = random.Random(7)
    expected: list[bytes] = []
    for n in range(40):
        chunk = records(f"r{n}", rng.randint(1, 7))
        log.append(0, chunk)
        expected.extend(chunk)
    for max_records in (1, 2, 3, 10):
        batches = read_all(log, max_records=max_records)
        assert flat(batches) == expected
        seen = positions(batches)
        assert all(a < b for a, b in itertools.pairwise(seen))
        assert seen[-1] == log.end(0)
    assert log.count(0) == len(expected)


def test_batch_boundaries(log: LogBackend) -> None:
    log.append(0, records("x", 4))
    log.append(0, records("y", 4))
    batches = read_all(log, max_records=1)
    assert [len(b.records) for b in batches] == [4, 4]  # a read never splits a record's end
    first, second = batches
    assert first.last.index == 3 and second.first.index == 0
    assert log.read(0, first.last, 1) == [second]


def test_append_of_nothing(log: LogBackend) -> None:
    before = log.append(0, records("a", 2))
    empty = log.append(0, [])
    assert empty.count == 0
    assert empty.last in (None, before.last)
    assert flat(read_all(log)) == records("a", 2)
    assert log.end(0) == before.last
    stream = log.append_stream(0, iter([]))
    assert stream.count == 0
    assert log.count(0) == 2


def test_append_stream(log: LogBackend) -> None:
    appended = log.append_stream(0, iter([records("x", 3), records("y", 7)]))
    assert appended.count == 10
    batches = read_all(log)
    assert flat(batches) == records("x", 3) + records("y", 7)
    assert appended.last == batches[-1].last == log.end(0)


def test_append_stream_is_all_or_nothing(opener: Opener) -> None:
    log = opener()
    log.append(0, records("before", 2))
    end = log.end(0)

    def failing() -> Iterator[list[bytes]]:
        yield records("big", 40_000)
        yield records("big", 40_000, 40_000)  # over one record (65,536): parts were written
        yield records("big", 40_000, 80_000)
        raise ValueError("a bad line")

    with pytest.raises(ValueError, match="a bad line"):
        log.append_stream(0, failing())
    assert log.end(0) == end
    assert log.count(0) == 2
    assert flat(read_all(log)) == records("before", 2)
    fresh = opener()  # knows nothing of the failed append: finds the end behind its remains
    assert fresh.end(0) == end and fresh.count(0) == 2
    after = log.append(0, records("after", 1))
    assert flat(read_all(log)) == records("before", 2) + records("after", 1)
    assert end is not None and after.last is not None and after.last > end
    assert log.count(0) == 3


def test_a_large_append_is_one_batch_read_in_pieces(log: LogBackend) -> None:
    big = records("e", 150_000)
    appended = log.append(0, big)
    log.append(0, records("next", 1))
    assert appended.count == 150_000
    batches = read_all(log, max_records=10_000)
    assert flat(batches) == [*big, b"next-0"]
    seen = positions(batches)
    assert all(a < b for a, b in itertools.pairwise(seen))
    assert seen[149_999] == appended.last
    assert log.read(0, seen[99_999], 10)[0].records[0] == b"e-100000"  # from inside a batch
    assert log.count(0, seen[99_999]) == 50_001
    assert log.count(0) == 150_001
    streamed = log.append_stream(0, (records("s", 10_000, i) for i in range(0, 100_000, 10_000)))
    assert streamed.count == 100_000
    assert flat(read_all(log, after=log.read(0, appended.last, 1)[0].last)) == records("s", 100_000)


def test_partitions_are_independent(log: LogBackend) -> None:
    for partition in range(log.partitions):
        log.append(partition, records(f"p{partition}", partition + 1))
    for partition in range(log.partitions):
        batches = read_all(log, partition)
        assert flat(batches) == records(f"p{partition}", partition + 1)
        assert {b.partition for b in batches} == {partition}
        assert log.count(partition) == partition + 1
    events = [(b.partition, b.records) for p in range(log.partitions) for b in read_all(log, p)]
    assert len(events) == log.partitions


def test_a_partition_that_does_not_exist(log: LogBackend) -> None:
    for partition in (log.partitions, -1):
        with pytest.raises(LogError):
            log.read(partition, None, 10)
        with pytest.raises(LogError):
            log.append(partition, records("x", 1))
        with pytest.raises(LogError):
            log.end(partition)
        with pytest.raises(LogError):
            log.count(partition)


def test_closed_log_refuses(log: LogBackend) -> None:
    log.append(0, records("x", 1))
    log.close()
    with pytest.raises(LogError):
        log.append(0, records("y", 1))
    with pytest.raises(LogError):
        log.read(0, None, 10)
    with pytest.raises(LogError):
        log.end(0)
    log.close()  # twice is fine


def test_log_id_is_stable(opener: Opener) -> None:
    first = opener()
    first.append(0, records("x", 2))
    again = opener()
    assert again.log_id == first.log_id and first.log_id
    assert flat(read_all(again)) == records("x", 2)


def test_concurrent_appends_each_read_back_once(log: LogBackend) -> None:
    threads, appends, size = 8, 25, 3
    errors: list[BaseException] = []
    appended: dict[int, list[Position]] = {}

    def work(n: int) -> None:
        try:
            mine = [log.append(0, records(f"t{n}.{i}", size)).last for i in range(appends)]
            appended[n] = [p for p in mine if p is not None]
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    batches = read_all(log, max_records=17)
    got = flat(batches)
    assert len(got) == len(set(got)) == threads * appends * size
    assert set(got) == {
        r for n in range(threads) for i in range(appends) for r in records(f"t{n}.{i}", size)
    }
    for n in range(threads):  # each thread's appends in its order, where it was told
        mine = [b.last for b in batches if b.records[0].startswith(f"t{n}.".encode())]
        assert mine == appended[n] == sorted(appended[n])
    assert log.count(0) == len(got)
    assert log.end(0) == batches[-1].last


# -- Kafka only ------------------------------------------------------------------------


def test_open_log_picks_kafka(kafka_bootstrap: str, kafka_topic: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        kafka_bootstrap=kafka_bootstrap,
        event_topic=kafka_topic,
        partitions=2,
    )
    with pytest.raises(LogNotFoundError, match=kafka_topic):
        open_log(settings, create=False)
    log = open_log(settings)
    try:
        assert isinstance(log, KafkaLog) and log.partitions == 2
        assert log.log_id.startswith("kafka:") and kafka_topic in log.log_id
    finally:
        log.close()
    with pytest.raises(ConfigError, match="has 2 partitions but 3"):
        open_log(Settings(kafka_bootstrap=kafka_bootstrap, event_topic=kafka_topic, partitions=3))
    reopened = open_log(settings, create=False)
    assert reopened.log_id == log.log_id
    reopened.close()


def test_kafka_refuses_finite_retention(kafka_bootstrap: str, kafka_topic: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics(
            {kafka_topic: {"num_partitions": 1, "configs": {"retention.ms": "3600000"}}}
        )
    finally:
        admin.close()
    with pytest.raises(ConfigError, match=r"retention\.ms=3600000"):
        KafkaLog(kafka_bootstrap, kafka_topic)


def test_kafka_creates_topics_with_infinite_retention(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    from kafka.admin import ConfigResource, ConfigResourceType

    KafkaLog(kafka_bootstrap, kafka_topic, partitions=2).close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        resource = ConfigResource(ConfigResourceType.TOPIC, kafka_topic)
        configs = admin.describe_configs([resource], config_filter="all")["topic"][kafka_topic]
    finally:
        admin.close()
    assert configs["retention.ms"]["value"] == "-1"
    assert configs["retention.bytes"]["value"] == "-1"


# kafka-python drops (unclosed) the sockets of failed connection attempts; the garbage
# collector may close them during a later test, with a ResourceWarning.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_kafka_unreachable_bootstrap_is_retriable_and_quick() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(LogUnavailableError, match=bootstrap) as caught:
        KafkaLog(bootstrap, "tracker.session-events", timeout=1.0)
    assert time.monotonic() - started < 5
    assert caught.value.retriable
    assert "\n" not in str(caught.value)


# kafka-python drops (unclosed) the sockets of connection attempts that time out while the
# broker is stopped; they are collected at the end of the test, without the warnings.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_kafka_broker_down_then_back(private_kafka: PrivateKafka) -> None:
    timeout = 1.5
    log = KafkaLog(private_kafka.bootstrap, "outage", partitions=1, timeout=timeout)
    try:
        log.append(0, records("up", 2))
        private_kafka.pause()
        try:
            for action in (
                lambda: log.append(0, records("down", 1)),
                lambda: log.read(0, None, 10),
                lambda: log.end(0),
                lambda: KafkaLog(private_kafka.bootstrap, "outage", timeout=timeout),
            ):
                started = time.monotonic()
                with pytest.raises(LogUnavailableError, match=private_kafka.bootstrap):
                    action()
                assert time.monotonic() - started < 3 * timeout + 2
        finally:
            private_kafka.resume()
        log.append(0, records("back", 1))
        got = flat(read_all(log))
        # the append made while the broker was stopped may land when it resumes: once
        assert got[:2] == records("up", 2) and got[-1] == b"back-0"
        assert got.count(b"down-0") <= 1
        assert log.end(0) is not None and log.count(0) == len(got)
    finally:
        log.close()
        gc.collect()


def test_kafka_group_with_other_producers_records_between_its_parts(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    mine = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
    other = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
    try:

        def chunks() -> Iterator[list[bytes]]:
            yield records("g", 70_000)
            time.sleep(0.2)  # the first part is out: another producer appends meanwhile
            other.append(0, records("other", 2))
            yield records("g", 70_000, 70_000)

        appended = mine.append_stream(0, chunks())
        batches = read_all(mine, max_records=50_000)
        got = flat(batches)
        assert got[:2] == records("other", 2)  # the group counts where it ends
        assert got[2:] == records("g", 140_000)
        assert appended.last == batches[-1].last == mine.end(0)
        assert len({b.offset for b in batches[1:]}) == 1  # one batch, read in pieces
        assert mine.count(0) == 140_002
        assert mine.count(0, Position(0, appended.last.offset, 99)) == 140_000 - 100
    finally:
        mine.close()
        other.close()


def test_kafka_refuses_records_it_did_not_write(kafka_bootstrap: str, kafka_topic: str) -> None:
    log = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
    try:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        producer.send(kafka_topic, value=b"hello", partition=0).get(timeout=10)
        producer.close()
        with pytest.raises(LogCorruptError, match="not a record of the event log"):
            log.read(0, None, 10)
    finally:
        log.close()


def test_kafka_topic_that_does_not_report_its_retention(
    kafka_bootstrap: str, kafka_topic: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Apache Kafka reports its default (7 days): refused. Tansu reports nothing: a warning."""
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.create_topics({kafka_topic: {"num_partitions": 1}})
    finally:
        admin.close()
    try:
        log = KafkaLog(kafka_bootstrap, kafka_topic)
    except ConfigError as refused:
        assert "retention.ms=" in str(refused)
        return
    log.close()
    assert "cannot tell the retention" in caplog.text
    caplog.clear()
    KafkaLog(kafka_bootstrap, kafka_topic).close()
    assert "cannot tell the retention" not in caplog.text  # once per topic and process


def test_kafka_log_of_only_an_unfinished_append(kafka_bootstrap: str, kafka_topic: str) -> None:
    log = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
    fresh: KafkaLog | None = None
    try:

        def failing() -> Iterator[list[bytes]]:
            for i in range(3):
                yield records("lost", 60_000, 60_000 * i)
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            log.append_stream(0, failing())
        fresh = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
        assert fresh.end(0) is None and fresh.count(0) == 0
        assert fresh.read(0, None, 10) == []
        appended = fresh.append(0, records("kept", 1))
        assert appended.last is not None and appended.last.offset > 0
        assert flat(read_all(log)) == records("kept", 1)
        assert log.end(0) == appended.last
    finally:
        log.close()
        if fresh is not None:
            fresh.close()


def test_kafka_refuses_a_topic_whose_first_records_were_deleted(
    kafka_bootstrap: str, kafka_topic: str
) -> None:
    from kafka import TopicPartition

    KafkaLog(kafka_bootstrap, kafka_topic, partitions=1).close()
    log = KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
    try:
        log.append(0, records("x", 1))
        log.append(0, records("y", 1))
    finally:
        log.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=5000)
    try:
        admin.delete_records({TopicPartition(kafka_topic, 0): 1})
    except Exception as exc:  # Tansu 0.6 drops the connection
        pytest.skip(f"the broker cannot delete records: {exc}")
    finally:
        admin.close()
    with pytest.raises(LogCorruptError, match="starts at offset 1"):
        KafkaLog(kafka_bootstrap, kafka_topic, partitions=1)
