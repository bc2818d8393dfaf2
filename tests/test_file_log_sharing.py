"""The file log shared by threads and processes: the lock per append, all-or-nothing appends."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.services import read_only_tree, stop_process, without_write_access
from tracker.errors import LogLockedError, LogNotFoundError
from tracker.events import Position
from tracker.logs.file import FileLog
from tracker.logs.frames import MORE, encode_records, frame_of


def records(tag: str, count: int) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(count)]


def read_all(log: FileLog) -> list[bytes]:
    out: list[bytes] = []
    after: Position | None = None
    while batches := log.read(0, after, 10_000):
        out.extend(r for b in batches for r in b.records)
        after = batches[-1].last
    return out


def run_python(code: str, *, capture: bool = False) -> subprocess.Popen[bytes]:
    output = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        start_new_session=True,
        stdout=output,
        stderr=output,
    )


def test_a_log_held_open_by_another_process_does_not_block_appends(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    FileLog(directory).close()
    ready = tmp_path / "ready"
    holder = run_python(
        f"""
        import pathlib, time
        from tracker.logs.file import FileLog
        log = FileLog(pathlib.Path({str(directory)!r}))
        log.append(0, [b"held"])
        pathlib.Path({str(ready)!r}).write_text("ok")
        time.sleep(60)
        """
    )
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with FileLog(directory, lock_timeout=1) as log:
            log.append(0, [b"mine"])
            assert read_all(log) == [b"held", b"mine"]
    finally:
        stop_process(holder)


def test_an_append_waits_for_the_lock_then_names_its_holder(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, [b"a"])
    fd = os.open(directory / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"4242        ", 0)
        with FileLog(directory, lock_timeout=0.3) as log:
            assert read_all(log) == [b"a"], "reads need no lock"
            started = time.monotonic()
            with pytest.raises(LogLockedError, match="pid 4242") as info:
                log.append(0, [b"b"])
            assert 0.3 <= time.monotonic() - started < 5
            assert info.value.retriable
    finally:
        os.close(fd)
    with FileLog(directory, lock_timeout=0.3) as log:
        log.append(0, [b"b"])
        assert read_all(log) == [b"a", b"b"]


def test_processes_appending_at_once_interleave_whole_appends(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    FileLog(directory, segment_bytes=4096).close()
    writers = [
        run_python(
            f"""
            import pathlib
            from tracker.logs.file import FileLog
            log = FileLog(pathlib.Path({str(directory)!r}), fsync=False, segment_bytes=4096)
            for i in range(200):
                log.append(0, [f"w{w}-{{i}}-{{k}}".encode() for k in range(i % 5 + 1)])
            """,
            capture=True,
        )
        for w in range(4)
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err.decode()
    with FileLog(directory, segment_bytes=4096) as log:
        assert log.repaired is None
        got = read_all(log)
        batches = log.read(0, None, 10**9)
    assert len(got) == 4 * sum(i % 5 + 1 for i in range(200))
    assert [b.offset for b in batches] == list(range(len(batches))), "frame numbers contiguous"
    for batch in batches:  # each append's records stayed together, in order
        tags = {r.rsplit(b"-", 1)[0] for r in batch.records}
        assert len(tags) == 1
    for w in range(4):
        mine = [r for r in got if r.startswith(f"w{w}-".encode())]
        assert mine == [f"w{w}-{i}-{k}".encode() for i in range(200) for k in range(i % 5 + 1)]


def test_eight_threads_appending_through_one_log(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    errors: list[BaseException] = []
    with FileLog(directory, fsync=False, segment_bytes=8192) as log:

        def work(t: int) -> None:
            try:
                for i in range(150):
                    log.append(0, [f"t{t}-{i}-{k}".encode() for k in range(3)])
                    if i % 10 == 0:
                        read_all(log)
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        got = read_all(log)
    assert len(got) == 8 * 150 * 3
    with FileLog(directory, segment_bytes=8192) as reopened:
        assert reopened.repaired is None
        assert read_all(reopened) == got


def failing_after(chunks: Sequence[list[bytes]], error: BaseException) -> Iterator[list[bytes]]:
    yield from chunks
    raise error


@pytest.mark.parametrize("error", [ValueError("bad line 7"), KeyboardInterrupt()])
def test_a_streamed_append_that_fails_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    directory = tmp_path / "log"
    with FileLog(directory, max_frame_records=4) as log:
        log.append(0, [b"before"])
        size = sum(p.stat().st_size for p in directory.glob("*.seg"))
        with pytest.raises(type(error)):
            log.append_stream(0, failing_after([records("x", 5)] * 4, error))
        assert read_all(log) == [b"before"]
        assert sum(p.stat().st_size for p in directory.glob("*.seg")) == size
        log.append(0, [b"after"])
        assert read_all(log) == [b"before", b"after"]


def test_a_streamed_append_is_split_into_frames_that_count_as_one(tmp_path: Path) -> None:
    with FileLog(tmp_path / "log", max_frame_records=4) as log:
        appended = log.append_stream(0, iter([records("x", 3), records("y", 7)]))
        assert appended.count == 10
        assert appended.after is None and appended.after_known
        assert appended.last == Position(0, 2, 1)
        assert read_all(log) == records("x", 3) + records("y", 7)


def test_an_import_killed_while_streaming_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    """The input is spooled before the lock is taken: a kill -9 meanwhile touches nothing."""
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, [b"before"])
    started = tmp_path / "started"
    writer = run_python(
        f"""
        import pathlib, time
        from tracker.logs.file import FileLog
        log = FileLog(pathlib.Path({str(directory)!r}), max_frame_records=10)
        def chunks():
            for i in range(100):
                yield [b"%d" % i] * 10
                if i == 50:
                    pathlib.Path({str(started)!r}).write_text("ok")
                    time.sleep(60)
        log.append_stream(0, chunks())
        """
    )
    try:
        deadline = time.monotonic() + 30
        while not started.exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        with FileLog(directory, lock_timeout=0.2) as other:
            other.append(0, [b"meanwhile"])  # the lock is free while the input streams in
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    finally:
        stop_process(writer)
    with FileLog(directory) as log:
        assert log.repaired is None
        assert read_all(log) == [b"before", b"meanwhile"]
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["00000000000000000000.seg", "LOCK", "log.json"], "no spool left behind"


def test_an_append_cut_short_between_its_frames_is_never_read_and_is_cut(tmp_path: Path) -> None:
    """What kill -9 between two frames of one append leaves: frames marked "more follows"."""
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, [b"before"])
    (segment,) = directory.glob("*.seg")
    with open(segment, "ab") as file:
        file.write(frame_of(1, encode_records([b"x", b"y"]), 2, MORE))
        file.write(frame_of(2, encode_records([b"z"]), 1, MORE))
    with FileLog(directory, lock_timeout=0.2) as log:
        log.append(0, [b"held"])  # this process's index is not fooled either
    with FileLog(directory) as log:
        assert read_all(log) == [b"before", b"held"]
        assert log.append(0, [b"after"]).count == 1
        assert read_all(log) == [b"before", b"held", b"after"]


def test_a_reader_skips_an_unfinished_append_that_a_writer_then_cuts(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, [b"before"])
        (segment,) = directory.glob("*.seg")
        with open(segment, "ab") as file:
            file.write(frame_of(1, encode_records([b"x"]), 1, MORE))
        assert read_all(log) == [b"before"], "never indexed"
        log.append(0, [b"after"])
        assert log.repaired is not None and "unfinished append of 1 frames" in log.repaired
        assert read_all(log) == [b"before", b"after"]


@pytest.mark.parametrize("where", ["spooling", "appending"])
def test_a_write_that_fails_midway_appends_nothing(tmp_path: Path, where: str) -> None:
    """A full disk (here: the file size limit) fails the append as a whole, with a clear
    error: while the input is spooled, or while its frames go into the log."""
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, [b"x" * 100] * 30_000)
    size = sum(p.stat().st_size for p in directory.glob("*.seg"))
    limit = 2_000_000 if where == "spooling" else size + 1_000_000
    code = f"""
        import pathlib, resource, signal
        from tracker.errors import LogError
        from tracker.logs.file import FileLog
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        log = FileLog(pathlib.Path({str(directory)!r}), max_frame_records=1000)
        try:
            log.append_stream(0, ([b"y" * 100] * 1000 for _ in range(25)))
        except LogError as error:
            print(error)
        """
    writer = run_python(code, capture=True)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err.decode()
    assert "nothing was appended" in out.decode()
    assert sum(p.stat().st_size for p in directory.glob("*.seg")) == size
    with FileLog(directory) as log:
        assert log.repaired is None
        assert log.count(0) == 30_000


def test_a_missing_log_is_not_created_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(LogNotFoundError, match="no event log"):
        FileLog(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()


def test_a_read_only_log_reads_and_refuses_appends(tmp_path: Path) -> None:
    """A backup this process may not write to: reads work, appends are refused clearly."""
    directory = tmp_path / "log"
    with FileLog(directory) as log:
        log.append(0, records("r", 3))
    code = f"""
        import pathlib
        from tracker.errors import LogError
        from tracker.logs.file import FileLog
        log = FileLog(pathlib.Path({str(directory)!r}), create=False)
        print(log.read_only, len(log.read(0, None, 100)[0].records))
        try:
            log.append(0, [b"x"])
        except LogError as error:
            print(error)
        """
    files = sorted(directory.iterdir())
    with read_only_tree(directory):
        argv = without_write_access([sys.executable, "-c", textwrap.dedent(code)])
        result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "True 3"
    assert "read-only" in second
    assert sorted(directory.iterdir()) == files, "nothing was created"
