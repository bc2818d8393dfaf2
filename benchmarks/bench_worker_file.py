"""A worker on a file stream against reading the same stream with the log reader alone.

Setup (not timed): a file stream of ``--messages`` synthetic flux0 events over
``--sessions`` sessions (``consumers.generate.synthetic_messages``: message events of
about 420 bytes, each session's offsets 0, 1, 2, ... round-robin), written with
``consumers.filestream.append_messages`` as ``tracker streams append --generate`` writes
it (fsync on, the default).

Timed, per repeat:

* ``worker`` (the headline): ``consumers.worker.Worker`` reading the stream through a
  ``FileStream`` as a consumer of its own (``bench<N>``), into an embedded-default
  ``Tracker`` (a file log with fsync on and an embedded ``redis-server`` in a fresh temp
  data dir: AOF ``everysec``), with the default handler (``acknowledge``) and the default
  flush settings (``--flush-ms 200``, ``--flush-max 5000``): from the worker's first
  poll until ``stats.processed`` reaches the message count (checked after every handled
  poll); the final flush after that is reported apart (``final_flush_seconds``). Every
  flush appends ``offset_committed`` events (``commit_many(wait=False)``, one fsync)
  and then replaces the consumer's position file (two fsyncs), as the product does; the
  tracker's background thread projects meanwhile. After each repeat the offsets of every
  session are checked in Redis (each session's last offset, untimed).

Ceilings, measured right after each repeat, on the same stream directory:

* ``read`` (the ratio): ``FileLog.read`` (the stream's own log, ``READ_RECORDS`` per
  read, as ``FileStream.poll`` reads) from the start to the end, counting records: CRC
  check and frame decode, nothing per message;
* ``read_decode``: the same plus what the worker minimally does per record:
  ``decode_record`` (msgpack: key, value, headers) then ``decode_message`` (the JSON
  value's ``offset``, the session id from the key). Not the ratio: it shows where the
  time goes (the worker cannot beat it).

Also per repeat, a diagnostic: ``worker.without_flushes``, the same worker with flush
settings so large that it flushes once, after the timed span: handling alone. The
difference to the headline is what the flushes cost (``worker.flush_share``).

``--profile N`` runs the worker once more under cProfile and logs the top N functions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (
    emit,
    log,
    median,
    parser,
    rate_summary,
    timed,
    verdict,
    workdir,
)
from consumers.filestream import READ_RECORDS, FileStream, append_messages, open_stream_log
from consumers.generate import session_ids, synthetic_messages
from consumers.messages import decode_message, decode_record
from consumers.streams import Chunk
from consumers.worker import Stats, Worker
from tracker import Settings, Tracker

TARGET_RATIO = 0.7
"""Of the worker's rate over the log reader's rate, same stream, same run."""


# -- timing a worker ----------------------------------------------------------------------


class WorkerClock:
    """Runs a worker on this thread until it has processed ``expected`` messages.

    ``start``: the first poll call (``on_first_message=False``) or the return of the first
    poll that brought messages (``True``, for a consumer group whose join is not timed).
    ``done``: the return of the handling that brought ``stats.processed`` to ``expected``;
    the worker is stopped once it processed ``stop_at`` (default: ``expected``), and
    ``stopped`` is when ``run`` returned (its final flush included). The worker's
    ``stream.poll`` and ``_handle`` are wrapped on the instance.
    """

    def __init__(
        self,
        worker: Worker,
        expected: int,
        *,
        on_first_message: bool,
        stop_at: int | None = None,
    ) -> None:
        self.worker = worker
        self.expected = expected
        self.stop_at = expected if stop_at is None else stop_at
        self.start: float | None = None
        self.done: float | None = None
        self.stopped: float | None = None
        self.counted = 0
        """``stats.processed`` at ``done``: up to a poll's messages past ``expected``."""
        self.polls = 0
        stream = worker.stream
        poll, handle = stream.poll, worker._handle

        def timed_poll(timeout: float) -> list[Chunk]:
            if self.start is None and not on_first_message:
                self.start = time.perf_counter()
            chunks = poll(timeout)
            if chunks:
                self.polls += 1
                if self.start is None:
                    self.start = time.perf_counter()
            return chunks

        def timed_handle(chunks: list[Chunk]) -> None:
            handle(chunks)
            if self.done is None and worker.stats.processed >= expected:
                self.done = time.perf_counter()
                self.counted = worker.stats.processed
            if worker.stats.processed >= self.stop_at:
                worker.stop()

        setattr(stream, "poll", timed_poll)  # noqa: B010 - wrapped on this instance only
        setattr(worker, "_handle", timed_handle)  # noqa: B010

    def run(self, timeout: float) -> Stats:
        """``worker.run()`` here; stopped after ``timeout`` seconds if it is not done."""
        guard = threading.Timer(timeout, self.worker.stop)
        guard.daemon = True
        guard.start()
        try:
            stats = self.worker.run()
        finally:
            guard.cancel()
        self.stopped = time.perf_counter()
        if self.done is None or self.start is None or stats.processed < self.stop_at:
            raise RuntimeError(
                f"the worker processed {stats.processed} of {self.stop_at} messages "
                f"within {timeout:g} s"
            )
        return stats

    @property
    def seconds(self) -> float:
        assert self.start is not None and self.done is not None
        return self.done - self.start

    @property
    def final_flush_seconds(self) -> float:
        """From ``done`` until ``run`` returned (with ``stop_at`` > ``expected``: the rest)."""
        assert self.done is not None and self.stopped is not None
        return self.stopped - self.done


def stats_of(stats: Stats) -> dict[str, int]:
    return {name: int(getattr(stats, name)) for name in Stats.__slots__}


def check_offsets(tracker: Tracker, consumer: str, messages: int, sessions: int) -> int:
    """Every session's offset for ``consumer`` is its last one; how many were checked."""
    for n, sid in enumerate(session_ids(sessions)):
        expected = (messages - 1 - n) // sessions
        if expected < 0:
            continue
        found = tracker.offsets(sid).get(consumer)
        if found != expected:
            raise RuntimeError(f"{sid}: offset of {consumer} is {found}, expected {expected}")
    return sessions


# -- the case -----------------------------------------------------------------------------


def write_stream(directory: Path, messages: int, sessions: int, seed: int) -> dict[str, Any]:
    """The stream, as ``tracker streams append --generate`` writes it (fsync on)."""
    started = time.perf_counter()
    stream_log = open_stream_log(directory, create=True)
    try:
        count = append_messages(stream_log, synthetic_messages(messages, sessions, seed=seed))
    finally:
        stream_log.close()
    size = sum(p.stat().st_size for p in directory.glob("*.seg"))
    return {
        "messages": count,
        "bytes_on_disk": size,
        "bytes_per_message": round(size / count, 1),
        "write_seconds": round(time.perf_counter() - started, 2),
    }


def read_all(directory: Path, *, decode: bool) -> int:
    """``FileLog.read`` of the stream to its end (``READ_RECORDS`` a read): the records
    counted, or (``decode``) each decoded as the worker must: ``decode_record`` then
    ``decode_message``."""
    stream_log = open_stream_log(directory, create=False)
    try:
        after = None
        count = 0
        while True:
            batches = stream_log.read(0, after, READ_RECORDS)
            if not batches:
                return count
            for batch in batches:
                if decode:
                    for record in batch.records:
                        r = decode_record(record)
                        decode_message(0, count, r.key, r.value, r.headers)
                        count += 1
                else:
                    count += len(batch.records)
            after = batches[-1].last
    finally:
        stream_log.close()


def run_worker(
    stream_dir: Path,
    data_dir: Path,
    consumer: str,
    args: argparse.Namespace,
    *,
    flush: bool = True,
    around: Callable[[Callable[[], Stats]], Stats] | None = None,
) -> dict[str, Any]:
    """One worker over the whole stream into a fresh embedded tracker; its figures.

    ``flush=False``: flush settings so large that the worker flushes once, at the end
    (not timed): what handling the messages costs without the flushes in between.
    """
    opened = time.perf_counter()
    tracker = Tracker(Settings(data_dir=data_dir))
    try:
        stream = FileStream(stream_dir, consumer)
        try:
            worker = Worker(
                stream,
                tracker,
                consumer,
                flush_ms=args.flush_ms if flush else 10**9,
                flush_max=args.flush_max if flush else 10**12,
            )
            clock = WorkerClock(worker, args.messages, on_first_message=False)
            open_seconds = time.perf_counter() - opened

            def go() -> Stats:
                return clock.run(timeout=600)

            stats = around(go) if around is not None else go()
        finally:
            stream.close()
        tracker.projector.catch_up()  # what the background thread has not applied yet
        checked = check_offsets(tracker, consumer, args.messages, args.sessions)
    finally:
        tracker.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {
        "seconds": clock.seconds,
        "final_flush_seconds": clock.final_flush_seconds,
        "open_seconds": open_seconds,
        "polls": clock.polls,
        "stats": stats_of(stats),
        "sessions_checked": checked,
    }


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    stream_dir = tmp / "stream"
    log(f"writing a file stream of {args.messages:,} messages over {args.sessions:,} sessions")
    written = write_stream(stream_dir, args.messages, args.sessions, args.seed)
    log(
        f"{written['messages']:,} messages, {written['bytes_on_disk'] / 1e6:.0f} MB "
        f"({written['bytes_per_message']} B each) in {written['write_seconds']} s"
    )
    n = args.messages
    worker_s: list[float] = []
    read_s: list[float] = []
    decode_s: list[float] = []
    unflushed_s: list[float] = []
    ratios: list[float] = []
    runs: list[dict[str, Any]] = []
    log("warm-up: one untimed read of the stream")
    if read_all(stream_dir, decode=False) != n:
        raise RuntimeError("the stream does not hold the messages written")
    for i in range(args.repeat):
        result = run_worker(stream_dir, tmp / f"data{i}", f"bench{i}", args)
        runs.append(result)
        worker_s.append(result["seconds"])
        seconds, count = timed(lambda: read_all(stream_dir, decode=False))
        if count != n:
            raise RuntimeError(f"read {count} records, expected {n}")
        read_s.append(seconds)
        seconds, count = timed(lambda: read_all(stream_dir, decode=True))
        decode_s.append(seconds)
        unflushed = run_worker(stream_dir, tmp / f"data{i}u", f"unflushed{i}", args, flush=False)
        unflushed_s.append(unflushed["seconds"])
        ratios.append(read_s[-1] / worker_s[-1])
        stats = result["stats"]
        log(
            f"repeat {i + 1}/{args.repeat}: worker {n / worker_s[-1]:,.0f} msgs/s "
            f"({worker_s[-1]:.3f}s, {stats['flushes']} flushes, {result['polls']} polls, "
            f"final flush {result['final_flush_seconds'] * 1000:.0f} ms); read "
            f"{n / read_s[-1]:,.0f}/s ({read_s[-1]:.3f}s); read + decode "
            f"{n / decode_s[-1]:,.0f}/s ({decode_s[-1]:.3f}s); the worker without flushes "
            f"{n / unflushed_s[-1]:,.0f}/s ({unflushed_s[-1]:.3f}s); ratio {ratios[-1]:.3f}"
        )

    profile = ""
    if args.profile:
        top = args.profile

        def under_profile(go: Callable[[], Stats]) -> Stats:
            nonlocal profile
            profiler = cProfile.Profile()
            profiler.enable()
            try:
                return go()
            finally:
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("tottime").print_stats(top)
                stats.sort_stats("cumulative").print_stats(top)
                profile = out.getvalue()

        run_worker(stream_dir, tmp / "data-profile", "profile", args, around=under_profile)
        log("cProfile of one more worker run (the worker's thread):\n" + profile)

    headline = rate_summary(n, worker_s)
    ratio = round(median(ratios), 3)
    flushes = [r["stats"]["flushes"] for r in runs]
    return {
        "bench": "worker_file",
        "params": {
            "messages": n,
            "sessions": args.sessions,
            "stream": {
                **written,
                "what": "synthetic_messages (flux0 message events), append_messages, fsync on",
            },
            "handler": "acknowledge (the default)",
            "flush_ms": args.flush_ms,
            "flush_max": args.flush_max,
            "read_records": READ_RECORDS,
            "tracker": "embedded default: file log (fsync on) + embedded redis-server in a "
            "fresh temp data dir",
            "redis_persistence": "embedded default: redis-server on a unix socket in the data "
            "dir, appendonly yes, appendfsync everysec",
            "repeat": args.repeat,
            "seed": args.seed,
        },
        "seconds": headline["seconds"],
        "median_rate": headline["median_rate"],
        "value": headline["median_rate"],
        "unit": "msgs/s (Worker + FileStream + embedded Tracker, acknowledge)",
        "target": TARGET_RATIO,
        "target_is": "ratio >= 0.7: worker rate / FileLog.read rate of the same stream",
        "meets_target": verdict(ratio, TARGET_RATIO),
        "ratio": ratio,
        "ratio_of": "worker msgs/s / ceiling.read records/s (median of per-repeat ratios)",
        "ratio_to_read_decode": round(
            median([d / w for d, w in zip(decode_s, worker_s, strict=True)]), 3
        ),
        "worker": {
            "flushes": flushes,
            "messages_per_flush": [round(n / f) if f else None for f in flushes],
            "polls": [r["polls"] for r in runs],
            "final_flush_seconds": [round(r["final_flush_seconds"], 4) for r in runs],
            "open_seconds": [round(r["open_seconds"], 3) for r in runs],
            "stats": runs[-1]["stats"],
            "sessions_checked": runs[-1]["sessions_checked"],
            "without_flushes": {
                "what": "the same worker flushing once, at the end (not timed): handling "
                "alone; the difference to the headline is what the flushes cost",
                **rate_summary(n, unflushed_s),
                "unit": "msgs/s",
            },
            "flush_share": round(1 - median(unflushed_s) / median(worker_s), 3),
            "flush_share_is": "1 - (median seconds without flushes / median seconds)",
        },
        "ceiling": {
            "read": {
                "what": "FileLog.read of the stream to its end, counting records",
                **rate_summary(n, read_s),
                "unit": "records/s",
            },
            "read_decode": {
                "what": "the same + decode_record + decode_message per record",
                **rate_summary(n, decode_s),
                "unit": "records/s",
                "ratio_to_read": round(median(read_s) / median(decode_s), 3),
            },
        },
        "profiled": bool(args.profile),
    }


def main() -> None:
    p = parser("Worker on a file stream against the log reader alone.", repeat=3)
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--sessions", type=int, default=1_000)
    p.add_argument("--flush-ms", type=int, default=200)
    p.add_argument("--flush-max", type=int, default=5_000)
    p.add_argument(
        "--profile", type=int, default=0, metavar="N", help="cProfile one more worker run, top N"
    )
    args = p.parse_args()
    with workdir(args.tmpdir, "worker-file") as tmp:
        emit(run(args, tmp))


if __name__ == "__main__":
    main()
