"""The Kafka event log: one topic, each record a msgpack array of one partition's events.

Records and positions
    An append produces one Kafka record per partition (explicitly to that partition),
    its value the msgpack array of the appended events, as a file-log frame holds them.
    An event's position is ``(partition, record offset, index in the record)``. A record
    holds at most 65,536 events and about 900 KB, under the brokers' default 1 MB limit.

All or nothing: record groups
    An append too large for one record (``append`` of many events, every ``append_stream``
    of more than one record's worth) is written as a group, like the file log's frame
    groups: the leading records carry a ``trk.part`` header (a random group id) and count
    for nothing by themselves; the last record carries ``trk.group`` (the same id) and
    ``trk.parts``, the offsets and event counts of the parts. Only once that record is
    written does the group count, and then as *one* batch at the last record's offset: its
    events are numbered across the group (``index`` runs over the parts' events, then the
    last record's). If the stream's iterator raises or the producer fails before the last
    record, the parts stay behind unreferenced and readers skip them: nothing was
    appended. Records of other producers may sit between the parts; a group counts where
    its last record is. The parts of an append that failed stay in the topic (they take
    space and are read past), like any Kafka record.

Reading
    Each log object has one consumer, guarded by a lock, that reads by assignment
    (``assign`` and ``seek``, ``enable_auto_commit=False``, no group, no committed
    offsets). Each read assigns afresh, so the high watermark it stops at comes from a
    fetch of that read: a read sees every append acknowledged before it started. A read
    returns whole records (the first one cut at ``after``), a group in whole parts, until
    it holds ``max_records`` events. The head of a partition is never taken from
    ``end_offsets()`` alone: Tansu answers it with the base offset of the last record batch
    + 1, so :meth:`KafkaLog.end` uses it as a lower bound, reads on to the fetch's high
    watermark, and (only if it found nothing but parts of unfinished appends there) looks
    further back. :meth:`KafkaLog.count` is exact: its first call reads the partition
    (only the records' msgpack headers are looked at), later calls read only what is new;
    sparse marks let it count from a position without reading from the start.

Appends and the producer
    One producer per log object, created on the first append: ``acks="all"``, idempotent
    (a broker too old for it gets a plain producer and a warning). Appends from several
    threads share it. ``Appended.after_known`` is always False: other producers append
    between any two calls, so the record before ours is unknown.

Failures
    A broker that does not answer within ``timeout`` seconds (at open, on an append, on a
    read) raises :class:`~tracker.errors.LogUnavailableError` (retriable) naming the
    bootstrap. From an append it means the outcome is unknown: a request the broker
    received may still be written when it comes back (exactly once).

The topic
    Created if missing with the given partition count and infinite retention
    (``retention.ms=-1``, ``retention.bytes=-1``). Opening refuses (``ConfigError``) a topic
    with finite retention or compaction, or with another partition count than asked for,
    and (``LogCorruptError``) one whose oldest records were deleted (a log start offset
    above 0). ``log_id`` is ``kafka:<cluster id>/<topic>/<topic id>``: the same every time
    the topic is opened, another one if the topic is deleted and created again.

Tansu 0.6 (the broker the tests use when there is no Docker), as found:
    idempotent producers work (``InitProducerId``); ``create_topics`` with configs works;
    ``describe_configs`` answers only for the configs the topic was created with (all
    reported as defaults), and drops the connection when asked for named keys, so all
    keys are asked for and a topic that reports no ``retention.ms`` gets a warning (once
    per topic and process) instead of a refusal; ``delete_records`` drops the connection
    (not used here); a fetch of an offset beyond the end answers empty instead of
    ``OFFSET_OUT_OF_RANGE``; storage is in memory, so a restart loses the topic.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import uuid
import warnings
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, TypeVar

import msgspec
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kafka_errors
from kafka.admin import ConfigResource, ConfigResourceType

from tracker.errors import (
    ConfigError,
    LogCorruptError,
    LogError,
    LogNotFoundError,
    LogUnavailableError,
    TrackerError,
)
from tracker.events import Position
from tracker.logs import Appended, Batch
from tracker.logs.frames import decode_records, encode_records

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 12
MAX_RECORD_EVENTS = 65_536
MAX_RECORD_BYTES = 900_000
"""A record's events may take this much (msgpack overhead included), under 1 MB."""
MAX_PARTS = 50_000
"""A group's manifest stays well under a record's size (about 15 bytes a part)."""
PART = "trk.part"
GROUP = "trk.group"
MANIFEST = "trk.parts"
FETCH_WAIT_MS = 5
"""How long the broker holds a fetch that finds nothing: the cost of a read at the end."""
POLL_MS = 5
"""A poll returns only with records or after this: how often a read checks where it is."""
SCAN_BYTES = 8 << 20
"""Reads that only count (``end``, ``count``) hold at most about this much at a time."""
MARK_RECORDS = 1024
MARK_BYTES = 16 << 20
KNOWN_COUNTS = 65_536

_encode_manifest = msgspec.msgpack.Encoder().encode
_decode_manifest = msgspec.msgpack.Decoder(list[tuple[int, int]]).decode
_warned: set[tuple[str, str]] = set()
_Client = TypeVar("_Client")


def array_length(value: bytes) -> int | None:
    """The length of the msgpack array ``value`` starts with, without decoding it."""
    if value:
        head = value[0]
        if 0x90 <= head <= 0x9F:
            return head & 0x0F
        if head == 0xDC and len(value) >= 3:
            return int.from_bytes(value[1:3], "big")
        if head == 0xDD and len(value) >= 5:
            return int.from_bytes(value[1:5], "big")
    return None


def pieces(chunks: Iterable[Sequence[bytes]]) -> Iterator[list[bytes]]:
    """Re-cut ``chunks`` into the events of one record each: ≤ 65,536 events, ≤ ~900 KB."""
    piece: list[bytes] = []
    size = 0
    for chunk in chunks:
        for record in chunk:
            cost = len(record) + 5
            if cost > MAX_RECORD_BYTES:
                raise LogError(
                    f"an event of {len(record)} bytes is over the {MAX_RECORD_BYTES} bytes a "
                    "Kafka record of the log may carry; nothing was appended"
                )
            if piece and (len(piece) >= MAX_RECORD_EVENTS or size + cost > MAX_RECORD_BYTES):
                yield piece
                piece, size = [], 0
            piece.append(record)
            size += cost
    if piece:
        yield piece


def _fits_one_record(records: Sequence[bytes]) -> bool:
    return (
        len(records) <= MAX_RECORD_EVENTS
        and sum(map(len, records)) + 5 * len(records) <= MAX_RECORD_BYTES
    )


class Raw:
    """One Kafka record as read: its offset, value, and what its headers say it is."""

    __slots__ = ("group", "offset", "own", "part_of", "parts", "size", "value")

    def __init__(self, record: Any, where: str) -> None:
        self.offset: int = record.offset
        self.value: bytes = record.value or b""
        self.size = len(self.value)
        self.part_of: bytes | None = None
        self.group: bytes | None = None
        self.parts: list[tuple[int, int]] = []
        for key, value in record.headers or ():
            if key == PART:
                self.part_of = bytes(value)
            elif key == GROUP:
                self.group = bytes(value)
            elif key == MANIFEST:
                try:
                    self.parts = _decode_manifest(value)
                except msgspec.DecodeError as exc:
                    raise LogCorruptError(f"{where}: a bad {MANIFEST} header ({exc})") from None
        own = array_length(self.value)
        if own is None:
            raise LogCorruptError(
                f"{where}: not a record of the event log (a msgpack array of events expected); "
                "is another application writing to this topic?"
            )
        self.own = own

    @property
    def count(self) -> int:
        """Events this record adds to the log: 0 for a part, its group's for a group's end."""
        if self.part_of is not None:
            return 0
        return self.own + sum(count for _, count in self.parts)


class Fetched(NamedTuple):
    raws: list[Raw]
    next: int
    """The offset the next fetch would start at."""
    at_end: bool


class _Tally:
    """What :meth:`KafkaLog.count` has counted of a partition so far."""

    __slots__ = ("mark_before", "mark_offsets", "next", "since_bytes", "since_records", "total")

    def __init__(self) -> None:
        self.next = 0
        self.total = 0
        self.mark_offsets = array("q")
        self.mark_before = array("q")
        self.since_records = MARK_RECORDS
        self.since_bytes = 0


def _unavailable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retriable", False)) or isinstance(
        exc, kafka_errors.BrokerNotAvailableError | kafka_errors.NodeNotReadyError
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


class KafkaLog:
    """The event log in a Kafka topic; see the module docstring.

    ``partitions``: the count to create the topic with, and the count an existing topic
    must have (``ConfigError`` otherwise); ``None`` accepts the topic's own count (and
    creates one with 12). ``create=False`` refuses a topic that does not exist
    (:class:`~tracker.errors.LogNotFoundError`). ``timeout`` bounds each wait on the brokers.
    """

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        partitions: int | None = None,
        create: bool = True,
        timeout: float = 10.0,
        client_id: str = "tracker",
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self.client_id = client_id
        self._closed = False
        self._read_lock = threading.Lock()
        self._produce_lock = threading.Lock()
        self._producer: KafkaProducer | None = None
        self._consumer: KafkaConsumer | None = None
        self._known: dict[tuple[int, int], int] = {}
        """Events of records seen lately, by ``(partition, offset)``: skips re-reading them."""
        self._tallies: dict[int, _Tally] = {}
        self._ends: dict[int, tuple[int, Position | None]] = {}
        """Per partition: offsets below this were searched by ``end``, and what it found."""
        self._log_id, self._partitions = self._open(partitions, create)
        self._tps = [TopicPartition(topic, p) for p in range(self._partitions)]
        try:
            self._check_start()
        except BaseException:
            self.close()
            raise

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def partitions(self) -> int:
        return self._partitions

    @property
    def _ms(self) -> int:
        return max(int(self.timeout * 1000), 1)

    def __repr__(self) -> str:
        return f"KafkaLog({self.bootstrap!r}, {self.topic!r}, partitions={self._partitions})"

    # -- opening -----------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str) -> LogError:
        if _unavailable(exc):
            return LogUnavailableError(
                f"Kafka at {self.bootstrap} did not answer within {self.timeout:g} s while "
                f"{doing} ({_first_line(exc)}); retry when it is back"
            )
        return LogError(f"Kafka at {self.bootstrap}: {doing} failed: {_first_line(exc)}")

    def _client(self, factory: Callable[..., _Client], doing: str, **options: Any) -> _Client:
        """A kafka-python client; :class:`LogUnavailableError` if it cannot bootstrap."""
        try:
            return factory(**options)
        except Exception as exc:
            failure = self._error(exc, doing)
        # A client that failed to bootstrap leaves its sockets open: close them now, not in
        # whatever code the garbage collector happens to interrupt later.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        raise failure

    def _open(self, partitions: int | None, create: bool) -> tuple[str, int]:
        admin = self._client(
            KafkaAdminClient,
            "connecting",
            bootstrap_servers=self.bootstrap,
            client_id=self.client_id,
            request_timeout_ms=self._ms,
            bootstrap_timeout_ms=self._ms,
        )
        try:
            described = self._describe(admin)
            if described is None:
                if not create:
                    raise LogNotFoundError(
                        f"no event log: Kafka at {self.bootstrap} has no topic {self.topic!r}; "
                        "check TRACKER_EVENT_TOPIC, or write something first"
                    )
                self._create(admin, partitions or DEFAULT_PARTITIONS)
                described = self._describe(admin)
                if described is None:
                    raise LogError(f"topic {self.topic!r} was created but cannot be described")
            count = len(described.get("partitions") or ())
            if partitions is not None and count != partitions:
                raise ConfigError(
                    f"topic {self.topic!r} has {count} partitions but {partitions} are "
                    "configured (TRACKER_PARTITIONS): sessions would map to other partitions; "
                    "set TRACKER_PARTITIONS to match the topic, or use another topic"
                )
            self._check_retention(admin)
            cluster = admin.describe_cluster().get("cluster_id") or "unknown-cluster"
        except TrackerError:
            raise
        except Exception as exc:
            raise self._error(exc, f"opening topic {self.topic!r}") from exc
        finally:
            admin.close()
        topic_id = described.get("topic_id")
        identity = f"kafka:{cluster}/{self.topic}"
        if topic_id and str(topic_id).strip("0-"):
            identity += f"/{topic_id}"
        return identity, count

    def _describe(self, admin: KafkaAdminClient) -> dict[str, Any] | None:
        for topic in admin.describe_topics([self.topic]):
            if topic.get("name") != self.topic:
                continue
            code = topic.get("error_code", 0)
            if code == kafka_errors.UnknownTopicOrPartitionError.errno:
                return None
            if code:
                raise kafka_errors.for_code(code)(f"describing topic {self.topic!r}")
            return dict(topic)
        return None

    def _create(self, admin: KafkaAdminClient, partitions: int) -> None:
        spec = {
            "num_partitions": partitions,
            "replication_factor": -1,
            "configs": {"retention.ms": "-1", "retention.bytes": "-1"},
        }
        with contextlib.suppress(kafka_errors.TopicAlreadyExistsError):  # a racing creator
            admin.create_topics({self.topic: spec}, timeout_ms=self._ms)
        admin.wait_for_topics([self.topic], timeout_ms=self._ms)
        log.info(
            "created topic %s with %d partitions on %s", self.topic, partitions, self.bootstrap
        )

    def _check_retention(self, admin: KafkaAdminClient) -> None:
        """Refuse a topic that may delete events; warn once where the broker cannot tell."""
        resource = ConfigResource(ConfigResourceType.TOPIC, self.topic)
        try:
            answer = admin.describe_configs([resource], config_filter="all")
            configs: dict[str, Any] = answer["topic"][self.topic]
        except Exception as exc:
            if _unavailable(exc) and not isinstance(exc, kafka_errors.KafkaConnectionError):
                raise
            configs, problem = {}, _first_line(exc)
        else:
            problem = "the broker does not report it"

        def value(name: str) -> str | None:
            entry = configs.get(name)
            if isinstance(entry, dict):
                entry = entry.get("value")
            return None if entry is None else str(entry)

        for name in ("retention.ms", "retention.bytes"):
            setting = value(name)
            if setting is not None and setting.strip() != "-1":
                raise ConfigError(
                    f"topic {self.topic!r} has {name}={setting}: Kafka would delete events "
                    f"the projection is rebuilt from; set {name}=-1 on it (kafka-configs "
                    "--alter), or use another topic"
                )
        policy = value("cleanup.policy")
        if policy is not None and "compact" in policy:
            raise ConfigError(
                f"topic {self.topic!r} has cleanup.policy={policy}: compaction would delete "
                "events; use a topic with cleanup.policy=delete and infinite retention"
            )
        if value("retention.ms") is None and (self.bootstrap, self.topic) not in _warned:
            _warned.add((self.bootstrap, self.topic))
            log.warning(
                "cannot tell the retention of topic %r on %s (%s); make sure it has "
                "retention.ms=-1 and retention.bytes=-1, or events will be lost",
                self.topic,
                self.bootstrap,
                problem,
            )

    def _check_start(self) -> None:
        """Refuse a topic whose oldest records are gone (retention ran, or records deleted)."""
        consumer = self._reader()
        try:
            starts = consumer.beginning_offsets(self._tps, timeout_ms=self._ms)
        except Exception as exc:
            raise self._error(exc, f"reading the start of topic {self.topic!r}") from exc
        cut = sorted((tp.partition, offset) for tp, offset in starts.items() if offset)
        if cut:
            partition, offset = cut[0]
            raise LogCorruptError(
                f"topic {self.topic!r} partition {partition} starts at offset {offset}: records "
                "were deleted from it (finite retention or delete-records), events are lost; "
                "restore the topic, or start a new one and import an export"
            )

    def _reader(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = self._client(
                KafkaConsumer,
                "connecting the consumer",
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="none",
                fetch_max_wait_ms=FETCH_WAIT_MS,
                request_timeout_ms=max(self._ms, FETCH_WAIT_MS + 1000),
                bootstrap_timeout_ms=self._ms,
            )
        return self._consumer

    def _writer(self) -> KafkaProducer:
        with self._produce_lock:
            self._check_open()
            if self._producer is None:
                options: dict[str, Any] = {
                    "bootstrap_servers": self.bootstrap,
                    "client_id": self.client_id,
                    "acks": "all",
                    "linger_ms": 0,
                    "max_request_size": 1 << 20,
                    "request_timeout_ms": self._ms,
                    "delivery_timeout_ms": self._ms,
                    "max_block_ms": self._ms,
                    "bootstrap_timeout_ms": self._ms,
                }
                try:
                    self._producer = self._client(
                        KafkaProducer, "connecting the producer", enable_idempotence=True, **options
                    )
                except LogError as error:
                    if "dempoten" not in str(error):
                        raise
                    log.warning(
                        "Kafka at %s cannot take an idempotent producer (%s); appends "
                        "retried after a failure may be written twice",
                        self.bootstrap,
                        error,
                    )
                    self._producer = self._client(
                        KafkaProducer,
                        "connecting the producer",
                        enable_idempotence=False,
                        **options,
                    )
            return self._producer

    # -- appends -------------------------------------------------------------------------

    def append(self, partition: int, records: Sequence[bytes]) -> Appended:
        self._check_partition(partition)
        self._check_open()
        if not records:
            return Appended(partition, 0, None)
        records = list(records)
        chunks = [records] if _fits_one_record(records) else pieces([records])
        written = self._write(partition, iter(chunks))
        assert written is not None
        offset, count = written
        return Appended(
            partition,
            count,
            Position(partition, offset, count - 1),
            batches=[Batch(partition, offset, 0, records)],
        )

    def append_stream(self, partition: int, chunks: Iterable[Sequence[bytes]]) -> Appended:
        self._check_partition(partition)
        self._check_open()
        written = self._write(partition, pieces(chunks))
        if written is None:
            return Appended(partition, 0, None)
        offset, count = written
        return Appended(partition, count, Position(partition, offset, count - 1))

    def _write(self, partition: int, chunks: Iterator[list[bytes]]) -> tuple[int, int] | None:
        """Produce ``chunks`` as one record, or a group; ``(offset, events)`` of its end."""
        group = uuid.uuid4().bytes
        sent: list[tuple[Any, int]] = []
        checked = 0
        pending: list[bytes] | None = None
        total = 0
        doing = f"appending to topic {self.topic!r} partition {partition}"
        try:
            for chunk in chunks:
                if pending is not None:
                    if len(sent) >= MAX_PARTS:
                        raise LogError(
                            f"an append of over {total} events is too large for one "
                            "all-or-nothing append; nothing was appended, split it"
                        )
                    producer = self._writer()
                    headers = [(PART, group)]
                    future = producer.send(
                        self.topic, value=encode_records(pending), partition=partition,
                        headers=headers,
                    )  # fmt: skip
                    sent.append((future, len(pending)))
                    while checked < len(sent) and sent[checked][0].is_done:
                        if sent[checked][0].failed():  # fail now, not after the whole stream
                            raise sent[checked][0].exception
                        checked += 1
                pending = chunk
                total += len(chunk)
            if pending is None:
                return None
            producer = self._writer()
            deadline = time.monotonic() + self.timeout
            parts: list[tuple[int, int]] = []
            for future, count in sent:
                metadata = future.get(timeout=max(deadline - time.monotonic(), 0.001))
                parts.append((int(metadata.offset), count))
                deadline = time.monotonic() + self.timeout
            headers = [(GROUP, group), (MANIFEST, _encode_manifest(parts))] if parts else []
            future = producer.send(
                self.topic, value=encode_records(pending), partition=partition, headers=headers
            )
            metadata = future.get(timeout=self.timeout)
        except TrackerError:
            raise
        except kafka_errors.KafkaError as exc:
            raise self._error(exc, doing) from exc
        offset = int(metadata.offset)
        self._remember(partition, offset, total)
        return offset, total

    def _remember(self, partition: int, offset: int, count: int) -> None:
        if len(self._known) >= KNOWN_COUNTS:
            self._known.clear()
        self._known[partition, offset] = count

    # -- reads ---------------------------------------------------------------------------

    def _fetch(
        self,
        partition: int,
        start: int,
        *,
        stop: int | None = None,
        max_events: int | None = None,
        max_bytes: int | None = None,
        parts: bool = False,
    ) -> Fetched:
        """Records from offset ``start`` on (lock held); parts of groups only with ``parts``.

        Stops at ``stop``, at the high watermark of this call's own fetches (``at_end``), or
        once ``max_events`` events (parts count 0) or ``max_bytes`` are in hand.
        """
        consumer = self._reader()
        tp = self._tps[partition]
        where = f"topic {self.topic!r} partition {partition}"
        out: list[Raw] = []
        events = size = 0
        position = start
        consumer.assign([tp])  # a fresh assignment: no high watermark until this call fetches
        try:
            consumer.seek(tp, start)
            deadline = time.monotonic() + self.timeout
            while True:
                position = consumer.position(tp, timeout_ms=self._ms)
                if position is None:
                    raise LogError(f"{where}: the consumer lost its position")
                highwater = consumer.highwater(tp)
                if highwater is not None and position >= highwater:
                    return Fetched(out, position, True)
                if (
                    (stop is not None and position >= stop)
                    or (max_events is not None and events >= max_events)
                    or (max_bytes is not None and size >= max_bytes)
                ):
                    return Fetched(out, position, False)
                want = 500 if max_events is None else max(1, min(500, max_events - events))
                polled = consumer.poll(timeout_ms=POLL_MS, max_records=want).get(tp, [])
                if not polled:
                    if time.monotonic() > deadline:
                        raise LogUnavailableError(
                            f"Kafka at {self.bootstrap} did not answer within {self.timeout:g} s "
                            f"while reading {where}; retry when it is back"
                        )
                    continue
                deadline = time.monotonic() + self.timeout
                for record in polled:
                    if record.offset < start or (stop is not None and record.offset >= stop):
                        continue
                    raw = Raw(record, f"{where} offset {record.offset}")
                    if raw.part_of is None or parts:
                        out.append(raw)
                        events += raw.count
                        size += raw.size
        except kafka_errors.OffsetOutOfRangeError:
            return Fetched(out, position, True)  # past the end (Kafka; Tansu answers empty)
        except TrackerError:
            raise
        except kafka_errors.KafkaError as exc:
            raise self._error(exc, f"reading {where}") from exc
        finally:
            consumer.assign([])

    def _scan(self, partition: int, start: int, stop: int | None = None) -> Iterator[Raw]:
        """The complete records from ``start`` to ``stop`` (or the end), a few MB at a time."""
        while stop is None or start < stop:
            fetched = self._fetch(partition, start, stop=stop, max_bytes=SCAN_BYTES)
            yield from fetched.raws
            if fetched.at_end or fetched.next <= start:
                return
            start = fetched.next

    def _decode(self, partition: int, raw: Raw) -> list[bytes]:
        try:
            records = decode_records(raw.value)
        except msgspec.DecodeError as exc:
            raise LogCorruptError(
                f"topic {self.topic!r} partition {partition} offset {raw.offset}: not a record "
                f"of the event log ({exc})"
            ) from None
        return records

    def read(self, partition: int, after: Position | None, max_records: int) -> list[Batch]:
        self._check_partition(partition)
        start, skip = (0, 0) if after is None else (after.offset, after.index + 1)
        if after is not None and skip >= self._known.get((partition, after.offset), skip + 1):
            start, skip = after.offset + 1, 0
        with self._read_lock:
            self._check_open()
            raws = self._fetch(partition, start, max_events=max(max_records, 1) + skip).raws
            batches: list[Batch] = []
            total = 0
            for raw in raws:
                if raw.part_of is not None:
                    continue
                self._remember(partition, raw.offset, raw.count)
                first = skip if raw.offset == start else 0
                if first >= raw.count:
                    continue
                if raw.group is None:
                    records = self._decode(partition, raw)
                    batch = Batch(
                        partition, raw.offset, first, records[first:] if first else records
                    )
                else:
                    batch = self._group_batch(partition, raw, first, max_records - total)
                batches.append(batch)
                total += len(batch.records)
                if total >= max_records:
                    break
            return batches

    def _group_batch(self, partition: int, end: Raw, first: int, budget: int) -> Batch:
        """The events of a group from index ``first``: whole parts, at least ``budget``."""
        records: list[bytes] = []
        index = 0
        for offset, count in [*end.parts, (end.offset, end.own)]:
            if index + count <= first:
                index += count
                continue
            events = self._decode(partition, end if offset == end.offset else self._part(
                partition, offset, end
            ))  # fmt: skip
            if len(events) != count:
                raise LogCorruptError(
                    f"topic {self.topic!r} partition {partition} offset {offset}: {len(events)} "
                    f"events where the group ending at {end.offset} says {count}"
                )
            low = max(first - index, 0)
            records.extend(events[low:] if low else events)
            index += count
            if len(records) >= budget:
                break
        return Batch(partition, end.offset, first, records)

    def _part(self, partition: int, offset: int, end: Raw) -> Raw:
        for raw in self._fetch(partition, offset, stop=offset + 1, parts=True).raws:
            if raw.offset == offset and raw.part_of == end.group and offset < end.offset:
                return raw
        raise LogCorruptError(
            f"topic {self.topic!r} partition {partition}: the group ending at offset "
            f"{end.offset} names offset {offset}, which is not one of its parts"
        )

    def end(self, partition: int) -> Position | None:
        self._check_partition(partition)
        with self._read_lock:
            self._check_open()
            tp = self._tps[partition]
            try:
                low = self._reader().end_offsets([tp], timeout_ms=self._ms)[tp]
            except Exception as exc:
                raise self._error(exc, f"reading the end of partition {partition}") from exc
            if not low:
                return None
            # Tansu's end offset is the last batch's base + 1, only a lower bound of the head:
            # read from there to the end. Offsets below ``floor`` were searched before; the
            # fetch starts a record early, which answers at once where an empty one waits.
            floor, known = self._ends.get(partition, (0, None))
            top = max(low - 1, floor - 1)
            found: Raw | None = None
            while True:
                fetched = self._fetch(partition, top, max_bytes=SCAN_BYTES)
                if fetched.raws:
                    found = fetched.raws[-1]
                progress, top = fetched.next > top, max(top, fetched.next)
                if fetched.at_end or not progress:
                    break
            # Only parts of unfinished appends there: look further back, in growing steps.
            stop, window = max(low - 1, floor), 1
            while found is None and stop > floor:
                window = min(window * 8, 4096)
                start = max(floor, stop - window)
                for raw in self._scan(partition, start, stop):
                    found = raw
                stop = start
            if found is not None:
                self._remember(partition, found.offset, found.count)
                known = Position(partition, found.offset, found.count - 1)
            self._ends[partition] = (top, known)
            return known

    def count(self, partition: int, after: Position | None = None) -> int:
        self._check_partition(partition)
        with self._read_lock:
            self._check_open()
            tally = self._tallies.setdefault(partition, _Tally())
            for raw in self._scan(partition, tally.next):
                if tally.since_records >= MARK_RECORDS or tally.since_bytes >= MARK_BYTES:
                    tally.mark_offsets.append(raw.offset)
                    tally.mark_before.append(tally.total)
                    tally.since_records = tally.since_bytes = 0
                tally.total += raw.count
                tally.next = raw.offset + 1
                tally.since_records += 1
                tally.since_bytes += raw.size
            if after is None:
                return tally.total
            return max(tally.total - self._through(partition, tally, after), 0)

    def _through(self, partition: int, tally: _Tally, after: Position) -> int:
        """How many events there are up to and including ``after`` (lock held)."""
        if after.offset >= tally.next:
            return tally.total
        slot = bisect_right(tally.mark_offsets, after.offset) - 1
        start, before = (0, 0) if slot < 0 else (tally.mark_offsets[slot], tally.mark_before[slot])
        for raw in self._scan(partition, start, after.offset):
            before += raw.count
        return before + after.index + 1

    # -- the rest ------------------------------------------------------------------------

    def _check_partition(self, partition: int) -> None:
        if not 0 <= partition < self._partitions:
            raise LogError(
                f"topic {self.topic!r} has partitions 0..{self._partitions - 1}, not {partition}"
            )

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"the event log in topic {self.topic!r} is closed")

    def appends_held(self) -> AbstractContextManager[object]:
        """Kafka has no lock over its producers: nothing to hold."""
        return contextlib.nullcontext()

    def close(self) -> None:
        self._closed = True
        with self._produce_lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=min(self.timeout, 5.0))
            except Exception as exc:  # pragma: no cover - a broker gone while closing
                log.warning("closing the Kafka producer: %s", _first_line(exc))
        with self._read_lock:
            consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(autocommit=False)
            except Exception as exc:  # pragma: no cover
                log.warning("closing the Kafka consumer: %s", _first_line(exc))

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
