"""Hostile input for workers on the embedded default: odd bytes, odd files, odd handlers.

Each test is an attack that once broke a worker or ``tracker streams append``: a
traceback instead of one line on stderr, a worker that dies on the same message at every
restart, a stream written into the tracker's own event log, a position that skips
messages.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers import Message, Worker
from consumers.filestream import FileStream
from consumers.messages import StreamRecord, Undecodable, decode_message, input_message
from tests.services import lock_held, stop_process
from tests.test_workers import (
    TRACKER,
    append_raw,
    dead_letters,
    env_for,
    event,
    heads,
    run_cli,
    running,
    wait_until,
    write_stream,
)
from tracker import Settings, Tracker
from tracker.errors import InvalidInputError, LogError, SessionNotFoundError
from tracker.logs.file import FileLog

DEEP = 100_000
"""Nesting deeper than any JSON decoder recurses."""


def nested(depth: int) -> bytes:
    return b'{"offset": 1, "x": ' + b"[" * depth + b"]" * depth + b"}"


def one_line_error(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr.decode()
    return lines[0]


def recorded(tracker: Tracker, heads: dict[str, int], consumer: str = "c") -> bool:
    """Whether every session's offset is its head (the worker flushes without waiting)."""
    try:
        return all(tracker.offsets(s).get(consumer) == h for s, h in heads.items())
    except SessionNotFoundError:  # not projected yet
        return False


@pytest.fixture
def opened(tmp_path: Path, redis_url: str, prefix: str) -> Iterator[Tracker]:
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix, fsync=False)
    with Tracker(settings) as tracker:
        yield tracker


# -- odd bytes -----------------------------------------------------------------------------


def test_a_depth_bomb_is_undecodable_and_rejected_by_streams_append() -> None:
    with pytest.raises(Undecodable, match="not a JSON event"):
        decode_message(0, 0, b"s1", nested(DEEP), [])
    with pytest.raises(InvalidInputError, match="line 7: "):
        input_message(b'{"session_id": "s1", ' + nested(DEEP)[1:], "line 7")


def test_a_depth_bomb_in_the_stream_is_dead_lettered(tmp_path: Path, opened: Tracker) -> None:
    """A message no decoder can nest into once killed the worker at every restart."""
    stream = tmp_path / "stream"
    append_raw(stream, [StreamRecord(b"s1", event(0)), StreamRecord(b"s1", nested(DEEP)),
                        StreamRecord(b"s1", event(2))])  # fmt: skip
    worker = Worker(FileStream(stream, "c"), opened, "c", flush_ms=10, report_every=0)
    with running(worker):
        wait_until(lambda: worker.stats.processed == 3, "every message")
    wait_until(lambda: recorded(opened, {"s1": 2}), "the offsets")
    ((_, headers),) = dead_letters(stream)
    assert headers["dlq.offset"] == "1" and headers["dlq.reason"].startswith("not a JSON event")


def test_streams_append_of_a_depth_bomb_is_one_line_and_writes_nothing(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    env = env_for(tmp_path / "data", redis_url, prefix)
    stream = tmp_path / "stream"
    write_stream(stream, 10, 2)
    good = json.dumps({"session_id": "s1", "offset": 0}).encode()
    bomb = b'{"session_id": "s1", ' + nested(DEEP)[1:]
    result = run_cli(["streams", "append", "--stream-dir", str(stream), "-"], env,
                     good + b"\n" + bomb + b"\n")  # fmt: skip
    assert result.returncode == 2
    assert one_line_error(result).startswith("error: line 2: ")
    with FileLog(stream, create=False) as log:
        assert log.count(0) == 10


def test_streams_append_from_a_closed_stdin_is_one_line(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    env = env_for(tmp_path / "data", redis_url, prefix)
    result = subprocess.run(
        [TRACKER, "streams", "append", "--stream-dir", str(tmp_path / "s"), "-"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
        preexec_fn=lambda: os.close(0),
    )  # fmt: skip
    assert result.returncode == 2
    assert "stdin" in one_line_error(result)


def test_a_poll_of_large_messages_is_bounded_by_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poll once read 10,000 messages whatever their size: a backlog of 1 MB messages
    took 6 GB per 3,000, and a worker that is OOM-killed reads the same backlog again."""
    from consumers import filestream

    monkeypatch.setattr(filestream, "READ_BYTES", 1 << 20, raising=False)
    stream = tmp_path / "stream"
    big = "x" * 100_000
    with filestream.open_stream_log(stream, create=True, fsync=False) as log:
        for n in range(60):  # one frame each, as from many producers
            filestream.append_messages(
                log, [[("s1", json.dumps({"offset": n, "b": big}).encode())]]
            )
    source = FileStream(stream, "c")
    try:
        positions: list[int] = []
        while len(positions) < 60:
            (chunk,) = source.poll(1.0)
            assert sum(len(m.value) for m in chunk.messages) <= (1 << 20) + 100_100
            positions.extend(m.position for m in chunk.messages)
            source.commit({0: positions[-1] + 1})
        assert positions == list(range(60))
    finally:
        source.close()
    assert json.loads((stream / "consumers" / "c.json").read_text())["next"] == 60


# -- handlers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        ("raise RuntimeError('no config')\n", "RuntimeError: no config"),
        ("def handle(:\n", "SyntaxError"),
    ],
)
def test_a_handler_module_that_fails_at_import_is_one_line(
    tmp_path: Path, redis_url: str, prefix: str, source: str, problem: str
) -> None:
    (tmp_path / "badhandler.py").write_text(source)
    env = env_for(tmp_path / "data", redis_url, prefix)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    stream = tmp_path / "stream"
    write_stream(stream, 10, 2)
    result = run_cli(["worker", "--stream-dir", str(stream), "--consumer", "c",
                      "--handler", "badhandler:handle"], env)  # fmt: skip
    assert result.returncode == 2
    error = one_line_error(result)
    assert "--handler" in error and problem in error, error
    assert not (stream / "consumers" / "c.json").exists()


class Abort(BaseException):
    """What some libraries raise to unwind (trio's Cancelled, gevent's Timeout)."""


def cancelled(message: Message) -> None:
    if message.offset == 1:
        raise asyncio.CancelledError


async def cancelled_async(message: Message) -> None:
    if message.offset == 1:
        raise asyncio.CancelledError


def aborted(message: Message) -> None:
    if message.offset == 1:
        raise Abort("unwound")


@pytest.mark.parametrize("handler", [cancelled, cancelled_async, aborted])
def test_a_handler_raising_a_base_exception_dead_letters_the_message(
    tmp_path: Path, opened: Tracker, handler: object
) -> None:
    """Such a message once crashed the worker, at every restart."""
    stream = tmp_path / "stream"
    append_raw(stream, [StreamRecord(b"s1", event(n)) for n in range(3)])
    worker = Worker(FileStream(stream, "c"), opened, "c", handler,  # type: ignore[arg-type]
                    flush_ms=10, report_every=0)  # fmt: skip
    with running(worker):
        wait_until(lambda: worker.stats.processed == 3, "every message")
    wait_until(lambda: recorded(opened, {"s1": 2}), "the offsets")
    ((_, headers),) = dead_letters(stream)
    assert headers["dlq.offset"] == "1" and headers["dlq.reason"].startswith("handler raised")


@pytest.mark.parametrize("exit_with", [SystemExit(3), KeyboardInterrupt()])
def test_a_handler_may_still_exit_or_interrupt(
    tmp_path: Path, opened: Tracker, exit_with: BaseException
) -> None:
    """sys.exit and KeyboardInterrupt are not dead letters: they end the worker, which
    flushes what it finished; the message in hand is read again."""
    stream = tmp_path / "stream"
    append_raw(stream, [StreamRecord(b"s1", event(n)) for n in range(3)])

    def handler(message: Message) -> None:
        if message.offset == 1:
            raise exit_with

    worker = Worker(FileStream(stream, "c"), opened, "c", handler, flush_ms=10, report_every=0)
    with pytest.raises(type(exit_with)):
        worker.run()
    worker.stream.close()
    assert not (stream / "dlq").exists()
    assert not (stream / "consumers" / "c.json").exists()


def test_a_handler_mutating_the_message_changes_nothing_recorded(
    tmp_path: Path, opened: Tracker
) -> None:
    """The offset recorded is the one read: a handler that changed ``message.offset`` or
    ``session_id`` once made every flush fail, and the worker die at every restart."""
    stream = tmp_path / "stream"
    write_stream(stream, 100, 5)

    def handler(message: Message) -> None:
        message.offset = 2**70
        message.session_id = "not a session id!"

    worker = Worker(FileStream(stream, "c"), opened, "c", handler, flush_ms=10, report_every=0)
    with running(worker):
        wait_until(lambda: worker.stats.processed == 100, "every message")
    assert worker.stats.dead_lettered == 0
    assert json.loads((stream / "consumers" / "c.json").read_text())["next"] == 100
    wait_until(lambda: recorded(opened, heads(100, 5)), "the offsets")


# -- directories that are not streams ------------------------------------------------------


def test_the_tracker_event_log_is_never_taken_for_a_stream(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """``--stream-dir`` or ``--dlq`` naming the tracker's own log once appended stream
    records to it: every later tracker command failed with a traceback."""
    env = env_for(tmp_path / "data", redis_url, prefix)
    created = run_cli(
        ["sessions", "create", "--id", "s1", "--agent-id", "a", "--user-id", "u"], env
    )
    assert created.returncode == 0
    event_log = tmp_path / "data" / "log"
    with FileLog(event_log, create=False) as log:
        before = log.count(0)
    stream = tmp_path / "stream"
    write_stream(stream, 10, 2)
    attempts = [
        ["streams", "append", "--stream-dir", str(event_log), "--generate", "5"],
        ["worker", "--stream-dir", str(event_log), "--consumer", "c"],
        ["worker", "--stream-dir", str(stream), "--consumer", "c", "--dlq", str(event_log)],
        ["worker", "--stream-dir", str(stream), "--consumer", "c", "--dlq", str(stream)],
        ["worker", "--stream-dir", str(stream), "--consumer", "c", "--dlq", str(stream / ".")],
        ["worker", "--stream-dir", str(stream), "--consumer", "c", "--dlq", str(stream / "LOCK")],
    ]
    for args in attempts:
        result = run_cli(args, env)
        assert result.returncode == 2, (args, result.stderr)
        one_line_error(result)
    with FileLog(event_log, create=False) as log:
        assert log.count(0) == before
    assert not (event_log / "consumers").exists()
    assert run_cli(["verify"], env).returncode == 0
    assert run_cli(["sessions", "show", "s1"], env).returncode == 0


# -- position files ------------------------------------------------------------------------


def test_position_files_that_do_not_fit_the_stream_are_refused(tmp_path: Path) -> None:
    """A position that points past the stream (an older copy of it, a hand edit) once
    made the worker skip every message appended up to it, silently."""
    stream = tmp_path / "stream"
    write_stream(stream, 100, 10)
    write_stream(stream, 50, 10)  # a second frame
    path = stream / "consumers" / "c.json"
    with FileLog(stream, create=False) as log:
        log_id = log.log_id
    good = {"log_id": log_id, "frame": 0, "index": 99, "next": 100}
    bad: list[object] = [
        [], None, 5, "text",
        {**good, "frame": 2},  # past the end
        {**good, "frame": 10**20},
        {**good, "index": 100},  # past the first frame's records
        {**good, "next": 77},  # another ordinal than the frame and index say
        {**good, "frame": True},
        {**good, "index": -1},
    ]  # fmt: skip
    path.parent.mkdir(exist_ok=True)
    for saved in bad:
        path.write_text(json.dumps(saved))
        with pytest.raises(InvalidInputError, match=r"c\.json"):
            FileStream(stream, "c")
    path.write_text(json.dumps(good))
    opened = FileStream(stream, "c")  # the refused opens left no lock behind
    try:
        ((chunk),) = opened.poll(1.0)
        assert [m.position for m in chunk.messages] == list(range(100, 150))
    finally:
        opened.close()


# -- full disks ----------------------------------------------------------------------------


def test_a_position_that_cannot_be_written_is_one_clear_error(
    tmp_path: Path, opened: Tracker
) -> None:
    """ENOSPC while saving a position (here: the temporary file is /dev/full) once
    raised a bare OSError and left the temporary file behind; the position stays behind
    the offsets."""
    stream = tmp_path / "stream"
    write_stream(stream, 20, 2)
    source = FileStream(stream, "c")
    try:
        worker = Worker(source, opened, "c", flush_ms=60_000, report_every=0)
        for chunk in source.poll(1.0):
            worker._handle_chunk(chunk)
        tmp = stream / "consumers" / f"c.json.{os.getpid()}.tmp"
        tmp.symlink_to("/dev/full")
        with pytest.raises(LogError, match="no space left"):
            worker.flush()
        assert not tmp.exists() and not tmp.is_symlink()
        assert not (stream / "consumers" / "c.json").exists()
        wait_until(lambda: recorded(opened, heads(20, 2)), "the offsets")
    finally:
        source.close()


def test_a_consumer_lock_that_cannot_take_the_pid_still_locks(tmp_path: Path) -> None:
    """The pid in the lock file is for messages only: a full disk once made it fatal."""
    stream = tmp_path / "stream"
    write_stream(stream, 5, 1)
    (stream / "consumers").mkdir()
    (stream / "consumers" / "c.lock").symlink_to("/dev/full")
    first = FileStream(stream, "c")
    try:
        with pytest.raises(LogError, match="already reading"):
            FileStream(stream, "c")
    finally:
        first.close()


# -- stopping ------------------------------------------------------------------------------


def test_the_final_flush_retries_while_the_log_is_busy(
    tmp_path: Path, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop whose flush met a locked log once returned at once, having flushed nothing,
    while saying it would retry."""
    settings = Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix,
                        fsync=False, lock_timeout=0.2)  # fmt: skip
    stream = tmp_path / "stream"
    write_stream(stream, 100, 10)
    with Tracker(settings) as tracker:
        source = FileStream(stream, "c")
        worker = Worker(source, tracker, "c", flush_ms=60_000, report_every=0)
        for chunk in source.poll(1.0):
            worker._handle_chunk(chunk)
        with lock_held(tmp_path / "data" / "log" / "LOCK") as holder:
            worker.stop()
            with caplog.at_level(logging.WARNING, logger="consumers.worker"):
                thread = threading.Thread(target=worker.run)
                thread.start()
                wait_until(lambda: "flush failed" in caplog.text, "a failed flush")
                stop_process(holder)
                thread.join(timeout=60)
        source.close()
        assert json.loads((stream / "consumers" / "c.json").read_text())["next"] == 100
