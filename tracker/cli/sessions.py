"""``tracker sessions``: create, show, list, rename and delete sessions."""

from __future__ import annotations

import click

from tracker.cli.app import main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.errors import (
    SessionNotFoundError,
)


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
