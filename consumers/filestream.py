"""File streams: the embedded default's message streams, file logs in a directory.

Layout of a stream directory ``DIR``::

    log.json, LOCK, *.seg        the messages: a file log of StreamRecords (one partition)
    consumers/NAME.json          NAME's read position, replaced atomically after each flush
    consumers/NAME.lock          flock'd by the one worker reading as NAME
    dlq/                         the dead letters: a file log of StreamRecords

A message's position is its ordinal in the stream (0, 1, 2, ...). One worker reads as a
given consumer name at a time: the lock refuses a second.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

from consumers.messages import StreamRecord, decode_record, encode_record
from consumers.streams import Chunk, DeadLetter, Incoming, dead_letter_headers
from tracker.errors import InvalidInputError, LogError, LogLockedError, LogNotFoundError
from tracker.events import Position
from tracker.logs import Batch
from tracker.logs.file import FileLog

READ_RECORDS = 10_000
IDLE_SLEEP = 0.02


def open_stream_log(directory: Path, *, create: bool, fsync: bool = True) -> FileLog:
    """The file log of a stream directory; a clear error when there is none."""
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


class FileStream:
    """A stream directory read as one consumer; see the module docstring."""

    epoch = 0

    def __init__(self, directory: Path, consumer: str, *, dlq: Path | None = None) -> None:
        self.directory = Path(directory)
        self.consumer = consumer
        self.log = open_stream_log(self.directory, create=False)
        self._dlq_path = dlq if dlq is not None else self.directory / "dlq"
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
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, str(os.getpid()).encode(), 0)
        self._position_path = state_dir / f"{consumer}.json"
        self._after, self._next = self._load_position()
        self._read_after, self._read_next = self._after, self._next
        self._unread: deque[tuple[int, Batch]] = deque()

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
        if saved.get("log_id") != self.log.log_id:
            raise InvalidInputError(
                f"{self._position_path} belongs to another stream (log id {saved.get('log_id')}); "
                "remove it to read this stream from the start"
            )
        frame, index, after = saved.get("frame"), saved.get("index"), saved.get("next")
        if not all(isinstance(v, int) and v >= 0 for v in (frame, index, after)):
            raise InvalidInputError(f"{self._position_path} is unreadable: {saved!r}")
        return Position(0, frame, index), after

    def poll(self, timeout: float) -> list[Chunk]:
        deadline = time.monotonic() + timeout
        while True:
            batches = self.log.read(0, self._read_after, READ_RECORDS)
            if batches or time.monotonic() >= deadline:
                break
            time.sleep(IDLE_SLEEP)
        if not batches:
            return []
        messages: list[Incoming] = []
        ordinal = self._read_next
        for batch in batches:
            self._unread.append((ordinal, batch))
            for record in batch.records:
                try:
                    decoded = decode_record(record)
                    messages.append(Incoming(ordinal, decoded.key, decoded.value, decoded.headers))
                except ValueError:
                    messages.append(Incoming(ordinal, None, record, []))
                ordinal += 1
        self._read_after, self._read_next = batches[-1].last, ordinal
        return [Chunk(0, messages, 0)]

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
            first, batch = self._unread[0]
            end = first + len(batch.records)
            if last < end:
                position = Position(0, batch.offset, batch.first_index + last - first)
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
            self._dlq = FileLog(self._dlq_path)
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
