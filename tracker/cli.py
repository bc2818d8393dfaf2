"""The ``tracker`` command line: click groups for the nouns, one renderer for the output.

Exit codes::

    0   ok
    1   not found, or a failed check (``verify`` found drift)
    2   bad input or usage; nothing was written
    75  unavailable, try again (EX_TEMPFAIL): Redis or the log cannot be reached, the log
        is locked by another process, or another projector got there first; the error is
        ``retriable``

Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import codecs
import logging
import os
import pwd
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import click
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tracker.errors import (
    ConfigError,
    InvalidInputError,
    SessionNotFoundError,
    TrackerError,
)
from tracker.events import AnyEvent, decode_event_json_line, encode_event_json
from tracker.logs import events_of, open_log
from tracker.model import SessionDTO, format_datetime
from tracker.results import CommitResult, ResetPlan
from tracker.service import Tracker
from tracker.settings import ENV, Settings

_json = msgspec.json.Encoder()

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 75

EPILOG = """\b
Exit codes:
  0   ok
  1   not found, or a failed check (verify found drift)
  2   bad input or usage; nothing was written
  75  unavailable, try again: Redis or the log cannot be reached, or the log is locked"""


def exit_code(error: TrackerError) -> int:
    """The documented exit code of an error (see the module docstring)."""
    if isinstance(error, InvalidInputError | ConfigError):
        return EXIT_USAGE
    if error.retriable:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED


LITERAL: dict[str, Any] = {"markup": False, "emoji": False, "highlight": False, "soft_wrap": True}
"""Console settings that print every string as given: titles like ``[/]``, ``[link=...]``
or ``:smile:`` are user text, not Rich markup, in every table, title and line."""


class Cli:
    """State shared by the commands: settings, the lazily opened tracker, the consoles."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.out = Console(**LITERAL)
        self.err = Console(stderr=True, **LITERAL)
        self._tracker: Tracker | None = None
        self._closers: list[Callable[[], None]] = []

    def on_close(self, closer: Callable[[], None]) -> None:
        self._closers.append(closer)

    def tracker(self, *, write: bool = False, catch_up: bool = True) -> Tracker:
        """The tracker; only commands that ``write`` may start a new log in the data dir."""
        if self._tracker is None:
            self._tracker = Tracker(self.settings, create=write, catch_up=catch_up)
        return self._tracker

    def close(self) -> None:
        for closer in self._closers:
            closer()
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None

    def json_line(self, value: object) -> None:
        sys.stdout.buffer.write(_json.encode(value) + b"\n")
        sys.stdout.buffer.flush()

    def say(self, text: str) -> None:
        self.out.print(text)

    @contextmanager
    def progress(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A progress bar on a terminal (stderr); silent otherwise."""
        if not self.err.is_terminal:
            yield lambda _: None
            return
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)

    # -- renderers -------------------------------------------------------------------

    def sessions(self, sessions: list[SessionDTO], as_json: bool, *, single: bool = False) -> None:
        if as_json:
            for session in sessions:
                self.json_line(session)
            return
        if single and sessions:
            session = sessions[0]
            table = Table(show_header=False, box=None)
            table.add_column(style="bold")
            table.add_column()
            table.add_row("id", session.id)
            table.add_row("agent_id", session.agent_id)
            table.add_row("user_id", session.user_id)
            table.add_row("created_at", format_datetime(session.created_at))
            table.add_row("title", "" if session.title is None else session.title)
            for consumer, offset in sorted(session.consumption_offsets.items()):
                table.add_row(f"offset {consumer}", str(offset))
            self.out.print(table)
            return
        table = Table("id", "agent_id", "user_id", "created_at", "title", "offsets")
        for session in sessions:
            offsets = ", ".join(f"{c}={o}" for c, o in sorted(session.consumption_offsets.items()))
            table.add_row(
                session.id,
                session.agent_id,
                session.user_id,
                format_datetime(session.created_at),
                session.title or "",
                offsets,
            )
        self.out.print(table)
        self.err.print(f"{len(sessions)} sessions")

    def offsets(self, session_id: str, offsets: dict[str, int], as_json: bool) -> None:
        if as_json:
            self.json_line(offsets)
            return
        table = Table("consumer", "offset", title=f"session {session_id}")
        for consumer, offset in sorted(offsets.items()):
            table.add_row(consumer, str(offset))
        self.out.print(table)


_HELP_INSTEAD: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())
"""A group run without a command shows its help (click >= 8.2 raises this for it)."""


class OneLineUsageError(click.UsageError):
    """A usage error shown as one line (click's own adds the usage and a blank line)."""

    def show(self, file: Any = None) -> None:
        hint = f" (see '{self.ctx.command_path} --help')" if self.ctx is not None else ""
        click.echo(f"error: {self.format_message()}{hint}", file=file, err=True)


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


pass_cli = click.make_pass_decorator(Cli)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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
    help="Redis holding the snapshots, e.g. redis://127.0.0.1:6379/0. "
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
    try:
        settings = load_settings(os.environ, data_dir=data_dir, redis_url=redis_url, prefix=prefix)
    except ConfigError as error:
        click.echo(f"error: {error}", err=True)
        ctx.exit(EXIT_USAGE)
    cli = Cli(settings)
    ctx.obj = cli
    ctx.call_on_close(cli.close)


# -- sessions ------------------------------------------------------------------------


@main.group()
def sessions() -> None:
    """Create, show, list, rename and delete sessions."""


@sessions.command("create")
@click.option("--agent-id", required=True, help="The agent of the session.")
@click.option("--user-id", required=True, help="The user of the session.")
@click.option("--id", "session_id", help="The session id (default: a new 10-character id).")
@click.option("--title", help="An optional title, at most 200 characters.")
@json_option
@pass_cli
def sessions_create(
    cli: Cli, agent_id: str, user_id: str, session_id: str | None, title: str | None, as_json: bool
) -> None:
    """Create a session with no offsets."""
    session = cli.tracker(write=True).create_session(
        agent_id, user_id, session_id=session_id, title=title
    )
    cli.sessions([session], as_json, single=True)


@sessions.command("show")
@click.argument("session_id")
@json_option
@pass_cli
def sessions_show(cli: Cli, session_id: str, as_json: bool) -> None:
    """Show one session (exit 1 if it is unknown, deleted or never created)."""
    tracker = cli.tracker()
    session = tracker.get_session(session_id)
    if session is None:
        state = tracker.session_state(session_id)
        if state is not None and state.deleted:
            raise SessionNotFoundError(f"session {session_id} was deleted")
        if state is not None and state.offsets:
            raise SessionNotFoundError(
                f"session {session_id} has offsets but was never created "
                f"(see `tracker offsets show {session_id}`)"
            )
        if state is not None:
            raise SessionNotFoundError(f"session {session_id} was never created")
        raise SessionNotFoundError(f"session {session_id} not found")
    cli.sessions([session], as_json, single=True)


@sessions.command("list")
@click.option("--user-id", help="Only this user's sessions.")
@click.option("--agent-id", help="Only this agent's sessions.")
@json_option
@pass_cli
def sessions_list(cli: Cli, user_id: str | None, agent_id: str | None, as_json: bool) -> None:
    """List sessions, oldest first (JSON lines with --json)."""
    cli.sessions(cli.tracker().list_sessions(user_id=user_id, agent_id=agent_id), as_json)


@sessions.command("rename")
@click.argument("session_id")
@click.argument("title", required=False)
@click.option("--clear", is_flag=True, help="Remove the title instead of setting one.")
@json_option
@pass_cli
def sessions_rename(
    cli: Cli, session_id: str, title: str | None, clear: bool, as_json: bool
) -> None:
    """Set a session's title to TITLE, or remove it with --clear."""
    if (title is not None) == clear:
        raise click.UsageError("give exactly one of TITLE or --clear")
    cli.sessions([cli.tracker(write=True).rename(session_id, title)], as_json, single=True)


@sessions.command("delete")
@click.argument("session_id")
@pass_cli
def sessions_delete(cli: Cli, session_id: str) -> None:
    """Delete a session; later events for it change nothing and its id is not reused."""
    position = cli.tracker(write=True).delete_session(session_id)
    cli.say(f"deleted session {session_id} (position {position.token()})")


# -- offsets -------------------------------------------------------------------------


@main.group()
def offsets() -> None:
    """Commit, show and reset consumption offsets."""


@offsets.command("commit", context_settings={"ignore_unknown_options": True})
@click.argument("session_id")
@click.argument("consumer")
@click.argument("offset")
@click.option(
    "--allow-unknown",
    is_flag=True,
    help="Keep the offset even if the session was never created (it may be in flight).",
)
@json_option
@pass_cli
def offsets_commit(
    cli: Cli, session_id: str, consumer: str, offset: str, allow_unknown: bool, as_json: bool
) -> None:
    """Record that CONSUMER processed SESSION_ID up to OFFSET (inclusive).

    Offsets only move forward: a lower OFFSET is recorded but changes nothing, and the
    command says it was stale. Use `offsets reset` to move an offset back.
    """
    result = cli.tracker(write=True).commit(
        session_id, consumer, parse_offset(offset), strict=not allow_unknown
    )
    if as_json:
        cli.json_line(commit_json(result))
    elif result.deleted:
        cli.say(
            f"deleted: session {session_id} was deleted; offset {result.offset} recorded, "
            "nothing changed"
        )
    elif result.stale:
        cli.say(
            f"stale: {consumer} is already at {result.previous} for session {session_id}; "
            f"offset {result.offset} recorded, nothing changed"
        )
    elif not result.changed:
        cli.say(f"unchanged: {consumer} is already at {result.current} for session {session_id}")
    else:
        cli.say(f"{session_id} {consumer} = {result.current} (position {result.position.token()})")


def commit_json(result: CommitResult) -> dict[str, object]:
    return {
        "session_id": result.session_id,
        "consumer": result.consumer,
        "offset": result.offset,
        "previous": result.previous,
        "current": result.current,
        "changed": result.changed,
        "stale": result.stale,
        "deleted": result.deleted,
        "position": result.position,
    }


@offsets.command("show")
@click.argument("session_id")
@json_option
@pass_cli
def offsets_show(cli: Cli, session_id: str, as_json: bool) -> None:
    """Show a session's offsets (also of a session that was never created)."""
    cli.offsets(session_id, cli.tracker().offsets(session_id), as_json)


@offsets.command("reset", context_settings={"ignore_unknown_options": True})
@click.argument("session_id")
@click.argument("consumer")
@click.option("--to-offset", "to_offset", required=True, help="The offset to set, lower ones too.")
@click.option("--reason", help="Why; recorded in the offset_reset event.")
@click.option(
    "--actor", default=default_actor, show_default="$USER, $LOGNAME or uid:<n>", help="Who."
)
@click.option("--execute", is_flag=True, help="Apply the reset; without it, only show the plan.")
@json_option
@pass_cli
def offsets_reset(
    cli: Cli,
    session_id: str,
    consumer: str,
    to_offset: str,
    reason: str | None,
    actor: str,
    execute: bool,
    as_json: bool,
) -> None:
    """Move CONSUMER's offset of SESSION_ID to --to-offset, backwards too.

    A dry run by default (as kafka-consumer-groups --reset-offsets): the plan is shown
    and nothing changes unless --execute is given.
    """
    tracker = cli.tracker(write=execute)
    target = parse_offset(to_offset)
    if execute:
        plan = tracker.reset_offset(session_id, consumer, target, reason=reason, actor=actor)
    else:
        plan = tracker.plan_reset(session_id, consumer, target)
    render_plan(cli, plan, as_json)


def render_plan(cli: Cli, plan: ResetPlan, as_json: bool) -> None:
    """A dry run shows the offset as it is and the target; an applied reset, before and now."""
    if as_json:
        cli.json_line(plan)
        return
    before, after = ("previous", "now") if plan.applied else ("current", "target")
    table = Table("session", "consumer", before, after)
    current = "-" if plan.current is None else str(plan.current)
    table.add_row(plan.session_id, plan.consumer, current, str(plan.target))
    cli.out.print(table)
    if plan.applied:
        assert plan.position is not None
        cli.say(f"reset applied (position {plan.position.token()})")
    else:
        cli.say("dry run: nothing changed; add --execute to apply this plan")


# -- events --------------------------------------------------------------------------


@main.group()
def events() -> None:
    """Import and export the event log as JSON lines."""


def read_events(source: BinaryIO, progress: Callable[[int], None]) -> Iterator[AnyEvent]:
    """Decode the lines one at a time; a bad line raises, which cancels the whole import.

    A UTF-8 byte order mark opening the file (as some Windows editors write) is skipped.
    """
    for number, raw in enumerate(source, start=1):
        line = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
        if line.strip():
            yield decode_event_json_line(line, number)
        progress(1)


@events.command("import")
@click.argument("source", type=click.File("rb"))
@pass_cli
def events_import(cli: Cli, source: BinaryIO) -> None:
    """Append the events of SOURCE (a JSON-lines file, or - for stdin) to the log.

    All or nothing: the file is streamed into one append, and if any line is bad (its
    number is named), or the import is interrupted, nothing is imported.
    """
    tracker = cli.tracker(write=True)
    with cli.progress("importing", None) as advance:
        result = tracker.import_events(read_events(source, advance))
    cli.err.print(f"imported {result.count} events")


@events.command("export")
@pass_cli
def events_export(cli: Cli) -> None:
    """Write every event in log order as JSON lines (the import format), with positions."""
    write = sys.stdout.buffer.write
    event_log = open_log(cli.settings, create=False)
    cli.on_close(event_log.close)
    for event in events_of(event_log):
        write(encode_event_json(event) + b"\n")
    sys.stdout.buffer.flush()


# -- rebuild and check ---------------------------------------------------------------


@main.command()
@click.option(
    "--force",
    is_flag=True,
    help="Replace the projection even if it is another log's (two data dirs, one prefix).",
)
@json_option
@pass_cli
def replay(cli: Cli, force: bool, as_json: bool) -> None:
    """Rebuild the Redis projection from the start of the log (into a new generation).

    Other processes may keep reading and writing: the new generation is promoted
    atomically and they rebind by themselves.
    """
    tracker = cli.tracker(catch_up=False)
    with cli.progress("replaying", tracker.event_count()) as advance:
        report = tracker.replay(advance, force=force)
    if as_json:
        cli.json_line(report)
        return
    cli.say(
        f"replayed {report.events} events into {report.sessions} sessions in "
        f"{report.seconds:.2f} s ({report.rate:,.0f} events/s)"
    )


@main.command()
@json_option
@pass_cli
def verify(cli: Cli, as_json: bool) -> None:
    """Fold the log in memory and compare every session with Redis (exit 1 on drift)."""
    tracker = cli.tracker(catch_up=False)
    with cli.progress("verifying", tracker.event_count()) as advance:
        report = tracker.verify(advance)
    if as_json:
        cli.json_line(report)
    else:
        for difference in report.differences:
            cli.say(f"{difference.session_id}: {difference.problem}")
        cli.say(f"verify: {len(report.differences)} differences")
    if report.differences:
        sys.exit(EXIT_FAILED)


@main.command()
@click.option(
    "--sessions",
    "session_count",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Sessions (at least 1).",
)
@click.option(
    "--commits",
    type=click.IntRange(min=1),
    default=300_000,
    show_default=True,
    help="Offset commits (at least 1).",
)
@click.option("--seed", default=7, show_default=True, help="Random seed of the workload.")
@pass_cli
def demo(cli: Cli, session_count: int, commits: int, seed: int) -> None:
    """Run a realistic workload on a fresh embedded tracker, then wipe, replay and verify.

    Uses a temporary data dir and its own embedded Redis, whatever is configured.
    """
    from tracker.demo import run_demo

    run_demo(cli.out, sessions=session_count, commits=commits, seed=seed)
