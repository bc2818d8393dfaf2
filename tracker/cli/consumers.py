"""``tracker consumers``: how far the consumers of a stream are behind."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from consumers.filestream import open_stream_log
from consumers.lag import (
    ConsumerLag,
    KafkaTopic,
    StreamScan,
    file_committed,
    file_consumers,
    lag_report,
    scan_file_stream,
    tracker_offsets,
)
from tracker.cli.app import main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.cli.workers import _STREAM_DIR, _bootstrap, _stream_choice
from tracker.model import ConsumerName, checked

DEFAULT_SESSIONS_LIMIT = 20


@main.group("consumers")
def consumers_group() -> None:
    """Inspect the consumers of a stream (a Kafka topic or a file stream)."""


@consumers_group.command("lag")
@click.option("--stream", metavar="TOPIC", help="This Kafka topic (TRACKER_KAFKA_BOOTSTRAP).")
@click.option("--stream-dir", type=_STREAM_DIR, metavar="DIR", help="This file stream.")
@click.option(
    "--consumer",
    "names",
    multiple=True,
    metavar="NAME",
    help="Report this consumer (repeatable).  [default: every consumer with a position: "
    "DIR/consumers/NAME.json, or a Kafka group with offsets on the topic]",
)
@click.option(
    "--sessions-limit",
    type=click.IntRange(min=0),
    metavar="N",
    help=f"Sessions listed per consumer, most unread first (0: all).  "
    f"[default: {DEFAULT_SESSIONS_LIMIT}; with --json all]",
)
@json_option
@pass_cli
def consumers_lag(
    cli: Cli,
    stream: str | None,
    stream_dir: Path | None,
    names: tuple[str, ...],
    sessions_limit: int | None,
    as_json: bool,
) -> None:
    """Per consumer: the lag per partition (the stream's end, the committed position,
    the messages in between) and per session the unread messages: the session's highest
    offset in the stream (its head) minus the consumer's offset in the tracker, or head + 1
    without one; the sessions with the most unread first.

    On Kafka a consumer is the consumer group of the same name (`tracker worker`'s
    default). The whole stream is read. With --json: one object per consumer, every
    session in "top_sessions" unless --sessions-limit is given. In Kafka mode the tracker's
    offsets are those the projectors have applied.
    """
    _stream_choice(stream, stream_dir)
    for name in names:
        checked(name, ConsumerName, "--consumer")
    scan: StreamScan
    if stream_dir is not None:
        log = open_stream_log(stream_dir, create=False, fsync=cli.settings.fsync)
        cli.on_close(log.close)
        consumers = sorted(set(names)) or file_consumers(stream_dir)
        committed = {c: file_committed(stream_dir, log.log_id, c) for c in consumers}
        if not consumers:
            _none_found(cli, str(stream_dir), as_json)
            return
        tracker = cli.tracker()
        with cli.progress(f"reading {stream_dir}", lambda: log.count(0)) as advance:
            scan = scan_file_stream(log, str(stream_dir), advance)
    else:
        assert stream is not None
        topic = KafkaTopic(_bootstrap(cli), stream, timeout=cli.settings.kafka_timeout)
        cli.on_close(topic.close)
        consumers = sorted(set(names)) or topic.groups()
        if not consumers:
            _none_found(cli, stream, as_json)
            return
        committed = topic.committed(consumers)
        tracker = cli.tracker()
        with cli.progress(f"reading {stream}", None) as advance:
            scan = topic.scan(advance)
    offsets = tracker_offsets(tracker, scan.heads)
    limit = sessions_limit or None
    if sessions_limit is None and not as_json:
        limit = DEFAULT_SESSIONS_LIMIT
    reports = lag_report(scan, committed, offsets, sessions_limit=limit)
    if as_json:
        for report in reports:
            cli.json_line(report)
    else:
        _render(cli, scan, reports)


def _none_found(cli: Cli, stream: str, as_json: bool) -> None:
    if not as_json:
        cli.err.print(f"no consumer has a position on {stream}; name one with --consumer")


def _render(cli: Cli, scan: StreamScan, reports: list[ConsumerLag]) -> None:
    cli.say(f"lag of {scan.name} ({scan.messages:,} messages)")
    table = Table("consumer", "partition", "end", "committed", "lag")
    for report in reports:
        for p in report.partitions:
            committed = "-" if p.committed is None else f"{p.committed:,}"
            table.add_row(report.consumer, str(p.partition), f"{p.end:,}", committed, f"{p.lag:,}")
        if len(report.partitions) > 1:
            end = sum(p.end for p in report.partitions)
            table.add_row(report.consumer, "all", f"{end:,}", "", f"{report.lag:,}")
    cli.out.print(table)
    for report in reports:
        listed = [s for s in report.top_sessions if s.unread]
        if not listed:
            cli.say(f"{report.consumer}: no unread messages in {report.sessions:,} sessions")
            continue
        heading = (
            f"{report.consumer}: {report.unread:,} unread in {report.sessions_behind:,} of "
            f"{report.sessions:,} sessions"
        )
        if len(listed) < report.sessions_behind:
            heading += f" (the {len(listed):,} with the most)"
        cli.say(heading)
        sessions = Table("session", "head", "offset", "unread")
        for s in listed:
            offset = "-" if s.offset is None else str(s.offset)
            sessions.add_row(s.session_id, str(s.head), offset, f"{s.unread:,}")
        cli.out.print(sessions)
    if scan.undecodable:
        cli.err.print(
            f"{scan.undecodable:,} of {scan.messages:,} messages have no session id or "
            "offset: counted in the lag, in no session"
        )
