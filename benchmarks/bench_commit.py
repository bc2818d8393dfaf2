"""``Tracker.commit_many(wait=True)`` throughput over existing sessions, fsync on by default.

Setup (not timed): a tracker on a private Redis (TCP loopback; AOF ``everysec`` as the
embedded default unless ``--no-redis-aof``) and a file log, with ``--sessions`` sessions
(realistic titles of 20 to 80 characters) created through ``Tracker.import_events``.

Timed: ``--commits`` ``(session_id, consumer, offset)`` tuples (three consumers, mostly
increasing offsets, some stale or repeated) sent as ``commit_many(..., wait=True)`` calls
of ``--per-call`` commits each (the first size is the headline, repeated ``--repeat``
times; the others ``--repeat-others`` times). Each call appends to the log (one fsync)
and projects before it returns, so its effect is visible then. The heap is left to the
garbage collector as the product leaves it. ``bench_commit_async`` measures ``wait=False``.

Ceilings, in the same run, interleaved with the tracker's repeats:

* ``encode_append``: the same tuples made into the same events, encoded with msgspec and
  appended with ``FileLog.append`` (same fsync setting, same call size), no Redis; the
  ratio is the commit rate over this one;
* ``encode``: msgspec encoding of the already built events alone;
* ``projection``: ``fold_batch`` + ``SnapshotStore.merge`` of each call's events into
  another generation (no log, no validation), with the redis-server's CPU time: what
  catching the projection up costs on its own (once per call size, on the first
  ``PROJECTION_COMMITS`` commits).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    Workload,
    chunks,
    commit_events,
    emit,
    log,
    median,
    parser,
    percentile,
    positive_ints,
    profiled,
    rate_summary,
    redis_server,
    timed,
    verdict,
    workdir,
)
from tracker import Settings, Tracker
from tracker.events import encode_event
from tracker.fold import fold_batch
from tracker.keys import Keys
from tracker.logs.file import FileLog
from tracker.snapshots import SnapshotStore

TARGET = 200_000.0
PROJECTION_COMMITS = 200_000
"""The projection ceiling runs on the first calls holding about this many commits."""

Commit = tuple[str, str, int]


def redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def commit_all(tracker: Tracker, calls: Sequence[Sequence[Commit]]) -> tuple[float, list[float]]:
    """Seconds for all calls, and the seconds of each call."""
    each: list[float] = []
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        tracker.commit_many(call, wait=True)
        each.append(time.perf_counter() - t0)
    return time.perf_counter() - started, each


def encode_append(file_log: FileLog, calls: Sequence[Sequence[Commit]]) -> dict[str, float]:
    """The log-only path per call: build the events, encode, append (and fsync), by stage."""
    build = encode = append = 0.0
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        events = commit_events(call, datetime.now(UTC))
        t1 = time.perf_counter()
        records = list(map(encode_event, events))
        t2 = time.perf_counter()
        file_log.append(0, records)
        t3 = time.perf_counter()
        build, encode, append = build + t1 - t0, encode + t2 - t1, append + t3 - t2
    return {
        "seconds": time.perf_counter() - started,
        "build_events": build,
        "encode": encode,
        "append": append,
    }


def fold_merge(
    client: redis.Redis, workload: Workload, calls: Sequence[Sequence[Commit]]
) -> dict[str, float]:
    """The projection part alone: fold_batch each call's events and merge them into Redis.

    Into a fresh generation of another prefix (in ``client``'s database) where the
    sessions were created first, as in the tracker's; events are built before timing.
    """
    store = SnapshotStore(client, Keys("ceiling", 1, 1))
    creates = fold_batch(workload.creates())
    store.merge(0, list(creates.values()), after="", upto="0:0:0")
    events = [commit_events(call, datetime.now(UTC)) for call in calls]
    fold = merge = 0.0
    sessions = 0
    token = "0:0:0"
    cpu = redis_cpu(client)
    started = time.perf_counter()
    for number, batch in enumerate(events, start=1):
        t0 = time.perf_counter()
        deltas = list(fold_batch(batch).values())
        t1 = time.perf_counter()
        upto = f"0:{number}:0"
        store.merge(0, deltas, after=token, upto=upto)
        t2 = time.perf_counter()
        token = upto
        fold, merge, sessions = fold + t1 - t0, merge + t2 - t1, sessions + len(deltas)
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "fold_batch": fold,
        "merge": merge,
        "redis_server_cpu": redis_cpu(client) - cpu,
        "session_merges": sessions,
    }


def measure_size(
    args: argparse.Namespace,
    tracker: Tracker,
    workload: Workload,
    ceiling_log: FileLog,
    client: redis.Redis,
    ceiling_client: redis.Redis,
    per_call: int,
    repeat: int,
) -> dict[str, Any]:
    n = args.commits
    walls: list[float] = []
    call_seconds: list[float] = []
    server_cpu: list[float] = []
    ceilings: list[dict[str, float]] = []
    encode_s: list[float] = []
    projections: list[dict[str, float]] = []
    ratios: list[float] = []
    for i in range(repeat):
        commits = workload.commits(n)
        calls = chunks(commits, per_call)
        cpu = redis_cpu(client)
        wall, each = commit_all(tracker, calls)
        server_cpu.append(redis_cpu(client) - cpu)
        walls.append(wall)
        call_seconds.extend(each)
        log(
            f"commit_many x{len(calls)} of {per_call}: {wall:.3f}s ({n / wall:,.0f}/s), "
            f"redis-server CPU {server_cpu[-1]:.3f}s  [{i + 1}/{repeat}]"
        )
        ceiling = encode_append(ceiling_log, calls)
        ceilings.append(ceiling)
        ratios.append((n / wall) / (n / ceiling["seconds"]))
        events = commit_events(commits, datetime.now(UTC))
        seconds, _ = timed(lambda events=events: list(map(encode_event, events)))  # type: ignore[misc]
        encode_s.append(seconds)
        del events
        log(
            f"  ceiling encode+append {ceiling['seconds']:.3f}s "
            f"({n / ceiling['seconds']:,.0f}/s): build {ceiling['build_events']:.3f}s, "
            f"encode {ceiling['encode']:.3f}s, append {ceiling['append']:.3f}s; "
            f"encode alone {seconds:.3f}s"
        )
        if i == 0:  # the slowest ceiling: once per call size, on the first calls
            subset = calls[: max(1, PROJECTION_COMMITS // per_call)]
            projection = fold_merge(ceiling_client, workload, subset)
            projection["commits"] = sum(map(len, subset))
            ceiling_client.flushdb()
            projections.append(projection)
            log(
                f"  projection alone {projection['seconds']:.3f}s: fold_batch "
                f"{projection['fold_batch']:.3f}s, merge {projection['merge']:.3f}s "
                f"({int(projection['session_merges'])} session merges, redis-server CPU "
                f"{projection['redis_server_cpu']:.3f}s)"
            )
        del commits, calls
    ordered = sorted(call_seconds)
    summary = rate_summary(n, walls)

    def stage(name: str) -> float:
        return round(median([c[name] for c in ceilings]), 4)

    def projected(name: str) -> float:
        return round(median([p[name] for p in projections]), 4)

    return {
        "per_call": per_call,
        "calls_per_repeat": -(-n // per_call),
        "repeat": repeat,
        **summary,
        "ratio": round(median(ratios), 3),
        "call_ms": {
            "p50": round(percentile(ordered, 0.5) * 1e3, 3),
            "p99": round(percentile(ordered, 0.99) * 1e3, 3),
            "max": round(ordered[-1] * 1e3, 3),
        },
        "redis_server_cpu_seconds": round(median(server_cpu), 4),
        "ceiling": {
            "encode_append": {
                "what": "build the same events + msgspec encode + FileLog.append "
                f"(fsync={args.fsync}), {per_call} per append, no Redis",
                **rate_summary(n, [c["seconds"] for c in ceilings]),
                "unit": "commits/s",
                "stages_seconds": {
                    "build_events": stage("build_events"),
                    "encode": stage("encode"),
                    "append": stage("append"),
                },
            },
            "encode": {
                "what": "msgspec msgpack encode of the built events alone",
                **rate_summary(n, encode_s),
                "unit": "commits/s",
            },
            "projection": {
                "what": "fold_batch + SnapshotStore.merge of each call's events (no log, "
                "no validation): the projection part of commit_many alone, on the first "
                f"{int(projected('commits'))} commits",
                **rate_summary(int(projected("commits")), [p["seconds"] for p in projections]),
                "unit": "commits/s",
                "stages_seconds": {
                    "fold_batch": projected("fold_batch"),
                    "merge": projected("merge"),
                    "redis_server_cpu": projected("redis_server_cpu"),
                },
                "session_merges": int(projected("session_merges")),
                "redis_cpu_us_per_session_merge": round(
                    projected("redis_server_cpu") / projected("session_merges") * 1e6, 2
                ),
            },
        },
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    with redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server:
        settings = Settings(
            data_dir=tmp / "data", redis_url=server.url, fsync=args.fsync, prefix="bench"
        )
        client = server.client()
        ceiling_client = server.client(db=1)
        tracker = Tracker.open(settings=settings)
        ceiling_log = FileLog(tmp / "ceiling-log", fsync=args.fsync)
        try:
            seconds, _ = timed(lambda: tracker.import_events(workload.creates()))
            log(f"created {args.sessions} sessions in {seconds:.2f}s (import_events)")
            tracker.commit_many(workload.commits(min(args.commits, 10_000)))  # warm-up
            sizes = [
                measure_size(args, tracker, workload, ceiling_log, client, ceiling_client, size,
                             args.repeat if i == 0 else args.repeat_others)
                for i, size in enumerate(args.per_call)
            ]  # fmt: skip
            profile = ""
            if args.profile:  # the workload is generated first, outside the profile
                calls = chunks(workload.commits(args.commits), args.per_call[0])
                profile = profiled(
                    lambda: [tracker.commit_many(call, wait=True) for call in calls], args.profile
                )
        finally:
            ceiling_log.close()
            tracker.close()
            client.close()
            ceiling_client.close()
        alive = server.process.poll() is None
        version = server.version() if alive else "?"
        rewrites = server.aof_rewrites() if alive else -1
    if profile:
        log(f"cProfile of {args.commits} commits in calls of {args.per_call[0]}:\n{profile}")
    head = sizes[0]
    rate = float(head["median_rate"])
    return {
        "bench": "commit",
        "params": {
            "commits": args.commits,
            "sessions": args.sessions,
            "per_call": args.per_call,
            "fsync": args.fsync,
            "strict": False,
            "repeat": args.repeat,
            "repeat_others": args.repeat_others,
            "seed": args.seed,
            "redis": f"{version} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "redis_aof_rewrites": rewrites,
            "titles": workload.describe_titles(),
            "wait": True,
            "gc": "as the product runs it (no gc.freeze, no gc.disable)",
        },
        "seconds": head["seconds"],
        "median_rate": rate,
        "value": rate,
        "unit": "commits/s",
        "target": TARGET,
        "meets_target": verdict(rate, TARGET),
        "ratio": head["ratio"],
        "ratio_of": "commit rate / ceiling.encode_append rate (median of per-repeat ratios), "
        f"{args.per_call[0]} per call",
        "ceiling": head["ceiling"],
        "by_call_size": sizes,
    }


def main() -> None:
    p = parser("Tracker.commit_many(wait=True) throughput (fsync on by default).")
    p.add_argument("--commits", type=int, default=1_000_000, help="commits per repeat")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument(
        "--per-call",
        type=positive_ints,
        default=[10_000, 100_000],
        help="commits per commit_many call, comma-separated (the first is the headline)",
    )
    p.add_argument("--repeat-others", type=int, default=1, help="repeats of the other call sizes")
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one more run, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "commit") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
