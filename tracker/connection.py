"""Redis clients from a URL (one server, or a Redis Cluster), and their errors turned
into the tracker's at the boundary.

``redis://``, ``rediss://`` and ``unix://`` name one server, as redis-py reads them.
``redis+cluster://`` (``rediss+cluster://`` for TLS) names a Redis Cluster by one or more
of its nodes, the form the ``limits`` library (Flask-Limiter's storage) uses::

    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?option=value...]

redis-py's :class:`~redis.cluster.RedisCluster` discovers the other nodes from any one
that answers, follows ``MOVED``/``ASK`` and, after a failover, the new masters. Options
in the query are redis-py's connection options (``socket_timeout=2``, ...). A cluster
has one database, 0.

The tracker works alike on both: every key a Lua call or a ``MULTI`` touches shares the
partition's hash tag (``keys.py``), so each is single-slot; multi-key commands and
``SCAN`` go through redis-py's cluster client, which splits them by slot and covers every
master.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeAlias, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from tracker.errors import SnapshotStoreError, SnapshotUnavailableError

Client: TypeAlias = redis.Redis | RedisCluster
"""A client of one server or of a cluster: the commands the tracker sends are the same."""
AsyncClient: TypeAlias = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
"""Each cluster scheme, and the scheme of one node's URL."""
SERVER_SCHEMES = {"redis", "rediss", "unix"}
CONNECT_TIMEOUT = 5.0


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_nodes(url: str) -> tuple[str, list[tuple[str, int]]]:
    """A ``redis+cluster://`` URL as the URL of its first node (with the credentials and
    options) and every node's ``(host, port)``; ``ValueError`` saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError("not a redis+cluster:// or rediss+cluster:// URL")
    credentials, at, hosts = parts.netloc.rpartition("@")
    nodes: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not (colon and host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{item!r} is not host:port (every node needs its port)")
        nodes.append((host, int(port)))
    if parts.path.strip("/") not in {"", "0"}:
        raise ValueError("a cluster has only database 0")
    if parts.fragment:
        raise ValueError("a fragment (#...) means nothing here")
    first = f"{credentials}{at}{hosts.split(',')[0]}"
    node_url = urlunsplit((CLUSTER_SCHEMES[parts.scheme], first, "", parts.query, ""))
    return node_url, nodes


def connect(url: str) -> Client:
    """A client for the URL (``decode_responses``); raises redis-py's errors, not ours.

    A cluster client asks a node for the cluster's layout as it is made, so an unreachable
    cluster raises here (:class:`~redis.exceptions.RedisClusterException` or a
    ``RedisError``); a one-server client connects at its first command.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT
        )
    node_url, nodes = cluster_nodes(url)
    return RedisCluster.from_url(
        node_url,
        startup_nodes=[
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in nodes[1:]
        ],
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT,
    )


def connect_async(url: str) -> AsyncClient:
    """An asyncio client for the URL, as :func:`connect`; it connects at its first command."""
    if not is_cluster_url(url):
        return redis.asyncio.Redis.from_url(
            url, decode_responses=True, socket_connect_timeout=CONNECT_TIMEOUT
        )
    node_url, nodes = cluster_nodes(url)
    return redis.asyncio.cluster.RedisCluster.from_url(
        node_url,
        startup_nodes=[redis.asyncio.cluster.ClusterNode(host, port) for host, port in nodes[1:]],
        decode_responses=True,
        socket_connect_timeout=CONNECT_TIMEOUT,
    )


def masters(client: Client) -> list[tuple[str, redis.Redis]]:
    """``(name, client)`` of each server holding the data: a cluster's masters (as the
    client last saw them), or the one server (named '')."""
    if isinstance(client, RedisCluster):
        return [
            (node.name, node.redis_connection)
            for node in client.get_primaries()  # type: ignore[no-untyped-call]
            if node.redis_connection is not None
        ]
    return [("", client)]


P = ParamSpec("P")
R = TypeVar("R")


REDIS_ERRORS = (redis.RedisError, RedisClusterException)
"""What redis-py raises: its cluster client's own exceptions do not derive from RedisError."""
_UNAVAILABLE = (
    redis.ConnectionError,
    redis.TimeoutError,
    ClusterDownError,  # CLUSTERDOWN, MASTERDOWN: a failover in progress
    TryAgainError,  # TRYAGAIN: a slot being moved
    SlotNotCoveredError,  # no node serves the slot (yet)
)


def translate(error: redis.RedisError | RedisClusterException, action: str) -> SnapshotStoreError:
    """The tracker's error for one of redis-py's, raised at the boundary: the ones that
    end by themselves (no answer, a cluster failing over) are retriable."""
    if unavailable(error):
        return SnapshotUnavailableError(f"Redis did not answer while {action}: {error}")
    return SnapshotStoreError(f"Redis refused {action}: {error}")


def unavailable(error: BaseException) -> bool:
    """Whether redis-py's error ends by itself: no answer, or a cluster failing over
    (its client says "cannot be connected" from the connection error beneath)."""
    return isinstance(error, _UNAVAILABLE) or (
        isinstance(error, RedisClusterException) and isinstance(error.__cause__, _UNAVAILABLE)
    )


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn redis-py's errors into the tracker's, at the boundary."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise translate(exc, action) from exc


def redis_boundary(action: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a method so redis-py's errors leave it as the tracker's (see :func:`translate`)."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except REDIS_ERRORS as exc:
                raise translate(exc, action) from exc

        return call

    return decorate


@redis_boundary("reading its configuration")
def check_redis(client: Client) -> list[str]:
    """Settings of the server that would silently break the projection's guarantees; in
    a cluster, of every master (a replica only evicts once promoted, and a process that
    starts after that checks it)."""
    if not isinstance(client, RedisCluster) and _cluster_enabled(client):
        raise SnapshotStoreError(
            "this Redis is a node of a Redis Cluster: name the cluster with "
            "redis+cluster://host:port[,host:port...] so that every key goes to its node"
        )
    warnings = []
    for name, node in masters(client):
        where = f" on {name}" if name else ""
        try:
            policy = node.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.ResponseError:
            warnings.append(
                f"cannot read maxmemory-policy{where} (CONFIG is disabled); make sure it is "
                "noeviction"
            )
            continue
        if policy and policy != "noeviction":
            warnings.append(
                f"Redis maxmemory-policy is {policy}{where}: it may evict snapshots and "
                "checkpoints silently; set it to noeviction"
            )
    return warnings


def _cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server is a cluster node (``False`` if it will not say)."""
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except redis.ResponseError:
        return False
