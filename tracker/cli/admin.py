"""Operators' commands: ``replay``, ``verify``, ``status``, ``project`` and ``demo``."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import click
from rich.table import Table

from tracker.cli.app import EXIT_FAILED, main
from tracker.cli.output import Cli, json_option, pass_cli


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
    with cli.progress("replaying", tracker.event_count) as advance:
        report = tracker.replay(advance, force=force)
    if as_json:
        cli.json_line(report)
        return
    if report.superseded:
        cli.say(
            f"a replay running at the same time promoted generation {report.generation}; "
            "it holds the whole log, this one's work was dropped"
        )
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
    with cli.progress("verifying", tracker.event_count) as advance:
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
    default=500,
    show_default=True,
    help="Sessions the stream's events belong to.",
)
@click.option(
    "--messages",
    type=click.IntRange(min=1),
    default=50_000,
    show_default=True,
    help="flux0 events in the stream.",
)
@click.option("--seed", default=7, show_default=True, help="Random seed of the workload.")
@click.option(
    "--kafka",
    metavar="BOOTSTRAP",
    help="Run on this Kafka broker (fresh topics) instead of the embedded file log.",
)
@pass_cli
def demo(cli: Cli, session_count: int, messages: int, seed: int, kafka: str | None) -> None:
    """Two workers (notifier, indexer) read a stream of flux0 events and record their
    offsets; then the Redis projection is wiped, replayed from the log and verified.

    Uses a temporary data dir and its own embedded Redis, whatever is configured.
    """
    from tracker.demo import run_demo

    run_demo(cli.out, sessions=session_count, messages=messages, seed=seed, kafka=kafka)


@main.command()
@json_option
@pass_cli
def status(cli: Cli, as_json: bool) -> None:
    """Show, per partition, the log's end, what Redis has applied, and the lag.

    Positions are PARTITION:OFFSET:INDEX; the lag counts events. Reads only: it projects
    nothing (see `tracker project`).
    """
    report = cli.tracker(catch_up=False).status()
    if as_json:
        cli.json_line(report)
        return
    table = Table("partition", "end", "applied", "lag", title=f"generation {report.generation}")
    for part in report.partitions:
        table.add_row(str(part.partition), part.end or "-", part.applied or "-", str(part.lag))
    cli.out.print(table)


@main.command()
@click.option("--once", is_flag=True, help="Apply what the log holds now, then exit.")
@click.option(
    "--report-every",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    help="Seconds between the one-line lag reports on stderr.",
)
@pass_cli
def project(cli: Cli, once: bool, report_every: float) -> None:
    """Apply the event log to Redis as it grows: the long-running projector.

    Resumes from the checkpoints in Redis; any number may run (a crashed or stalled one
    changes nothing twice). Stops cleanly on SIGTERM or Ctrl-C (exit 0) after the batch
    in hand.
    """
    tracker = cli.tracker(write=True, catch_up=False)

    def report() -> None:
        cli.err.print(f"project: {tracker.lag_report()}")

    tailer = tracker.tailer(report=report, report_seconds=report_every)

    def stop(signum: int, frame: FrameType | None) -> None:
        tailer.stop.set()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        applied = tailer.run(once=once)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    cli.err.print(f"project: stopped after applying {applied} events")
