"""A handler slower than the group's poll interval keeps the worker in the group.

The handler takes longer than ``max_poll_interval_ms`` on one message. Had the worker
been thrown out, the partition would be lost (a warning) and the messages after its last
commit handed to the handler again; instead each message is handled exactly once and the
group's committed positions reach the end of every partition.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from consumers import Message, Worker
from consumers.kafkastream import KafkaStream, produce_messages
from tracker import Settings, Tracker

SLOW_SECONDS = 9.0
MAX_POLL_INTERVAL_MS = 6_000


def test_a_slow_handler_does_not_get_the_worker_thrown_out(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: str, redis_url: str, prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    stream_topic = f"{kafka_topic}.stream"
    messages = [(f"s{n % 3}", f'{{"offset": {n // 3}}}'.encode()) for n in range(30)]
    produce_messages(kafka_bootstrap, stream_topic, [messages], partitions=3, timeout=30)
    calls: Counter[tuple[str, int]] = Counter()

    def handler(message: Message) -> None:
        calls[message.session_id, message.offset] += 1
        if (message.session_id, message.offset) == ("s1", 4):
            time.sleep(SLOW_SECONDS)

    settings = Settings(
        data_dir=tmp_path / "data", kafka_bootstrap=kafka_bootstrap, event_topic=kafka_topic,
        partitions=3, redis_url=redis_url, prefix=prefix,
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="consumers")
    with Tracker(settings) as tracker:
        stream = KafkaStream(
            kafka_bootstrap, stream_topic, "slowpoke", group=f"{kafka_topic}.slowpoke",
            session_timeout_ms=6_000, heartbeat_interval_ms=1_000,
            max_poll_interval_ms=MAX_POLL_INTERVAL_MS, max_poll_records=5,
        )  # fmt: skip
        worker = Worker(stream, tracker, "slowpoke", handler, flush_ms=50, report_every=0)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 120
            while worker.stats.processed < 30:
                assert time.monotonic() < deadline, f"processed only {worker.stats.processed}"
                time.sleep(0.1)
        finally:
            worker.stop()
            thread.join(60)
            stream.close()
        assert not thread.is_alive()
    assert calls == Counter({(f"s{n % 3}", n // 3): 1 for n in range(30)})
    text = caplog.text
    assert "polling with the partitions paused" in text, text
    assert "lost partitions" not in text, text
    checker = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=f"{kafka_topic}.slowpoke",
                            enable_auto_commit=False)  # fmt: skip
    try:
        committed = sum(checker.committed(TopicPartition(stream_topic, p)) or 0 for p in range(3))
    finally:
        checker.close(autocommit=False)
    assert committed == 30
