"""``tracker demo``: two workers read a stream and record offsets; then replay and verify.

On the embedded default (a temporary data dir: file log, file stream, embedded Redis) or,
with ``--kafka``, on a broker (fresh topics, a ``tracker project`` process). The workers
are real ``tracker worker`` processes, stopped with SIGTERM once they have caught up, as
a deployment would stop them. Afterwards the Redis projection is wiped, rebuilt from the
log by replay, and verified against an in-memory fold of the log.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from consumers.filestream import append_messages, open_stream_log
from consumers.generate import session_ids, synthetic_messages
from consumers.messages import decode_record
from tracker.errors import TrackerError
from tracker.logs.file import FileLog
from tracker.service import Tracker
from tracker.settings import Settings

CONSUMERS = ("notifier", "indexer")
CATCH_UP_SECONDS = 300.0
APPENDS = 10
MALFORMED = [("session000000", b"{not json"), ("session000000", b'{"type": "message"}')]
"""Messages no worker can use: each becomes a dead letter with its reason."""


def _say(out: Console, text: str) -> None:
    out.print(text, markup=False, highlight=False)


class Processes:
    """The demo's child processes: started with the demo's settings, stopped by PID."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: Sequence[str]) -> None:
        command = [sys.executable, "-m", "tracker", *args]
        self.running.append((name, subprocess.Popen(command, env=self.env)))

    def check(self) -> None:
        for name, process in self.running:
            if process.poll() is not None:
                raise TrackerError(f"demo: {name} exited early with code {process.returncode}")

    def stop(self) -> list[tuple[str, int]]:
        """SIGTERM each (workers flush first), then wait; their exit codes."""
        for _, process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = []
        for name, process in self.running:
            try:
                codes.append((name, process.wait(timeout=60)))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append((name, process.wait()))
        self.running = []
        return codes


def _heads(messages: int, sessions: int) -> dict[str, int]:
    """The highest offset of each session in the synthetic stream (round-robin)."""
    ids = session_ids(sessions)
    return {sid: (messages - 1 - n) // sessions for n, sid in enumerate(ids) if n < messages}


def _wait_for_offsets(tracker: Tracker, heads: dict[str, int], processes: Processes) -> None:
    deadline = time.monotonic() + CATCH_UP_SECONDS
    remaining = dict(heads)
    while remaining:
        processes.check()
        for sid in list(remaining)[:200]:
            state = tracker.session_state(sid)
            offsets = state.offsets if state is not None else {}
            if all(offsets.get(c, -1) >= remaining[sid] for c in CONSUMERS):
                del remaining[sid]
        if remaining:
            if time.monotonic() > deadline:
                raise TrackerError(f"demo: {len(remaining)} sessions not caught up in time")
            time.sleep(0.1)


def _append_live(
    root: Path, stream_args: list[str], kafka: str | None, messages: int, sessions: int, seed: int
) -> None:
    """Append the stream in ``APPENDS`` parts, a moment apart, as producers would."""
    chunks = list(
        synthetic_messages(messages, sessions, seed=seed, chunk=max(1, messages // APPENDS))
    )
    chunks[0] = [*chunks[0], *MALFORMED]
    for chunk in chunks:
        if kafka:
            from consumers.kafkastream import produce_messages

            produce_messages(kafka, stream_args[1], [chunk], partitions=6, timeout=30)
        else:
            with open_stream_log(root / "stream", create=True) as stream_log:
                append_messages(stream_log, [chunk])
        time.sleep(0.2)


def _show_dead_letters(out: Console, directory: Path) -> None:
    with FileLog(directory, create=False) as letters:
        for batch in letters.read(0, None, 100):
            for raw in batch.records:
                headers = {k: v.decode() for k, v in decode_record(raw).headers}
                _say(out, f"dead letter of {headers['dlq.consumer']} (stream position "
                          f"{headers['dlq.offset']}): {headers['dlq.reason']}")  # fmt: skip


def run_demo(
    out: Console, *, sessions: int, messages: int, seed: int, kafka: str | None = None
) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="tracker-demo-") as directory:
        root = Path(directory)
        data_dir = root / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        env["TRACKER_DATA_DIR"] = str(data_dir)
        name = f"demo-{uuid.uuid4().hex[:8]}"
        if kafka:
            env.update(
                TRACKER_KAFKA_BOOTSTRAP=kafka,
                TRACKER_EVENT_TOPIC=f"{name}.events",
                TRACKER_PARTITIONS="6",
                TRACKER_WORKER_SESSION_TIMEOUT_MS="6000",
                TRACKER_WORKER_MAX_POLL_INTERVAL_MS="6000",
            )
            stream_args = ["--stream", f"{name}.stream"]
            _say(out, f"demo: Kafka at {kafka} (topics {name}.*), embedded Redis in {directory}")
        else:
            stream_args = ["--stream-dir", str(root / "stream")]
            with open_stream_log(root / "stream", create=True):
                pass
            _say(out, f"demo: embedded file log, file stream and redis-server in {directory}")
        settings = Settings.from_env(env)
        processes = Processes(env)
        with Tracker(settings) as tracker:
            users = [f"user{n:05d}" for n in range(max(1, sessions // 10))]
            ids = session_ids(sessions)
            for sid in ids:
                tracker.create_session(
                    rng.choice(("vUfk4PgjTm", "Drizzle01")), rng.choice(users),
                    session_id=sid, title=f"chat {sid[-4:]}", wait=False,
                )  # fmt: skip
            _say(out, f"created {sessions:,} sessions")
            if kafka:
                from consumers.kafkastream import ensure_topic

                ensure_topic(kafka, stream_args[1], 6, timeout=30)
            try:
                if kafka:
                    processes.start("projector", ["project", "--report-every", "30"])
                for consumer in CONSUMERS:
                    group = ["--group", f"{name}.{consumer}"] if kafka else []
                    processes.start(
                        consumer, ["worker", *stream_args, "--consumer", consumer, *group,
                                   "--report-every", "1"],
                    )  # fmt: skip
                started = time.perf_counter()
                _append_live(root, stream_args, kafka, messages, sessions, seed)
                _say(out, f"appended {messages:,} flux0 events and {len(MALFORMED)} malformed "
                          f"messages in {APPENDS} appends while the workers ran")  # fmt: skip
                _wait_for_offsets(tracker, _heads(messages, sessions), processes)
                seconds = time.perf_counter() - started
            finally:
                codes = processes.stop()
            _say(out, f"{len(CONSUMERS)} workers processed them as they "
                      f"were appended, all offsets in Redis after {seconds:.2f} s; exit codes "
                      + ", ".join(f"{n} {c}" for n, c in codes))  # fmt: skip

            if not kafka:
                _show_dead_letters(out, root / "stream" / "dlq")
            else:
                _say(out, f"dead letters: in the topic {stream_args[1]}.dlq")
            table = Table("session", "stream head", *CONSUMERS, title="some sessions")
            heads = _heads(messages, sessions)
            for sid in ids[:5]:
                offsets = tracker.offsets(sid)
                table.add_row(sid, str(heads.get(sid, "-")),
                              *(str(offsets.get(c, "-")) for c in CONSUMERS))  # fmt: skip
            out.print(table)

            tracker.client.flushdb()
            _say(out, "wiped the Redis projection (FLUSHDB)")
            report = tracker.replay()
            _say(out, f"replay: {report.events:,} events, {report.sessions:,} sessions, "
                      f"{report.seconds:.2f} s, {report.rate:,.0f} events/s")  # fmt: skip
            check = tracker.verify()
            for difference in check.differences[:20]:
                _say(out, f"{difference.session_id}: {difference.problem}")
            _say(out, f"verified {check.events:,} events over {check.sessions:,} sessions "
                      f"in {check.seconds:.2f} s")  # fmt: skip
            _say(out, f"verify: {len(check.differences)} differences")
