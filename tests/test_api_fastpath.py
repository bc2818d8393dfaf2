"""The fast path for ``GET /api/sessions/{id}`` answers exactly what the Litestar route does.

Two ``tracker serve`` processes on the same log, Redis prefix and tokens file, one with
the fast path and one without (``TRACKER_API_FASTPATH=0``), get the same requests; their
status, headers (but ``date``) and bodies must be equal. In process, the fast path must
answer the plain requests itself and leave every other one to Litestar.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.apiserver import AGENT, OTHER, USER, start_server
from tests.conftest import delete_prefix, prefix_for
from tests.services import stop_process
from tracker.api.auth import Auth
from tracker.api.context import Api
from tracker.api.fastpath import FastPath
from tracker.service import Tracker
from tracker.settings import Settings
from tracker.tokens import Scope, TokenFile

GRANTS: dict[str, tuple[Scope, str | None]] = {
    "read": ("read", None),
    "user-read": ("read", USER),
    "write": ("write", None),
}


class Both:
    """The two servers, the tokens by name, and the sessions made for the comparison."""

    def __init__(self, fast: str, slow: str, tokens: dict[str, str], sessions: list[str]) -> None:
        self.fast, self.slow, self.tokens, self.sessions = fast, slow, tokens, sessions


@pytest.fixture(scope="module")
def both(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    redis_client: redis.Redis,
) -> Iterator[tuple[Both, Settings, Path]]:
    tmp = tmp_path_factory.mktemp("fastpath")
    prefix = prefix_for(f"{__name__}::both", "fast")
    delete_prefix(redis_client, prefix)
    path = tmp / "tokens.json"
    tokens = TokenFile(path)
    secrets = {
        name: tokens.create(scope, user_id=user, name=name)[0]
        for name, (scope, user) in GRANTS.items()
    }
    settings = Settings(data_dir=tmp / "data", redis_url=redis_url, prefix=prefix)
    with Tracker(settings) as tracker:
        sessions = [
            tracker.create_session(AGENT, USER, title="café notes — Q3").id,
            tracker.create_session(AGENT, USER).id,  # no title: omitted
            tracker.create_session(AGENT, OTHER, title="another user's").id,
        ]
        tracker.commit_many([(sessions[0], "client", 7), (sessions[0], "b", 9)])
        tracker.commit_many([(sessions[2], "client", 3)])
        gone = tracker.create_session(AGENT, USER).id
        tracker.delete_session(gone)
    processes = []
    try:
        fast_url, fast, _ = start_server(tmp, redis_url, prefix, path)
        processes.append(fast)
        slow_url, slow, _ = start_server(tmp, redis_url, prefix, path, TRACKER_API_FASTPATH="0")
        processes.append(slow)
        yield Both(fast_url, slow_url, secrets, [*sessions, gone, "nosuchid12"]), settings, path
    finally:
        for process in processes:
            stop_process(process)
        delete_prefix(redis_client, prefix)


QUERIES = ["", "?consumers=all", "?consumers=b", "?consumers=client,b", "?consumers=nobody"]
TOKENS = ["read", "user-read", "write", None, "wrong"]


def fetch(url: str, token: str | None, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    response = httpx.get(url + path, headers=headers, timeout=30)
    kept = [(k.lower(), v) for k, v in response.headers.raw if k.lower() != b"date"]
    return response.status_code, kept, response.content


def test_fast_path_answers_as_the_litestar_route(both: tuple[Both, Settings, Path]) -> None:
    servers, _, _ = both
    seen: set[int] = set()
    for name in TOKENS:
        token = None if name is None else servers.tokens.get(name, "not-a-token")
        for sid in servers.sessions:
            for query in [*QUERIES, "?min_position=0:0:0", "?consumers="]:
                path = f"/api/sessions/{sid}{query}"
                fast = fetch(servers.fast, token, path)
                assert fast == fetch(servers.slow, token, path), (name, path)
                seen.add(fast[0])
    assert {200, 401, 404} <= seen
    # the same requests, so the same counts in the route's request metrics
    assert counted(servers.fast) == counted(servers.slow)
    assert counted(servers.fast)[f'{COUNT}{{{LABELS}="200"}}'] > 0


COUNT = "tracker_requests_total"
LABELS = 'app_name="tracker",method="GET",path="/api/sessions/{session_id}",status_code'


def counted(url: str) -> dict[str, float]:
    """The route's request counts and latency observations by status, from ``/metrics``."""
    text = httpx.get(url + "/metrics", timeout=30).text
    found = {}
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        name = series.partition("{")[0]
        if LABELS in series and name in {COUNT, "tracker_request_duration_seconds_count"}:
            found[series] = float(value)
    return found


def test_fast_path_takes_only_the_plain_request(both: tuple[Both, Settings, Path]) -> None:
    servers, settings, path = both
    api = Api(settings, Auth(TokenFile(path)))
    api.open()
    delegated: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        delegated.append(scope["path"] + "?" + scope["query_string"].decode())

    fast = FastPath(app, api)

    def call(method: str, target: str, token: str | None) -> list[Any]:
        path, _, query = target.partition("?")
        sent: list[Any] = []
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        scope = {"type": "http", "method": method, "path": path, "root_path": "",
                 "query_string": query.encode(), "headers": headers}  # fmt: skip

        async def send(message: Any) -> None:
            sent.append(message)

        async def receive() -> Any:
            return {"type": "http.request", "body": b""}

        async def once() -> None:
            try:
                await fast(scope, receive, send)
            finally:  # a loop per request here: close its Redis client with it
                await fast.close()

        asyncio.run(once())
        return sent

    try:
        read, mine = servers.tokens["read"], servers.tokens["user-read"]
        own, _, others = servers.sessions[:3]
        for target, token, status in [
            (f"/api/sessions/{own}", read, 200),
            (f"/api/sessions/{own}?consumers=all", read, 200),
            (f"/api/sessions/{own}?consumers=client,b", mine, 200),
            (f"/api/sessions/{others}", mine, 404),
            ("/api/sessions/nosuchid12", read, 404),
        ]:
            sent = call("GET", target, token)
            assert sent[0]["status"] == status, target
        assert delegated == []
        for method, target, maybe in [
            ("GET", f"/api/sessions/{own}", None),
            ("GET", f"/api/sessions/{own}", "wrong"),
            ("GET", f"/api/sessions/{own}?min_position=0:0:0", read),
            ("GET", f"/api/sessions/{own}?consumers=", read),
            ("GET", f"/api/sessions/{own}/history", read),
            ("GET", "/api/sessions?user_id=u", read),
            ("DELETE", f"/api/sessions/{own}", read),
        ]:
            assert call(method, target, maybe) == [], target
        assert len(delegated) == 7
    finally:
        api.close()
