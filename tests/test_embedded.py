"""The embedded redis-server: one per data dir, shared by its processes, never two on one AOF."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.services import pid_alive, stop_process
from tracker import Settings, SnapshotUnavailableError, Tracker
from tracker.embedded import EmbeddedRedis


def servers_on(directory: Path) -> list[int]:
    """PIDs of live redis-server processes whose command line names ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:  # it just exited
            continue
        named = b"redis-server" in command and str(directory).encode() in command
        if named and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def server_pid(data_dir: Path) -> int:
    return int((data_dir / "redis" / "redis.pid").read_text())


def holder(data_dir: Path, ready: Path, *, embedded_only: bool = False) -> subprocess.Popen[bytes]:
    """A process that opens the data dir (a tracker, or only its Redis) and sleeps."""
    opener = (
        f"EmbeddedRedis(pathlib.Path({str(data_dir / 'redis')!r})).start()"
        if embedded_only
        else f"Tracker(Settings(data_dir=pathlib.Path({str(data_dir)!r}), fsync=False))"
    )
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from tracker import Settings, Tracker
        from tracker.embedded import EmbeddedRedis
        held = {opener}
        pathlib.Path({str(ready)!r}).write_text("ok")
        time.sleep(120)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert process.poll() is None, "the holder exited early"
        assert time.monotonic() < deadline, "the holder did not start"
        time.sleep(0.02)
    return process


def test_a_server_left_by_a_killed_process_is_joined_and_stopped(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = holder(data_dir, tmp_path / "ready", embedded_only=True)
    orphan = server_pid(data_dir)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    try:
        assert pid_alive(orphan), "the server outlives the process that started it"
        with Tracker(Settings(data_dir=data_dir)) as tracker:
            created = tracker.create_session("a", "u", session_id="s1")
            assert server_pid(data_dir) == orphan, "joined, not a second server"
        deadline = time.monotonic() + 10
        while pid_alive(orphan) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not pid_alive(orphan), "the last process to leave shut it down"
        with Tracker(Settings(data_dir=data_dir)) as tracker:  # state intact
            assert tracker.get_session("s1") == created
    finally:
        if pid_alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_processes_on_one_data_dir_share_one_server(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = holder(data_dir, tmp_path / "ready")
    try:
        shared = server_pid(data_dir)
        with Tracker(Settings(data_dir=data_dir, fsync=False)) as tracker:
            tracker.create_session("a", "u", session_id="s1")
            assert server_pid(data_dir) == shared
        assert pid_alive(shared), "still in use by the other process"
        with Tracker(Settings(data_dir=data_dir, fsync=False)) as tracker:
            assert tracker.get_session("s1") is not None
    finally:
        stop_process(process)
    embedded = EmbeddedRedis(data_dir / "redis")
    embedded.start()
    embedded.stop()
    assert not pid_alive(shared)


def test_a_frozen_server_is_never_bypassed(tmp_path: Path) -> None:
    """A second redis-server on the same AOF files would corrupt them: refuse instead."""
    data_dir = tmp_path / "data"
    with Tracker(Settings(data_dir=data_dir, fsync=False)) as tracker:
        tracker.create_session("a", "u", session_id="s1")
        frozen = server_pid(data_dir)
        os.kill(frozen, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(SnapshotUnavailableError, match=f"pid {frozen}") as info:
                Tracker(Settings(data_dir=data_dir, fsync=False), catch_up=False)
            assert time.monotonic() - started < 30
            assert info.value.retriable
            assert server_pid(data_dir) == frozen
            assert servers_on(data_dir / "redis") == [frozen], "no second server was started"
        finally:
            os.kill(frozen, signal.SIGCONT)
        assert tracker.get_session("s1") is not None
