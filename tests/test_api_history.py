"""A session's past over HTTP, end to end on a real ``tracker serve``: its history,
``?as_of=`` reads and resets ``to_time``.

Expected values come from the tracker's own Python API and CLI on the same data dir and
Redis (``Tracker.history``, ``Tracker.session_as_of``, ``tracker sessions history
--json``), and from what the test itself wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import redis

from tests.apiserver import (
    AGENT,
    OTHER,
    USER,
    Server,
    create,
    served,
    server_env,
    validate,
)
from tracker import Position, Settings, Tracker

NOT_FOUND = {"detail": "Session not found"}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> Iterator[Server]:
    """A server of this module's own (its own data dir and key prefix)."""
    tmp = tmp_path_factory.mktemp("api-history")
    with served(tmp, redis_url, redis_client, "api-history") as server:
        yield server


@pytest.fixture(scope="module")
def tracker(server: Server) -> Iterator[Tracker]:
    """The tracker on the server's data dir and Redis, for expected values."""
    settings = Settings(data_dir=server.data_dir, redis_url=server.redis_url, prefix=server.prefix)
    with Tracker.open(settings=settings) as opened:
        yield opened


def exported(value: Any) -> Any:
    """``value`` as JSON, as the API encodes it."""
    return json.loads(msgspec.json.encode(value))


def cli_history(server: Server, session_id: str) -> list[dict[str, Any]]:
    env = server_env(server.data_dir, server.redis_url, server.prefix, Path("unused"))
    done = subprocess.run(
        [sys.executable, "-m", "tracker", "sessions", "history", session_id, "--json"],
        env=env, capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return [json.loads(line) for line in done.stdout.decode().splitlines()]


def write_a_past(client: httpx.Client, user: str) -> str:
    """A session of ``user`` with commits of two consumers and a title change."""
    sid: str = create(client, user_id=user, title="first")["id"]
    for body in (
        {"consumption_offsets": {"client": 7, "b": 3}},
        {"title": "second"},
        {"consumption_offsets": {"client": 9}},
    ):
        response = client.patch(f"/api/sessions/{sid}", json=body)
        assert response.status_code == 200, response.text
    return sid


def first_position(client: httpx.Client, session_id: str) -> str:
    """The position of the session's first event, from its history."""
    position: str = client.get(f"/api/sessions/{session_id}/history").json()["data"][0]["position"]
    return position


def test_history_is_the_trackers(server: Server, tracker: Tracker) -> None:
    with server.client("admin") as admin, server.client("read") as read:
        sid = write_a_past(admin, USER)
        reset = admin.post(
            f"/api/sessions/{sid}/offsets/client/reset",
            json={"to_offset": 2, "reason": "redo", "execute": True},
        )
        assert reset.status_code == 200, reset.text
        assert admin.delete(f"/api/sessions/{sid}").status_code == 204

        response = read.get(f"/api/sessions/{sid}/history")
        assert response.status_code == 200, response.text
        body = response.json()
        assert set(body) == {"data"}
        entries = body["data"]
        assert entries == exported(tracker.history(sid))
        assert entries == cli_history(server, sid)
        assert [e["event"]["type"] for e in entries] == [
            "session_created", "offset_committed", "offset_committed", "title_changed",
            "offset_committed", "offset_reset", "session_deleted",
        ]  # fmt: skip
        assert (
            entries[5]["event"] | {"offset": 2, "actor": "admin", "reason": "redo"}
            == (entries[5]["event"])
        )
        assert all(set(e) == {"position", "recorded_at", "event"} for e in entries)
        last = Position.parse(entries[-1]["position"])
        assert Position.parse(response.headers["X-Tracker-Position"]) >= last


def test_as_of_each_position_and_time_is_the_fold_then(server: Server, tracker: Tracker) -> None:
    with server.client("admin") as admin, server.client("read") as read:
        sid = write_a_past(admin, USER)
        assert admin.delete(f"/api/sessions/{sid}").status_code == 204
        assert read.get(f"/api/sessions/{sid}").status_code == 404
        entries = read.get(f"/api/sessions/{sid}/history").json()["data"]
        seen: list[dict[str, Any] | None] = []  # as of each position
        for entry in entries:
            for as_of, point in (
                (entry["recorded_at"], datetime.fromisoformat(entry["recorded_at"])),
                (entry["position"], Position.parse(entry["position"])),
            ):
                response = read.get(
                    f"/api/sessions/{sid}", params={"as_of": as_of, "consumers": "all"}
                )
                expected = tracker.session_as_of(sid, point)
                if expected is None:
                    assert response.status_code == 404 and response.json() == NOT_FOUND
                else:
                    assert response.status_code == 200, response.text
                    assert response.json() == exported(expected)
                    assert "X-Tracker-Position" in response.headers
            seen.append(response.json() if response.status_code == 200 else None)
        offsets = [s["consumption_offsets"] if s else None for s in seen]
        assert offsets == [
            {}, {"client": 7}, {"client": 7, "b": 3}, {"client": 7, "b": 3},
            {"client": 9, "b": 3}, None,
        ]  # fmt: skip
        assert [s["title"] if s else None for s in seen] == [
            "first", "first", "first", "second", "second", None,
        ]  # fmt: skip

        at = entries[1]["position"]
        default = read.get(f"/api/sessions/{sid}", params={"as_of": at}).json()
        validate(default, "SessionDTO")
        assert default["consumption_offsets"] == {"client": 7}
        only_b = read.get(f"/api/sessions/{sid}", params={"as_of": at, "consumers": "b"})
        assert only_b.json()["consumption_offsets"] == {}
        created = datetime.fromisoformat(entries[0]["recorded_at"])
        before = (created - timedelta(seconds=1)).isoformat()
        early = read.get(f"/api/sessions/{sid}", params={"as_of": before})
        assert early.status_code == 404 and early.json() == NOT_FOUND
        later = datetime.now(UTC).isoformat()
        assert read.get(f"/api/sessions/{sid}", params={"as_of": later}).status_code == 404


def test_bad_as_of_is_422_naming_it(server: Server) -> None:
    with server.client("write") as write:
        sid = create(write, user_id=USER)["id"]
        for value in ("yesterday", "2025-01-01T00:00:00", "1:0:0", "0:x:0", ""):
            response = write.get(f"/api/sessions/{sid}", params={"as_of": value})
            assert response.status_code == 422, (value, response.text)
            (detail,) = response.json()["detail"]
            assert set(detail) == {"type", "loc", "msg", "input"}
            assert detail["loc"] == ["query", "as_of"] and detail["input"] == value
        both = write.get(f"/api/sessions/{sid}", params={"as_of": "0:0:0", "min_position": "0:0:0"})
        assert both.status_code == 422
        assert [d["loc"] for d in both.json()["detail"]] == [
            ["query", "as_of"], ["query", "min_position"],
        ]  # fmt: skip


def test_not_found_unauthorized_and_bound_tokens(server: Server) -> None:
    with server.client("admin") as admin:
        mine = write_a_past(admin, USER)
        theirs = write_a_past(admin, OTHER)
        assert admin.delete(f"/api/sessions/{mine}").status_code == 204
        first, theirs_first = first_position(admin, mine), first_position(admin, theirs)
        unknown = admin.get("/api/sessions/nosuchsess/history")
        assert unknown.status_code == 404 and unknown.json() == NOT_FOUND
        bad_id = admin.get("/api/sessions/a%20b/history")
        assert bad_id.status_code == 422
        assert bad_id.json()["detail"][0]["loc"] == ["path", "session_id"]
    with server.client() as anonymous:
        for path, params in (
            (f"/api/sessions/{theirs}/history", {}),
            (f"/api/sessions/{theirs}", {"as_of": "0:0:0"}),
        ):
            response = anonymous.get(path, params=params)
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
    with server.client("user-read") as bound:
        assert bound.get(f"/api/sessions/{mine}/history").status_code == 200
        hidden = bound.get(f"/api/sessions/{theirs}/history")
        assert hidden.status_code == 404 and hidden.json() == NOT_FOUND
        # A deleted session's past stays readable by its user, by its user then.
        past = bound.get(f"/api/sessions/{mine}", params={"as_of": first})
        assert past.status_code == 200 and past.json()["user_id"] == USER
        assert bound.get(f"/api/sessions/{mine}").status_code == 404
        hidden = bound.get(f"/api/sessions/{theirs}", params={"as_of": theirs_first})
        assert hidden.status_code == 404 and hidden.json() == NOT_FOUND
    with server.client("user-admin") as bound:
        reset = bound.post(
            f"/api/sessions/{theirs}/offsets/client/reset",
            json={"to_time": datetime.now(UTC).isoformat(), "reason": "r"},
        )
        assert reset.status_code == 404 and reset.json() == NOT_FOUND
    with server.client("write") as write:
        reset = write.post(
            f"/api/sessions/{theirs}/offsets/client/reset",
            json={"to_time": datetime.now(UTC).isoformat(), "reason": "r"},
        )
        assert reset.status_code == 403


def test_reset_to_time_plans_then_executes(server: Server) -> None:
    with server.client("admin") as admin:
        sid = create(admin, user_id=USER, agent_id=AGENT)["id"]
        for offset in (5, 9):
            commit = {"consumption_offsets": {"client": offset}}
            assert admin.patch(f"/api/sessions/{sid}", json=commit).status_code == 200
        entries = admin.get(f"/api/sessions/{sid}/history").json()["data"]
        created, at_five = entries[0]["recorded_at"], entries[1]["recorded_at"]
        assert entries[1]["event"]["offset"] == 5
        url = f"/api/sessions/{sid}/offsets/client/reset"

        before = server.log_ends()
        plan = admin.post(url, json={"to_time": at_five, "reason": "replay"})
        assert plan.status_code == 200, plan.text
        assert plan.json() == {
            "session_id": sid, "consumer": "client", "current": 9, "target": 5,
            "applied": False, "position": None, "actor": "admin", "reason": "replay",
        }  # fmt: skip
        long_ago = "2000-01-01T00:00:00+00:00"
        rejected: list[tuple[dict[str, Any], str]] = [
            ({"to_time": created}, "had no offset"),
            ({"to_time": long_ago}, "did not exist"),
            ({"to_time": "2025-01-01T00:00:00"}, "with a zone"),
            ({"to_time": "soon"}, "with a zone"),
            ({"to_time": at_five, "to_offset": 1}, "exactly one"),
        ]
        for extra, words in rejected:
            response = admin.post(url, json={"reason": "r", "execute": True, **extra})
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert ["body", "to_time"] in [d["loc"] for d in detail]
            assert words in detail[0]["msg"]
        assert server.log_ends() == before
        assert admin.get(f"/api/sessions/{sid}").json()["consumption_offsets"] == {"client": 9}

        done = admin.post(url, json={"to_time": at_five, "reason": "replay", "execute": True})
        assert done.status_code == 200, done.text
        assert done.json()["applied"] is True and done.json()["target"] == 5
        assert admin.get(f"/api/sessions/{sid}").json()["consumption_offsets"] == {"client": 5}
        last = admin.get(f"/api/sessions/{sid}/history").json()["data"][-1]
        assert last["position"] == done.json()["position"]
        assert (
            last["event"] | {"type": "offset_reset", "offset": 5, "actor": "admin"}
            == (last["event"])
        )
