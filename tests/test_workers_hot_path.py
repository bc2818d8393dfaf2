"""The worker's hot path on file streams: bounded polls, lazy decoding, the default handler.

A file stream's frame holds up to 65,536 messages; a poll returns at most
``READ_RECORDS`` of them (the rest on the next polls, without reading the frame again), so
``--flush-max`` holds within a frame. Messages are decoded as they are iterated, and the
default handler's path (``message_ids``, no ``Message``) says exactly what
``decode_message`` says.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers import Message, Worker
from consumers.filestream import READ_RECORDS, FileStream, append_messages, open_stream_log
from consumers.generate import session_ids, synthetic_messages
from consumers.messages import (
    StreamRecord,
    Undecodable,
    decode_message,
    decode_record,
    encode_record,
    message_ids,
)
from consumers.streams import Incoming
from tracker import Settings, Tracker
from tracker.errors import SessionNotFoundError
from tracker.logs.file import FileLog

EVENT = json.loads((Path(__file__).parent / "flux0" / "event-schema.json").read_text())["EventDTO"][
    "example"
]


def event(offset: int, **changes: object) -> bytes:
    return json.dumps({**EVENT, "offset": offset, **changes}).encode()


def write_stream(directory: Path, count: int, sessions: int) -> None:
    """One append: a single frame of up to 65,536 messages."""
    with open_stream_log(directory, create=True, fsync=False) as log:
        append_messages(log, synthetic_messages(count, sessions))


def heads(count: int, sessions: int) -> dict[str, int]:
    return {sid: (count - 1 - n) // sessions for n, sid in enumerate(session_ids(sessions))}


@pytest.fixture
def tracker(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Tracker]:
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix, fsync=False)
    with Tracker(settings) as opened:
        yield opened


def run_until_processed(worker: Worker, count: int) -> None:
    """Run the worker on a thread until it processed ``count`` messages, then stop it."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        thread.join(timeout=0.05)
        for _ in range(1200):
            if worker.stats.processed >= count:
                break
            thread.join(timeout=0.05)
    finally:
        worker.stop()
        thread.join(timeout=60)
    assert not thread.is_alive(), "the worker did not stop"
    assert worker.stats.processed == count


def assert_offsets(tracker: Tracker, consumer: str, expected: dict[str, int]) -> None:
    """Each session's offset of ``consumer`` is as expected, once the tracker's background
    thread has projected the last flush (``commit_many(wait=False)``)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            found = {sid: tracker.offsets(sid).get(consumer) for sid in expected}
        except SessionNotFoundError:
            found = {}
        if found == expected or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert found == expected


def test_a_poll_returns_at_most_read_records_of_a_large_frame(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    count = 2 * READ_RECORDS + 500
    write_stream(stream, count, 7)
    with FileLog(stream, create=False) as log:
        assert len(log.read(0, None, 1)) == 1, "the stream is one frame"
    source = FileStream(stream, "notifier")
    try:
        sizes: list[int] = []
        positions: list[int] = []
        while len(positions) < count:
            chunks = source.poll(1.0)
            assert len(chunks) == 1
            sizes.append(len(chunks[0].messages))
            positions.extend(m.position for m in chunks[0].messages)
        assert sizes == [READ_RECORDS, READ_RECORDS, 500]
        assert positions == list(range(count))
        assert source.poll(0.0) == []
        source.commit({0: READ_RECORDS + 10})  # in the middle of the frame
        assert source.lag() == count - READ_RECORDS - 10
    finally:
        source.close()
    again = FileStream(stream, "notifier")
    try:
        first = again.poll(1.0)[0].messages[0]
        assert first.position == READ_RECORDS + 10
        raw = FileLog(stream, create=False)
        try:
            record = decode_record(raw.read(0, None, 1)[0].records[READ_RECORDS + 10])
        finally:
            raw.close()
        assert (first.key, first.value, first.headers) == (record.key, record.value, [])
    finally:
        again.close()


def test_the_worker_flushes_within_a_large_frame(tmp_path: Path, tracker: Tracker) -> None:
    """``flush_max`` holds although one frame holds every message: between two flushes the
    handler sees at most ``flush_max`` plus one poll's messages."""
    stream = tmp_path / "stream"
    count, flush_max = 20_000, 5_000
    write_stream(stream, count, 50)
    flushes_seen: list[int] = []
    worker: Worker

    def handler(message: Message) -> None:
        flushes_seen.append(worker.stats.flushes)

    worker = Worker(
        FileStream(stream, "indexer"),
        tracker,
        "indexer",
        handler,
        flush_ms=600_000,
        flush_max=flush_max,
        report_every=0,
    )
    run_until_processed(worker, count)
    per_flush = Counter(flushes_seen)
    assert len(per_flush) >= count // (flush_max + READ_RECORDS)
    assert max(per_flush.values()) < flush_max + READ_RECORDS
    assert_offsets(tracker, "indexer", heads(count, 50))


def test_the_default_handler_flushes_within_a_large_frame(tmp_path: Path, tracker: Tracker) -> None:
    stream = tmp_path / "stream"
    count = 20_000
    write_stream(stream, count, 50)
    source = FileStream(stream, "notifier")
    worker = Worker(source, tracker, "notifier", flush_ms=600_000, flush_max=5_000)
    run_until_processed(worker, count)
    assert worker.stats.flushes >= count // (5_000 + READ_RECORDS) + 1
    assert json.loads((stream / "consumers" / "notifier.json").read_text())["next"] == count
    assert_offsets(tracker, "notifier", heads(count, 50))


def test_the_default_handler_dead_letters_what_it_cannot_decode(
    tmp_path: Path, tracker: Tracker
) -> None:
    stream = tmp_path / "stream"
    records = [
        StreamRecord(b"s1", event(0)),
        StreamRecord(b"s1", b"not json at all"),
        StreamRecord(None, event(5), [("session_id", b"s2")]),
        StreamRecord(b"bad id!", event(1)),
        StreamRecord(b"s1", event(2)),
    ]
    with open_stream_log(stream, create=True, fsync=False) as log:
        log.append(0, [encode_record(r) for r in records] + [b"\xc1 not a stream record"])
    worker = Worker(FileStream(stream, "notifier"), tracker, "notifier", flush_ms=20)
    run_until_processed(worker, 6)
    assert_offsets(tracker, "notifier", {"s1": 2, "s2": 5})
    with FileLog(stream / "dlq", create=False) as dlq:
        letters = [decode_record(r) for b in dlq.read(0, None, 100) for r in b.records]
    reasons = {
        dict(letter.headers)["dlq.offset"].decode(): dict(letter.headers)["dlq.reason"].decode()
        for letter in letters
    }
    assert set(reasons) == {"1", "3", "5"}
    assert reasons["1"].startswith("not a JSON event")
    assert "is not 1..64 chars" in reasons["3"]
    assert reasons["5"].startswith("not a JSON event")
    assert worker.stats.dead_lettered == 3


@pytest.mark.parametrize(
    ("key", "value", "headers"),
    [
        (b"s1", event(3), []),
        (None, event(3), [("session_id", b"h1")]),
        (None, event(3, session_id="field"), [("other", b"x")]),
        (None, event(3, session_id="field"), [("session_id", b"")]),
        (b"s1", b"{not json", []),
        (b"s1", b"[1, 2]", []),
        (b"s1", event(-1), []),
        (b"s1", json.dumps({**EVENT, "offset": "7"}).encode(), []),
        (None, event(1), []),
        (b"bad id!", event(1), []),
        (b"\xff\xfe", event(1), []),
        (None, event(1), [("session_id", b"bad id!")]),
        (b"s1", b"", []),
        (b"s1", b'{"offset": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", []),
    ],
)
def test_message_ids_say_what_decode_message_says(
    key: bytes | None, value: bytes, headers: list[tuple[str, bytes]]
) -> None:
    try:
        message = decode_message(2, 9, key, value, headers)
    except Undecodable as exc:
        with pytest.raises(Undecodable) as caught:
            message_ids(key, value, headers)
        assert str(caught.value) == str(exc)
    else:
        assert message_ids(key, value, headers) == (message.session_id, message.offset)


def test_a_depth_bomb_is_undecodable_not_a_crash() -> None:
    bomb = b'{"offset": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Undecodable, match="not a JSON event: nested too deeply"):
        message_ids(b"s1", bomb, [])


def test_a_polls_messages_are_a_sequence(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    records = [encode_record(StreamRecord(b"s1", event(n), [("h", b"v")])) for n in range(4)]
    with open_stream_log(stream, create=True, fsync=False) as log:
        log.append(0, [*records, b"raw bytes"])
    source = FileStream(stream, "notifier")
    try:
        messages = source.poll(1.0)[0].messages
    finally:
        source.close()
    whole = list(messages)
    assert len(messages) == len(whole) == 5
    assert whole[0] == Incoming(0, b"s1", event(0), [("h", b"v")])
    assert whole[4] == Incoming(4, None, b"raw bytes", [])
    assert [messages[i] for i in range(5)] == whole
    assert messages[-1] == whole[-1] and messages[-5] == whole[0]
    assert messages[1:3] == whole[1:3] and messages[::-2] == whole[::-2]
    assert all(type(m) is Incoming for m in messages)
    for index in (5, -6):
        with pytest.raises(IndexError):
            messages[index]
