"""A real ``tracker serve`` for the API's tests: its environment, start-up, tokens and
the client helpers the API test modules share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import redis

from tests.conftest import delete_prefix, prefix_for
from tests.services import free_port, stop_process
from tracker.tokens import Scope, TokenFile

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = json.loads((Path(__file__).parent / "flux0" / "session-schemas.json").read_text())
USER, OTHER, AGENT = "userAAAAAA", "userBBBBBB", "agentAAAAA"


def validate(value: Any, name: str) -> None:
    jsonschema.validate(value, SCHEMAS[name])


def server_env(data_dir: Path, redis_url: str, prefix: str, tokens: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(
        TRACKER_DATA_DIR=str(data_dir),
        TRACKER_REDIS_URL=redis_url,
        TRACKER_PREFIX=prefix,
        TRACKER_API_TOKENS_FILE=str(tokens),
        TRACKER_API_WAIT="0.5",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    return env


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    data_dir: Path
    redis_url: str
    prefix: str
    tokens: dict[str, str]

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[token]}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def log_ends(self) -> list[str | None]:
        """The log's end per partition, as ``tracker status --json`` reports it."""
        env = server_env(self.data_dir, self.redis_url, self.prefix, Path("unused"))
        result = subprocess.run(
            [sys.executable, "-m", "tracker", "status", "--json"],
            env=env, capture_output=True, check=True, timeout=60,
        )  # fmt: skip
        report = json.loads(result.stdout)
        return [part["end"] for part in report["partitions"]]


def start_server(
    tmp: Path, redis_url: str, prefix: str, tokens: Path, *extra: str, **env: str
) -> tuple[str, subprocess.Popen[bytes], Path]:
    """``python -m tracker serve`` on a free port, once ``/healthz`` answers; ``env`` is
    added to :func:`server_env`'s."""
    port = free_port()
    log = tmp / f"serve-{port}.log"
    command = [sys.executable, "-m", "tracker", "serve", "--port", str(port), *extra]
    with_env = {**server_env(tmp / "data", redis_url, prefix, tokens), **env}
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=with_env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return url, process, log
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process)
            raise RuntimeError(f"tracker serve did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


GRANTS: dict[str, tuple[Scope, str | None]] = {
    "read": ("read", None),
    "write": ("write", None),
    "admin": ("admin", None),
    "user-read": ("read", USER),
    "user-write": ("write", USER),
    "user-admin": ("admin", USER),
}


@contextmanager
def served(
    tmp: Path, redis_url: str, redis_client: redis.Redis, name: str, *extra: str, **env: str
) -> Iterator[Server]:
    """A server with its own data dir and key prefix (``name``) and a token per
    :data:`GRANTS` entry; stopped, and its keys deleted, at the end."""
    prefix = prefix_for(f"{name}::server", name)
    delete_prefix(redis_client, prefix)
    tokens_path = tmp / "tokens.json"
    tokens = TokenFile(tokens_path)
    secrets = {}
    for grant, (scope, user) in GRANTS.items():
        secrets[grant], _ = tokens.create(scope, user_id=user, name=grant)
    url, process, log = start_server(tmp, redis_url, prefix, tokens_path, *extra, **env)
    try:
        yield Server(url, process, log, tmp / "data", redis_url, prefix, secrets)
    finally:
        stop_process(process)
        delete_prefix(redis_client, prefix)


def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/api/sessions", json={"agent_id": AGENT, **body})
    assert response.status_code == 201, response.text
    value: dict[str, Any] = response.json()
    return value
