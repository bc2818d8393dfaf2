"""The ``tracker`` command line: click groups for the nouns, one renderer for the output.

Exit codes::

    0   ok
    1   not found, or a failed check (``verify`` found drift)
    2   bad input or usage; nothing was written
    75  unavailable, try again (EX_TEMPFAIL): Redis or the log cannot be reached, the log
        is locked by another process, another projector got there first, or the disk is
        full (or a file size limit is reached: nothing was appended, try again once there
        is room); the error is ``retriable``

Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import logging
import os
import pwd
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from tracker.cli.output import Cli
from tracker.errors import (
    ConfigError,
    InvalidInputError,
    TrackerError,
)
from tracker.settings import ENV, Settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 75

EPILOG = """\b
Exit codes:
  0   ok
  1   not found, or a failed check (verify found drift)
  2   bad input or usage; nothing was written
  75  unavailable, try again: Redis or the log cannot be reached, the log is
      locked, or the disk is full (nothing was appended)"""


def exit_code(error: TrackerError) -> int:
    """The documented exit code of an error (see the module docstring)."""
    if isinstance(error, InvalidInputError | ConfigError):
        return EXIT_USAGE
    if error.retriable:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


_HELP_INSTEAD: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""A group run without a command shows its help (click >= 8.2 raises this for it)."""


_LINE_BREAKS = re.compile(r"\s*\n\s*")


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (click's own adds the usage and a blank line)."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        # click lists the choices of a missing option on lines of their own
        message = _LINE_BREAKS.sub(" ", self.format_message())
        click.echo(f"error: {message}{hint}", file=file, err=True)


class TrackerGroup(click.Group):
    """Maps :class:`TrackerError` and usage errors to one line on stderr and the exit code."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except _HELP_INSTEAD:
            raise
        except click.UsageError as error:
            raise OneLineUsageError(error.format_message(), error.ctx) from error

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _HELP_INSTEAD:
            raise
        except click.UsageError as error:
            raise OneLineUsageError(error.format_message(), error.ctx) from error
        except TrackerError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(exit_code(error))


def default_actor(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """Who runs the command, for ``offsets reset --actor``; never raises.

    ``$USER`` or ``$LOGNAME``, else the passwd name of the uid, else ``uid:<n>``:
    ``getpass.getuser()`` raises where the uid has no passwd entry, as in a container
    started with a random ``--user``.
    """
    env = os.environ if env is None else env
    for name in ("USER", "LOGNAME"):
        if value := env.get(name):
            return value
    uid = os.getuid() if uid is None else uid
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid:{uid}"


_INTEGER = re.compile(r"-?[0-9]+")


def parse_offset(text: str) -> int:
    """The OFFSET argument as an integer; range checks are the model's.

    Only ASCII digits and a minus sign: no ``+``, spaces, ``_`` or a trailing newline,
    all of which ``int()`` would accept.
    """
    if not _INTEGER.fullmatch(text):
        raise InvalidInputError(f"offset: {text!r} is not an integer")
    return int(text)


FLAGS = {"data_dir": "--data-dir", "redis_url": "--redis-url", "prefix": "--prefix"}
"""The settings that have a flag, and the flag's name (errors name it)."""


def load_settings(environ: Mapping[str, str], **flags: Any) -> Settings:
    """The environment's settings with the given flags on top.

    A flag replaces its variable, which is then not read at all: a bad value in the
    environment does not matter when the flag is given.
    """
    replaced = {ENV[name] for name, value in flags.items() if value is not None}
    env = {name: value for name, value in environ.items() if name not in replaced}
    return Settings.from_env(env).with_overrides(names=FLAGS, **flags)


@click.group(
    cls=TrackerGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the file log (and the embedded Redis) live.  "
    "[env: TRACKER_DATA_DIR; default: ./.tracker]",
)
@click.option(
    "--redis-url",
    help="Redis holding the snapshots, e.g. redis://127.0.0.1:6379/0, or a Redis Cluster: "
    "redis+cluster://host:port[,host:port...]. "
    "[env: TRACKER_REDIS_URL; default: an embedded redis-server in the data dir]",
)
@click.option(
    "--prefix",
    help="Prefix of every Redis key.  [env: TRACKER_PREFIX; default: trk]",
)
@click.version_option(package_name="offset-tracker")
@click.pass_context
def main(
    ctx: click.Context, data_dir: Path | None, redis_url: str | None, prefix: str | None
) -> None:
    """Event-sourced consumption offset tracker.

    Every change is appended to an event log (the source of truth); Redis holds the
    current sessions, rebuilt from the log by `tracker replay`.
    """
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING, stream=sys.stderr)
    # kafka-python logs every dropped connection with a traceback; the tracker reports an
    # unreachable broker itself, as one line and exit code 75
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        settings = load_settings(os.environ, data_dir=data_dir, redis_url=redis_url, prefix=prefix)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(EXIT_USAGE)
    cli = Cli(settings)
    ctx.obj = cli
    ctx.call_on_close(cli.close)
