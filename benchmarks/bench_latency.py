"""Single commands with ``wait=True``: ``create_session`` and ``commit`` latency, fsync on.

Setup (not timed): a tracker on a private Redis (TCP loopback; AOF ``everysec`` as the
embedded default unless ``--no-redis-aof``) and a file log with fsync (the default),
``--sessions`` sessions (titles of 20 to 80 characters), each committed by three consumers.

Timed, one call at a time with ``perf_counter_ns``, after a warm-up, ``--ops`` of each per
repeat, interleaved in blocks of ``BLOCK`` so that noise hits all alike:

* ``create_session(agent, user, title=...)``: a new id, a realistic title, ``wait=True``;
* ``commit(session, consumer, offset)``: ``strict=True``, ``wait=True``, on existing
  sessions, offsets as the workload makes them (mostly increasing, some stale or repeated);

and the floor they are compared against, in the same blocks:

* ``fsync``: write a 64-byte record to a file in the same temporary directory (on the
  same file system as the log) opened ``O_APPEND``, then ``os.fsync``;
* ``ping``: ``PING`` over the tracker's own Redis connection (redis-py, TCP loopback).

Target: each command's p50 <= fsync p50 + 2 x PING p50 + 100 us (a command reads the
session and merges its event: two round trips, and one fsync), computed from this run's
figures. Also reported, as a breakdown: ``append_one`` (``FileLog.append`` of one
record, fsync on, into another log in the same directory: the lock, the index refresh,
the write and the fsync) and ``hgetall`` of a session over the same connection.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (
    CONSUMERS,
    REALISTIC_TITLES,
    Workload,
    emit,
    log,
    median,
    parser,
    percentile,
    profiled,
    redis_server,
    timed,
    verdict,
    workdir,
)
from tracker import Settings, Tracker
from tracker.events import OffsetCommitted, encode_event, new_event_ids, utcnow
from tracker.keys import partition_for
from tracker.logs.file import FileLog

ALLOWANCE_US = 100.0
BLOCK = 100
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
RECORD = b"x" * 64

Op = Callable[[int], object]


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    result = {name: round(percentile(ordered, q), 1) for name, q in QUANTILES.items()}
    result["max"] = round(ordered[-1], 1)
    result["mean"] = round(sum(ordered) / len(ordered), 1)
    return result


def combine(passes: list[dict[str, float]]) -> dict[str, float]:
    """Median over passes of each figure; the max is the max over all."""
    out = {name: round(median([p[name] for p in passes]), 1) for name in (*QUANTILES, "mean")}
    out["max"] = max(p["max"] for p in passes)
    return out


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    rng = random.Random(args.seed + 1)
    total = args.ops * args.repeat + args.warmup
    titles = [REALISTIC_TITLES.make(rng) for _ in range(total)]
    owners = [(rng.choice(workload.agent_ids), rng.choice(workload.user_ids)) for _ in titles]
    with redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server:
        settings = Settings(data_dir=tmp / "data", redis_url=server.url, prefix="bench")
        assert settings.fsync, "the default persistence: fsync on"
        tracker = Tracker.open(settings=settings)
        other_log = FileLog(tmp / "append-one-log", fsync=True)
        fsync_fd = os.open(tmp / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            seconds, _ = timed(lambda: tracker.import_events(workload.creates()))
            tracker.commit_many(
                [(sid, c, 1) for sid in workload.session_ids for c in CONSUMERS], wait=True
            )
            log(f"set up {args.sessions} sessions x {len(CONSUMERS)} consumers ({seconds:.2f}s)")
            commits = workload.commits(total)
            client = tracker.client
            keys = tracker.store.keys
            session_keys = [
                keys.session(partition_for(sid, keys.partitions), sid) for sid, _, _ in commits
            ]
            (event_id,) = new_event_ids(1)
            record = encode_event(
                OffsetCommitted(
                    session_id=workload.session_ids[0],
                    consumer="client",
                    offset=1,
                    event_id=event_id,
                    recorded_at=utcnow(),
                )
            )

            def create(i: int) -> object:
                agent, user = owners[i]
                return tracker.create_session(agent, user, title=titles[i])

            def commit(i: int) -> object:
                sid, consumer, offset = commits[i]
                return tracker.commit(sid, consumer, offset)

            def fsync(_: int) -> object:
                os.write(fsync_fd, RECORD)
                os.fsync(fsync_fd)
                return None

            def ping(_: int) -> object:
                return client.ping()

            def append_one(_: int) -> object:
                return other_log.append(0, [record])

            def hgetall(i: int) -> object:
                return client.hgetall(session_keys[i])

            ops: dict[str, Op] = {
                "create_session": create,
                "commit": commit,
                "fsync": fsync,
                "ping": ping,
                "append_one": append_one,
                "hgetall": hgetall,
            }
            clock = time.perf_counter_ns
            for op in ops.values():  # warm-up
                for i in range(args.warmup):
                    op(i)
            passes: dict[str, list[dict[str, float]]] = {name: [] for name in ops}
            bounds: list[float] = []
            index = args.warmup
            for r in range(args.repeat):
                samples: dict[str, list[float]] = {name: [] for name in ops}
                for start in range(0, args.ops, BLOCK):
                    block = range(index + start, index + min(start + BLOCK, args.ops))
                    for name, op in ops.items():
                        out = samples[name]
                        for i in block:
                            t0 = clock()
                            op(i)
                            out.append((clock() - t0) / 1000)
                index += args.ops
                for name, values in samples.items():
                    passes[name].append(summary(values))
                bound = passes["fsync"][-1]["p50"] + 2 * passes["ping"][-1]["p50"] + ALLOWANCE_US
                bounds.append(bound)
                log(
                    f"pass {r + 1}/{args.repeat}: bound {bound:.0f}us; "
                    + "; ".join(
                        f"{name} p50 {p[-1]['p50']}us p99 {p[-1]['p99']}us"
                        for name, p in passes.items()
                    )
                )
            profile = ""
            if args.profile:
                extra = range(args.warmup)
                profile = profiled(lambda: [(create(i), commit(i)) for i in extra], args.profile)
        finally:
            os.close(fsync_fd)
            other_log.close()
            tracker.close()
        version = server.version()
    if profile:
        log(f"cProfile of {args.warmup} create_session + commit pairs:\n{profile}")
    figures = {name: combine(p) for name, p in passes.items()}
    fsync_p50, ping_p50 = figures["fsync"]["p50"], figures["ping"]["p50"]
    bound = round(fsync_p50 + 2 * ping_p50 + ALLOWANCE_US, 1)
    met = {
        name: verdict(figures[name]["p50"], bound, at_most=True)
        for name in ("create_session", "commit")
    }
    worst = max(figures["create_session"]["p50"], figures["commit"]["p50"])
    return {
        "bench": "latency",
        "params": {
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "ops": args.ops,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "interleave_block": BLOCK,
            "seed": args.seed,
            "fsync": True,
            "wait": True,
            "commit_strict": True,
            "redis": f"{version} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "titles": REALISTIC_TITLES.describe(titles),
        },
        "value": worst,
        "unit": "us (p50 of the slower command)",
        "target": {
            "p50_at_most_us": bound,
            "is": f"fsync p50 {fsync_p50} + 2 x PING p50 {ping_p50} + {ALLOWANCE_US:g} us",
        },
        "meets_target": all(met.values()),
        "met": met,
        "margin_us": {
            name: round(bound - figures[name]["p50"], 1) for name in ("create_session", "commit")
        },
        "latency_us": {"create_session": figures["create_session"], "commit": figures["commit"]},
        "bound_per_pass_us": [round(b, 1) for b in bounds],
        "passes": {name: passes[name] for name in ("create_session", "commit")},
        "ratio": round(bound / worst, 3),
        "ratio_of": "bound / p50 of the slower command (>= 1.0: met)",
        "ceiling": {
            "fsync": {"what": "os.write of 64 bytes (O_APPEND) + os.fsync", **figures["fsync"]},
            "ping": {"what": "PING over the tracker's own connection", **figures["ping"]},
            "append_one": {
                "what": "FileLog.append of one record (lock, refresh, write, fsync)",
                **figures["append_one"],
            },
            "hgetall": {
                "what": "HGETALL of a session over the tracker's connection",
                **figures["hgetall"],
            },
        },
    }


def main() -> None:
    p = parser("create_session and commit latency with wait=True, fsync on.")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--ops", type=int, default=5_000, help="timed calls of each kind per repeat")
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile --warmup more pairs, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "latency") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
