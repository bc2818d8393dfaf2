"""``tracker status`` and ``tracker project`` on the file log, as separate processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.services import stop_process
from tracker import Settings, Tracker
from tracker.events import OffsetCommitted, SessionCreated, encode_validated, utcnow
from tracker.logs.file import FileLog

TRACKER = str(Path(sys.executable).with_name("tracker"))


@pytest.fixture
def env(tmp_path: Path, redis_url: str, prefix: str) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    values.update(
        TRACKER_DATA_DIR=str(tmp_path / "data"), TRACKER_REDIS_URL=redis_url,
        TRACKER_PREFIX=prefix, TRACKER_FSYNC="0",
    )  # fmt: skip
    return values


def tracker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRACKER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def append_unprojected(env: dict[str, str], sessions: range, offset: int) -> None:
    """What a writer that died before projecting leaves: events in the log, not in Redis."""
    now = utcnow()
    events = [
        OffsetCommitted(session_id=f"p{i}", consumer="client", offset=offset, recorded_at=now)
        for i in sessions
    ]
    with FileLog(Path(env["TRACKER_DATA_DIR"]) / "log", fsync=False) as log:
        log.append(0, encode_validated(events))


def status(env: dict[str, str]) -> dict[str, object]:
    result = tracker("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    value: dict[str, object] = json.loads(result.stdout)
    return value


def test_status_shows_the_lag_and_project_once_applies_it(env: dict[str, str]) -> None:
    created = tracker(
        "sessions", "create", "--agent-id", "a", "--user-id", "u", "--id", "p0", env=env
    )
    assert created.returncode == 0, created.stderr
    append_unprojected(env, range(5), 7)
    before = status(env)
    assert before["partitions"] == [{"partition": 0, "end": "0:1:4", "applied": "0:0:0", "lag": 5}]
    assert isinstance(before["generation"], int)
    table = tracker("status", env=env).stdout
    assert "0:1:4" in table and "lag" in table

    done = tracker("project", "--once", env=env)
    assert done.returncode == 0, done.stderr
    assert "caught up on every partition" in done.stderr
    assert status(env)["partitions"] == [
        {"partition": 0, "end": "0:1:4", "applied": "0:1:4", "lag": 0}
    ]
    assert json.loads(tracker("offsets", "show", "p3", "--json", env=env).stdout) == {"client": 7}


def test_status_refuses_a_data_dir_without_a_log(env: dict[str, str]) -> None:
    result = tracker("status", env=env)
    assert result.returncode == 1
    assert "no event log" in result.stderr


def wait_until(predicate: object, timeout: float = 30) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_project_tails_the_log_and_stops_cleanly(env: dict[str, str], tmp_path: Path) -> None:
    tracker("sessions", "create", "--agent-id", "a", "--user-id", "u", "--id", "p0", env=env)
    log = tmp_path / "project.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [TRACKER, "project", "--report-every", "0.2"], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        for offset in range(1, 6):
            append_unprojected(env, range(3), offset)
            wait_until(lambda: status(env)["partitions"][0]["lag"] == 0)  # type: ignore[index]
        wait_until(lambda: "caught up on every partition" in log.read_text())
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        stop_process(process)
    assert "stopped after applying 15 events" in log.read_text()
    assert "Traceback" not in log.read_text()


def test_projectors_killed_and_restarted_leave_the_fold(
    env: dict[str, str], tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """Two projectors race and are SIGKILLed mid-work; the fence keeps Redis equal to the fold."""
    now = utcnow()
    events = [
        SessionCreated(session_id=f"k{i}", agent_id="a", user_id="u", created_at=now)
        for i in range(300)
    ]
    with FileLog(Path(env["TRACKER_DATA_DIR"]) / "log", fsync=False) as log:
        log.append(0, encode_validated(events))
        for round_ in range(30):
            commits = [
                OffsetCommitted(session_id=f"k{i}", consumer="client", offset=round_ * 1000 + i)
                for i in range(300)
            ]
            log.append(0, encode_validated(commits * 20))
    for _ in range(3):
        projectors = [
            subprocess.Popen(
                [TRACKER, "project"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            for _ in range(2)
        ]
        time.sleep(0.4)
        for process in projectors:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    done = tracker("project", "--once", env=env)
    assert done.returncode == 0, done.stderr
    settings = Settings(data_dir=Path(env["TRACKER_DATA_DIR"]), redis_url=redis_url, prefix=prefix)
    with Tracker(settings, catch_up=False) as opened:
        assert opened.status().lag == 0
        assert opened.offsets("k7") == {"client": 29 * 1000 + 7}
        assert opened.verify().differences == []


def test_the_lag_report_follows_a_replay(tmp_path: Path, redis_url: str, prefix: str) -> None:
    """A projector that applied nothing since a replay (with Kafka: one the group has given
    no partition yet) reports and rebinds instead of dying on the retired generation."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix)
    with Tracker(settings) as writer, Tracker(settings, catch_up=False) as projector:
        writer.commit_many([("p0", "client", 1)])
        assert projector.lag_report() == "caught up on every partition"
        writer.replay()
        assert "replaced by a replay" in projector.lag_report()
        assert projector.lag_report() == "caught up on every partition"
        assert projector.store.keys.generation == writer.store.keys.generation == 2
