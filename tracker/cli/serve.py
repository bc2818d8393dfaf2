"""``tracker serve``: the HTTP API (Litestar on uvicorn, uvloop and httptools)."""

from __future__ import annotations

import os

import click

from tracker.cli.app import EXIT_USAGE, main
from tracker.cli.output import Cli, pass_cli
from tracker.settings import ENV
from tracker.tokens import token_file_path

APP = "tracker.api.app:create_server"
"""uvicorn's factory: each worker process builds its own app (and opens its own Tracker)."""


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port", default=8080, show_default=True, type=click.IntRange(0, 65535), help="TCP port."
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 256),
    help="Server processes; each has its own tracker and its own metrics.",
)
@click.option("--insecure", is_flag=True, help="Need no tokens: every request may do anything.")
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="Log a line per request (uvicorn's: client, method, path, status) on stdout. Off by "
    "default: it costs about a tenth of a request's time. Tokens are never logged either way.",
)
@pass_cli
def serve(cli: Cli, host: str, port: int, workers: int, insecure: bool, access_log: bool) -> None:
    """Serve the flux0-compatible HTTP API (OpenAPI UI at /docs, schema at /openapi.json).

    Requests need `Authorization: Bearer <token>`, from `tracker tokens create`
    (TRACKER_API_TOKENS_FILE, default <data dir>/tokens.json), unless --insecure.
    """
    import uvicorn

    from tracker.api.app import INSECURE_ENV

    settings = cli.settings
    if insecure:
        cli.err.print("warning: --insecure: the API needs no token; anyone who reaches it may "
                      "read, change and delete every session")  # fmt: skip
    else:
        path = token_file_path(settings)
        if not path.is_file():
            click.echo(
                f"error: no API tokens file at {path}: run `tracker tokens create` first "
                "(or serve with --insecure)",
                err=True,
            )
            raise SystemExit(EXIT_USAGE)
    # the workers build their settings from the environment: pass on the flags' values
    os.environ[ENV["data_dir"]] = str(settings.data_dir)
    os.environ[ENV["prefix"]] = settings.prefix
    if settings.redis_url is not None:
        os.environ[ENV["redis_url"]] = settings.redis_url
    os.environ[INSECURE_ENV] = "1" if insecure else "0"
    uvicorn.run(
        APP,
        factory=True,
        host=host,
        port=port,
        workers=workers,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        server_header=False,
        access_log=access_log,
    )
