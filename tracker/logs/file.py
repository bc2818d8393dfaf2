"""The embedded event log: segment files of CRC-framed batches in one directory.

Layout of ``<dir>``::

    LOCK                        flock'd for the length of one append; holds the pid
    log.json                    {"log_id": ..., "format": 1}
    00000000000000000000.seg    frames; the name is the number of its first frame

A frame is a 24-byte header (marker, CRC32C, payload length, frame number, record count)
and a msgpack array of the records; the CRC covers the header's tail and the payload.
An append writes one or more frames and one ``fsync``: every frame but the last is marked
``TRKG`` ("more of this append follows"), the last ``TRKF``. A group counts only once its
``TRKF`` frame is there, so an append is all or nothing: readers never index an
incomplete group, and the next writer (or an open that can take the lock) cuts it off
like a torn frame. Damage followed by good frames is never skipped, it raises
:class:`~tracker.errors.LogCorruptError`.

Any number of processes and threads may append: the ``flock`` is taken per append, and
each process refreshes its index of the frames from the file sizes before it reads.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import tempfile
import threading
import time
import uuid
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import msgspec
from crc32c import crc32c

from tracker.errors import (
    LogCorruptError,
    LogError,
    LogFullError,
    LogLockedError,
    LogNotFoundError,
)
from tracker.events import Position
from tracker.logs import Appended, Batch
from tracker.logs.frames import (
    HEADER,
    MAGIC,
    MORE,
    SEGMENT_SUFFIX,
    Scan,
    Segment,
    decode_records,
    encode_records,
    frame_of,
    scan_segment,
)

log = logging.getLogger(__name__)

FORMAT = 1


class FileLog:
    """A single-partition log in a directory; see the module docstring for the format.

    ``create=False`` refuses a directory that holds no log. A directory this process may
    not write to (a backup) opens read-only: reads work, appends raise.
    """

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        segment_bytes: int = 64 << 20,
        max_frame_records: int = 65_536,
        lock_timeout: float = 30.0,
        create: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.max_frame_records = max_frame_records
        self.lock_timeout = lock_timeout
        self.repaired: str | None = None
        self._segments: list[Segment] = []
        self._bases: list[int] = []
        self._records = 0
        self._write_fd: int | None = None
        self._write_base = -1
        self._lock_fd: int | None = None
        self._closed = False
        self._mutex = threading.RLock()
        identity = self.directory / "log.json"
        if not identity.exists():
            if not create:
                raise LogNotFoundError(
                    f"no event log in {self.directory}: check --data-dir (TRACKER_DATA_DIR), "
                    "or write something first"
                )
            self._create(identity)
        self.read_only = not os.access(self.directory, os.W_OK)
        self._log_id = self._load_identity(identity)
        self._open_segments()

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def partitions(self) -> int:
        return 1

    # -- opening -----------------------------------------------------------------------

    def _create(self, identity: Path) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = identity.with_name(f"log.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"log_id": uuid.uuid4().hex, "format": FORMAT}))
            try:
                os.link(tmp, identity)  # loses to a racing creator instead of replacing it
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise self._write_error(self.directory, exc) from exc
            raise LogError(f"cannot create the event log in {self.directory}: {exc}") from exc

    def _load_identity(self, path: Path) -> str:
        try:
            return str(json.loads(path.read_text())["log_id"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LogCorruptError(f"{path} is unreadable ({exc}); restore it") from exc
        except OSError as exc:
            raise LogError(f"cannot read {path}: {exc}") from exc

    def _open_segments(self) -> None:
        paths = sorted(self.directory.glob("*" + SEGMENT_SUFFIX))
        expected = 0
        for i, path in enumerate(paths):
            try:
                base = int(path.stem)
            except ValueError:
                raise LogCorruptError(f"{path}: not a segment name") from None
            if base != expected:
                raise LogCorruptError(
                    f"{path}: starts at frame {base} but frame {expected} was expected at "
                    "byte 0 (a segment is missing); restore it from a backup "
                    "(tracker log check lists the damage)"
                )
            segment = Segment(path, base)
            last = i == len(paths) - 1
            scan = self._index(segment, crc=last)
            if scan.problem is not None and not last:
                # without CRCs a bad length is followed; with them the damage is placed
                scan, _ = scan_segment(path, 0, base, crc=True)
                raise LogCorruptError(
                    f"{path}: {scan.problem} at byte {scan.stopped_at}, in a sealed segment; "
                    "the log is damaged in the middle, restore this segment from a backup "
                    "(tracker log check lists the damage)"
                )
            self._add_segment(segment)
            expected = base + segment.frames
        if not self._segments:
            if self.read_only:
                return
            with self._locked(timeout=self.lock_timeout):
                if not self._segments:
                    self._new_segment(0)
            return
        if not self.read_only:
            self._repair_if_idle()

    def _add_segment(self, segment: Segment) -> None:
        self._segments.append(segment)
        self._bases.append(segment.base)
        self._records += sum(segment.counts)

    def _index(self, segment: Segment, *, crc: bool) -> Scan:
        """Extend a segment's index with the complete groups written since it was last seen."""
        if segment.size and os.fstat(segment.fd()).st_size == segment.size:
            return Scan(segment.size)  # nothing new: the common case, one fstat
        scan, _ = scan_segment(segment.path, segment.size, segment.base + segment.frames, crc=crc)
        segment.positions.extend(scan.positions)
        segment.counts.extend(scan.counts)
        segment.size = scan.end
        return scan

    def _repair_if_idle(self) -> None:
        """Cut a torn tail at open if no append is under way (the lock is free)."""
        with self._locked(timeout=None) as got:
            if got:
                self._refresh(repair=True)

    # -- the lock and the index ---------------------------------------------------------

    @contextmanager
    def _locked(self, *, timeout: float | None) -> Iterator[bool]:
        """Hold the cross-process append lock; ``timeout=None`` tries once (yields False)."""
        if self.read_only:
            raise LogError(f"the event log in {self.directory} is read-only here")
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise self._write_error(self.directory / "LOCK", exc) from exc
        fd = self._lock_fd
        deadline = time.monotonic() + (timeout or 0)
        delay = 0.0005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if timeout is None:
                    yield False
                    return
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    raise LogLockedError(
                        f"the event log in {self.directory} is being appended to by "
                        f"another process (pid {holder}) for over {timeout:g} s; "
                        "try again, or stop that process"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            os.pwrite(fd, f"{os.getpid():<12}".encode(), 0)
        except OSError as exc:  # only who holds it is lost: say why, and let go
            fcntl.flock(fd, fcntl.LOCK_UN)
            raise self._write_error(self.directory / "LOCK", exc) from exc
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _refresh(self, *, repair: bool = False) -> None:
        """Index what other processes appended; with ``repair`` (lock held) cut a bad tail."""
        tail = self._segments[-1]
        while True:
            before = tail.frames
            scan = self._index(tail, crc=repair)
            self._records += sum(tail.counts[before:])
            follower = self.directory / f"{tail.base + tail.frames:020d}{SEGMENT_SUFFIX}"
            if not (tail.frames and follower.exists()):
                break
            tail = Segment(follower, tail.base + tail.frames)
            self._add_segment(tail)
        if repair:
            size = os.fstat(tail.fd()).st_size
            if size > tail.size:
                self._cut(tail, scan.problem or "trailing bytes", size)

    def _cut(self, tail: Segment, problem: str, size: int) -> None:
        self.repaired = (
            f"{tail.path}: cut {size - tail.size} bytes at byte {tail.size} "
            f"(frame {tail.base + tail.frames}: {problem}); they were never acknowledged"
        )
        log.warning("event log repaired: %s", self.repaired)
        with open(tail.path, "r+b") as file:
            file.truncate(tail.size)
            os.fsync(file.fileno())

    def _new_segment(self, base: int) -> None:
        path = self.directory / f"{base:020d}{SEGMENT_SUFFIX}"
        try:
            with open(path, "xb"):
                pass
        except FileExistsError:
            pass
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._add_segment(Segment(path, base))

    # -- appends -------------------------------------------------------------------------

    @contextmanager
    def appends_held(self) -> Iterator[None]:
        """No process appends until the block ends (``replay`` promotes a generation in one)."""
        with self._mutex, self._locked(timeout=self.lock_timeout):
            yield

    def append(self, partition: int, records: Sequence[bytes]) -> Appended:
        step = self.max_frame_records
        chunks = [list(records[i : i + step]) for i in range(0, len(records), step)]
        payloads = [(encode_records(chunk), len(chunk)) for chunk in chunks]
        appended = self._append(partition, payloads, len(payloads))
        first = 0 if appended.after is None else appended.after.offset + 1
        batches = [Batch(0, first + i, 0, chunk) for i, chunk in enumerate(chunks)]
        return msgspec.structs.replace(appended, batches=batches)

    def append_stream(self, partition: int, chunks: Iterable[Sequence[bytes]]) -> Appended:
        """Spool the encoded frames to an unnamed temporary file first, then append them.

        The lock is taken only once the input is exhausted (and valid): a slow or paused
        producer (``events import -`` from a pipe) never holds up other writers, and the
        lock is held only for a copy at disk speed. The spool lives beside the log, so a
        full disk shows before the log is touched; it vanishes with the process.
        """
        self._check_partition(partition)
        try:
            spool = tempfile.TemporaryFile(  # noqa: SIM115 - closed by the with below
                dir=self.directory, prefix="append-", buffering=0
            )
        except OSError as exc:
            raise self._write_error(self.directory, exc) from exc
        with spool:
            frames = 0
            try:
                for chunk in self._frames_of(chunks):
                    payload = encode_records(chunk)
                    _write_all(spool, _SPOOLED.pack(len(payload), len(chunk)) + payload)
                    frames += 1
                spool.flush()
            except OSError as exc:
                raise self._write_error(self.directory, exc) from exc
            spool.seek(0)
            return self._append(partition, _unspool(spool, frames), frames)

    def _append(
        self, partition: int, payloads: Iterable[tuple[bytes, int]], frames: int
    ) -> Appended:
        self._check_partition(partition)
        with self._mutex:
            self._check_open()
            with self._locked(timeout=self.lock_timeout):
                self._refresh(repair=True)
                if self._segments[-1].size >= self.segment_bytes:
                    try:
                        self._new_segment(self._next_frame)
                    except OSError as exc:
                        raise self._write_error(self.directory, exc) from exc
                tail = self._segments[-1]
                after = self._end()
                if not frames:
                    return Appended(partition, 0, after, after, True)
                start_frames, start_size, start_records = tail.frames, tail.size, self._records
                try:
                    fd = self._writer(tail)
                    for number, (payload, count) in enumerate(payloads, start=1):
                        self._write(fd, tail, payload, count, MAGIC if number == frames else MORE)
                    if self.fsync:
                        os.fsync(fd)
                except BaseException as exc:
                    self._undo(tail, start_frames, start_size, start_records)
                    if isinstance(exc, OSError):
                        raise self._write_error(tail.path, exc) from exc
                    raise
                count = self._records - start_records
                return Appended(partition, count, self._end(), after, True)

    def _frames_of(self, chunks: Iterable[Sequence[bytes]]) -> Iterator[list[bytes]]:
        """Re-cut ``chunks`` into frames of at most ``max_frame_records`` records."""
        step = self.max_frame_records
        buffer: list[bytes] = []
        for chunk in chunks:
            buffer.extend(chunk)
            while len(buffer) >= step:
                yield buffer[:step]
                buffer = buffer[step:]
        if buffer:
            yield buffer

    def _writer(self, tail: Segment) -> int:
        if self._write_base != tail.base:
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None
            self._write_fd = os.open(tail.path, os.O_WRONLY | os.O_APPEND)
            self._write_base = tail.base
        assert self._write_fd is not None
        return self._write_fd

    def _write(self, fd: int, tail: Segment, payload: bytes, count: int, marker: bytes) -> None:
        frame = memoryview(frame_of(tail.base + tail.frames, payload, count, marker))
        while frame:  # a short write is retried: a full disk then says ENOSPC itself
            written = os.write(fd, frame)
            frame = frame[written:]
        tail.positions.append(tail.size)
        tail.counts.append(count)
        tail.size += HEADER.size + len(payload)
        self._records += count

    def _undo(self, tail: Segment, frames: int, size: int, records: int) -> None:
        """Forget and cut the frames of a failed append: nothing of it stays."""
        del tail.positions[frames:]
        del tail.counts[frames:]
        tail.size, self._records = size, records
        try:
            os.truncate(tail.path, size)
        except OSError as exc:  # the next writer cuts the unfinished group instead
            log.warning("could not cut a failed append from %s: %s", tail.path, exc)

    def _write_error(self, path: Path, exc: OSError) -> LogError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return LogFullError(
                f"no space left for {path} ({exc.strerror}); free some and try again, "
                "nothing was appended"
            )
        if exc.errno == errno.EFBIG:
            return LogFullError(
                f"{path} would pass the file size limit ({exc.strerror}: ulimit -f, or the "
                "filesystem's); raise it and try again, nothing was appended"
            )
        return LogError(f"cannot append to {path}: {exc}; nothing was appended")

    @property
    def _next_frame(self) -> int:
        tail = self._segments[-1]
        return tail.base + tail.frames

    # -- reads ---------------------------------------------------------------------------

    def read(self, partition: int, after: Position | None, max_records: int) -> list[Batch]:
        self._check_partition(partition)
        number, index = (0, 0) if after is None else (after.offset, after.index + 1)
        with self._mutex:
            self._check_open()
            self._refresh_unlocked()
            end = self._next_frame if self._segments else 0
            plan: list[tuple[Segment, int, int, int, int]] = []
            total = 0
            while total < max_records and number < end:
                segment = self._segments[bisect_right(self._bases, number) - 1]
                slot = number - segment.base
                # a count of 0 is never written: read (and fail) the frame, never skip it
                if index < segment.counts[slot] or not segment.counts[slot]:
                    plan.append((segment, segment.fd(), slot, number, index))
                    total += segment.counts[slot] - index
                number, index = number + 1, 0
        batches = []
        for segment, fd, slot, frame, first in plan:
            records = self._read_frame(segment, fd, slot, frame)
            if records:
                batches.append(Batch(0, frame, first, records[first:] if first else records))
        return batches

    def _refresh_unlocked(self) -> None:
        if self._segments:
            self._refresh()
        elif not self.read_only or any(self.directory.glob("*" + SEGMENT_SUFFIX)):
            self._open_segments()

    def _read_frame(self, segment: Segment, fd: int, slot: int, number: int) -> list[bytes]:
        pos = segment.positions[slot]
        header = os.pread(fd, HEADER.size, pos)
        _, crc, length, _, _ = HEADER.unpack(header)
        payload = os.pread(fd, length, pos + HEADER.size)
        if len(payload) != length or crc32c(payload, crc32c(header[8:])) != crc:
            raise LogCorruptError(
                f"{segment.path}: frame {number} at byte {pos} fails its CRC check; "
                "the log is damaged, restore this segment from a backup "
                "(tracker log check lists the damage)"
            )
        return decode_records(payload)

    def end(self, partition: int) -> Position | None:
        self._check_partition(partition)
        with self._mutex:
            self._check_open()
            self._refresh_unlocked()
            return self._end()

    def _end(self) -> Position | None:
        for segment in reversed(self._segments):
            if segment.frames:
                return Position(0, segment.base + segment.frames - 1, segment.counts[-1] - 1)
        return None

    def count(self, partition: int, after: Position | None = None) -> int:
        self._check_partition(partition)
        with self._mutex:
            self._check_open()
            self._refresh_unlocked()
            if after is None:
                return self._records
            done = 0
            for segment in self._segments:
                if after.offset >= segment.base + segment.frames:
                    done += sum(segment.counts)
                else:
                    slot = after.offset - segment.base
                    done += sum(segment.counts[:slot]) + after.index + 1
                    break
            return self._records - done

    def _check_partition(self, partition: int) -> None:
        if partition != 0:
            raise LogError(f"the file log has one partition (0), not {partition}")

    def _check_open(self) -> None:
        if self._closed:
            raise LogError(f"the event log in {self.directory} is closed")

    def close(self) -> None:
        with self._mutex:
            self._closed = True
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            for segment in self._segments:
                segment.close()
            if self._write_fd is not None:
                os.close(self._write_fd)
                self._write_fd = None

    def __enter__(self) -> FileLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_SPOOLED = struct.Struct("<II")
"""A spooled frame: payload length and record count, then the payload."""


def _write_all(file: IO[bytes], data: bytes) -> None:
    """Write every byte: an unbuffered write may be short (a disk filling up), and only
    the next one raises."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:  # nothing written and no error: never spin on it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[written:]


def _unspool(spool: IO[bytes], frames: int) -> Iterator[tuple[bytes, int]]:
    for _ in range(frames):
        header = spool.read(_SPOOLED.size)
        length, count = _SPOOLED.unpack(header) if len(header) == _SPOOLED.size else (-1, 0)
        payload = spool.read(length) if length >= 0 else b""
        if len(payload) != length:
            raise LogError("the spooled append was cut short; nothing was appended")
        yield payload, count
