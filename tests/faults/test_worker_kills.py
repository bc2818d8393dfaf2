"""Workers SIGKILLed at random moments during a 100,000-message run, restarted each time.

A stream of 100,000 flux0 events over 1,000 sessions (``tracker streams append
--generate``) is read by ``tracker worker`` processes one after another, each killed with
SIGKILL at a random moment (a delay drawn from a seeded RNG, counted from the moment it
first reports handled messages) and replaced by a new one, at least ten times; a last one
reads to the end. The handler costs a little per message, as a real one does, so that a
kill finds the worker with messages in hand and a flush in flight. Both deployments run:
a file stream with the file event log (the embedded default: the workers project), and a
Kafka stream with the event log on Kafka and a ``tracker project`` process (there the
stream is written while the first workers run).

A commit is "acknowledged" once it is in the event log, read back with the log reader
(``tracker.logs``). Checked, for the consumer's every session:

(a) Redis holds at least the highest offset the log acknowledged, and exactly the
    session's highest offset in the stream;
(b) acknowledged commits lost (Redis below the log, or the log below what it held at an
    earlier kill) is 0, counted;
(c) a saved stream position (the position file; the group's committed offsets) is never
    ahead of the log: every message before it has its offset, or a higher one, in the
    log. Checked after every kill, and sampled while the workers run (position first,
    then the log): a position saved before its flush was acknowledged shows up there;
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
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest

from consumers.generate import session_ids
from consumers.kafkastream import ensure_topic
from tests.faults.report import Figures
from tests.faults.workload import seeded
from tests.services import stop_process
from tests.test_workers import env_for, heads, run_cli, start_worker
from tests.test_workers_kafka import PARTITIONS, Harness, Process, harness, read_topic
from tracker import Settings
from tracker.errors import LogNotFoundError
from tracker.events import OffsetCommitted, Position, decode_event
from tracker.logs import LogBackend, open_log
from tracker.reader import Reader

__all__ = ["harness"]  # the Kafka worker tests' fixture: one world per test

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
MESSAGES = 100_000
SESSIONS = 1_000
SESSION_IDS = session_ids(SESSIONS)
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
about 3 s, so its successor is assigned the partitions sooner."""

Key = tuple[str, str]
"""(session id, consumer)"""
Positions = dict[int, int]
"""Per stream partition, the position of the next message to read."""
Offsets = tuple[int, ...]
"""The consumer's acknowledged offset of each of ``SESSION_IDS`` (-1: none)."""


class Acknowledged:
    """The commits the event log holds, read with the log reader from where the last look
    ended: per (session, consumer) the highest offset of an ``offset_committed`` event."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.highest: dict[Key, int] = {}
        self.events = 0
        self.torn: list[str] = []
        self._after: dict[int, Position | None] = {}
        self._log: LogBackend | None = None

    def look(self, *, reopen: bool = True) -> Offsets:
        """With ``reopen`` the log is opened afresh, as the next process opens it (a file
        log's torn tail, an append the kill interrupted, is cut then, and counted); else
        the open log is read on, while a worker appends."""
        if reopen or self._log is None:
            self.close()
            try:
                self._log = open_log(self.settings, create=False)
            except LogNotFoundError:  # no worker has opened it yet: nothing acknowledged
                return self.offsets()
            if repaired := getattr(self._log, "repaired", None):
                self.torn.append(repaired)
        log = self._log
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
        return self.offsets()

    def offsets(self) -> Offsets:
        return tuple(self.highest.get((sid, CONSUMER), -1) for sid in SESSION_IDS)

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class Kill:
    """One SIGKILL: when, and what the saved position and the log held just after it."""

    life: int
    delay: float
    handled: int
    """Messages the worker last reported handled (a report every 0.2 s)."""
    positions: Positions
    acked: Offsets


@dataclass
class Sample:
    """The saved position, and then the log, read while ``worker`` ran."""

    worker: str
    positions: Positions
    acked: Offsets


@dataclass
class Run:
    """The kill-and-restart loop of one deployment, and what it saw."""

    start: Callable[[int], Process]
    """Starts the worker of a given life."""
    saved: Callable[[], Positions]
    """The stream positions saved for the next worker."""
    acknowledged: Acknowledged
    rng: random.Random
    sample_every: float
    """Seconds between two samples of check (c) while a worker runs."""
    kills: list[Kill] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    processes: list[Process] = field(default_factory=list)

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
        self.acknowledged.close()

    def kill_repeatedly(self) -> None:
        while len(self.kills) < MIN_KILLS:
            life = self.lives
            worker = self._next()
            self._watch(worker, partial(_handled_some, worker), 180, "it to handle messages")
            delay = self.rng.uniform(0, KILL_WINDOW)
            self._watch(worker, partial(_past, time.monotonic() + delay), delay + 60, "the kill")
            worker.kill()
            positions = self.saved()
            self.kills.append(Kill(life, round(delay, 3), worker.processed(), positions,
                                   self.acknowledged.look()))  # fmt: skip

    def finish(self, ends: Positions, timeout: float = 300) -> Process:
        """A last worker, left to commit the positions ``ends``: the whole stream read."""
        worker = self._next()
        self._watch(worker, lambda: self.saved() == ends, timeout, "every position committed")
        return worker

    def _watch(self, worker: Process, done: Callable[[], bool], timeout: float, what: str) -> None:
        """Sample check (c) until ``done``; fail if the worker exits or time runs out."""
        deadline = time.monotonic() + timeout
        next_sample = time.monotonic()
        while not done():
            if worker.popen.poll() is not None:
                pytest.fail(f"{worker.name} exited with {worker.popen.returncode} waiting for "
                            f"{what}:\n{worker.tail()}")  # fmt: skip
            now = time.monotonic()
            assert now < deadline, f"{worker.name}: timed out after {timeout:g} s: {what}"
            if now >= next_sample:
                positions = self.saved()  # first the position, then the log
                acked = self.acknowledged.look(reopen=False)
                self.samples.append(Sample(worker.name, positions, acked))
                next_sample = time.monotonic() + self.sample_every
            time.sleep(0.005)


def _handled_some(worker: Process) -> bool:
    return worker.processed() > 0


def _past(moment: float) -> bool:
    return time.monotonic() >= moment


def ahead(before: dict[str, int], acked: Offsets) -> list[str]:
    """Sessions with a message before a saved position whose offset the log lacked."""
    return [sid for sid, offset in zip(SESSION_IDS, acked, strict=True)
            if offset < before.get(sid, -1)]  # fmt: skip


def redis_offsets(redis_url: str, prefix: str) -> dict[str, int]:
    """The consumer's offset of every session, as Redis holds it (a reader: no catch-up)."""
    with Reader.connect(redis_url, prefix) as reader:
        found = {}
        for sid in SESSION_IDS:
            offset = reader.offsets(sid).get(CONSUMER)
            if offset is not None:
                found[sid] = offset
        return found


def judge(
    run: Run,
    fault_report: Figures,
    *,
    seed: int,
    before: Callable[[Positions], dict[str, int]],
    ends: Positions,
    in_redis: dict[str, int],
    verified: dict[str, object],
    fault: str,
) -> None:
    """Checks (a), (b), (c) of the module docstring: fills the report, then fails if any
    did not hold. ``before`` gives each session's highest offset before positions."""
    final = dict(zip(SESSION_IDS, run.acknowledged.look(), strict=True))
    run.acknowledged.close()
    lost_in_redis = [sid for sid, offset in final.items() if in_redis.get(sid, -1) < offset]
    lost_in_log = {sid for kill in run.kills for sid, offset in zip(SESSION_IDS, kill.acked,
                   strict=True) if final[sid] < offset}  # fmt: skip
    expected = heads(MESSAGES, SESSIONS)
    wrong = sorted(sid for sid in expected.keys() | in_redis.keys()
                   if in_redis.get(sid) != expected.get(sid))  # fmt: skip
    kills_ahead = [(kill, found) for kill in run.kills
                   if (found := ahead(before(kill.positions), kill.acked))]  # fmt: skip
    samples_ahead = [(sample, found) for sample in run.samples
                     if (found := ahead(before(sample.positions), sample.acked))]  # fmt: skip
    mid_stream = sum(1 for kill in run.kills if kill.positions != ends)
    differences, events = verified["differences"], verified["events"]
    assert isinstance(differences, list) and isinstance(events, int)
    fault_report.fault = fault
    fault_report.injected = len(run.kills)
    fault_report.lost = len(lost_in_redis) + len(lost_in_log)
    everything_held = not (fault_report.lost or wrong or differences or samples_ahead)
    fault_report.survived = len(run.kills) - len(kills_ahead) if everything_held else 0
    fault_report.checked = (
        "Redis holds every offset the log acknowledged and each session's last offset; no "
        "saved position ahead of the log (at kills, and sampled); Redis = fold of the log"
    )
    fault_report.detail = {
        "seed": seed,
        "messages": MESSAGES,
        "sessions": SESSIONS,
        "kills": len(run.kills),
        "kills_mid_stream": mid_stream,
        "read_before_the_last_worker": sum(run.kills[-1].positions.values()) if run.kills else 0,
        "restarts": run.lives - 1,
        "kill_delays_s": f"0-{KILL_WINDOW:g} after the first report",
        "handled_by_killed_workers": sum(kill.handled for kill in run.kills),
        "commit_events_acknowledged": run.acknowledged.events,
        "torn_appends_cut": len(run.acknowledged.torn),
        "kills_with_position_ahead": len(kills_ahead),
        "position_samples": len(run.samples),
        "samples_with_position_ahead": len(samples_ahead),
        "lost_in_redis": len(lost_in_redis),
        "lost_from_log": len(lost_in_log),
        "sessions_wrong_in_redis": len(wrong),
        "verify_events": events,
        "verify_differences": len(differences),
    }
    problems = []
    if lost_in_redis:
        problems.append(
            f"{len(lost_in_redis)} acknowledged offsets not in Redis: "
            + ", ".join(f"{sid}: {in_redis.get(sid)} < {final[sid]}" for sid in lost_in_redis[:5])
        )
    if lost_in_log:
        problems.append(f"the log lost commits of {len(lost_in_log)} sessions it held at a kill")
    if wrong:
        problems.append(
            f"{len(wrong)} sessions wrong in Redis: "
            + ", ".join(
                f"{sid}: {in_redis.get(sid)} (want {expected.get(sid)})" for sid in wrong[:5]
            )
        )
    problems.extend(
        f"after the kill of worker-{kill.life}, its saved position {kill.positions} "
        f"was ahead of the log for {len(found)} sessions, e.g. {found[:3]}"
        for kill, found in kills_ahead
    )
    problems.extend(
        f"{sample.worker} running: saved position {sample.positions} ahead of the "
        f"log for {len(found)} sessions, e.g. {found[:3]}"
        for sample, found in samples_ahead[:3]
    )
    if differences:
        problems.append(f"verify: {differences[:5]}")
    if mid_stream < MIN_KILLS:
        problems.append(
            f"only {mid_stream} of {len(run.kills)} kills came before the stream was "
            "read to its end: the workers ran too fast for the test to mean much"
        )
    if problems:
        pytest.fail(f"seed {seed}:\n" + "\n".join(problems))  # fmt: skip


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

    def saved() -> Positions:
        return {0: json.loads(position.read_text())["next"]} if position.exists() else {}

    def before(positions: Positions) -> dict[str, int]:
        """Message n of the stream is offset n // SESSIONS of session n % SESSIONS."""
        return heads(positions.get(0, 0), SESSIONS)

    run = Run(start, saved, Acknowledged(Settings.from_env(env)), rng, sample_every=0.02)
    ends = {0: MESSAGES}
    try:
        run.kill_repeatedly()
        last = run.finish(ends)
        assert last.terminate() == 0, last.tail()
    finally:
        run.stop_all()
    verified = run_cli(["verify", "--json"], env)
    assert verified.returncode in (0, 1), verified.stderr
    judge(
        run,
        fault_report,
        seed=seed,
        before=before,
        ends=ends,
        in_redis=redis_offsets(redis_url, prefix),
        verified=json.loads(verified.stdout),
        fault="SIGKILL of `tracker worker` at a random moment (file stream, file event log)",
    )


# -- Kafka stream, Kafka event log, a tracker project process --------------------------------


class Placement:
    """Where the stream's messages are: per partition and session, their positions and
    offsets, read back from the topic."""

    def __init__(self, records: list[tuple[int, int, str, int]]) -> None:
        self.placed: dict[tuple[int, str], tuple[list[int], list[int]]] = {}
        self.ends: Positions = {}
        for partition, position, sid, offset in sorted(records):
            where, offsets = self.placed.setdefault((partition, sid), ([], []))
            where.append(position)
            offsets.append(offset)
            self.ends[partition] = max(self.ends.get(partition, 0), position + 1)

    def before(self, positions: Positions) -> dict[str, int]:
        found = {}
        for (partition, sid), (where, offsets) in self.placed.items():
            count = bisect_left(where, positions.get(partition, 0))
            if count:
                found[sid] = max(offsets[:count])
        return found


def test_workers_killed_on_kafka_lose_no_acknowledged_offset(
    harness: Harness, fault_report: Figures
) -> None:
    seed, rng = seeded("kafka")
    h = harness
    h.env.update(TRACKER_WORKER_SESSION_TIMEOUT_MS=KAFKA_GROUP_MS,
                 TRACKER_WORKER_MAX_POLL_INTERVAL_MS=KAFKA_GROUP_MS)  # fmt: skip
    ensure_topic(h.bootstrap, h.stream, PARTITIONS, timeout=30)
    producer = h.start("producer", "streams", "append", "--stream", h.stream, "--generate",
                       str(MESSAGES), "--sessions", str(SESSIONS), "--json")  # fmt: skip
    projector = h.start("projector", "project", "--report-every", "1")
    run = Run(lambda life: h.worker(f"worker-{life}", CONSUMER, *WORKER_OPTIONS),
              lambda: h.committed(CONSUMER), Acknowledged(h.settings), rng,
              sample_every=0.25)  # fmt: skip
    try:
        run.kill_repeatedly()
        assert producer.popen.wait(timeout=300) == 0, producer.tail()
        placement = Placement(
            [(r.partition, r.offset, r.key.decode(), json.loads(r.value)["offset"])
             for r in read_topic(h.bootstrap, h.stream, MESSAGES, linger=0)]
        )  # fmt: skip
        assert sum(len(where) for where, _ in placement.placed.values()) == MESSAGES
        last = run.finish(placement.ends)
        assert last.terminate() == 0, last.tail()
    finally:
        run.acknowledged.close()
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
        before=placement.before,
        ends=placement.ends,
        in_redis=redis_offsets(h.settings.redis_url, h.prefix),
        verified=json.loads(verified.stdout),
        fault="SIGKILL of `tracker worker` at a random moment (Kafka stream and event log, "
        "`tracker project` running)",
    )
