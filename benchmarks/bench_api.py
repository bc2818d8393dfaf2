"""``GET /api/sessions/{id}`` of ``tracker serve`` under load, against a bare Litestar route.

Setup (not timed): a private redis-server on 127.0.0.1 (AOF ``everysec`` as the embedded
default unless ``--no-redis-aof``); ``--sessions`` sessions (titles of 20 to 80
characters) created through the tracker (``create_session``), each committed by three
consumers (``commit_many``); a ``read`` token in a tokens file (``TokenFile.create``).
Two servers on loopback, each one uvicorn process with uvloop and httptools:
``python -m tracker serve --port P`` (its defaults; settings from ``TRACKER_*``) and the
ceiling, ``benchmarks.bare_app`` (one Litestar route answering a constant session of the
same size; ``uvicorn ... --factory --loop uvloop --http httptools --no-access-log``).

Measured with Debian's ``wrk`` (``apt-get install wrk``) in a process of its own: a Lua
script picks a random session id from the list for every request (``request()``), the
read token goes as ``Authorization: Bearer`` (``-H``, sent to both servers), ``--latency``
gives p50/p90/p99 and requests/s. For each ``--connections`` (10 and 50) and each repeat:
a ``--warmup`` run of each server, then ``wrk -t T -c C -d S`` of the tracker and of the
bare route in turn (the order alternates between repeats). The machine's two cores are
shared by wrk, the server and Redis: the CPU seconds each used are in the JSON.

A diagnostic floor, measured the same way (``--no-redis-floor`` skips it): the bare
route doing one redis-py ``HGETALL`` of the session's real key on the event loop
(``bare_app.create_redis_app``): what Litestar plus the one Redis read that any answer
needs costs, without auth, metrics or the tracker's shaping (``ratio_to_bare_hgetall``).

Targets at 10 connections: requests/s >= 0.5 of the bare route's, p99 <= 10 ms.
``--profile N`` runs one more load run against a tracker server started under cProfile
(``python -m cProfile -o F -m tracker serve``; written when it stops) and logs its top N
functions. cProfile sees the event loop's thread only: the Redis round trips run on
worker threads (``anyio.to_thread``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks._common import (
    CONSUMERS,
    RedisServer,
    Workload,
    busy_between,
    cli_env,
    emit,
    free_port,
    log,
    machine_busy_ticks,
    median,
    parser,
    positive_ints,
    process_cpu_seconds,
    redis_server,
    stop_process,
    verdict,
    workdir,
)
from tracker import Settings, Tracker
from tracker.tokens import TokenFile

TARGET_RATIO = 0.5
TARGET_P99_MS = 10.0
HEADLINE_CONNECTIONS = 10
PREFIX = "bench"
ROOT = Path(__file__).resolve().parent.parent

LUA = """\
-- a random session id of the list for every request; one Lua state per wrk thread
local ids = {}
for line in io.lines("%(ids)s") do ids[#ids + 1] = line end
local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("number", counter)
end
function init(args)
  math.randomseed(%(seed)d * 1000 + (number or 0))
end
function request()
  return wrk.format("GET", "/api/sessions/" .. ids[math.random(#ids)])
end
"""

# -- wrk ----------------------------------------------------------------------------------


def wrk_binary() -> str:
    """Debian's ``wrk`` (PATH or /usr/bin); exits with how to install it if missing."""
    found = shutil.which("wrk") or ("/usr/bin/wrk" if Path("/usr/bin/wrk").exists() else None)
    if found is None:
        sys.exit("error: the api case needs wrk: apt-get install wrk")
    return found


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_QUANTILE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_MAX = re.compile(r"^\s*Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s|m)", re.MULTILINE)


def parse_wrk(text: str) -> dict[str, Any]:
    """Figures of ``wrk --latency`` output: requests/s, p50..p99 and max (ms), errors."""
    quantiles = {f"p{q}": round(float(v) * _UNITS[u], 3) for q, v, u in _QUANTILE.findall(text)}
    rate, requests = _RATE.search(text), _REQUESTS.search(text)
    if rate is None or requests is None or "p99" not in quantiles:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    top = _MAX.search(text)
    socket = _SOCKET.search(text)
    non_2xx = _NON_2XX.search(text)
    return {
        "requests_per_s": round(float(rate.group(1)), 1),
        "requests": int(requests.group(1)),
        "latency_ms": {
            **quantiles,
            "max": round(float(top.group(1)) * _UNITS[top.group(2)], 3) if top else None,
        },
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": dict(
            zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True)
        )
        if socket
        else {},
    }


def run_wrk(
    wrk: str,
    url: str,
    script: Path,
    token: str,
    *,
    threads: int,
    connections: int,
    seconds: float,
    pids: dict[str, int],
) -> dict[str, Any]:
    """One wrk run; its figures plus the CPU seconds of wrk and of ``pids`` over it."""
    argv = [
        wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
        "-s", str(script), "-H", f"Authorization: Bearer {token}", url,
    ]  # fmt: skip
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks, started = machine_busy_ticks(), time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    figures = parse_wrk(done.stdout)
    if figures["non_2xx"] or any(figures["socket_errors"].values()):
        raise RuntimeError(f"wrk saw failed requests against {url}:\n{done.stdout}")
    cpu = {name: round(process_cpu_seconds(pid) - before[name], 2) for name, pid in pids.items()}
    cpu["wrk"] = round(after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime, 2)
    figures["cpu_seconds"] = cpu
    figures["busy_cpus"] = busy_between(ticks, machine_busy_ticks())
    figures["wall_seconds"] = round(wall, 2)
    return figures


# -- the servers --------------------------------------------------------------------------


class Served:
    """A server process on a free loopback port, up once ``probe`` answers 200."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], port: int, log_path: Path
    ) -> None:
        self.name, self.port, self.log_path = name, port, log_path
        with open(log_path, "wb") as out:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, token: str) -> tuple[int, bytes]:
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status), bytes(response.read())

    def wait_up(self, path: str, token: str, timeout: float = 60.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            try:
                status, body = self.get(path, token)
                if status == 200:
                    log(f"{self.name}: pid {self.process.pid} on {self.url}")
                    return body
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} did not start:\n{tail}")
            time.sleep(0.1)

    def stop(self) -> None:
        stop_process(self.process, grace=15)


def tracker_server(tmp: Path, server: RedisServer, tokens: Path, *, profile: Path | None) -> Served:
    port = free_port()
    settings = {
        "TRACKER_DATA_DIR": str(tmp / "data"),
        "TRACKER_REDIS_URL": server.url,
        "TRACKER_PREFIX": PREFIX,
        "TRACKER_API_TOKENS_FILE": str(tokens),
    }
    argv = [sys.executable, "-m", "tracker", "serve", "--port", str(port)]
    if profile is not None:
        argv[1:1] = ["-m", "cProfile", "-o", str(profile)]
    name = "tracker serve (profiled)" if profile else "tracker serve"
    return Served(name, argv, cli_env(**settings), port, tmp / f"serve-{port}.log")


def bare_server(tmp: Path, factory: str = "create_app", **env: str) -> Served:
    port = free_port()
    argv = [
        sys.executable, "-m", "uvicorn", f"benchmarks.bare_app:{factory}", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log",
    ]  # fmt: skip
    name = "bare Litestar route" + (" + HGETALL" if env else "")
    return Served(name, argv, cli_env(**env), port, tmp / f"bare-{port}.log")


# -- the case -----------------------------------------------------------------------------


def create_sessions(settings: Settings, workload: Workload) -> tuple[float, str]:
    """The workload's sessions through ``create_session``, then three consumers' commits;
    the seconds it took and the projection's keys (``prefix:generation:partitions``)."""
    started = time.perf_counter()
    with Tracker(settings) as tracker:
        for sid, (agent, user), title in zip(
            workload.session_ids, workload.owners, workload.titles, strict=True
        ):
            tracker.create_session(agent, user, session_id=sid, title=title, wait=False)
        commits = [
            (sid, consumer, 1 + (n * 7 + c * 13) % 5000)
            for n, sid in enumerate(workload.session_ids)
            for c, consumer in enumerate(CONSUMERS)
        ]
        for start in range(0, len(commits), 10_000):
            tracker.commit_many(commits[start : start + 10_000])
        keys = tracker.store.keys
    return time.perf_counter() - started, f"{keys.prefix}:{keys.generation}:{keys.partitions}"


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Median over repeats of requests/s and of each latency quantile."""
    latency = {
        q: round(median([r["latency_ms"][q] for r in runs]), 3)
        for q in ("p50", "p75", "p90", "p99")
    }
    latency["max"] = max(r["latency_ms"]["max"] or 0.0 for r in runs)
    return {
        "requests_per_s": round(median([r["requests_per_s"] for r in runs]), 1),
        "latency_ms": latency,
        "runs": list(runs),
    }


def measure(
    args: Any,
    wrk: str,
    script: Path,
    token: str,
    servers: dict[str, Served],
    redis_pid: int,
) -> dict[int, dict[str, list[dict[str, Any]]]]:
    """Per connection count, per server: the repeats' wrk figures."""
    out: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for connections in args.connections:
        out[connections] = {name: [] for name in servers}
        for served in servers.values():
            run_wrk(
                wrk, served.url, script, token, threads=args.wrk_threads,
                connections=connections, seconds=args.warmup, pids={},
            )  # fmt: skip
        for i in range(args.repeat):
            order = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in order:
                served = servers[name]
                pids = {"server": served.process.pid, "redis_server": redis_pid}
                figures = run_wrk(
                    wrk, served.url, script, token, threads=args.wrk_threads,
                    connections=connections, seconds=args.seconds, pids=pids,
                )  # fmt: skip
                out[connections][name].append(figures)
                lat = figures["latency_ms"]
                log(
                    f"{name} -c{connections} ({i + 1}/{args.repeat}): "
                    f"{figures['requests_per_s']:,.0f} req/s, p50 {lat['p50']} ms, "
                    f"p99 {lat['p99']} ms; cpu {figures['cpu_seconds']}"
                )
    return out


def profile_run(
    args: Any, wrk: str, script: Path, token: str, tmp: Path, server: RedisServer, tokens: Path
) -> str:
    """One more load run against a profiled tracker server; its cProfile top functions."""
    stats = tmp / "serve.prof"
    served = tracker_server(tmp, server, tokens, profile=stats)
    try:
        served.wait_up("/healthz", token)
        run_wrk(
            wrk, served.url, script, token, threads=args.wrk_threads,
            connections=HEADLINE_CONNECTIONS, seconds=args.seconds, pids={},
        )  # fmt: skip
        # uvicorn re-raises the signal it stopped on: SIGTERM's default action would kill
        # the process before cProfile writes; SIGINT's KeyboardInterrupt lets it write
        os.kill(served.process.pid, signal.SIGINT)
        served.process.wait(timeout=30)
    finally:
        served.stop()
    import io
    import pstats

    if not stats.exists():
        return f"(no profile written to {stats})"
    if os.environ.get("BENCH_API_KEEP_PROFILE"):
        shutil.copy(stats, os.environ["BENCH_API_KEEP_PROFILE"])
    text = io.StringIO()
    report = pstats.Stats(str(stats), stream=text)
    report.sort_stats("tottime").print_stats(args.profile)
    report.sort_stats("cumulative").print_stats(args.profile)
    return text.getvalue()


def run(args: Any, tmp: Path) -> dict[str, Any]:
    wrk = wrk_binary()
    version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    wrk_version = (version.stdout or version.stderr).splitlines()[0].strip()
    workload = Workload(args.seed, args.sessions)
    with redis_server(tmp / "redis", args.redis_server, aof=args.redis_aof) as server:
        settings = Settings(data_dir=tmp / "data", redis_url=server.url, prefix=PREFIX)
        seconds, keys = create_sessions(settings, workload)
        log(f"created {args.sessions} sessions x {len(CONSUMERS)} consumers ({seconds:.1f}s)")
        tokens = tmp / "tokens.json"
        token, _ = TokenFile(tokens).create("read", name="bench")
        ids = tmp / "ids.txt"
        ids.write_text("\n".join(workload.session_ids) + "\n")
        script = tmp / "random_ids.lua"
        script.write_text(LUA % {"ids": ids, "seed": args.seed})
        served: dict[str, Served] = {}
        try:
            served["tracker"] = tracker_server(tmp, server, tokens, profile=None)
            served["bare"] = bare_server(tmp)
            if args.redis_floor:
                served["bare_hgetall"] = bare_server(
                    tmp, "create_redis_app", BENCH_REDIS_URL=server.url, BENCH_KEYS=keys
                )
            probe = f"/api/sessions/{workload.session_ids[0]}"
            sample = json.loads(served["tracker"].wait_up(probe, token))
            assert sample["id"] == workload.session_ids[0], sample
            bare_body = served["bare"].wait_up(probe, token)
            if args.redis_floor:
                raw = json.loads(served["bare_hgetall"].wait_up(probe, token))
                assert raw, f"no hash for {probe}"
            tracker_body = served["tracker"].get(probe, token)[1]
            results = measure(args, wrk, script, token, served, server.pid)
            log_bytes = served["tracker"].log_path.stat().st_size
        finally:
            for one in served.values():
                one.stop()
        profile = profile_run(args, wrk, script, token, tmp, server, tokens) if args.profile else ""
        redis_version = server.version()
        persistence = server.persistence
    if profile:
        log(f"cProfile of tracker serve over one {args.seconds:g}s load run:\n{profile}")

    by_connections: dict[str, Any] = {}
    for connections, per_server in results.items():
        tracker_ = summarize(per_server["tracker"])
        bare = summarize(per_server["bare"])
        ratio = round(tracker_["requests_per_s"] / bare["requests_per_s"], 3)
        row = {"tracker": tracker_, "bare": bare, "ratio": ratio}
        if "bare_hgetall" in per_server:
            floor = summarize(per_server["bare_hgetall"])
            row["bare_hgetall"] = floor
            row["ratio_to_bare_hgetall"] = round(
                tracker_["requests_per_s"] / floor["requests_per_s"], 3
            )
        by_connections[str(connections)] = row
    head = by_connections[str(args.connections[0])]
    rate, p99, ratio = (
        head["tracker"]["requests_per_s"],
        head["tracker"]["latency_ms"]["p99"],
        head["ratio"],
    )
    meets = verdict(ratio, TARGET_RATIO) and verdict(p99, TARGET_P99_MS, at_most=True)
    return {
        "bench": "api",
        "params": {
            "sessions": args.sessions,
            "consumers": list(CONSUMERS),
            "connections": args.connections,
            "wrk": f"{wrk_version}; -t{args.wrk_threads} -c<connections> -d{args.seconds:g}s "
            "--latency, a Lua request() picking a random session id, -H 'Authorization: Bearer "
            "<read token>'",
            "warmup_seconds": args.warmup,
            "seconds": args.seconds,
            "repeat": args.repeat,
            "tracker": "python -m tracker serve --port P (one uvicorn process, uvloop, "
            "httptools; its defaults)",
            "bare": "uvicorn benchmarks.bare_app:create_app --factory --loop uvloop --http "
            "httptools --no-access-log",
            "response_bytes": {"tracker": len(tracker_body), "bare": len(bare_body)},
            "tracker_log_bytes": log_bytes,
            "redis": f"{redis_version} tcp 127.0.0.1",
            "redis_persistence": persistence,
            "titles": workload.describe_titles(),
            "setup_seconds": round(seconds, 1),
            "seed": args.seed,
        },
        "value": rate,
        "unit": f"requests/s (GET /api/sessions/{{id}}, {args.connections[0]} connections)",
        "latency_ms": head["tracker"]["latency_ms"],
        "target": {"ratio_at_least": TARGET_RATIO, "p99_ms_at_most": TARGET_P99_MS},
        "meets_target": meets,
        "ratio": ratio,
        "ratio_of": "tracker requests/s / bare Litestar route requests/s, same connections",
        "by_connections": by_connections,
        "ceiling": {
            "what": "a bare Litestar route answering a constant session, served the same way",
            **{c: v["bare"]["requests_per_s"] for c, v in by_connections.items()},
            "bare_hgetall": {
                "what": "diagnostic: the same route doing one redis-py HGETALL of the session's "
                "key on the event loop (no auth, metrics or shaping); --no-redis-floor skips it",
                **{
                    c: v["bare_hgetall"]["requests_per_s"]
                    for c, v in by_connections.items()
                    if "bare_hgetall" in v
                },
            },
        },
    }


def main() -> None:
    p = parser("GET /api/sessions/{id} of tracker serve under wrk, against a bare route.", repeat=1)
    p.add_argument("--sessions", type=int, default=10_000)
    p.add_argument(
        "--connections",
        type=positive_ints,
        default=[HEADLINE_CONNECTIONS, 50],
        help="wrk -c values; the first one is the headline (default 10,50)",
    )
    p.add_argument("--wrk-threads", type=int, default=2, help="wrk -t, the same for both servers")
    p.add_argument("--seconds", type=float, default=10.0, help="wrk -d of a measured run")
    p.add_argument("--warmup", type=float, default=3.0, help="wrk -d of the warm-up runs")
    p.add_argument(
        "--redis-floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the bare route doing one HGETALL (a diagnostic floor; default on)",
    )
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="one more run under cProfile, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "api") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
