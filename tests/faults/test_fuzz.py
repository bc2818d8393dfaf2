"""Fuzzing with hypothesis: stream messages, event import lines, HTTP requests, CLI arguments.

Whatever the input, the outcome is a clear one: a message is handled (its offset
recorded) or dead-lettered with a reason; a rejected import, request or command writes
nothing and says why in one line (or flux0's error shape), never a traceback, a 500 or a
hang. Each test runs a bounded number of examples (the suite runs them in minutes) and
records how many and their outcomes in its figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumers import Message, Worker
from consumers.handlers import acknowledge
from consumers.filestream import FileStream, open_stream_log
from consumers.messages import (
    StreamRecord,
    Undecodable,
    decode_message,
    decode_record,
    encode_record,
    message_ids,
)
from tests.conftest import delete_prefix
from tests.faults.fuzzing import expected_ids, near_valid_messages, stream_records
from tests.faults.report import Figures
from tracker import Settings, Tracker
from tracker.events import OffsetCommitted
from tracker.logs.file import FileLog

TRACKER = str(Path(sys.executable).with_name("tracker"))


def fuzz(examples: int) -> settings:
    """A property's settings: ``examples`` random examples (new ones every run), no deadline."""
    return settings(
        deadline=None,
        max_examples=examples,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- (a) stream messages ---------------------------------------------------------------


def as_read(record: StreamRecord | bytes) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """A file stream record as a worker reads it (one that is not a StreamRecord is the
    value, whole)."""
    raw = record if isinstance(record, bytes) else encode_record(record)
    try:
        decoded = decode_record(raw)
    except ValueError:
        return None, raw, []
    return decoded.key, decoded.value, decoded.headers


def test_near_valid_flux0_messages_meet_the_documented_contract(fault_report: Figures) -> None:
    """Decoding alone, many examples: the README's rules (key, header, field; an integer
    offset 0 <= n < 2**63) decide; everything else is :class:`Undecodable` with a reason."""
    outcomes: Counter[str] = Counter()

    @fuzz(500)
    @given(near_valid_messages())
    @example(StreamRecord(b"s1", b'{"offset": 1, "session_id": ""}'))  # the key decides
    def check(record: StreamRecord) -> None:
        expected = expected_ids(record)
        try:
            got: tuple[str, int] | None = message_ids(record.key, record.value, record.headers)
        except Undecodable as exc:
            assert str(exc), "a dead letter's reason is empty"
            got = None
        outcomes["handled" if got else "dead-lettered"] += 1
        assert got == expected, (record, got, expected)
        if got is not None:
            message = decode_message(0, 0, record.key, record.value, record.headers)
            assert isinstance(message.event, dict)

    check()
    fault_report.fault = "hypothesis: flux0 events with mutated fields as stream messages"
    fault_report.injected = fault_report.survived = sum(outcomes.values())
    fault_report.checked = "decoded as the README says (key, header, field; offset range)"
    fault_report.detail = {"examples": sum(outcomes.values()), **outcomes}


@pytest.fixture
def fresh(
    tmp_path: Path, redis_url: str, prefix: str, redis_client: redis.Redis
) -> Iterator[Callable[[], tuple[Path, Settings]]]:
    """A new data dir and stream dir per example, on this test's prefix emptied first."""

    def make() -> tuple[Path, Settings]:
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        delete_prefix(redis_client, prefix)
        settings = Settings(data_dir=root / "data", redis_url=redis_url, prefix=prefix, fsync=False)
        return root / "stream", settings

    yield make


def write_stream(directory: Path, records: list[StreamRecord | bytes]) -> None:
    with open_stream_log(directory, create=True, fsync=False) as log:
        log.append(0, [r if isinstance(r, bytes) else encode_record(r) for r in records])


def letters_of(stream: Path) -> dict[int, str]:
    """The dead letters' stream positions and reasons."""
    if not (stream / "dlq").exists():
        return {}
    with FileLog(stream / "dlq", create=False) as log:
        found = {}
        for batch in log.read(0, None, 1_000_000):
            for raw in batch.records:
                added = {k: v for k, v in decode_record(raw).headers if k.startswith("dlq.")}
                found[int(added["dlq.offset"])] = added["dlq.reason"].decode()
        return found


def committed_in_log(tracker: Tracker, consumer: str) -> dict[str, int]:
    """The highest offset per session that the log's offset_committed events hold."""
    highest: dict[str, int] = {}
    for event in tracker.export_events():
        assert isinstance(event, OffsetCommitted) and event.consumer == consumer, event
        highest[event.session_id] = max(highest.get(event.session_id, -1), event.offset)
    return highest


def reads_the_event(message: Message) -> None:
    """A handler that uses the whole event, as most do."""
    assert isinstance(message.event, dict)


def expected_outcome(
    record: StreamRecord | bytes, handler: bool
) -> tuple[tuple[str, int] | None, str | None]:
    """``((session, offset), None)`` for a message to handle, ``(None, reason)`` for a dead
    letter, as the decoding (checked against the README above) decides."""
    key, value, headers = as_read(record)
    try:
        ids = message_ids(key, value, headers)
    except Undecodable as exc:
        return None, str(exc)
    if handler:
        try:
            msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError) as exc:
            return None, f"not a JSON event: {exc}"
    return ids, None


class Tally:
    """Outcomes over a test's examples, and the acknowledged offsets found missing."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.lost = 0
        self.examples = 0


def run_worker_over(
    records: list[StreamRecord | bytes], stream: Path, settings: Settings, handler: bool
) -> tuple[dict[str, int], dict[int, str], int]:
    """A worker in this process reads every record once; the offsets the log holds, the dead
    letters and the saved stream position."""
    write_stream(stream, records)
    with Tracker(settings) as tracker:
        source = FileStream(stream, "c")
        worker = Worker(source, tracker, "c", reads_the_event if handler else acknowledge,
                        flush_ms=5, report_every=0)  # fmt: skip
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: worker.stats.processed == len(records), "every message", 30)
        finally:
            worker.stop()
            thread.join(30)
            source.close()
        assert not thread.is_alive(), "the worker did not stop"
        committed = committed_in_log(tracker, "c")
        for session, offset in committed.items():  # projected too
            wait_until(lambda s=session, o=offset: tracker.offsets(s).get("c") == o, "offsets")
    saved = json.loads((stream / "consumers" / "c.json").read_text())["next"]
    return committed, letters_of(stream), saved


def test_arbitrary_stream_messages_are_handled_or_dead_lettered_in_process(
    fault_report: Figures, fresh: Callable[[], tuple[Path, Settings]]
) -> None:
    """Arbitrary bytes, JSON and near-valid flux0 events on a file stream, read by a worker
    with the default handler or one that reads the whole event: each message is handled
    once or dead-lettered with a reason, the position passes all of them, and the offsets
    committed are the highest handled offset per session."""
    tally = Tally()

    @fuzz(50)
    @given(st.lists(stream_records, min_size=1, max_size=25), st.booleans())
    @example([StreamRecord(b"s1", b'{"offset": 1, "x": 1e999}')], True)
    def check(records: list[StreamRecord | bytes], handler: bool) -> None:
        stream, settings = fresh()
        committed, letters, saved = run_worker_over(records, stream, settings, handler)
        expected: dict[str, int] = {}
        expected_letters: dict[int, str] = {}
        for position, record in enumerate(records):
            ids, reason = expected_outcome(record, handler)
            if ids is None:
                assert reason is not None
                expected_letters[position] = reason
            elif expected.get(ids[0], -1) < ids[1]:
                expected[ids[0]] = ids[1]
        tally.examples += 1
        tally.outcomes["messages"] += len(records)
        tally.outcomes["dead-lettered"] += len(letters)
        tally.outcomes["handled"] += len(records) - len(letters)
        tally.lost += sum(1 for s, o in expected.items() if committed.get(s, -1) < o)
        assert saved == len(records)
        assert letters == expected_letters
        assert all(letters.values()), "a dead letter without a reason"
        assert committed == expected

    check()
    fault_report.fault = "hypothesis: arbitrary bytes, JSON, mutated flux0 events on a file stream"
    fault_report.injected = tally.outcomes["messages"]
    fault_report.survived = tally.outcomes["messages"]
    fault_report.lost = tally.lost
    fault_report.checked = "each handled or dead-lettered with a reason; offsets = highest handled"
    fault_report.detail = {"examples": tally.examples, **tally.outcomes}


def saved_position(stream: Path) -> int:
    try:
        return int(json.loads((stream / "consumers" / "c.json").read_text())["next"])
    except (FileNotFoundError, ValueError):
        return -1


def test_arbitrary_stream_messages_through_tracker_worker_processes(
    fault_report: Figures, fresh: Callable[[], tuple[Path, Settings]]
) -> None:
    """The same, end to end: a ``tracker worker`` process reads the stream, then SIGTERM;
    it exits 0 without a traceback, and the log holds the highest offset per session."""
    tally = Tally()

    @fuzz(4)
    @given(st.lists(stream_records, min_size=20, max_size=80))
    def check(records: list[StreamRecord | bytes]) -> None:
        stream, settings = fresh()
        write_stream(stream, records)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        env.update(TRACKER_DATA_DIR=str(settings.data_dir), TRACKER_REDIS_URL=str(settings.redis_url),
                   TRACKER_PREFIX=settings.prefix, TRACKER_FSYNC="0")  # fmt: skip
        command = [TRACKER, "worker", "--stream-dir", str(stream), "--consumer", "c",
                   "--flush-ms", "20", "--report-every", "0"]  # fmt: skip
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: saved_position(stream) == len(records) or process.poll() is not None,
                       "the worker's position", 60)  # fmt: skip
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            out, err = process.communicate(timeout=60)
        assert process.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")
        expected: dict[str, int] = {}
        expected_letters: dict[int, str] = {}
        for position, record in enumerate(records):
            ids, reason = expected_outcome(record, handler=False)
            if ids is None:
                expected_letters[position] = str(reason)
            elif expected.get(ids[0], -1) < ids[1]:
                expected[ids[0]] = ids[1]
        with Tracker(settings) as tracker:
            committed = committed_in_log(tracker, "c")
            projected = {s: tracker.offsets(s).get("c", -1) for s in expected}
        letters = letters_of(stream)
        tally.examples += 1
        tally.outcomes["messages"] += len(records)
        tally.outcomes["dead-lettered"] += len(letters)
        tally.outcomes["handled"] += len(records) - len(letters)
        tally.lost += sum(1 for s, o in expected.items() if projected[s] < o)
        assert saved_position(stream) == len(records)
        assert letters == expected_letters
        assert committed == expected and projected == expected

    check()
    fault_report.fault = "hypothesis: arbitrary stream messages read by tracker worker processes"
    fault_report.injected = fault_report.survived = tally.outcomes["messages"]
    fault_report.lost = tally.lost
    fault_report.checked = "exit 0 on SIGTERM, no traceback; dead letters and offsets as decoded"
    fault_report.detail = {
        "examples": tally.examples,
        "processes": tally.examples,
        **tally.outcomes,
    }
