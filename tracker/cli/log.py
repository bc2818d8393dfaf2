"""``tracker log``: the file log itself (``log check``)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tracker.cli.app import EXIT_FAILED, main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.errors import ConfigError
from tracker.logs.check import check_log


@main.group("log")
def log_group() -> None:
    """Inspect the file log (the embedded event log, or a stream directory)."""


@log_group.command("check")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="A file log's directory, e.g. a stream directory.  [default: DATA_DIR/log]",
)
@json_option
@pass_cli
def check(cli: Cli, directory: Path | None, as_json: bool) -> None:
    """Read every frame of every segment and report each damaged one (exit 1 if any).

    Changes nothing and takes no lock a writer waits for, so it runs next to workers
    and commands. A torn tail (an unfinished append, never acknowledged) is cut by the
    next append; any other damage stops readers there: restore that segment from a backup.
    """
    if directory is None:
        if cli.settings.kafka_bootstrap:
            raise ConfigError(
                "log check reads a file log, but the event log is the Kafka topic "
                f"{cli.settings.event_topic!r} (TRACKER_KAFKA_BOOTSTRAP is set); "
                "give --dir to check a file log such as a stream directory"
            )
        directory = cli.settings.data_dir / "log"
    report = check_log(directory)
    if as_json:
        cli.json_line(report)
    else:
        for damage in report.damaged:
            frame = "" if damage.frame is None else f" (frame {damage.frame})"
            cli.say(f"{damage.segment} byte {damage.byte}{frame}: {damage.kind}: {damage.detail}")
        if report.appending:
            cli.say("an append is in progress at the end of the log (not damage)")
        cli.say(
            f"log check: {report.segments} segments, {report.frames} frames, "
            f"{report.records} records, {len(report.damaged)} damaged"
        )
    if report.damaged:
        sys.exit(EXIT_FAILED)
