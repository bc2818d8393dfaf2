"""``tracker sessions``: create, show (now or in the past), list, rename, delete; history."""

from __future__ import annotations

import click

from tracker.cli.app import main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.errors import (
    SessionNotFoundError,
)
from tracker.history import parse_as_of, parse_position


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
@click.option(
    "--as-of",
    metavar="TIME|POSITION",
    help="Show the session as it was at this time (ISO 8601 with a zone, e.g. "
    "2025-01-29T09:27:41Z) or log position (PARTITION:OFFSET:INDEX), from the log.",
)
@click.option(
    "--min-position",
    metavar="POSITION",
    help="First wait until this position (PARTITION:OFFSET:INDEX, as a write printed it) "
    "is visible: read-your-writes; exit 75 if it is not within --timeout.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="How long --min-position waits.  [default: TRACKER_WAIT_TIMEOUT, 30 s]",
)
@json_option
@pass_cli
def sessions_show(
    cli: Cli,
    session_id: str,
    as_of: str | None,
    min_position: str | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Show one session (exit 1 if it is unknown, deleted or never created).

    With --as-of, as it was then (exit 1 if it did not exist then).
    """
    if as_of is not None and min_position is not None:
        raise click.UsageError("give at most one of --as-of or --min-position")
    if timeout is not None and min_position is None:
        raise click.UsageError("--timeout applies to --min-position only")
    if as_of is not None:
        point = parse_as_of(as_of)
        past = cli.tracker().session_as_of(session_id, point)
        if past is None:
            raise SessionNotFoundError(f"session {session_id} did not exist at {as_of}")
        cli.sessions([past], as_json, single=True)
        return
    tracker = cli.tracker()
    if min_position is not None:
        tracker.wait_for(parse_position(min_position, "min_position"), timeout)
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


@sessions.command("history")
@click.argument("session_id")
@json_option
@pass_cli
def sessions_history(cli: Cli, session_id: str, as_json: bool) -> None:
    """Every event of a session in log order, from the log (deleted sessions too).

    Exit 1 if the log holds no event for SESSION_ID. With --json, one line per event:
    its position, recorded_at, and the event as `tracker events export` writes it.
    """
    cli.history(cli.tracker().history(session_id), as_json)


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
