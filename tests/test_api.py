"""``tracker serve`` end to end: a real server process on Redis, driven over HTTP with httpx.

One server (and one key prefix) serves the tests of this module; tokens of every scope,
bound and unbound, are created in its tokens file. Responses are checked against flux0's
JSON Schemas; rejected requests must leave the log as it was.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
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
    start_server,
    validate,
)
from tests.services import free_port, pid_alive, stop_process


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, redis_client: redis.Redis
) -> Iterator[Server]:
    # with the access log on, so that test_tokens_never_reach_the_log reads request lines
    tmp = tmp_path_factory.mktemp("api")
    with served(tmp, redis_url, redis_client, "api", "--access-log") as server:
        yield server


def test_session_lifecycle_is_flux0_shaped(server: Server) -> None:
    with server.client("write") as write, server.client("admin") as admin:
        response = write.post("/api/sessions", json={"agent_id": AGENT, "user_id": USER})
        assert response.status_code == 201
        session = response.json()
        validate(session, "SessionDTO")
        assert "title" not in session and session["consumption_offsets"] == {}
        assert len(session["id"]) == 10 and session["id"].isalnum()
        assert response.headers["X-Tracker-Position"].count(":") == 2
        sid = session["id"]

        got = write.get(f"/api/sessions/{sid}")
        assert got.status_code == 200 and got.json() == session
        position = got.headers["X-Tracker-Position"]

        patched = write.patch(
            f"/api/sessions/{sid}",
            json={"title": "A [b] :x:", "consumption_offsets": {"client": 7, "notifier": 3}},
        )
        assert patched.status_code == 200, patched.text
        validate(patched.json(), "SessionDTO")
        assert patched.json()["consumption_offsets"] == {"client": 7}
        assert patched.json()["title"] == "A [b] :x:"
        assert patched.headers["X-Tracker-Position"] > position

        stale = write.patch(f"/api/sessions/{sid}", json={"consumption_offsets": {"client": 2}})
        assert stale.json()["consumption_offsets"] == {"client": 7}
        every = write.get(f"/api/sessions/{sid}", params={"consumers": "all"}).json()
        assert every["consumption_offsets"] == {"client": 7, "notifier": 3}
        some = write.get(f"/api/sessions/{sid}", params={"consumers": "notifier"}).json()
        assert some["consumption_offsets"] == {"notifier": 3}
        cleared = write.patch(f"/api/sessions/{sid}", json={"title": None}).json()
        assert "title" not in cleared

        waited = write.get(f"/api/sessions/{sid}", params={"min_position": position})
        assert waited.status_code == 200

        plan = admin.post(
            f"/api/sessions/{sid}/offsets/client/reset", json={"shift_by": -5, "reason": "redo"}
        )
        assert plan.status_code == 200, plan.text
        assert plan.json() | {"position": None} == {
            "session_id": sid, "consumer": "client", "current": 7, "target": 2,
            "applied": False, "position": None, "actor": "admin", "reason": "redo",
        }  # fmt: skip
        assert write.get(f"/api/sessions/{sid}").json()["consumption_offsets"] == {"client": 7}
        done = admin.post(
            f"/api/sessions/{sid}/offsets/client/reset",
            json={"to_offset": 1, "reason": "redo", "execute": True},
        )
        assert done.json()["applied"] is True and done.json()["position"] is not None
        assert write.get(f"/api/sessions/{sid}").json()["consumption_offsets"] == {"client": 1}

        assert admin.delete(f"/api/sessions/{sid}").status_code == 204
        gone = write.get(f"/api/sessions/{sid}")
        assert gone.status_code == 404 and gone.json() == {"detail": "Session not found"}
        again = write.post("/api/sessions", json={"agent_id": AGENT, "user_id": USER, "id": sid})
        assert again.status_code == 409 and isinstance(again.json()["detail"], str)


def test_list_pages_with_a_cursor(server: Server) -> None:
    agent = "agentPAGES"
    with server.client("write") as write:
        made = [create(write, agent_id=agent, user_id=OTHER)["id"] for _ in range(5)]
        seen: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            params: dict[str, Any] = {"agent_id": agent, "limit": 2}
            if cursor is not None:
                params["cursor"] = cursor
            response = write.get("/api/sessions", params=params)
            assert response.status_code == 200
            body = response.json()
            assert set(body) == {"data"}
            validate(body, "SessionsDTO")
            seen += [s["id"] for s in body["data"]]
            pages += 1
            cursor = response.headers.get("X-Next-Cursor")
            if cursor is None:
                break
        assert pages == 3 and seen == made
        by_user = write.get("/api/sessions", params={"user_id": OTHER, "agent_id": agent})
        assert [s["id"] for s in by_user.json()["data"]] == made

        neither = write.get("/api/sessions")
        assert neither.status_code == 422
        assert [d["loc"] for d in neither.json()["detail"]] == [
            ["query", "user_id"], ["query", "agent_id"],
        ]  # fmt: skip
        limits: list[dict[str, str | int]] = [{"agent_id": agent, "limit": n} for n in (0, 1001)]
        for params in limits:
            bad = write.get("/api/sessions", params=params)
            assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "limit"]
        bad = write.get("/api/sessions", params={"agent_id": agent, "cursor": "nope!"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_tokens_scopes_and_bound_users(server: Server) -> None:
    with server.client("write") as write:
        mine = create(write, user_id=USER)["id"]
        theirs = create(write, user_id=OTHER)["id"]
    with server.client() as anonymous:
        for response in (
            anonymous.get(f"/api/sessions/{mine}"),
            anonymous.get(f"/api/sessions/{mine}", headers={"Authorization": "Bearer wrong"}),
            anonymous.get(f"/api/sessions/{mine}", headers={"Authorization": "Basic x"}),
        ):
            assert response.status_code == 401
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert isinstance(response.json()["detail"], str)
    with server.client("read") as read:
        assert read.get(f"/api/sessions/{mine}").status_code == 200
        assert read.post("/api/sessions", json={"agent_id": AGENT}).status_code == 403
        assert read.patch(f"/api/sessions/{mine}", json={"title": "x"}).status_code == 403
    with server.client("write") as write:
        assert write.delete(f"/api/sessions/{mine}").status_code == 403
        reset = write.post(f"/api/sessions/{mine}/offsets/c/reset", json={"reason": "r"})
        assert reset.status_code == 403
        missing_user = write.post("/api/sessions", json={"agent_id": AGENT})
        assert missing_user.status_code == 422
        assert missing_user.json()["detail"][0]["loc"] == ["body", "user_id"]
    with server.client("user-read") as bound:
        assert bound.get(f"/api/sessions/{mine}").status_code == 200
        hidden = bound.get(f"/api/sessions/{theirs}")
        assert hidden.status_code == 404 and hidden.json() == {"detail": "Session not found"}
        listed = bound.get("/api/sessions").json()["data"]
        assert listed and {s["user_id"] for s in listed} == {USER}
        assert bound.get("/api/sessions", params={"user_id": OTHER}).json() == {"data": []}
    with server.client("user-write") as bound:
        made = create(bound)
        assert made["user_id"] == USER
        assert (
            bound.post("/api/sessions", json={"agent_id": AGENT, "user_id": OTHER}).status_code
            == 403
        )
        assert bound.patch(f"/api/sessions/{theirs}", json={"title": "x"}).status_code == 404
    with server.client("user-admin") as bound:
        assert bound.delete(f"/api/sessions/{theirs}").status_code == 404
        reset = bound.post(
            f"/api/sessions/{theirs}/offsets/c/reset", json={"reason": "r", "to_offset": 1}
        )
        assert reset.status_code == 404
    with server.client("read") as read:
        assert read.get(f"/api/sessions/{theirs}").status_code == 200


def test_rejected_requests_append_nothing(server: Server) -> None:
    with server.client("admin") as admin:
        sid = create(admin, user_id=USER)["id"]
        before = server.log_ends()
        new, one, reset = "/api/sessions", f"/api/sessions/{sid}", f"/api/sessions/{sid}/offsets"
        body = {"agent_id": AGENT, "user_id": USER}
        offsets: list[str | int] = ["body", "consumption_offsets"]
        huge = b'{"agent_id": "' + b"a" * 70_000 + b'"}'
        cases: list[tuple[httpx.Response, int, list[str | int] | None]] = [
            (admin.post(new, content=b"{x"), 422, ["body"]),
            (admin.post(new, json=body | {"agent_id": 5}), 422, ["body", "agent_id"]),
            (admin.post(new, json={"user_id": USER}), 422, ["body", "agent_id"]),
            (admin.post(new, json=body | {"x": 1}), 422, ["body", "x"]),
            (admin.post(new, json=body | {"agent_id": "bad id"}), 422, ["body", "agent_id"]),
            (admin.post(new, json=body | {"id": sid}), 409, None),
            (admin.patch(one, json={"consumption_offsets": {"client": -1}}), 422, offsets),
            (admin.patch(one, json={"consumption_offsets": {"client": "7"}}), 422, offsets),
            (admin.patch(one, json={"title": "x" * 201}), 422, ["body", "title"]),
            (admin.patch(f"{new}/nosuchsess", json={"title": "x"}), 404, None),
            (admin.post(f"{reset}/client/reset", json={"reason": "r"}), 422, ["body", "to_offset"]),
            (
                admin.post(f"{reset}/client/reset", json={"reason": "r", "to_time": "2025-01-01Z"}),
                422,
                ["body", "to_time"],
            ),
            (
                admin.post(f"{reset}/client/reset", json={"reason": "r", "shift_by": 1}),
                422,
                ["body", "shift_by"],
            ),
            (
                admin.post(f"{reset}/a%20b/reset", json={"reason": "r", "to_offset": 1}),
                422,
                ["path", "consumer"],
            ),
            (admin.post(new, content=huge), 413, None),
            (admin.delete(f"{new}/nosuchsess"), 404, None),
        ]
        for response, status, loc in cases:
            assert response.status_code == status, response.text
            detail = response.json()["detail"]
            if loc is None:
                assert isinstance(detail, str)
            else:
                assert set(detail[0]) == {"type", "loc", "msg", "input"}
                assert detail[0]["loc"] == loc, detail
        assert server.log_ends() == before


def test_min_position_not_applied_is_503(server: Server) -> None:
    with server.client("read") as read, server.client("write") as write:
        sid = create(write, user_id=USER)["id"]
        response = read.get(f"/api/sessions/{sid}", params={"min_position": "0:999999999:0"})
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        listed = read.get(
            "/api/sessions", params={"user_id": USER, "min_position": "0:999999999:0"}
        )
        assert listed.status_code == 503
        bad = read.get(f"/api/sessions/{sid}", params={"min_position": "zero"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
            "query",
            "min_position",
        ]


def test_ops_routes_and_openapi(server: Server) -> None:
    with server.client() as anonymous, server.client("write") as write:
        sid = create(write, user_id=USER)["id"]
        before = commits(anonymous.get("/metrics").text)
        write.patch(f"/api/sessions/{sid}", json={"consumption_offsets": {"client": 1, "b": 2}})
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert [p["partition"] for p in ready.json()["partitions"]] == [0]
        metrics = anonymous.get("/metrics").text
        assert 'path="/api/sessions/{session_id}"' in metrics
        assert (
            'tracker_requests_total{app_name="tracker",method="POST",path="/api/sessions",status_code="201"}'
            in metrics
        )
        assert commits(metrics) == before + 2
        assert 'tracker_projector_lag{partition="0"} 0.0' in metrics
        document = anonymous.get("/openapi.json").json()
        assert document["openapi"].startswith("3.1") and document["info"]["title"]
        paths = document["paths"]
        assert set(paths["/api/sessions"]) >= {"get", "post"}
        assert set(paths["/api/sessions/{session_id}"]) >= {"get", "patch", "delete"}
        assert "post" in paths["/api/sessions/{session_id}/offsets/{consumer}/reset"]
        assert {"/healthz", "/readyz"} <= set(paths)
        body = paths["/api/sessions"]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"]["required"] == ["agent_id"]
        assert anonymous.get("/docs").status_code == 200


def commits(metrics: str) -> float:
    (line,) = [x for x in metrics.splitlines() if x.startswith("tracker_commits_appended_total ")]
    return float(line.split()[1])


def test_tokens_never_reach_the_log(server: Server) -> None:
    with server.client("admin") as admin:
        assert admin.get("/api/sessions/nosuchsess").status_code == 404
    text = server.log.read_text()
    assert "GET /api/sessions/nosuchsess" in text
    assert not [name for name, secret in server.tokens.items() if secret in text]


def test_serve_refuses_without_tokens_and_warns_when_insecure(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    env = server_env(tmp_path / "data", redis_url, prefix, tmp_path / "none.json")
    refused = subprocess.run(
        [sys.executable, "-m", "tracker", "serve", "--port", str(free_port())],
        env=env, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    lines = refused.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "tracker tokens create" in lines[0]

    url, process, log = start_server(
        tmp_path, redis_url, prefix, tmp_path / "none.json", "--insecure"
    )
    try:
        made = httpx.post(f"{url}/api/sessions", json={"agent_id": AGENT, "user_id": USER})
        assert made.status_code == 201
        assert httpx.get(f"{url}/api/sessions/{made.json()['id']}").status_code == 200
    finally:
        stop_process(process)
    text = log.read_text()
    assert "warning: --insecure" in text
    assert "GET /api/sessions/" not in text, "no access log by default"


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_serve_with_two_workers(tmp_path: Path, redis_url: str, prefix: str) -> None:
    """``--workers 2``: two server processes on one log and one Redis; what one creates
    the other reads (read-your-writes through X-Tracker-Position)."""
    url, process, _ = start_server(
        tmp_path, redis_url, prefix, tmp_path / "none.json", "--insecure", "--workers", "2"
    )
    try:
        workers = [pid for pid in children(process.pid) if pid_alive(pid)]
        made = httpx.post(f"{url}/api/sessions", json={"agent_id": AGENT, "user_id": USER})
        assert made.status_code == 201, made.text
        sid, position = made.json()["id"], made.headers["X-Tracker-Position"]
        for n in range(40):
            with httpx.Client(base_url=url) as fresh:  # new connections spread over workers
                read = fresh.get(f"/api/sessions/{sid}", params={"min_position": position})
                assert read.status_code == 200, (n, read.text)
                assert read.json()["id"] == sid
    finally:
        stop_process(process)
    assert len(workers) >= 2, f"expected two worker processes under {process.pid}: {workers}"


def test_a_deeply_nested_body_is_422_not_500(server: Server) -> None:
    """A depth bomb made msgspec raise RecursionError: once a 500, now flux0's 422."""
    nested = b'{"agent_id": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    with server.client("admin") as admin:
        sid = create(admin, user_id=USER)["id"]
        for method, path in (("POST", "/api/sessions"), ("PATCH", f"/api/sessions/{sid}")):
            answer = admin.request(method, path, content=nested)
            assert answer.status_code == 422, (method, answer.text[:300])
            (problem,) = answer.json()["detail"]
            assert problem["loc"][0] == "body" and problem["msg"], problem
            assert answer.headers["content-type"].startswith("application/json")
