"""Delay from an acknowledged append to its visibility, with ``tracker project`` running.

Setup (not timed): a private Tansu broker (memory storage) and a private redis-server
(AOF ``everysec`` as the embedded default unless ``--no-redis-aof``) on loopback TCP; a
``--partitions``-partition topic holding the creates of ``--sessions`` sessions (titles
of 20 to 80 characters). One ``tracker project`` process (``TRACKER_KAFKA_BOOTSTRAP``,
``TRACKER_EVENT_TOPIC``, ``TRACKER_PARTITIONS``, ``TRACKER_REDIS_URL``, ``TRACKER_PREFIX``
set; default options) is started; the case waits until its stderr says it "now applies
partitions" (its consumer group joined) and until it has applied the creates.

Measured: a load process (this module run with ``--child``, so that the measuring
process shares no GIL with it) opens a ``Tracker`` in Kafka mode and calls
``commit_many(call, wait=False)`` ``--rate`` times a second, ``--per-call`` commits each
(three consumers, mostly increasing offsets, across every partition: each call is one
append per partition, as ``Writer.append`` groups it), from ``--load-threads`` threads
taking the calls in turn from a fixed schedule, for ``--warmup`` + ``--seconds`` seconds.
It records, per call, when it returned (the acknowledgement: every partition's append
was acknowledged by the broker) and the positions it returned. Meanwhile a thread of
this process reads the checkpoint of every partition (one ``MGET`` of the active
generation's checkpoint keys, parsed as ``Reader.applied_position`` parses them) every
``--poll-ms`` milliseconds and notes when each checkpoint moved.

A call's delay is from its acknowledgement until the first poll that found every
partition it appended to applied at or past its position there (the moment
``Tracker.wait_for`` of all of them would return). The headline is the p99 of the calls
due after the warm-up; p50, p90 and max too. The polling adds up to ``--poll-ms`` plus
one ``MGET`` round trip to each delay (``poll`` in the JSON says how often it polled).
``checkpoint_interval_ms``: how long a partition's checkpoint stays put between moves
while the load runs (the projector's round over its partitions).

Ceiling, measured in the same run after ``tracker project`` is stopped: ``raw``, the same
load shape through kafka-python alone. The load process sends, per call, the same kind of
records (the msgpack arrays of the call's events, one per partition, each awaited as
``KafkaLog.append`` awaits it) with a ``KafkaProducer`` of the log's settings to another
topic, for ``--raw-seconds``; this process polls a ``KafkaConsumer`` of the log's reader
settings assigned every partition, and notes when each record arrived. Its delay is from
the call's acknowledgement until every record of the call has arrived: what delivery
through the broker costs before any projection.

The whole case takes about ``--seconds`` + ``--raw-seconds`` + 25 s (under 2 minutes with
the defaults). ``--profile N`` runs the ``tracker project`` process under cProfile for the
measured run (so the figures of such a run are not the headline) and logs its top N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pstats
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left
from collections.abc import Sequence
from datetime import UTC, datetime
from io import StringIO
from itertools import pairwise
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from benchmarks._common import (
    CONSUMERS,
    RedisServer,
    TansuBroker,
    Workload,
    busy_between,
    chunks,
    cli_env,
    commit_events,
    distribution,
    emit,
    kafka_client_versions,
    log,
    machine_busy_ticks,
    parser,
    percentile,
    process_cpu_seconds,
    redis_server,
    stop_process,
    tansu_broker,
    tracker_command,
    verdict,
    workdir,
)
from benchmarks.bench_kafka_append import producer_options
from benchmarks.bench_kafka_replay import reader_options
from tracker import Settings, Tracker
from tracker.events import Position, encode_event
from tracker.generations import Generations
from tracker.keys import partition_for
from tracker.logs.frames import encode_records
from tracker.logs.kafka import KafkaLog
from tracker.snapshots import parse_partial
from tracker.writer import Writer

TARGET_P99_MS = 250.0
PREFIX = "bench"
JOINED = "now applies partitions"

Applied = tuple[int, int, int]
"""A position as ``(partition, offset, index)``: compared as ``Position`` compares."""


# -- the load process ---------------------------------------------------------------------


def child_main(config_path: str) -> None:
    """The load: ``commit_many(wait=False)`` (or raw sends) on a schedule; results to a file."""
    config = json.loads(Path(config_path).read_text())
    workload = Workload(config["seed"], config["sessions"])
    rate, per_call = float(config["rate"]), int(config["per_call"])
    total_calls = int(rate * (config["warmup"] + config["seconds"]))
    batches = [workload.commits(per_call) for _ in range(total_calls)]
    partitions = int(config["partitions"])
    raw = config["mode"] == "raw"
    tracker: Tracker | None = None
    producer: KafkaProducer | None = None
    if raw:
        producer = KafkaProducer(**producer_options(config["bootstrap"]))
        producer.partitions_for(config["topic"])
    else:
        tracker = Tracker(
            Settings(
                data_dir=Path(config["data_dir"]),
                redis_url=config["redis_url"],
                kafka_bootstrap=config["bootstrap"],
                event_topic=config["topic"],
                partitions=partitions,
                prefix=PREFIX,
            )
        )
        tracker.commit_many(batches[0][:1], wait=False)  # connect the producer before timing

    def send_raw(batch: list[tuple[str, str, int]]) -> list[Applied]:
        assert producer is not None
        now = datetime.now(UTC)
        groups: dict[int, list[bytes]] = {}
        for event in commit_events(batch, now):
            groups.setdefault(partition_for(event.session_id, partitions), []).append(
                encode_event(event)
            )
        out: list[Applied] = []
        for partition, records in groups.items():  # one after the other, as Writer.append
            future = producer.send(config["topic"], encode_records(records), partition=partition)
            out.append((partition, int(future.get(timeout=10).offset), len(records) - 1))
        return out

    def commit(batch: list[tuple[str, str, int]]) -> list[Applied]:
        assert tracker is not None
        result = tracker.commit_many(batch, wait=False)
        return [(p.partition, p.offset, p.index) for p in result.positions]

    send = send_raw if raw else commit
    results: list[tuple[int, float, float, float, list[Applied]]] = []
    lock = threading.Lock()
    taken = iter(range(total_calls))
    print("ready", flush=True)
    start = time.monotonic() + 0.2

    def worker() -> None:
        while True:
            with lock:
                n = next(taken, None)
            if n is None:
                return
            due = start + n / rate
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            began = time.monotonic()
            positions = send(batches[n])
            acked = time.monotonic()
            with lock:
                results.append((n, due, began, acked, positions))

    threads = [threading.Thread(target=worker) for _ in range(int(config["threads"]))]
    cpu = os.times()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.times()
    cpu_seconds = after.user + after.system - cpu.user - cpu.system
    if tracker is not None:
        tracker.close()
    if producer is not None:
        producer.close(timeout=10)
    results.sort()
    out = {"start": start, "calls": results, "cpu_seconds": cpu_seconds}
    Path(config["out"]).write_text(json.dumps(out))


def run_load(config: dict[str, Any], tmp: Path, name: str) -> dict[str, Any]:
    """Start the load process, wait for it, return what it recorded."""
    config = {**config, "out": str(tmp / f"{name}.json")}
    config_path = tmp / f"{name}-config.json"
    config_path.write_text(json.dumps(config))
    argv = [sys.executable, "-m", "benchmarks.bench_kafka_delay", "--child", str(config_path)]
    process = subprocess.Popen(
        argv,
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the load process did not start: {line!r}")
        log(f"{name}: load process pid {process.pid} running")
        process.wait(timeout=config["warmup"] + config["seconds"] + 120)
    finally:
        stop_process(process)
    if process.returncode != 0:
        raise RuntimeError(f"the load process exited {process.returncode}")
    result: dict[str, Any] = json.loads(Path(config["out"]).read_text())
    return result


# -- watching visibility ------------------------------------------------------------------


class Timeline:
    """When each partition's applied position (or last arrived record) moved, as seen."""

    def __init__(self, partitions: int) -> None:
        self.times: list[list[float]] = [[] for _ in range(partitions)]
        self.positions: list[list[Applied]] = [[] for _ in range(partitions)]
        self.polls = 0
        self.poll_seconds = 0.0

    def note(self, partition: int, at: float, position: Applied) -> None:
        positions = self.positions[partition]
        if not positions or position > positions[-1]:
            positions.append(position)
            self.times[partition].append(at)

    def seen(self, position: Applied) -> float | None:
        """When ``position`` was first seen applied (or arrived); ``None`` if never."""
        partition = position[0]
        i = bisect_left(self.positions[partition], position)
        return self.times[partition][i] if i < len(self.times[partition]) else None

    def covers(self, positions: Sequence[Applied]) -> bool:
        return all(self.seen(tuple(p)) is not None for p in positions)  # type: ignore[arg-type]

    def stalls(
        self, low: float, high: float, origin: float, top: int = 5
    ) -> list[dict[str, float]]:
        """The ``top`` longest spans in [low, high] in which no partition's position moved."""
        moves = sorted(t for times in self.times for t in times if low <= t <= high)
        gaps = sorted(pairwise(moves), key=lambda gap: gap[0] - gap[1])[:top]
        return [
            {"from_s": round(a - origin, 2), "ms": round((b - a) * 1000, 1)}
            for a, b in sorted(gaps)
        ]

    def intervals_ms(self, low: float, high: float) -> list[float]:
        """Gaps between successive moves of each partition's position within [low, high]."""
        gaps: list[float] = []
        for times in self.times:
            inside = [t for t in times if low <= t <= high]
            gaps.extend((b - a) * 1000 for a, b in pairwise(inside))
        return sorted(gaps)


class CheckpointPoller(threading.Thread):
    """Polls every partition's checkpoint with one MGET every ``interval`` seconds."""

    def __init__(self, client: redis.Redis, keys: list[str], interval: float) -> None:
        super().__init__(name="checkpoint-poller", daemon=True)
        self.client = client
        self.keys = keys
        self.interval = interval
        self.timeline = Timeline(len(keys))
        self.stop = threading.Event()

    def run(self) -> None:
        timeline = self.timeline
        next_at = time.monotonic()
        while not self.stop.is_set():
            began = time.monotonic()
            values = self.client.mget(self.keys)
            at = time.monotonic()
            timeline.polls += 1
            timeline.poll_seconds += at - began
            for partition, value in enumerate(values):
                token = str(value) if value else ""
                partial = parse_partial(token) if token else None
                if partial is not None:
                    token = partial[0]  # a batch in progress: applied up to where it started
                if not token:
                    continue
                p = Position.parse(token)
                timeline.note(partition, at, (p.partition, p.offset, p.index))
            next_at += self.interval
            pause = next_at - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                next_at = time.monotonic()


class ArrivalWatcher(threading.Thread):
    """A raw ``KafkaConsumer`` of every partition: when each record arrived."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(name="arrival-watcher", daemon=True)
        self.consumer = KafkaConsumer(**reader_options(bootstrap))
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(tps)
        for tp in tps:
            self.consumer.seek(tp, 0)
        self.timeline = Timeline(partitions)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                polled = self.consumer.poll(timeout_ms=50, max_records=100_000)
                at = time.monotonic()
                self.timeline.polls += 1
                for tp, records in polled.items():  # a call's records are compared by offset
                    self.timeline.note(tp.partition, at, (tp.partition, records[-1].offset, 0))
        finally:
            self.consumer.close(autocommit=False)


def delays(
    load: dict[str, Any], timeline: Timeline, warmup: float, *, index_matters: bool
) -> dict[str, Any]:
    """Per-call delays (ms) from acknowledgement to all positions seen, after the warm-up."""
    start = float(load["start"])
    out: list[float] = []
    call_ms: list[float] = []
    late: list[float] = []
    unseen = early = 0
    first_due = last_due = None
    for _, due, began, acked, positions in load["calls"]:
        if due < start + warmup:
            continue
        first_due = due if first_due is None else first_due
        last_due = due
        call_ms.append((acked - began) * 1000)
        late.append(max(began - due, 0.0) * 1000)
        seen: list[float] = []
        for p in positions:
            position = (p[0], p[1], p[2] if index_matters else 0)
            at = timeline.seen(position)
            if at is None:
                break
            seen.append(at)
        else:
            delay = (max(seen) - acked) * 1000
            if delay < 0:
                early += 1
            out.append(max(delay, 0.0))
            continue
        unseen += 1
    out.sort()
    call_ms.sort()
    late.sort()
    window = (last_due - first_due) if first_due is not None and last_due is not None else 0.0
    calls = len(call_ms)
    return {
        "calls": calls,
        "window_seconds": round(window, 2),
        "offered_calls_per_s": round(calls / window, 1) if window else 0.0,
        "never_seen": unseen,
        "seen_before_ack": early,
        "delay_ms": distribution(out, 2),
        "call_ms": distribution(call_ms, 2),
        "start_late_ms": distribution(late, 2),
    }


# -- the case -----------------------------------------------------------------------------


def wait_joined(
    process: subprocess.Popen[bytes], stderr: Path, timeout: float
) -> tuple[str, float]:
    """Wait until ``tracker project`` says which partitions it applies; (line, seconds)."""
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        text = stderr.read_text(errors="replace") if stderr.exists() else ""
        for line in text.splitlines():
            if JOINED in line:
                return line.strip(), time.monotonic() - started
        if process.poll() is not None:
            raise RuntimeError(f"tracker project exited {process.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"tracker project did not join its group within {timeout:g} s")


def preload(bootstrap: str, topic: str, partitions: int, workload: Workload) -> dict[int, Applied]:
    """The sessions' creates, through ``Writer.append``; the last position per partition."""
    last: dict[int, Applied] = {}
    with KafkaLog(bootstrap, topic, partitions=partitions) as klog:
        writer = Writer(klog)
        for part in chunks(workload.creates(), 10_000):
            for appended in writer.append(list(part)):
                assert appended.last is not None
                p = appended.last
                position = (p.partition, p.offset, p.index)
                last[p.partition] = max(last.get(p.partition, position), position)
    return last


def checkpoint_keys(client: redis.Redis, partitions: int, timeout: float = 30) -> list[str]:
    """The active generation's checkpoint keys, once the projector has made one."""
    generations = Generations(client, PREFIX)
    deadline = time.monotonic() + timeout
    try:
        while not generations.refresh():
            if time.monotonic() > deadline:
                raise TimeoutError("tracker project made no projection")
            time.sleep(0.05)
        keys = generations.store.keys
        return [keys.checkpoint(p) for p in range(partitions)]
    finally:
        generations.close()


def project_profile(path: Path, top: int) -> str:
    out = StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def run(
    args: argparse.Namespace, broker: TansuBroker, server: RedisServer, tmp: Path
) -> dict[str, Any]:
    started = time.monotonic()
    partitions = args.partitions
    workload = Workload(args.seed, args.sessions)
    topic = f"bench.delay.{uuid.uuid4().hex[:8]}"
    created = preload(broker.bootstrap, topic, partitions, workload)
    log(f"{topic}: {args.sessions} creates appended")
    env = cli_env(
        TRACKER_KAFKA_BOOTSTRAP=broker.bootstrap,
        TRACKER_EVENT_TOPIC=topic,
        TRACKER_PARTITIONS=str(partitions),
        TRACKER_REDIS_URL=server.url,
        TRACKER_PREFIX=PREFIX,
    )
    data_dir = tmp / "data"
    profile_path = tmp / "project.pstats"
    argv = [*tracker_command(), "--data-dir", str(data_dir), "project"]
    if args.project_report_every is not None:
        argv += ["--report-every", str(args.project_report_every)]
    if args.profile:
        argv = [sys.executable, "-m", "cProfile", "-o", str(profile_path), *argv]
    stderr_path = tmp / "project.stderr"
    client = server.client()
    project_started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        project = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env=env, start_new_session=True,
        )  # fmt: skip
    poller: CheckpointPoller | None = None
    try:
        log(f"tracker project pid {project.pid} started; waiting for its group to join ...")
        joined, join_s = wait_joined(project, stderr_path, 60)
        log(f"after {join_s:.1f}s: {joined}")
        keys = checkpoint_keys(client, partitions)
        poller = CheckpointPoller(server.client(), keys, args.poll_ms / 1000)
        poller.start()
        deadline = time.monotonic() + 60
        while not poller.timeline.covers(list(created.values())):
            if time.monotonic() > deadline:
                raise TimeoutError("tracker project did not apply the creates within 60 s")
            time.sleep(0.05)
        log("the creates are applied; starting the load")
        config = {
            "mode": "tracker",
            "bootstrap": broker.bootstrap,
            "topic": topic,
            "partitions": partitions,
            "redis_url": server.url,
            "data_dir": str(data_dir),
            "seed": args.seed + 1,
            "sessions": args.sessions,
            "rate": args.rate,
            "per_call": args.per_call,
            "warmup": args.warmup,
            "seconds": args.seconds,
            "threads": args.load_threads,
        }
        pids = {"tracker_project": project.pid, "broker": broker.pid, "redis_server": server.pid}
        cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        self_before, ticks_before, wall_before = os.times(), machine_busy_ticks(), time.monotonic()
        load = run_load(config, tmp, "tracker")
        wall = time.monotonic() - wall_before
        cpu_load = {
            name: round(process_cpu_seconds(pid) - cpu_before[name], 2)
            for name, pid in pids.items()
        }
        self_after = os.times()
        cpu_load["this_process_poller"] = round(
            self_after.user + self_after.system - self_before.user - self_before.system, 2
        )
        cpu_load["load_process_while_loading"] = round(float(load["cpu_seconds"]), 2)
        cpu = {
            "wall_seconds": round(wall, 2),
            "busy_cpus": busy_between(ticks_before, machine_busy_ticks()),
            "cpu_seconds": cpu_load,
            "is": "CPU seconds of each process from the load process's start to its exit "
            "(its start-up included, about 1-2 s); busy_cpus: the whole machine over that span",
        }
        last = [tuple(p) for call in load["calls"] for p in call[4]]
        drain_deadline = time.monotonic() + 30
        while not poller.timeline.covers(last) and time.monotonic() < drain_deadline:
            time.sleep(0.01)
        poller.stop.set()
        poller.join()
        load_start = float(load["start"])
        tracker_result = delays(load, poller.timeline, args.warmup, index_matters=True)
        end_due = load_start + args.warmup + args.seconds
        intervals = poller.timeline.intervals_ms(load_start + args.warmup, end_due)
        stalls = poller.timeline.stalls(load_start + args.warmup, end_due, project_started)
    finally:
        if poller is not None:
            poller.stop.set()
        stop_process(project, grace=30)
        client.close()
    project_log = stderr_path.read_text(errors="replace")
    log(f"tracker project stopped (exit {project.returncode}); its stderr:\n{project_log.strip()}")
    profile = project_profile(profile_path, args.profile) if args.profile else ""
    if profile:
        log("cProfile of the tracker project process over the whole run:\n" + profile)
    d = tracker_result["delay_ms"]
    log(
        f"tracker: {tracker_result['calls']} calls ({tracker_result['offered_calls_per_s']}/s), "
        f"delay p50 {d.get('p50')} ms, p99 {d.get('p99')} ms, max {d.get('max')} ms; "
        f"checkpoint interval p50 {percentile(sorted(intervals), 0.5):.1f} ms"
    )

    raw_topic = f"bench.delay.raw.{uuid.uuid4().hex[:8]}"
    KafkaLog(broker.bootstrap, raw_topic, partitions=partitions).close()
    watcher = ArrivalWatcher(broker.bootstrap, raw_topic, partitions)
    watcher.start()
    try:
        raw_config = {**config, "mode": "raw", "topic": raw_topic, "seconds": args.raw_seconds}
        raw_load = run_load(raw_config, tmp, "raw")
        last = [(p[0], p[1], 0) for call in raw_load["calls"] for p in call[4]]
        drain_deadline = time.monotonic() + 10
        while not watcher.timeline.covers(last) and time.monotonic() < drain_deadline:
            time.sleep(0.01)
    finally:
        watcher.stop.set()
        watcher.join()
    raw_result = delays(raw_load, watcher.timeline, args.warmup, index_matters=False)
    r = raw_result["delay_ms"]
    log(
        f"raw: {raw_result['calls']} calls ({raw_result['offered_calls_per_s']}/s), delivery "
        f"p50 {r.get('p50')} ms, p99 {r.get('p99')} ms, max {r.get('max')} ms"
    )

    p99 = float(d.get("p99", float("inf")))
    raw_p99 = float(r.get("p99", float("nan")))
    timeline = poller.timeline
    return {
        "bench": "kafka_delay",
        "params": {
            "partitions": partitions,
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "titles": workload.describe_titles(),
            "rate_calls_per_s": args.rate,
            "commits_per_call": args.per_call,
            "offered_events_per_s": args.rate * args.per_call,
            "load_threads": args.load_threads,
            "load": "commit_many(call, wait=False) in a separate process",
            "warmup_seconds": args.warmup,
            "measured_seconds": args.seconds,
            "poll_ms": args.poll_ms,
            "raw_seconds": args.raw_seconds,
            "projector": "one `tracker project` process, "
            + (
                "default options"
                if args.project_report_every is None
                else f"--report-every {args.project_report_every:g} (not the default)"
            )
            + (" (under cProfile: not a headline run)" if args.profile else ""),
            "profiled": bool(args.profile),
            "broker": broker.describe(),
            "redis": f"{server.version()} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            **kafka_client_versions(),
            "seed": args.seed,
        },
        "value": p99,
        "unit": "ms (p99 delay from commit_many(wait=False) returning to every position applied)",
        "target": TARGET_P99_MS,
        "meets_target": verdict(p99, TARGET_P99_MS, at_most=True),
        "ratio": round(p99 / raw_p99, 2) if math.isfinite(raw_p99) and raw_p99 > 0 else None,
        "ratio_of": "tracker p99 delay / ceiling.raw p99 delivery delay (lower is better)",
        "tracker": {
            **tracker_result,
            "offered_events_per_s": round(tracker_result["offered_calls_per_s"] * args.per_call),
            "checkpoint_interval_ms": distribution(intervals, 2),
            "longest_stalls": stalls,
            "longest_stalls_are": "the longest spans of the measured window in which no "
            "partition's checkpoint moved; from_s: seconds after tracker project started",
            "cpu_during_load": cpu,
            "project_joined_after_seconds": round(join_s, 2),
            "project_joined": joined,
            "project_stderr_tail": project_log.strip().splitlines()[-3:],
        },
        "poll": {
            "polls": timeline.polls,
            "mget_mean_ms": round(timeline.poll_seconds / max(timeline.polls, 1) * 1000, 3),
            "resolution_is": "a delay includes up to poll_ms + one MGET round trip of polling",
        },
        "ceiling": {
            "raw": {
                "what": "the same load shape through a raw KafkaProducer (log settings, each "
                "record awaited) and a raw KafkaConsumer of every partition (log reader "
                "settings): acknowledgement to arrival, no projection",
                **raw_result,
            }
        },
        "case_seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    p = parser("Append-to-visible delay with `tracker project` running, Kafka mode.", repeat=1)
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--rate", type=float, default=100.0, help="commit_many calls per second")
    p.add_argument("--per-call", type=int, default=100, help="commits per call")
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds of load")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load not measured")
    p.add_argument("--raw-seconds", type=float, default=10.0, help="seconds of the raw ceiling")
    p.add_argument("--load-threads", type=int, default=8)
    p.add_argument("--poll-ms", type=float, default=2.0)
    p.add_argument(
        "--project-report-every",
        type=float,
        default=None,
        metavar="SECONDS",
        help="pass --report-every to tracker project (default: its own default, 10 s)",
    )
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="run tracker project under cProfile and log its top N functions",
    )
    args = p.parse_args()
    if args.repeat != 1:
        p.error("--repeat: this case runs once (about 55 s); run it again for another sample")
    with (
        workdir(args.tmpdir, "kafka-delay") as tmp,
        tansu_broker(tmp / "kafka") as broker,
        redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server,
    ):
        emit(run(args, broker, server, tmp))


if __name__ == "__main__":
    main()
