"""``tracker tokens``: create, list and revoke the HTTP API's scoped tokens."""

from __future__ import annotations

import click
from rich.table import Table

from tracker.cli.app import main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.model import UserId, checked, format_datetime
from tracker.tokens import SCOPES, Scope, TokenFile, TokenName, token_file_path


def _file(cli: Cli) -> TokenFile:
    return TokenFile(token_file_path(cli.settings))


@main.group("tokens")
def tokens_group() -> None:
    """Create, list and revoke the HTTP API's tokens.

    \b
    The tokens live in TRACKER_API_TOKENS_FILE, or else in DATA_DIR/tokens.json
    (mode 0600). The file holds each token's SHA-256, never the token itself: a
    token is shown once, by `tokens create`. A running server notices a change
    within a second.

    \b
    Scopes, each allowing what the one before it allows:
      read   read sessions, offsets and events
      write  also create sessions and commit offsets
      admin  also reset offsets and delete sessions
    A token bound to a user (--user-id) sees only that user's sessions.
    """


@tokens_group.command("create")
@click.option(
    "--scope", type=click.Choice(SCOPES), required=True, help="What the token allows (see above)."
)
@click.option("--user-id", metavar="USER", help="Limit the token to this user's sessions.")
@click.option(
    "--name",
    metavar="NAME",
    help="A unique name, to list and revoke it by (1..64 chars of [A-Za-z0-9_.-]).  "
    "[default: SCOPE-<6 hex digits>]",
)
@json_option
@pass_cli
def tokens_create(
    cli: Cli, scope: Scope, user_id: str | None, name: str | None, as_json: bool
) -> None:
    """Create a token and print it, once: store it now, it cannot be shown again.

    Plain output is the token alone on stdout; with --json, one object with the token,
    its name, scope and user_id.
    """
    if user_id is not None:
        checked(user_id, UserId, "--user-id")
    if name is not None:
        checked(name, TokenName, "--name")
    token, grant = _file(cli).create(scope, user_id=user_id, name=name)
    if as_json:
        cli.json_line(
            {"token": token, "name": grant.name, "scope": grant.scope, "user_id": grant.user_id}
        )
        return
    click.echo(token)
    user = "" if grant.user_id is None else f", user {grant.user_id}"
    cli.err.print(
        f"token {grant.name} ({grant.scope}{user}) created; store it now: it is shown only once"
    )


@tokens_group.command("list")
@json_option
@pass_cli
def tokens_list(cli: Cli, as_json: bool) -> None:
    """List the tokens: name, scope, user and creation time (never the token or its hash).

    With --json, one object per line: name, scope, user_id, created_at.
    """
    file = _file(cli)
    entries = file.entries()
    if as_json:
        for entry in entries:
            grant = entry.grant
            cli.json_line(
                {
                    "name": grant.name,
                    "scope": grant.scope,
                    "user_id": grant.user_id,
                    "created_at": entry.created_at,
                }
            )
        return
    table = Table("name", "scope", "user", "created")
    for entry in entries:
        grant = entry.grant
        user = "(all users)" if grant.user_id is None else grant.user_id
        table.add_row(grant.name, grant.scope, user, format_datetime(entry.created_at))
    cli.out.print(table)
    cli.err.print(f"{len(entries)} tokens in {file.path}")


@tokens_group.command("revoke")
@click.argument("name")
@pass_cli
def tokens_revoke(cli: Cli, name: str) -> None:
    """Revoke the token NAME (exit 1 if there is none); a server refuses it within a second."""
    grant = _file(cli).revoke(name)
    cli.say(f"revoked token {grant.name} ({grant.scope})")
