"""A worker on a Kafka topic against raw kafka-python consumption of the same topic.

Setup (not timed): a private Tansu broker (memory storage) and a private redis-server
(AOF ``everysec`` as the embedded default unless ``--no-redis-aof``) on loopback TCP; a
``--partitions``-partition topic (6) holding ``--messages`` (200,000) synthetic flux0
events, plus ``--extra`` (50%) more, over ``--sessions`` sessions
(``consumers.generate.synthetic_messages``, about 420 bytes each), produced with
``consumers.kafkastream.produce_messages`` as ``tracker streams append --stream``
produces them (keyed by session id). A ``Tracker`` in Kafka mode (its event topic on the
same broker, ``--event-partitions`` partitions, the private Redis), opened once as a
``tracker worker`` process opens it.

Timed, per repeat, each reading the topic from the start through a consumer group of its
own, until ``--messages`` messages:

* ``worker`` (the headline): ``consumers.worker.Worker`` with a
  ``consumers.kafkastream.KafkaStream`` and that tracker, the default handler
  (``acknowledge``) and the default flush settings (``--flush-ms 200``, ``--flush-max
  5000``): from the return of the first poll that brought messages until
  ``stats.processed`` reached ``--messages`` (the group's join is not timed). It then
  reads the rest of the topic, untimed, and stops. Every flush appends
  ``offset_committed`` events (``commit_many(wait=False)``: one acknowledged produce per
  event-topic partition it touches) and then commits the group's positions, as the
  product does. Offsets become visible only with a ``tracker project`` running, which
  this case does not measure: after the repeats the tracker's projector applies the event
  topic once (untimed) and every session's last offset is checked for every repeat's
  consumer.
* ``raw`` (the ceiling, right after): a plain kafka-python ``KafkaConsumer`` subscribed in
  a group of its own, with exactly the consumer settings ``KafkaStream`` gives its
  consumer (checked against the worker's consumer at run time: ``max_poll_records``
  2000, auto-commit off, the assignors, the group timeouts, the fetch settings, ...),
  counting records (no decoding, no commits): from the return of the first poll that
  brought records until it counted ``--messages``.

A span ends with the poll that reached the count, up to a poll's records past it: each
span's seconds are scaled to ``--messages`` (seconds x messages / counted).

Why the extra messages: kafka-python keeps one fetch in flight per broker, and a fetch
that finds nothing is held by the broker for ``fetch_max_wait_ms`` (``KafkaStream``'s
``FETCH_WAIT_MS``). Once the first partition of a finite topic runs dry, the next fetch
asks for it alone and every consumer stalls that long: with the span ending at the
topic's end, one or two such stalls decided the figures, on both sides, at random.
With 50% more in the topic, every partition still has messages when the timed count is
reached.

Both use the group timeouts the tests use on Tansu (``session_timeout_ms`` 6000,
``heartbeat_interval_ms`` 1000, ``max_poll_interval_ms`` 6000), so that a join takes
about 3 s instead of 23; the timed spans start after the join either way.

``--profile N`` runs the worker once more under cProfile (its main thread and, through
``threading.setprofile``, its other threads) and logs the top N; the group's join is in it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

from benchmarks._common import (
    RedisServer,
    TansuBroker,
    emit,
    kafka_client_versions,
    log,
    median,
    parser,
    rate_summary,
    redis_server,
    tansu_broker,
    verdict,
    workdir,
)
from benchmarks.bench_worker_file import WorkerClock, check_offsets, stats_of
from consumers.generate import synthetic_messages
from consumers.kafkastream import FETCH_WAIT_MS, KafkaStream, produce_messages
from consumers.worker import Stats, Worker
from tracker import Settings, Tracker

TARGET_RATIO = 0.7
"""Of the worker's rate over the raw consumer's rate, same topic, same run."""

GROUP_TIMEOUTS = {
    "session_timeout_ms": 6_000,
    "heartbeat_interval_ms": 1_000,
    "max_poll_interval_ms": 6_000,
}
"""As the tests give Tansu: joins take about 3 s (both sides use them)."""

STREAM_TIMEOUT = 10.0
"""``KafkaStream``'s ``timeout`` (the CLI passes ``TRACKER_KAFKA_TIMEOUT``, 10 s)."""

COMPARED = (
    "enable_auto_commit",
    "auto_offset_reset",
    "partition_assignment_strategy",
    "session_timeout_ms",
    "heartbeat_interval_ms",
    "max_poll_interval_ms",
    "max_poll_records",
    "request_timeout_ms",
    "fetch_max_bytes",
    "max_partition_fetch_bytes",
    "fetch_min_bytes",
    "fetch_max_wait_ms",
    "check_crcs",
)
"""The consumer settings that must be the same on both sides (checked at run time)."""


def stream_consumer_options(bootstrap: str, group: str) -> dict[str, Any]:
    """The options ``KafkaStream`` gives its ``KafkaConsumer`` (see its ``__init__``)."""
    session = GROUP_TIMEOUTS["session_timeout_ms"]
    return {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "client_id": "bench-raw",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "partition_assignment_strategy": (RangePartitionAssignor, RoundRobinPartitionAssignor),
        **GROUP_TIMEOUTS,
        "max_poll_records": 2_000,
        "fetch_max_wait_ms": FETCH_WAIT_MS,
        "request_timeout_ms": max(int(STREAM_TIMEOUT * 1000), session + 5000),
    }


def same_settings(stream: KafkaStream, bootstrap: str) -> dict[str, Any]:
    """Compare the raw consumer's settings with the worker's consumer's; the shared ones."""
    raw = KafkaConsumer(**stream_consumer_options(bootstrap, "bench-compare"))
    try:
        theirs, mine = stream.consumer.config, raw.config
        differ = {k: (theirs.get(k), mine.get(k)) for k in COMPARED if theirs.get(k) != mine.get(k)}
    finally:
        raw.close(autocommit=False)
    if differ:
        raise RuntimeError(f"the raw consumer's settings differ from KafkaStream's: {differ}")
    out = {k: theirs[k] for k in COMPARED}
    out["partition_assignment_strategy"] = [
        a.__name__ for a in out["partition_assignment_strategy"]
    ]
    return out


def raw_consume(bootstrap: str, topic: str, group: str, expected: int) -> dict[str, Any]:
    """A plain consumer in its own group counting every record; timed from the first."""
    consumer = KafkaConsumer(**stream_consumer_options(bootstrap, group))
    try:
        consumer.subscribe([topic])
        count = polls = 0
        start: float | None = None
        deadline = time.monotonic() + 300
        while count < expected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the raw consumer read {count} of {expected} records")
            polled = consumer.poll(timeout_ms=500)
            if polled:
                count += sum(len(records) for records in polled.values())
                polls += 1
                if start is None:
                    start = time.perf_counter()
        done = time.perf_counter()
        assert start is not None
        return {"seconds": (done - start) * expected / count, "counted": count, "polls": polls}
    finally:
        consumer.close(autocommit=False)


def run_worker(
    broker: TansuBroker,
    topic: str,
    tracker: Tracker,
    consumer: str,
    group: str,
    args: argparse.Namespace,
    total: int,
    *,
    profile_top: int = 0,
) -> dict[str, Any]:
    """One worker over the whole topic (``total`` messages) in a group of its own, timed
    until it processed ``args.messages``; its figures."""
    stream = KafkaStream(
        broker.bootstrap,
        topic,
        consumer,
        group=group,
        timeout=STREAM_TIMEOUT,
        session_timeout_ms=GROUP_TIMEOUTS["session_timeout_ms"],
        heartbeat_interval_ms=GROUP_TIMEOUTS["heartbeat_interval_ms"],
        max_poll_interval_ms=GROUP_TIMEOUTS["max_poll_interval_ms"],
    )
    settings: dict[str, Any] = {}
    profile = ""
    try:
        settings = same_settings(stream, broker.bootstrap)
        worker = Worker(stream, tracker, consumer, flush_ms=args.flush_ms, flush_max=args.flush_max)
        clock = WorkerClock(worker, args.messages, on_first_message=True, stop_at=total)
        cpu = broker.cpu_seconds()
        if profile_top:
            profilers: list[cProfile.Profile] = []
            lock = threading.Lock()

            def per_thread(frame: Any, event: str, arg: Any) -> None:
                sys.setprofile(None)  # this thread's hook: replaced by a profiler of its own
                profiler = cProfile.Profile()
                with lock:
                    profilers.append(profiler)
                profiler.enable()

            main = cProfile.Profile()
            threading.setprofile(per_thread)
            main.enable()
            try:
                stats: Stats = clock.run(timeout=600)
            finally:
                main.disable()
                threading.setprofile(None)
            out = io.StringIO()
            merged = pstats.Stats(main, stream=out)
            for extra in profilers:
                extra.disable()
                merged.add(extra)
            merged.sort_stats("tottime").print_stats(profile_top)
            merged.sort_stats("cumulative").print_stats(profile_top)
            profile = out.getvalue()
        else:
            stats = clock.run(timeout=600)
        broker_cpu = broker.cpu_seconds() - cpu
    finally:
        stream.close()
    return {
        "seconds": clock.seconds * args.messages / clock.counted,
        "counted": clock.counted,
        "rest_seconds": clock.final_flush_seconds,
        "polls": clock.polls,
        "stats": stats_of(stats),
        "settings": settings,
        "broker_cpu_seconds": broker_cpu,
        "profile": profile,
    }


def run(
    args: argparse.Namespace, broker: TansuBroker, server: RedisServer, tmp: Path
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    topic = f"bench.worker.{run_id}"
    event_topic = f"bench.worker.events.{run_id}"
    n = args.messages
    total = n + round(n * args.extra)
    log(f"producing {total:,} messages over {args.sessions:,} sessions to {topic} ...")
    started = time.perf_counter()
    produced = produce_messages(
        broker.bootstrap,
        topic,
        synthetic_messages(total, args.sessions, seed=args.seed),
        partitions=args.partitions,
        timeout=30,
    )
    if produced != total:
        raise RuntimeError(f"produced {produced} messages, expected {total}")
    log(f"produced in {time.perf_counter() - started:.1f}s")
    settings = Settings(
        data_dir=tmp / "data",
        redis_url=server.url,
        kafka_bootstrap=broker.bootstrap,
        event_topic=event_topic,
        partitions=args.event_partitions,
        prefix="bench",
    )
    worker_s: list[float] = []
    raw_s: list[float] = []
    ratios: list[float] = []
    runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    raw_cpu: list[float] = []
    consumers: list[str] = []
    with Tracker(settings) as tracker:
        for i in range(args.repeat):
            consumer = f"bench{i}"
            consumers.append(consumer)
            result = run_worker(
                broker, topic, tracker, consumer, f"bench-worker-{run_id}-{i}", args, total
            )
            runs.append(result)
            worker_s.append(result["seconds"])
            cpu = broker.cpu_seconds()
            raw = raw_consume(broker.bootstrap, topic, f"bench-raw-{run_id}-{i}", n)
            raw_cpu.append(broker.cpu_seconds() - cpu)
            raw_runs.append(raw)
            raw_s.append(raw["seconds"])
            ratios.append(raw_s[-1] / worker_s[-1])
            stats = result["stats"]
            log(
                f"repeat {i + 1}/{args.repeat}: worker {n / worker_s[-1]:,.0f} msgs/s "
                f"({worker_s[-1]:.3f}s, {stats['flushes']} flushes, {result['polls']} polls); raw "
                f"{n / raw_s[-1]:,.0f}/s ({raw_s[-1]:.3f}s, {raw['polls']} polls); "
                f"ratio {ratios[-1]:.3f}"
            )
        profile = ""
        if args.profile:
            consumer = "profile"
            consumers.append(consumer)
            profile = run_worker(
                broker,
                topic,
                tracker,
                consumer,
                f"bench-worker-{run_id}-profile",
                args,
                total,
                profile_top=args.profile,
            )["profile"]
            log("cProfile of one more worker run (all its threads):\n" + profile)
        log("applying the event topic to Redis (untimed) to check the offsets ...")
        tracker.projector.catch_up()
        for consumer in consumers:
            check_offsets(tracker, consumer, total, args.sessions)
        log(f"every session's offset is right for {len(consumers)} consumers")

    headline = rate_summary(n, worker_s)
    ratio = round(median(ratios), 3)
    flushes = [r["stats"]["flushes"] for r in runs]
    return {
        "bench": "worker_kafka",
        "params": {
            "messages": n,
            "messages_in_topic": total,
            "extra_is": "the topic holds --extra (50%) more messages than the timed count, so "
            "that no partition runs dry inside the timed span (see the module docstring)",
            "sessions": args.sessions,
            "partitions": args.partitions,
            "event_partitions": args.event_partitions,
            "message": "synthetic_messages (flux0 message events, about 420 B), keyed by "
            "session id, produced with produce_messages",
            "handler": "acknowledge (the default)",
            "flush_ms": args.flush_ms,
            "flush_max": args.flush_max,
            "consumer_settings": runs[0]["settings"],
            "group_timeouts_are": "the tests' Tansu settings on both sides (joins not timed)",
            "tracker": "Kafka mode: event topic on the same broker, the private Redis; no "
            "tracker project while timing",
            "repeat": args.repeat,
            "seed": args.seed,
            "broker": broker.describe(),
            "redis": f"{server.version()} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            **kafka_client_versions(),
            "offsets_checked": f"every session, {len(consumers)} consumers (after the "
            "repeats, once the event topic was applied)",
        },
        "seconds": headline["seconds"],
        "median_rate": headline["median_rate"],
        "value": headline["median_rate"],
        "unit": "msgs/s (Worker + KafkaStream + Tracker in Kafka mode, acknowledge)",
        "target": TARGET_RATIO,
        "target_is": "ratio >= 0.7: worker rate / raw KafkaConsumer rate of the same topic",
        "meets_target": verdict(ratio, TARGET_RATIO),
        "ratio": ratio,
        "ratio_of": "worker msgs/s / ceiling.raw records/s (median of per-repeat ratios)",
        "worker": {
            "flushes": flushes,
            "messages_per_flush": [round(total / f) if f else None for f in flushes],
            "flushes_and_polls_are": "over the whole run: the timed messages and the rest",
            "counted_at_end_of_span": [r["counted"] for r in runs],
            "polls": [r["polls"] for r in runs],
            "broker_cpu_seconds": round(median([r["broker_cpu_seconds"] for r in runs]), 3),
            "stats": runs[-1]["stats"],
        },
        "ceiling": {
            "raw": {
                "what": "KafkaConsumer in a group of its own, KafkaStream's consumer settings, "
                "counting records (no decoding, no commits)",
                **rate_summary(n, raw_s),
                "unit": "records/s",
                "polls": [r["polls"] for r in raw_runs],
                "counted_at_end_of_span": [r["counted"] for r in raw_runs],
                "broker_cpu_seconds": round(median(raw_cpu), 3),
            }
        },
        "profiled": bool(args.profile),
    }


def main() -> None:
    p = parser("Worker on a Kafka topic against raw kafka-python consumption.", repeat=5)
    p.add_argument("--messages", type=int, default=200_000, help="timed messages")
    p.add_argument(
        "--extra",
        type=float,
        default=0.5,
        help="messages in the topic beyond --messages, as a fraction (read untimed)",
    )
    p.add_argument("--sessions", type=int, default=1_000)
    p.add_argument("--partitions", type=int, default=6, help="partitions of the stream topic")
    p.add_argument("--event-partitions", type=int, default=12, help="of the tracker's topic")
    p.add_argument("--flush-ms", type=int, default=200)
    p.add_argument("--flush-max", type=int, default=5_000)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one more worker run, top N"
    )
    args = p.parse_args()
    with (
        workdir(args.tmpdir, "worker-kafka") as tmp,
        tansu_broker(tmp / "kafka") as broker,
        redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server,
    ):
        emit(run(args, broker, server, tmp))


if __name__ == "__main__":
    main()
