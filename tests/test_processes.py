"""Many processes on one data dir and one Redis: writers, readers, CLI commands and replays.

Each test starts real processes (the ``tracker`` console script, or small Python programs
using the public API), lets them run at the same time, and checks what users would see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import redis

from tests.services import read_only_tree, stop_process, without_write_access
from tracker import Settings, Tracker

TRACKER = str(Path(sys.executable).with_name("tracker"))


def env_for(data_dir: Path, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env["TRACKER_DATA_DIR"] = str(data_dir)
    env["TRACKER_FSYNC"] = "0"
    env.update(values)
    return env


def run_cli(
    args: Sequence[str], env: dict[str, str], **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TRACKER, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


@contextmanager
def background(code: str, env: dict[str, str], output: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A Python program running until the test is done (it stops when ``<output>.stop`` exists)."""
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        yield process
    finally:
        output.with_suffix(".stop").write_text("stop")
        try:
            process.wait(timeout=60)
        finally:
            stop_process(process)


def wait_for_file(path: Path, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the background process did not get going"
        time.sleep(0.02)


WRITER = """
    import pathlib, sys
    from tracker import Tracker
    out = pathlib.Path({out!r})
    with Tracker.open() as tracker:
        for i in range(20):
            tracker.create_session("agent-1", "user-1", session_id=f"w{{i}}", title=f"t{{i}}")
        (out.with_suffix(".ready")).write_text("ok")
        n = 0
        while not out.with_suffix(".stop").exists():
            n += 1
            tracker.commit_many([(f"w{{i}}", "worker", n) for i in range(20)], wait={wait})
        tracker.commit_many([(f"w{{i}}", "worker", n + 1) for i in range(20)])
        print("last", n + 1, flush=True)
"""


def test_cli_commands_run_next_to_a_writing_process(tmp_path: Path) -> None:
    """The embedded default: one process keeps the data dir open and writing; others come and go."""
    data_dir = tmp_path / "data"
    env = env_for(data_dir)
    out = tmp_path / "writer.log"
    with background(WRITER.format(out=str(out), wait=True), env, out) as writer:
        wait_for_file(out.with_suffix(".ready"), writer, out)
        for args in (
            ["offsets", "commit", "w3", "cli", "7"],
            ["sessions", "show", "w3", "--json"],
            ["offsets", "show", "w3", "--json"],
            ["sessions", "list", "--json"],
            ["events", "export"],
            ["verify"],
        ):
            started = time.monotonic()
            result = run_cli(args, env)
            assert result.returncode == 0, (args, result.stderr)
            assert time.monotonic() - started < 30, args
            if args[0] == "verify":
                assert result.stdout.splitlines()[-1] == "verify: 0 differences"
        shown = json.loads(run_cli(["offsets", "show", "w3", "--json"], env).stdout)
        assert shown["cli"] == 7 and shown["worker"] >= 1
        assert writer.poll() is None, out.read_text()
    last = int(out.read_text().split("last")[-1].split()[0])
    final = run_cli(["offsets", "show", "w19", "--json"], env)
    assert json.loads(final.stdout)["worker"] == last
    assert run_cli(["verify"], env).stdout.splitlines()[-1] == "verify: 0 differences"


RACER = """
    from tracker import Tracker
    with Tracker.open() as tracker:
        for i in range(150):
            tracker.commit_many(
                [(f"s{{k}}", "own-{w}", i) for k in range(8)]
                + [(f"s{{k}}", "shared", i * 3 + {w}) for k in range(8)],
                wait=i % 2 == 0,
            )
            if i % 50 == 0:
                tracker.create_session("agent", "user", session_id=f"r{w}-{{i}}")
"""


def test_writer_processes_racing_on_one_log(tmp_path: Path, redis_url: str, prefix: str) -> None:
    """No writer fences on its idea of the log's end: whatever the interleaving, the fold wins."""
    data_dir = tmp_path / "data"
    env = env_for(data_dir, TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix)
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RACER.format(w=w))],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        for w in range(3)
    ]
    for racer in racers:
        _, err = racer.communicate(timeout=180)
        assert racer.returncode == 0, err.decode()
    settings = Settings(data_dir=data_dir, redis_url=redis_url, prefix=prefix)
    with Tracker.open(settings=settings) as tracker:
        assert tracker.event_count() == 3 * (150 * 16 + 3)
        for k in range(8):
            expected = {"shared": 149 * 3 + 2} | {f"own-{w}": 149 for w in range(3)}
            assert tracker.offsets(f"s{k}") == expected
        assert len(tracker.list_sessions()) == 9
        assert tracker.verify().differences == []


READER = """
    import pathlib
    from tracker import Reader
    out = pathlib.Path({out!r})
    reader = Reader.connect({url!r}, {prefix!r})
    generations = reader.generations
    reads = misses = 0
    seen = set()
    while not out.with_suffix(".stop").exists():
        for i in range(20):
            reads += 1
            if reader.get_session(f"w{{i}}") is None:
                misses += 1
                print("miss", i, flush=True)
        seen.add(generations.meta.generation)
        (out.with_suffix(".ready")).write_text("ok")
    print("reads", reads, "misses", misses, "generations", sorted(seen), flush=True)
"""


def test_replay_while_other_processes_read_and_write(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """No read answers "not found" for a session that exists, no commit is lost, all rebind."""
    data_dir = tmp_path / "data"
    env = env_for(data_dir, TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix)
    writer_out, reader_out = tmp_path / "writer.log", tmp_path / "reader.log"
    with background(WRITER.format(out=str(writer_out), wait=True), env, writer_out) as writer:
        wait_for_file(writer_out.with_suffix(".ready"), writer, writer_out)
        code = READER.format(out=str(reader_out), url=redis_url, prefix=prefix)
        with background(code, env, reader_out) as reader:
            wait_for_file(reader_out.with_suffix(".ready"), reader, reader_out)
            for _ in range(3):
                result = run_cli(["replay", "--json"], env)
                assert result.returncode == 0, result.stderr
                time.sleep(0.3)
            assert writer.poll() is None, writer_out.read_text()
            assert reader.poll() is None, reader_out.read_text()
    summary = reader_out.read_text().splitlines()[-1].split()
    assert summary[0] == "reads" and int(summary[1]) > 0
    assert summary[3] == "0", reader_out.read_text()[-2000:]
    generations = json.loads("".join(summary[5:]))
    assert len(generations) >= 2, "the reader followed the replays to new generations"
    last = int(writer_out.read_text().split("last")[-1].split()[0])
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        active = int(client.hget(f"{prefix}:meta", "generation") or 0)
    assert generations[-1] == active
    settings = Settings(data_dir=data_dir, redis_url=redis_url, prefix=prefix)
    with Tracker.open(settings=settings) as tracker:
        for i in range(20):
            assert tracker.offsets(f"w{i}")["worker"] == last, "no commit was lost"
        assert tracker.verify().differences == []


def test_export_and_verify_on_a_read_only_data_dir(tmp_path: Path) -> None:
    """A backup: the log can be exported and verified without writing a byte to it."""
    data_dir = tmp_path / "data"
    env = env_for(data_dir)
    for args in (
        ["sessions", "create", "--agent-id", "A", "--user-id", "U", "--id", "ro-1"],
        ["offsets", "commit", "ro-1", "client", "5"],
    ):
        assert run_cli(args, env).returncode == 0
    exported = run_cli(["events", "export"], env).stdout
    assert len(exported.splitlines()) == 2
    listing = sorted(str(p) for p in data_dir.rglob("*"))
    with read_only_tree(data_dir):
        for args, expected in ((["events", "export"], exported), (["verify"], None)):
            result = subprocess.run(
                without_write_access([TRACKER, *args]),
                env=env, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 0, (args, result.stderr)
            assert "Traceback" not in result.stderr
            if expected is not None:
                assert result.stdout == expected
            else:
                assert result.stdout.splitlines()[-1] == "verify: 0 differences"
        refused = subprocess.run(
            without_write_access([TRACKER, "offsets", "commit", "ro-1", "client", "6"]),
            env=env, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert refused.returncode != 0
        assert len(refused.stderr.splitlines()) == 1 and "Traceback" not in refused.stderr
    assert sorted(str(p) for p in data_dir.rglob("*")) == listing


def test_replays_racing_each_other_leave_a_working_projection(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    data_dir = tmp_path / "data"
    env = env_for(data_dir, TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix)
    settings = Settings(data_dir=data_dir, redis_url=redis_url, prefix=prefix, fsync=False)
    with Tracker.open(settings=settings) as tracker:
        for i in range(100):
            tracker.create_session("agent", "user", session_id=f"rr{i}")
        tracker.commit_many([(f"rr{i}", "client", k) for k in range(30) for i in range(100)])
    for round_ in range(4):
        replays = [
            subprocess.Popen(
                [TRACKER, "replay"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            for _ in range(2)
        ]
        for process in replays:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err.decode()
        assert json.loads(run_cli(["offsets", "show", "rr7", "--json"], env).stdout) == {
            "client": 29 + round_
        }
        assert (
            run_cli(["offsets", "commit", "rr7", "client", str(30 + round_)], env).returncode == 0
        )
        assert run_cli(["verify"], env).stdout.splitlines()[-1] == "verify: 0 differences"


def test_two_data_dirs_racing_for_a_fresh_prefix_get_one_projection(
    tmp_path: Path, redis_url: str, make_prefix: Callable[[], str]
) -> None:
    """Whoever promotes first owns the prefix; the other is refused, never merged into it."""
    for round_ in range(6):
        prefix = make_prefix()
        racers = [
            subprocess.Popen(
                [
                    TRACKER,
                    "sessions",
                    "create",
                    "--agent-id",
                    "a",
                    "--user-id",
                    "u",
                    "--id",
                    f"d{side}",
                ],
                env=env_for(
                    tmp_path / f"r{round_}-{side}",
                    TRACKER_REDIS_URL=redis_url,
                    TRACKER_PREFIX=prefix,
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for side in range(2)
        ]
        errors = [racer.communicate(timeout=60)[1] for racer in racers]
        codes = [racer.returncode for racer in racers]
        assert sorted(codes) == [0, 1], (codes, errors)
        loser = codes.index(1)
        assert "another log" in errors[loser] and "--prefix" in errors[loser]
        winner_env = env_for(tmp_path / f"r{round_}-{1 - loser}", TRACKER_REDIS_URL=redis_url,
                             TRACKER_PREFIX=prefix)  # fmt: skip
        listed = run_cli(["sessions", "list", "--json"], winner_env).stdout.splitlines()
        assert [json.loads(line)["id"] for line in listed] == [f"d{1 - loser}"]
        assert run_cli(["verify"], winner_env).stdout.splitlines()[-1] == "verify: 0 differences"
