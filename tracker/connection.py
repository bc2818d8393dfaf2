"""Redis clients from a URL: one server, or a Redis Cluster.

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

from typing import TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
from redis.cluster import ClusterNode, RedisCluster

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
