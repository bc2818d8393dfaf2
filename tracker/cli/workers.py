"""``tracker worker`` and ``tracker streams``: run a worker, write messages to a stream."""

from __future__ import annotations

import codecs
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO

import click

from consumers.filestream import FileStream, append_messages, open_stream_log
from consumers.generate import synthetic_messages
from consumers.handlers import acknowledge, load_handler
from consumers.messages import input_message
from consumers.streams import Stream
from consumers.worker import Worker
from tracker.cli.app import main
from tracker.cli.output import Cli, json_option, pass_cli
from tracker.errors import ConfigError
from tracker.model import ConsumerName, checked

_STREAM_DIR = click.Path(file_okay=False, path_type=Path)


class _Input(click.File):
    """A file to read, or ``-``: stdin; a closed stdin is a usage error, not a traceback."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return super().convert(value, param, ctx)
        except RuntimeError as exc:  # click: "Was not able to determine binary stream ..."
            self.fail(f"cannot read stdin: {exc}", param, ctx)


def _stream_choice(stream: str | None, stream_dir: Path | None) -> None:
    if (stream is None) == (stream_dir is None):
        raise click.UsageError("give one of --stream TOPIC (Kafka) or --stream-dir DIR (files)")


def _bootstrap(cli: Cli) -> str:
    if not cli.settings.kafka_bootstrap:
        raise ConfigError("--stream needs a Kafka broker: set TRACKER_KAFKA_BOOTSTRAP")
    return cli.settings.kafka_bootstrap


@main.command()
@click.option("--stream", metavar="TOPIC", help="Read this Kafka topic (TRACKER_KAFKA_BOOTSTRAP).")
@click.option("--stream-dir", type=_STREAM_DIR, metavar="DIR", help="Read this file stream.")
@click.option("--consumer", required=True, help="Consumer name whose offsets are recorded.")
@click.option("--group", help="Kafka consumer group.  [default: the consumer name]")
@click.option(
    "--handler",
    metavar="MODULE:FUNCTION",
    help="Called with each message (sync or async).  [default: acknowledge only]",
)
@click.option("--dlq", help="Dead-letter topic (or directory).  [default: <stream>.dlq, DIR/dlq]")
@click.option(
    "--flush-ms",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Flush offsets at least this often.",
)
@click.option(
    "--flush-max",
    type=click.IntRange(min=1),
    default=5000,
    show_default=True,
    help="Flush after this many messages.",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Calls of a handler raising Retry before the message is dead-lettered.",
)
@click.option(
    "--retry-backoff-ms",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="First wait before a retry; doubles per attempt.",
)
@click.option(
    "--report-every",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds between summary lines on stderr (0: only the last).",
)
@click.option(
    "--session-timeout-ms",
    type=click.IntRange(min=1000),
    default=10_000,
    show_default=True,
    envvar="TRACKER_WORKER_SESSION_TIMEOUT_MS",
    help="Kafka group session timeout.",
)
@click.option(
    "--max-poll-interval-ms",
    type=click.IntRange(min=1000),
    default=300_000,
    show_default=True,
    envvar="TRACKER_WORKER_MAX_POLL_INTERVAL_MS",
    help="Kafka rebalance timeout; slow batches keep polling within it.",
)
@pass_cli
def worker(
    cli: Cli,
    stream: str | None,
    stream_dir: Path | None,
    consumer: str,
    group: str | None,
    handler: str | None,
    dlq: str | None,
    flush_ms: int,
    flush_max: int,
    max_attempts: int,
    retry_backoff_ms: int,
    report_every: float,
    session_timeout_ms: int,
    max_poll_interval_ms: int,
) -> None:
    """Read a stream of flux0 events, call the handler, record offsets per session.

    The session id is the message key (or a session_id header or field); the offset is
    the event's `offset`. Offsets are flushed every --flush-ms as offset_committed events,
    and only once the log has them is the stream position committed: at-least-once, and
    a redelivered message is harmless. Messages that cannot be decoded, or whose handler
    fails, go to the dead-letter stream with the reason. SIGTERM or Ctrl-C flushes, then
    exits 0.
    """
    _stream_choice(stream, stream_dir)
    checked(consumer, ConsumerName, "--consumer")
    call = acknowledge if handler is None else load_handler(handler)
    source: Stream
    if stream is not None:
        from consumers.kafkastream import KafkaStream

        source = KafkaStream(
            _bootstrap(cli),
            stream,
            consumer,
            group=group,
            dlq_topic=dlq,
            timeout=cli.settings.kafka_timeout,
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=max(session_timeout_ms // 5, 300),
            max_poll_interval_ms=max_poll_interval_ms,
        )
    else:
        assert stream_dir is not None
        source = FileStream(stream_dir, consumer, dlq=Path(dlq) if dlq else None)
    cli.on_close(source.close)
    tracker = cli.tracker(write=True)
    runner = Worker(
        source,
        tracker,
        consumer,
        call,
        flush_ms=flush_ms,
        flush_max=flush_max,
        max_attempts=max_attempts,
        backoff=retry_backoff_ms / 1000,
        report_every=report_every,
        report=cli.err.print,
    )

    def stop(signum: int, frame: FrameType | None) -> None:
        if runner.stopping:
            if signum == signal.SIGINT:  # Ctrl-C twice: quit without flushing
                raise KeyboardInterrupt
            return
        cli.err.print(f"worker {consumer}: stopping, flushing offsets")
        runner.stop()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    cli.err.print(f"worker {consumer}: reading {source.description}")
    try:
        runner.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@main.group()
def streams() -> None:
    """Write messages to a stream (a Kafka topic or a file stream)."""


def read_lines(source: BinaryIO) -> Iterator[list[tuple[str, bytes]]]:
    """The input's messages in chunks; a bad line raises, naming its number."""
    chunk: list[tuple[str, bytes]] = []
    for number, raw in enumerate(source, start=1):
        line = raw.removeprefix(codecs.BOM_UTF8) if number == 1 else raw
        if line.strip():
            chunk.append(input_message(line, f"line {number}"))
            if len(chunk) == 1_000:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


@streams.command("append")
@click.argument("source", type=_Input("rb"), required=False)
@click.option("--stream", metavar="TOPIC", help="Write to this Kafka topic (created if missing).")
@click.option("--stream-dir", type=_STREAM_DIR, metavar="DIR", help="Write to this file stream.")
@click.option(
    "--generate",
    type=click.IntRange(min=1),
    metavar="N",
    help="Write N synthetic flux0 events instead of reading SOURCE.",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="Sessions the synthetic events are spread over.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of --generate.")
@json_option
@pass_cli
def streams_append(
    cli: Cli,
    source: BinaryIO | None,
    stream: str | None,
    stream_dir: Path | None,
    generate: int | None,
    sessions: int,
    seed: int,
    as_json: bool,
) -> None:
    """Append messages to a stream: each line of SOURCE (a file, or - for stdin) is a flux0
    event (JSON) with an added "session_id", which becomes the message key.

    On a file stream the append is all or nothing: a bad line (named by its number) or an
    interruption writes nothing. On Kafka the input is checked whole before the first
    message is sent.
    """
    _stream_choice(stream, stream_dir)
    if (source is None) == (generate is None):
        raise click.UsageError("give SOURCE (a file or -) or --generate N, not both")
    if generate is not None:
        chunks: Iterator[list[tuple[str, bytes]]] = synthetic_messages(
            generate, sessions, seed=seed
        )
    else:
        assert source is not None
        chunks = read_lines(source)
    started = time.perf_counter()
    if stream_dir is not None:
        log = open_stream_log(stream_dir, create=True, fsync=cli.settings.fsync)
        cli.on_close(log.close)
        count = append_messages(log, chunks)
        where = str(stream_dir)
    else:
        assert stream is not None
        from consumers.kafkastream import produce_messages

        if generate is None:
            chunks = iter(list(chunks))  # every line is checked before the first is sent
        count = produce_messages(
            _bootstrap(cli),
            stream,
            chunks,
            partitions=cli.settings.partitions,
            timeout=cli.settings.kafka_timeout,
        )
        where = stream
    seconds = time.perf_counter() - started
    if as_json:
        cli.json_line({"stream": where, "messages": count, "seconds": round(seconds, 3)})
    else:
        cli.err.print(f"appended {count:,} messages to {where} in {seconds:.2f} s")
