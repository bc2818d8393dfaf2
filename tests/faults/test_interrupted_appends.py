"""Appends interrupted at random points: SIGKILL, SIGINT, a full disk, a file size limit.

Real ``tracker`` processes (``offsets commit``, ``sessions create``, ``events import`` of
one event up to two million) are interrupted at random moments. Every attempted append
carries a tag of its own (the consumer name of its commits, or the session id it
creates), so the log can be compared with the attempts: a command that exited 0 is
acknowledged and must be in the log whole; one that was interrupted must be there whole
or not at all; one refused for lack of space must be absent. Afterwards the log opens
cleanly: a new append works, ``tracker log check`` finds nothing, ``tracker verify``
finds 0 differences.

A full disk is a 1 MiB tmpfs the test mounts (where ``mount`` is not permitted, a file
size limit stands in for it), and, always, a file size limit (``RLIMIT_FSIZE``, whose
``SIGXFSZ`` Python ignores, so writes fail with ``EFBIG``).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from tests.faults.report import Figures
from tests.faults.workload import seeded
from tracker.cli import EXIT_UNAVAILABLE
from tracker.events import OffsetCommitted, SessionCreated, decode_event
from tracker.logs.file import FileLog

SCRIPT = str(Path(sys.executable).parent / "tracker")
RUNNING_FRAME = re.compile(
    r'File "[^"]*/(tracker|consumers|click)/[^"]*", line \d+, in (?!<module>)'
)
"""A traceback frame of a function of the tracker or click (not a module being imported)."""
SEED, _ = seeded("interrupted appends")
LINE = '{{"type":"offset_committed","session_id":"s{s}","consumer":"{tag}","offset":{o}}}\n'
BIG = 2_000_000


class Attempt(msgspec.Struct):
    tag: str
    size: int
    """Events the append holds."""
    how: str
    """"ok", or what interrupted it: "SIGKILL", "SIGINT", "full disk", "size limit"."""
    code: int | None = None
    stderr: str = ""


class Verdict(msgspec.Struct):
    interrupted: int = 0
    whole: int = 0
    """Interrupted appends found whole or absent (absent, for a refused one)."""
    in_log: int = 0
    """Interrupted appends found whole in the log (interrupted after their append)."""
    lost: int = 0
    """Events of acknowledged appends missing from the log."""
    problems: list[str] = msgspec.field(default_factory=list)


class Run:
    """One data dir on the shared Redis (a prefix of its own), and every attempt on it."""

    def __init__(self, data: Path, redis_url: str, prefix: str, rng: random.Random) -> None:
        self.data = data
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        self.env |= {
            "TRACKER_DATA_DIR": str(data),
            "TRACKER_REDIS_URL": redis_url,
            "TRACKER_PREFIX": prefix,
        }
        self.rng = rng
        self.attempts: list[Attempt] = []
        self.durations: dict[str, float] = {}

    def tracker(
        self, *args: str, limit: int | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [SCRIPT, *args], env=self.env, capture_output=True, text=True, timeout=600,
            check=False, preexec_fn=file_size_limit(limit),
        )  # fmt: skip
        if check:
            assert done.returncode == 0, (args, done.stderr)
        return done

    def attempt(
        self,
        argv: list[str],
        tag: str,
        size: int,
        *,
        sig: signal.Signals | None = None,
        when: Callable[[float], bool] | float = 0.0,
        limit: int | None = None,
        executable: str = SCRIPT,
    ) -> Attempt:
        """Run ``tracker ARGV``; with ``sig``, send it once ``when`` (seconds, or a test
        of the elapsed time) says so, unless the command has finished by then."""
        started = time.monotonic()
        process = subprocess.Popen(
            [executable, *argv], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True,
            preexec_fn=file_size_limit(limit),  # noqa: PLW1509 - setrlimit only
        )  # fmt: skip
        how = "ok"
        if sig is not None:
            due = when if callable(when) else (lambda elapsed: elapsed >= when)
            while process.poll() is None and not due(time.monotonic() - started):
                time.sleep(0.002)
            if process.poll() is None:
                os.kill(process.pid, sig)
                how = sig.name
        _, err = process.communicate(timeout=600)
        self.durations[argv[0]] = time.monotonic() - started
        if how == "ok" and process.returncode != 0 and limit is not None:
            how = "size limit"
        result = Attempt(tag, size, how, process.returncode, err)
        self.attempts.append(result)
        return result

    def segment_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.data / "log").glob("*.seg"))

    def tags(self) -> collections.Counter[str]:
        """How many events of each tag the log holds (read directly, not through Redis)."""
        counts: collections.Counter[str] = collections.Counter()
        with FileLog(self.data / "log", create=False) as log:
            after = None
            while batches := log.read(0, after, 100_000):
                for batch in batches:
                    for record in batch.records:
                        event = decode_event(record)
                        if isinstance(event, OffsetCommitted):
                            counts[event.consumer] += 1
                        elif isinstance(event, SessionCreated):
                            counts[event.session_id] += 1
                after = batches[-1].last
        return counts

    def verdict(self) -> Verdict:
        """The log against the attempts."""
        counts = self.tags()
        verdict = Verdict()
        for a in self.attempts:
            found = counts.pop(a.tag, 0)
            if a.how == "ok":
                verdict.lost += max(0, a.size - found)
                if found != a.size:
                    verdict.problems.append(f"{a.tag}: acknowledged {a.size}, the log has {found}")
                continue
            verdict.interrupted += 1
            verdict.in_log += found == a.size
            allowed = (0,) if a.how in ("full disk", "size limit") else (0, a.size)
            if found in allowed:
                verdict.whole += 1
            else:
                verdict.problems.append(f"{a.tag} ({a.how}): {found} of {a.size} in the log")
        verdict.problems += [f"{tag}: {n} events nobody appended" for tag, n in counts.items()]
        return verdict

    def opens_cleanly(self) -> None:
        """A new append works, log check finds nothing, verify finds no difference."""
        self.attempt(["offsets", "commit", "base", "after", "1"], "after", 1)
        assert self.attempts[-1].code == 0, self.attempts[-1].stderr
        checked = self.tracker("log", "check", check=False)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        verified = self.tracker("verify", check=False)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert verified.stdout.splitlines()[-1] == "verify: 0 differences"


def file_size_limit(limit: int | None) -> Callable[[], None] | None:
    if limit is None:
        return None

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def write_events(path: Path, tag: str, count: int) -> Path:
    with open(path, "w") as out:
        for start in range(0, count, 100_000):
            stop = min(count, start + 100_000)
            out.write("".join(LINE.format(s=i % 997, tag=tag, o=i) for i in range(start, stop)))
    return path


def one_line_error(attempt: Attempt) -> bool:
    return (
        attempt.stderr.count("\n") == 1
        and attempt.stderr.startswith("error: ")
        and "Traceback" not in attempt.stderr
    )


@pytest.fixture
def make_run(
    tmp_path: Path, redis_url: str, make_prefix: Callable[[], str]
) -> Callable[[Path], Run]:
    def make(data: Path) -> Run:
        run = Run(data, redis_url, make_prefix(), random.Random(SEED))
        argv = ["sessions", "create", "--agent-id", "a", "--user-id", "u", "--id", "base"]
        assert run.attempt(argv, "base", 1).code == 0
        return run

    return make


def test_killed_and_interrupted_commands_append_all_or_nothing(
    tmp_path: Path, make_run: Callable[[Path], Run], fault_report: Figures
) -> None:
    """Commits, creates and imports of 1 to 100,000 events, SIGKILL and SIGINT at random
    moments of their run (measured first with one uninterrupted run of each)."""
    run = make_run(tmp_path / "data")
    rng = random.Random(SEED)

    def commit(n: int) -> list[str]:
        return ["offsets", "commit", "base", f"k{n}", str(n)]

    def create(n: int) -> list[str]:
        return ["sessions", "create", "--agent-id", "a", "--user-id", "u", "--id", f"c{n}"]

    run.attempt(commit(0), "k0", 1)
    commit_s = run.durations["offsets"]
    run.attempt(create(0), "c0", 1)
    create_s = run.durations["sessions"]
    files = {n: write_events(tmp_path / f"i{n}.jsonl", f"i{n}", n) for n in (1, 10, 1000, 100_000)}
    import_s = {}
    for n, source in files.items():
        run.attempt(["events", "import", str(source)], f"i{n}", n)
        import_s[n] = run.durations["events"]
    signals = [signal.SIGKILL, signal.SIGINT]
    for i in range(1, 7):
        run.attempt(commit(i), f"k{i}", 1, sig=signals[i % 2], when=rng.uniform(0, commit_s))
    for i in range(1, 5):
        run.attempt(create(i), f"c{i}", 1, sig=signals[i % 2], when=rng.uniform(0, create_s))
    for n, source in files.items():
        for k, sig in enumerate(signals):
            tag = f"i{n}-{k}"
            again = write_events(tmp_path / f"{tag}.jsonl", tag, n)
            run.attempt(
                ["events", "import", str(again)], tag, n, sig=sig, when=rng.uniform(0, import_s[n])
            )
        source.unlink()
    # Ctrl-C while Python is still starting (site, imports) prints the interpreter's own
    # traceback: no function of the tracker or of click has run yet; once one has, never
    at_startup = 0
    for a in run.attempts:
        if a.how == "SIGINT" and "Traceback" in a.stderr:
            assert not RUNNING_FRAME.search(a.stderr), a.stderr
            at_startup += 1
    verdict = run.verdict()
    run.opens_cleanly()
    fault_report.fault = "SIGKILL or SIGINT of a tracker command at a random moment of its run"
    fault_report.injected = verdict.interrupted
    fault_report.survived = verdict.whole
    fault_report.lost = verdict.lost
    fault_report.checked = (
        "each append whole or absent; every acknowledged one whole; then a new append, "
        "log check clean, verify 0 differences"
    )
    fault_report.detail = {
        "seed": SEED,
        "attempts": len(run.attempts),
        "acknowledged": sum(a.how == "ok" for a in run.attempts),
        "interrupted_after_their_append": verdict.in_log,
        "sigint_while_python_starts": at_startup,
        "commit_s": round(commit_s, 2),
        "import_100k_s": round(import_s[100_000], 2),
    }
    assert not verdict.problems, verdict.problems
    assert verdict.interrupted >= 12


WRITER = """
import signal, sys
from pathlib import Path
from tracker.events import OffsetCommitted, encode_event, new_event_ids
from tracker.logs.file import FileLog
tag, count = sys.argv[1], int(sys.argv[2])
def chunks():
    for start in range(0, count, 10_000):
        ids = new_event_ids(10_000)
        yield [
            encode_event(OffsetCommitted(
                session_id=f"s{i % 997}", consumer=tag, offset=i, event_id=ids[i - start]
            ))
            for i in range(start, min(count, start + 10_000))
        ]
with FileLog(Path(sys.argv[3])) as log:
    log.append_stream(0, chunks())
"""
"""A writer of its own: one append of ``count`` events, as ``events import`` makes it,
without the JSON decoding that makes a CLI import of two million take a minute or more."""


def test_multi_million_event_appends_killed_while_they_are_written(
    tmp_path: Path, make_run: Callable[[Path], Run], fault_report: Figures
) -> None:
    """Killed while the frames of a two-million-event append go into the log, at a
    random fraction of it: a ``tracker events import`` once, then writers of the same
    append three times (SIGKILL twice, SIGINT once)."""
    run = make_run(tmp_path / "data")
    rng = random.Random(SEED + 1)
    sample = write_events(tmp_path / "sample.jsonl", "sample", 10_000)
    before = run.segment_bytes()
    run.attempt(["events", "import", str(sample)], "sample", 10_000)
    sizes = [(run.segment_bytes() - before) / 10_000]  # bytes per event in the log
    fractions = []

    def grown_by(fraction: float) -> Callable[[float], bool]:
        start = run.segment_bytes()
        target = start + fraction * BIG * sizes[-1]
        fractions.append(fraction)
        return lambda _: run.segment_bytes() >= target

    source = write_events(tmp_path / "big.jsonl", "big", BIG)
    started = time.monotonic()
    run.attempt(
        ["events", "import", str(source)], "big", BIG,
        sig=signal.SIGKILL, when=grown_by(rng.uniform(0.05, 0.95)),
    )  # fmt: skip
    import_s = time.monotonic() - started
    source.unlink()
    log_dir = str(run.data / "log")
    before = run.segment_bytes()
    run.attempt(["-c", WRITER, "wsample", "10000", log_dir], "wsample", 10_000,
                executable=sys.executable)  # fmt: skip
    sizes.append((run.segment_bytes() - before) / 10_000)  # no recorded_at: smaller
    for k, sig in enumerate([signal.SIGKILL, signal.SIGINT, signal.SIGKILL]):
        tag = f"w{k}"
        run.attempt(
            ["-c", WRITER, tag, str(BIG), log_dir], tag, BIG,
            sig=sig, when=grown_by(rng.uniform(0.05, 0.95)), executable=sys.executable,
        )  # fmt: skip
    verdict = run.verdict()
    run.opens_cleanly()
    fault_report.fault = "SIGKILL or SIGINT while a 2,000,000-event append is being written"
    fault_report.injected = verdict.interrupted
    fault_report.survived = verdict.whole
    fault_report.lost = verdict.lost
    fault_report.checked = "each append whole or absent; then a new append, log check, verify"
    fault_report.detail = {
        "seed": SEED,
        "events_per_append": BIG,
        "cli_import_killed_after_s": round(import_s, 1),
        "fractions_written": ",".join(f"{f:.2f}" for f in fractions),
        "interrupted_after_their_append": verdict.in_log,
    }
    assert not verdict.problems, verdict.problems
    assert verdict.interrupted == 4


@contextlib.contextmanager
def small_disk(where: Path, kind: str) -> Iterator[str]:
    """A 1 MiB tmpfs mounted at ``where`` ("tmpfs"), else a plain directory ("rlimit")."""
    where.mkdir()
    if kind == "tmpfs":
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
            capture_output=True, check=False,
        )  # fmt: skip
        if mounted.returncode == 0:
            try:
                yield "tmpfs"
            finally:
                subprocess.run(["umount", "-l", str(where)], check=False)
            return
    yield "rlimit"


@pytest.mark.parametrize("kind", ["tmpfs", "rlimit"])
def test_a_full_disk_refuses_the_append_whole_with_one_line(
    tmp_path: Path, make_run: Callable[[Path], Run], fault_report: Figures, kind: str
) -> None:
    """Imports refused while spooled and while written into the log, a single-event
    import and a commit with no room left: each exits 75 (try again) with one line."""
    rng = random.Random(SEED + 2)
    with small_disk(tmp_path / "disk", kind) as limiter:
        run = make_run(tmp_path / "disk" / "data")
        seed = write_events(tmp_path / "seed.jsonl", "seed", 1_000)
        assert run.attempt(["events", "import", str(seed)], "seed", 1_000).code == 0
        log = run.data / "log"

        def room() -> int:
            if limiter == "tmpfs":
                stat = os.statvfs(log)
                return stat.f_bavail * stat.f_frsize
            return 1 << 20

        def limit_for(extra: int) -> int | None:
            return run.segment_bytes() + extra if limiter == "rlimit" else None

        per_event = run.segment_bytes() / 1_000
        refused: list[Attempt] = []
        # too big for the spool: refused before the log is touched
        n = int(1.5 * max(room(), limit_for(0) or 0) / per_event) + 1000
        big = write_events(tmp_path / "big.jsonl", "toobig", n)
        refused.append(run.attempt(["events", "import", str(big)], "toobig", n, limit=limit_for(0)))
        # the spool fits, the log does not: refused while the frames are written
        fraction = rng.uniform(0.6, 0.9)
        # with a file size limit (per file): the spool must fit under the segment's size
        # plus half the spool's, so it holds fewer events than twice the segment
        n = int(fraction * room() / per_event) if limiter == "tmpfs" else 1_500
        half = write_events(tmp_path / "half.jsonl", "half", n)
        spool = int(n * per_event * 1.1)
        refused.append(
            run.attempt(["events", "import", str(half)], "half", n, limit=limit_for(spool // 2))
        )
        filler = tmp_path / "disk" / "filler"
        if limiter == "tmpfs":  # no room at all
            fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                while os.write(fd, b"\0" * 4096):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        one = write_events(tmp_path / "one.jsonl", "one", 1)
        refused.append(run.attempt(["events", "import", str(one)], "one", 1, limit=limit_for(10)))
        committed = run.attempt(
            ["offsets", "commit", "base", "full", "7"], "full", 1, limit=limit_for(10)
        )
        if committed.code != 0:  # on tmpfs it may still fit in the segment's last page
            refused.append(committed)
        for a in run.attempts:
            if a.code not in (0, None) and a.how == "ok":
                a.how = "full disk"
        assert limiter == "tmpfs" or committed.code != 0
        for a in refused:
            assert a.code == EXIT_UNAVAILABLE, (a.tag, a.code, a.stderr)
            assert one_line_error(a), a.stderr
            assert "nothing was appended" in a.stderr, a.stderr
        assert ".seg" not in refused[0].stderr, "refused while spooled"
        assert ".seg" in refused[1].stderr, "refused while written into the log"
        assert not [p for p in log.iterdir() if p.name.startswith("append-")], "a spool was left"
        filler.unlink(missing_ok=True)
        verdict = run.verdict()
        run.opens_cleanly()
    fault_report.fault = (
        "a full 1 MiB tmpfs" if limiter == "tmpfs" else "a file size limit (RLIMIT_FSIZE)"
    ) + (" (mount not permitted: a file size limit)" if kind != limiter else "")
    fault_report.injected = len(refused)
    fault_report.survived = sum(
        a.code == EXIT_UNAVAILABLE and one_line_error(a) for a in refused
    ) - len(verdict.problems)
    fault_report.lost = verdict.lost
    fault_report.checked = (
        "exit 75 with one line, nothing appended; acknowledged appends whole; then a new "
        "append, log check clean, verify 0 differences"
    )
    fault_report.detail = {"seed": SEED, "refused": ", ".join(a.tag for a in refused)}
    assert not verdict.problems, verdict.problems


def test_a_spool_cut_short_by_a_full_disk_is_never_appended(
    tmp_path: Path, make_run: Callable[[Path], Run], fault_report: Figures
) -> None:
    """An import's spool fills the disk (its one frame written short, which raises
    nothing by itself) while another process holds the log's lock; then room is made
    and the lock let go: the import must fail, not append what the spool kept."""
    with small_disk(tmp_path / "disk", "tmpfs") as limiter:
        if limiter != "tmpfs":
            pytest.skip("mount -t tmpfs is not permitted here")
        run = make_run(tmp_path / "disk" / "data")
        log = run.data / "log"
        filler = tmp_path / "disk" / "filler"
        stat = os.statvfs(log)
        with open(filler, "wb") as out:
            out.write(b"\0" * (stat.f_bavail * stat.f_frsize - (300 << 10)))
        source = write_events(tmp_path / "spool.jsonl", "spool", 5_000)  # ~650 KB spooled
        lock = os.open(log / "LOCK", os.O_RDWR)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            process = subprocess.Popen(
                [SCRIPT, "events", "import", str(source)], env=run.env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while os.statvfs(log).f_bavail > 0 and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            filler.unlink()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        _, err = process.communicate(timeout=120)
        attempt = Attempt("spool", 5_000, "full disk", process.returncode, err)
        run.attempts.append(attempt)
        verdict = run.verdict()
        run.opens_cleanly()
    fault_report.fault = "an import's spool filled the disk; room made before its copy"
    fault_report.injected = 1
    fault_report.survived = int(not verdict.problems and attempt.code == EXIT_UNAVAILABLE)
    fault_report.lost = verdict.lost
    fault_report.checked = "exit 75, nothing appended; then a new append, log check, verify"
    fault_report.detail = {"seed": SEED}
    assert attempt.code == EXIT_UNAVAILABLE and one_line_error(attempt), err
    assert not verdict.problems, verdict.problems
