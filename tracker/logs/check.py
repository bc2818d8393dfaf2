"""``tracker log check``: read every frame of a file log and report every damaged one.

It changes nothing and takes no lock a writer waits for: it opens the files read-only,
and only when the last segment ends in an unfinished append does it look (a
non-blocking try, released at once) whether a writer holds the append lock, in which case
the unfinished append is one in progress, not damage.

What it reports, per place (segment file, byte, frame number):

``torn tail``        the end of the last segment holds an unfinished append; the next
                     append (or an open that can take the lock) cuts it, with a warning;
                     it was never acknowledged
``CRC mismatch``     a frame's checksum does not match its bytes
``bad length``       a frame's length runs past the end of the segment, yet frames follow
``bad marker``       bytes that are not a frame where one should start
``bad frame number`` a valid frame with another number than its place says
``unfinished append`` a group of frames without its last frame, in the middle
``missing segment``  frame numbers jump between two segments: a segment was removed

Damage other than a torn tail stops every reader there with
:class:`~tracker.errors.LogCorruptError`; restore the segment from a backup.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

import msgspec

from tracker.errors import LogNotFoundError
from tracker.logs.frames import HEADER, MAGIC, MORE, SEGMENT_SUFFIX, check_frame, resumes_after

_MARKERS = (MAGIC, MORE)

TORN_TAIL = "torn tail"


class Damage(msgspec.Struct, frozen=True):
    """One damaged place of the log."""

    segment: str
    """The segment's file name."""
    byte: int
    frame: int | None
    """The frame number the place should hold, where it is known."""
    kind: str
    detail: str


class CheckReport(msgspec.Struct, frozen=True):
    """What ``log check`` read and found; ``damaged`` is empty for a clean log."""

    directory: str
    segments: int
    frames: int
    """Frames of complete appends, the ones a read returns."""
    records: int
    damaged: list[Damage]
    appending: bool = False
    """A writer held the lock while the last segment ended in an unfinished append."""

    @property
    def clean(self) -> bool:
        return not self.damaged


class _Counts:
    __slots__ = ("frames", "records")

    def __init__(self) -> None:
        self.frames = 0
        self.records = 0


def _kind(problem: str, *, tail: bool) -> str:
    if problem.startswith("a torn frame"):
        return "bad length"
    if problem.startswith("a bad frame marker"):
        return "bad marker"
    if problem.startswith("a CRC"):
        return "CRC mismatch"
    if problem.startswith("frame number"):
        return "bad frame number"
    return TORN_TAIL if tail else "bad length"


def check_segment(
    path: Path, number: int, *, last: bool
) -> tuple[list[Damage], int, int, int | None]:
    """Damage in one segment, its frames and records, and the number after its last frame
    (``None`` if damage at its end hides it)."""
    found: list[Damage] = []
    counts = _Counts()
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if not size:
            return found, 0, 0, number
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = _walk(path, data, min(size, len(data)), number, last, found, counts)
    return found, counts.frames, counts.records, end


def _walk(
    path: Path,
    data: mmap.mmap,
    size: int,
    number: int,
    last: bool,
    found: list[Damage],
    counts: _Counts,
) -> int | None:
    pos = 0
    group: list[tuple[int, int]] = []  # (byte, records) of the frames of an unfinished append
    group_number = number
    while pos < size:
        checked = check_frame(data, pos, size, number)
        if isinstance(checked, str):
            resumed = resumes_after(data, pos, size, number)
            if resumed is None and last and group:  # the append cut short starts earlier
                pos, number = group[0][0], group_number
            group = []  # the frames before the bad one never had their append completed
            if resumed is None:
                kind = TORN_TAIL if last else _kind(checked, tail=False)
                detail = (
                    f"{checked}; the last {size - pos} bytes were never acknowledged: "
                    "the next append cuts them"
                    if last
                    else f"{checked}, at the end of a sealed segment"
                )
                found.append(Damage(path.name, pos, number, kind, detail))
                return None
            resume_at, resume_number = resumed
            resume_at, resume_number = _next_header(data, pos, size, number) or resumed
            found.append(
                Damage(
                    path.name,
                    pos,
                    number,
                    _kind(checked, tail=False),
                    f"{checked}; {resume_at - pos} bytes unreadable, frames resume at byte "
                    f"{resume_at} with frame {resume_number}",
                )
            )
            pos, number = resume_at, resume_number
            group_number = number
            continue
        marker, count, length = checked
        if not group:
            group_number = number
        group.append((pos, count))
        pos += length
        number += 1
        if marker == MAGIC:
            counts.frames += len(group)
            counts.records += sum(c for _, c in group)
            group = []
    if group:
        start = group[0][0]
        found.append(
            Damage(
                path.name,
                start,
                group_number,
                TORN_TAIL if last else "unfinished append",
                f"an append of {len(group)} frames without its last frame"
                + ("; never acknowledged: the next append cuts it" if last else ""),
            )
        )
    return number


def _next_header(data: mmap.mmap, pos: int, size: int, number: int) -> tuple[int, int] | None:
    """Where the bad frame at ``pos`` says it ends, if a header of the next frame is there:
    the frame after a damaged one is then checked (and reported) on its own."""
    if size - pos < HEADER.size:
        return None
    marker, _, length, _, _ = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if marker not in _MARKERS or size - end < HEADER.size:
        return None
    following, _, _, after, _ = HEADER.unpack_from(data, end)
    return (end, number + 1) if following in _MARKERS and after == number + 1 else None


def _writer_active(directory: Path) -> bool:
    """Whether another process holds the append lock now (a try, released at once)."""
    try:
        fd = os.open(directory / "LOCK", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock it got
    return False


def check_log(directory: Path) -> CheckReport:
    """Read every frame of the file log in ``directory``; never changes anything."""
    directory = Path(directory)
    if not (directory / "log.json").exists():
        raise LogNotFoundError(f"no file log in {directory}: check --data-dir or --dir")
    paths = sorted(directory.glob("*" + SEGMENT_SUFFIX))
    damaged: list[Damage] = []
    frames = records = 0
    expected: int | None = 0
    appending = False
    for i, path in enumerate(paths):
        last = i == len(paths) - 1
        try:
            base = int(path.stem)
        except ValueError:
            damaged.append(Damage(path.name, 0, None, "bad segment name", "not a frame number"))
            expected = None
            continue
        if expected is not None and base != expected:
            what = (
                f"frames {expected} to {base - 1} are missing: a segment before this one "
                "was removed"
                if base > expected
                else f"starts at frame {base}, but the segment before ends at frame {expected - 1}"
            )
            kind = "missing segment" if base > expected else "overlapping segment"
            damaged.append(Damage(path.name, 0, expected, kind, what))
        found, seg_frames, seg_records, end = check_segment(path, base, last=last)
        if last and found and found[-1].kind == TORN_TAIL:
            if _writer_active(directory):
                found.pop()
                appending = True
            else:  # the writer may have finished between the scan and the try
                again = check_segment(path, base, last=last)
                if again[0] != found:
                    found, seg_frames, seg_records, end = again
                    if found and found[-1].kind == TORN_TAIL:
                        found.pop()
                        appending = True
        damaged.extend(found)
        frames += seg_frames
        records += seg_records
        expected = end
    return CheckReport(str(directory), len(paths), frames, records, damaged, appending)
