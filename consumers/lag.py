"""Consumer lag: how far each consumer of a stream is behind, per partition and per session.

Two measures, for each consumer:

* per partition: the stream's end (the position the next message will get), the
  consumer's committed position (the next message it will read), and the lag between
  them: messages not processed and committed yet;
* per session: the highest event offset in the stream (the head) against the consumer's
  offset in the tracker; the difference is the unread count a client's badge shows
  (``head + 1`` when the consumer has no offset for the session).

:func:`lag_report` computes the report from plain values; the readers gather them:
:func:`scan_file_stream` / :func:`scan_kafka_stream` read a whole stream (every message
is decoded for its session and offset; undecodable ones are only counted), the
``*_committed`` functions read the consumers' positions, :func:`tracker_offsets` the
tracker's offsets of the stream's sessions.

A Kafka partition's end is the high watermark of a fetch response, read after the
partition was read to it: ``end_offsets()`` (a ListOffsets request) is not the high
watermark on every broker (Tansu answers the base offset of the last record batch + 1).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from msgspec import Struct

from consumers.messages import Headers, Undecodable, decode_message, decode_record
from tracker.errors import InvalidInputError, LogNotFoundError, LogUnavailableError
from tracker.events import Position
from tracker.keys import partition_for
from tracker.logs.file import FileLog
from tracker.service import Tracker

Advance = Callable[[int], None]
"""Called with the number of messages just read (a progress bar)."""

READ_RECORDS = 10_000


class PartitionLag(Struct, frozen=True):
    partition: int
    end: int
    """The position of the next message appended to the partition."""
    committed: int | None
    """The next position the consumer reads; ``None``: it never committed on this Kafka
    partition (it starts at the partition's first message)."""
    lag: int
    """Messages from the committed position (or the start) to the end."""


class SessionLag(Struct, frozen=True):
    session_id: str
    head: int
    """The highest event offset of the session in the stream."""
    offset: int | None
    """The consumer's offset in the tracker; ``None``: it has none."""
    unread: int
    """``head - offset`` (``head + 1`` without an offset), never below 0."""


class ConsumerLag(Struct, frozen=True):
    """One consumer's report (one JSON line of ``tracker consumers lag --json``)."""

    stream: str
    consumer: str
    lag: int
    """Sum of the partitions' lag."""
    unread: int
    """Sum of the sessions' unread counts."""
    sessions: int
    """Sessions in the stream (those deleted in the tracker are left out)."""
    sessions_behind: int
    """Sessions with unread messages."""
    undecodable: int
    """Messages in the stream without a session id or offset: counted in the partition
    lag, in no session."""
    partitions: list[PartitionLag]
    top_sessions: list[SessionLag]
    """Sessions by unread count, most first (then by id); all of them unless limited."""


class StreamScan(Struct):
    """What reading a whole stream found."""

    name: str
    starts: dict[int, int]
    """Per partition, the position of its first message (0 unless Kafka deleted some)."""
    ends: dict[int, int]
    heads: dict[str, int]
    """Per session, the highest event offset."""
    messages: int = 0
    undecodable: int = 0

    def add(
        self, partition: int, position: int, key: bytes | None, value: bytes, headers: Headers
    ) -> None:
        """Count a message; a decodable one may raise its session's head."""
        self.messages += 1
        try:
            message = decode_message(partition, position, key, value, headers)
        except Undecodable:
            self.undecodable += 1
            return
        heads = self.heads
        if heads.get(message.session_id, -1) < message.offset:
            heads[message.session_id] = message.offset


# -- the computation ---------------------------------------------------------------------


def partition_lag(
    starts: Mapping[int, int], ends: Mapping[int, int], committed: Mapping[int, int | None]
) -> list[PartitionLag]:
    """Each partition's end, the committed position and the lag, by partition."""
    rows = []
    for partition in sorted(ends):
        end = ends[partition]
        position = committed.get(partition)
        start = starts.get(partition, 0) if position is None else position
        rows.append(PartitionLag(partition, end, position, max(end - start, 0)))
    return rows


def session_lag(heads: Mapping[str, int], offsets: Mapping[str, int]) -> list[SessionLag]:
    """Each session's head, the consumer's offset and the unread count; most unread first."""
    rows = []
    for session_id, head in heads.items():
        offset = offsets.get(session_id)
        unread = head + 1 if offset is None else max(head - offset, 0)
        rows.append(SessionLag(session_id, head, offset, unread))
    rows.sort(key=lambda row: (-row.unread, row.session_id))
    return rows


def lag_report(
    scan: StreamScan,
    committed: Mapping[str, Mapping[int, int | None]],
    offsets: Mapping[str, Mapping[str, int] | None],
    *,
    sessions_limit: int | None = None,
) -> list[ConsumerLag]:
    """The report of every consumer in ``committed`` (its positions per partition).

    ``offsets`` maps a session id to its offsets per consumer (``None``: the session is
    deleted, and left out); a session missing from it has no offsets. At most
    ``sessions_limit`` sessions are listed per consumer (all when ``None``).
    """
    heads = {sid: head for sid, head in scan.heads.items() if offsets.get(sid, {}) is not None}
    reports = []
    for consumer in sorted(committed):
        partitions = partition_lag(scan.starts, scan.ends, committed[consumer])
        mine = {
            sid: found[consumer]
            for sid in heads
            if (found := offsets.get(sid)) is not None and consumer in found
        }
        sessions = session_lag(heads, mine)
        behind = [s for s in sessions if s.unread]
        reports.append(
            ConsumerLag(
                stream=scan.name,
                consumer=consumer,
                lag=sum(p.lag for p in partitions),
                unread=sum(s.unread for s in behind),
                sessions=len(sessions),
                sessions_behind=len(behind),
                undecodable=scan.undecodable,
                partitions=partitions,
                top_sessions=sessions if sessions_limit is None else sessions[:sessions_limit],
            )
        )
    return reports


# -- the tracker ---------------------------------------------------------------------------


def tracker_offsets(
    tracker: Tracker, session_ids: Iterable[str]
) -> dict[str, dict[str, int] | None]:
    """The tracker's offsets of these sessions, read in pipelined batches.

    ``None`` for a deleted session; a session the tracker does not know is left out.
    """
    store = tracker.store
    partitions = store.keys.partitions
    items = [(partition_for(sid, partitions), sid) for sid in session_ids]
    found: dict[str, dict[str, int] | None] = {}
    for (_, sid), state in zip(items, store.get_many(items), strict=True):
        if state is not None:
            found[sid] = None if state.deleted else dict(state.offsets)
    return found


# -- file streams --------------------------------------------------------------------------


def scan_file_stream(log: FileLog, name: str, advance: Advance = lambda _: None) -> StreamScan:
    """Read a file stream's log to its end."""
    scan = StreamScan(name, {0: 0}, {0: 0}, {})
    after: Position | None = None
    position = 0
    while batches := log.read(0, after, READ_RECORDS):
        for batch in batches:
            for raw in batch.records:
                try:
                    record = decode_record(raw)
                except ValueError:
                    scan.messages += 1
                    scan.undecodable += 1
                else:
                    scan.add(0, position, record.key, record.value, record.headers)
                position += 1
            advance(len(batch.records))
        after = batches[-1].last
    scan.ends[0] = position
    return scan


def file_consumers(directory: Path) -> list[str]:
    """The consumers with a position in a stream directory (``consumers/NAME.json``)."""
    return sorted(path.stem for path in (directory / "consumers").glob("*.json"))


def file_committed(directory: Path, log_id: str, consumer: str) -> dict[int, int | None]:
    """A consumer's position in a stream directory: ``next`` of its file, 0 without one."""
    path = directory / "consumers" / f"{consumer}.json"
    try:
        saved = json.loads(path.read_text())
    except FileNotFoundError:
        return {0: 0}
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path} is unreadable: {exc}") from None
    if not isinstance(saved, dict) or saved.get("log_id") != log_id:
        raise InvalidInputError(
            f"{path} belongs to another stream (log id "
            f"{saved.get('log_id') if isinstance(saved, dict) else None}); "
            "remove it to read this stream from the start"
        )
    position = saved.get("next")
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        raise InvalidInputError(f"{path} is unreadable: {saved!r}")
    return {0: position}


# -- Kafka streams -------------------------------------------------------------------------


def _kafka_unavailable(bootstrap: str, exc: Exception) -> LogUnavailableError:
    return LogUnavailableError(f"Kafka at {bootstrap}: {exc}")


class KafkaTopic:
    """A topic's partitions, contents and consumer groups, read without joining a group."""

    def __init__(self, bootstrap: str, topic: str, *, timeout: float = 10.0) -> None:
        from kafka import KafkaConsumer
        from kafka import errors as kafka_errors

        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self._admin: Any = None
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                client_id="tracker-consumers-lag",
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                max_poll_records=READ_RECORDS,
                request_timeout_ms=int(timeout * 1000),
            )
        except kafka_errors.KafkaError as exc:
            raise LogUnavailableError(f"Kafka at {bootstrap} cannot be reached: {exc}") from exc
        try:
            partitions = self.consumer.partitions_for_topic(topic)
        except kafka_errors.KafkaError as exc:
            self.close()
            raise _kafka_unavailable(bootstrap, exc) from exc
        if not partitions:
            self.close()
            raise LogNotFoundError(
                f"no stream: Kafka at {bootstrap} has no topic {topic!r}; "
                f"write one with 'tracker streams append --stream {topic}'"
            )
        self.partitions = sorted(partitions)

    def _tps(self) -> list[Any]:
        from kafka.structs import TopicPartition

        return [TopicPartition(self.topic, p) for p in self.partitions]

    def scan(self, advance: Advance = lambda _: None) -> StreamScan:
        """Read every partition from its start to its high watermark."""
        from kafka import errors as kafka_errors

        consumer = self.consumer
        tps = self._tps()
        try:
            consumer.assign(tps)
            starts = {
                tp.partition: offset for tp, offset in consumer.beginning_offsets(tps).items()
            }
            for tp in tps:
                consumer.seek(tp, starts[tp.partition])
            scan = StreamScan(self.topic, starts, {}, {})
            pending = set(tps)
            progress_at = time.monotonic()
            while pending:
                polled = consumer.poll(timeout_ms=200)
                for tp, records in polled.items():
                    for r in records:
                        headers = [(k, v or b"") for k, v in r.headers or ()]
                        scan.add(tp.partition, r.offset, r.key, r.value or b"", headers)
                    advance(len(records))
                if polled:
                    progress_at = time.monotonic()
                for tp in list(pending):
                    high = consumer.highwater(tp)
                    if high is not None and consumer.position(tp) >= high:
                        scan.ends[tp.partition] = high
                        pending.discard(tp)
                        consumer.pause(tp)
                        progress_at = time.monotonic()
                if pending and time.monotonic() - progress_at > self.timeout:
                    raise LogUnavailableError(
                        f"Kafka at {self.bootstrap}: reading {self.topic} made no progress "
                        f"for {self.timeout:g} s (partitions "
                        f"{sorted(tp.partition for tp in pending)} unfinished)"
                    )
        except kafka_errors.KafkaError as exc:
            raise _kafka_unavailable(self.bootstrap, exc) from exc
        return scan

    def _admin_client(self) -> Any:
        from kafka import KafkaAdminClient
        from kafka import errors as kafka_errors

        if self._admin is None:
            try:
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap,
                    client_id="tracker-consumers-lag",
                    request_timeout_ms=int(self.timeout * 1000),
                )
            except kafka_errors.KafkaError as exc:
                raise _kafka_unavailable(self.bootstrap, exc) from exc
        return self._admin

    def committed(self, groups: Iterable[str]) -> dict[str, dict[int, int | None]]:
        """Each group's committed positions on the topic (``None``: no commit there)."""
        from kafka import errors as kafka_errors

        admin = self._admin_client()
        tps = self._tps()
        result: dict[str, dict[int, int | None]] = {}
        try:
            for group in groups:
                found = admin.list_group_offsets({group: tps}).get(group, {})
                positions: dict[int, int | None] = dict.fromkeys(self.partitions)
                for tp, meta in found.items():
                    if tp.topic == self.topic and meta.offset is not None and meta.offset >= 0:
                        positions[tp.partition] = meta.offset
                result[group] = positions
        except kafka_errors.KafkaError as exc:
            raise _kafka_unavailable(self.bootstrap, exc) from exc
        return result

    def groups(self) -> list[str]:
        """The consumer groups with a committed position on the topic."""
        from kafka import errors as kafka_errors

        admin = self._admin_client()
        try:
            listed = admin.list_groups()
        except kafka_errors.KafkaError as exc:
            raise _kafka_unavailable(self.bootstrap, exc) from exc
        names = sorted({g["group_id"] for g in listed if g.get("group_id")})
        return [
            group
            for group, positions in self.committed(names).items()
            if any(p is not None for p in positions.values())
        ]

    def close(self) -> None:
        self.consumer.close(autocommit=False)
        if self._admin is not None:
            self._admin.close()
            self._admin = None
