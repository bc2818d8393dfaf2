"""Workers on the embedded default: file streams, handlers, dead letters, stops and crashes.

In-process tests drive :class:`consumers.Worker` on a thread; process tests run the
``tracker worker`` command as users do, with SIGTERM and SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from consumers import Message, Retry, Worker, load_handler
from consumers.filestream import FileStream, append_messages, open_stream_log
from consumers.generate import session_ids, synthetic_messages
from consumers.messages import StreamRecord, Undecodable, decode_message, decode_record
from consumers.messages import encode_record as encode_stream_record
from tests.services import lock_held, stop_process
from tracker import Settings, Tracker
from tracker.errors import InvalidInputError, LogLockedError
from tracker.logs.file import FileLog

TRACKER = str(Path(sys.executable).with_name("tracker"))

EVENT = json.loads((Path(__file__).parent / "flux0" / "event-schema.json").read_text())["EventDTO"][
    "example"
]
"""flux0's own example event (offset 0)."""


def event(offset: int, **changes: object) -> bytes:
    return json.dumps({**EVENT, "offset": offset, **changes}).encode()


def heads(count: int, sessions: int) -> dict[str, int]:
    """Each synthetic session's highest offset (see consumers.generate)."""
    return {sid: (count - 1 - n) // sessions for n, sid in enumerate(session_ids(sessions))}


def write_stream(directory: Path, count: int, sessions: int) -> None:
    with open_stream_log(directory, create=True, fsync=False) as log:
        append_messages(log, synthetic_messages(count, sessions))


def append_raw(directory: Path, records: list[StreamRecord]) -> None:
    with open_stream_log(directory, create=True, fsync=False) as log:
        log.append(0, [encode_stream_record(r) for r in records])


# -- messages ----------------------------------------------------------------------------


def test_the_session_id_comes_from_the_key_then_a_header_then_a_field() -> None:
    value = event(3, session_id="fromfield")
    assert decode_message(0, 9, b"fromkey", value, [("session_id", b"h")]).session_id == "fromkey"
    assert decode_message(0, 9, None, value, [("session_id", b"h")]).session_id == "h"
    message = decode_message(1, 9, None, value, [])
    assert (message.session_id, message.offset, message.partition, message.position) == (
        "fromfield", 3, 1, 9,
    )  # fmt: skip
    assert message.event["data"] == EVENT["data"]


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"s1", b"{not json", "not a JSON event"),
        (b"s1", b"[1, 2]", "invalid event"),
        (b"s1", json.dumps({**EVENT, "offset": -1}).encode(), "invalid event"),
        (b"s1", json.dumps({k: v for k, v in EVENT.items() if k != "offset"}).encode(), "offset"),
        (b"s1", json.dumps({**EVENT, "offset": "7"}).encode(), "invalid event"),
        (None, event(1), "no session id"),
        (b"bad id!", event(1), "is not 1..64 chars"),
        (b"\xff\xfe", event(1), "not UTF-8"),
        (b"s1", b"", "not a JSON event"),
    ],
)
def test_undecodable_messages_say_why(key: bytes | None, value: bytes, reason: str) -> None:
    with pytest.raises(Undecodable, match=reason):
        decode_message(0, 0, key, value, [])


def test_load_handler_names_what_is_wrong() -> None:
    loaded: object = load_handler("json:dumps")
    assert loaded is json.dumps
    for spec, problem in [
        ("json", "expected package.module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("json:nothing_here", "has no"),
        ("json:__doc__", "is not callable"),
    ]:
        with pytest.raises(InvalidInputError, match=problem):
            load_handler(spec)


# -- the worker in-process -----------------------------------------------------------------


@pytest.fixture
def tracker(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Tracker]:
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix, fsync=False)
    with Tracker(settings) as opened:
        yield opened


@contextmanager
def running(worker: Worker) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        worker.stop()
        thread.join(timeout=60)
        assert not thread.is_alive(), "the worker did not stop"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def offsets_in(tracker: Tracker, consumer: str, sessions: int) -> dict[str, int]:
    """The consumer's offsets of the synthetic sessions projected so far."""
    found = {}
    for sid in session_ids(sessions):
        state = tracker.session_state(sid)
        if state is not None and consumer in state.offsets:
            found[sid] = state.offsets[consumer]
    return found


def dead_letters(directory: Path) -> list[tuple[StreamRecord, dict[str, str]]]:
    with FileLog(directory / "dlq", create=False) as log:
        letters = []
        for batch in log.read(0, None, 1_000_000):
            for raw in batch.records:
                record = decode_record(raw)
                letters.append((record, {k: v.decode() for k, v in record.headers}))
        return letters


def test_a_worker_records_the_highest_offset_per_session_and_its_position(
    tmp_path: Path, tracker: Tracker
) -> None:
    stream = tmp_path / "stream"
    write_stream(stream, 5_000, 50)
    worker = Worker(FileStream(stream, "notifier"), tracker, "notifier", flush_ms=20)
    with running(worker):
        wait_until(lambda: worker.stats.processed == 5_000, "every message")
    wait_until(lambda: offsets_in(tracker, "notifier", 50) == heads(5_000, 50), "the offsets")
    saved = json.loads((stream / "consumers" / "notifier.json").read_text())
    assert saved["next"] == 5_000
    assert worker.stats.dead_lettered == 0


def test_handlers_sync_async_retry_and_failure(tmp_path: Path, tracker: Tracker) -> None:
    stream = tmp_path / "stream"
    records = [StreamRecord(b"s1", event(n)) for n in range(6)]
    records.append(StreamRecord(b"s1", b"not json at all"))
    records.append(StreamRecord(b"s2", event(0)))
    append_raw(stream, records)
    calls: list[tuple[str, int]] = []
    attempts: dict[int, int] = {}

    async def handler(message: Message) -> None:
        calls.append((message.session_id, message.offset))
        if message.session_id == "s2":
            raise ValueError("boom")
        if message.offset == 2:  # succeeds on the third attempt
            attempts[2] = attempts.get(2, 0) + 1
            if attempts[2] < 3:
                raise Retry("not yet", after=0.01)
        if message.offset == 4:  # never succeeds
            raise Retry("still not", after=0.01)

    worker = Worker(
        FileStream(stream, "indexer"), tracker, "indexer", handler, flush_ms=20, max_attempts=3
    )
    with running(worker):
        wait_until(lambda: worker.stats.processed == 8, "every message")
    assert calls.count(("s1", 2)) == 3 and calls.count(("s1", 4)) == 3
    assert [c for c in calls if c[0] == "s1"] == [
        ("s1", 0), ("s1", 1), ("s1", 2), ("s1", 2), ("s1", 2), ("s1", 3),
        ("s1", 4), ("s1", 4), ("s1", 4), ("s1", 5),
    ]  # fmt: skip
    letters = dead_letters(stream)
    reasons = {(r.key, h["dlq.offset"]): h["dlq.reason"] for r, h in letters}
    assert set(reasons) == {(b"s1", "4"), (b"s1", "6"), (b"s2", "7")}
    assert reasons[b"s1", "4"] == "gave up after 3 attempts: still not"
    assert reasons[b"s1", "6"].startswith("not a JSON event")
    assert reasons[b"s2", "7"] == "handler raised ValueError: boom"
    for record, headers in letters:
        assert headers["dlq.consumer"] == "indexer" and headers["dlq.partition"] == "0"
        assert record.value == records[int(headers["dlq.offset"])].value
    wait_until(
        lambda: (s := tracker.session_state("s1")) is not None and s.offsets == {"indexer": 5},
        "the offsets",
    )
    assert tracker.session_state("s2") is None
    assert worker.stats.dead_lettered == 3 and worker.stats.processed == 8


def test_a_second_worker_with_the_same_consumer_name_is_refused(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    write_stream(stream, 10, 2)
    first = FileStream(stream, "notifier")
    try:
        with pytest.raises(
            LogLockedError, match=f"consumer notifier is already reading .*{os.getpid()}"
        ):
            FileStream(stream, "notifier")
        FileStream(stream, "indexer").close()
    finally:
        first.close()
    FileStream(stream, "notifier").close()


def test_positions_are_not_committed_when_the_log_refuses(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """A flush that fails (the log is locked by another process) keeps its results: no
    position is committed, and the next flush appends and commits them."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix,
                        fsync=False, lock_timeout=0.2)  # fmt: skip
    stream = tmp_path / "stream"
    write_stream(stream, 100, 10)
    with Tracker(settings) as tracker:
        source = FileStream(stream, "notifier")
        worker = Worker(source, tracker, "notifier", flush_ms=10_000, report_every=0)
        for chunk in source.poll(1.0):
            worker._handle_chunk(chunk)
        with lock_held(tmp_path / "data" / "log" / "LOCK"):
            worker.flush()
            assert not (stream / "consumers" / "notifier.json").exists()
        worker.flush()
        assert json.loads((stream / "consumers" / "notifier.json").read_text())["next"] == 100
        wait_until(lambda: offsets_in(tracker, "notifier", 10) == heads(100, 10), "the offsets")
        source.close()


# -- tracker worker and tracker streams, as processes --------------------------------------


def env_for(data_dir: Path, redis_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(TRACKER_DATA_DIR=str(data_dir), TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix)
    return env


def run_cli(
    args: list[str], env: dict[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TRACKER, *args], env=env, input=stdin, capture_output=True, timeout=120, check=False
    )


def start_worker(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [TRACKER, "worker", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def offsets_of(env: dict[str, str], consumer: str, sessions: int) -> dict[str, int]:
    settings = Settings.from_env(env)
    with Tracker(settings, create=False) as tracker:
        found = {}
        for sid in session_ids(sessions):
            offset = tracker.offsets(sid).get(consumer)
            if offset is not None:
                found[sid] = offset
        return found


def test_streams_append_is_all_or_nothing_and_names_the_bad_line(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    env = env_for(tmp_path / "data", redis_url, prefix)
    stream = tmp_path / "stream"
    good = [json.dumps({**EVENT, "offset": n, "session_id": "s1"}) for n in range(3)]
    result = run_cli(["streams", "append", "--stream-dir", str(stream), "--json", "-"], env,
                     "\n".join(good).encode() + b"\n")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["messages"] == 3
    with FileLog(stream, create=False) as log:
        (batch,) = log.read(0, None, 100)
        record = decode_record(batch.records[0])
        assert record.key == b"s1" and "session_id" not in json.loads(record.value)
    for bad, problem in [
        (json.dumps({**EVENT, "offset": 1}), "session_id"),
        (json.dumps({**EVENT, "offset": -2, "session_id": "s1"}), "offset"),
        ("{oops", "not a JSON object"),
        (json.dumps({**EVENT, "offset": 1, "session_id": "no spaces"}), "session_id"),
    ]:
        lines = [*good, bad, good[0]]
        result = run_cli(["streams", "append", "--stream-dir", str(stream), "-"], env,
                         "\n".join(lines).encode())  # fmt: skip
        assert result.returncode == 2, result.stderr
        error = result.stderr.decode().strip()
        assert error.startswith("error: line 4: ") and problem in error, error
        assert "Traceback" not in error
        with FileLog(stream, create=False) as log:
            assert log.count(0) == 3
    usage = run_cli(["streams", "append", "--generate", "3"], env)
    assert usage.returncode == 2 and b"--stream" in usage.stderr


def test_sigterm_flushes_before_a_clean_exit(tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = env_for(tmp_path / "data", redis_url, prefix)
    stream = tmp_path / "stream"
    write_stream(stream, 2_000, 20)
    log = tmp_path / "worker.log"
    worker = start_worker(["--stream-dir", str(stream), "--consumer", "notifier",
                           "--flush-ms", "600000", "--flush-max", "1000000",
                           "--report-every", "0.2"], env, log)  # fmt: skip
    try:
        wait_until(lambda: "processed 2,000" in log.read_text(), "the worker to read everything")
        assert not (stream / "consumers" / "notifier.json").exists(), "flushed before SIGTERM"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0, log.read_text()
    finally:
        stop_process(worker)
    assert json.loads((stream / "consumers" / "notifier.json").read_text())["next"] == 2_000
    assert offsets_of(env, "notifier", 20) == heads(2_000, 20)


def test_killed_workers_lose_no_acknowledged_offset(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """SIGKILL at random moments, restart, repeat: in the end every session's offset is its
    highest, and a saved position never runs ahead of the offsets in the log."""
    env = env_for(tmp_path / "data", redis_url, prefix)
    stream = tmp_path / "stream"
    count, sessions = 60_000, 300
    write_stream(stream, count, sessions)
    log = tmp_path / "worker.log"
    args = ["--stream-dir", str(stream), "--consumer", "indexer", "--flush-ms", "5",
            "--flush-max", "500", "--report-every", "0"]  # fmt: skip
    rng = __import__("random").Random(5)
    position = stream / "consumers" / "indexer.json"
    for _ in range(5):
        worker = start_worker(args, env, log)
        try:
            time.sleep(rng.uniform(0.3, 1.2))
            worker.send_signal(signal.SIGKILL)
            worker.wait(timeout=30)
        finally:
            stop_process(worker)
        if position.exists():
            saved = json.loads(position.read_text())["next"]
            # every message before the saved position has its offset in the log
            seen = heads(saved, sessions)
            recorded = offsets_of(env, "indexer", sessions)
            assert all(recorded.get(sid, -1) >= head for sid, head in seen.items()), saved
    started = log.read_text().count("worker indexer: reading")
    worker = start_worker(args, env, log)
    try:
        wait_until(lambda: log.read_text().count("worker indexer: reading") > started, "a start")
        wait_until(lambda: position.exists() and json.loads(position.read_text())["next"] == count,
                   "the last worker to finish", timeout=120)  # fmt: skip
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
    finally:
        stop_process(worker)
    assert offsets_of(env, "indexer", sessions) == heads(count, sessions)


def test_two_workers_then_replay_and_verify(tmp_path: Path, redis_url: str, prefix: str) -> None:
    env = env_for(tmp_path / "data", redis_url, prefix)
    stream = tmp_path / "stream"
    write_stream(stream, 10_000, 100)
    workers = [
        start_worker(
            ["--stream-dir", str(stream), "--consumer", name, "--report-every", "0"],
            env,
            tmp_path / f"{name}.log",
        )
        for name in ("notifier", "indexer")
    ]
    try:
        for name in ("notifier", "indexer"):
            path = stream / "consumers" / f"{name}.json"
            wait_until(lambda p=path: p.exists() and json.loads(p.read_text())["next"] == 10_000,  # type: ignore[misc]
                       f"{name} to finish")  # fmt: skip
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        assert [w.wait(timeout=60) for w in workers] == [0, 0]
    finally:
        for worker in workers:
            stop_process(worker)
    before = {c: offsets_of(env, c, 100) for c in ("notifier", "indexer")}
    assert before == {c: heads(10_000, 100) for c in ("notifier", "indexer")}
    settings = Settings.from_env(env)
    with Tracker(settings, create=False) as tracker:
        for key in tracker.client.scan_iter(f"{prefix}*"):
            tracker.client.delete(key)
    assert run_cli(["replay"], env).returncode == 0
    assert {c: offsets_of(env, c, 100) for c in ("notifier", "indexer")} == before
    verified = run_cli(["verify"], env)
    assert verified.returncode == 0 and verified.stdout.strip().endswith(b"verify: 0 differences")
