"""``Tracker.commit_many(wait=False)``: the acknowledged rate, and the rate until visible.

Setup (not timed), as ``bench_commit``: a tracker on a private Redis (TCP loopback; AOF
``everysec`` as the embedded default unless ``--no-redis-aof``) and a file log (fsync on
unless ``--no-fsync``), ``--sessions`` sessions with titles of 20 to 80 characters.

Timed, per repeat: ``--commits`` ``(session_id, consumer, offset)`` tuples (three
consumers, mostly increasing, some stale or repeated) sent as ``commit_many(call,
wait=False)`` calls of ``--per-call`` commits (a worker's flush). Each call returns once
the log has acknowledged its append (one fsync); the tracker's background thread
projects into Redis meanwhile. Then ``Tracker.wait_for(last position)``. Two rates:

* ``acknowledged``: commits / seconds from the first call to the return of the last one
  (the headline). On its own it could hide a backlog that grows without bound, so:
* ``visible``: commits / seconds from the first call until the last position is visible
  (the drain included); ``drain_seconds`` and ``backlog_at_last_ack`` (records appended
  but not applied yet when the last call returned) say how far the projection lagged.

Ceilings, in the same run, right after each repeat, on the same calls:

* ``encode_append``: build the same events + msgspec encode + ``FileLog.append`` (same
  fsync, same call size) into another log, no Redis and no background thread; the ratio
  is the acknowledged rate over this one;
* ``writer_alone``: ``Writer.commit_many`` into another log (validation + build +
  encode + append): everything the calling thread does, without the projector's thread
  competing for the GIL.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    Workload,
    chunks,
    emit,
    log,
    median,
    parser,
    percentile,
    positive_ints,
    rate_summary,
    redis_server,
    timed,
    verdict,
    workdir,
)
from benchmarks.bench_commit import Commit, encode_append, redis_cpu
from tracker import Settings, Tracker
from tracker.logs.file import FileLog
from tracker.writer import Writer

TARGET = 400_000.0


def commit_async(tracker: Tracker, calls: Sequence[Sequence[Commit]]) -> dict[str, Any]:
    """All calls with ``wait=False``, then ``wait_for`` the last position; times of each part."""
    each: list[float] = []
    last = None
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        last = tracker.commit_many(call, wait=False).last
        each.append(time.perf_counter() - t0)
    acknowledged = time.perf_counter()
    assert last is not None
    applied = tracker.applied_position(last.partition)
    backlog = tracker.writer.log.count(last.partition, applied)
    before_wait = time.perf_counter()
    tracker.wait_for(last, timeout=600)
    visible = time.perf_counter()
    return {
        "acknowledged_seconds": acknowledged - started,
        "visible_seconds": visible - started,
        "drain_seconds": visible - before_wait,
        "backlog_at_last_ack": backlog,
        "call_seconds": each,
    }


def writer_alone(writer: Writer, calls: Sequence[Sequence[Commit]]) -> float:
    started = time.perf_counter()
    for call in calls:
        writer.commit_many(call)
    return time.perf_counter() - started


def profile_both_threads(tracker: Tracker, run: Callable[[], object], top: int) -> str:
    """cProfile of ``run`` in this thread and, at the same time, of the projector's thread.

    Diagnostic only (outside the timed runs): the background thread's ``catch_up`` is
    wrapped on this tracker instance so that a second profiler records it.
    """
    mine, theirs = cProfile.Profile(), cProfile.Profile()
    original = tracker.projector.catch_up

    def catch_up(progress: Callable[[int], None] | None = None) -> int:
        theirs.enable()
        try:
            return original(progress)
        finally:
            theirs.disable()

    setattr(tracker.projector, "catch_up", catch_up)  # noqa: B010
    try:
        mine.enable()
        run()
        mine.disable()
    finally:
        setattr(tracker.projector, "catch_up", original)  # noqa: B010
    out = io.StringIO()
    for name, profile in (("calling thread", mine), ("background projector thread", theirs)):
        out.write(f"\n===== {name} =====\n")
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    n, per_call = args.commits, args.per_call
    with redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server:
        settings = Settings(
            data_dir=tmp / "data", redis_url=server.url, fsync=args.fsync, prefix="bench"
        )
        client: redis.Redis = server.client()
        tracker = Tracker.open(settings=settings)
        ceiling_log = FileLog(tmp / "ceiling-log", fsync=args.fsync)
        writer_log = FileLog(tmp / "writer-log", fsync=args.fsync)
        writer = Writer(writer_log)
        runs: list[dict[str, Any]] = []
        ceilings: list[dict[str, float]] = []
        writer_s: list[float] = []
        server_cpu: list[float] = []
        merge_calls: list[int] = []
        ratios: list[float] = []
        profile = ""
        try:
            seconds, _ = timed(lambda: tracker.import_events(workload.creates()))
            log(f"created {args.sessions} sessions in {seconds:.2f}s (import_events)")
            tracker.commit_many(workload.commits(min(n, per_call)), wait=True)  # warm-up
            for i in range(args.repeat):
                calls = chunks(workload.commits(n), per_call)
                cpu = redis_cpu(client)
                calls_before = tracker.store.calls
                result = commit_async(tracker, calls)
                server_cpu.append(redis_cpu(client) - cpu)
                merge_calls.append(tracker.store.calls - calls_before)
                runs.append(result)
                ack, vis = result["acknowledged_seconds"], result["visible_seconds"]
                log(
                    f"commit_many(wait=False) x{len(calls)} of {per_call}: acknowledged in "
                    f"{ack:.3f}s ({n / ack:,.0f}/s), visible in {vis:.3f}s ({n / vis:,.0f}/s; "
                    f"drain {result['drain_seconds']:.3f}s, backlog at the last ack "
                    f"{result['backlog_at_last_ack']} records); redis-server CPU "
                    f"{server_cpu[-1]:.3f}s  [{i + 1}/{args.repeat}]"
                )
                ceiling = encode_append(ceiling_log, calls)
                ceilings.append(ceiling)
                writer_s.append(writer_alone(writer, calls))
                ratios.append(ceiling["seconds"] / ack)
                log(
                    f"  ceiling encode+append {ceiling['seconds']:.3f}s "
                    f"({n / ceiling['seconds']:,.0f}/s): build {ceiling['build_events']:.3f}s, "
                    f"encode {ceiling['encode']:.3f}s, append {ceiling['append']:.3f}s; "
                    f"Writer.commit_many alone {writer_s[-1]:.3f}s ({n / writer_s[-1]:,.0f}/s)"
                )
                del calls
            if args.profile:
                calls = chunks(workload.commits(n), per_call)

                def profiled_run() -> None:
                    last = None
                    for call in calls:
                        last = tracker.commit_many(call, wait=False).last
                    assert last is not None
                    tracker.wait_for(last, timeout=600)

                profile = profile_both_threads(tracker, profiled_run, args.profile)
        finally:
            ceiling_log.close()
            writer_log.close()
            tracker.close()
            client.close()
        alive = server.process.poll() is None
        version = server.version() if alive else "?"
        rewrites = server.aof_rewrites() if alive else -1
    if profile:
        log(f"cProfile of {n} commits in calls of {per_call}, wait=False, then wait_for:{profile}")
    acknowledged = rate_summary(n, [r["acknowledged_seconds"] for r in runs])
    visible = rate_summary(n, [r["visible_seconds"] for r in runs])
    ordered = sorted(s for r in runs for s in r["call_seconds"])
    rate = float(acknowledged["median_rate"])

    def stage(name: str) -> float:
        return round(median([c[name] for c in ceilings]), 4)

    return {
        "bench": "commit_async",
        "params": {
            "commits": n,
            "sessions": args.sessions,
            "per_call": per_call,
            "fsync": args.fsync,
            "strict": False,
            "wait": False,
            "repeat": args.repeat,
            "seed": args.seed,
            "redis": f"{version} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "redis_aof_rewrites": rewrites,
            "titles": workload.describe_titles(),
            "gc": "as the product runs it (no gc.freeze, no gc.disable)",
        },
        "seconds": acknowledged["seconds"],
        "median_rate": rate,
        "value": rate,
        "unit": "commits/s acknowledged",
        "target": TARGET,
        "meets_target": verdict(rate, TARGET),
        "acknowledged": {
            "what": "first call to the return of the last commit_many(wait=False)",
            **acknowledged,
            "unit": "commits/s",
        },
        "visible": {
            "what": "first call until wait_for(last position) returns: the drain included",
            **visible,
            "unit": "commits/s",
            "drain_seconds": [round(r["drain_seconds"], 4) for r in runs],
            "backlog_at_last_ack": [int(r["backlog_at_last_ack"]) for r in runs],
        },
        "ratio": round(median(ratios), 3),
        "ratio_of": "acknowledged rate / ceiling.encode_append rate (median of per-repeat ratios)",
        "call_ms": {
            "p50": round(percentile(ordered, 0.5) * 1e3, 3),
            "p99": round(percentile(ordered, 0.99) * 1e3, 3),
            "max": round(ordered[-1] * 1e3, 3),
        },
        "redis_server_cpu_seconds": round(median(server_cpu), 4),
        "projection_redis_calls": int(median(merge_calls)),
        "ceiling": {
            "encode_append": {
                "what": "build the same events + msgspec encode + FileLog.append "
                f"(fsync={args.fsync}), {per_call} per append, no Redis, no background thread",
                **rate_summary(n, [c["seconds"] for c in ceilings]),
                "unit": "commits/s",
                "stages_seconds": {
                    "build_events": stage("build_events"),
                    "encode": stage("encode"),
                    "append": stage("append"),
                },
            },
            "writer_alone": {
                "what": "Writer.commit_many (validate + build + encode + FileLog.append) into "
                "another log: the calling thread's work without the projector thread",
                **rate_summary(n, writer_s),
                "unit": "commits/s",
            },
        },
    }


def main() -> None:
    p = parser("Tracker.commit_many(wait=False): acknowledged and visible rates (fsync on).")
    p.add_argument("--commits", type=int, default=1_000_000, help="commits per repeat")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument(
        "--per-call",
        type=lambda text: positive_ints(text)[0],
        default=10_000,
        help="commits per commit_many call",
    )
    p.add_argument("--fsync", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one more run (calling thread and projector thread), top N",
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "commit-async") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
