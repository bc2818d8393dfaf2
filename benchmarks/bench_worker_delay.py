"""Delay from a message produced to Kafka until its offset is visible in Redis.

Setup (not timed): a private Tansu broker (memory storage) and a private redis-server
(AOF ``everysec`` as the embedded default unless ``--no-redis-aof``) on loopback TCP; a
``--partitions``-partition stream topic (6). Two processes, given their settings the way
a user does (``TRACKER_KAFKA_BOOTSTRAP``, ``TRACKER_EVENT_TOPIC``, ``TRACKER_PARTITIONS``
(12), ``TRACKER_REDIS_URL``, ``TRACKER_PREFIX``): ``tracker project`` and ``tracker
worker --stream TOPIC --consumer bench --flush-ms 200`` (default handler, the other
options their defaults; ``TRACKER_WORKER_SESSION_TIMEOUT_MS`` and
``TRACKER_WORKER_MAX_POLL_INTERVAL_MS`` 6000, the tests' Tansu settings, so that its
group joins in seconds). A load process (this module with ``--child``, so that it shares
no GIL with the measuring one) first sends one message to every one of ``--sessions``
sessions (offset 0) and the case waits until all of them are visible: both processes have
joined their groups and the path is warm.

Measured (``worker``): the load process sends synthetic flux0 message events
(``consumers.generate.synthetic_messages``: round-robin over the sessions, each
session's offsets 1, 2, 3, ... in order, so every message is a distinct (session,
offset)) at ``--rate`` messages a second for ``--warmup`` + ``--seconds`` seconds: every
``--tick-ms`` the messages due, keyed by session, with a ``KafkaProducer`` of
``produce_messages``'s settings (``acks="all"``, idempotent), then ``flush()``; it
records when each tick started sending (``sent``) and when ``flush`` returned (the
broker acknowledged them: ``acked``). Meanwhile a thread of this process reads every
session's offsets (one pipelined ``HMGET`` per session of the active generation, every
``--poll-ms`` ms) and notes when each session's offset moved. A message's delay runs from
its acknowledgement until the first poll that found its session's offset at or past its
own (offsets are max-registers): the headline is the p99 over the messages sent after the
warm-up (p50, p90, max too, and the same from ``sent``).

Ceiling, in the same run, with both processes still running (``direct``): the load
process opens a ``Tracker`` in Kafka mode and, on the same schedule, calls
``commit_many(the tick's (session, "direct", offset) commits, wait=False)`` (from
``--load-threads`` threads taking the ticks in turn, as a commit of 12 partitions takes
several produces), for ``--direct-seconds``; its delay runs from the call's return until
the offset is visible: what the projector alone adds, so the worker's share (its reading,
its ``--flush-ms`` wait and its flush) is the difference.

The polling adds up to ``--poll-ms`` plus one pipelined round trip to each delay
(``poll`` in the JSON). The case takes about ``--seconds`` + ``--direct-seconds`` + 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from bisect import bisect_left
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaProducer

from benchmarks._common import (
    RedisServer,
    TansuBroker,
    busy_between,
    cli_env,
    distribution,
    emit,
    kafka_client_versions,
    log,
    machine_busy_ticks,
    parser,
    process_cpu_seconds,
    redis_server,
    stop_process,
    tansu_broker,
    tracker_command,
    verdict,
    workdir,
)
from consumers.generate import session_ids, synthetic_messages
from consumers.kafkastream import ensure_topic
from tracker import Settings, Tracker
from tracker.generations import Generations
from tracker.keys import OFFSET_PREFIX, partition_for

TARGET_P99_MS = 1000.0
PREFIX = "bench"
WORKER = "bench"
DIRECT = "direct"
GROUP_TIMEOUT_MS = "6000"

# -- the load process ---------------------------------------------------------------------


def schedule(config: dict[str, Any], seconds: float) -> list[list[int]]:
    """Message numbers (into ``synthetic_messages``) due per tick, after the primer."""
    rate, tick = float(config["rate"]), float(config["tick_ms"]) / 1000
    sessions = int(config["sessions"])
    total = int(rate * seconds)
    ticks = max(1, round(seconds / tick))
    out: list[list[int]] = []
    for t in range(ticks):
        low, high = total * t // ticks, total * (t + 1) // ticks
        out.append(list(range(sessions + low, sessions + high)))
    return out


def child_main(config_path: str) -> None:
    """The load: the primer, then messages (or direct commits) on a schedule."""
    config = json.loads(Path(config_path).read_text())
    sessions = int(config["sessions"])
    tick = float(config["tick_ms"]) / 1000
    seconds = float(config["warmup"]) + float(config["seconds"])
    ticks = schedule(config, seconds)
    last = ticks[-1][-1] + 1 if ticks[-1] else sessions
    ids = session_ids(sessions)
    mode = config["mode"]
    producer: KafkaProducer | None = None
    tracker: Tracker | None = None
    messages: list[tuple[str, bytes]] = []
    if mode == "worker":
        messages = [m for chunk in synthetic_messages(last, sessions, seed=7) for m in chunk]
        producer = KafkaProducer(
            bootstrap_servers=config["bootstrap"],
            client_id="bench-load",
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            batch_size=256 * 1024,
        )
        producer.partitions_for(config["topic"])

        def send(numbers: list[int]) -> None:
            assert producer is not None
            for n in numbers:
                sid, value = messages[n]
                producer.send(config["topic"], key=sid.encode(), value=value)
            producer.flush(timeout=30)

        send(list(range(sessions)))  # the primer: offset 0 of every session
    else:
        tracker = Tracker(
            Settings(
                data_dir=Path(config["data_dir"]),
                redis_url=config["redis_url"],
                kafka_bootstrap=config["bootstrap"],
                event_topic=config["event_topic"],
                partitions=int(config["event_partitions"]),
                prefix=PREFIX,
            )
        )

        def send(numbers: list[int]) -> None:
            assert tracker is not None
            commits = [(ids[n % sessions], DIRECT, n // sessions) for n in numbers]
            tracker.commit_many(commits, wait=False)

        send(list(range(sessions)))  # the primer; connects the producer too
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    results: list[tuple[int, float, float, float]] = []
    lock = threading.Lock()
    taken = iter(range(len(ticks)))
    start = time.monotonic() + 0.1

    def run_ticks() -> None:
        while True:
            with lock:
                t = next(taken, None)
            if t is None:
                return
            due = start + t * tick
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            began = time.monotonic()
            if ticks[t]:
                send(ticks[t])
            acked = time.monotonic()
            with lock:
                results.append((t, due, began, acked))

    threads = [
        threading.Thread(target=run_ticks)
        for _ in range(1 if mode == "worker" else int(config["threads"]))
    ]
    cpu = os.times()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = os.times()
    if producer is not None:
        producer.close(timeout=10)
    if tracker is not None:
        tracker.close()
    results.sort()
    Path(config["out"]).write_text(
        json.dumps(
            {
                "start": start,
                "ticks": results,
                "cpu_seconds": after.user + after.system - cpu.user - cpu.system,
            }
        )
    )


class Load:
    """The load process: started, primed, then told to go; its results."""

    def __init__(self, config: dict[str, Any], tmp: Path, name: str) -> None:
        self.config = {**config, "mode": name, "out": str(tmp / f"{name}.json")}
        path = tmp / f"{name}-config.json"
        path.write_text(json.dumps(self.config))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.bench_worker_delay", "--child", str(path)],
            cwd=Path(__file__).resolve().parent.parent,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            stop_process(self.process)
            raise RuntimeError(f"the {name} load process did not start: {line!r}")
        log(f"{name}: load process pid {self.process.pid} sent its primer")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            self.process.wait(timeout=timeout)
        finally:
            stop_process(self.process)
            for pipe in (self.process.stdin, self.process.stdout):
                if pipe is not None:
                    pipe.close()
        if self.process.returncode != 0:
            raise RuntimeError(f"the load process exited {self.process.returncode}")
        result: dict[str, Any] = json.loads(Path(self.config["out"]).read_text())
        return result

    def stop(self) -> None:
        stop_process(self.process)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


# -- watching visibility ------------------------------------------------------------------


class OffsetPoller(threading.Thread):
    """Reads every session's offsets (pipelined HMGET) every ``interval`` seconds and notes,
    per (consumer, session), when the offset moved.

    Follows the active generation (read with each poll): the processes opening at the same
    time may each make one, and the one promoted last is the one read.
    """

    def __init__(
        self, client: redis.Redis, sessions: int, consumers: list[str], interval: float
    ) -> None:
        super().__init__(name="offset-poller", daemon=True)
        self.client = client
        self.ids = session_ids(sessions)
        self.generations = Generations(client, PREFIX)
        self.keys: list[str] = []
        self.generation: int | None = None
        self.generation_changes = 0
        self.fields = [OFFSET_PREFIX + c for c in consumers]
        self.consumers = consumers
        self.interval = interval
        self.offsets: dict[str, list[list[int]]] = {c: [[] for _ in self.ids] for c in consumers}
        self.times: dict[str, list[list[float]]] = {c: [[] for _ in self.ids] for c in consumers}
        self.polls = 0
        self.poll_seconds = 0.0
        self.stop = threading.Event()

    def _rebind(self) -> bool:
        """Keys of the active generation; False while there is none."""
        if not self.generations.refresh():
            return False
        keys = self.generations.store.keys
        if keys.generation != self.generation:
            if self.generation is not None:
                self.generation_changes += 1
            self.generation = keys.generation
            self.keys = [keys.session(partition_for(sid, keys.partitions), sid) for sid in self.ids]
        return True

    def run(self) -> None:
        next_at = time.monotonic()
        pipe = self.client.pipeline(transaction=False)
        try:
            while not self.stop.is_set():
                began = time.monotonic()
                if self._rebind():
                    for key in self.keys:
                        pipe.hmget(key, self.fields)
                    rows = pipe.execute()
                    at = time.monotonic()
                    self.polls += 1
                    self.poll_seconds += at - began
                    self._note(rows, at)
                next_at += self.interval
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                else:
                    next_at = time.monotonic()
        finally:
            self.generations.close()

    def _note(self, rows: list[list[str | None]], at: float) -> None:
        for s, row in enumerate(rows):
            for consumer, value in zip(self.consumers, row, strict=True):
                if value is None:
                    continue
                offset = int(value)
                seen = self.offsets[consumer][s]
                if not seen or offset > seen[-1]:
                    seen.append(offset)
                    self.times[consumer][s].append(at)

    def seen(self, consumer: str, session: int, offset: int) -> float | None:
        """When ``offset`` (or a later one) was first seen for the session; ``None``: never."""
        offsets = self.offsets[consumer][session]
        i = bisect_left(offsets, offset)
        return self.times[consumer][session][i] if i < len(offsets) else None

    def all_seen(self, consumer: str, heads: dict[int, int]) -> bool:
        return all(self.seen(consumer, s, offset) is not None for s, offset in heads.items())


def delays(
    load: dict[str, Any],
    config: dict[str, Any],
    poller: OffsetPoller,
    consumer: str,
    warmup: float,
) -> dict[str, Any]:
    """Per message: from its tick's acknowledgement (and start) until visible, after warm-up."""
    sessions = int(config["sessions"])
    seconds = float(config["warmup"]) + float(config["seconds"])
    ticks = schedule(config, seconds)
    start = float(load["start"])
    from_ack: list[float] = []
    from_send: list[float] = []
    call_ms: list[float] = []
    late: list[float] = []
    unseen = early = 0
    for t, due, began, acked in load["ticks"]:
        if due < start + warmup or not ticks[t]:
            continue
        call_ms.append((acked - began) * 1000)
        late.append(max(began - due, 0.0) * 1000)
        for n in ticks[t]:
            at = poller.seen(consumer, n % sessions, n // sessions)
            if at is None:
                unseen += 1
                continue
            if at < acked:
                early += 1
            from_ack.append(max(at - acked, 0.0) * 1000)
            from_send.append((at - began) * 1000)
    measured = [row for row in load["ticks"] if row[1] >= start + warmup]
    window = measured[-1][1] - measured[0][1] if len(measured) > 1 else 0.0
    return {
        "messages": len(from_ack) + unseen,
        "window_seconds": round(window, 2),
        "offered_msgs_per_s": round((len(from_ack) + unseen) / window, 1) if window else 0.0,
        "never_seen": unseen,
        "seen_before_ack": early,
        "delay_ms": distribution(from_ack),
        "delay_from_send_ms": distribution(from_send),
        "tick_call_ms": distribution(call_ms),
        "start_late_ms": distribution(late),
    }


# -- the case -----------------------------------------------------------------------------


def start_tracker_process(
    argv: list[str], env: dict[str, str], stderr_path: Path
) -> subprocess.Popen[bytes]:
    with open(stderr_path, "wb") as stderr:
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env=env, start_new_session=True,
        )  # fmt: skip


def wait_visible(
    poller: OffsetPoller,
    consumer: str,
    heads: dict[int, int],
    timeout: float,
    processes: list[subprocess.Popen[bytes]],
) -> float:
    started = time.monotonic()
    while not poller.all_seen(consumer, heads):
        for process in processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args!r} exited {process.returncode}")
        if time.monotonic() - started > timeout:
            missing = sum(1 for s, o in heads.items() if poller.seen(consumer, s, o) is None)
            raise TimeoutError(f"{missing} sessions' offsets of {consumer} not visible")
        time.sleep(0.05)
    return time.monotonic() - started


def last_offsets(config: dict[str, Any], seconds: float) -> dict[int, int]:
    """Each session's last offset sent (the primer's 0 for sessions beyond the last tick)."""
    sessions = int(config["sessions"])
    heads = dict.fromkeys(range(sessions), 0)
    for numbers in schedule(config, seconds):
        for n in numbers:
            heads[n % sessions] = n // sessions
    return heads


def run(
    args: argparse.Namespace, broker: TansuBroker, server: RedisServer, tmp: Path
) -> dict[str, Any]:
    started = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    topic = f"bench.wdelay.{run_id}"
    event_topic = f"bench.wdelay.events.{run_id}"
    ensure_topic(broker.bootstrap, topic, args.partitions, timeout=30)
    env = cli_env(
        TRACKER_KAFKA_BOOTSTRAP=broker.bootstrap,
        TRACKER_EVENT_TOPIC=event_topic,
        TRACKER_PARTITIONS=str(args.event_partitions),
        TRACKER_REDIS_URL=server.url,
        TRACKER_PREFIX=PREFIX,
        TRACKER_WORKER_SESSION_TIMEOUT_MS=GROUP_TIMEOUT_MS,
        TRACKER_WORKER_MAX_POLL_INTERVAL_MS=GROUP_TIMEOUT_MS,
    )
    data_dir = tmp / "data"
    config: dict[str, Any] = {
        "bootstrap": broker.bootstrap,
        "topic": topic,
        "event_topic": event_topic,
        "event_partitions": args.event_partitions,
        "redis_url": server.url,
        "data_dir": str(data_dir),
        "sessions": args.sessions,
        "rate": args.rate,
        "tick_ms": args.tick_ms,
        "warmup": args.warmup,
        "seconds": args.seconds,
        "threads": args.load_threads,
    }
    project_err, worker_err = tmp / "project.stderr", tmp / "worker.stderr"
    project = start_tracker_process(
        [*tracker_command(), "--data-dir", str(data_dir), "project"], env, project_err
    )
    worker_argv = [
        *tracker_command(), "--data-dir", str(data_dir), "worker", "--stream", topic,
        "--consumer", WORKER, "--flush-ms", str(args.flush_ms),
    ]  # fmt: skip
    worker = start_tracker_process(worker_argv, env, worker_err)
    processes = [project, worker]
    poller: OffsetPoller | None = None
    loads: list[Load] = []
    try:
        log(f"tracker project pid {project.pid}, tracker worker pid {worker.pid} started")
        poller = OffsetPoller(server.client(), args.sessions, [WORKER, DIRECT], args.poll_ms / 1000)
        poller.start()

        load = Load(config, tmp, "worker")
        loads.append(load)
        primed = wait_visible(poller, WORKER, dict.fromkeys(range(args.sessions), 0), 120,
                              processes)  # fmt: skip
        log(f"the primer is visible after {primed:.1f}s (both groups joined); the load starts")
        pids = {"tracker_worker": worker.pid, "tracker_project": project.pid,
                "broker": broker.pid, "redis_server": server.pid}  # fmt: skip
        cpu_before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
        ticks_before, wall_before = machine_busy_ticks(), time.monotonic()
        load.go()
        worker_load = load.result(timeout=args.warmup + args.seconds + 120)
        wall = time.monotonic() - wall_before
        cpu = {
            "wall_seconds": round(wall, 2),
            "busy_cpus": busy_between(ticks_before, machine_busy_ticks()),
            "cpu_seconds": {
                **{n: round(process_cpu_seconds(p) - cpu_before[n], 2) for n, p in pids.items()},
                "load_process": round(float(worker_load["cpu_seconds"]), 2),
            },
        }
        seconds = args.warmup + args.seconds
        drained = wait_visible(poller, WORKER, last_offsets(config, seconds), 60, processes)
        worker_result = delays(worker_load, config, poller, WORKER, args.warmup)
        d = worker_result["delay_ms"]
        log(
            f"worker: {worker_result['messages']} messages "
            f"({worker_result['offered_msgs_per_s']}/s), delay p50 {d.get('p50')} ms, "
            f"p99 {d.get('p99')} ms, max {d.get('max')} ms; drained {drained:.2f}s after the load"
        )

        direct_config = {**config, "seconds": args.direct_seconds}
        load = Load(direct_config, tmp, "direct")
        loads.append(load)
        wait_visible(poller, DIRECT, dict.fromkeys(range(args.sessions), 0), 60, processes)
        load.go()
        direct_load = load.result(timeout=args.warmup + args.direct_seconds + 120)
        seconds = args.warmup + args.direct_seconds
        wait_visible(poller, DIRECT, last_offsets(direct_config, seconds), 60, processes)
        direct_result = delays(direct_load, direct_config, poller, DIRECT, args.warmup)
        r = direct_result["delay_ms"]
        log(
            f"direct commit_many(wait=False): {direct_result['messages']} commits, delay p50 "
            f"{r.get('p50')} ms, p99 {r.get('p99')} ms, max {r.get('max')} ms"
        )
    finally:
        if poller is not None:
            poller.stop.set()
            poller.join(timeout=10)
        for load in loads:
            load.stop()
        stop_process(worker, grace=30)
        stop_process(project, grace=30)
        worker_log = worker_err.read_text(errors="replace").strip().splitlines()
        project_log = project_err.read_text(errors="replace").strip().splitlines()
        log(f"tracker worker exited {worker.returncode}; its stderr (tail):\n"
            + "\n".join(worker_log[-6:]))  # fmt: skip
        log(f"tracker project exited {project.returncode}; its stderr (tail):\n"
            + "\n".join(project_log[-4:]))  # fmt: skip

    p99 = float(d.get("p99", float("inf")))
    direct_p99 = float(r.get("p99", float("nan")))
    return {
        "bench": "worker_delay",
        "params": {
            "sessions": args.sessions,
            "rate_msgs_per_s": args.rate,
            "tick_ms": args.tick_ms,
            "warmup_seconds": args.warmup,
            "measured_seconds": args.seconds,
            "direct_seconds": args.direct_seconds,
            "partitions": args.partitions,
            "event_partitions": args.event_partitions,
            "worker": f"`tracker worker --stream TOPIC --consumer {WORKER} --flush-ms "
            f"{args.flush_ms}` (default handler, --flush-max 5000), group timeouts 6000 ms",
            "projector": "one `tracker project` process, default options",
            "message": "synthetic_messages (flux0 message events), keyed by session id",
            "producer": "KafkaProducer: acks=all, idempotent, linger_ms 20, flush() per tick",
            "poll_ms": args.poll_ms,
            "load_threads_direct": args.load_threads,
            "broker": broker.describe(),
            "redis": f"{server.version()} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            **kafka_client_versions(),
            "seed": args.seed,
        },
        "value": p99,
        "unit": "ms (p99 delay from a message acknowledged by the broker to its offset visible "
        "in Redis)",
        "target": TARGET_P99_MS,
        "meets_target": verdict(p99, TARGET_P99_MS, at_most=True),
        "ratio": round(p99 / direct_p99, 2) if direct_p99 > 0 else None,
        "ratio_of": "worker p99 / ceiling.direct p99 (lower is better)",
        "worker": {
            **worker_result,
            "worker_share_p50_ms": round(d["p50"] - r["p50"], 1) if d and r else None,
            "worker_share_is": "worker p50 - direct p50: the worker's reading, its flush "
            "interval and its flush, over the projector's own delay",
            "cpu_during_load": cpu,
            "primer_visible_after_seconds": round(primed, 2),
            "drained_after_load_seconds": round(drained, 2),
            "worker_stderr_tail": worker_log[-2:],
        },
        "poll": {
            "polls": poller.polls if poller else 0,
            "round_trip_mean_ms": round(
                poller.poll_seconds / max(poller.polls, 1) * 1000 if poller else 0.0, 3
            ),
            "resolution_is": "a delay includes up to poll_ms + one pipelined round trip",
            "generation_changes": poller.generation_changes if poller else 0,
        },
        "ceiling": {
            "direct": {
                "what": "commit_many(wait=False) of the same (session, offset) schedule from "
                "a separate process, tracker project running: the call's return to visible",
                **direct_result,
            }
        },
        "case_seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
        return
    p = parser("Produced-to-visible delay of a worker's offsets, Kafka mode.", repeat=1)
    p.add_argument("--sessions", type=int, default=200)
    p.add_argument("--rate", type=float, default=1000.0, help="messages per second")
    p.add_argument("--tick-ms", type=float, default=10.0, help="sends (or calls) every N ms")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds of load")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds of load not measured")
    p.add_argument("--direct-seconds", type=float, default=10.0, help="of the ceiling")
    p.add_argument("--partitions", type=int, default=6, help="of the stream topic")
    p.add_argument("--event-partitions", type=int, default=12, help="of the tracker's topic")
    p.add_argument("--flush-ms", type=int, default=200, help="tracker worker --flush-ms")
    p.add_argument("--load-threads", type=int, default=4, help="direct commit threads")
    p.add_argument("--poll-ms", type=float, default=5.0)
    args = p.parse_args()
    if args.repeat != 1:
        p.error("--repeat: this case runs once (about a minute); run it again for another sample")
    with (
        workdir(args.tmpdir, "worker-delay") as tmp,
        tansu_broker(tmp / "kafka") as broker,
        redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server,
    ):
        emit(run(args, broker, server, tmp))


if __name__ == "__main__":
    main()
