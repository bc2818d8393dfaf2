"""Which partitions a ``tracker project`` process works on: a Kafka consumer group's say.

The group only decides who works; where to resume is the Redis checkpoint, never a group
offset (none is ever committed). The consumer is kept paused, so it fetches no records:
polling it only keeps the membership alive and learns of rebalances. A projector that
lost a partition and has not noticed yet (a zombie) is harmless: its merges fail the
checkpoint fence.

The timeouts are short (a rebalance waits for up to ``max_poll_interval_ms``): the
tailer polls between bounded batches, well within them, and a dead projector's
partitions move to the others within seconds.
"""

from __future__ import annotations

import logging

from kafka import KafkaConsumer
from kafka.errors import KafkaError

from tracker.errors import LogUnavailableError

log = logging.getLogger(__name__)


class GroupAssignment:
    """This process's share of the event topic's partitions in the projectors' group."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        group: str,
        *,
        session_timeout_ms: int = 6000,
        heartbeat_interval_ms: int = 1000,
        max_poll_interval_ms: int = 10_000,
    ) -> None:
        self.group = group
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap,
                group_id=group,
                client_id="tracker-projector",
                enable_auto_commit=False,
                session_timeout_ms=session_timeout_ms,
                heartbeat_interval_ms=heartbeat_interval_ms,
                max_poll_interval_ms=max_poll_interval_ms,
            )
            self._consumer.subscribe([topic])
        except KafkaError as exc:
            raise LogUnavailableError(
                f"Kafka at {bootstrap}: cannot join the group {group!r}: {exc}"
            ) from exc
        self._held: tuple[int, ...] = ()

    def partitions(self) -> tuple[int, ...]:
        """Poll (membership and rebalances only) and return the partitions held now."""
        try:
            # joining takes several round trips that a zero-timeout poll does not wait for
            waiting = 0 if self._held else 200
            self._consumer.poll(timeout_ms=waiting, max_records=1, update_offsets=False)
        except KafkaError as exc:
            log.warning("projector group %s: %s (keeping %s)", self.group, exc, self._held)
            return self._held
        assigned = self._consumer.assignment()
        if assigned:
            self._consumer.pause(*assigned)
        held = tuple(sorted(tp.partition for tp in assigned))
        if held != self._held:
            log.warning("projector group %s: this process now applies partitions %s",
                        self.group, list(held))  # fmt: skip
            self._held = held
        return held

    def close(self) -> None:
        self._consumer.close(autocommit=False)
