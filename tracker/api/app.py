"""The Litestar app: ``create_app()`` builds it from the environment (uvicorn's factory).

Each server process builds its own app and opens its own :class:`Tracker` at startup
(closed at shutdown), so ``tracker serve --workers N`` runs N independent processes on
the same log and Redis. Settings come from ``TRACKER_*`` as for the CLI, plus:

* ``TRACKER_API_TOKENS_FILE``: the tokens file (default ``<data dir>/tokens.json``);
* ``TRACKER_API_INSECURE=1``: no tokens needed (every request is ``admin``);
* ``TRACKER_API_WAIT``: seconds a read with ``?min_position=`` waits (default 5);
* ``TRACKER_API_DLQ``: where the status page reads dead letters (``dir:PATH``,
  ``kafka:TOPIC``, comma-separated; see :mod:`tracker.api.deadletters`);
* ``TRACKER_API_LAG_SAMPLE``: seconds between the status page's lag samples (default 5);
* ``TRACKER_API_FASTPATH=0``: no fast path for ``GET /api/sessions/{id}``
  (:mod:`tracker.api.fastpath`; ``create_server`` is the factory ``tracker serve`` uses).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin

from tracker.api import fastpath, ops, past, resets, sessions, status
from tracker.api.auth import Auth
from tracker.api.bodies import MAX_BODY
from tracker.api.context import Api
from tracker.api.deadletters import parse_sources
from tracker.api.errors import HANDLERS
from tracker.api.lagchart import LagHistory, sample_seconds
from tracker.api.metrics import LAG, PROMETHEUS, Metrics
from tracker.errors import ConfigError
from tracker.settings import Settings
from tracker.tokens import TokenFile, token_file_path

INSECURE_ENV = "TRACKER_API_INSECURE"
WAIT_ENV = "TRACKER_API_WAIT"


def _insecure(env: Mapping[str, str]) -> bool:
    return env.get(INSECURE_ENV, "").lower() in {"1", "true", "yes", "on"}


def _wait(env: Mapping[str, str]) -> float:
    raw = env.get(WAIT_ENV) or "5"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 60:
        raise ConfigError(f"{WAIT_ENV}: expected seconds from 0 to 60, got {raw!r}")
    return value


def create_app(
    settings: Settings | None = None,
    *,
    insecure: bool | None = None,
    env: Mapping[str, str] | None = None,
) -> Litestar:
    """The API app; refuses (``ConfigError``) to run without a tokens file unless insecure."""
    env = os.environ if env is None else env
    settings = Settings.from_env(env) if settings is None else settings
    insecure = _insecure(env) if insecure is None else insecure
    tokens: TokenFile | None = None
    if not insecure:
        path = token_file_path(settings)
        if not path.is_file():
            raise ConfigError(
                f"no API tokens file at {path}: run `tracker tokens create` first "
                "(or serve with --insecure)"
            )
        tokens = TokenFile(path)
    auth = Auth(tokens)
    api = Api(settings, auth, wait_seconds=_wait(env))
    page = status.StatusPage(
        parse_sources(env, settings.kafka_bootstrap), LagHistory(sample_seconds(env))
    )
    sampler: list[asyncio.Task[None]] = []

    async def start() -> None:
        api.open()
        LAG.api = api
        sampler.append(asyncio.create_task(page.history.run(api.tracker.status)))

    async def stop() -> None:
        for task in sampler:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if LAG.api is api:
            LAG.api = None
        api.close()

    return Litestar(
        route_handlers=[
            *sessions.ROUTES,
            *past.ROUTES,
            *resets.ROUTES,
            *ops.ROUTES,
            *status.ROUTES,
            Metrics,
        ],
        guards=[auth.guard],
        exception_handlers=HANDLERS,
        request_max_body_size=MAX_BODY,
        middleware=[PROMETHEUS.middleware],
        on_startup=[start],
        on_shutdown=[stop],
        state=State({"api": api, "status_page": page}),
        openapi_config=OpenAPIConfig(
            title="offset-tracker",
            version="0.1.0",
            description="Sessions and their consumption offsets (flux0-compatible).",
            path="/docs",
            render_plugins=[ScalarRenderPlugin(path="/"), SwaggerRenderPlugin(path="/swagger")],
        ),
    )


def create_server(env: Mapping[str, str] | None = None) -> fastpath.FastPath | Litestar:
    """uvicorn's factory for ``tracker serve``: :func:`create_app` behind the fast path for
    ``GET /api/sessions/{id}`` (:mod:`tracker.api.fastpath`) unless ``TRACKER_API_FASTPATH=0``."""
    env = os.environ if env is None else env
    app = create_app(env=env)
    return fastpath.wrap(app, env)
