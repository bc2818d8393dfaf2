"""The status page's recent dead letters, read where workers write them.

``TRACKER_API_DLQ`` lists the places, separated by commas:

* ``dir:PATH``: a file stream's dead-letter directory (``DIR/dlq`` by default, or the
  worker's ``--dlq`` directory), a file log of StreamRecords;
* ``kafka:TOPIC``: a Kafka dead-letter topic (``<topic>.dlq`` by default) on the brokers
  of ``TRACKER_KAFKA_BOOTSTRAP``; ``kafka:HOST:PORT/TOPIC`` names the broker.

Each letter carries the ``dlq.*`` headers the worker adds (reason, consumer, stream, the
original partition and offset); Kafka adds the time it was written, a file log has none.
Only the last :data:`SHOWN` letters of each place are read, from the end backwards.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from consumers.messages import Headers, decode_record
from tracker.errors import ConfigError, LogNotFoundError, TrackerError
from tracker.events import Position
from tracker.logs.file import FileLog

DLQ_ENV = "TRACKER_API_DLQ"
SHOWN = 20
KAFKA_SECONDS = 3.0
"""How long reading a Kafka dead-letter topic may take before the page says so."""
KAFKA_SCAN = 10_000
"""Records read at most from a Kafka topic's tail (its end offset may be a lower bound)."""
_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}")


@dataclass(frozen=True)
class Source:
    """One place dead letters are written to."""

    kind: Literal["dir", "kafka"]
    where: str
    """The directory, or the topic."""
    bootstrap: str | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.where}"


@dataclass(frozen=True)
class Letter:
    """One dead letter as the page shows it."""

    source: str
    time: datetime | None
    consumer: str
    stream: str
    position: str
    """The original message's ``partition:offset`` in its stream."""
    reason: str


def parse_sources(env: Mapping[str, str], kafka_bootstrap: str | None) -> list[Source]:
    """The places of ``TRACKER_API_DLQ``; a ``ConfigError`` naming a malformed entry."""
    sources: list[Source] = []
    for raw in (env.get(DLQ_ENV) or "").split(","):
        entry = raw.strip()
        if not entry:
            continue
        kind, _, rest = entry.partition(":")
        if kind == "dir" and rest:
            sources.append(Source("dir", rest))
        elif kind == "kafka" and rest:
            bootstrap, _, topic = rest.rpartition("/")
            bootstrap = bootstrap or kafka_bootstrap or ""
            if not _TOPIC.fullmatch(topic):
                raise ConfigError(f"{DLQ_ENV}: {entry!r} does not name a Kafka topic")
            if not bootstrap:
                raise ConfigError(
                    f"{DLQ_ENV}: {entry!r} needs TRACKER_KAFKA_BOOTSTRAP or kafka:HOST:PORT/TOPIC"
                )
            sources.append(Source("kafka", topic, bootstrap))
        else:
            raise ConfigError(
                f"{DLQ_ENV}: expected dir:PATH or kafka:TOPIC entries separated by commas, "
                f"got {entry!r}"
            )
    return sources


def _letter(source: str, headers: Headers, at: datetime | None) -> Letter:
    named = {name: value.decode(errors="replace") for name, value in headers}
    partition, offset = named.get("dlq.partition", "?"), named.get("dlq.offset", "?")
    return Letter(
        source=source,
        time=at,
        consumer=named.get("dlq.consumer", "?"),
        stream=named.get("dlq.stream", "?"),
        position=f"{partition}:{offset}",
        reason=named.get("dlq.reason", "(no reason recorded)"),
    )


def _undecodable(source: str, at: datetime | None) -> Letter:
    return Letter(source, at, "?", "?", "?", "(not a dead-letter record)")


def read_directory(source: Source) -> list[Letter]:
    """The last letters of a file dead-letter log, oldest first; none if it does not exist
    (a worker creates it with its first dead letter)."""
    if not (Path(source.where) / "log.json").exists():
        return []
    try:
        log = FileLog(Path(source.where), create=False)
    except LogNotFoundError:
        return []
    records: deque[bytes] = deque(maxlen=SHOWN)
    with log:
        end = log.end(0)
        frame = -1 if end is None else end.offset
        while frame >= 0 and len(records) < SHOWN:
            for batch in reversed(log.read(0, Position(0, frame, -1), 1)):
                records.extendleft(reversed(batch.records))
            frame -= 1
    letters = []
    for raw in list(records)[-SHOWN:]:
        try:
            letters.append(_letter(source.label, decode_record(raw).headers, None))
        except ValueError:
            letters.append(_undecodable(source.label, None))
    return letters


def read_topic(source: Source) -> list[Letter]:
    """The last letters of a Kafka dead-letter topic (every partition), oldest first."""
    from kafka import KafkaConsumer, TopicPartition

    ms = int(KAFKA_SECONDS * 1000)
    consumer = KafkaConsumer(
        bootstrap_servers=source.bootstrap,
        client_id="tracker-status-dlq",
        group_id=None,
        enable_auto_commit=False,
        request_timeout_ms=max(ms, 1000),
    )
    try:
        partitions = consumer.partitions_for_topic(source.where) or set()
        tps = [TopicPartition(source.where, p) for p in sorted(partitions)]
        if not tps:
            return []
        consumer.assign(tps)
        ends = consumer.end_offsets(tps, timeout_ms=ms)
        starts = consumer.beginning_offsets(tps, timeout_ms=ms)
        for tp in tps:
            consumer.seek(tp, max(starts[tp], ends[tp] - SHOWN - 1))
        found: list[tuple[int, Letter]] = []
        deadline, read, quiet = time.monotonic() + KAFKA_SECONDS, 0, 0
        while time.monotonic() < deadline and read < KAFKA_SCAN and quiet < 2:
            polled = consumer.poll(timeout_ms=200, max_records=1000)
            quiet = 0 if polled else quiet + 1
            for records in polled.values():
                for record in records:
                    read += 1
                    at = datetime.fromtimestamp(record.timestamp / 1000, UTC)
                    headers = [(k, v or b"") for k, v in record.headers or []]
                    found.append((record.timestamp, _letter(source.label, headers, at)))
        found.sort(key=lambda item: item[0])
        return [letter for _, letter in found[-SHOWN:]]
    finally:
        consumer.close(autocommit=False)


def recent(sources: list[Source]) -> tuple[list[Letter], list[str]]:
    """The last :data:`SHOWN` letters of all places, newest first (file letters, which have
    no time, in the order of the places), and one line per place that could not be read."""
    letters: list[Letter] = []
    problems: list[str] = []
    for source in sources:
        try:
            found = read_directory(source) if source.kind == "dir" else read_topic(source)
        except (TrackerError, OSError) as error:
            problems.append(f"{source.label}: {error}")
            continue
        except Exception as error:  # the Kafka client's own errors
            problems.append(f"{source.label}: {type(error).__name__}: {error}")
            continue
        letters.extend(found)
    oldest = datetime.min.replace(tzinfo=UTC)
    ordered = sorted(enumerate(letters), key=lambda item: (item[1].time or oldest, item[0]))
    return [letter for _, letter in reversed(ordered)][:SHOWN], problems
