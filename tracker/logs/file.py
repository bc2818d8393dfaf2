"""The embedded event log: segment files of CRC-framed batches in one directory.

Layout of ``<dir>``::

    LOCK                        flock'd by the one process allowed to write
    log.json                    {"log_id": ..., "format": 1}
    00000000000000000000.seg    frames; the name is the number of its first frame

A frame is one appended batch: a 24-byte header (magic, CRC32C, payload length, frame
number, record count) and a msgpack array of the records. The CRC covers the header's
tail and the payload. One ``fsync`` per append (not per record) makes appends cheap.
On open, the last segment is checked frame by frame: a torn or corrupt frame at the
very end (a crash mid-write) is reported and cut off; damage followed by good frames is
never skipped, it raises :class:`~tracker.errors.LogCorruptError`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import struct
import time
import uuid
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

import msgspec
from crc32c import crc32c

from tracker.errors import LogCorruptError, LogError, LogLockedError
from tracker.events import Position
from tracker.logs import Batch

log = logging.getLogger(__name__)

MAGIC = b"TRKF"
HEADER = struct.Struct("<4sIIQI")
SEGMENT_SUFFIX = ".seg"
FORMAT = 1

_encode_records = msgspec.msgpack.Encoder().encode
_decode_records = msgspec.msgpack.Decoder(list[bytes]).decode


class _Segment:
    """One segment file and the in-memory index of its frames."""

    __slots__ = ("base", "counts", "path", "positions", "read_fd", "size")

    def __init__(self, path: Path, base: int) -> None:
        self.path = path
        self.base = base
        self.positions = array("Q")
        self.counts = array("I")
        self.size = 0
        self.read_fd: int | None = None

    @property
    def frames(self) -> int:
        return len(self.positions)

    def fd(self) -> int:
        if self.read_fd is None:
            self.read_fd = os.open(self.path, os.O_RDONLY)
        return self.read_fd

    def close(self) -> None:
        if self.read_fd is not None:
            os.close(self.read_fd)
            self.read_fd = None


def _frame(number: int, records: Sequence[bytes]) -> bytes:
    payload = _encode_records(records)
    tail = HEADER.pack(MAGIC, 0, len(payload), number, len(records))[8:]
    crc = crc32c(payload, crc32c(tail))
    return MAGIC + struct.pack("<I", crc) + tail + payload


def _check_frame(data: bytes | mmap.mmap, pos: int, size: int, expected: int) -> str | int:
    """Return the frame's record count, or a description of what is wrong with it."""
    if size - pos < HEADER.size:
        return f"a torn header ({size - pos} of {HEADER.size} bytes)"
    magic, crc, length, number, count = HEADER.unpack_from(data, pos)
    if magic != MAGIC:
        return "a bad frame marker"
    end = pos + HEADER.size + length
    if end > size:
        return f"a torn frame ({size - pos} of {end - pos} bytes)"
    view = memoryview(data)[pos + 8 : end]
    try:
        if crc32c(view) != crc:
            return "a CRC mismatch"
    finally:
        view.release()
    if number != expected:
        return f"frame number {number} where {expected} was expected"
    return int(count)


class FileLog:
    """A single-partition log in a directory; see the module docstring for the format."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        segment_bytes: int = 64 << 20,
        max_frame_records: int = 65_536,
        lock_timeout: float = 10.0,
    ) -> None:
        self.directory = Path(directory)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.max_frame_records = max_frame_records
        self.repaired: str | None = None
        self._segments: list[_Segment] = []
        self._bases: list[int] = []
        self._write_fd: int | None = None
        self._records = 0
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LogError(f"cannot create the log directory {self.directory}: {exc}") from exc
        self._lock_fd = self._lock(lock_timeout)
        try:
            self._log_id = self._load_identity()
            self._open_segments()
        except BaseException:
            self.close()
            raise

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def partitions(self) -> int:
        return 1

    def _lock(self, timeout: float) -> int:
        path = self.directory / "LOCK"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                    os.close(fd)
                    raise LogLockedError(
                        f"the log {self.directory} is in use by another process (pid {holder}); "
                        "wait for it to finish or stop it"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    def _load_identity(self) -> str:
        path = self.directory / "log.json"
        if path.exists():
            try:
                meta = json.loads(path.read_text())
                return str(meta["log_id"])
            except (ValueError, KeyError) as exc:
                raise LogCorruptError(f"{path} is unreadable ({exc}); restore it") from exc
        log_id = uuid.uuid4().hex
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"log_id": log_id, "format": FORMAT}))
        os.replace(tmp, path)
        return log_id

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
                    f"{path}: starts at frame {base} but frame {expected} was expected "
                    "(a segment is missing)"
                )
            segment = _Segment(path, base)
            self._scan(segment, last=i == len(paths) - 1)
            self._segments.append(segment)
            self._bases.append(base)
            expected = base + segment.frames
        if not self._segments:
            self._new_segment(0)
        self._records = sum(sum(s.counts) for s in self._segments)
        tail = self._segments[-1]
        self._write_fd = os.open(tail.path, os.O_WRONLY | os.O_APPEND)

    def _scan(self, segment: _Segment, *, last: bool) -> None:
        """Index a segment's frames; on the last one verify every CRC and repair a torn tail."""
        size = segment.path.stat().st_size
        if size == 0:
            return
        with (
            open(segment.path, "rb") as file,
            mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data,
        ):
            pos, number = 0, segment.base
            while pos < size:
                if last:
                    checked = _check_frame(data, pos, size, number)
                else:
                    checked = self._check_header(data, pos, size, number)
                if isinstance(checked, str):
                    if not last or self._good_frame_after(data, pos + 1, size):
                        raise LogCorruptError(
                            f"{segment.path}: {checked} at byte {pos} (frame {number}), "
                            "followed by more data; the log is damaged in the middle"
                        )
                    break
                _, _, length, _, _ = HEADER.unpack_from(data, pos)
                segment.positions.append(pos)
                segment.counts.append(checked)
                pos += HEADER.size + length
                number += 1
        if pos < size:
            self.repaired = (
                f"{segment.path}: cut a torn tail of {size - pos} bytes at byte {pos} "
                f"(frame {number}); it was never acknowledged"
            )
            log.warning("event log repaired: %s", self.repaired)
            with open(segment.path, "r+b") as repaired:
                repaired.truncate(pos)
                os.fsync(repaired.fileno())
            size = pos
        segment.size = size

    @staticmethod
    def _check_header(data: mmap.mmap, pos: int, size: int, expected: int) -> str | int:
        if size - pos < HEADER.size:
            return "a torn header"
        magic, _, length, number, count = HEADER.unpack_from(data, pos)
        if magic != MAGIC or number != expected or pos + HEADER.size + length > size:
            return "a damaged frame header"
        return int(count)

    @staticmethod
    def _good_frame_after(data: mmap.mmap, start: int, size: int) -> bool:
        pos = data.find(MAGIC, start)
        while pos != -1:
            _, _, _, number, _ = (
                HEADER.unpack_from(data, pos) if size - pos >= HEADER.size else (0,) * 5
            )
            if isinstance(_check_frame(data, pos, size, number), int):
                return True
            pos = data.find(MAGIC, pos + 1)
        return False

    def _new_segment(self, base: int) -> None:
        path = self.directory / f"{base:020d}{SEGMENT_SUFFIX}"
        with open(path, "xb"):
            pass
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._segments.append(_Segment(path, base))
        self._bases.append(base)

    @property
    def _next_frame(self) -> int:
        tail = self._segments[-1]
        return tail.base + tail.frames

    def append(self, partition: int, records: Sequence[bytes]) -> list[Batch]:
        self._check_partition(partition)
        if self._write_fd is None:
            raise LogError(f"the log {self.directory} is closed")
        batches: list[Batch] = []
        step = self.max_frame_records
        for start in range(0, len(records), step):
            chunk = list(records[start : start + step])
            if self._segments[-1].size >= self.segment_bytes:
                self._roll()
            batches.append(self._write_frame(chunk))
        if self.fsync and batches:
            os.fsync(self._write_fd)
        return batches

    def _write_frame(self, records: list[bytes]) -> Batch:
        assert self._write_fd is not None
        tail = self._segments[-1]
        number = tail.base + tail.frames
        frame = _frame(number, records)
        try:
            written = os.write(self._write_fd, frame)
            if written != len(frame):
                raise OSError(f"short write ({written} of {len(frame)} bytes)")
        except OSError as exc:
            os.ftruncate(self._write_fd, tail.size)
            raise LogError(f"cannot append to {tail.path}: {exc}") from exc
        tail.positions.append(tail.size)
        tail.counts.append(len(records))
        tail.size += len(frame)
        self._records += len(records)
        return Batch(0, number, 0, records)

    def _roll(self) -> None:
        assert self._write_fd is not None
        os.fsync(self._write_fd)
        os.close(self._write_fd)
        self._new_segment(self._next_frame)
        self._write_fd = os.open(self._segments[-1].path, os.O_WRONLY | os.O_APPEND)

    def read(self, partition: int, after: Position | None, max_records: int) -> list[Batch]:
        self._check_partition(partition)
        number, index = (0, 0) if after is None else (after.offset, after.index + 1)
        batches: list[Batch] = []
        total = 0
        end = self._next_frame
        while total < max_records and number < end:
            segment = self._segments[bisect_right(self._bases, number) - 1]
            slot = number - segment.base
            if index >= segment.counts[slot]:
                number, index = number + 1, 0
                continue
            records = self._read_frame(segment, slot, number)
            if index:
                records = records[index:]
            batches.append(Batch(0, number, index, records))
            total += len(records)
            number, index = number + 1, 0
        return batches

    def _read_frame(self, segment: _Segment, slot: int, number: int) -> list[bytes]:
        pos = segment.positions[slot]
        fd = segment.fd()
        header = os.pread(fd, HEADER.size, pos)
        _, crc, length, _, _ = HEADER.unpack(header)
        payload = os.pread(fd, length, pos + HEADER.size)
        if len(payload) != length or crc32c(payload, crc32c(header[8:])) != crc:
            raise LogCorruptError(
                f"{segment.path}: frame {number} at byte {pos} fails its CRC check; "
                "the log is damaged, restore this segment from a backup"
            )
        return _decode_records(payload)

    def end(self, partition: int) -> Position | None:
        self._check_partition(partition)
        for segment in reversed(self._segments):
            if segment.frames:
                return Position(0, segment.base + segment.frames - 1, segment.counts[-1] - 1)
        return None

    def count(self, partition: int, after: Position | None = None) -> int:
        self._check_partition(partition)
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

    def close(self) -> None:
        for segment in self._segments:
            segment.close()
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None  # type: ignore[assignment]

    def __enter__(self) -> FileLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
