"""Full replay of a file log into an empty Redis, through ``Tracker.replay()``.

Setup (not timed): a file log of ``--events`` records over ``--sessions`` sessions (the
creates, then commits of three consumers, mostly increasing with some stale or repeated
offsets), appended in batches of ``--batch`` through ``FileLog`` with ``encode_validated``.
``Tracker.open`` then catches up on open (reported, not the headline).

Timed: ``Tracker.replay()``, wall time of the call (which also drops the previous
generation and counts the sessions); the report's own ``seconds`` is given too.

Ceilings, measured in the same run, interleaved with the replays (one of each per repeat,
on a copy of the log, so noise hits both alike):

* ``python``: read + CRC + decode + ``fold_batch`` of the log, no Redis, batch by batch
  as the projector reads it; the headline ratio is the replay rate over this one;
* ``decode``: the decode stage of the above alone (msgspec msgpack into the event union);
* ``redis_hset``: pipelined HSET of one 8-field hash per final session snapshot;
* ``merge_only``: ``SnapshotStore.merge`` of the replay's pre-folded deltas into a fresh
  generation (wire encoding + EVALSHA + Redis): the projector minus read, decode, fold.

The redis-server's CPU time (``INFO cpu``) around each replay says how much of it Redis
itself spent.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    CONSUMERS,
    RedisServer,
    Workload,
    build_log,
    emit,
    log,
    median,
    parser,
    profiled,
    rate_summary,
    redis_server,
    rounded,
    timed,
    verdict,
    workdir,
)
from tracker import Settings, Tracker
from tracker.events import Position, decode_event_lean
from tracker.fold import BatchFolder, Delta
from tracker.keys import Keys
from tracker.logs.file import FileLog
from tracker.model import format_datetime
from tracker.projector import BATCH_RECORDS, MAX_SESSIONS, READ_RECORDS, decode_batches
from tracker.snapshots import SnapshotStore

TARGET = 500_000.0
HSET_PIPELINE = 1000
CEILING_DB = 1

Plan = list[tuple[str, str, list[Delta]]]


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds the redis-server process has used so far (user + system)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def evalsha_usec(client: redis.Redis) -> int:
    """Microseconds spent in EVALSHA since the last ``CONFIG RESETSTAT``."""
    stats = client.info("commandstats").get("cmdstat_evalsha")
    return int(stats["usec"]) if stats else 0


def python_side(log_dir: Path) -> tuple[dict[str, float], Plan]:
    """Read + CRC + decode + fold_batch of the whole log as the projector does, per stage.

    Batches as ``Projector`` makes them: pieces of ``READ_RECORDS`` folded into one set of
    deltas until ``BATCH_RECORDS`` records or ``MAX_SESSIONS`` sessions. Also returns, per
    batch, (after token, upto token, deltas): the merge plan.
    """
    read_s = decode_s = fold_s = 0.0
    events = merges = 0
    plan: Plan = []
    with FileLog(log_dir, fsync=False) as file_log:
        started = time.perf_counter()
        after: Position | None = None
        while True:
            start = after
            folder = BatchFolder()
            read = 0
            while read < BATCH_RECORDS and folder.size < MAX_SESSIONS:
                t0 = time.perf_counter()
                batches = file_log.read(0, after, min(READ_RECORDS, BATCH_RECORDS - read))
                t1 = time.perf_counter()
                read_s += t1 - t0
                if not batches:
                    break
                decoded = decode_batches(batches, decode_event_lean)
                t2 = time.perf_counter()
                folder.add(decoded)
                t3 = time.perf_counter()
                decode_s, fold_s = decode_s + t2 - t1, fold_s + t3 - t2
                read += len(decoded)
                after = batches[-1].last
            if not read or after is None:
                break
            t0 = time.perf_counter()
            deltas = folder.finish()
            fold_s += time.perf_counter() - t0
            events += read
            merges += len(deltas)
            plan.append((start.token() if start else "", after.token(), list(deltas.values())))
        total = time.perf_counter() - started
    stages = {
        "seconds": total,
        "read_crc": read_s,
        "decode": decode_s,
        "fold_batch": fold_s,
        "events": events,
        "session_merges": merges,
        "batches": len(plan),
    }
    return stages, plan


def snapshot_mappings(plan: Plan) -> list[tuple[str, dict[str, str]]]:
    """Final snapshot of every session as an 8-field hash: i, a, u, c, pos, three offsets."""
    final: dict[str, dict[str, str]] = {}
    for _, upto, deltas in plan:
        for delta in deltas:
            mapping = final.setdefault(delta.session_id, {"i": delta.session_id})
            mapping["pos"] = upto
            create = delta.create
            if create is not None and "c" not in mapping:
                mapping.update(
                    a=create.agent_id, u=create.user_id, c=format_datetime(create.created_at)
                )
            for consumer, change in delta.offsets.items():
                value = max(change.at_least, change.reset_to, int(mapping.get("o:" + consumer, -1)))
                mapping["o:" + consumer] = str(value)
    return list(final.items())


def hset_pipelined(client: redis.Redis, items: list[tuple[str, dict[str, str]]]) -> float:
    started = time.perf_counter()
    pipe = client.pipeline(transaction=False)
    for sid, mapping in items:
        pipe.hset(f"hset:{sid}", mapping=mapping)  # type: ignore[arg-type]
        if len(pipe) >= HSET_PIPELINE:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - started


def merge_only(client: redis.Redis, plan: Plan) -> tuple[float, int]:
    """Merge pre-folded deltas into a fresh generation; (seconds, Redis calls)."""
    store = SnapshotStore(client, Keys("merge", 1, 1))
    started = time.perf_counter()
    for after, upto, deltas in plan:
        store.merge(0, deltas, after=after, upto=upto)
    return time.perf_counter() - started, store.calls


def run(args: argparse.Namespace, server: RedisServer, tmp: Path) -> dict[str, Any]:
    workload = Workload(args.seed, args.sessions)
    data_dir = tmp / "data"
    log_dir = data_dir / "log"
    log(f"building a log of {args.events} events over {args.sessions} sessions ...")
    records, build_s = build_log(log_dir, workload, args.events - args.sessions, batch=args.batch)
    copy_dir = tmp / "copy"
    shutil.copytree(log_dir, copy_dir)
    log(f"built {records} records in {build_s:.1f}s ({log_dir}, copied for the ceilings)")

    client = server.client()
    ceiling_client = server.client(db=CEILING_DB)
    settings = Settings(data_dir=data_dir, redis_url=server.url, fsync=False, prefix="bench")
    open_s, tracker = timed(lambda: Tracker.open(settings=settings))
    log(f"Tracker.open (catches up on open) took {open_s:.2f}s")

    walls: list[float] = []
    reported: list[float] = []
    calls: list[int] = []
    server_cpu: list[float] = []
    evalsha: list[float] = []
    stages: list[dict[str, float]] = []
    hset_s: list[float] = []
    merge_s: list[float] = []
    merge_cpu: list[float] = []
    ratios: list[float] = []
    replayed = sessions = merge_calls = 0
    snapshots: list[tuple[str, dict[str, str]]] = []
    profile = ""
    try:
        for i in range(args.repeat):
            client.config_resetstat()
            cpu = redis_cpu(client)
            wall, report = timed(tracker.replay)
            busy = redis_cpu(client) - cpu
            walls.append(wall)
            reported.append(report.seconds)
            calls.append(report.redis_calls)
            server_cpu.append(busy)
            evalsha.append(evalsha_usec(client) / 1e6)
            replayed, sessions = report.events, report.sessions
            log(
                f"replay {i + 1}/{args.repeat}: {report.events} events, {report.sessions} "
                f"sessions, {wall:.3f}s wall ({report.events / wall:,.0f}/s), report "
                f"{report.seconds:.3f}s, {report.redis_calls} Redis calls; redis-server CPU "
                f"{busy:.3f}s (EVALSHA {evalsha[-1]:.3f}s)"
            )

            py, plan = python_side(copy_dir)
            stages.append(py)
            ratios.append((replayed / wall) / (py["events"] / py["seconds"]))
            log(
                f"  ceiling python {py['seconds']:.3f}s ({py['events'] / py['seconds']:,.0f}/s): "
                f"read+CRC {py['read_crc']:.3f}s, decode {py['decode']:.3f}s, "
                f"fold_batch {py['fold_batch']:.3f}s"
            )

            snapshots = snapshot_mappings(plan)
            hset_s.append(hset_pipelined(ceiling_client, snapshots))
            ceiling_client.flushdb()
            cpu = redis_cpu(client)
            seconds, merge_calls = merge_only(ceiling_client, plan)
            merge_s.append(seconds)
            merge_cpu.append(redis_cpu(client) - cpu)
            ceiling_client.flushdb()
            log(
                f"  ceiling HSET {len(snapshots)} snapshots {hset_s[-1]:.3f}s; merge only "
                f"{int(py['session_merges'])} deltas {seconds:.3f}s "
                f"(redis-server CPU {merge_cpu[-1]:.3f}s)"
            )
            del plan
        if args.profile:
            profile = profiled(tracker.replay, args.profile)
    finally:
        tracker.close()
        client.close()
        ceiling_client.close()
    if profile:
        log("cProfile of one more replay:\n" + profile)

    def stage(name: str) -> float:
        return round(median([s[name] for s in stages]), 4)

    replay = rate_summary(replayed, walls)
    python = rate_summary(replayed, [s["seconds"] for s in stages])
    decode = rate_summary(replayed, [s["decode"] for s in stages])
    hset = rate_summary(len(snapshots), hset_s)
    merges = int(stages[-1]["session_merges"])
    merge = rate_summary(merges, merge_s)
    rate = float(replay["median_rate"])
    wall = median(walls)
    fields = median([len(m) for _, m in snapshots]) if snapshots else 0
    return {
        "bench": "replay",
        "params": {
            "events": replayed,
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "append_batch": args.batch,
            "projector_batch_records": BATCH_RECORDS,
            "projector_read_records": READ_RECORDS,
            "projector_max_sessions": MAX_SESSIONS,
            "repeat": args.repeat,
            "seed": args.seed,
            "redis": f"{server.version()} tcp 127.0.0.1",
            "fsync": False,
        },
        "seconds": replay["seconds"],
        "median_rate": rate,
        "value": rate,
        "unit": "events/s",
        "target": TARGET,
        "meets_target": verdict(rate, TARGET),
        "ratio": round(median(ratios), 3),
        "ratio_of": "replay rate / ceiling.python rate (median of per-repeat ratios)",
        "report_seconds": [round(s, 4) for s in reported],
        "report_rate": rounded(replayed / median(reported)),
        "redis_calls": int(median(calls)),
        "redis_calls_per_1000_events": round(median(calls) / replayed * 1000, 3),
        "session_merges": merges,
        "sessions_replayed": sessions,
        "open_catch_up_seconds": round(open_s, 4),
        "breakdown_seconds": {
            "replay_wall": round(wall, 4),
            "redis_server_cpu": round(median(server_cpu), 4),
            "redis_evalsha": round(median(evalsha), 4),
            "python_read_crc": stage("read_crc"),
            "python_decode": stage("decode"),
            "python_fold_batch": stage("fold_batch"),
            "rest": round(wall - median(server_cpu) - stage("seconds"), 4),
            "rest_is": "wire encoding, redis-py, waiting, dropping the old generation, "
            "counting sessions (wall - redis CPU - python ceiling)",
        },
        "ceiling": {
            "python": {
                "what": "FileLog.read + CRC + decode_batches + fold_batch, no Redis",
                **python,
                "unit": "events/s",
            },
            "decode": {
                "what": "decode_batches alone: msgspec msgpack decode into the event union",
                **decode,
                "unit": "events/s",
            },
            "redis_hset": {
                "what": f"pipelined HSET of each final snapshot ({fields:.0f} fields), "
                f"{HSET_PIPELINE} per pipeline",
                **hset,
                "unit": "sessions/s",
                "sessions": len(snapshots),
                "implied_events_per_s": rounded(replayed / (merges / float(hset["median_rate"]))),
                "implied_is": "events / (session merges the replay does / HSET rate)",
            },
            "merge_only": {
                "what": "SnapshotStore.merge of the replay's pre-folded deltas: wire + "
                "EVALSHA + Redis (no read/decode/fold)",
                **merge,
                "unit": "session merges/s",
                "session_merges": merges,
                "redis_calls": merge_calls,
                "events_per_s": rounded(replayed / median(merge_s)),
                "redis_server_cpu_seconds": round(median(merge_cpu), 4),
            },
        },
    }


def main() -> None:
    p = parser("Full replay of a file log into an empty Redis through Tracker.replay().")
    p.add_argument("--events", type=int, default=1_000_000, help="records in the log")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=10_000, help="records per append (setup)")
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one more replay, top N"
    )
    args = p.parse_args()
    with (
        workdir(args.tmpdir, "replay") as tmp,
        redis_server(tmp / "redis", args.redis_server) as server,
    ):
        emit(run(args, server, tmp))


if __name__ == "__main__":
    main()
