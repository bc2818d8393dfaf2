"""``tracker events``: the log as JSON lines, imported and exported."""

from __future__ import annotations

import codecs
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO

import click

from tracker.cli.app import main
from tracker.cli.output import Cli, pass_cli
from tracker.events import AnyEvent, decode_event_json_line, encode_event_json
from tracker.logs import events_of, open_log


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
