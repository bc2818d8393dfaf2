"""The CLI's output: tables, JSON lines and progress bars; user text printed literally."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click
import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tracker.history import HistoryEntry
from tracker.model import SessionDTO, format_datetime
from tracker.results import CommitResult, ResetPlan
from tracker.service import Tracker
from tracker.settings import Settings

_json = msgspec.json.Encoder()

HISTORY_ENVELOPE = frozenset(["type", "session_id", "event_id", "recorded_at", "position"])
"""Fields a history table shows in columns of their own, or not at all."""

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
    def progress(
        self, description: str, total: Callable[[], int] | None
    ) -> Iterator[Callable[[int], None]]:
        """A progress bar on a terminal (stderr); silent otherwise.

        ``total`` is only called for a bar that is shown: counting a Kafka topic's events
        means reading it.
        """
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
            task = bar.add_task(description, total=total() if total is not None else None)
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

    def history(self, entries: list[HistoryEntry], as_json: bool) -> None:
        if as_json:
            for entry in entries:
                self.json_line(entry)
            return
        table = Table()
        for column in ("position", "recorded_at", "type"):
            table.add_column(column, no_wrap=True)
        table.add_column("details", overflow="fold")
        for entry in entries:
            event = entry.event
            details = {k: v for k, v in event.items() if k not in HISTORY_ENVELOPE}
            text = ", ".join(f"{name}={value}" for name, value in details.items())
            if event.get("type") == "title_changed" and "title" not in details:
                text = "title cleared"
            table.add_row(
                entry.position, format_datetime(entry.recorded_at), str(event.get("type")), text
            )
        self.out.print(table)
        self.err.print(f"{len(entries)} events")

    def offsets(self, session_id: str, offsets: dict[str, int], as_json: bool) -> None:
        if as_json:
            self.json_line(offsets)
            return
        table = Table("consumer", "offset", title=f"session {session_id}")
        for consumer, offset in sorted(offsets.items()):
            table.add_row(consumer, str(offset))
        self.out.print(table)


pass_cli = click.make_pass_decorator(Cli)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


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
