"""Workers SIGKILLed at random moments during a 100,000-message run, restarted each time.

A stream of 100,000 flux0 events over 1,000 sessions is written first (``tracker streams
append --generate``). ``tracker worker`` processes then read it one after another, each
killed with SIGKILL at a random moment (a delay drawn from a seeded RNG, counted from the
moment the process first reports handled messages) and replaced by a new one, at least
ten times, and a last one reads to the end. The handler costs a little per message (as a
real one does), so that a kill finds the worker with messages in hand and flushes in
flight. Both deployments are run: file stream and file event log (the embedded default),
Kafka stream and Kafka event log with a ``tracker project`` process.

What "acknowledged" means here: a commit is acknowledged once it is in the event log,
read back with the log reader (``tracker.logs``). After each kill the test reads what the
log holds and the stream position the dead worker had saved (the position file, or the
group's committed offsets); at the end it reads what Redis holds. Checked:

(a) for every (session, consumer), Redis holds at least the highest offset the log ever
    acknowledged, and exactly the session's highest offset in the stream;
(b) acknowledged commits lost (Redis below the log, or the log below what it held at an
    earlier kill) is 0, counted;
(c) at every kill, the saved stream position is never ahead of the offsets in the log:
    every message before it has its offset (or a higher one) acknowledged;
and ``tracker verify`` finds Redis equal to the fold of the log.

The seed is printed; ``FAULTS_SEED=N`` repeats a run's kill delays.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from consumers.generate import session_ids
from tests.faults.report import Figures
from tests.services import stop_process
from tests.test_workers import env_for, heads, run_cli, start_worker
from tests.test_workers_kafka import Harness, Process, harness, read_topic
from tracker import Settings
from tracker.events import OffsetCommitted, Position, decode_event
from tracker.logs import open_log
from tracker.reader import Reader

__all__ = ["harness"]  # the Kafka tests' fixture: one world per test (topics, processes)

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 100_000
SESSIONS = 1_000
CONSUMER = "indexer"
MIN_KILLS = 10
KILL_WINDOW = 1.0
"""A worker is killed at a moment drawn uniformly from this many seconds after it first
reports handled messages."""
WORKER_OPTIONS = (
    "--handler", "tests.faults.handlers:busy",
    "--flush-ms", "50", "--flush-max", "1000", "--report-every", "0.2",
)  # fmt: skip
KAFKA_GROUP_MS = "3000"
"""Session and rebalance timeouts of the workers' group: a killed member is noticed within
about 3 s, so a restarted worker is assigned its partitions sooner."""

Key = tuple[str, str]
"""(session id, consumer)"""


def seeded(name: str) -> tuple[int, random.Random]:
    """The run's seed (``FAULTS_SEED``, else a random one), printed, and its RNG."""
    seed = int(os.environ.get("FAULTS_SEED") or 0) or random.SystemRandom().randrange(1, 2**31)
    print(f"{name}: seed {seed} (FAULTS_SEED={seed} repeats the kill delays)", file=sys.stderr)
    return seed, random.Random(seed)


class Acknowledged:
    """The commits the event log holds, read with the log reader from where the last look
    ended: per (session, consumer) the highest offset of an ``offset_committed`` event.

    The log is opened afresh for each look, as the next process would open it: a file
    log's torn tail (an append the kill interrupted) is cut then, and counted.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.highest: dict[Key, int] = {}
        self.events = 0
        self.torn: list[str] = []
        self._after: dict[int, Position | None] = {}

    def look(self) -> dict[Key, int]:
        log = open_log(self.settings, create=False)
        try:
            repaired = getattr(log, "repaired", None)
            if repaired:
                self.torn.append(repaired)
            for partition in range(log.partitions):
                after = self._after.get(partition)
                while batches := log.read(partition, after, 50_000):
                    for batch in batches:
                        for raw in batch.records:
                            event = decode_event(raw)
                            if isinstance(event, OffsetCommitted):
                                key = (event.session_id, event.consumer)
                                self.events += 1
                                if self.highest.get(key, -1) < event.offset:
                                    self.highest[key] = event.offset
                    after = batches[-1].last
                self._after[partition] = after
        finally:
            log.close()
        return dict(self.highest)


@dataclass
class Kill:
    """One SIGKILL: when, and what the log and the saved stream position held after it."""

    life: int
    delay: float
    handled: int
    """Messages the worker last reported handled (a report every 0.2 s)."""
    positions: dict[int, int]
    """Per stream partition, the position saved for the next worker."""
    acked: dict[Key, int]


@dataclass
class Run:
    """The kill-and-restart loop of one deployment, and what it found."""

    start: Callable[[int], Process]
    """Starts the worker of a given life."""
    saved: Callable[[], dict[int, int]]
    """The stream positions saved for the next worker, per partition."""
    consumed: Callable[[dict[int, int]], bool]
    acknowledged: Acknowledged
    rng: random.Random
    kills: list[Kill] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)
    _next_look: float = 0.0

    @property
    def lives(self) -> int:
        return len(self.processes)

    def _next(self) -> Process:
        worker = self.start(self.lives)
        self.processes.append(worker)
        return worker

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process.popen)

    def kill_repeatedly(self) -> None:
        while len(self.kills) < MIN_KILLS:
            life = self.lives
            worker = self._next()
            self._wait(partial(self._working, worker), f"{worker.name} to handle messages")
            delay = self.rng.uniform(0, KILL_WINDOW)
            time.sleep(delay)
            assert worker.popen.poll() is None, f"{worker.name} exited:\n{worker.tail()}"
            worker.kill()
            self.kills.append(
                Kill(life, round(delay, 3), worker.processed(), self.saved(),
                     self.acknowledged.look())
            )  # fmt: skip

    def _working(self, worker: Process) -> bool:
        if worker.popen.poll() is not None:
            pytest.fail(f"{worker.name} exited with {worker.popen.returncode}:\n{worker.tail()}")
        if worker.processed() > 0:
            return True
        now = time.monotonic()
        if now < self._next_look:  # reading saved positions costs more (Kafka: a request)
            return False
        self._next_look = now + 1.0
        return self.consumed(self.saved())

    def finish(self, timeout: float = 300) -> Process:
        """A last worker, left to commit every position."""
        worker = self._next()
        self._wait(lambda: self.consumed(self.saved()), "the last worker to commit every position",
                   timeout=timeout, every=0.25)  # fmt: skip
        return worker

    @staticmethod
    def _wait(
        condition: Callable[[], bool], what: str, *, timeout: float = 180, every: float = 0.05
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout:g} s waiting for {what}"
            time.sleep(every)


def stream_heads(messages: list[tuple[str, int]]) -> dict[str, int]:
    """The highest offset of each session among ``messages`` (session id, offset)."""
    found: dict[str, int] = {}
    for sid, offset in messages:
        if found.get(sid, -1) < offset:
            found[sid] = offset
    return found


def ahead(kill: Kill, before: dict[str, int]) -> list[str]:
    """Sessions with a message before the saved position whose offset the log lacks."""
    return sorted(sid for sid, head in before.items() if kill.acked.get((sid, CONSUMER), -1) < head)


def redis_offsets(redis_url: str, prefix: str) -> dict[str, int]:
    """The consumer's offset of every session, as Redis holds it (a reader: no catch-up)."""
    with Reader.connect(redis_url, prefix) as reader:
        found = {}
        for sid in session_ids(SESSIONS):
            offset = reader.offsets(sid).get(CONSUMER)
            if offset is not None:
                found[sid] = offset
        return found


def judge(
    run: Run,
    fault_report: Figures,
    *,
    seed: int,
    stream: Callable[[Kill], dict[str, int]],
    in_redis: dict[str, int],
    verified: dict[str, object],
    fault: str,
) -> None:
    """Checks (a), (b), (c) of the module docstring; fills the report, then asserts."""
    final = run.acknowledged.look()
    mine = {sid: offset for (sid, consumer), offset in final.items() if consumer == CONSUMER}
    lost_in_redis = sorted(sid for sid, offset in mine.items() if in_redis.get(sid, -1) < offset)
    lost_in_log = sorted(
        {
            key
            for kill in run.kills
            for key, offset in kill.acked.items()
            if final.get(key, -1) < offset
        }
    )
    expected = heads(MESSAGES, SESSIONS)
    wrong = sorted(sid for sid in expected.keys() | in_redis.keys()
                   if in_redis.get(sid) != expected.get(sid))  # fmt: skip
    ahead_at = {kill.life: ahead(kill, stream(kill)) for kill in run.kills}
    mid_stream = sum(1 for kill in run.kills if not run.consumed(kill.positions))
    held = [kill for kill in run.kills if not ahead_at[kill.life]]
    differences = len(verified["differences"])  # type: ignore[arg-type]
    fault_report.fault = fault
    fault_report.injected = len(run.kills)
    fault_report.lost = len(lost_in_redis) + len(lost_in_log)
    everything_held = not (fault_report.lost or wrong or differences)
    fault_report.survived = len(held) if everything_held else 0
    fault_report.checked = (
        "Redis holds every offset the log acknowledged, the last offset of every session; "
        "no saved position ahead of the log at any kill; verify: Redis = fold of the log"
    )
    fault_report.detail = {
        "seed": seed,
        "messages": MESSAGES,
        "sessions": SESSIONS,
        "kills": len(run.kills),
        "kills_mid_stream": mid_stream,
        "restarts": run.lives - 1,
        "kill_delays_s": f"0-{KILL_WINDOW:g} after the first report",
        "handled_by_killed_workers": sum(kill.handled for kill in run.kills),
        "commit_events_acknowledged": run.acknowledged.events,
        "torn_appends_cut": len(run.acknowledged.torn),
        "positions_ahead_of_log": sum(len(s) for s in ahead_at.values()),
        "lost_in_redis": len(lost_in_redis),
        "lost_from_log": len(lost_in_log),
        "sessions_wrong_in_redis": len(wrong),
        "verify_events": int(verified["events"]),  # type: ignore[call-overload]
        "verify_differences": differences,
    }
    where = f"(seed {seed})"
    assert not lost_in_redis, (
        f"{len(lost_in_redis)} acknowledged offsets not in Redis {where}: "
        + (", ".join(f"{sid}: {in_redis.get(sid)} < {mine[sid]}" for sid in lost_in_redis[:5]))
    )
    assert not lost_in_log, f"the log lost {len(lost_in_log)} commits it held at a kill {where}"
    assert not wrong, f"{len(wrong)} sessions wrong in Redis {where}: " + ", ".join(
        f"{sid}: {in_redis.get(sid)} (want {expected.get(sid)})" for sid in wrong[:5]
    )
    assert all(not sessions for sessions in ahead_at.values()), (
        f"a saved position was ahead of the log {where}: "
        + "; ".join(f"kill of {life}: {s[:5]}" for life, s in ahead_at.items() if s)
    )
    assert differences == 0, f"verify: {verified['differences']} {where}"
    assert mid_stream >= MIN_KILLS, (
        f"only {mid_stream} of {len(run.kills)} kills came before the stream was consumed "
        f"{where}: the workers ran too fast for the test to mean anything"
    )


# -- file stream, file event log (the embedded default) -----------------------------------


def test_workers_killed_on_a_file_stream_lose_no_acknowledged_offset(
    tmp_path: Path, redis_url: str, prefix: str, fault_report: Figures
) -> None:
    seed, rng = seeded("file")
    env = env_for(tmp_path / "data", redis_url, prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    stream = tmp_path / "stream"
    written = run_cli(["streams", "append", "--stream-dir", str(stream), "--generate",
                       str(MESSAGES), "--sessions", str(SESSIONS), "--json"], env)  # fmt: skip
    assert written.returncode == 0, written.stderr
    position = stream / "consumers" / f"{CONSUMER}.json"
    args = ["--stream-dir", str(stream), "--consumer", CONSUMER, *WORKER_OPTIONS]

    def start(life: int) -> Process:
        log = tmp_path / f"worker-{life}.log"
        return Process(f"worker-{life}", start_worker(args, env, log), log)

    def saved() -> dict[int, int]:
        return {0: json.loads(position.read_text())["next"]} if position.exists() else {}

    run = Run(start, saved, lambda positions: positions.get(0) == MESSAGES,
              Acknowledged(Settings.from_env(env)), rng)  # fmt: skip
    try:
        run.kill_repeatedly()
        last = run.finish()
        assert last.terminate() == 0, last.tail()
    finally:
        run.stop_all()
    verified = run_cli(["verify", "--json"], env)
    assert verified.returncode in (0, 1), verified.stderr
    judge(
        run,
        fault_report,
        seed=seed,
        stream=lambda kill: {
            sid: head
            for sid, head in heads(kill.positions.get(0, 0), SESSIONS).items()
            if head >= 0
        },
        in_redis=redis_offsets(redis_url, prefix),
        verified=json.loads(verified.stdout),
        fault="SIGKILL of `tracker worker` at a random moment (file stream, file event log)",
    )


# -- Kafka stream, Kafka event log, a tracker project process --------------------------------


def test_workers_killed_on_kafka_lose_no_acknowledged_offset(
    harness: Harness, fault_report: Figures
) -> None:
    seed, rng = seeded("kafka")
    h = harness
    h.env.update(TRACKER_WORKER_SESSION_TIMEOUT_MS=KAFKA_GROUP_MS,
                 TRACKER_WORKER_MAX_POLL_INTERVAL_MS=KAFKA_GROUP_MS)  # fmt: skip
    h.append(MESSAGES, SESSIONS)
    by_partition: dict[int, list[tuple[int, str, int]]] = {}
    for record in read_topic(h.bootstrap, h.stream, MESSAGES, linger=0):
        offset = json.loads(record.value)["offset"]
        by_partition.setdefault(record.partition, []).append(
            (record.offset, record.key.decode(), offset)
        )
    ends = {p: max(o for o, _, _ in records) + 1 for p, records in by_partition.items()}
    assert sum(len(records) for records in by_partition.values()) == MESSAGES

    def before(kill: Kill) -> dict[str, int]:
        """Each session's highest offset among the messages before the saved positions."""
        return stream_heads(
            [(sid, offset) for p, records in by_partition.items()
             for position, sid, offset in records if position < kill.positions.get(p, 0)]
        )  # fmt: skip

    projector = h.start("projector", "project", "--report-every", "1")
    run = Run(lambda life: h.worker(f"worker-{life}", CONSUMER, *WORKER_OPTIONS),
              lambda: h.committed(CONSUMER), lambda positions: positions == ends,
              Acknowledged(h.settings), rng)  # fmt: skip
    run.kill_repeatedly()
    last = run.finish()
    assert last.terminate() == 0, last.tail()
    h.wait_for(lambda: h.view.status().lag == 0, lambda: "the projector to apply the whole log",
               running=[projector])  # fmt: skip
    assert projector.terminate() == 0, projector.tail()
    verified = subprocess.run([sys.executable, "-m", "tracker", "verify", "--json"], env=h.env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert verified.returncode in (0, 1), verified.stderr
    assert h.settings.redis_url is not None
    judge(
        run,
        fault_report,
        seed=seed,
        stream=before,
        in_redis=redis_offsets(h.settings.redis_url, h.prefix),
        verified=json.loads(verified.stdout),
        fault="SIGKILL of `tracker worker` at a random moment (Kafka stream and event log, "
        "`tracker project` running)",
    )
