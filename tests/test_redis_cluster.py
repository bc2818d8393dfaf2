"""The tracker on a Redis Cluster: three masters with a replica each, real processes.

The quick checks run here, on one cluster for the module (``redis_cluster``): the
``redis+cluster://`` URL, projection, queries, lists, replay and verify through the CLI,
the partitions' hash tags spread over the masters (with the Kafka log's 12 partitions),
the HTTP fast path's asyncio cluster client, and the merge script reloaded after
``SCRIPT FLUSH``. Failovers and killed masters are in ``tests/faults/test_redis_cluster.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import prefix_for
from tests.services import LocalCluster, free_port, projecting
from tests.test_cli import Cli
from tracker import Settings, Tracker
from tracker.api.auth import Auth
from tracker.api.context import Api
from tracker.api.fastpath import FastPath
from tracker.connection import cluster_nodes, connect
from tracker.errors import ConfigError, SnapshotStoreError, SnapshotUnavailableError
from tracker.fold import fold_all, visible
from tracker.keys import Keys, hash_slot
from tracker.settings import mask_url
from tracker.tokens import TokenFile


def noscript_errors(cluster: LocalCluster) -> int:
    """How many ``NOSCRIPT`` replies the live nodes sent (``INFO errorstats``)."""
    total = 0
    for node in cluster.alive():
        with node.client() as client:
            stats = client.info("errorstats").get("errorstat_NOSCRIPT", {})
            total += int(stats.get("count", 0))
    return total


@pytest.fixture
def cluster_prefix(request: pytest.FixtureRequest) -> str:
    """This test's own prefix (the cluster is the module's; nothing to clean up)."""
    return prefix_for(request.node.nodeid, request.node.name)


def settings_on(cluster: LocalCluster, tmp_path: Path, prefix: str, **more: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=cluster.url, prefix=prefix, **more)


# -- the URL ---------------------------------------------------------------------------


def test_a_cluster_is_named_by_redis_plus_cluster_urls() -> None:
    url = "redis+cluster://ops:s3cret@10.0.0.1:7000,10.0.0.2:7001/0?socket_timeout=2"
    assert cluster_nodes(url) == (
        "redis://ops:s3cret@10.0.0.1:7000?socket_timeout=2",
        [("10.0.0.1", 7000), ("10.0.0.2", 7001)],
    )
    assert cluster_nodes("rediss+cluster://[::1]:7000") == ("rediss://[::1]:7000", [("::1", 7000)])
    assert Settings.from_env({"TRACKER_REDIS_URL": url}).redis_url == url
    assert "s3cret" not in str(mask_url(url)) and "s3cret" not in repr(Settings(redis_url=url))
    for bad, problem in [
        ("redis+cluster://10.0.0.1", "'10.0.0.1' is not host:port"),
        ("redis+cluster://10.0.0.1:7000,:7001", "':7001' is not host:port"),
        ("redis+cluster://10.0.0.1:70000", "is not host:port"),
        ("redis+cluster://10.0.0.1:7000/2", "a cluster has only database 0"),
        ("redis-cluster://10.0.0.1:7000", "nor a Redis Cluster's redis+cluster://host:port"),
    ]:
        with pytest.raises(ConfigError, match=f"^TRACKER_REDIS_URL: .*{re.escape(problem)}"):
            Settings.from_env({"TRACKER_REDIS_URL": bad})


def test_a_wrong_url_says_what_is_wrong(
    redis_cluster: LocalCluster, redis_url: str, tmp_path: Path
) -> None:
    nobody = f"redis+cluster://127.0.0.1:{free_port()}"
    with pytest.raises(SnapshotUnavailableError, match="cannot reach Redis at redis\\+cluster"):
        Tracker(Settings(data_dir=tmp_path / "a", redis_url=nobody))
    # a plain server named as a cluster, and a cluster node named as a plain server
    server = redis_url.replace("redis://", "redis+cluster://", 1).rsplit("/", 1)[0]
    with pytest.raises(SnapshotStoreError, match="Cluster mode is not enabled"):
        Tracker(Settings(data_dir=tmp_path / "b", redis_url=server))
    node = f"redis://{redis_cluster.nodes[0].address}/0"
    with pytest.raises(SnapshotStoreError, match="a node of a Redis Cluster: name the cluster"):
        Tracker(Settings(data_dir=tmp_path / "c", redis_url=node))


# -- the CLI end to end ----------------------------------------------------------------


def test_the_cli_projects_lists_replays_and_verifies_on_a_cluster(
    redis_cluster: LocalCluster, tmp_path: Path, cluster_prefix: str
) -> None:
    cli = Cli(tmp_path / "data", redis_cluster.url, cluster_prefix)
    for number in range(6):
        cli.create(f"sess{number}", agent=f"agent{number % 2}", user=f"user{number % 3}")
        cli.ok("offsets", "commit", f"sess{number}", "client", str(10 + number))
    cli.ok("offsets", "commit", "sess0", "client", "3")  # stale: changes nothing
    cli.ok("offsets", "commit", "sess0", "notifier", "4")
    cli.ok("sessions", "delete", "sess5")
    assert cli.json("sessions", "show", "sess0")["consumption_offsets"] == {
        "client": 10,
        "notifier": 4,
    }
    by_user = cli.json_lines("sessions", "list", "--user-id", "user1", "--json")
    assert sorted(s["id"] for s in by_user) == ["sess1", "sess4"]
    by_agent = cli.json_lines("sessions", "list", "--agent-id", "agent1", "--json")
    assert sorted(s["id"] for s in by_agent) == ["sess1", "sess3"]  # sess5 was deleted
    every = cli.json_lines("sessions", "list", "--json")
    assert sorted(s["id"] for s in every) == [f"sess{n}" for n in range(5)]
    replayed = json.loads(cli.ok("replay", "--json").stdout)
    assert (replayed["events"], replayed["sessions"]) == (15, 6)  # the tombstone counts
    assert "0 differences" in cli.ok("verify").stdout
    assert cli.json_lines("sessions", "list", "--user-id", "user1", "--json") == by_user
    status = cli.json("status")
    assert status["generation"] == replayed["generation"]
    assert [part["lag"] for part in status["partitions"]] == [0]


# -- partitions over the masters -------------------------------------------------------


def masters_of_partitions(cluster: LocalCluster, keys: Keys) -> dict[int, list[int]]:
    """Master port -> the partitions whose checkpoint key (hash tag) it serves."""
    owners: dict[int, list[int]] = {}
    for partition in range(keys.partitions):
        owner = cluster.master_of_slot(hash_slot(keys.checkpoint(partition)))
        owners.setdefault(owner, []).append(partition)
    return owners


def test_twelve_partitions_spread_over_the_masters_and_project_there(
    redis_cluster: LocalCluster,
    tmp_path: Path,
    cluster_prefix: str,
    kafka_bootstrap: str,
    kafka_topic: str,
) -> None:
    settings = settings_on(
        redis_cluster, tmp_path, cluster_prefix,
        kafka_bootstrap=kafka_bootstrap, event_topic=kafka_topic, partitions=12, wait_timeout=60,
    )  # fmt: skip
    with projecting(settings), Tracker(settings) as tracker:
        ids = [f"s{n:03d}" for n in range(120)]
        for sid in ids:
            tracker.create_session(f"agent{int(sid[1:]) % 4}", f"user{int(sid[1:]) % 5}",
                                   session_id=sid, wait=False)  # fmt: skip
        result = tracker.commit_many(
            [(sid, consumer, n) for n, sid in enumerate(ids) for consumer in ("client", "b")],
            wait=False,
        )
        for position in result.positions:
            tracker.wait_for(position, 60)
        assert len({p.partition for p in result.positions}) == 12
        keys = tracker.store.keys
        owners = masters_of_partitions(redis_cluster, keys)
        # every master serves some partitions: 4 each, as the tags split the slots in 12
        assert sorted(owners) == redis_cluster.masters()
        assert sorted(len(parts) for parts in owners.values()) == [4, 4, 4]
        # and holds their sessions: each master's own keyspace, read on that node
        for master, partitions in owners.items():
            with redis_cluster.node(master).client() as node:
                here = {str(k) for k in node.scan_iter(match=f"{cluster_prefix}:g*:s:*")}
            assert here, master
            assert {k.split("}:s:")[0] + "}" for k in here} == {
                keys.session_prefix(p)[: -len(":s:")] for p in partitions
            }
        assert tracker.verify().differences == []
        assert len(tracker.list_sessions()) == 120
        assert [s.id for s in tracker.list_sessions(user_id="user3")] == ids[3::5]
        assert [s.id for s in tracker.list_sessions(agent_id="agent1")] == ids[1::4]
        report = tracker.replay()
        assert (report.events, report.sessions) == (360, 120)
        assert tracker.verify().differences == []
        expected = visible(fold_all(tracker.export_events()))
        assert {sid: tracker.offsets(sid) for sid in ids} == {
            sid: state.offsets for sid, state in expected.items()
        }
        # replay dropped the older generations' keys on every master (SCAN covers them
        # all), but for their poisoned checkpoints
        active = f"{cluster_prefix}:g{report.generation}:"
        with connect(redis_cluster.url) as client:
            older = [
                str(key)
                for key in client.scan_iter(match=f"{cluster_prefix}:g*")
                if not str(key).startswith(active)
            ]
            assert older and {client.get(key) for key in older} == {"retired"}
        assert all(key.endswith(":cp") for key in older) and len(older) % 12 == 0


# -- the HTTP fast path --------------------------------------------------------------


def test_the_fast_path_reads_the_cluster(
    redis_cluster: LocalCluster, tmp_path: Path, cluster_prefix: str
) -> None:
    settings = settings_on(redis_cluster, tmp_path, cluster_prefix)
    with Tracker(settings) as tracker:
        session = tracker.create_session("agentAAAAA", "userAAAAAA", title="on a cluster")
        tracker.commit(session.id, "client", 41)
        applied = tracker.applied_position(0)
        assert applied is not None
    tokens = TokenFile(tmp_path / "tokens.json")
    token, _ = tokens.create("read", name="reader")
    api = Api(settings, Auth(tokens))
    api.open()
    delegated: list[str] = []

    async def litestar(scope: Any, receive: Any, send: Any) -> None:
        delegated.append(scope["path"])

    fast = FastPath(litestar, api)

    async def get(path: str) -> list[Any]:
        sent: list[Any] = []
        headers = [(b"authorization", f"Bearer {token}".encode())]
        scope = {"type": "http", "method": "GET", "path": path, "root_path": "",
                 "query_string": b"", "headers": headers}  # fmt: skip

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        try:
            await fast(scope, receive, send)
        finally:
            await fast.close()
        return sent

    try:
        start, body = asyncio.run(get(f"/api/sessions/{session.id}"))
        assert delegated == [], "the fast path handed the request on instead of reading"
        assert start["status"] == 200
        assert json.loads(body["body"])["consumption_offsets"] == {"client": 41}
        assert dict(start["headers"])[b"x-tracker-position"] == applied.token().encode()
        missing, _ = asyncio.run(get("/api/sessions/nosuchid12"))
        assert missing["status"] == 404 and delegated == []
    finally:
        api.close()


# -- scripts and configuration ---------------------------------------------------------


def test_a_flushed_script_cache_is_loaded_again(
    redis_cluster: LocalCluster, tmp_path: Path, cluster_prefix: str
) -> None:
    with Tracker(settings_on(redis_cluster, tmp_path, cluster_prefix)) as tracker:
        session = tracker.create_session("agent", "user")
        before = noscript_errors(redis_cluster)
        for node in redis_cluster.alive():
            with node.client() as client:
                client.script_flush()
        tracker.commit(session.id, "client", 7)  # merge.lua: NOSCRIPT, loaded, sent again
        after_merge = noscript_errors(redis_cluster)
        assert after_merge > before
        assert tracker.offsets(session.id) == {"client": 7}
        for node in redis_cluster.alive():
            with node.client() as client:
                client.script_flush()
        assert tracker.replay().sessions == 1  # the generation scripts, then merge.lua
        assert noscript_errors(redis_cluster) > after_merge
        assert tracker.verify().differences == []


def test_every_master_s_eviction_policy_is_checked(
    redis_cluster: LocalCluster, tmp_path: Path, cluster_prefix: str
) -> None:
    master = redis_cluster.masters()[1]
    with redis_cluster.node(master).client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
        try:
            with Tracker(settings_on(redis_cluster, tmp_path, cluster_prefix)) as tracker:
                warnings = tracker.warnings
        finally:
            client.config_set("maxmemory-policy", "noeviction")
    assert warnings == [
        f"Redis maxmemory-policy is allkeys-lru on 127.0.0.1:{master}: it may evict "
        "snapshots and checkpoints silently; set it to noeviction"
    ]


def getkeys_calls(cluster: LocalCluster) -> int:
    """``COMMAND GETKEYS`` calls the live nodes served (``INFO commandstats``)."""
    total = 0
    for node in cluster.alive():
        with node.client() as client:
            total += int(
                client.info("commandstats").get("cmdstat_command|getkeys", {}).get("calls", 0)
            )
    return total


def test_merges_and_reads_take_one_round_trip_to_the_partition_s_node(
    redis_cluster: LocalCluster, tmp_path: Path, cluster_prefix: str
) -> None:
    """redis-py's cluster pipeline asks its "default node" for the keys of every EVALSHA
    (``COMMAND GETKEYS``): a round trip more per merge call, and every merge failing once
    that node is gone. Merges go to the partition's master in a plain pipeline instead."""
    with Tracker(settings_on(redis_cluster, tmp_path, cluster_prefix)) as tracker:
        ids = [tracker.create_session("agent", "user").id for _ in range(3)]
        before = getkeys_calls(redis_cluster)
        for offset in range(20):
            tracker.commit_many([(sid, "client", offset) for sid in ids])
        tracker.replay()
        assert [tracker.offsets(sid) for sid in ids] == [{"client": 19}] * 3
        assert len(tracker.list_sessions(user_id="user")) == 3
        assert getkeys_calls(redis_cluster) == before
