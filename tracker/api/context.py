"""What the routes share: the open tracker, the auth, and how long a read may wait."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from litestar import Request

from tracker.api.auth import Auth
from tracker.service import Tracker
from tracker.settings import Settings
from tracker.status import Status

T = TypeVar("T")


@dataclass
class Api:
    """The state of one server process (each ``--workers`` process has its own)."""

    settings: Settings
    auth: Auth
    wait_seconds: float = 5.0
    """How long a read with ``?min_position=`` waits before answering 503."""
    tracker_: Tracker | None = field(default=None, repr=False)
    _check: asyncio.Future[Status] | None = field(default=None, repr=False)

    def readiness(self) -> asyncio.Future[Status]:
        """Redis pinged and the log's status read, on a thread: the check in flight if
        there is one (a frozen broker holds it up to the log's timeout; ``/readyz``
        callers wait for it only briefly and never start a pile of them)."""
        if self._check is None or self._check.done():

            def check() -> Status:
                self.tracker.client.ping()
                return self.tracker.status()

            self._check = asyncio.ensure_future(blocking(check))
            self._check.add_done_callback(_retrieve)
        return self._check

    @property
    def tracker(self) -> Tracker:
        if self.tracker_ is None:
            raise RuntimeError("the tracker is not open (the app has not started)")
        return self.tracker_

    def open(self) -> None:
        self.tracker_ = Tracker(self.settings)

    def close(self) -> None:
        if self.tracker_ is not None:
            self.tracker_.close()
            self.tracker_ = None


def _retrieve(done: asyncio.Future[Status]) -> None:
    """Take a finished check's exception: its waiters may all have given up on it."""
    if not done.cancelled():
        done.exception()


def api_of(request: Request[Any, Any, Any]) -> Api:
    api: Api = request.app.state.api
    return api


async def blocking(function: Callable[[], T]) -> T:
    """Run a blocking tracker call (Redis, the log) on a worker thread."""
    return await anyio.to_thread.run_sync(function)
