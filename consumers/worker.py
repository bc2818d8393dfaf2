"""The worker: read a stream, hand each message to the handler, record offsets, commit.

Per (session, consumer) the worker keeps the highest offset handled since the last flush.
Every ``flush_ms`` (or ``flush_max`` messages) it appends them as ``offset_committed``
events (``commit_many(wait=False)``: the log's acknowledgement is the durability point),
writes its dead letters, and only then commits the stream positions. A crash therefore
loses no acknowledged offset and at worst redelivers messages, which is harmless: offsets
are max-registers. A flush runs on a thread of its own, one at a time: handling goes on
while the log's acknowledgement is awaited, and the main thread commits the positions of
a flush once it has ended.

With a consumer group the handler runs on a thread of its own while the main thread keeps
polling with the partitions paused: a slow handler never gets the worker thrown out of the
group, and a rebalance can flush while a batch is in progress (the batch stops at the next
message; what it did not handle is read again by the next owner).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

from consumers.handlers import Attempts, Handler, Interrupted, acknowledge
from consumers.messages import Undecodable, decode_message, message_ids
from consumers.streams import Chunk, DeadLetter, Incoming, Stream
from tracker.errors import TrackerError
from tracker.service import Tracker

log = logging.getLogger(__name__)


def _letter(partition: int, message: Incoming, reason: str) -> DeadLetter:
    return DeadLetter(
        partition, message.position, message.key, message.value, message.headers, reason
    )


class _Taken(NamedTuple):
    """One flush's share: the highest offsets, positions and dead letters since the last."""

    pending: dict[str, int]
    positions: dict[int, int]
    letters: list[DeadLetter]
    unflushed: int

    def __bool__(self) -> bool:
        return bool(self.pending or self.positions or self.letters)


class Stats:
    """Counters for the summary line; read by any thread, written by the worker.
    ``flushes`` counts flushes begun (each takes at most ``flush_max`` messages and a poll)."""

    __slots__ = ("committed", "dead_lettered", "flushes", "processed", "retried")

    def __init__(self) -> None:
        self.processed = 0
        self.committed = 0
        self.dead_lettered = 0
        self.retried = 0
        self.flushes = 0


class Worker:
    """Reads ``stream`` as ``consumer`` and records offsets in ``tracker``; see the module doc."""

    def __init__(
        self,
        stream: Stream,
        tracker: Tracker,
        consumer: str,
        handler: Handler = acknowledge,
        *,
        flush_ms: int = 200,
        flush_max: int = 5_000,
        max_attempts: int = 5,
        backoff: float = 0.1,
        report_every: float = 5.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self.stream = stream
        self.tracker = tracker
        self.consumer = consumer
        self.flush_interval = flush_ms / 1000
        self.flush_max = flush_max
        self.report_every = report_every
        self._report = report
        self._attempts = Attempts(handler, max_attempts=max_attempts, backoff=backoff)
        self._acknowledge_only = handler is acknowledge
        self.stats = Stats()
        self._stopping = threading.Event()
        self._state = threading.Lock()
        """Held while a batch is handled and while a flush takes its results."""
        self._pending: dict[str, int] = {}
        self._positions: dict[int, int] = {}
        self._letters: list[DeadLetter] = []
        self._unflushed = 0
        self._oldest: float | None = None
        self._flush_failures = 0
        self._dead_flushed = 0
        self._flushing = threading.RLock()
        """Held for the whole of a flush: flushes never overlap, and run in order."""
        self._acked: dict[int, int] = {}
        """Positions whose flush the log acknowledged, not committed yet."""
        self._flusher = ThreadPoolExecutor(1, thread_name_prefix="tracker-flush")
        self._inflight: Future[None] | None = None
        keep_alive = getattr(stream, "needs_keep_alive", False)
        self._keep_alive_after = (
            getattr(stream, "max_poll_interval", 300.0) / 4 if keep_alive else None
        )
        if hasattr(stream, "flush"):
            stream.flush = self._take_and_flush

    def stop(self) -> None:
        """Ask the worker to flush and return (from a signal handler or another thread)."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> Stats:
        """Work until :meth:`stop`; flush and commit before returning."""
        last_report = started = time.monotonic()
        last_processed = 0
        try:
            while not self._stopping.is_set():
                timeout = (
                    self.flush_interval
                    if self._oldest is None
                    else max(0.0, self._oldest + self.flush_interval - time.monotonic())
                )
                chunks = self.stream.poll(min(timeout, 0.5) if timeout else 0.05)
                if chunks:
                    self._handle(chunks)
                if self._inflight is not None and (
                    self._inflight.done() or self._unflushed >= self.flush_max
                ):  # at most one flush in flight: a flush takes at most flush_max messages
                    self._finish_flush()
                if self._inflight is None and self._flush_due():
                    self._inflight = self._flusher.submit(self._write, self._take())
                now = time.monotonic()
                if self.report_every and now - last_report >= self.report_every:
                    rate = (self.stats.processed - last_processed) / (now - last_report)
                    self._say(self.summary(rate))
                    last_report, last_processed = now, self.stats.processed
        finally:
            self._final_flush()
            self._flusher.shutdown()
            self._attempts.close()
        elapsed = time.monotonic() - started
        self._say(self.summary(self.stats.processed / elapsed if elapsed else 0.0, final=True))
        return self.stats

    def _final_flush(self) -> None:
        """Flush and commit, retrying a retriable failure a few times (``flush`` would
        only wait for the next loop, and there is none)."""
        if self._inflight is not None:
            with contextlib.suppress(TrackerError):  # a failed flush's results are kept
                self._finish_flush()
        for attempt in range(5):
            try:
                positions = self._take_and_flush()
                if positions:
                    self.stream.commit(positions)
                return
            except TrackerError as exc:
                retrying = exc.retriable and attempt < 4
                log.warning(
                    "final flush failed (%s); %s",
                    exc,
                    "retrying"
                    if retrying
                    else "giving up: the messages since the last commit will be read again",
                )
                if not retrying:
                    return
                time.sleep(0.5 * (attempt + 1))

    def _flush_due(self) -> bool:
        if self._oldest is None:
            return False
        return (
            self._unflushed >= self.flush_max
            or time.monotonic() - self._oldest >= self.flush_interval
        )

    def _handle(self, chunks: list[Chunk]) -> None:
        if self._keep_alive_after is None or self._acknowledge_only:
            # No handler to wait for (a poll's messages take a millisecond or two): no
            # thread, whose start alone costs more than that on a busy machine.
            for chunk in chunks:
                self._handle_chunk(chunk)
            return
        done = threading.Event()
        failure: list[BaseException] = []

        def handle_all() -> None:
            try:
                for chunk in chunks:
                    self._handle_chunk(chunk)
            except BaseException as exc:  # re-raised on the main thread
                failure.append(exc)
            finally:
                done.set()

        threading.Thread(target=handle_all, name="tracker-handler", daemon=True).start()
        if not done.wait(self._keep_alive_after):
            log.warning(
                "%s: a batch is taking over %.0f s; polling with the partitions "
                "paused to stay in the group",
                self.stream.description,
                self._keep_alive_after,
            )
            while not done.wait(1.0):
                self.stream.keep_alive()
            self.stream.keep_alive()
            self.stream.done_keeping_alive()
        if failure:
            raise failure[0]

    def _handle_chunk(self, chunk: Chunk) -> None:
        if self._acknowledge_only:
            self._acknowledge_chunk(chunk)
            return
        stream, stopping, attempts = self.stream, self._stopping, self._attempts
        partition, epoch = chunk.partition, chunk.epoch
        with self._state:
            pending, letters = self._pending, self._letters
            handled = 0
            last = -1
            for incoming in chunk.messages:
                if stream.epoch != epoch or stopping.is_set():
                    break
                try:
                    message = decode_message(partition, *incoming)
                except Undecodable as exc:
                    letters.append(_letter(partition, incoming, str(exc)))
                else:
                    session_id, offset = message.session_id, message.offset  # as read
                    try:
                        failed = attempts.run(message, stopping)
                    except Interrupted:
                        break
                    if failed is None:
                        if pending.get(session_id, -1) < offset:
                            pending[session_id] = offset
                    else:
                        letters.append(_letter(partition, incoming, failed))
                handled += 1
                last = incoming.position
            if handled:
                self._positions[partition] = last + 1
                self._unflushed += handled
                self.stats.processed += handled
                self.stats.dead_lettered = self._dead_flushed + len(letters)
                self.stats.retried = attempts.retries
                if self._oldest is None:
                    self._oldest = time.monotonic()

    def _acknowledge_chunk(self, chunk: Chunk) -> None:
        """:meth:`_handle_chunk` for the default handler, the hot path: only the session id
        and offset are decoded (no :class:`Message`), and no handler is called."""
        stream, stopping = self.stream, self._stopping
        partition, epoch, messages = chunk.partition, chunk.epoch, chunk.messages
        with self._state:
            pending, letters = self._pending, self._letters
            handled = 0
            for incoming in messages:
                if stream.epoch != epoch or stopping.is_set():
                    break
                _, key, value, headers = incoming
                try:
                    session_id, offset = message_ids(key, value, headers)
                except Undecodable as exc:
                    letters.append(_letter(partition, incoming, str(exc)))
                else:
                    if pending.get(session_id, -1) < offset:
                        pending[session_id] = offset
                handled += 1
            if handled:
                self._positions[partition] = messages[handled - 1].position + 1
                self._unflushed += handled
                self.stats.processed += handled
                self.stats.dead_lettered = self._dead_flushed + len(letters)
                if self._oldest is None:
                    self._oldest = time.monotonic()

    # -- flushing ----------------------------------------------------------------------

    def _take(self) -> _Taken:
        """What was handled since the last take, to flush."""
        with self._state:
            taken = _Taken(self._pending, self._positions, self._letters, self._unflushed)
            self._pending, self._positions, self._letters = {}, {}, []
            self._unflushed, self._oldest = 0, None
            if taken:
                self.stats.flushes += 1
            return taken

    def _write(self, taken: _Taken) -> None:
        """Append the offsets and write the dead letters of ``taken``; its positions become
        safe to commit. Flushes write one at a time, in order. On failure ``taken`` is
        given back, for the next flush, and the error is raised."""
        pending = taken.pending
        with self._flushing:
            try:
                if pending:
                    self.tracker.commit_many(
                        [(sid, self.consumer, offset) for sid, offset in pending.items()],
                        wait=False,
                    )
                    self.stats.committed += len(pending)
                    pending = {}
                self.stream.dead_letter(taken.letters, self.consumer)
            except BaseException:
                with self._state:
                    self._restore(pending, taken.positions, taken.letters, taken.unflushed)
                raise
            with self._state:
                self._dead_flushed += len(taken.letters)
                self._acked.update(taken.positions)

    def _take_acked(self) -> dict[int, int]:
        with self._state:
            acked, self._acked = self._acked, {}
            return acked

    def _take_and_flush(self) -> dict[int, int]:
        """Flush now, after any flush in flight; every position now safe to commit."""
        with self._flushing:
            self._write(self._take())
        return self._take_acked()

    def _restore(
        self,
        pending: dict[str, int],
        positions: dict[int, int],
        letters: list[DeadLetter],
        unflushed: int,
    ) -> None:
        for sid, offset in self._pending.items():
            if pending.get(sid, -1) < offset:
                pending[sid] = offset
        positions.update(self._positions)
        self._pending, self._positions = pending, positions
        self._letters = letters + self._letters
        self._unflushed += unflushed
        self._oldest = time.monotonic()

    def _finish_flush(self) -> None:
        """Commit the positions of the background flush that ended (or report its failure)."""
        future, self._inflight = self._inflight, None
        assert future is not None
        try:
            future.result()
        except TrackerError as exc:
            self._flush_failed(exc)
            return
        self._flushed_again()
        positions = self._take_acked()
        if positions:
            self.stream.commit(positions)

    def _flushed_again(self) -> None:
        if self._flush_failures:
            log.warning(
                "%s: flushing works again after %d failed attempts",
                self.stream.description,
                self._flush_failures,
            )
            self._flush_failures = 0

    def _flush_failed(self, exc: TrackerError) -> None:
        if not exc.retriable:
            raise exc
        self._flush_failures += 1
        delay = min(0.2 * 2**self._flush_failures, 5.0)
        log.warning(
            "%s: flush failed (%s); nothing is lost, retrying in %.1f s",
            self.stream.description,
            exc,
            delay,
        )
        self._stopping.wait(delay)

    def flush(self) -> None:
        """Flush now, wait for it, and commit the stream positions."""
        if self._inflight is not None:
            self._finish_flush()
        try:
            positions = self._take_and_flush()
        except TrackerError as exc:
            self._flush_failed(exc)
            return
        self._flushed_again()
        if positions:
            self.stream.commit(positions)

    # -- reporting ---------------------------------------------------------------------

    def summary(self, rate: float, *, final: bool = False) -> str:
        stats = self.stats
        lag = self.stream.lag()
        return (
            f"worker {self.consumer}{' done' if final else ''}: processed {stats.processed:,}, "
            f"offsets committed {stats.committed:,}, dead-lettered {stats.dead_lettered:,}, "
            f"retried {stats.retried:,}, {rate:,.0f} msgs/s, "
            f"lag {'?' if lag is None else f'{lag:,}'}"
        )

    def _say(self, line: str) -> None:
        if self._report is not None:
            self._report(line)
