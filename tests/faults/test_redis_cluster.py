"""Redis Cluster failing over under load: the projection still equals the fold of the log.

Three masters with a replica each (``redis_cluster``, ``cluster-node-timeout`` 1 s), the
file log, a writer committing without pause and a ``tracker project`` process:

* ``CLUSTER FAILOVER`` on every master's replica, then ``kill -9`` of the masters that
  hold the partition's keys and the meta hash (each restarted afterwards, as a replica):
  the promoted replicas have no scripts (Redis 7 does not replicate ``SCRIPT LOAD``), so
  merges and the generation scripts get ``NOSCRIPT``, load them and go on; counted from
  the nodes' ``INFO errorstats``. Reads meanwhile fail only as retriable.
* writes that Redis acknowledged and then lost in a failover (its replication is
  asynchronous): the replica is paused with a backlog queued behind the merges, its
  master killed. The promoted replica's checkpoint is behind what was applied; the
  projector notices by itself (its next fenced merge finds another checkpoint, and
  ``tracker project`` reads from the checkpoint anyway) and applies the events again from
  the log: no replay is needed. ``verify`` alone would not notice (it compares up to the
  checkpoint); ``status`` shows the lag.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import prefix_for
from tests.faults.report import Figures
from tests.services import LocalCluster, stop_process
from tracker import Reader, Settings, Tracker
from tracker.errors import NotYetVisibleError, TrackerError
from tracker.events import Position
from tracker.fold import SessionState, fold_all, visible
from tracker.keys import Keys, hash_slot
from tracker.snapshots import MERGE_SHA

SESSIONS = 60
CONSUMERS = ("client", "notifier", "indexer")
ROUNDS_AFTER = 15
"""Writer rounds to wait for after each fault, before checking."""


class NoScripts:
    """``NOSCRIPT`` replies of the cluster's nodes, added up across restarts (a killed
    node's counters start again from 0)."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.seen: dict[int, int] = {}
        self.total = 0
        self.sample()

    def sample(self) -> int:
        for node in self.cluster.alive():
            with node.client() as client:
                stats = client.info("errorstats").get("errorstat_NOSCRIPT", {})
            count = int(stats.get("count", 0))
            last = self.seen.get(node.port, 0)
            self.total += count - last if count >= last else count
            self.seen[node.port] = count
        return self.total


@dataclass
class Writer:
    """Commits rising offsets in a thread until stopped; remembers every acknowledged one."""

    settings: Settings
    rounds: int = 0
    acknowledged: dict[tuple[str, str], int] = field(default_factory=dict)
    not_visible: int = 0
    """Commits appended (durable) whose projection failed at once (Redis failing over)."""
    refused: list[str] = field(default_factory=list)
    last_not_visible: str = ""
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(13)
        offsets: dict[tuple[str, str], int] = {}
        with Tracker(self.settings) as tracker:
            while not self.stop.is_set():
                batch = []
                for _ in range(20):
                    key = (f"sess{rng.randrange(SESSIONS):03d}", rng.choice(CONSUMERS))
                    offsets[key] = offsets.get(key, -1) + rng.randint(1, 3)
                    batch.append((*key, offsets[key]))
                try:
                    tracker.commit_many(batch)
                except NotYetVisibleError as error:
                    self.not_visible += len(batch)  # durable: acknowledged all the same
                    self.last_not_visible = str(error)
                except TrackerError as error:  # not appended
                    self.refused.append(str(error))
                    continue
                for session_id, consumer, offset in batch:
                    self.acknowledged[(session_id, consumer)] = offset
                self.rounds += 1
                time.sleep(0.01)

    def wait_rounds(self, count: int, timeout: float = 60.0) -> None:
        target = self.rounds + count
        deadline = time.monotonic() + timeout
        while self.rounds < target:
            assert time.monotonic() < deadline, f"the writer is stuck: {self.refused[-3:]}"
            time.sleep(0.01)


@contextmanager
def writing(settings: Settings) -> Iterator[Writer]:
    writer = Writer(settings)
    thread = threading.Thread(target=writer.run, daemon=True)
    thread.start()
    try:
        writer.wait_rounds(5)
        yield writer
    finally:
        writer.stop.set()
        thread.join(60)


class Projector:
    """``tracker project`` kept running as a supervisor would: restarted when it exits 75
    ("unavailable, try again"); any other exit is a failure."""

    def __init__(self, settings: Settings, log: Path) -> None:
        self.log = log
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        self.env.update(
            TRACKER_DATA_DIR=str(settings.data_dir), TRACKER_REDIS_URL=str(settings.redis_url),
            TRACKER_PREFIX=settings.prefix, PYTHONPATH=os.pathsep.join(sys.path),
        )  # fmt: skip
        self.exits: list[int] = []
        self.stopping = threading.Event()
        self.process = self._start()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _start(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "tracker", "project", "--report-every", "1"],
                env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_started(self, timeout: float = 60.0) -> None:
        """Until its first lag report: it is projecting."""
        deadline = time.monotonic() + timeout
        while b"project: " not in self.log.read_bytes():
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.05)
        self._thread.start()

    def _watch(self) -> None:
        while not self.stopping.wait(0.05):
            code = self.process.poll()
            if code is None:
                continue
            self.exits.append(code)
            if code != 75:
                return
            self.process = self._start()

    @property
    def restarts(self) -> int:
        return sum(1 for code in self.exits if code == 75)

    def failed(self) -> str | None:
        """Why it stopped for good, if it did."""
        if any(code != 75 for code in self.exits):
            return f"exit codes {self.exits}:\n{self.log.read_text()[-3000:]}"
        return None

    def stop(self) -> int | None:
        """SIGTERM (it flushes and exits 0); its exit code."""
        self.stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        stop_process(self.process, grace=30)
        return self.process.returncode


@contextmanager
def project_process(settings: Settings, log: Path) -> Iterator[Projector]:
    projector = Projector(settings, log)
    try:
        projector.wait_started()
        yield projector
    finally:
        projector.stop()


@dataclass
class Reads:
    """Reads in a thread until stopped: how many answered, and the errors by kind."""

    settings: Settings
    answered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(5)
        assert self.settings.redis_url is not None
        with Reader.connect(self.settings.redis_url, self.settings.prefix) as reader:
            while not self.stop.wait(0.005):
                try:
                    reader.get_session(f"sess{rng.randrange(SESSIONS):03d}")
                    self.answered += 1
                except TrackerError as error:
                    kind = f"{type(error).__name__} (retriable: {error.retriable})"
                    self.errors[kind] = self.errors.get(kind, 0) + 1


@contextmanager
def reading(settings: Settings) -> Iterator[Reads]:
    reads = Reads(settings)
    thread = threading.Thread(target=reads.run, daemon=True)
    thread.start()
    try:
        yield reads
    finally:
        reads.stop.set()
        thread.join(60)


def redis_states(tracker: Tracker) -> dict[str, SessionState]:
    return {state.session_id: state for state in tracker.store.scan()}


def missing_commits(tracker: Tracker, acknowledged: dict[tuple[str, str], int]) -> int:
    """Acknowledged commits whose offset Redis does not show (offsets only rise here)."""
    states = redis_states(tracker)
    return sum(
        1
        for (session_id, consumer), offset in acknowledged.items()
        if session_id not in states or states[session_id].offsets.get(consumer, -1) < offset
    )


def settled_settings(cluster: LocalCluster, tmp_path: Path, name: str) -> Settings:
    settings = Settings(
        data_dir=tmp_path / "data", redis_url=cluster.url, prefix=prefix_for(name, name)
    )
    with Tracker(settings) as tracker:
        for number in range(SESSIONS):
            tracker.create_session("agent", f"user{number % 4}", session_id=f"sess{number:03d}")
    return settings


def slot_masters(cluster: LocalCluster, settings: Settings) -> tuple[int, int]:
    """The masters serving the partition's keys and the meta hash, now."""
    keys = Keys(settings.prefix, 1, 1)
    return (
        cluster.master_of_slot(hash_slot(keys.checkpoint(0))),
        cluster.master_of_slot(hash_slot(Keys.meta(settings.prefix))),
    )


def test_failovers_and_killed_masters_keep_the_fold(
    redis_cluster: LocalCluster, tmp_path: Path, fault_report: Figures
) -> None:
    settings = settled_settings(redis_cluster, tmp_path, "failovers")
    noscripts = NoScripts(redis_cluster)
    injected = survived = 0
    started = time.monotonic()
    checker = Tracker(settings, catch_up=False)
    killed: list[int] = []
    with (
        project_process(settings, tmp_path / "project.log") as projector,
        writing(settings) as writer,
        reading(settings) as reads,
    ):

        def check(*, injection: bool = True) -> None:
            nonlocal survived
            before = checker.applied_position(0)
            writer.wait_rounds(ROUNDS_AFTER)
            after = checker.applied_position(0)
            assert before is not None and after is not None
            assert after > before, (
                injected,
                writer.not_visible,
                writer.last_not_visible,
                killed,
                redis_cluster.topology(),
            )
            assert checker.verify().differences == []
            assert projector.failed() is None, projector.failed()
            survived += injection

        for master in redis_cluster.masters():  # a coordinated switch of every master
            redis_cluster.failover(redis_cluster.replica_of(master))
            injected += 1
            check()
        for which in (0, 1):  # the partition's master, then the meta hash's
            master = slot_masters(redis_cluster, settings)[which]
            redis_cluster.kill(master)
            killed.append(master)
            injected += 1
            redis_cluster.wait_ok()  # its replica took over
            check()
            redis_cluster.restart(master)  # back as a replica of the one that took over
        replay = checker.replay()  # the generation scripts, on the promoted masters
        check(injection=False)
    assert projector.failed() is None, projector.failed()
    assert projector.process.returncode == 0, projector.log.read_text()
    checker.close()
    with Tracker(settings) as final:  # catches up what the writer left
        expected = visible(fold_all(final.export_events()))
        assert redis_states(final) == expected
        assert final.verify().differences == []
        lost = missing_commits(final, writer.acknowledged)
        assert lost == 0
        for master in redis_cluster.masters():  # loaded again where it was missing
            with redis_cluster.node(master).client() as client:
                assert client.script_exists(MERGE_SHA) == [True]
    noscript = noscripts.sample()
    assert noscript > 0
    assert writer.refused == []
    # a read in a failover window fails as "unavailable, try again", never as refused
    assert reads.answered > 0
    assert all("retriable: True" in kind for kind in reads.errors), reads.errors
    fault_report.fault = (
        "CLUSTER FAILOVER of each of 3 masters, then SIGKILL of the masters holding the "
        "partition and the meta hash (replica takes over), under a writer, a reader and "
        "`tracker project`"
    )
    fault_report.injected = injected
    fault_report.survived = survived
    fault_report.lost = lost
    fault_report.checked = (
        "after each fault: writes go on, the checkpoint advances, verify finds 0 "
        "differences; at the end Redis equals the pure fold of the log, every acknowledged "
        "commit is in Redis, NOSCRIPT answered and the scripts loaded again"
    )
    fault_report.detail = {
        "commits_acknowledged": writer.rounds * 20,
        "commits_not_visible_at_once": writer.not_visible,
        "reads_answered": reads.answered,
        "reads_unavailable": sum(reads.errors.values()),
        "projector_exits_75_restarted": projector.restarts,
        "noscript_replies": noscript,
        "masters_killed": len(killed),
        "failovers": 3,
        "sessions": SESSIONS,
        "replay_during_the_run_events": replay.events,
        "seconds": round(time.monotonic() - started, 1),
    }


@contextmanager
def paused(cluster: LocalCluster, port: int) -> Iterator[None]:
    process = cluster.node(port).process
    os.kill(process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)


FILLER_BYTES = 16 << 20
FILLERS = 4
"""64 MB queued for the paused replica behind the filler's own writes: more than the
loopback sockets hold, less than the replica output buffer's soft limit (64 MB/60 s)."""


def test_writes_lost_in_a_failover_are_applied_again_from_the_log(
    redis_cluster: LocalCluster, tmp_path: Path, fault_report: Figures
) -> None:
    settings = settled_settings(redis_cluster, tmp_path, "lost-writes")
    noscripts = NoScripts(redis_cluster)
    rng = random.Random(7)
    tracker = Tracker(settings)
    try:
        tag = tracker.store.keys.checkpoint(0).split("{")[1].split("}")[0]
        master = redis_cluster.master_of_slot(hash_slot("{" + tag + "}"))
        replica = redis_cluster.replica_of(master)
        acknowledged: dict[tuple[str, str], int] = {}

        def commit_round(base: int) -> Position:
            batch = [(f"sess{n:03d}", rng.choice(CONSUMERS), base + n) for n in range(SESSIONS)]
            result = tracker.commit_many(batch)  # visible (applied) when it returns
            for session_id, consumer, offset in batch:
                key = (session_id, consumer)
                acknowledged[key] = max(acknowledged.get(key, -1), offset)
            assert result.last is not None
            return result.last

        commit_round(0)
        with paused(redis_cluster, replica):
            with redis_cluster.node(master).client(timeout=30) as client:
                for number in range(FILLERS):  # a backlog for the replica, on its master
                    client.set(f"filler:{{{tag}}}:{number}", os.urandom(FILLER_BYTES))
            applied = [commit_round(1000 * round_) for round_ in range(1, 4)]
            assert tracker.applied_position(0) == applied[-1]
            redis_cluster.kill(master)
        redis_cluster.wait_ok()  # the replica took over, without what was queued for it
        assert redis_cluster.master_of_slot(hash_slot("{" + tag + "}")) == replica
        with redis_cluster.node(replica).client() as client:
            filler = client.exists(*(f"filler:{{{tag}}}:{n}" for n in range(FILLERS)))
        behind = tracker.applied_position(0)
        assert behind is not None
        assert behind < applied[-1], "the failover lost nothing: no backlog was left behind"
        stale = missing_commits(tracker, acknowledged)
        assert stale > 0
        lag = tracker.status().lag  # verify would say 0: it compares up to the checkpoint
        assert lag > 0
        assert tracker.verify().differences == []
        # the next write notices: its fenced merge finds another checkpoint, so it catches
        # up from there, from the log
        last = commit_round(10_000)
        assert tracker.applied_position(0) == last
        lost = missing_commits(tracker, acknowledged)
        assert redis_states(tracker) == visible(fold_all(tracker.export_events()))
        assert tracker.status().lag == 0
        noscript = noscripts.sample()
        assert noscript > 0
        redis_cluster.restart(master)
    finally:
        tracker.close()
    assert lost == 0
    fault_report.fault = (
        "replica paused (SIGSTOP) with a 64 MB backlog queued before the merges, its master "
        "SIGKILLed: the promoted replica lacks writes Redis had acknowledged"
    )
    fault_report.injected = 1
    fault_report.survived = 1
    fault_report.lost = lost
    fault_report.checked = (
        "the checkpoint went back; the next merge's fence noticed and the projector applied "
        "the lost events again from the log: Redis equals the pure fold, no replay"
    )
    fault_report.detail = {
        "acknowledged_then_lost_by_redis_commits": stale,
        "checkpoint_before_kill": applied[-1].token(),
        "checkpoint_after_failover": behind.token(),
        "events_lag_after_failover": lag,
        "filler_keys_that_reached_the_replica": int(filler),
        "noscript_replies": noscript,
    }


@pytest.fixture(autouse=True)
def _settled(redis_cluster: LocalCluster) -> Iterator[None]:
    """Every node back, and the cluster settled, before and after each test."""
    for node in redis_cluster.nodes:
        if node.process.poll() is not None:
            redis_cluster.restart(node.port)
    redis_cluster.wait_ok()
    yield
