"""Concurrency: four processes commit to the same 100 sessions while two projectors apply.

Two ``tracker serve`` processes take ``PATCH /api/sessions/{id}`` commits from a client
each, and two loops of ``tracker offsets commit`` processes commit through the CLI, while
two ``tracker project`` processes run. On Kafka the projectors are the only ones that
apply (writers only append, then wait for them); on the file log every writer also
projects what it appends, so writers and projectors all merge into the same hash fields.
Every writer follows a plan of increasing offsets per (session, consumer); some consumers
are shared by all four, so their commits race. Afterwards Redis must hold, for every
(session, consumer), the highest offset any process got acknowledged (no lost update),
and be the pure fold of the log.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.apiserver import start_server
from tests.faults.report import Figures
from tests.services import stop_process
from tracker import Settings, Tracker
from tracker.fold import SessionState
from tracker.tokens import TokenFile

TRACKER = str(Path(sys.executable).with_name("tracker"))
SESSIONS = [f"conc{n:03d}" for n in range(100)]
SHARED = ["shared", "client"]
"""Consumers every process commits to: their commits race."""
HTTP_COMMITS = 1500
"""PATCH requests per HTTP client at most (each commits one to three consumers); they are
sent until the CLI loops are done, so that all four writers overlap throughout."""
HTTP_IN_FLIGHT = 1
"""Requests each HTTP client has in flight (each waits for the projectors); more starve
the CLI processes of CPU on a 2-core machine."""
CLI_COMMITS = 6
"""``tracker offsets commit`` processes per CLI loop: each starts a Python, a producer and
waits for the projectors, seconds on a busy 2-core machine."""
WAIT_SECONDS = 120

Commit = tuple[str, str, int]
Plan = list[list[Commit]]
"""Per request (or command), the commits it carries."""


def plan_for(writer: int, requests: int, per_request: int, rng: random.Random) -> Plan:
    """``requests`` commits of increasing offsets per (session, consumer) for one writer:
    to a shared consumer or to the writer's own, over the 100 sessions."""
    last: dict[tuple[str, str], int] = {}
    plan: Plan = []
    for _ in range(requests):
        session = rng.choice(SESSIONS)
        consumers = rng.sample([*SHARED, f"own{writer}"], rng.randint(1, per_request))
        commits = []
        for consumer in consumers:
            offset = last.get((session, consumer), rng.randint(0, 20)) + rng.randint(1, 30)
            last[session, consumer] = offset
            commits.append((session, consumer, offset))
        plan.append(commits)
    return plan


class Acks:
    """The commits each writer got acknowledged, and those it did not."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: list[Commit] = []
        self.failed: list[tuple[Commit, str]] = []
        self.per_writer: Counter[str] = Counter()
        self.seconds: dict[str, list[float]] = {}

    def took(self, writer: str, seconds: float) -> None:
        with self.lock:
            self.seconds.setdefault(writer, []).append(seconds)

    def median(self, writer: str) -> float:
        times = sorted(self.seconds.get(writer, [0.0]))
        return round(times[len(times) // 2], 3)

    def record(self, writer: str, commits: list[Commit], ok: bool, why: str = "") -> None:
        with self.lock:
            if ok:
                self.acked.extend(commits)
                self.per_writer[writer] += len(commits)
            else:
                self.failed.extend((c, why) for c in commits)


def http_writer(
    url: str, token: str, plan: Plan, acks: Acks, name: str, stop: threading.Event
) -> None:
    """Sends the plan's PATCH requests, HTTP_IN_FLIGHT at a time, until it is done or ``stop``."""
    requests = iter(plan)
    taking = threading.Lock()

    def send() -> None:
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=WAIT_SECONDS) as client:
            while not stop.is_set():
                with taking:
                    commits = next(requests, None)
                if commits is None:
                    return
                body = {"consumption_offsets": {c: offset for _, c, offset in commits}}
                started = time.monotonic()
                response = client.patch(f"/api/sessions/{commits[0][0]}", json=body)
                acks.record(name, commits, response.status_code == 200, response.text)
                acks.took(name, time.monotonic() - started)

    senders = [threading.Thread(target=send) for _ in range(HTTP_IN_FLIGHT)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()


def cli_writer(env: dict[str, str], plan: Plan, acks: Acks, name: str) -> None:
    """One ``tracker offsets commit`` process after another, for the whole plan."""
    for commits in plan:
        ((session, consumer, offset),) = commits
        started = time.monotonic()
        done = subprocess.run(
            [TRACKER, "offsets", "commit", session, consumer, str(offset)],
            env=env, capture_output=True, text=True, timeout=WAIT_SECONDS, check=False,
        )  # fmt: skip
        acks.record(name, commits, done.returncode == 0, done.stderr)
        acks.took(name, time.monotonic() - started)


@pytest.fixture(params=["kafka", "file"])
def log_env(
    request: pytest.FixtureRequest, tmp_path: Path, redis_url: str, prefix: str
) -> dict[str, str]:
    """The writers' environment: a Kafka topic (projectors are processes of their own and
    writers only append), or the file log (every writer also projects what it appends, so
    the writers race the two ``tracker project`` processes on the same hash fields)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(
        TRACKER_DATA_DIR=str(tmp_path / "data"), TRACKER_REDIS_URL=redis_url,
        TRACKER_PREFIX=prefix, TRACKER_WAIT_TIMEOUT=str(WAIT_SECONDS), TRACKER_FSYNC="0",
        TRACKER_API_TOKENS_FILE=str(tmp_path / "tokens.json"),
    )  # fmt: skip
    if request.param == "kafka":
        env.update(
            TRACKER_KAFKA_BOOTSTRAP=request.getfixturevalue("kafka_bootstrap"),
            TRACKER_EVENT_TOPIC=request.getfixturevalue("kafka_topic"),
            TRACKER_PARTITIONS="4",
        )
    return env


@pytest.fixture
def projectors(log_env: dict[str, str], tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two ``tracker project`` processes (started once the log exists)."""
    with Tracker(Settings.from_env(log_env), catch_up=False):
        pass  # creates the log (the topic), so that the projectors and servers find it
    log = tmp_path / "projectors.log"
    started = []
    with ExitStack() as stack:
        for _ in range(2):
            with open(log, "ab") as out:
                process = subprocess.Popen(
                    [TRACKER, "project", "--report-every", "2"], env=log_env,
                    stdout=out, stderr=out, start_new_session=True,
                )  # fmt: skip
            stack.callback(stop_process, process)
            started.append(process)
        yield started
    assert "Traceback" not in log.read_text(errors="replace"), log.read_text()[-3000:]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# a socket of the test's own HTTP client, dropped unclosed inside httpcore when a
# keep-alive connection fails under load (seen once in CI); the server's answers are checked
@pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)
def test_four_writers_and_two_projectors_lose_no_update(
    fault_report: Figures,
    log_env: dict[str, str],
    projectors: list[subprocess.Popen[bytes]],
    tmp_path: Path,
    redis_url: str,
    prefix: str,
) -> None:
    settings = Settings.from_env(log_env)
    tokens = TokenFile(tmp_path / "tokens.json")
    secret, _ = tokens.create("write", name="writers")
    servers = []
    try:
        for _ in range(2):
            url, process, _ = start_server(tmp_path, redis_url, prefix, tmp_path / "tokens.json",
                                           **{k: v for k, v in log_env.items()
                                              if k.startswith("TRACKER_")})  # fmt: skip
            servers.append((url, process))
        with httpx.Client(base_url=servers[0][0], timeout=WAIT_SECONDS,
                          headers={"Authorization": f"Bearer {secret}"}) as client:  # fmt: skip
            for session in SESSIONS:
                body = {"id": session, "agent_id": "agent", "user_id": "user"}
                response = client.post("/api/sessions", json=body)
                assert response.status_code == 201, response.text

        rng = random.Random(13)
        plans = {
            "http0": plan_for(0, HTTP_COMMITS, 3, rng),
            "http1": plan_for(1, HTTP_COMMITS, 3, rng),
            "cli2": plan_for(2, CLI_COMMITS, 1, rng),
            "cli3": plan_for(3, CLI_COMMITS, 1, rng),
        }
        acks = Acks()
        stop = threading.Event()
        http = [
            threading.Thread(target=http_writer, args=(url, secret, plans[name], acks, name, stop))
            for name, (url, _) in zip(["http0", "http1"], servers, strict=True)
        ]
        cli = [
            threading.Thread(target=cli_writer, args=(log_env, plans[name], acks, name))
            for name in ["cli2", "cli3"]
        ]
        started = time.monotonic()
        for thread in http + cli:
            thread.start()
        for thread in cli:
            thread.join(600)
        stop.set()
        for thread in http + cli:
            thread.join(600)
            assert not thread.is_alive(), "a writer did not finish"
        seconds = time.monotonic() - started
    finally:
        for _, process in servers:
            stop_process(process)

    with Tracker(settings, catch_up=False) as tracker:
        wait_until(lambda: sum(p.lag for p in tracker.status().partitions) == 0, "the projectors")
        states: dict[str, SessionState] = {s.session_id: s for s in tracker.store.scan()}
        differences = tracker.verify().differences
    highest: dict[tuple[str, str], int] = {}
    for session, consumer, offset in acks.acked:
        highest[session, consumer] = max(highest.get((session, consumer), -1), offset)
    attempted: dict[tuple[str, str], int] = {}
    for session, consumer, offset in [*acks.acked, *(c for c, _ in acks.failed)]:
        attempted[session, consumer] = max(attempted.get((session, consumer), -1), offset)
    held = {(s, c): o for s, state in states.items() for c, o in state.offsets.items()}
    lost = sum(1 for pair, offset in highest.items() if held.get(pair, -1) < offset)
    phantom = sum(1 for pair, offset in held.items() if offset > attempted.get(pair, -1))
    commits = len(acks.acked) + len(acks.failed)
    kind = "Kafka" if "TRACKER_KAFKA_BOOTSTRAP" in log_env else "file log"
    fault_report.fault = f"4 writers (2 serve, 2 CLI loops), 2 projectors, 100 sessions, {kind}"
    fault_report.injected = commits
    fault_report.survived = len(acks.acked) if lost == 0 and not differences else 0
    fault_report.lost = lost
    fault_report.checked = "Redis holds the max acknowledged offset per pair; verify 0"
    fault_report.detail = {
        "commits": commits,
        "acknowledged": len(acks.acked),
        "not acknowledged": len(acks.failed),
        **{f"{name} acknowledged": n for name, n in sorted(acks.per_writer.items())},
        "sessions": len(SESSIONS),
        "pairs": len(attempted),
        "shared pairs": sum(1 for _, c in attempted if c in SHARED),
        "processes": 4,
        "projectors": len(projectors),
        "lost": lost,
        "phantom": phantom,
        "verify differences": len(differences),
        "seconds writing": round(seconds, 1),
        **{f"{name} median s": acks.median(name) for name in sorted(plans)},
    }
    assert acks.failed == [], acks.failed[:5]
    assert lost == 0 and phantom == 0
    assert held == attempted, "Redis is the max of every commit"
    assert differences == []
    assert all(p.poll() is None for p in projectors), "a projector died"
