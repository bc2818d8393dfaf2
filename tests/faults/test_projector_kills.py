"""Projectors SIGKILLed repeatedly: during ``tracker replay`` and during live projection.

Which projecting roles exist (DESIGN.md, ``tracker/projector.py``): on both backends
``tracker replay`` rebuilds the projection into a new generation and promotes it; with
Kafka, ``tracker project`` processes apply the log (commands only append); with the file
log every writer projects what it appends, and ``tracker project`` may run too. So:

* replay, file log: a log of 200,000 mixed events over 20,000 sessions is replayed and the
  replay killed at random points of its work (a delay drawn from a seeded RNG, uniform
  over the time an unkilled replay takes from starting its generation to exiting), several
  times; after each kill the active projection must still hold the whole log and equal its
  pure fold (2,000 sessions sampled, and the count of snapshots), and a last replay
  completes, leaving no keys of the killed replays' generations;
* live projection: two ``tracker project`` processes apply a log that another process
  appends to all along; one of them, chosen at random, is killed at a random moment and
  restarted, again and again. On Kafka, and on the file log (where the appender projects
  too). At the end, with the appender stopped and the projection caught up, Redis must
  equal the pure fold of the log, which must hold every event the appender was told was
  appended;
* the one moment of a replay that random kills cannot aim at, between retiring the active
  generation and promoting its own, is hit by a replay that SIGKILLs itself there: the
  tracker must go on working (a read rebuilds the projection; a replay runs).

"Equal to the pure fold" is ``tracker.rebuild``'s comparison: every session of
``fold_all`` of the whole log (``visible``) against every snapshot Redis holds, and
``tracker verify`` reporting 0 differences. The seed is printed; ``FAULTS_SEED=N``
repeats a run.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.faults.report import Figures
from tests.faults.workload import creations, mixed, seeded, session_names
from tests.services import stop_process
from tests.test_workers import env_for
from tests.test_workers_kafka import Harness, Process, harness
from tracker import Settings, Tracker
from tracker.fold import SessionState, fold_all, visible
from tracker.generations import Generations
from tracker.keys import Keys, partition_for
from tracker.logs import events_of, open_log
from tracker.rebuild import describe_difference
from tracker.snapshots import RETIRED, parse_partial

__all__ = ["harness"]  # the Kafka worker tests' fixture: a world of its own per test

pytestmark = pytest.mark.timeout(900)

REPO = Path(__file__).resolve().parents[2]
REPLAY_EVENTS = 200_000
REPLAY_SESSIONS = 20_000
REPLAY_KILLS = 6
CHECKED_AFTER_KILL = 2_000
"""Sessions compared with the fold after each kill (all of them at the end)."""
LIVE_SESSIONS = 2_000
LIVE_KILLS = 8
LIVE_KILL_AFTER = (0.5, 3.0)
"""A projector is killed at a moment drawn uniformly from this many seconds after the
previous kill (or the start)."""


def pure_fold(settings: Settings) -> tuple[dict[str, SessionState], int]:
    """The fold of the whole log, as a projection holds it; and how many events it has."""
    log = open_log(settings, create=False)
    try:
        count = 0

        def counted() -> Iterator[object]:
            nonlocal count
            for event in events_of(log):
                count += 1
                yield event

        return visible(fold_all(counted())), count  # type: ignore[arg-type]
    finally:
        log.close()


@contextlib.contextmanager
def projection(settings: Settings) -> Iterator[Generations]:
    """The projection under the settings' prefix, bound to its active generation."""
    assert settings.redis_url is not None
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    generations = Generations(client, settings.prefix)
    try:
        yield generations
    finally:
        generations.close()
        client.close()


def differences(
    settings: Settings, expected: dict[str, SessionState], sample: list[str] | None = None
) -> list[str]:
    """Every session on which Redis's active generation and ``expected`` differ, in words;
    with ``sample``, those sessions only, and whether the generation holds as many
    snapshots as ``expected`` and has applied the whole log."""
    with projection(settings) as generations:
        assert generations.refresh(), "Redis holds no projection"
        store = generations.store
        if sample is None:
            actual = {state.session_id: state for state in store.scan()}
            ids = sorted(expected.keys() | actual.keys())
            problems = []
        else:
            partitions = store.keys.partitions
            states = store.get_many([(partition_for(sid, partitions), sid) for sid in sample])
            actual = {sid: state for sid, state in zip(sample, states, strict=True) if state}
            ids = sample
            problems = [] if store.count() == len(expected) else [f"{store.count()} snapshots"]
            log = open_log(settings, create=False)
            try:
                ends = [log.end(p) for p in range(partitions)]
            finally:
                log.close()
            applied = [store.applied(p) for p in range(partitions)]
            if applied != ends:
                problems.append(f"applied {applied}, the log ends at {ends}")
    return problems + [
        f"{sid}: {problem}"
        for sid in ids
        if (problem := describe_difference(expected.get(sid), actual.get(sid)))
    ]


def verify_cli(env: dict[str, str]) -> dict[str, object]:
    """``tracker verify --json``: exit 0 with no difference, or 1 with some."""
    done = subprocess.run([sys.executable, "-m", "tracker", "verify", "--json"], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, object] = json.loads(done.stdout)
    return report


def start(name: str, argv: list[str], env: dict[str, str], workdir: Path) -> Process:
    """``python -m ARGV...`` in its own session, its output in ``workdir/name.log``."""
    log = workdir / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [sys.executable, "-m", *argv], env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Process(name, popen, log)


# -- replay ----------------------------------------------------------------------------


@dataclass
class ReplayKill:
    delay: float
    generation: int
    phase: str
    """Where the replay was: "folding" (nothing merged yet), "merging i/n" (chunk i of n
    of a batch merged), "merged" (applied up to a batch's end), "promoted" (its
    generation active: it died retiring the old one)."""
    differences: list[str]
    """How the active projection differed from the fold after the kill (sampled)."""


def phase_of(token: str, promoted: bool) -> str:
    """What a replay's checkpoint token says about where it died."""
    if promoted:
        return "promoted"
    if not token:
        return "folding"
    partial = parse_partial(token)
    if partial is not None:
        return f"merging {partial[2]}/{partial[3]}"
    return "merged"


def test_replays_killed_at_random_points_leave_the_projection_whole(
    tmp_path: Path, redis_url: str, prefix: str, fault_report: Figures
) -> None:
    seed, rng = seeded("replay")
    env = env_for(tmp_path / "data", redis_url, prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    settings = Settings.from_env(env).with_overrides(fsync=False)
    sessions = session_names(REPLAY_SESSIONS)
    load = creations(sessions) + mixed(
        random.Random(seed), sessions, REPLAY_EVENTS - REPLAY_SESSIONS
    )
    with Tracker(settings, catch_up=False) as tracker:
        tracker.writer.import_events(load)  # the log only: the replays build the projection
    expected, events = pure_fold(settings)
    assert events == REPLAY_EVENTS
    meta = Keys.meta(prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def begun() -> int:
        return int(client.hget(meta, "next_generation") or 0)

    def replay() -> tuple[Process, int, float]:
        """A replay, once it has begun its generation: the process, the generation, when."""
        before = begun()
        process = start(f"replay-{before}", ["tracker", "replay", "--json"], env, tmp_path)
        deadline = time.monotonic() + 120
        while (generation := begun()) == before:
            assert process.popen.poll() is None, process.tail()
            assert time.monotonic() < deadline, f"the replay did not begin:\n{process.tail()}"
            time.sleep(0.002)
        return process, generation, time.monotonic()

    try:
        process, _, began = replay()
        assert process.popen.wait(timeout=300) == 0, process.tail()
        work = time.monotonic() - began
        assert not differences(settings, expected)
        kills: list[ReplayKill] = []
        completed = 0
        while len(kills) < REPLAY_KILLS:
            assert completed < 3 * REPLAY_KILLS, f"{completed} replays ended before their kill"
            process, generation, began = replay()
            delay = rng.uniform(0, work)
            time.sleep(max(0.0, began + delay - time.monotonic()))
            process.kill()
            if process.popen.returncode == 0:  # it ended first: replays vary with the load
                completed += 1
                work = min(work, time.monotonic() - began)
                continue
            token = str(client.get(Keys(prefix, generation, 1).checkpoint(0)) or "")
            promoted = int(client.hget(meta, "generation") or 0) == generation
            wrong = differences(settings, expected, rng.sample(sessions, CHECKED_AFTER_KILL))
            kills.append(ReplayKill(round(delay, 3), generation, phase_of(token, promoted),
                                    wrong))  # fmt: skip
        leftovers_before = orphan_keys(client, prefix)
        process, _, _ = replay()
        assert process.popen.wait(timeout=300) == 0, process.tail()
        final = json.loads(process.output().strip().splitlines()[-1])
    finally:
        client.close()
    after = differences(settings, expected)
    with redis.Redis.from_url(redis_url, decode_responses=True) as check:
        leftovers = orphan_keys(check, prefix)
    verified = verify_cli(env)
    phases = [k.phase.split()[0] for k in kills]
    fault_report.fault = "SIGKILL of `tracker replay` at a random point of its work (file log)"
    fault_report.injected = len(kills)
    fault_report.survived = sum(1 for k in kills if not k.differences)
    fault_report.lost = len(after)
    fault_report.checked = (
        "after each kill the active projection = fold of the log (sampled); a last replay: "
        "Redis = fold, verify 0 differences, no keys of killed generations left"
    )
    fault_report.detail = {
        "seed": seed,
        "events": events,
        "sessions": len(expected),
        "kills": len(kills),
        "kills_folding": phases.count("folding"),
        "kills_merging": phases.count("merging") + phases.count("merged"),
        "kills_after_promotion": phases.count("promoted"),
        "phases_at_kills": ", ".join(k.phase for k in kills),
        "replay_seconds": round(work, 2),
        "replays_ended_before_their_kill": completed,
        "keys_of_killed_generations_before_last_replay": leftovers_before,
        "keys_of_killed_generations_after": leftovers,
        "final_replay_events": final["events"],
        "sessions_checked_after_each_kill": CHECKED_AFTER_KILL,
        "differences_after_kills": sum(len(k.differences) for k in kills),
        "differences_at_end": len(after),
        "verify_differences": len(verified["differences"]),  # type: ignore[arg-type]
    }
    assert not [k for k in kills if k.differences], f"seed {seed}: {kills}"
    assert not after, f"seed {seed}: {after[:5]}"
    assert leftovers == 0, f"seed {seed}: {leftovers} keys of killed generations left"
    assert verified["differences"] == [], verified


_GENERATION = re.compile(r":g(\d+):")


def orphan_keys(client: redis.Redis, prefix: str) -> int:
    """Keys of generations other than the active one, retired checkpoints aside (those are
    kept by design: a process still bound there must find its generation retired)."""
    active = int(client.hget(Keys.meta(prefix), "generation") or 0)
    found = 0
    for key in client.scan_iter(match=f"{prefix}:g*", count=1000):
        match = _GENERATION.search(str(key))
        if match and int(match.group(1)) != active:
            if str(key).endswith(":cp") and client.get(key) == RETIRED:
                continue
            found += 1
    return found


# -- live projection -------------------------------------------------------------------


@dataclass
class LiveKill:
    victim: str
    delay: float
    partials: int
    """Partitions whose checkpoint was left between two chunks of a batch by the kill."""


@dataclass
class Live:
    """Two ``tracker project`` processes and an appender, all on ``settings``."""

    settings: Settings
    env: dict[str, str]
    workdir: Path
    processes: list[Process] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, argv: list[str]) -> Process:
        process = start(name, argv, self.env, self.workdir)
        self.processes.append(process)
        return process

    def projector(self, name: str) -> Process:
        count = self.restarts.get(name, -1) + 1
        self.restarts[name] = count
        return self.start(f"project-{name}-{count}", ["tracker", "project", "--report-every", "1"])

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process.popen)

    def partials(self) -> int:
        with projection(self.settings) as generations:
            if not generations.refresh():
                return 0
            tokens = [
                generations.client.get(generations.store.keys.checkpoint(p))
                for p in range(generations.store.keys.partitions)
            ]
        return sum(1 for token in tokens if token and parse_partial(str(token)) is not None)

    def lag(self) -> int:
        with Tracker(self.settings, catch_up=False) as view:
            return view.status().lag


def alive(processes: list[Process]) -> None:
    for process in processes:
        if process.popen.poll() is not None:
            pytest.fail(f"{process.name} exited with {process.popen.returncode}:\n{process.tail()}")


def project_live_while_killing(
    live: Live, seed: int, rng: random.Random, fault_report: Figures, backend: str
) -> None:
    sessions = session_names(LIVE_SESSIONS)
    with Tracker(live.settings, catch_up=False) as tracker:
        tracker.writer.import_events(creations(sessions))
    path = os.pathsep.join(filter(None, [str(REPO), live.env.get("PYTHONPATH")]))
    live.env.update(WORKLOAD_SEED=str(seed), WORKLOAD_SESSIONS=str(LIVE_SESSIONS), PYTHONPATH=path)
    projectors = {name: live.projector(name) for name in ("a", "b")}
    appender = live.start("appender", ["tests.faults.workload"])
    kills: list[LiveKill] = []
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 120
        while not appender.output().strip():
            alive([appender, *projectors.values()])
            assert time.monotonic() < deadline, "the appender appended nothing"
            time.sleep(0.05)
        for _ in range(LIVE_KILLS):
            delay = rng.uniform(*LIVE_KILL_AFTER)
            until = time.monotonic() + delay
            while time.monotonic() < until:
                alive([appender, *projectors.values()])
                time.sleep(0.02)
            victim = rng.choice(sorted(projectors))
            projectors[victim].kill()
            kills.append(LiveKill(victim, round(delay, 3), live.partials()))
            projectors[victim] = live.projector(victim)
        appending = time.monotonic() - started
        os.kill(appender.pid, signal.SIGTERM)
        assert appender.popen.wait(timeout=120) == 0, appender.tail()
        appended = int(appender.output().split()[-1])
        deadline = time.monotonic() + 300
        while (lag := live.lag()) > 0:
            alive(list(projectors.values()))
            assert time.monotonic() < deadline, f"the projectors are {lag} events behind"
            time.sleep(0.25)
        for process in projectors.values():  # SIGTERM once it runs (it reports each second)
            while "project:" not in process.output():
                alive([process])
                assert time.monotonic() < deadline, f"{process.name} never reported"
                time.sleep(0.05)
            assert process.terminate() == 0, process.tail()
    finally:
        live.stop_all()
    expected, events = pure_fold(live.settings)
    wrong = differences(live.settings, expected)
    verified = verify_cli(live.env)
    missing = max(0, LIVE_SESSIONS + appended - events)
    fault_report.fault = (
        f"SIGKILL of one of two `tracker project` at a random moment while another process "
        f"appends ({backend})"
    )
    fault_report.injected = len(kills)
    fault_report.survived = len(kills) if not (wrong or missing or verified["differences"]) else 0
    fault_report.lost = missing + len(wrong)
    fault_report.checked = (
        "the log holds every acknowledged append; Redis = fold of the whole log (every "
        "session compared), verify 0 differences"
    )
    fault_report.detail = {
        "seed": seed,
        "kills": len(kills),
        "restarts": sum(live.restarts.values()),
        "kills_leaving_a_batch_half_merged": sum(1 for k in kills if k.partials),
        "seconds_appending_under_kills": round(appending, 1),
        "events_appended": appended,
        "events_in_log": events,
        "sessions": len(expected),
        "events_missing_from_log": missing,
        "sessions_differing_from_fold": len(wrong),
        "verify_events": int(verified["events"]),  # type: ignore[call-overload]
        "verify_differences": len(verified["differences"]),  # type: ignore[arg-type]
    }
    assert events == LIVE_SESSIONS + appended, f"seed {seed}: {events} events in the log"
    assert not wrong, f"seed {seed}: {len(wrong)} sessions differ: {wrong[:5]}"
    assert verified["differences"] == [], verified


def test_projectors_killed_during_live_projection_on_kafka(
    harness: Harness, fault_report: Figures
) -> None:
    seed, rng = seeded("live kafka")
    h = harness
    live = Live(h.settings, dict(h.env), h.workdir)
    project_live_while_killing(live, seed, rng, fault_report, "Kafka log")


def test_projectors_killed_during_live_projection_on_the_file_log(
    tmp_path: Path, redis_url: str, prefix: str, fault_report: Figures
) -> None:
    seed, rng = seeded("live file")
    env = env_for(tmp_path / "data", redis_url, prefix)
    live = Live(Settings.from_env(env), env, tmp_path)
    project_live_while_killing(live, seed, rng, fault_report, "file log; the appender projects too")


# -- a replay killed between retiring the active generation and promoting its own ------------

KILLED_WHILE_PROMOTING = """
import os, signal
from tracker.generations import Generations

retire = Generations._poison


def retire_then_die(self, meta):
    retire(self, meta)
    os.kill(os.getpid(), signal.SIGKILL)


Generations._poison = retire_then_die
from tracker.cli import main

main(["replay"])
"""
"""``tracker replay``, SIGKILLed by itself at the one moment random kills cannot aim at:
the active generation's checkpoints just set to ``retired``, its own not yet promoted."""


def test_a_replay_killed_between_retiring_and_promoting_leaves_the_tracker_working(
    tmp_path: Path, redis_url: str, prefix: str, fault_report: Figures
) -> None:
    """Killed there twice. After the first kill a command that reads (and so projects,
    on the file log) must answer from the fold, rebuilding the projection, and the others
    work; after the second, ``tracker replay`` must run. Before the fix, every command,
    replay included, exited 75 ("generation N was replaced by a replay") for good."""
    seed, rng = seeded("promoting")
    env = env_for(tmp_path / "data", redis_url, prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    settings = Settings.from_env(env).with_overrides(fsync=False)
    sessions = session_names(2_000)
    with Tracker(settings) as tracker:
        tracker.writer.import_events(creations(sessions) + mixed(rng, sessions, 20_000))
        tracker.replay()
    expected, _ = pure_fold(settings)
    sid = sessions[0]

    def tracker_cli(*argv: str) -> tuple[int, str]:
        done = subprocess.run([sys.executable, "-m", "tracker", *argv], env=env,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        return done.returncode, (done.stdout if done.returncode == 0 else done.stderr).strip()

    def kill_while_promoting() -> None:
        with redis.Redis.from_url(redis_url, decode_responses=True) as client:
            active = int(client.hget(Keys.meta(prefix), "generation") or 0)
            killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_PROMOTING], env=env,
                                    capture_output=True, timeout=300, check=False)  # fmt: skip
            assert killed.returncode == -signal.SIGKILL, killed.stderr
            assert int(client.hget(Keys.meta(prefix), "generation") or 0) == active
            assert client.get(Keys(prefix, active, 1).checkpoint(0)) == RETIRED

    kill_while_promoting()
    outcomes = {"offsets show": tracker_cli("offsets", "show", sid, "--json")}
    shown = json.loads(outcomes["offsets show"][1]) if outcomes["offsets show"][0] == 0 else None
    outcomes["status"] = tracker_cli("status", "--json")
    outcomes["commit"] = tracker_cli("offsets", "commit", sid, "client", "99999999")
    outcomes["verify"] = tracker_cli("verify", "--json")
    kill_while_promoting()
    outcomes["replay"] = tracker_cli("replay", "--json")
    outcomes["verify again"] = tracker_cli("verify", "--json")
    failed = {name: outcome for name, outcome in outcomes.items() if outcome[0] != 0}
    wrong_offsets = shown != expected[sid].offsets
    expected, events = pure_fold(settings)  # with the commit, if it was made
    wrong = differences(settings, expected)
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        leftovers = orphan_keys(client, prefix)
    fault_report.fault = (
        "SIGKILL of `tracker replay` between retiring the old generation and promoting its own"
    )
    fault_report.injected = 2
    fault_report.survived = 2 if not (failed or wrong or wrong_offsets or leftovers) else 0
    fault_report.lost = len(wrong)
    fault_report.checked = (
        "a read answers from the fold; status, a commit, replay and verify work; Redis = fold"
    )
    fault_report.detail = {
        "seed": seed,
        "events": events,
        "sessions": len(expected),
        "commands_failing_afterwards": len(failed),
        "sessions_differing_from_fold": len(wrong),
        "keys_of_killed_generations_after": leftovers,
    }
    assert not failed, f"seed {seed}: after the kill: {failed}"
    assert not wrong_offsets, f"offsets show {sid}: {shown}, the fold has {expected[sid].offsets}"
    assert not wrong, f"seed {seed}: {wrong[:5]}"
    assert leftovers == 0
