"""One fault test's world: ``tracker`` subprocesses, a stream fed while they run, and what
the log and Redis hold afterwards.

Every process is a ``python -m tracker`` of its own, with its output in a file, stopped by
its PID at the end. :class:`Feeder` appends messages to the stream from a thread while
the faults are injected; :func:`acknowledged` and :func:`pure_fold` read the event log
itself, the source of truth the checks compare Redis with.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from consumers.filestream import append_messages, open_stream_log
from consumers.generate import session_ids, synthetic_messages
from consumers.kafkastream import produce_messages
from tests.processes import Process, Processes
from tracker import Settings, Tracker
from tracker.errors import LogNotFoundError, TrackerError
from tracker.events import OffsetCommitted, Position
from tracker.fold import SessionState, fold_all, visible

REPO = Path(__file__).resolve().parents[2]
BAD_SESSION = "undecodable"
"""The key of the :class:`Feeder`'s undecodable messages."""
GROUP_MS = "6000"
"""Kafka group timeouts of the workers: a Tansu join takes ~3 s with them (DESIGN.md)."""


class World(Processes[Process]):
    """The environment of one test's processes (data dir, Redis, prefix; Kafka if given)."""

    process_type = Process

    def __init__(
        self,
        workdir: Path,
        redis_url: str,
        prefix: str,
        *,
        bootstrap: str | None = None,
        event_topic: str | None = None,
        partitions: int = 1,
        **extra: str,
    ) -> None:
        self.settings = Settings(
            data_dir=workdir / "data",
            redis_url=redis_url,
            prefix=prefix,
            fsync=False,
            kafka_bootstrap=bootstrap,
            event_topic=event_topic or "tracker.session-events",
            partitions=partitions,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        env.update(
            TRACKER_DATA_DIR=str(self.settings.data_dir),
            TRACKER_REDIS_URL=redis_url,
            TRACKER_PREFIX=prefix,
            TRACKER_FSYNC="0",
            TRACKER_WORKER_SESSION_TIMEOUT_MS=GROUP_MS,
            TRACKER_WORKER_MAX_POLL_INTERVAL_MS=GROUP_MS,
            PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
            **extra,
        )
        if bootstrap is not None:
            env.update(
                TRACKER_KAFKA_BOOTSTRAP=bootstrap,
                TRACKER_EVENT_TOPIC=self.settings.event_topic,
                TRACKER_PARTITIONS=str(partitions),
            )
        super().__init__(workdir, env)

    def run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run a command to its end (any exit code)."""
        return self.run_any(*args, timeout=timeout)

    @contextlib.contextmanager
    def view(self) -> Iterator[Tracker]:
        """A tracker of the test process on the same log and prefix; it projects nothing."""
        deadline = time.monotonic() + 60
        while True:  # the processes under test create the log
            try:
                tracker = Tracker(self.settings, catch_up=False, create=False)
                break
            except LogNotFoundError:
                assert time.monotonic() < deadline, f"no event log after 60 s\n{self.tails()}"
                time.sleep(0.2)
        with tracker:
            # reads only: never rebuild (nor project) what the test checks
            tracker.self_projecting, tracker.reader.on_lost = False, None
            yield tracker


class Feeder:
    """Appends ``total`` synthetic messages over ``sessions`` to a stream from a thread,
    ``chunk`` at a time every ``pause`` seconds (a file stream dir, or a Kafka topic),
    or fewer if :meth:`stop` is called first. With ``bad``, each chunk also carries one
    message no worker can decode (not JSON), for the dead-letter stream; ``appended``
    counts the good ones only."""

    def __init__(
        self,
        total: int,
        sessions: int,
        *,
        chunk: int = 500,
        pause: float = 0.05,
        stream_dir: Path | None = None,
        bootstrap: str | None = None,
        topic: str | None = None,
        partitions: int = 1,
        bad: bool = False,
    ) -> None:
        self.total = total
        self.bad = bad
        self.bad_appended = 0
        self.sessions = sessions
        self.chunk = chunk
        self.pause = pause
        self.stream_dir = stream_dir
        self.bootstrap = bootstrap
        self.topic = topic
        self.partitions = partitions
        self.appended = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feeder", daemon=True)

    def start(self) -> Feeder:
        self._thread.start()
        return self

    def _run(self) -> None:
        chunks = synthetic_messages(self.total, self.sessions, chunk=self.chunk)
        extra = [(BAD_SESSION, b"{not json")] if self.bad else []
        if self.stream_dir is not None:
            with open_stream_log(self.stream_dir, create=True, fsync=False) as log:
                for chunk in chunks:
                    append_messages(log, [chunk + extra])
                    self.appended += len(chunk)
                    self.bad_appended += len(extra)
                    if self._stop.wait(self.pause):
                        return
            return
        assert self.bootstrap is not None and self.topic is not None
        for chunk in chunks:
            while True:  # a stalled broker: send the chunk again (a resend is harmless)
                try:
                    produce_messages(
                        self.bootstrap, self.topic, [chunk + extra], partitions=self.partitions,
                        timeout=5.0,
                    )  # fmt: skip
                    self.appended += len(chunk)
                    self.bad_appended += len(extra)
                    break
                except TrackerError as error:
                    self.errors.append(str(error))
                    if self._stop.wait(0.5):
                        return
            if self._stop.wait(self.pause):
                return

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float = 300.0) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the feeder did not finish: {self.appended}"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def heads(self) -> dict[str, int]:
        """Each session's highest offset among the messages appended so far."""
        count = self.appended
        return {
            sid: (count - 1 - n) // self.sessions
            for n, sid in enumerate(session_ids(self.sessions))
            if n < count
        }


def projected(tracker: Tracker) -> dict[str, SessionState]:
    """Every session Redis holds under the tracker's prefix (none without a projection)."""
    if not tracker.generations.refresh():
        return {}
    return {state.session_id: state for state in tracker.generations.store.scan()}


def pure_fold(tracker: Tracker) -> dict[str, SessionState]:
    """The pure fold of the whole log: what Redis must hold."""
    return visible(fold_all(tracker.export_events()))


def acknowledged(tracker: Tracker) -> list[tuple[str, str, int]]:
    """Every ``offset_committed`` in the log: each one's append was acknowledged."""
    return [
        (event.session_id, event.consumer, event.offset)
        for event in tracker.export_events()
        if isinstance(event, OffsetCommitted)
    ]


def missing(commits: list[tuple[str, str, int]], states: dict[str, SessionState]) -> int:
    """How many acknowledged commits Redis does not cover (its offset is lower, or none)."""
    lost = 0
    for sid, consumer, offset in commits:
        state = states.get(sid)
        if state is None or state.offsets.get(consumer, -1) < offset:
            lost += 1
    return lost


def caught_up(tracker: Tracker, ends: Sequence[Position | None]) -> bool:
    """Redis has a projection and has applied at least ``ends`` (per partition)."""
    if not tracker.generations.refresh():
        return False
    store = tracker.generations.store
    for partition, end in enumerate(ends):
        if end is None:
            continue
        applied = store.applied(partition)
        if applied is None or applied < end:
            return False
    return True


def log_ends(tracker: Tracker) -> list[Position | None]:
    """The log's end per partition (``tracker status`` reads it from the log itself)."""
    return [Position.parse(p.end) if p.end else None for p in tracker.status().partitions]
