"""``tracker log check``: every damaged frame reported, nothing changed, no writer held up.

And what the other commands do with the same damage: a torn tail is cut with a warning
on stderr, damage in the middle stops them with one line naming the segment and byte.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from tracker.cli import main
from tracker.events import OffsetCommitted, encode_event
from tracker.logs.file import FileLog
from tracker.logs.frames import HEADER, MAGIC, MORE, SEGMENT_SUFFIX, encode_records, frame_of

SCRIPT = Path(sys.executable).parent / "tracker"


def event(i: int) -> bytes:
    return encode_event(OffsetCommitted(session_id=f"s{i % 7}", consumer="client", offset=i))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


def write_log(data_dir: Path, appends: int = 12, segment_bytes: int = 400) -> Path:
    """``appends`` appends of 1..3 events, over several segments; returns the log dir."""
    directory = data_dir / "log"
    with FileLog(directory, fsync=False, segment_bytes=segment_bytes) as log:
        n = 0
        for i in range(appends):
            log.append(0, [event(n + k) for k in range(1 + i % 3)])
            n += 1 + i % 3
    return directory


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*" + SEGMENT_SUFFIX))


def frame_starts(path: Path) -> list[int]:
    data, pos, starts = path.read_bytes(), 0, []
    while pos < len(data):
        starts.append(pos)
        pos += HEADER.size + HEADER.unpack_from(data, pos)[2]
    return starts


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def check(data_dir: Path, *args: str) -> Result:
    env: dict[str, str | None] = {n: None for n in os.environ if n.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    return CliRunner().invoke(main, ["log", "check", *args], env=env)


def checked_json(data_dir: Path) -> dict[str, object]:
    result = check(data_dir, "--json")
    report: dict[str, object] = json.loads(result.stdout)
    report["exit"] = result.exit_code
    return report


def damage(report: dict[str, object]) -> list[tuple[str, int, str]]:
    found = report["damaged"]
    assert isinstance(found, list)
    return [(d["segment"], d["byte"], d["kind"]) for d in found]


def test_a_clean_log_over_several_segments(data_dir: Path) -> None:
    directory = write_log(data_dir)
    assert len(segments(directory)) >= 3
    result = check(data_dir)
    assert result.exit_code == 0, result.output
    frames = sum(len(frame_starts(p)) for p in segments(directory))
    records = sum(1 + i % 3 for i in range(12))
    assert result.stdout.splitlines()[-1] == (
        f"log check: {len(segments(directory))} segments, {frames} frames, "
        f"{records} records, 0 damaged"
    )
    report = checked_json(data_dir)
    assert (report["segments"], report["frames"], report["records"]) == (
        len(segments(directory)),
        frames,
        records,
    )
    assert report["damaged"] == [] and report["exit"] == 0


def test_every_damaged_frame_is_reported_with_its_segment_and_byte(data_dir: Path) -> None:
    directory = write_log(data_dir)
    first, second, *_, last = segments(directory)
    in_first, in_second = frame_starts(first), frame_starts(second)
    flip(first, in_first[1] + HEADER.size + 1)  # a payload byte
    flip(second, in_second[0] + 4)  # the CRC itself
    flip(second, in_second[1] + 10)  # a length byte (0x40 << 16 more): the next frame too
    with open(last, "ab") as out:  # an append cut short
        out.write(frame_of(999, encode_records([event(0)]), 1)[:30])
    report = checked_json(data_dir)
    assert report["exit"] == 1
    assert damage(report) == [
        (first.name, in_first[1], "CRC mismatch"),
        (second.name, in_second[0], "CRC mismatch"),
        (second.name, in_second[1], "bad length"),
        (last.name, last.stat().st_size - 30, "torn tail"),
    ]
    text = check(data_dir)
    assert text.exit_code == 1
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{first.name} byte {in_first[1]} (frame 1): CRC")
    assert lines[-1].endswith(", 4 damaged")


def test_a_missing_segment_is_named_with_the_frames_it_held(data_dir: Path) -> None:
    directory = write_log(data_dir)
    paths = segments(directory)
    gone = len(frame_starts(paths[1]))
    paths[1].unlink()
    report = checked_json(data_dir)
    assert report["exit"] == 1
    assert damage(report) == [(paths[2].name, 0, "missing segment")]
    found = report["damaged"]
    assert isinstance(found, list)
    start = int(paths[1].stem)
    assert f"frames {start} to {start + gone - 1} are missing" in found[0]["detail"]


def test_a_missing_first_segment(data_dir: Path) -> None:
    directory = write_log(data_dir)
    paths = segments(directory)
    paths[0].unlink()
    assert damage(checked_json(data_dir)) == [(paths[1].name, 0, "missing segment")]


def test_an_unfinished_append_is_a_torn_tail_then_cut_by_the_next_open(data_dir: Path) -> None:
    directory = write_log(data_dir)
    last = segments(directory)[-1]
    size = last.stat().st_size
    number = int(last.stem) + len(frame_starts(last))
    with open(last, "ab") as out:  # one whole frame of a two-frame append: no TRKF
        out.write(frame_of(number, encode_records([event(1)]), 1, MORE))
    report = checked_json(data_dir)
    assert damage(report) == [(last.name, size, "torn tail")]
    with FileLog(directory) as log:
        assert log.repaired is not None
    assert last.stat().st_size == size
    assert checked_json(data_dir)["exit"] == 0


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_check_changes_nothing_even_where_an_open_would_cut(data_dir: Path) -> None:
    directory = write_log(data_dir)
    last = segments(directory)[-1]
    flip(segments(directory)[0], 30)
    with open(last, "ab") as out:
        out.write(b"\x00" * 10)
    before = snapshot(directory)
    time.sleep(0.01)  # a write now would give a newer mtime
    for _ in range(2):
        assert check(data_dir).exit_code == 1
        assert check(data_dir, "--json").exit_code == 1
    assert snapshot(directory) == before


def test_check_does_not_wait_for_a_writer_holding_the_lock(data_dir: Path) -> None:
    """A writer in the middle of an append: its frames so far look like a torn tail, and
    the check neither waits for the lock nor calls them damage."""
    directory = write_log(data_dir)
    last = segments(directory)[-1]
    number = int(last.stem) + len(frame_starts(last))
    fd = os.open(directory / "LOCK", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(last, "ab") as out:
            out.write(frame_of(number, encode_records([event(1)]), 1, MORE))
        started = time.monotonic()
        result = check(data_dir)
        assert time.monotonic() - started < 5
        assert result.exit_code == 0, result.output
        assert "an append is in progress" in result.stdout
        with open(last, "ab") as out:  # the writer finishes its append
            out.write(frame_of(number + 1, encode_records([event(2)]), 1, MAGIC))
    finally:
        os.close(fd)
    report = checked_json(data_dir)
    assert report["exit"] == 0 and report["appending"] is False


def test_check_runs_beside_appending_processes(data_dir: Path) -> None:
    """Appends with a short lock timeout go on while checks run in a loop."""
    directory = write_log(data_dir)
    code = (
        "import sys; from pathlib import Path; from tracker.logs.file import FileLog\n"
        f"log = FileLog(Path({str(directory)!r}), fsync=False, segment_bytes=400, "
        "lock_timeout=2)\n"
        "for i in range(300): log.append(0, [b'x' * (i % 50)] * (1 + i % 4))\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        checks = 0
        while writer.poll() is None or checks == 0:
            assert check(data_dir).exit_code == 0
            checks += 1
    finally:
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    assert checked_json(data_dir)["records"] == 24 + sum(1 + i % 4 for i in range(300))


def test_kafka_settings_need_a_dir(data_dir: Path, tmp_path: Path) -> None:
    env: dict[str, str | None] = {n: None for n in os.environ if n.startswith("TRACKER_")}
    env["TRACKER_KAFKA_BOOTSTRAP"] = "127.0.0.1:9"
    result = CliRunner().invoke(main, ["log", "check"], env=env)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: log check reads a file log, but the event log is")
    assert len(result.stderr.splitlines()) == 1
    directory = write_log(data_dir)
    result = CliRunner().invoke(main, ["log", "check", "--dir", str(directory)], env=env)
    assert result.exit_code == 0, result.output


def test_no_log_is_exit_1(tmp_path: Path) -> None:
    result = check(tmp_path / "nothing")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: no file log in")


def run(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_commands_cut_a_torn_tail_with_a_warning_and_stop_at_damage(data_dir: Path) -> None:
    directory = write_log(data_dir, segment_bytes=1 << 20)
    (segment,) = segments(directory)
    size = segment.stat().st_size
    with open(segment, "ab") as out:
        out.write(b"TRKF\x00\x00")
    done = run(data_dir, "events", "export")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 24
    assert done.stderr.startswith("warning: event log repaired: ")
    assert f"cut 6 bytes at byte {size}" in done.stderr
    assert segment.stat().st_size == size

    middle = frame_starts(segment)[5]
    flip(segment, middle + HEADER.size + 3)
    failed = run(data_dir, "events", "export")
    assert failed.returncode == 1
    assert failed.stderr == (
        f"error: {segment}: a CRC mismatch at byte {middle} (frame 5), followed by more "
        "frames; the log is damaged in the middle, restore this segment from a backup "
        "(tracker log check lists the damage)\n"
    )
    assert segment.stat().st_size == size
