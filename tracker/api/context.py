"""What the routes share: the open tracker, the auth, and how long a read may wait."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio.to_thread
from litestar import Request

from tracker.api.auth import Auth
from tracker.service import Tracker
from tracker.settings import Settings

T = TypeVar("T")


@dataclass
class Api:
    """The state of one server process (each ``--workers`` process has its own)."""

    settings: Settings
    auth: Auth
    wait_seconds: float = 5.0
    """How long a read with ``?min_position=`` waits before answering 503."""
    tracker_: Tracker | None = field(default=None, repr=False)

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


def api_of(request: Request[Any, Any, Any]) -> Api:
    api: Api = request.app.state.api
    return api


async def blocking(function: Callable[[], T]) -> T:
    """Run a blocking tracker call (Redis, the log) on a worker thread."""
    return await anyio.to_thread.run_sync(function)
