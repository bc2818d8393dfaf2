"""Redis memory per session: sessions with three consumers, projected by the tracker.

Two shapes, each on a fresh redis-server (AOF ``everysec`` as the embedded default unless
``--no-redis-aof``), with ``INFO memory`` ``used_memory`` taken after ``Tracker.open``
and after N sessions were created (``import_events``: 10-char ids of ``[A-Za-z0-9]``)
and committed by three consumers (``commit_many``); bytes/session is the difference over
N. Everything the projection holds counts: session hashes, the user and agent index
hashes, the checkpoint.

* ``headline``: ``--sessions`` sessions (10,000), four per user (``sessions / 4`` users,
  each with exactly four), ``--agents`` agents, titles of 20 to 40 characters (some
  non-ASCII; none over 64 bytes);
* ``no_title`` (the earlier shape, secondary): N in ``--secondary-sessions`` (10,000 and
  100,000), ``--users`` users drawn at random, no title.

Reference, on another fresh redis-server: the same N sessions as a bare ``HSET`` of the
same fields plus the id (``i a u c [t] o:client o:notifier o:indexer``) under a plain
key ``s:<id>``, and the raw size of those fields (names + values). Breakdown: ``MEMORY
USAGE`` and encoding of one session hash, one user index and one agent index, and the
index totals.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import redis

from benchmarks._common import (
    CONSUMERS,
    Titles,
    Workload,
    emit,
    log,
    parser,
    positive_ints,
    redis_persistence,
    redis_server,
    timed,
    workdir,
)
from tracker import Settings, Tracker
from tracker.keys import partition_for
from tracker.model import format_datetime

TARGET = 300.0
PIPELINE = 1000
SESSIONS_PER_USER = 4
HEADLINE_TITLES = Titles(20, 40)


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
    args: argparse.Namespace, workload: Workload, tmp: Path, name: str
) -> tuple[dict[str, Any], str]:
    n = len(workload.session_ids)
    rng = random.Random(args.seed + 2)
    with redis_server(
        tmp / f"redis-tracker-{name}-{n}", args.redis_server, aof=args.redis_aof
    ) as server:
        client = server.client()
        config = {
            k: v
            for k, v in client.config_get("hash-max-listpack-*").items()
            if isinstance(k, str) and isinstance(v, str)
        }
        settings = Settings(data_dir=tmp / f"data-{name}-{n}", redis_url=server.url)
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
            aof_buffer = int(client.info("memory").get("mem_aof_buffer", 0))
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
                "shape": name,
                "sessions": n,
                "users": len(workload.user_ids),
                "agents": len(workload.agent_ids),
                "titles": workload.describe_titles(),
                "seconds_to_project": round(seconds, 3),
                "used_memory_before": before,
                "used_memory_after": after,
                "bytes_per_session": round((after - before) / n, 1),
                "mem_aof_buffer_after": aof_buffer,
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
        return result, f"{server.version()}; {config}; persistence: {server.persistence}"


def reference_case(
    args: argparse.Namespace, workload: Workload, tmp: Path, name: str
) -> dict[str, Any]:
    n = len(workload.session_ids)
    rng = random.Random(args.seed + 2)
    mappings: list[tuple[str, dict[str, str]]] = []
    for event, sid, title in zip(
        workload.creates(), workload.session_ids, workload.titles, strict=True
    ):
        agent, user = workload.owners[len(mappings)]
        mapping = {"i": sid, "a": agent, "u": user}
        mapping["c"] = format_datetime(getattr(event, "created_at"))  # noqa: B009
        if title is not None:
            mapping["t"] = title
        for consumer in CONSUMERS:
            mapping["o:" + consumer] = str(rng.randrange(1, 5000))
        mappings.append((sid, mapping))
    raw = sum(len(k) + len(v.encode()) for _, m in mappings for k, v in m.items()) / n
    with redis_server(
        tmp / f"redis-reference-{name}-{n}", args.redis_server, aof=args.redis_aof
    ) as server:
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
        "what": "bare HSET of the same fields (i a u c [t] o:client o:notifier o:indexer) "
        "under s:<id>",
        "fields": len(mappings[0][1]),
        "bytes_per_session": round((after - before) / n, 1),
        "raw_field_bytes_per_session": round(raw, 1),
        "sample_hash": sample,
    }


def main() -> None:
    p = parser("Redis memory per session with three consumers.", repeat=1)
    p.add_argument("--sessions", type=int, default=10_000, help="sessions of the headline shape")
    p.add_argument(
        "--secondary-sessions",
        type=positive_ints,
        default=[10_000, 100_000],
        help="session counts of the no-title shape, comma-separated",
    )
    p.add_argument("--users", type=int, default=1000, help="users of the no-title shape")
    p.add_argument("--agents", type=int, default=50)
    args = p.parse_args()
    shapes: list[tuple[str, Workload]] = [
        (
            "headline",
            Workload(
                args.seed,
                args.sessions,
                users=max(1, args.sessions // SESSIONS_PER_USER),
                agents=args.agents,
                titles=HEADLINE_TITLES,
                even_users=True,
            ),
        ),
        *(
            (
                "no_title",
                Workload(args.seed, n, users=args.users, agents=args.agents, titles=None),
            )
            for n in args.secondary_sessions
        ),
    ]
    rows: list[dict[str, Any]] = []
    version = ""
    with workdir(args.tmpdir, "memory") as tmp:
        for name, workload in shapes:
            result, version = tracker_case(args, workload, tmp, name)
            result["reference"] = reference_case(args, workload, tmp, name)
            log(
                f"{name} N={result['sessions']}: {result['bytes_per_session']} bytes/session "
                f"(indexes {result['index_bytes_per_session']}, session hash "
                f"{result['session_hash']['encoding']}); bare HSET "
                f"{result['reference']['bytes_per_session']}, raw fields "
                f"{result['reference']['raw_field_bytes_per_session']}"
            )
            rows.append(result)
    head = rows[0]
    value = float(head["bytes_per_session"])
    reference = float(head["reference"]["bytes_per_session"])
    secondary = rows[1:]
    worst = max(secondary, key=lambda r: float(r["bytes_per_session"])) if secondary else None
    emit(
        {
            "bench": "memory",
            "params": {
                "sessions": args.sessions,
                "sessions_per_user": SESSIONS_PER_USER,
                "users": head["users"],
                "agents": args.agents,
                "consumers": list(CONSUMERS),
                "titles": head["titles"],
                "secondary": {
                    "sessions": args.secondary_sessions,
                    "users": args.users,
                    "title": None,
                },
                "seed": args.seed,
                "redis": version,
                "redis_persistence": redis_persistence(args.redis_aof),
                "note": "--repeat is not used: memory figures are deterministic",
            },
            "value": value,
            "unit": "bytes/session (4 sessions per user, titles 20-40 chars)",
            "target": TARGET,
            "meets_target": value <= TARGET,
            "ratio": round(reference / value, 3),
            "ratio_of": "bare-HSET bytes/session / tracker bytes/session, headline shape",
            "ceiling": head["reference"],
            "secondary": {
                "what": "the earlier shape: no title, users drawn at random",
                "worst_bytes_per_session": None if worst is None else worst["bytes_per_session"],
                "meets_target": None
                if worst is None
                else float(worst["bytes_per_session"]) <= TARGET,
            },
            "by_shape": rows,
        }
    )


if __name__ == "__main__":
    main()
