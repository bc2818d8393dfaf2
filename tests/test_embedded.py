"""The embedded redis-server: started on a unix socket in the data dir, adopted after a crash."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tracker import Settings, Tracker
from tracker.embedded import EmbeddedRedis


def test_a_server_left_by_a_crashed_process_is_adopted_and_stopped(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    crashed = EmbeddedRedis(data_dir / "redis")
    crashed.start()
    orphan: subprocess.Popen[bytes] | None = crashed._process
    assert orphan is not None and orphan.poll() is None, "the server is running"
    crashed._process = None  # its owner "died" without stopping it
    try:
        with Tracker(Settings(data_dir=data_dir)) as tracker:
            created = tracker.create_session("a", "u", session_id="s1")
        assert orphan.wait(timeout=10) == 0  # shut down cleanly by the adopting tracker
        assert not crashed.socket.exists()
        with Tracker(Settings(data_dir=data_dir)) as tracker:  # state intact
            assert tracker.get_session("s1") == created
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
