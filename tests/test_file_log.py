"""The embedded file log: positions, reads from anywhere, segments, the lock, tail repair."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.errors import LogCorruptError, LogError
from tracker.events import Position
from tracker.logs import Batch
from tracker.logs.file import FileLog
from tracker.logs.frames import HEADER, SEGMENT_SUFFIX, encode_frame


def records(start: int, count: int) -> list[bytes]:
    return [f"record-{i}".encode() for i in range(start, start + count)]


def read_all(log: FileLog, after: Position | None = None, max_records: int = 1000) -> list[bytes]:
    out: list[bytes] = []
    while batches := log.read(0, after, max_records):
        out.extend(r for b in batches for r in b.records)
        after = batches[-1].last
    return out


def read_positions(log: FileLog, after: Position | None = None) -> list[Position]:
    out: list[Position] = []
    while batches := log.read(0, after, 7):
        out.extend(p for b in batches for p in b.positions())
        after = batches[-1].last
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SEGMENT_SUFFIX))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture
def log(log_dir: Path) -> Iterator[FileLog]:
    with FileLog(log_dir) as opened:
        yield opened


def test_append_returns_the_batches_as_written(log: FileLog) -> None:
    first = log.append(0, records(0, 3)).batches
    second = log.append(0, records(3, 2)).batches
    assert first == [Batch(0, 0, 0, records(0, 3))]
    assert second == [Batch(0, 1, 0, records(3, 2))]
    assert first[0].first == Position(0, 0, 0)
    assert first[0].last == Position(0, 0, 2)
    assert first[0].positions() == [Position(0, 0, i) for i in range(3)]
    assert second[0].last == Position(0, 1, 1)


def test_round_trip_in_order(log: FileLog) -> None:
    log.append(0, records(0, 3))
    log.append(0, records(3, 1))
    log.append(0, records(4, 5))
    assert read_all(log) == records(0, 9)
    assert log.read(0, None, 1000) == [
        Batch(0, 0, 0, records(0, 3)),
        Batch(0, 1, 0, records(3, 1)),
        Batch(0, 2, 0, records(4, 5)),
    ]


def test_empty_log(log: FileLog) -> None:
    assert log.read(0, None, 10) == []
    assert log.end(0) is None
    assert log.count(0) == 0
    assert log.append(0, []).count == 0
    assert log.end(0) is None


def test_read_from_the_middle_of_a_batch(log: FileLog) -> None:
    log.append(0, records(0, 5))
    log.append(0, records(5, 2))
    batches = log.read(0, Position(0, 0, 1), 1000)
    assert batches == [Batch(0, 0, 2, records(2, 3)), Batch(0, 1, 0, records(5, 2))]
    assert batches[0].first == Position(0, 0, 2)
    assert batches[0].positions() == [Position(0, 0, 2), Position(0, 0, 3), Position(0, 0, 4)]
    assert batches[0].last == Position(0, 0, 4)
    # after the last record of a batch: the next batch
    assert log.read(0, Position(0, 0, 4), 1000) == [Batch(0, 1, 0, records(5, 2))]


def test_read_after_the_last_record_is_empty(log: FileLog) -> None:
    log.append(0, records(0, 3))
    end = log.end(0)
    assert end == Position(0, 0, 2)
    assert log.read(0, end, 10) == []
    assert log.read(0, Position(0, 5, 0), 10) == []


def test_read_stops_near_max_records_on_batch_boundaries(log: FileLog) -> None:
    for i in range(5):
        log.append(0, records(3 * i, 3))
    batches = log.read(0, None, 4)
    assert [b.offset for b in batches] == [0, 1]
    assert sum(len(b.records) for b in batches) == 6


def test_count_and_end(log: FileLog) -> None:
    log.append(0, records(0, 4))
    log.append(0, records(4, 3))
    assert log.count(0) == 7
    assert log.count(0, None) == 7
    assert log.count(0, Position(0, 0, 0)) == 6
    assert log.count(0, Position(0, 0, 3)) == 3
    assert log.count(0, Position(0, 1, 1)) == 1
    assert log.count(0, Position(0, 1, 2)) == 0
    assert log.end(0) == Position(0, 1, 2)


def test_only_partition_zero(log: FileLog) -> None:
    assert log.partitions == 1
    with pytest.raises(LogError, match="one partition"):
        log.append(1, records(0, 1))
    with pytest.raises(LogError, match="one partition"):
        log.read(1, None, 1)


def test_persists_across_reopen_with_the_same_identity(log_dir: Path) -> None:
    with FileLog(log_dir) as log:
        log.append(0, records(0, 3))
        log.append(0, records(3, 3))
        identity = log.log_id
    with FileLog(log_dir) as log:
        assert log.log_id == identity
        assert log.repaired is None
        assert read_all(log) == records(0, 6)
        assert log.count(0) == 6
        assert log.end(0) == Position(0, 1, 2)
        assert log.append(0, records(6, 1)).batches == [Batch(0, 2, 0, records(6, 1))]
    with FileLog(log_dir) as log:
        assert read_all(log) == records(0, 7)


def test_two_logs_have_different_identities(tmp_path: Path) -> None:
    with FileLog(tmp_path / "a") as a, FileLog(tmp_path / "b") as b:
        assert a.log_id != b.log_id


def test_append_after_close_fails(log_dir: Path) -> None:
    log = FileLog(log_dir)
    log.close()
    with pytest.raises(LogError, match="closed"):
        log.append(0, records(0, 1))


def test_segments_roll_and_reads_cross_them(log_dir: Path) -> None:
    with FileLog(log_dir, segment_bytes=200) as log:
        for i in range(20):
            log.append(0, records(3 * i, 3))
        assert len(segments(log_dir)) > 3
        assert read_all(log) == records(0, 60)
        assert read_all(log, Position(0, 7, 1)) == records(23, 37)
        assert log.count(0, Position(0, 7, 1)) == 37
        assert log.end(0) == Position(0, 19, 2)
    names = [int(p.stem) for p in segments(log_dir)]
    assert names[0] == 0
    assert names == sorted(names)
    with FileLog(log_dir, segment_bytes=200) as log:
        assert read_all(log) == records(0, 60)
        assert log.count(0) == 60
        assert read_positions(log) == [Position(0, i // 3, i % 3) for i in range(60)]
        log.append(0, records(60, 3))
        assert read_all(log, Position(0, 19, 2)) == records(60, 3)


def test_frames_are_split_by_max_frame_records(log_dir: Path) -> None:
    with FileLog(log_dir, max_frame_records=4) as log:
        batches = log.append(0, records(0, 10)).batches
        assert [(b.offset, len(b.records)) for b in batches] == [(0, 4), (1, 4), (2, 2)]
        assert [r for b in batches for r in b.records] == records(0, 10)
        assert log.end(0) == Position(0, 2, 1)
        assert read_all(log) == records(0, 10)


@settings(max_examples=60, deadline=None)
@given(
    appends=st.lists(st.lists(st.binary(max_size=40), max_size=12), max_size=15),
    segment_bytes=st.sampled_from([64, 300, 1 << 20]),
    max_frame_records=st.integers(1, 8),
    start=st.integers(0, 200),
    reopen=st.booleans(),
)
def test_any_position_reads_the_rest_in_order(
    tmp_path_factory: pytest.TempPathFactory,
    appends: list[list[bytes]],
    segment_bytes: int,
    max_frame_records: int,
    start: int,
    reopen: bool,
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    log = FileLog(
        directory, fsync=False, segment_bytes=segment_bytes, max_frame_records=max_frame_records
    )
    try:
        written: list[tuple[Position, bytes]] = []
        for chunk in appends:
            for batch in log.append(0, chunk).batches:
                written.extend(zip(batch.positions(), batch.records, strict=True))
        if reopen:
            log.close()
            log = FileLog(
                directory,
                fsync=False,
                segment_bytes=segment_bytes,
                max_frame_records=max_frame_records,
            )
        assert [p for p, _ in written] == sorted(p for p, _ in written)
        assert read_positions(log) == [p for p, _ in written]
        assert log.count(0) == len(written)
        assert log.end(0) == (written[-1][0] if written else None)
        if written:
            k = start % len(written)
            after = written[k][0]
            assert read_all(log, after, max_records=5) == [r for _, r in written[k + 1 :]]
            assert log.count(0, after) == len(written) - k - 1
    finally:
        log.close()


# -- damage: torn tails are repaired, damage in the middle is refused --------------------


def write_three(log_dir: Path) -> int:
    """Three frames of 3 records; returns the byte offset of the last frame."""
    with FileLog(log_dir) as log:
        for i in range(3):
            log.append(0, records(3 * i, 3))
    data = segments(log_dir)[-1].read_bytes()
    return data.rindex(b"TRKF")


def test_a_truncated_last_frame_is_cut_and_reported(log_dir: Path) -> None:
    last = write_three(log_dir)
    (segment,) = segments(log_dir)
    with open(segment, "r+b") as file:
        file.truncate(last + HEADER.size + 3)
    with FileLog(log_dir) as log:
        assert log.repaired is not None
        assert str(segment) in log.repaired
        assert segment.stat().st_size == last
        assert read_all(log) == records(0, 6)
        assert log.end(0) == Position(0, 1, 2)
        assert log.append(0, records(100, 2)).batches == [Batch(0, 2, 0, records(100, 2))]
    with FileLog(log_dir) as log:
        assert log.repaired is None
        assert read_all(log) == [*records(0, 6), *records(100, 2)]


@pytest.mark.parametrize("keep", [1, HEADER.size - 1])
def test_a_torn_header_is_cut(log_dir: Path, keep: int) -> None:
    last = write_three(log_dir)
    (segment,) = segments(log_dir)
    with open(segment, "r+b") as file:
        file.truncate(last + keep)
    with FileLog(log_dir) as log:
        assert log.repaired is not None
        assert read_all(log) == records(0, 6)


@pytest.mark.parametrize(
    "garbage",
    [b"\x00" * 5, b"\xff" * 100, b"TRKF" + b"\x01" * 40],
    ids=["zeros", "ones", "bad-length"],
)
def test_garbage_after_the_last_frame_is_cut(log_dir: Path, garbage: bytes) -> None:
    write_three(log_dir)
    (segment,) = segments(log_dir)
    size = segment.stat().st_size
    with open(segment, "ab") as file:
        file.write(garbage)
    with FileLog(log_dir) as log:
        assert log.repaired is not None
        assert segment.stat().st_size == size
        assert read_all(log) == records(0, 9)
        log.append(0, records(9, 1))
        assert read_all(log) == records(0, 10)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as file:
        file.seek(offset)
        byte = file.read(1)
        file.seek(offset)
        file.write(bytes([byte[0] ^ 0x40]))


def test_a_flipped_byte_in_the_last_frame_is_cut_as_a_torn_tail(log_dir: Path) -> None:
    last = write_three(log_dir)
    (segment,) = segments(log_dir)
    flip(segment, segment.stat().st_size - 2)
    with FileLog(log_dir) as log:
        assert log.repaired is not None
        assert segment.stat().st_size == last
        assert read_all(log) == records(0, 6)


def test_a_flipped_byte_in_a_middle_frame_of_the_last_segment_is_refused(log_dir: Path) -> None:
    write_three(log_dir)
    (segment,) = segments(log_dir)
    data = segment.read_bytes()
    second = data.index(b"TRKF", 1)
    flip(segment, second + HEADER.size + 2)
    with pytest.raises(LogCorruptError, match="damaged in the middle") as info:
        FileLog(log_dir)
    assert str(segment) in str(info.value)
    assert segment.read_bytes()[:second] == data[:second], "nothing was cut"
    assert len(segment.read_bytes()) == len(data)


@pytest.mark.parametrize("byte", [8, 9, 10, 11], ids=["len0", "len1", "len2", "len3"])
def test_a_flipped_length_in_a_middle_frame_of_the_last_segment_is_refused(
    log_dir: Path, byte: int
) -> None:
    """A length made larger runs past the end of the file like a torn write, but the
    frames after it are still there: cutting there would drop acknowledged appends."""
    write_three(log_dir)
    (segment,) = segments(log_dir)
    data = segment.read_bytes()
    second = data.index(b"TRKF", 1)
    flip(segment, second + byte)
    with pytest.raises(LogCorruptError, match="damaged in the middle") as info:
        FileLog(log_dir)
    assert f"{segment}: " in str(info.value)
    assert f"at byte {second} " in str(info.value)
    assert len(segment.read_bytes()) == len(data), "nothing was cut"


def test_a_longer_length_that_still_fits_is_refused(log_dir: Path) -> None:
    """The length grows past the next frame but not past the end: the frames after the
    damaged one are not where its length says, yet they are found."""
    with FileLog(log_dir) as log:
        log.append(0, records(0, 3))
        log.append(0, records(3, 3))
        log.append(0, [b"y"])  # 28 bytes: all inside the 64 the length grew by
        log.append(0, [b"x" * 100])  # starts inside them, ends after
    (segment,) = segments(log_dir)
    data = segment.read_bytes()
    second = data.index(b"TRKF", 1)
    flip(segment, second + 8)  # the length's low byte: 0x40 more
    with pytest.raises(LogCorruptError, match="damaged in the middle"):
        FileLog(log_dir)
    assert segment.read_bytes()[:second] == data[:second]


def test_a_flipped_byte_in_an_earlier_segment_fails_the_read(log_dir: Path) -> None:
    with FileLog(log_dir, segment_bytes=100) as log:
        for i in range(6):
            log.append(0, records(3 * i, 3))
    first = segments(log_dir)[0]
    assert len(segments(log_dir)) > 1
    flip(first, HEADER.size + 2)
    with FileLog(log_dir, segment_bytes=100) as log:
        assert log.repaired is None
        with pytest.raises(LogCorruptError, match="CRC") as info:
            read_all(log)
        assert str(first) in str(info.value)
        # the damage is not skipped: reading past the damaged frame still works
        assert read_all(log, Position(0, 0, 2)) == records(3, 15)


@pytest.mark.parametrize("which", [0, -1], ids=["first-frame", "last-frame"])
def test_a_shorter_length_in_a_sealed_segment_is_placed_at_its_frame(
    log_dir: Path, which: int
) -> None:
    """Sealed segments are opened without CRCs; a wrong length then leads the scan into
    the payload, yet the error names the byte of the damaged frame."""
    with FileLog(log_dir, segment_bytes=200) as log:
        for i in range(12):
            log.append(0, records(3 * i, 3))
    first = segments(log_dir)[0]
    data = first.read_bytes()
    starts = [0]
    while (end := starts[-1] + HEADER.size + HEADER.unpack_from(data, starts[-1])[2]) < len(data):
        starts.append(end)
    assert len(starts) >= 3 and len(segments(log_dir)) >= 2
    start = starts[which]
    length = HEADER.unpack_from(data, start)[2]
    bit = next(b for b in range(2, 8) if length & (1 << b))
    changed = bytearray(data)
    changed[start + 8] ^= 1 << bit  # a shorter length: it now ends inside its payload
    first.write_bytes(bytes(changed))
    with pytest.raises(LogCorruptError) as info:
        FileLog(log_dir)
    assert str(info.value).startswith(f"{first}: a CRC mismatch at byte {start}")
    assert not str(info.value)[len(f"{first}: a CRC mismatch at byte {start}")].isdigit()


def test_a_record_count_flipped_to_zero_is_not_skipped(log_dir: Path) -> None:
    """The count is under the CRC, but a sealed segment is indexed without CRCs: a frame
    whose count reads 0 must still be read (and fail), not skipped as empty."""
    with FileLog(log_dir, segment_bytes=100) as log:
        for i in range(6):
            log.append(0, records(i, 1))
    first = segments(log_dir)[0]
    data = bytearray(first.read_bytes())
    data[20] ^= 1  # frame 0's count: 1 -> 0
    first.write_bytes(bytes(data))
    with FileLog(log_dir) as log, pytest.raises(LogCorruptError, match="at byte 0 fails its CRC"):
        read_all(log)


def test_an_unfinished_append_in_a_sealed_segment_is_placed_at_its_start(log_dir: Path) -> None:
    """A last frame whose marker says "more follows" (``TRKF`` -> ``TRKG``): the error
    names where that append starts."""
    with FileLog(log_dir, segment_bytes=100, max_frame_records=2) as log:
        for i in range(4):
            log.append(0, records(4 * i, 4))  # two frames each
    first = segments(log_dir)[0]
    data = bytearray(first.read_bytes())
    last = data.rindex(b"TRKF")
    group = data.rindex(b"TRKG", 0, last)
    data[last + 3] ^= 1  # F -> G
    first.write_bytes(bytes(data))
    with pytest.raises(LogCorruptError, match=f"unfinished append of 2 frames at byte {group},"):
        FileLog(log_dir)


def test_a_missing_segment_is_refused_on_open(log_dir: Path) -> None:
    with FileLog(log_dir, segment_bytes=100) as log:
        for i in range(6):
            log.append(0, records(3 * i, 3))
    paths = segments(log_dir)
    assert len(paths) >= 3
    paths[1].unlink()
    with pytest.raises(LogCorruptError, match="missing") as info:
        FileLog(log_dir)
    assert str(paths[2]) in str(info.value)
    # the lock was released by the failed open
    paths[0].unlink()
    with pytest.raises(LogCorruptError, match="missing"):
        FileLog(log_dir, lock_timeout=0)


def test_an_unreadable_identity_file_is_refused(log_dir: Path) -> None:
    FileLog(log_dir).close()
    (log_dir / "log.json").write_text("{not json")
    with pytest.raises(LogCorruptError, match=r"log\.json"):
        FileLog(log_dir)


def test_a_torn_frame_whose_payload_looks_like_a_frame_is_still_a_torn_tail(
    log_dir: Path,
) -> None:
    """User text can hold any bytes, a whole CRC-valid frame too: it must not turn a torn
    write into "damage in the middle" (which would refuse the log for good)."""
    forged = encode_frame(7, [b"forged"]).decode("latin-1")
    with FileLog(log_dir) as log:
        log.append(0, records(0, 3))
        log.append(0, [b"title:" + forged.encode("latin-1") + b"|" + b"x" * 200])
    (segment,) = segments(log_dir)
    data = segment.read_bytes()
    last = data.rindex(b"TRKF", 0, data.index(b"title:"))
    with open(segment, "r+b") as file:
        file.truncate(data.index(b"|", last) + 10)  # torn after the forged frame
    with FileLog(log_dir) as log:
        assert log.repaired is not None
        assert read_all(log) == records(0, 3)


def test_a_write_that_writes_nothing_is_a_full_disk_not_a_spin() -> None:
    import errno
    import io
    from typing import IO, cast

    from tracker.logs.file import _write_all

    class WritesNothing(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            return 0

    with pytest.raises(OSError) as raised:
        _write_all(cast(IO[bytes], WritesNothing()), b"frame")
    assert raised.value.errno == errno.ENOSPC
