"""``Tracker.get_session`` latency over loopback TCP, against raw redis-py calls.

Setup (not timed): a private redis-server on 127.0.0.1 (AOF ``everysec`` unless
``--no-redis-aof``), ``--sessions`` sessions (titles of 20 to 80 characters) created with
``Tracker.import_events``, each committed by three consumers (``commit_many``).

Timed, one call at a time with ``perf_counter_ns``, after a warm-up: ``--gets`` random
``get_session`` calls per repeat. Ceilings, interleaved with them in blocks (so noise
hits all three alike), on a second connection with the same options as the tracker's
(``decode_responses=True``): ``HGETALL`` of the same session keys, and ``PING``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    CONSUMERS,
    Workload,
    emit,
    log,
    median,
    parser,
    percentile,
    profiled,
    redis_server,
    timed,
    workdir,
)
from tracker import Settings, Tracker
from tracker.keys import partition_for

TARGET_P50_US = 150.0
TARGET_P99_US = 1000.0
BLOCK = 1000
QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def sample(call: Callable[[str], object], keys: Sequence[str], out: list[float]) -> None:
    """Time ``call(key)`` for each key, in microseconds, appended to ``out``."""
    clock = time.perf_counter_ns
    for key in keys:
        started = clock()
        call(key)
        out.append((clock() - started) / 1000)


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
    with redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server:
        settings = Settings(
            data_dir=tmp / "data", redis_url=server.url, fsync=False, prefix="bench"
        )
        raw = redis.Redis.from_url(server.url, decode_responses=True)
        tracker = Tracker.open(settings=settings)
        try:
            seconds, _ = timed(lambda: tracker.import_events(workload.creates()))
            commits = [
                (sid, consumer, rng.randrange(1, 5000))
                for sid in workload.session_ids
                for consumer in CONSUMERS
            ]
            tracker.commit_many(commits)
            log(f"set up {args.sessions} sessions x {len(CONSUMERS)} consumers ({seconds:.2f}s)")
            sample_dto = tracker.get_session(workload.session_ids[0])
            assert sample_dto is not None and len(sample_dto.consumption_offsets) == len(CONSUMERS)
            keys_of = tracker.store.keys
            key = {
                sid: keys_of.session(partition_for(sid, keys_of.partitions), sid)
                for sid in workload.session_ids
            }
            assert raw.hgetall(key[workload.session_ids[0]])

            def ping(_: str) -> object:
                return raw.ping()

            def hgetall(sid: str) -> object:
                return raw.hgetall(key[sid])

            methods: dict[str, Callable[[str], object]] = {
                "get_session": tracker.get_session,
                "hgetall": hgetall,
                "ping": ping,
            }
            warm = [rng.choice(workload.session_ids) for _ in range(args.warmup)]
            for call in methods.values():
                sample(call, warm, [])
            passes: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
            for i in range(args.repeat):
                ids = [rng.choice(workload.session_ids) for _ in range(args.gets)]
                samples: dict[str, list[float]] = {name: [] for name in methods}
                for start in range(0, len(ids), BLOCK):
                    block = ids[start : start + BLOCK]
                    for name, call in methods.items():
                        sample(call, block, samples[name])
                for name, values in samples.items():
                    passes[name].append(summary(values))
                log(
                    f"pass {i + 1}/{args.repeat}: "
                    + "; ".join(
                        f"{name} p50 {p[-1]['p50']}us p99 {p[-1]['p99']}us max {p[-1]['max']}us"
                        for name, p in passes.items()
                    )
                )
            profile = (
                profiled(
                    lambda: [tracker.get_session(sid) for sid in ids[: args.gets]], args.profile
                )
                if args.profile
                else ""
            )
        finally:
            tracker.close()
            raw.close()
        version = server.version()
    if profile:
        log(f"cProfile of {args.gets} get_session calls:\n{profile}")
    got = combine(passes["get_session"])
    hget = combine(passes["hgetall"])
    ping_ = combine(passes["ping"])
    meets = got["p50"] <= TARGET_P50_US and got["p99"] <= TARGET_P99_US
    return {
        "bench": "get",
        "params": {
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "gets": args.gets,
            "warmup": args.warmup,
            "repeat": args.repeat,
            "interleave_block": BLOCK,
            "seed": args.seed,
            "redis": f"{version} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "titles": workload.describe_titles(),
        },
        "latency_us": got,
        "value": got["p50"],
        "unit": "us (p50)",
        "target": {"p50_us": TARGET_P50_US, "p99_us": TARGET_P99_US},
        "meets_target": meets,
        "ratio": round(hget["p50"] / got["p50"], 3),
        "ratio_of": "raw HGETALL p50 / get_session p50 (1.0 = no overhead over redis-py)",
        "python_overhead_us_p50": round(got["p50"] - hget["p50"], 1),
        "passes": passes["get_session"],
        "ceiling": {
            "hgetall": {"what": "redis-py HGETALL of the same session key", **hget},
            "ping": {"what": "redis-py PING, same connection options", **ping_},
        },
    }


def main() -> None:
    p = parser("Tracker.get_session latency over loopback TCP.")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--gets", type=int, default=20_000, help="timed gets per repeat")
    p.add_argument("--warmup", type=int, default=2_000)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile the gets once more, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "get") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
