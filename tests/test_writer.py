"""The writer over several partitions: what a caller is told when only some were written."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tracker.errors import LogError, PartialAppendError
from tracker.events import OffsetCommitted, Position, utcnow
from tracker.keys import partition_for
from tracker.logs import Appended, Batch
from tracker.logs.file import FileLog
from tracker.writer import Writer


class PartitionedFileLogs:
    """A two-partition log made of two real file logs (partition N is log N's only one)."""

    def __init__(self, directory: Path) -> None:
        self.logs = [FileLog(directory / f"p{n}", fsync=False) for n in range(2)]

    @property
    def log_id(self) -> str:
        return "two-file-logs"

    @property
    def partitions(self) -> int:
        return 2

    def _at(self, partition: int, appended: Appended) -> Appended:
        last = appended.last
        moved = None if last is None else Position(partition, last.offset, last.index)
        return Appended(partition, appended.count, moved)

    def append(self, partition: int, records: Sequence[bytes]) -> Appended:
        return self._at(partition, self.logs[partition].append(0, records))

    def append_stream(self, partition: int, chunks: Iterable[Sequence[bytes]]) -> Appended:
        return self._at(partition, self.logs[partition].append_stream(0, chunks))

    def appends_held(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def read(self, partition: int, after: Position | None, max_records: int) -> list[Batch]:
        return self.logs[partition].read(0, after, max_records)

    def end(self, partition: int) -> Position | None:
        return self.logs[partition].end(0)

    def count(self, partition: int, after: Position | None = None) -> int:
        return self.logs[partition].count(0, after)

    def close(self) -> None:
        for log in self.logs:
            log.close()


def sessions_in_both_partitions() -> list[str]:
    ids = [f"s{i}" for i in range(40)]
    by_partition = {partition_for(sid, 2): sid for sid in ids}
    assert set(by_partition) == {0, 1}
    return [by_partition[0], by_partition[1]]


def test_an_append_over_partitions_that_fails_midway_names_what_was_written(
    tmp_path: Path,
) -> None:
    log = PartitionedFileLogs(tmp_path)
    first, second = sessions_in_both_partitions()
    log.logs[1].close()  # partition 1 cannot be written
    events = [
        OffsetCommitted(session_id=sid, consumer="client", offset=7, recorded_at=utcnow())
        for sid in (first, second)
    ]
    with pytest.raises(PartialAppendError, match=r"partition\(s\) 0 but not to 1") as info:
        Writer(log).append(events)
    assert info.value.retriable
    assert info.value.positions == [Position(0, 0, 0)]
    assert log.logs[0].count(0) == 1
    log.close()


def test_an_append_that_fails_at_its_first_partition_is_the_log_error_itself(
    tmp_path: Path,
) -> None:
    log = PartitionedFileLogs(tmp_path)
    log.close()
    first, _ = sessions_in_both_partitions()
    event = OffsetCommitted(session_id=first, consumer="client", offset=1, recorded_at=utcnow())
    with pytest.raises(LogError, match="closed") as info:
        Writer(log).append([event])
    assert not isinstance(info.value, PartialAppendError)
