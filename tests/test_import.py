"""``events import`` of large files: streamed in bounded memory, and all or nothing.

Real processes of the console script, interrupted the way users interrupt them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRACKER = str(Path(sys.executable).with_name("tracker"))
LINE = '{{"type":"offset_committed","session_id":"s{s}","consumer":"client","offset":{o}}}\n'


def write_events(path: Path, count: int, *, last: str | None = None) -> Path:
    with open(path, "w") as out:
        for start in range(0, count, 100_000):
            out.write(
                "".join(
                    LINE.format(s=i % 5000, o=i) for i in range(start, min(count, start + 100_000))
                )
            )
        if last is not None:
            out.write(last)
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    values = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    values["TRACKER_DATA_DIR"] = str(tmp_path / "data")
    return values


def tracker(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRACKER, *args], env=env, capture_output=True, text=True, timeout=300, check=False
    )


def segment_bytes(env: dict[str, str]) -> dict[str, bytes]:
    log = Path(env["TRACKER_DATA_DIR"]) / "log"
    return {p.name: p.read_bytes() for p in sorted(log.glob("*.seg"))}


def exported(env: dict[str, str]) -> int:
    result = tracker("events", "export", env=env)
    assert result.returncode == 0, result.stderr
    return len(result.stdout.splitlines())


def seed(env: dict[str, str], tmp_path: Path) -> None:
    done = tracker("events", "import", str(write_events(tmp_path / "seed.jsonl", 10)), env=env)
    assert done.returncode == 0, done.stderr


MEASURED = """
import re, sys
from tracker.cli import main
try:
    main(sys.argv[1:], prog_name="tracker")
finally:
    status = open("/proc/self/status").read()
    print("peak-rss-kb", re.search(r"VmHWM:\\s+(\\d+)", status).group(1), file=sys.stderr)
"""
"""Runs the CLI and reports the process's own peak RSS: ``VmHWM``, which starts afresh at
``exec``, unlike ``ru_maxrss``, which keeps the high-water mark of the forked test runner."""


def test_two_million_events_import_in_bounded_memory(tmp_path: Path, env: dict[str, str]) -> None:
    """The import process's own peak RSS (the CLI run in a process that reports it)."""
    source = write_events(tmp_path / "big.jsonl", 2_000_000)
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, "events", "import", str(source)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "imported 2000000 events" in done.stderr
    peak_mb = int(done.stderr.split("peak-rss-kb ")[1].split()[0]) / 1024
    assert peak_mb < 200, f"the import peaked at {peak_mb:.0f} MB of RSS"
    assert tracker("offsets", "show", "s4999", "--json", env=env).stdout.strip() == (
        '{"client":1999999}'
    )


def interrupted_import(env: dict[str, str], source: Path, sig: int) -> subprocess.Popen[str]:
    """Start an import and send ``sig`` once it has written frames of its append."""
    start = sum(len(v) for v in segment_bytes(env).values())
    process = subprocess.Popen(
        [TRACKER, "events", "import", str(source)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while sum(len(v) for v in segment_bytes(env).values()) <= start:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the import wrote nothing"
        time.sleep(0.005)
    os.kill(process.pid, sig)
    return process


def test_ctrl_c_during_an_import_leaves_the_log_untouched(
    tmp_path: Path, env: dict[str, str]
) -> None:
    seed(env, tmp_path)
    before = segment_bytes(env)
    process = interrupted_import(
        env, write_events(tmp_path / "big.jsonl", 1_000_000), signal.SIGINT
    )
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in err
    assert segment_bytes(env) == before, "the frames already written were cut"
    assert exported(env) == 10


def test_kill_9_during_an_import_then_running_it_again_imports_once(
    tmp_path: Path, env: dict[str, str]
) -> None:
    seed(env, tmp_path)
    source = write_events(tmp_path / "big.jsonl", 1_000_000)
    process = interrupted_import(env, source, signal.SIGKILL)
    process.communicate(timeout=60)
    first = tracker("events", "export", env=env)
    assert len(first.stdout.splitlines()) == 10, "an unfinished append is never read"
    assert "repaired" in first.stderr, "the first to open the log cut it and said so"
    done = tracker("events", "import", str(source), env=env)
    assert done.returncode == 0, done.stderr
    assert exported(env) == 10 + 1_000_000
    assert tracker("verify", env=env).stdout.splitlines()[-1] == "verify: 0 differences"


def test_a_bad_last_line_of_a_large_import_imports_nothing(
    tmp_path: Path, env: dict[str, str]
) -> None:
    seed(env, tmp_path)
    before = segment_bytes(env)
    source = write_events(tmp_path / "bad.jsonl", 300_000, last='{"type": "nonsense"}\n')
    done = tracker("events", "import", str(source), env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("error: line 300001:"), done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert segment_bytes(env) == before
