"""File streams: the embedded default's message streams, file logs in a directory.

Layout of a stream directory ``DIR``::

    STREAM                       marks the directory as a stream (not a tracker event log)
    log.json, LOCK, *.seg        the messages: a file log of StreamRecords (one partition)
    consumers/NAME.json          NAME's read position, replaced atomically after each flush
    consumers/NAME.lock          flock'd by the one worker reading as NAME
    dlq/                         the dead letters: a file log of StreamRecords

A message's position is its ordinal in the stream (0, 1, 2, ...). One worker reads as a
given consumer name at a time: the lock refuses a second.

A file log without the ``STREAM`` mark is never read or written as a stream: it is a
tracker's event log (``--stream-dir`` or ``--dlq`` naming ``.tracker/log`` by mistake),
and stream records appended to it would break every tracker command.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeGuard, overload

from consumers.messages import StreamRecord, decode_record, encode_record
from consumers.streams import Chunk, DeadLetter, Incoming, dead_letter_headers
from tracker.errors import InvalidInputError, LogError, LogLockedError, LogNotFoundError
from tracker.events import Position
from tracker.logs import Batch
from tracker.logs.file import FileLog
from tracker.model import ConsumerName, checked

READ_RECORDS = 2_000
"""Messages a poll returns at most (as ``KafkaStream``'s ``max_poll_records``), so that
``--flush-max`` and ``--flush-ms`` hold within a frame of up to 65,536 records."""
READ_BYTES = 64 << 20
"""A read from the log asks for about this much (whole frames): large messages are read
fewer at a time."""
IDLE_SLEEP = 0.02
STREAM_MARK = "STREAM"


def _refuse_event_log(directory: Path) -> None:
    if (directory / "log.json").exists() and not (directory / STREAM_MARK).exists():
        raise InvalidInputError(
            f"{directory} holds a log that is not a stream (a stream has a {STREAM_MARK} "
            "file, made by 'tracker streams append'): is it a tracker's event log? "
            "check --stream-dir and --dlq"
        )


_new_incoming = tuple.__new__
"""``Incoming``'s own constructor, without the Python-level ``__new__`` of a namedtuple."""


class _Messages(Sequence[Incoming]):
    """One poll's records, decoded into :class:`Incoming` as they are iterated.

    Decoding as the worker goes frees each message's objects before the next is made: a
    poll never holds thousands of live tuples and lists for the garbage collector to
    traverse again and again (a third of the worker's time when they were decoded ahead).
    """

    __slots__ = ("_first", "_records")

    def __init__(self, records: list[bytes], first: int) -> None:
        self._records = records
        self._first = first

    def __len__(self) -> int:
        return len(self._records)

    @overload
    def __getitem__(self, index: int) -> Incoming: ...

    @overload
    def __getitem__(self, index: slice) -> list[Incoming]: ...

    def __getitem__(self, index: int | slice) -> Incoming | list[Incoming]:
        size = len(self._records)
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(size))]
        if not -size <= index < size:
            raise IndexError("message index out of range")
        index %= size
        return _incoming(self._first + index, self._records[index])

    def __iter__(self) -> Iterator[Incoming]:
        for ordinal, record in enumerate(self._records, self._first):
            try:
                decoded = decode_record(record)
            except ValueError:
                yield Incoming(ordinal, None, record, [])
            else:
                yield _new_incoming(
                    Incoming, (ordinal, decoded.key, decoded.value, decoded.headers)
                )

    def __repr__(self) -> str:
        return f"<{len(self)} file stream messages from {self._first}>"


def _incoming(ordinal: int, record: bytes) -> Incoming:
    """A record as read; one that is not a StreamRecord is passed on whole, as the value
    (the worker dead-letters it: it is not a JSON event)."""
    try:
        decoded = decode_record(record)
    except ValueError:
        return Incoming(ordinal, None, record, [])
    return Incoming(ordinal, decoded.key, decoded.value, decoded.headers)


def open_stream_log(directory: Path, *, create: bool, fsync: bool = True) -> FileLog:
    """The file log of a stream directory; a clear error when there is none, or when the
    directory holds a log that is not a stream (see the module docstring)."""
    directory = Path(directory)
    _refuse_event_log(directory)
    if create and not (directory / STREAM_MARK).exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
            (directory / STREAM_MARK).write_text("a message stream: see tracker streams --help\n")
        except OSError as exc:
            raise LogError(f"cannot create a stream in {directory}: {exc}") from exc
    try:
        return FileLog(directory, create=create, fsync=fsync)
    except LogNotFoundError:
        raise LogNotFoundError(
            f"no stream in {directory}: write one with 'tracker streams append --stream-dir "
            f"{directory}'"
        ) from None


def append_messages(log: FileLog, messages: Iterable[Sequence[tuple[str, bytes]]]) -> int:
    """Append chunks of ``(session_id, value)`` as one all-or-nothing append; the count."""
    count = 0

    def records() -> Iterable[list[bytes]]:
        nonlocal count
        for chunk in messages:
            count += len(chunk)
            yield [encode_record(StreamRecord(sid.encode(), value)) for sid, value in chunk]

    log.append_stream(0, records())
    return count


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise LogError(
                f"no space left for {path} ({exc.strerror}); free some and start again: "
                "the position stays where it was"
            ) from exc
        raise LogError(f"cannot save the position in {path}: {exc}") from exc


def _count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _same_directory(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


class FileStream:
    """A stream directory read as one consumer; see the module docstring."""

    epoch = 0

    def __init__(self, directory: Path, consumer: str, *, dlq: Path | None = None) -> None:
        self.directory = Path(directory)
        self.consumer = str(checked(consumer, ConsumerName, "consumer"))
        self._dlq_path = Path(dlq) if dlq is not None else self.directory / "dlq"
        if _same_directory(self._dlq_path, self.directory):
            raise InvalidInputError(
                f"dead letters cannot go to {self._dlq_path}, the stream they come from"
            )
        if self._dlq_path.exists() and not self._dlq_path.is_dir():
            raise InvalidInputError(f"dead letters cannot go to {self._dlq_path}: not a directory")
        _refuse_event_log(self._dlq_path)
        self.log = open_stream_log(self.directory, create=False)
        self._dlq: FileLog | None = None
        state_dir = self.directory / "consumers"
        try:
            state_dir.mkdir(exist_ok=True)
            self._lock_fd = os.open(state_dir / f"{consumer}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            self.log.close()
            raise LogError(f"cannot keep positions in {state_dir}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            self.close()
            raise LogLockedError(
                f"consumer {consumer} is already reading {self.directory} (pid {holder}); "
                "stop it first or use another --consumer name"
            ) from None
        with contextlib.suppress(OSError):  # the pid only names the holder in messages
            os.ftruncate(self._lock_fd, 0)
            os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self._position_path = state_dir / f"{consumer}.json"
        try:
            self._after, self._next = self._load_position()
        except BaseException:
            self.close()
            raise
        self._read_after, self._read_next = self._after, self._next
        self._unread: deque[tuple[int, int, int, int]] = deque()
        """Per run of messages returned but not committed: first ordinal, frame, first index,
        length."""
        self._held: deque[Batch] = deque()
        """Read from the log, not returned yet (from ``_held_at`` in the first)."""
        self._held_at = 0
        self._read_max = 1  # records per read, until the size of the messages is known

    @property
    def description(self) -> str:
        return f"file stream {self.directory} as {self.consumer}"

    def _load_position(self) -> tuple[Position | None, int]:
        try:
            saved = json.loads(self._position_path.read_text())
        except FileNotFoundError:
            return None, 0
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{self._position_path} is unreadable: {exc}") from None
        if not isinstance(saved, dict):
            raise InvalidInputError(f"{self._position_path} is unreadable: {saved!r}")
        if saved.get("log_id") != self.log.log_id:
            raise InvalidInputError(
                f"{self._position_path} belongs to another stream (log id {saved.get('log_id')}); "
                "remove it to read this stream from the start"
            )
        frame, index, after = saved.get("frame"), saved.get("index"), saved.get("next")
        if not (_count(frame) and _count(index) and _count(after)):
            raise InvalidInputError(f"{self._position_path} is unreadable: {saved!r}")
        position = Position(0, frame, index)
        if after != self._ordinal_after(position):
            raise InvalidInputError(
                f"{self._position_path} does not fit {self.directory} (frame {frame}, "
                f"record {index}, next {after}): it was saved for another copy of the "
                "stream; remove it to read this stream from the start"
            )
        return position, after

    def _ordinal_after(self, position: Position) -> int | None:
        """The ordinal of the message after ``position``, or ``None`` if it is not a record."""
        first = self.log.read(0, Position(0, position.offset, position.index - 1), 1)
        if not first or (first[0].offset, first[0].first_index) != (
            position.offset,
            position.index,
        ):
            return None
        while True:  # counted twice at the same total: no append came in between
            total = self.log.count(0)
            rest = self.log.count(0, position)
            if self.log.count(0) == total:
                return total - rest

    def poll(self, timeout: float) -> list[Chunk]:
        """At most ``READ_RECORDS`` messages; a frame holding more is served over several polls.

        A frame is read from disk once: what a poll does not return is held for the next.
        """
        if not self._held:
            deadline = time.monotonic() + timeout
            while True:
                batches = self.log.read(0, self._read_after, self._read_max)
                if batches or time.monotonic() >= deadline:
                    break
                time.sleep(IDLE_SLEEP)
            if not batches:
                return []
            self._held.extend(batches)
            self._read_after = batches[-1].last
            count = sum(len(b.records) for b in batches)
            size = sum(len(r) for b in batches for r in b.records)
            self._read_max = max(1, min(READ_RECORDS, READ_BYTES * count // max(size, 1)))
        first = ordinal = self._read_next
        records: list[bytes] = []
        room = READ_RECORDS
        while self._held and room:
            batch, start = self._held[0], self._held_at
            taken = batch.records[start : start + room]
            if start + len(taken) < len(batch.records):
                self._held_at = start + len(taken)
            else:
                self._held.popleft()
                self._held_at = 0
            self._unread.append((ordinal, batch.offset, batch.first_index + start, len(taken)))
            records.extend(taken)
            ordinal += len(taken)
            room -= len(taken)
        self._read_next = ordinal
        return [Chunk(0, _Messages(records, first), 0)]

    def keep_alive(self) -> None:
        """Nothing to do: a file stream has no group to be thrown out of."""

    def done_keeping_alive(self) -> None:
        """Nothing to do: see :meth:`keep_alive`."""

    def commit(self, positions: dict[int, int]) -> None:
        next_ordinal = positions.get(0, self._next)
        if next_ordinal <= self._next:
            return
        last = next_ordinal - 1
        position: Position | None = None
        while self._unread and position is None:
            first, frame, first_index, length = self._unread[0]
            end = first + length
            if last < end:
                position = Position(0, frame, first_index + last - first)
            if last >= end - 1:
                self._unread.popleft()
        if position is None:
            raise LogError(f"cannot commit position {next_ordinal} of {self.directory}: not read")
        _write_atomically(
            self._position_path,
            json.dumps(
                {
                    "log_id": self.log.log_id,
                    "frame": position.offset,
                    "index": position.index,
                    "next": next_ordinal,
                }
            ),
        )
        self._after, self._next = position, next_ordinal

    def dead_letter(self, letters: Sequence[DeadLetter], consumer: str) -> None:
        if not letters:
            return
        if self._dlq is None:
            self._dlq = open_stream_log(self._dlq_path, create=True)
        stream = str(self.directory)
        self._dlq.append(
            0,
            [
                encode_record(
                    StreamRecord(d.key, d.value, dead_letter_headers(d, consumer, stream))
                )
                for d in letters
            ],
        )

    def lag(self) -> int | None:
        return self.log.count(0, self._after)

    def close(self) -> None:
        self.log.close()
        if self._dlq is not None:
            self._dlq.close()
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)
