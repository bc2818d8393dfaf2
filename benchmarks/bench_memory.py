"""Redis memory per session: a session with three consumers, projected by the tracker.

For each N in ``--sessions`` (default 10,000 and 100,000), on a fresh redis-server:
``INFO memory`` ``used_memory`` after ``Tracker.open`` and after N sessions were created
(``import_events``: 10-char ids of ``[A-Za-z0-9]``, ``--users`` users, ``--agents``
agents, no title) and committed by three consumers (``commit_many``); bytes/session is
the difference over N. Everything the projection holds counts: session hashes, the user
and agent index hashes, the checkpoint.

Reference, on another fresh redis-server: the same N sessions as a bare ``HSET`` of 7
fields (``i a u c o:client o:notifier o:indexer``) under a plain key ``s:<id>``, and the
raw size of those fields (names + values). Breakdown: ``MEMORY USAGE`` and encoding of
one session hash, one user index and one agent index, and the index totals.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    CONSUMERS,
    Workload,
    emit,
    log,
    parser,
    positive_ints,
    redis_server,
    timed,
    workdir,
)
from tracker import Settings, Tracker
from tracker.keys import partition_for
from tracker.model import format_datetime

TARGET = 300.0
PIPELINE = 1000


def usage(client: redis.Redis, key: str) -> dict[str, Any]:
    return {
        "bytes": int(client.memory_usage(key, samples=0) or 0),
        "encoding": str(client.object("encoding", key)),
        "fields": int(client.hlen(key)),
    }


def total_usage(client: redis.Redis, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    total = 0
    for start in range(0, len(keys), PIPELINE):
        for key in keys[start : start + PIPELINE]:
            pipe.memory_usage(key, samples=0)
        total += sum(int(v or 0) for v in pipe.execute())
    return total


def tracker_case(
    args: argparse.Namespace, workload: Workload, tmp: Path
) -> tuple[dict[str, Any], str]:
    n = len(workload.session_ids)
    rng = random.Random(args.seed + 2)
    with redis_server(tmp / f"redis-tracker-{n}", args.redis_server) as server:
        client = server.client()
        config = {
            k: v
            for k, v in client.config_get("hash-max-listpack-*").items()
            if isinstance(k, str) and isinstance(v, str)
        }
        settings = Settings(data_dir=tmp / f"data-{n}", redis_url=server.url, fsync=False)
        tracker = Tracker.open(settings=settings)
        try:
            before = server.used_memory()
            commits = [
                (sid, consumer, rng.randrange(1, 5000))
                for sid in workload.session_ids
                for consumer in CONSUMERS
            ]
            seconds, _ = timed(
                lambda: (tracker.import_events(workload.creates()), tracker.commit_many(commits))
            )
            after = server.used_memory()
            keys = tracker.store.keys
            sid = workload.session_ids[0]
            agent, user = workload.owners[0]
            part = partition_for(sid, keys.partitions)
            user_keys = sorted({keys.by_user(part, u) for _, u in workload.owners})
            agent_keys = sorted({keys.by_agent(part, a) for a, _ in workload.owners})
            session_key = keys.session(part, sid)
            dto = tracker.get_session(sid)
            assert dto is not None and len(dto.consumption_offsets) == len(CONSUMERS)
            user_bytes = total_usage(client, user_keys)
            agent_bytes = total_usage(client, agent_keys)
            indexes = user_bytes + agent_bytes
            result: dict[str, Any] = {
                "sessions": n,
                "seconds_to_project": round(seconds, 3),
                "used_memory_before": before,
                "used_memory_after": after,
                "bytes_per_session": round((after - before) / n, 1),
                "keys": int(client.dbsize()),
                "session_hash": {"key": session_key, **usage(client, session_key)},
                "user_index": {
                    "key": keys.by_user(part, user),
                    **usage(client, keys.by_user(part, user)),
                },
                "agent_index": {
                    "key": keys.by_agent(part, agent),
                    **usage(client, keys.by_agent(part, agent)),
                },
                "user_indexes": {"count": len(user_keys), "bytes": user_bytes},
                "agent_indexes": {"count": len(agent_keys), "bytes": agent_bytes},
                "index_bytes_per_session": round(indexes / n, 1),
                "session_hash_bytes_per_session": round((after - before - indexes) / n, 1),
            }
        finally:
            tracker.close()
            client.close()
        return result, f"{server.version()}; {config}"


def reference_case(args: argparse.Namespace, workload: Workload, tmp: Path) -> dict[str, Any]:
    n = len(workload.session_ids)
    rng = random.Random(args.seed + 2)
    mappings: list[tuple[str, dict[str, str]]] = []
    for event, sid in zip(workload.creates(), workload.session_ids, strict=True):
        agent, user = workload.owners[len(mappings)]
        mapping = {"i": sid, "a": agent, "u": user}
        mapping["c"] = format_datetime(getattr(event, "created_at"))  # noqa: B009
        for consumer in CONSUMERS:
            mapping["o:" + consumer] = str(rng.randrange(1, 5000))
        mappings.append((sid, mapping))
    raw = sum(len(k) + len(v) for _, m in mappings for k, v in m.items()) / n
    with redis_server(tmp / f"redis-reference-{n}", args.redis_server) as server:
        client = server.client()
        try:
            before = server.used_memory()
            pipe = client.pipeline(transaction=False)
            for sid, mapping in mappings:
                pipe.hset(f"s:{sid}", mapping=mapping)  # type: ignore[arg-type]
                if len(pipe) >= PIPELINE:
                    pipe.execute()
            pipe.execute()
            after = server.used_memory()
            sample = usage(client, f"s:{mappings[0][0]}")
        finally:
            client.close()
    return {
        "what": "bare HSET of 7 fields (i a u c o:client o:notifier o:indexer) under s:<id>",
        "bytes_per_session": round((after - before) / n, 1),
        "raw_field_bytes_per_session": round(raw, 1),
        "sample_hash": sample,
    }


def main() -> None:
    p = parser("Redis memory per session with three consumers.", repeat=1)
    p.add_argument(
        "--sessions",
        type=positive_ints,
        default=[10_000, 100_000],
        help="session counts, comma-separated",
    )
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--agents", type=int, default=50)
    args = p.parse_args()
    by_n: list[dict[str, Any]] = []
    version = ""
    with workdir(args.tmpdir, "memory") as tmp:
        for n in args.sessions:
            workload = Workload(args.seed, n, users=args.users, agents=args.agents)
            result, version = tracker_case(args, workload, tmp)
            result["reference"] = reference_case(args, workload, tmp)
            log(
                f"N={n}: {result['bytes_per_session']} bytes/session (indexes "
                f"{result['index_bytes_per_session']}); bare HSET "
                f"{result['reference']['bytes_per_session']}, raw fields "
                f"{result['reference']['raw_field_bytes_per_session']}"
            )
            by_n.append(result)
    worst = max(by_n, key=lambda r: float(r["bytes_per_session"]))
    value = float(worst["bytes_per_session"])
    reference = float(worst["reference"]["bytes_per_session"])
    emit(
        {
            "bench": "memory",
            "params": {
                "sessions": args.sessions,
                "users": args.users,
                "agents": args.agents,
                "consumers": list(CONSUMERS),
                "title": None,
                "seed": args.seed,
                "redis": version,
                "note": "--repeat is not used: memory figures are deterministic",
            },
            "value": value,
            "unit": "bytes/session (worst N)",
            "target": TARGET,
            "meets_target": value <= TARGET,
            "ratio": round(reference / value, 3),
            "ratio_of": "bare-HSET bytes/session / tracker bytes/session, at the worst N",
            "ceiling": worst["reference"],
            "by_sessions": by_n,
        }
    )


if __name__ == "__main__":
    main()
