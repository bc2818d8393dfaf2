"""``tracker replay`` from the Kafka log, as a user runs it, against raw kafka-python reading.

Setup (not timed): a private Tansu broker (memory storage) and a private redis-server
(AOF ``everysec`` as the embedded default unless ``--no-redis-aof``), both on loopback
TCP. A ``--partitions``-partition topic (created by ``KafkaLog``) gets ``--events``
events over ``--sessions`` sessions: the creates (titles of 20 to 80 characters), then
commits of three consumers (mostly increasing, some stale or repeated), appended through
``Writer.append`` (``encode_validated``, grouped by partition as the writer groups
them) in calls of ``--batch`` events, as workers' ``commit_many`` calls write them.

Timed, once of each per repeat:

* ``cli`` (the headline): ``tracker --data-dir D --redis-url U --prefix P replay --json``
  in a subprocess with ``TRACKER_KAFKA_BOOTSTRAP``, ``TRACKER_EVENT_TOPIC`` and
  ``TRACKER_PARTITIONS`` set: the wall time of the whole process (interpreter start,
  imports, opening the topic and Redis, the replay into a new generation, its promotion,
  exit). Its own report (``seconds``: the replay call alone) is given too, and
  ``startup`` (the wall time of ``tracker --version``);
* ``in_process``: ``Tracker.replay()`` in this process (a tracker opened in Kafka mode
  with ``catch_up=False``, as the CLI opens it), wall time of the call.

The replay's bytes/s is the topic's total record value bytes over the replay's time.

Ceilings, measured right after each repeat's replays:

* ``raw`` (the ratio): a kafka-python ``KafkaConsumer`` with the log's reader settings
  (no group, no auto commit, ``fetch_max_wait_ms=5``, default fetch sizes, CRC checks on
  with the ``crc32c`` package installed as it is) assigned every partition, seeked to the
  beginning, polling until it has every record up to the end of each partition: bytes/s
  and records/s. The target is the CLI's bytes/s >= 0.7 of this;
* ``raw_by_partition``: the same consumer reading one partition at a time to its end;
* ``log_read``: ``KafkaLog.read`` of every partition to its end in pieces of the
  projector's ``READ_RECORDS`` (the log's reads, msgpack arrays split into events, no
  event decode, no fold, no Redis), on a freshly opened log;
* ``log_count``: ``KafkaLog.count`` of every partition on a freshly opened log: what
  ``tracker replay`` does before it replays (``Tracker.event_count()``, the progress
  bar's total, asked even when stderr is no terminal);
* ``python``: decode (``decode_records`` then ``decode_event_lean``) + ``BatchFolder`` of
  the raw consumer's values in memory, as the projector folds them: no Kafka, no Redis.

The redis-server's and the broker's CPU time around each replay say how much of it they
spent.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaConsumer, TopicPartition

from benchmarks._common import (
    CONSUMERS,
    EPOCH,
    RedisServer,
    TansuBroker,
    Workload,
    chunks,
    cli_env,
    commit_events,
    emit,
    kafka_client_versions,
    log,
    median,
    parser,
    profiled,
    rate_summary,
    redis_server,
    rounded,
    tansu_broker,
    timed,
    tracker_command,
    verdict,
    workdir,
)
from tracker import Settings, Tracker
from tracker.events import Position, decode_event_lean
from tracker.fold import BatchFolder
from tracker.logs.frames import decode_records
from tracker.logs.kafka import FETCH_WAIT_MS, KafkaLog
from tracker.projector import BATCH_RECORDS, MAX_SESSIONS, READ_RECORDS
from tracker.writer import Writer

TARGET_RATIO = 0.7
"""Of the CLI replay's bytes/s over the raw consumer's bytes/s."""
PREFIX = "bench"

Values = dict[int, list[bytes]]


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def build_topic(
    bootstrap: str, topic: str, partitions: int, workload: Workload, events: int, batch: int
) -> tuple[int, dict[int, int], float]:
    """Append the workload through ``Writer.append``; (events, end offset per partition, s)."""
    started = time.perf_counter()
    ends: dict[int, int] = {}
    total = 0
    with KafkaLog(bootstrap, topic, partitions=partitions) as klog:
        writer = Writer(klog)

        def append(part: list[Any]) -> None:
            nonlocal total
            for appended in writer.append(part):
                assert appended.last is not None
                ends[appended.partition] = max(
                    ends.get(appended.partition, 0), appended.last.offset + 1
                )
                total += appended.count

        for part in chunks(workload.creates(), batch):
            append(list(part))
        remaining = events - total
        n = 0
        while remaining > 0:
            count = min(batch, remaining)
            append(commit_events(workload.commits(count), EPOCH + timedelta(seconds=n)))
            remaining -= count
            n += 1
    return total, ends, time.perf_counter() - started


def reader_options(bootstrap: str) -> dict[str, Any]:
    """The options of ``KafkaLog``'s own consumer (see ``KafkaLog._reader``)."""
    return {
        "bootstrap_servers": bootstrap,
        "client_id": "bench-raw",
        "group_id": None,
        "enable_auto_commit": False,
        "auto_offset_reset": "none",
        "fetch_max_wait_ms": FETCH_WAIT_MS,
    }


def raw_consume(
    bootstrap: str, topic: str, ends: dict[int, int], *, by_partition: bool, keep: bool = False
) -> tuple[float, int, int, Values]:
    """Read every record up to ``ends``; (seconds, records, value bytes, values if ``keep``)."""
    consumer = KafkaConsumer(**reader_options(bootstrap))
    values: Values = {p: [] for p in ends}
    records = size = 0
    try:
        consumer.partitions_for_topic(topic)  # metadata outside the timed part
        groups = [[p] for p in sorted(ends)] if by_partition else [sorted(ends)]
        started = time.perf_counter()
        for group in groups:
            tps = [TopicPartition(topic, p) for p in group]
            consumer.assign(tps)
            for tp in tps:
                consumer.seek(tp, 0)
            left = {p for p in group if ends[p] > 0}
            while left:
                for tp, polled in consumer.poll(timeout_ms=100, max_records=100_000).items():
                    records += len(polled)
                    for record in polled:
                        size += len(record.value)
                    if keep:
                        values[tp.partition].extend(record.value for record in polled)
                    if polled and polled[-1].offset + 1 >= ends[tp.partition]:
                        left.discard(tp.partition)
        seconds = time.perf_counter() - started
    finally:
        consumer.close(autocommit=False)
    return seconds, records, size, values


def log_read(bootstrap: str, topic: str, partitions: int) -> tuple[float, int]:
    """``KafkaLog.read`` of every partition in pieces of ``READ_RECORDS``; (seconds, events)."""
    with KafkaLog(bootstrap, topic, partitions=partitions, create=False) as klog:
        started = time.perf_counter()
        events = 0
        for partition in range(partitions):
            after: Position | None = None
            while batches := klog.read(partition, after, READ_RECORDS):
                events += sum(len(b.records) for b in batches)
                after = batches[-1].last
        return time.perf_counter() - started, events


def log_count(bootstrap: str, topic: str, partitions: int) -> tuple[float, int]:
    """``KafkaLog.count`` of every partition on a fresh log (``Tracker.event_count()``)."""
    with KafkaLog(bootstrap, topic, partitions=partitions, create=False) as klog:
        started = time.perf_counter()
        events = sum(klog.count(p) for p in range(partitions))
        return time.perf_counter() - started, events


def python_side(values: Values) -> tuple[float, int]:
    """decode_records + decode_event_lean + BatchFolder of the values, as the projector folds."""
    started = time.perf_counter()
    events = 0
    for partition in sorted(values):
        folder = BatchFolder()
        piece: list[bytes] = []
        for value in values[partition]:
            piece.extend(decode_records(value))
            if len(piece) >= READ_RECORDS:
                folder.add(list(map(decode_event_lean, piece)))
                events += len(piece)
                piece = []
            if folder.size >= MAX_SESSIONS:  # pragma: no cover - not with 10 k sessions
                folder.finish()
                folder = BatchFolder()
        folder.add(list(map(decode_event_lean, piece)))
        events += len(piece)
        folder.finish()
    return time.perf_counter() - started, events


def cli_argv(data_dir: Path, url: str) -> list[str]:
    return [
        "--data-dir", str(data_dir),
        "--redis-url", url,
        "--prefix", PREFIX,
        "replay", "--json",
    ]  # fmt: skip


def cli_replay(data_dir: Path, url: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``tracker ... replay --json`` as a subprocess, and its JSON report."""
    argv = [*tracker_command(), *cli_argv(data_dir, url)]
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return wall, report


def cli_startup(env: dict[str, str]) -> float:
    """Wall seconds of ``tracker --version``: interpreter start and the CLI's imports."""
    started = time.perf_counter()
    subprocess.run(
        [*tracker_command(), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        check=True,
    )
    return time.perf_counter() - started


def cli_profile(data_dir: Path, url: str, env: dict[str, str], top: int) -> str:
    """``python -m cProfile`` of one ``tracker ... replay --json`` process, top by own time."""
    out: list[str] = []
    for order in ("tottime", "cumulative"):
        argv = [sys.executable, "-m", "cProfile", "-s", order, *tracker_command()]
        done = subprocess.run(
            [*argv, *cli_argv(data_dir, url)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        lines = done.stdout.splitlines()
        start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
        out.append(f"\n===== tracker replay (subprocess), by {order} =====")
        out.extend(lines[start : start + top + 8])
    return "\n".join(out)


def run(
    args: argparse.Namespace, broker: TansuBroker, server: RedisServer, tmp: Path
) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    topic = f"bench.replay.{uuid.uuid4().hex[:8]}"
    log(f"appending {args.events} events over {args.sessions} sessions to {topic} ...")
    appended, ends, build_s = build_topic(
        broker.bootstrap, topic, args.partitions, workload, args.events, args.batch
    )
    log(
        f"appended {appended} events in {build_s:.1f}s: {sum(ends.values())} Kafka records "
        f"over {len(ends)} partitions"
    )
    data_dir = tmp / "data"
    env = cli_env(
        TRACKER_KAFKA_BOOTSTRAP=broker.bootstrap,
        TRACKER_EVENT_TOPIC=topic,
        TRACKER_PARTITIONS=str(args.partitions),
    )
    settings = Settings(
        data_dir=data_dir,
        redis_url=server.url,
        kafka_bootstrap=broker.bootstrap,
        event_topic=topic,
        partitions=args.partitions,
        prefix=PREFIX,
    )
    client = server.client()
    tracker: Tracker | None = None

    series: dict[str, list[float]] = {
        name: []
        for name in (
            "cli_wall", "cli_report", "cli_redis_cpu", "cli_broker_cpu", "startup",
            "in_process", "in_process_report", "in_process_redis_cpu", "in_process_broker_cpu",
            "raw", "raw_by_partition", "log_read", "log_count", "python", "ratio",
            "in_process_ratio",
        )
    }  # fmt: skip
    value_bytes = records = events = sessions = calls = 0
    profile = ""

    def cpu_of(fn: Callable[[], Any]) -> tuple[float, float, float, Any]:
        """Wall seconds of ``fn()``, the redis-server's and the broker's CPU seconds, its result."""
        redis0, broker0 = redis_cpu(client), broker.cpu_seconds()
        seconds, result = timed(fn)
        return seconds, redis_cpu(client) - redis0, broker.cpu_seconds() - broker0, result

    try:
        for i in range(args.repeat):
            series["startup"].append(cli_startup(env))
            _, redis_s, broker_s, (wall, report) = cpu_of(
                lambda: cli_replay(data_dir, server.url, env)
            )
            series["cli_wall"].append(wall)
            series["cli_report"].append(float(report["seconds"]))
            series["cli_redis_cpu"].append(redis_s)
            series["cli_broker_cpu"].append(broker_s)
            events, sessions = int(report["events"]), int(report["sessions"])
            log(
                f"tracker replay --json {i + 1}/{args.repeat}: {events} events, {sessions} "
                f"sessions, {wall:.3f}s wall of the process ({events / wall:,.0f}/s), its "
                f"report {report['seconds']:.3f}s; `tracker --version` "
                f"{series['startup'][-1]:.3f}s; CPU: redis-server {redis_s:.3f}s, broker "
                f"{broker_s:.3f}s"
            )
            if tracker is None:
                tracker = Tracker(settings, catch_up=False)
            wall, redis_s, broker_s, in_report = cpu_of(tracker.replay)
            series["in_process"].append(wall)
            series["in_process_report"].append(in_report.seconds)
            series["in_process_redis_cpu"].append(redis_s)
            series["in_process_broker_cpu"].append(broker_s)
            calls = in_report.redis_calls
            log(
                f"Tracker.replay() {i + 1}/{args.repeat}: {in_report.events} events, "
                f"{wall:.3f}s ({in_report.events / wall:,.0f}/s), {calls} Redis calls; CPU: "
                f"redis-server {redis_s:.3f}s, broker {broker_s:.3f}s"
            )

            raw_s, records, value_bytes, values = raw_consume(
                broker.bootstrap, topic, ends, by_partition=False, keep=True
            )
            series["raw"].append(raw_s)
            series["ratio"].append(raw_s / series["cli_wall"][-1])
            series["in_process_ratio"].append(raw_s / series["in_process"][-1])
            series["raw_by_partition"].append(
                raw_consume(broker.bootstrap, topic, ends, by_partition=True)[0]
            )
            read_s, read_events = log_read(broker.bootstrap, topic, args.partitions)
            series["log_read"].append(read_s)
            count_s, counted = log_count(broker.bootstrap, topic, args.partitions)
            series["log_count"].append(count_s)
            python_s, folded = python_side(values)
            series["python"].append(python_s)
            del values
            if not read_events == counted == folded == events:
                raise RuntimeError(
                    f"events: replay {events}, log read {read_events}, count {counted}, "
                    f"fold {folded}"
                )
            log(
                f"  ceilings: raw consumer {raw_s:.3f}s ({value_bytes / raw_s / 1e6:.1f} MB/s, "
                f"{records / raw_s:,.0f} records/s); one partition at a time "
                f"{series['raw_by_partition'][-1]:.3f}s; KafkaLog.read {read_s:.3f}s; "
                f"KafkaLog.count {count_s:.3f}s; decode + fold {python_s:.3f}s; ratio "
                f"{series['ratio'][-1]:.3f}"
            )
        if args.profile:
            assert tracker is not None
            profile = profiled(tracker.replay, args.profile)
            profile += cli_profile(data_dir, server.url, env, args.profile)
    finally:
        if tracker is not None:
            tracker.close()
        client.close()
    if profile:
        log("cProfile of one more Tracker.replay(), then of one more `tracker replay`:\n" + profile)

    def med(name: str) -> float:
        return round(median(series[name]), 4)

    cli = rate_summary(events, series["cli_wall"])
    in_process = rate_summary(events, series["in_process"])
    raw = rate_summary(value_bytes, series["raw"])
    cli_bytes = value_bytes / median(series["cli_wall"])
    in_process_bytes = value_bytes / median(series["in_process"])
    ratio = round(median(series["ratio"]), 3)

    def ceiling(name: str, what: str) -> dict[str, Any]:
        seconds = median(series[name])
        return {
            "what": what,
            "seconds": [round(s, 4) for s in series[name]],
            "median_seconds": round(seconds, 4),
            "events_per_s": rounded(events / seconds),
            "mb_per_s": rounded(value_bytes / seconds / 1e6, 2),
        }

    return {
        "bench": "kafka_replay",
        "params": {
            "events": events,
            "sessions": args.sessions,
            "partitions": args.partitions,
            "kafka_records": records,
            "record_value_bytes": value_bytes,
            "consumers": list(CONSUMERS),
            "titles": workload.describe_titles(),
            "append_batch": args.batch,
            "appended_through": "Writer.append (encode_validated, grouped by partition)",
            "projector_batch_records": BATCH_RECORDS,
            "projector_read_records": READ_RECORDS,
            "repeat": args.repeat,
            "seed": args.seed,
            "broker": broker.describe(),
            "redis": f"{server.version()} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "raw_consumer": {
                k: v for k, v in reader_options("").items() if k != "bootstrap_servers"
            },
            **kafka_client_versions(),
            "cli": " ".join(
                [
                    "TRACKER_KAFKA_BOOTSTRAP=B TRACKER_EVENT_TOPIC=T TRACKER_PARTITIONS="
                    f"{args.partitions}",
                    *tracker_command(),
                    "--data-dir D --redis-url U --prefix",
                    PREFIX,
                    "replay --json",
                ]
            ),
            "build_seconds": round(build_s, 2),
        },
        "seconds": cli["seconds"],
        "median_rate": cli["median_rate"],
        "value": cli["median_rate"],
        "unit": "events/s (tracker replay, process wall time)",
        "bytes_per_s": rounded(cli_bytes),
        "mb_per_s": rounded(cli_bytes / 1e6, 2),
        "target": TARGET_RATIO,
        "target_is": "the CLI replay's bytes/s (topic value bytes / process wall) >= 0.7 x "
        "the raw consumer's bytes/s",
        "meets_target": verdict(ratio, TARGET_RATIO),
        "ratio": ratio,
        "ratio_of": "CLI replay bytes/s / ceiling.raw bytes/s (median of per-repeat ratios)",
        "cli": {
            "what": "tracker replay --json in a subprocess: wall time of the process",
            **cli,
            "unit": "events/s",
            "mb_per_s": rounded(cli_bytes / 1e6, 2),
            "report_seconds": [round(s, 4) for s in series["cli_report"]],
            "redis_server_cpu_seconds": med("cli_redis_cpu"),
            "broker_cpu_seconds": med("cli_broker_cpu"),
            "breakdown_seconds": {
                "process_wall": med("cli_wall"),
                "replay_call": med("cli_report"),
                "startup_and_imports": med("startup"),
                "open_count_and_exit": round(
                    median(series["cli_wall"]) - median(series["cli_report"]) - med("startup"), 4
                ),
                "open_count_and_exit_is": "process wall - replay call (its report) - "
                "`tracker --version` wall: opening the topic and Redis, Tracker.event_count() "
                "(see ceiling.log_count), closing",
            },
        },
        "in_process": {
            "what": "Tracker.replay() in this process, wall time of the call",
            **in_process,
            "unit": "events/s",
            "mb_per_s": rounded(in_process_bytes / 1e6, 2),
            "ratio": round(median(series["in_process_ratio"]), 3),
            "meets_target": verdict(median(series["in_process_ratio"]), TARGET_RATIO),
            "report_seconds": [round(s, 4) for s in series["in_process_report"]],
            "redis_calls": calls,
            "sessions_replayed": sessions,
            "redis_server_cpu_seconds": med("in_process_redis_cpu"),
            "broker_cpu_seconds": med("in_process_broker_cpu"),
        },
        "ceiling": {
            "raw": {
                "what": "KafkaConsumer (the log's reader settings) assigned every partition, "
                "seek to 0, poll to the end of each",
                **raw,
                "unit": "bytes/s",
                "mb_per_s": rounded(value_bytes / median(series["raw"]) / 1e6, 2),
                "records_per_s": rounded(records / median(series["raw"])),
                "events_per_s": rounded(events / median(series["raw"])),
            },
            "raw_by_partition": ceiling(
                "raw_by_partition", "the same consumer, one partition at a time"
            ),
            "log_read": ceiling(
                "log_read",
                f"KafkaLog.read of every partition to its end, {READ_RECORDS} events a read "
                "(no event decode, fold or Redis)",
            ),
            "log_count": ceiling(
                "log_count",
                "KafkaLog.count of every partition on a fresh log: Tracker.event_count(), "
                "which tracker replay asks before replaying",
            ),
            "python": ceiling(
                "python",
                "decode_records + decode_event_lean + BatchFolder of the values in memory",
            ),
        },
    }


def main() -> None:
    p = parser("tracker replay (CLI and in process) from a Kafka topic against a raw consumer.")
    p.add_argument("--events", type=int, default=1_000_000, help="events in the topic")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--batch", type=int, default=10_000, help="events per append call (setup)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one more Tracker.replay() and one more `tracker replay` process, top N",
    )
    args = p.parse_args()
    with (
        workdir(args.tmpdir, "kafka-replay") as tmp,
        tansu_broker(tmp / "kafka") as broker,
        redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server,
    ):
        emit(run(args, broker, server, tmp))


if __name__ == "__main__":
    main()
