"""File log damage: torn tails, flipped bytes in the middle, a missing segment.

One log of many appends (some of several frames) over several segments is written once;
each injection damages a fresh copy of it. Then:

* a torn tail (the last append cut at a random byte, or its end zeroed as after a power
  loss) is cut by the next open with a warning; every earlier append reads back whole,
  and a new append works;
* a flipped bit anywhere before the last append is detected: ``tracker log check``
  names its segment and the byte where its frame starts, and every read either stops
  there with :class:`LogCorruptError` naming them, having returned only records before
  the damage, or fails at open. Nothing is cut, nothing skipped. The one bit outside the
  CRC, ``TRKF`` <-> ``TRKG`` in a frame's marker, only moves where an append ends: reads
  then return every record, or stop at an append it left unfinished;
* a deleted middle segment: the open fails naming the segment after the gap, and
  ``log check`` reports the missing frames.

Every few injections the same checks run through the real ``tracker`` console script
(``log check --json`` and ``events export``) in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.report import Figures
from tests.faults.workload import seeded
from tracker.errors import LogCorruptError
from tracker.events import OffsetCommitted, Position, encode_event
from tracker.logs.check import CheckReport, check_log
from tracker.logs.file import FileLog
from tracker.logs.frames import HEADER, MAGIC, SEGMENT_SUFFIX

SCRIPT = Path(sys.executable).parent / "tracker"
SEED, _ = seeded("log damage")
SEGMENT_BYTES = 16 << 10
APPENDS = 240
EVERY = 10
"""Every EVERY-th injection is also checked through real ``tracker`` processes."""


class Base:
    """The undamaged log: its directory, every record in order, and where things are."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.log = root / "data" / "log"
        self.records: list[bytes] = []
        self.appends: list[int] = []  # records before each append
        with FileLog(
            self.log, fsync=False, segment_bytes=SEGMENT_BYTES, max_frame_records=8
        ) as log:
            for i in range(APPENDS):
                count = rng.choice([1, 1, 2, 3, 5, 8, 13, 30])
                batch = [
                    encode_event(
                        OffsetCommitted(
                            session_id=f"s{rng.randrange(50)}",
                            consumer=f"c{i % 3}",
                            offset=len(self.records) + k,
                        )
                    )
                    for k in range(count)
                ]
                self.appends.append(len(self.records))
                log.append(0, batch)
                self.records.extend(batch)
        self.segments = sorted(self.log.glob("*" + SEGMENT_SUFFIX))
        # (segment, frame start, frame length, records before it) of every frame, in order
        self.frames: list[tuple[Path, int, int, int]] = []
        before = 0
        for path in self.segments:
            data, pos = path.read_bytes(), 0
            while pos < len(data):
                _, _, length, _, count = HEADER.unpack_from(data, pos)
                self.frames.append((path, pos, HEADER.size + length, before))
                before += count
                pos += HEADER.size + length
        last = self.segments[-1]
        self.last_append = next(
            p for s, p, _, b in self.frames if s == last and b == self.appends[-1]
        )
        """Byte of the last append in the last segment: the only place a tear can be."""
        assert len(self.segments) >= 5, "the log must span several segments"
        assert last.read_bytes()[self.last_append :].count(MAGIC) == 1

    def copy(self, to: Path) -> Path:
        shutil.rmtree(to, ignore_errors=True)
        shutil.copytree(self.log.parent, to)
        return to / "log"


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    return Base(tmp_path_factory.mktemp("base"), random.Random(SEED))


def read_small(log: FileLog) -> Iterator[bytes]:
    """Every record, read a few at a time: damage shows after what precedes it."""
    after: Position | None = None
    while batches := log.read(0, after, 37):
        for batch in batches:
            yield from batch.records
        after = batches[-1].last


def tracker(data: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data)
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, timeout=120, check=False
    )


def files(log: Path) -> dict[str, bytes]:
    """The log's segments and identity (``LOCK`` holds the pid of its last holder)."""
    return {p.name: p.read_bytes() for p in sorted(log.iterdir()) if p.name != "LOCK"}


def test_torn_tails_are_cut_with_a_warning(
    base: Base, tmp_path: Path, caplog: pytest.LogCaptureFixture, fault_report: Figures
) -> None:
    rng = random.Random(SEED + 1)
    last = base.segments[-1]
    size = last.stat().st_size
    acknowledged = base.records[: base.appends[-1]]
    cuts = [("cut", rng.randrange(base.last_append + 1, size)) for _ in range(40)]
    cuts += [("zeroed", rng.randrange(base.last_append, size)) for _ in range(10)]
    survived = lost = 0
    for n, (how, at) in enumerate(cuts):
        where = f"seed {SEED}, {how} at byte {at} of {last.name}"
        log = base.copy(tmp_path / "d")
        tail = log / last.name
        if how == "cut":
            os.truncate(tail, at)
        else:
            with open(tail, "r+b") as out:
                out.seek(at)
                out.write(b"\x00" * (size - at))
        found = check_log(log)
        assert [d.kind for d in found.damaged] == ["torn tail"], where
        assert found.damaged[0].segment == last.name and found.damaged[0].byte == base.last_append
        real = n % EVERY == 0
        if real:
            checked = tracker(log.parent, "log", "check", "--json")
            assert checked.returncode == 1, where
            assert json.loads(checked.stdout)["damaged"][0]["kind"] == "torn tail"
            exported = tracker(log.parent, "events", "export")
            assert exported.returncode == 0, (where, exported.stderr)
            assert b"warning: event log repaired: " in exported.stderr, where
            assert len(exported.stdout.splitlines()) == len(acknowledged), where
        caplog.clear()
        with caplog.at_level(logging.WARNING), FileLog(log) as opened:
            assert real or opened.repaired is not None, where
            assert real or "event log repaired" in caplog.text, where
            records = list(read_small(opened))
            lost += sum(1 for a, b in zip(acknowledged, records, strict=False) if a != b)
            lost += max(0, len(acknowledged) - len(records))
            assert records == acknowledged, where
            opened.append(0, [b"after"])
            assert list(read_small(opened)) == [*acknowledged, b"after"], where
        assert tail.stat().st_size > base.last_append
        assert check_log(log).clean, where
        survived += 1
    fault_report.fault = "torn tail: last append cut at a random byte, or zeroed from one"
    fault_report.injected = len(cuts)
    fault_report.survived = survived
    fault_report.lost = lost
    fault_report.checked = (
        "log check says torn tail; open cuts it with a warning; earlier appends read back "
        "whole; a new append works"
    )
    fault_report.detail = {
        "seed": SEED,
        "appends": APPENDS,
        "records": len(base.records),
        "segments": len(base.segments),
        "real_process_checks": len(range(0, len(cuts), EVERY)),
    }


def read_until_damage(log: Path) -> tuple[list[bytes], LogCorruptError | None]:
    records: list[bytes] = []
    try:
        with FileLog(log) as opened:
            for record in read_small(opened):
                records.append(record)
    except LogCorruptError as error:
        return records, error
    return records, None


def test_flipped_bytes_in_the_middle_are_detected(
    base: Base, tmp_path: Path, fault_report: Figures
) -> None:
    rng = random.Random(SEED + 2)
    places = [(p, s, ln, b) for p, s, ln, b in base.frames if (p, s) < (base.segments[-1], 0)]
    places += [
        (p, s, ln, b)
        for p, s, ln, b in base.frames
        if p == base.segments[-1] and s < base.last_append
    ]
    weights = [ln for _, _, ln, _ in places]
    injected = detected = survived = skipped = marker_bits = 0
    for n in range(60):
        path, start, length, before = rng.choices(places, weights)[0]
        at, bit = start + rng.randrange(length), rng.randrange(8)
        where = f"seed {SEED}, bit {bit} of byte {at} of {path.name} (frame at {start})"
        log = base.copy(tmp_path / "d")
        target = log / path.name
        data = bytearray(target.read_bytes())
        data[at] ^= 1 << bit
        target.write_bytes(bytes(data))
        before_files = files(log)
        injected += 1

        found = check_log(log)
        first = found.damaged[0] if found.damaged else None
        records, error = read_until_damage(log)
        # silently skipped: a record returned out of order, i.e. not the expected prefix
        skipped += sum(1 for a, b in zip(records, base.records, strict=False) if a != b)
        prefix = records == base.records[: len(records)]
        if at - start == 3 and bit == 0:
            # TRKF <-> TRKG, the one bit outside the CRC: it moves where an append ends
            # and nothing else; reads lose nothing, or stop at an append left unfinished
            marker_bits += 1
            ok_check = first is None or first.kind == "unfinished append"
            ok_read = (records == base.records) if error is None else prefix
            ok_read = ok_read and (error is None or "unfinished append" in str(error))
        else:
            ok_check = (
                first is not None
                and (first.segment, first.byte) == (path.name, start)
                and first.kind != "torn tail"
            )
            ok_read = (
                error is not None
                and prefix
                and len(records) <= before
                and f"{target}: " in str(error)
                and f"at byte {start}" in str(error)
            )
            if n % EVERY == 0:
                checked = tracker(log.parent, "log", "check", "--json")
                report = json.loads(checked.stdout)
                ok_check = ok_check and checked.returncode == 1
                ok_check = ok_check and (report["damaged"][0]["byte"] == start)
                exported = tracker(log.parent, "events", "export")
                lines = exported.stdout.splitlines()
                ok_read = ok_read and exported.returncode == 1 and len(lines) <= before
                ok_read = ok_read and exported.stderr.count(b"\n") == 1
                ok_read = ok_read and b"Traceback" not in exported.stderr
            detected += ok_check and error is not None
        unchanged = files(log) == before_files
        survived += ok_check and ok_read and unchanged
        assert ok_check, (where, found)
        assert ok_read, (where, len(records), before, error)
        assert unchanged, where
    fault_report.fault = "one bit flipped at a random byte before the last append"
    fault_report.injected = injected
    fault_report.survived = survived
    fault_report.lost = skipped
    fault_report.checked = (
        "log check names the frame's segment and byte; reads stop there with an error "
        "naming them, after an exact prefix; nothing cut (lost = records skipped silently)"
    )
    fault_report.detail = {
        "seed": SEED,
        "detected": detected,
        "marker_bits": marker_bits,
        "segments": len(base.segments),
    }


def test_a_missing_middle_segment_is_refused(
    base: Base, tmp_path: Path, fault_report: Figures
) -> None:
    injected = survived = 0
    for n, gone in enumerate(base.segments[:-1]):
        log = base.copy(tmp_path / "d")
        (log / gone.name).unlink()
        after = base.segments[base.segments.index(gone) + 1].name
        injected += 1
        found: CheckReport = check_log(log)
        assert [(d.segment, d.kind) for d in found.damaged] == [(after, "missing segment")]
        records, error = read_until_damage(log)
        assert records == [] and error is not None
        assert f"{log / after}: " in str(error) and "a segment is missing" in str(error)
        if n % 3 == 0:
            checked = tracker(log.parent, "log", "check")
            assert checked.returncode == 1
            assert b"missing segment" in checked.stdout
            exported = tracker(log.parent, "events", "export")
            assert exported.returncode == 1 and exported.stdout == b""
            assert b"a segment is missing" in exported.stderr
        survived += 1
    fault_report.fault = "a segment file deleted (each but the last, in turn)"
    fault_report.injected = injected
    fault_report.survived = survived
    fault_report.lost = 0
    fault_report.checked = "open refused naming the segment after the gap; log check names it"
    fault_report.detail = {"seed": SEED, "segments": len(base.segments)}
