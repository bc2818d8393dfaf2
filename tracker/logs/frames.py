"""The file log's on-disk frames: encoding, checking, and scanning a segment for them.

A frame is a 24-byte header (marker, CRC32C, payload length, frame number, record count)
and a msgpack array of the records; the CRC covers the header's tail and the payload.
``TRKF`` ends an append, ``TRKG`` says more frames of the same append follow: a scan
indexes only complete groups, so an append that was cut short is never read.
"""

from __future__ import annotations

import mmap
import os
import struct
from array import array
from collections.abc import Sequence
from pathlib import Path

import msgspec
from crc32c import crc32c

from tracker.errors import LogCorruptError

MAGIC = b"TRKF"
"""The marker of a frame that ends its append (every frame of a one-frame append)."""
MORE = b"TRKG"
"""The marker of a frame that more frames of the same append follow."""
HEADER = struct.Struct("<4sIIQI")
SEGMENT_SUFFIX = ".seg"

_MARKERS = (MAGIC, MORE)

encode_records = msgspec.msgpack.Encoder().encode
decode_records = msgspec.msgpack.Decoder(list[bytes]).decode


class Segment:
    """One segment file and the in-memory index of its complete frames."""

    __slots__ = ("base", "counts", "path", "positions", "read_fd", "size")

    def __init__(self, path: Path, base: int) -> None:
        self.path = path
        self.base = base
        self.positions = array("Q")
        self.counts = array("I")
        self.size = 0
        """Bytes of complete groups: where the next append starts."""
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


def encode_frame(number: int, records: Sequence[bytes], marker: bytes = MAGIC) -> bytes:
    return frame_of(number, encode_records(records), len(records), marker)


def frame_of(number: int, payload: bytes, count: int, marker: bytes = MAGIC) -> bytes:
    """The frame of an encoded payload of ``count`` records, numbered ``number``."""
    tail = HEADER.pack(marker, 0, len(payload), number, count)[8:]
    crc = crc32c(payload, crc32c(tail))
    return marker + struct.pack("<I", crc) + tail + payload


def check_frame(
    data: bytes | mmap.mmap, pos: int, size: int, expected: int, *, crc: bool = True
) -> str | tuple[bytes, int, int]:
    """``(marker, record count, frame length)``, or a description of what is wrong."""
    if size - pos < HEADER.size:
        return f"a torn header ({size - pos} of {HEADER.size} bytes)"
    marker, stored, length, number, count = HEADER.unpack_from(data, pos)
    if marker not in _MARKERS:
        return "a bad frame marker"
    end = pos + HEADER.size + length
    if end > size:
        return f"a torn frame ({size - pos} of {end - pos} bytes)"
    if crc:
        view = memoryview(data)[pos + 8 : end]
        try:
            if crc32c(view) != stored:
                return "a CRC mismatch"
        finally:
            view.release()
    if number != expected:
        return f"frame number {number} where {expected} was expected"
    return marker, int(count), HEADER.size + length


def next_good_frame(
    data: bytes | mmap.mmap, start: int, size: int, number: int | None = None
) -> tuple[int, int] | None:
    """``(byte, frame number)`` of the first CRC-valid frame at or after ``start``, only
    one numbered ``number`` if given; ``None`` if there is none."""
    pos = start
    while pos < size:
        candidates = [p for m in _MARKERS if (p := data.find(m, pos)) != -1]
        if not candidates:
            return None
        pos = min(candidates)
        if size - pos >= HEADER.size:
            found = HEADER.unpack_from(data, pos)[3]
            if (number is None or found == number) and not isinstance(
                check_frame(data, pos, size, found), str
            ):
                return pos, found
        pos += 1
    return None


def resumes_after(
    data: bytes | mmap.mmap, pos: int, size: int, number: int
) -> tuple[int, int] | None:
    """Where good frames follow the bad frame at ``pos`` (numbered ``number`` if it were
    good): damage in the middle; ``None``: nothing good follows, a torn tail.

    A bad frame's length cannot be trusted (it is under the CRC), so the next frame,
    ``number + 1``, is looked for at every byte after it. Any other CRC-valid frame
    counts only after the bad frame's declared end, and only if that end is inside the
    file: a frame whose length runs past the end of the file is a torn write, whose
    unfinished payload may hold anything a user wrote, even bytes that look like a frame.
    """
    found = [next_good_frame(data, pos + 1, size, number + 1)]
    resume = _after_bad_frame(data, pos, size)
    if resume is not None:
        found.append(next_good_frame(data, resume, size))
    return min((f for f in found if f is not None), default=None)


def _after_bad_frame(data: bytes | mmap.mmap, pos: int, size: int) -> int | None:
    """Where any good frame could start after the bad one at ``pos``; ``None``: only the
    next frame by number could (see :func:`resumes_after`)."""
    if size - pos < HEADER.size:
        return None
    marker, _, length, _, _ = HEADER.unpack_from(data, pos)
    if marker not in _MARKERS:
        return pos + 1
    end = pos + HEADER.size + length
    return None if end > size else end


class Scan:
    """The result of scanning a segment from some byte: complete groups, and what stopped it."""

    __slots__ = ("counts", "end", "positions", "problem", "stopped_at")

    def __init__(self, end: int = 0) -> None:
        self.positions: list[int] = []
        self.counts: list[int] = []
        self.end = end
        self.problem: str | None = None
        self.stopped_at = end


def scan_segment(path: Path, start: int, number: int, *, crc: bool) -> tuple[Scan, int]:
    """Index the complete groups of frames in ``path`` from byte ``start``; and its size."""
    result = Scan()
    result.end = result.stopped_at = start
    first = number
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size <= start:
            return result, size
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            size = len(data)
            pos = start
            pending: list[tuple[int, int]] = []
            while pos < size:
                checked = check_frame(data, pos, size, number, crc=crc)
                if isinstance(checked, str):
                    result.problem = checked
                    break
                marker, count, length = checked
                pending.append((pos, count))
                pos += length
                number += 1
                if marker == MAGIC:
                    result.positions.extend(p for p, _ in pending)
                    result.counts.extend(c for _, c in pending)
                    result.end = pos
                    pending = []
            result.stopped_at = pos
            if result.problem is not None and resumes_after(data, pos, size, number):
                if not crc:  # a bad length may have been followed: place the damage by CRC
                    return scan_segment(path, start, first, crc=True)
                if result.problem.startswith("a torn frame"):
                    result.problem = "a bad frame length (it runs past the end)"
                raise LogCorruptError(
                    f"{path}: {result.problem} at byte {pos} (frame {number}), "
                    "followed by more frames; the log is damaged in the middle, "
                    "restore this segment from a backup (tracker log check lists the damage)"
                )
            if result.problem is None and pending:
                result.problem = f"an unfinished append of {len(pending)} frames"
                result.stopped_at = pending[0][0]
    return result, size
