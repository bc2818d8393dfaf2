"""``tracker replay`` of a file log into Redis, as a user runs it, and ``Tracker.replay()``.

Setup (not timed): a file log of ``--events`` records over ``--sessions`` sessions (the
creates, with titles of 20 to 80 characters, then commits of three consumers, mostly
increasing with some stale or repeated offsets), appended in batches of ``--batch``
through ``FileLog`` with ``encode_validated``. ``Tracker.open`` then catches up on open
(reported, not the headline). Redis: a private redis-server on loopback TCP, with the
embedded default's AOF (``everysec``) unless ``--no-redis-aof``.

Timed, once of each per repeat:

* ``cli`` (the headline): ``tracker --data-dir D --redis-url U --prefix P replay --json``
  in a subprocess, the wall time of the whole process: interpreter start, imports,
  opening the log and Redis, the replay (into a new generation, promoted, the old one
  dropped) and exit. Its own report (``seconds``: the replay call alone) is given too;
  ``startup``: the wall time of ``tracker --version`` (start-up and imports alone);
* ``in_process``: ``Tracker.replay()`` in this process, wall time of the call (which also
  drops the previous generation and counts the sessions).

Ceilings, measured in the same run, interleaved with the replays (one of each per repeat,
on a copy of the log, so noise hits both alike):

* ``python``: read + CRC + decode + ``fold_batch`` of the log, no Redis, batch by batch
  as the projector reads it; the headline ratio is the CLI's rate over this one;
* ``decode``: the decode stage of the above alone (msgspec msgpack into the event union);
* ``redis_hset``: pipelined HSET of one hash per final session snapshot;
* ``merge_only``: ``SnapshotStore.merge`` of the replay's pre-folded deltas into a fresh
  generation (wire encoding + EVALSHA + Redis): the projector minus read, decode, fold.

The redis-server's CPU time (``INFO cpu``) around each replay says how much of it Redis
itself spent.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    CONSUMERS,
    RedisServer,
    Workload,
    build_log,
    cli_env,
    emit,
    log,
    median,
    parser,
    profiled,
    rate_summary,
    redis_server,
    rounded,
    timed,
    tracker_command,
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

TARGET = 700_000.0
"""Of the CLI replay, process start included."""
IN_PROCESS_TARGET = 500_000.0
"""Of ``Tracker.replay()`` in this process (the earlier headline)."""
HSET_PIPELINE = 1000
PREFIX = "bench"
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


def cli_replay(data_dir: Path, url: str, prefix: str) -> tuple[float, dict[str, Any]]:
    """Wall seconds of ``tracker ... replay --json`` as a subprocess, and its JSON report."""
    argv = [
        *tracker_command(),
        "--data-dir", str(data_dir),
        "--redis-url", url,
        "--prefix", prefix,
        "replay", "--json",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, env=cli_env(), check=False
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr.decode(errors='replace')}"
        )
    report: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return wall, report


def cli_startup() -> float:
    """Wall seconds of ``tracker --version``: interpreter start and the CLI's imports."""
    started = time.perf_counter()
    subprocess.run(
        [*tracker_command(), "--version"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=cli_env(),
        check=True,
    )
    return time.perf_counter() - started


def cli_profile(data_dir: Path, url: str, top: int) -> str:
    """``python -m cProfile`` of one ``tracker ... replay --json`` process, top by own time."""
    argv = [
        sys.executable, "-m", "cProfile", "-s", "tottime", *tracker_command(),
        "--data-dir", str(data_dir), "--redis-url", url, "--prefix", PREFIX, "replay", "--json",
    ]  # fmt: skip
    done = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=cli_env(), check=True
    )
    lines = done.stdout.splitlines()
    start = next((i for i, line in enumerate(lines) if "function calls" in line), 0)
    return "\n===== tracker replay (subprocess) =====\n" + "\n".join(lines[start : start + top + 8])


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
    settings = Settings(data_dir=data_dir, redis_url=server.url, fsync=False, prefix=PREFIX)
    open_s, tracker = timed(lambda: Tracker.open(settings=settings))
    log(f"Tracker.open (catches up on open) took {open_s:.2f}s")

    cli_walls: list[float] = []
    cli_reported: list[float] = []
    cli_cpu: list[float] = []
    startups: list[float] = []
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
    in_process_ratios: list[float] = []
    replayed = sessions = merge_calls = cli_events = 0
    snapshots: list[tuple[str, dict[str, str]]] = []
    profile = ""
    try:
        for i in range(args.repeat):
            startups.append(cli_startup())
            cpu = redis_cpu(client)
            wall, cli_report = cli_replay(data_dir, server.url, PREFIX)
            cli_cpu.append(redis_cpu(client) - cpu)
            cli_walls.append(wall)
            cli_reported.append(float(cli_report["seconds"]))
            cli_events = int(cli_report["events"])
            log(
                f"tracker replay --json {i + 1}/{args.repeat}: {cli_events} events, "
                f"{cli_report['sessions']} sessions, {wall:.3f}s wall of the process "
                f"({cli_events / wall:,.0f}/s), its report {cli_report['seconds']:.3f}s; "
                f"`tracker --version` {startups[-1]:.3f}s; redis-server CPU {cli_cpu[-1]:.3f}s"
            )
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
            ratios.append((cli_events / cli_walls[-1]) / (py["events"] / py["seconds"]))
            in_process_ratios.append((replayed / walls[-1]) / (py["events"] / py["seconds"]))
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
            profile += cli_profile(data_dir, server.url, args.profile)
    finally:
        tracker.close()
        client.close()
        ceiling_client.close()
    if profile:
        log("cProfile of one more Tracker.replay(), then of one more `tracker replay`:\n" + profile)

    def stage(name: str) -> float:
        return round(median([s[name] for s in stages]), 4)

    cli = rate_summary(cli_events, cli_walls)
    replay = rate_summary(replayed, walls)
    python = rate_summary(replayed, [s["seconds"] for s in stages])
    decode = rate_summary(replayed, [s["decode"] for s in stages])
    hset = rate_summary(len(snapshots), hset_s)
    merges = int(stages[-1]["session_merges"])
    merge = rate_summary(merges, merge_s)
    rate = float(cli["median_rate"])
    in_process_rate = float(replay["median_rate"])
    wall = median(walls)
    cli_wall, cli_report_s, startup = median(cli_walls), median(cli_reported), median(startups)
    fields = median([len(m) for _, m in snapshots]) if snapshots else 0
    return {
        "bench": "replay",
        "params": {
            "events": replayed,
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "titles": workload.describe_titles(),
            "append_batch": args.batch,
            "projector_batch_records": BATCH_RECORDS,
            "projector_read_records": READ_RECORDS,
            "projector_max_sessions": MAX_SESSIONS,
            "repeat": args.repeat,
            "seed": args.seed,
            "redis": f"{server.version()} tcp 127.0.0.1",
            "redis_persistence": server.persistence,
            "cli": " ".join(
                [*tracker_command(), "--data-dir D --redis-url U --prefix", PREFIX, "replay --json"]
            ),
            "log_built_with_fsync": False,
            "page_cache": "warm (the log was just written)",
        },
        "seconds": cli["seconds"],
        "median_rate": rate,
        "value": rate,
        "unit": "events/s (tracker replay, process wall time)",
        "target": TARGET,
        "meets_target": verdict(rate, TARGET),
        "ratio": round(median(ratios), 3),
        "ratio_of": "CLI replay rate (process wall) / ceiling.python rate (median of per-repeat "
        "ratios)",
        "cli": {
            "what": "tracker replay --json in a subprocess: wall time of the process",
            **cli,
            "unit": "events/s",
            "report_seconds": [round(s, 4) for s in cli_reported],
            "report_rate": rounded(cli_events / cli_report_s),
            "redis_server_cpu_seconds": round(median(cli_cpu), 4),
            "breakdown_seconds": {
                "process_wall": round(cli_wall, 4),
                "replay_call": round(cli_report_s, 4),
                "startup_and_imports": round(startup, 4),
                "open_and_exit": round(cli_wall - cli_report_s - startup, 4),
                "open_and_exit_is": "process wall - replay call (its report) - `tracker "
                "--version` wall: opening the log (index scan) and Redis, event_count, "
                "closing",
            },
        },
        "in_process": {
            "what": "Tracker.replay() in this process, wall time of the call",
            **replay,
            "unit": "events/s",
            "target": IN_PROCESS_TARGET,
            "meets_target": verdict(in_process_rate, IN_PROCESS_TARGET),
            "ratio": round(median(in_process_ratios), 3),
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
    p = parser("tracker replay (CLI, process wall time) and Tracker.replay() of a file log.")
    p.add_argument("--events", type=int, default=1_000_000, help="records in the log")
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=10_000, help="records per append (setup)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="cProfile one more Tracker.replay() and one more `tracker replay` process, top N",
    )
    args = p.parse_args()
    with (
        workdir(args.tmpdir, "replay") as tmp,
        redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server,
    ):
        emit(run(args, server, tmp))


if __name__ == "__main__":
    main()
