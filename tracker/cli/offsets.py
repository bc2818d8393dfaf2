"""``tracker offsets``: commit, show and reset consumption offsets."""

from __future__ import annotations

import click

from tracker.cli.app import default_actor, main, parse_offset
from tracker.cli.output import Cli, commit_json, json_option, pass_cli, render_plan


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
