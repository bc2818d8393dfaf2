"""Kafka streams: a topic read by a consumer group, its dead letters in another topic.

Auto-commit is always off: a position is committed only after the offsets of the
messages before it are in the tracker's log. The group uses the eager assignors, so a
rebalance revokes every partition: the worker flushes everything, commits, and reads
again from the committed positions once assigned.

kafka-python 3 calls rebalance listeners on its network thread, where a blocking call
raises; the listener here is asynchronous: it hands the flush to a thread, waits for it
without blocking the network loop (heartbeats go on), then awaits the commit.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kafka import AsyncConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka import errors as kafka_errors
from kafka.coordinator.assignors.range import RangePartitionAssignor
from kafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from kafka.net.selector import KernelEvent
from kafka.structs import OffsetAndMetadata, TopicPartition

from consumers.streams import Chunk, DeadLetter, Incoming, dead_letter_headers
from tracker.errors import LogError, LogNotFoundError, LogUnavailableError

log = logging.getLogger(__name__)

FETCH_WAIT_MS = 100
"""How long a fetch that finds nothing waits at the broker: new messages reach the handler
at most this much later (kafka-python's default, 500 ms, is half the delay budget)."""

Flush = Callable[[], dict[int, int]]
"""Flushes the worker's offsets and returns the positions to commit; blocking."""


_new_incoming = tuple.__new__
"""``Incoming``'s own constructor, without the Python-level ``__new__`` of a namedtuple."""


class _Revocations(AsyncConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, stream: KafkaStream) -> None:
        self.stream = stream

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        stream = self.stream
        stream.epoch += 1
        if not revoked or stream.flush is None:
            return
        result: dict[str, Any] = {}
        done = threading.Event()

        def flush() -> None:
            try:
                assert stream.flush is not None
                result["positions"] = stream.flush()
            except Exception as exc:  # reported below; the next owner redelivers
                result["error"] = exc
            finally:
                done.set()

        threading.Thread(target=flush, name="tracker-revocation-flush", daemon=True).start()
        while not done.is_set():
            await KernelEvent("_sleep", 0.005)
        if "error" in result:
            log.warning(
                "%s: flush on revocation failed (%s); its messages will be "
                "redelivered to the next owner",
                stream.description,
                result["error"],
            )
            return
        offsets = stream.offsets(result["positions"])
        if offsets:
            try:
                await stream.consumer.commit_async(offsets)
            except kafka_errors.KafkaError as exc:
                log.warning("%s: commit on revocation failed: %s", stream.description, exc)
        log.info(
            "%s: flushed and committed before giving up partitions %s",
            stream.description,
            sorted(tp.partition for tp in revoked),
        )

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "%s: assigned partitions %s",
            self.stream.description,
            sorted(tp.partition for tp in assigned),
        )

    async def on_partitions_lost(self, lost: set[TopicPartition]) -> None:
        self.stream.epoch += 1
        log.warning(
            "%s: lost partitions %s (removed from the group); messages since the last "
            "commit will be redelivered",
            self.stream.description,
            sorted(tp.partition for tp in lost),
        )


class KafkaStream:
    """``topic`` read by the consumer group ``group``; dead letters go to ``dlq_topic``."""

    needs_keep_alive = True

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        consumer: str,
        *,
        group: str | None = None,
        dlq_topic: str | None = None,
        timeout: float = 10.0,
        session_timeout_ms: int = 10_000,
        heartbeat_interval_ms: int = 3_000,
        max_poll_interval_ms: int = 300_000,
        max_poll_records: int = 2_000,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.consumer_name = consumer
        self.group = group or consumer
        self.dlq_topic = dlq_topic or f"{topic}.dlq"
        self.timeout = timeout
        self.max_poll_interval = max_poll_interval_ms / 1000
        self.epoch = 0
        self.flush: Flush | None = None
        self._producer: KafkaProducer | None = None
        self._paused = False
        try:
            self.consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=self.group,
                client_id=f"tracker-worker-{consumer}",
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                partition_assignment_strategy=(RangePartitionAssignor, RoundRobinPartitionAssignor),
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms,
                max_poll_interval_ms=max_poll_interval_ms,
                max_poll_records=max_poll_records,
                fetch_max_wait_ms=FETCH_WAIT_MS,
                request_timeout_ms=max(int(timeout * 1000), session_timeout_ms + 5000),
            )
        except kafka_errors.KafkaError as exc:
            raise LogUnavailableError(f"Kafka at {bootstrap} cannot be reached: {exc}") from exc
        try:
            partitions = self.consumer.partitions_for_topic(topic)
        except kafka_errors.KafkaError as exc:
            self.consumer.close(autocommit=False)
            raise LogUnavailableError(f"Kafka at {bootstrap}: {exc}") from exc
        if not partitions:
            self.consumer.close(autocommit=False)
            raise LogNotFoundError(
                f"no stream: Kafka at {bootstrap} has no topic {topic!r}; "
                f"write one with 'tracker streams append --stream {topic}'"
            )
        self.consumer.subscribe([topic], listener=_Revocations(self))

    @property
    def description(self) -> str:
        return f"topic {self.topic} as {self.consumer_name} (group {self.group})"

    def poll(self, timeout: float) -> list[Chunk]:
        try:
            polled = self.consumer.poll(timeout_ms=int(timeout * 1000))
        except kafka_errors.KafkaError as exc:
            log.warning("%s: poll failed: %s (retrying)", self.description, exc)
            return []
        epoch = self.epoch
        return [
            Chunk(
                tp.partition,
                [
                    _new_incoming(Incoming, (r.offset, r.key, r.value or b"", r.headers or []))
                    for r in records
                ],
                epoch,
            )
            for tp, records in polled.items()
        ]

    def keep_alive(self) -> None:
        if not self._paused:
            self.consumer.pause(*self.consumer.assignment())
            self._paused = True
        try:
            self.consumer.poll(timeout_ms=0)
        except kafka_errors.KafkaError as exc:
            log.warning("%s: poll while a handler runs failed: %s", self.description, exc)

    def done_keeping_alive(self) -> None:
        if self._paused:
            self.consumer.resume(*self.consumer.paused())
            self._paused = False

    def offsets(self, positions: dict[int, int]) -> dict[TopicPartition, OffsetAndMetadata]:
        return {
            TopicPartition(self.topic, p): OffsetAndMetadata(position, "", -1)
            for p, position in positions.items()
        }

    def commit(self, positions: dict[int, int]) -> None:
        if not positions:
            return
        try:
            self.consumer.commit(self.offsets(positions))
        except kafka_errors.KafkaError as exc:
            log.warning(
                "%s: committing positions %s failed (%s); those messages will be "
                "read again, which is harmless",
                self.description,
                positions,
                exc,
            )

    def _dlq_producer(self) -> KafkaProducer:
        if self._producer is None:
            self._ensure_dlq_topic()
            try:
                self._producer = KafkaProducer(
                    bootstrap_servers=self.bootstrap,
                    client_id=f"tracker-worker-{self.consumer_name}-dlq",
                    acks="all",
                    linger_ms=5,
                )
            except kafka_errors.KafkaError as exc:
                raise LogUnavailableError(f"Kafka at {self.bootstrap}: {exc}") from exc
        return self._producer

    def _ensure_dlq_topic(self) -> None:
        try:
            ensure_topic(self.bootstrap, self.dlq_topic, 1, timeout=self.timeout)
        except LogError as exc:
            if exc.retriable:
                raise
            log.warning("cannot create the dead-letter topic %s: %s", self.dlq_topic, exc)

    def dead_letter(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        if not letters:
            return
        producer = self._dlq_producer()
        futures = [
            producer.send(
                self.dlq_topic,
                key=letter.key,
                value=letter.value,
                headers=dead_letter_headers(letter, consumer, self.topic),
            )
            for letter in letters
        ]
        try:
            producer.flush(timeout=self.timeout)
            for future in futures:
                future.get(timeout=self.timeout)
        except kafka_errors.KafkaError as exc:  # a timeout too: a stalled broker
            raise LogUnavailableError(
                f"writing dead letters to {self.dlq_topic} on Kafka at {self.bootstrap} "
                f"failed: {exc}; retrying"
            ) from exc

    def lag(self) -> int | None:
        total = 0
        try:
            assigned = self.consumer.assignment()
            if not assigned:
                return None
            for tp in assigned:
                high = self.consumer.highwater(tp)
                if high is None:
                    return None
                total += max(high - self.consumer.position(tp, timeout_ms=0), 0)
        except (kafka_errors.KafkaError, TypeError):
            return None
        return total

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except kafka_errors.KafkaError as exc:
            log.warning("%s: close: %s", self.description, exc)
        if self._producer is not None:
            self._producer.close(timeout=self.timeout)


def ensure_topic(bootstrap: str, topic: str, partitions: int, *, timeout: float) -> int:
    """Create ``topic`` with ``partitions`` unless it exists; its partition count."""
    from kafka.admin import NewTopic

    try:
        admin = KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="tracker-streams",
            request_timeout_ms=int(timeout * 1000),
        )
    except kafka_errors.KafkaError as exc:
        raise LogUnavailableError(f"Kafka at {bootstrap} cannot be reached: {exc}") from exc
    try:
        with contextlib.suppress(kafka_errors.TopicAlreadyExistsError):
            admin.create_topics([NewTopic(topic, partitions, -1)], timeout_ms=int(timeout * 1000))
        for described in admin.describe_topics([topic]):
            if described.get("name") == topic and not described.get("error_code"):
                return len(described.get("partitions") or ())
        raise LogError(f"topic {topic!r} cannot be described on {bootstrap}")
    except kafka_errors.KafkaError as exc:
        raise LogUnavailableError(f"Kafka at {bootstrap}: {exc}") from exc
    finally:
        admin.close()


def produce_messages(
    bootstrap: str,
    topic: str,
    chunks: Iterable[Sequence[tuple[str, bytes]]],
    *,
    partitions: int,
    timeout: float,
) -> int:
    """Send ``(session_id, value)`` messages keyed by session (one session, one partition,
    in order); returns once the brokers acknowledged all of them."""
    ensure_topic(bootstrap, topic, partitions, timeout=timeout)
    try:
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            client_id="tracker-streams",
            acks="all",
            enable_idempotence=True,
            linger_ms=20,
            batch_size=256 * 1024,
            max_block_ms=int(timeout * 1000),
        )
    except kafka_errors.KafkaError as exc:
        raise LogUnavailableError(f"Kafka at {bootstrap} cannot be reached: {exc}") from exc
    count = 0
    try:
        for chunk in chunks:
            futures = [producer.send(topic, key=sid.encode(), value=value) for sid, value in chunk]
            count += len(futures)
            producer.flush(timeout=timeout)
            for future in futures:
                future.get(timeout=timeout)
    except kafka_errors.KafkaError as exc:
        raise LogUnavailableError(
            f"Kafka at {bootstrap}: sending to {topic} failed after {count} messages: {exc}"
        ) from exc
    finally:
        try:
            producer.close(timeout=timeout)
        except kafka_errors.KafkaError as exc:  # a broker gone: what was acknowledged is counted
            log.warning("closing the producer to %s: %s", topic, exc)
    return count
