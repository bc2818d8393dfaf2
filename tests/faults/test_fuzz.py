"""Fuzzing with hypothesis: stream messages, event import lines, HTTP requests, CLI arguments.

Whatever the input, the outcome is a clear one: a message is handled (its offset
recorded) or dead-lettered with a reason; a rejected import, request or command writes
nothing and says why in one line (or flux0's error shape), never a traceback, a 500 or a
hang. Each test runs a bounded number of examples (the suite runs them in minutes) and
records how many and their outcomes in its figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlencode

import httpx
import msgspec
import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from consumers import Message, Worker
from consumers.filestream import FileStream, open_stream_log
from consumers.handlers import acknowledge
from consumers.messages import (
    StreamRecord,
    Undecodable,
    decode_message,
    decode_record,
    encode_record,
    message_ids,
)
from tests.apiserver import USER, create, served
from tests.conftest import delete_prefix
from tests.faults.fuzzing import (
    bad_input_lines,
    bad_lines,
    bodies,
    dumps,
    expected_ids,
    header_values,
    ids,
    near_valid_messages,
    path_segments,
    positions,
    queries,
    stream_lines,
    stream_records,
    valid_events,
    zoned_times,
)
from tests.faults.report import Figures
from tracker import Settings, Tracker
from tracker.cli import main
from tracker.errors import SessionNotFoundError
from tracker.events import OffsetCommitted
from tracker.logs.file import FileLog

TRACKER = str(Path(sys.executable).with_name("tracker"))


def fuzz(examples: int) -> settings:
    """A property's settings: ``examples`` random examples (new ones every run), no deadline."""
    return settings(
        deadline=None,
        max_examples=examples,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        print_blob=True,
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# -- (a) stream messages ---------------------------------------------------------------


def as_read(record: StreamRecord | bytes) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    """A file stream record as a worker reads it (one that is not a StreamRecord is the
    value, whole)."""
    raw = record if isinstance(record, bytes) else encode_record(record)
    try:
        decoded = decode_record(raw)
    except ValueError:
        return None, raw, []
    return decoded.key, decoded.value, decoded.headers


def test_near_valid_flux0_messages_meet_the_documented_contract(fault_report: Figures) -> None:
    """Decoding alone, many examples: the README's rules (key, header, field; an integer
    offset 0 <= n < 2**63) decide; everything else is :class:`Undecodable` with a reason."""
    outcomes: Counter[str] = Counter()

    @fuzz(500)
    @given(near_valid_messages())
    @example(StreamRecord(b"s1", b'{"offset": 1, "session_id": ""}'))  # the key decides
    def check(record: StreamRecord) -> None:
        expected = expected_ids(record)
        try:
            got: tuple[str, int] | None = message_ids(record.key, record.value, record.headers)
        except Undecodable as exc:
            assert str(exc), "a dead letter's reason is empty"
            got = None
        outcomes["handled" if got else "dead-lettered"] += 1
        assert got == expected, (record, got, expected)
        if got is not None:
            message = decode_message(0, 0, record.key, record.value, record.headers)
            assert isinstance(message.event, dict)

    check()
    fault_report.fault = "hypothesis: flux0 events with mutated fields as stream messages"
    fault_report.injected = fault_report.survived = sum(outcomes.values())
    fault_report.checked = "decoded as the README says (key, header, field; offset range)"
    fault_report.detail = {"examples": sum(outcomes.values()), **outcomes}


@pytest.fixture
def fresh(
    tmp_path: Path, redis_url: str, prefix: str, redis_client: redis.Redis
) -> Iterator[Callable[[], tuple[Path, Settings]]]:
    """A new data dir and stream dir per example, on this test's prefix emptied first."""

    def make() -> tuple[Path, Settings]:
        root = Path(tempfile.mkdtemp(dir=tmp_path))
        delete_prefix(redis_client, prefix)
        settings = Settings(data_dir=root / "data", redis_url=redis_url, prefix=prefix, fsync=False)
        return root / "stream", settings

    yield make


def write_stream(directory: Path, records: list[StreamRecord | bytes]) -> None:
    with open_stream_log(directory, create=True, fsync=False) as log:
        log.append(0, [r if isinstance(r, bytes) else encode_record(r) for r in records])


def letters_of(stream: Path) -> dict[int, str]:
    """The dead letters' stream positions and reasons."""
    if not (stream / "dlq").exists():
        return {}
    with FileLog(stream / "dlq", create=False) as log:
        found = {}
        for batch in log.read(0, None, 1_000_000):
            for raw in batch.records:
                added = {k: v for k, v in decode_record(raw).headers if k.startswith("dlq.")}
                found[int(added["dlq.offset"])] = added["dlq.reason"].decode()
        return found


def committed_in_log(tracker: Tracker, consumer: str) -> dict[str, int]:
    """The highest offset per session that the log's offset_committed events hold."""
    highest: dict[str, int] = {}
    for event in tracker.export_events():
        assert isinstance(event, OffsetCommitted) and event.consumer == consumer, event
        highest[event.session_id] = max(highest.get(event.session_id, -1), event.offset)
    return highest


def reads_the_event(message: Message) -> None:
    """A handler that uses the whole event, as most do."""
    assert isinstance(message.event, dict)


def expected_outcome(
    record: StreamRecord | bytes, handler: bool
) -> tuple[tuple[str, int] | None, str | None]:
    """``((session, offset), None)`` for a message to handle, ``(None, reason)`` for a dead
    letter, as the decoding (checked against the README above) decides."""
    key, value, headers = as_read(record)
    try:
        ids = message_ids(key, value, headers)
    except Undecodable as exc:
        return None, str(exc)
    if handler:
        try:
            msgspec.json.decode(value)
        except (msgspec.DecodeError, RecursionError) as exc:
            return None, f"not a JSON event: {exc}"
    return ids, None


class Tally:
    """Outcomes over a test's examples, and the acknowledged offsets found missing."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.lost = 0
        self.examples = 0


def run_worker_over(
    records: list[StreamRecord | bytes], stream: Path, settings: Settings, handler: bool
) -> tuple[dict[str, int], dict[int, str], int]:
    """A worker in this process reads every record once; the offsets the log holds, the dead
    letters and the saved stream position."""
    write_stream(stream, records)
    with Tracker(settings) as tracker:
        source = FileStream(stream, "c")
        worker = Worker(source, tracker, "c", reads_the_event if handler else acknowledge,
                        flush_ms=5, report_every=0)  # fmt: skip
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        try:
            wait_until(lambda: worker.stats.processed == len(records), "every message", 30)
        finally:
            worker.stop()
            thread.join(30)
            source.close()
        assert not thread.is_alive(), "the worker did not stop"
        committed = committed_in_log(tracker, "c")

        def projected() -> bool:
            try:
                return all(tracker.offsets(s).get("c") == o for s, o in committed.items())
            except SessionNotFoundError:  # not projected yet
                return False

        wait_until(projected, "the offsets in Redis")
    saved = json.loads((stream / "consumers" / "c.json").read_text())["next"]
    return committed, letters_of(stream), saved


def test_arbitrary_stream_messages_are_handled_or_dead_lettered_in_process(
    fault_report: Figures, fresh: Callable[[], tuple[Path, Settings]]
) -> None:
    """Arbitrary bytes, JSON and near-valid flux0 events on a file stream, read by a worker
    with the default handler or one that reads the whole event: each message is handled
    once or dead-lettered with a reason, the position passes all of them, and the offsets
    committed are the highest handled offset per session."""
    tally = Tally()

    @fuzz(50)
    @given(st.lists(stream_records, min_size=1, max_size=25), st.booleans())
    @example([StreamRecord(b"s1", b'{"offset": 1, "x": 1e999}')], True)
    def check(records: list[StreamRecord | bytes], handler: bool) -> None:
        stream, settings = fresh()
        committed, letters, saved = run_worker_over(records, stream, settings, handler)
        expected: dict[str, int] = {}
        expected_letters: dict[int, str] = {}
        for position, record in enumerate(records):
            ids, reason = expected_outcome(record, handler)
            if ids is None:
                assert reason is not None
                expected_letters[position] = reason
            elif expected.get(ids[0], -1) < ids[1]:
                expected[ids[0]] = ids[1]
        tally.examples += 1
        tally.outcomes["messages"] += len(records)
        tally.outcomes["dead-lettered"] += len(letters)
        tally.outcomes["handled"] += len(records) - len(letters)
        tally.lost += sum(1 for s, o in expected.items() if committed.get(s, -1) < o)
        assert saved == len(records)
        assert letters == expected_letters
        assert all(letters.values()), "a dead letter without a reason"
        assert committed == expected

    check()
    fault_report.fault = "hypothesis: arbitrary bytes, JSON, mutated flux0 events on a file stream"
    fault_report.injected = tally.outcomes["messages"]
    fault_report.survived = tally.outcomes["messages"]
    fault_report.lost = tally.lost
    fault_report.checked = "each handled or dead-lettered with a reason; offsets = highest handled"
    fault_report.detail = {"examples": tally.examples, **tally.outcomes}


def clean_env(data_dir: Path, redis_url: str, prefix: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    env.update(TRACKER_DATA_DIR=str(data_dir), TRACKER_REDIS_URL=redis_url, TRACKER_PREFIX=prefix,
               TRACKER_FSYNC="0", TRACKER_WAIT_TIMEOUT="2", TRACKER_LOCK_TIMEOUT="2")  # fmt: skip
    return env


def saved_position(stream: Path) -> int:
    try:
        return int(json.loads((stream / "consumers" / "c.json").read_text())["next"])
    except (FileNotFoundError, ValueError):
        return -1


def test_arbitrary_stream_messages_through_tracker_worker_processes(
    fault_report: Figures, fresh: Callable[[], tuple[Path, Settings]]
) -> None:
    """The same, end to end: a ``tracker worker`` process reads the stream, then SIGTERM;
    it exits 0 without a traceback, and the log holds the highest offset per session."""
    tally = Tally()

    @fuzz(4)
    @given(st.lists(stream_records, min_size=20, max_size=80))
    def check(records: list[StreamRecord | bytes]) -> None:
        stream, settings = fresh()
        write_stream(stream, records)
        env = clean_env(settings.data_dir, str(settings.redis_url), settings.prefix)
        command = [TRACKER, "worker", "--stream-dir", str(stream), "--consumer", "c",
                   "--flush-ms", "20", "--report-every", "0"]  # fmt: skip
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: saved_position(stream) == len(records) or process.poll() is not None,
                       "the worker's position", 60)  # fmt: skip
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            _, err = process.communicate(timeout=60)
        assert process.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")
        expected: dict[str, int] = {}
        expected_letters: dict[int, str] = {}
        for position, record in enumerate(records):
            ids, reason = expected_outcome(record, handler=False)
            if ids is None:
                expected_letters[position] = str(reason)
            elif expected.get(ids[0], -1) < ids[1]:
                expected[ids[0]] = ids[1]
        with Tracker(settings) as tracker:
            committed = committed_in_log(tracker, "c")
            projected = {s: tracker.offsets(s).get("c", -1) for s in expected}
        letters = letters_of(stream)
        tally.examples += 1
        tally.outcomes["messages"] += len(records)
        tally.outcomes["dead-lettered"] += len(letters)
        tally.outcomes["handled"] += len(records) - len(letters)
        tally.lost += sum(1 for s, o in expected.items() if projected[s] < o)
        assert saved_position(stream) == len(records)
        assert letters == expected_letters
        assert committed == expected and projected == expected

    check()
    fault_report.fault = "hypothesis: arbitrary stream messages read by tracker worker processes"
    fault_report.injected = fault_report.survived = tally.outcomes["messages"]
    fault_report.lost = tally.lost
    fault_report.checked = "exit 0 on SIGTERM, no traceback; dead letters and offsets as decoded"
    fault_report.detail = {
        "examples": tally.examples,
        "processes": tally.examples,
        **tally.outcomes,
    }


# -- (b) event import lines --------------------------------------------------------------


def log_bytes(data_dir: Path, name: str = "log") -> dict[str, bytes]:
    """Every file of the event log (or of a file stream: ``name``), byte for byte (``LOCK``
    holds a PID only)."""
    root = data_dir / name
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "LOCK"
    }


import_files = st.tuples(
    st.lists(valid_events.map(dumps), max_size=12),
    st.lists(st.tuples(st.integers(0, 12), bad_lines), max_size=3),
    st.lists(st.integers(0, 12), max_size=2),  # blank lines
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),  # a byte order mark
)


def import_source(
    drawn: tuple[list[bytes], list[tuple[int, bytes]], list[int], bytes, bool],
) -> tuple[bytes, int | None, int]:
    """The file's bytes, the number of its first bad line (``None``: all good), and the
    count of events in it."""
    good, bad, blanks, ending, bom = drawn
    lines: list[tuple[bytes, bool]] = [(line, True) for line in good]
    for at, line in bad:
        lines.insert(min(at, len(lines)), (line, False))
    for at in blanks:
        lines.insert(min(at, len(lines)), (b"  ", True))
    first_bad = next((n for n, (_, ok) in enumerate(lines, 1) if not ok), None)
    data = b"".join(line + ending for line, _ in lines)
    return (b"\xef\xbb\xbf" if bom else b"") + data, first_bad, len(good)


def check_import(
    code: int, stderr: str, first_bad: int | None, before: dict[str, bytes], after: dict[str, bytes]
) -> str:
    """The outcome's name, once the contract held."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    if first_bad is not None:
        assert code == 2, (code, stderr)
        assert len(lines) == 1 and lines[0].startswith(f"error: line {first_bad}: "), stderr
        assert after == before, "a refused import changed the log"
        return "refused"
    assert code == 0, (code, stderr)
    return "imported"


@pytest.fixture
def import_dir(tmp_path: Path, redis_url: str, prefix: str) -> Path:
    """A data dir whose log holds a few events already."""
    data_dir = tmp_path / "data"
    with Tracker(Settings(data_dir=data_dir, redis_url=redis_url, prefix=prefix, fsync=False)) as t:
        t.create_session("agent", "user", session_id="seeded")
        t.commit("seeded", "client", 3)
    return data_dir


def test_event_import_lines_in_process(
    fault_report: Figures, import_dir: Path, redis_url: str, prefix: str
) -> None:
    """``events import -`` of valid lines mixed with arbitrary bytes, arbitrary JSON and
    broken events, in-process (click's runner): exit 2 naming the first bad line and the
    log unchanged byte for byte, or exit 0 with every event appended."""
    outcomes: Counter[str] = Counter()
    env = clean_env(import_dir, redis_url, prefix)

    @fuzz(120)
    @given(import_files)
    def check(drawn: tuple[list[bytes], list[tuple[int, bytes]], list[int], bytes, bool]) -> None:
        source, first_bad, count = import_source(drawn)
        before = log_bytes(import_dir)
        with Tracker(Settings.from_env(env)) as tracker:
            events_before = tracker.event_count()
        result = CliRunner().invoke(main, ["events", "import", "-"], input=source, env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        outcome = check_import(result.exit_code, result.stderr, first_bad, before,
                               log_bytes(import_dir))  # fmt: skip
        outcomes[outcome] += 1
        outcomes["lines"] += source.count(b"\n")
        if outcome == "imported":
            with Tracker(Settings.from_env(env)) as tracker:
                found = tracker.event_count() - events_before
            outcomes["lost"] += max(0, count - found)
            assert found == count

    check()
    with Tracker(Settings.from_env(env)) as tracker:
        differences = len(tracker.verify().differences)
    assert differences == 0
    fault_report.fault = "hypothesis: arbitrary bytes, JSON, broken events among valid import lines"
    fault_report.injected = fault_report.survived = outcomes["refused"] + outcomes["imported"]
    fault_report.lost = outcomes["lost"]
    fault_report.checked = "exit 2 naming the first bad line, log unchanged; else all imported"
    fault_report.detail = {"examples": fault_report.injected, "verify differences": differences,
                           **outcomes}  # fmt: skip


def test_event_import_lines_through_processes(
    fault_report: Figures, import_dir: Path, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A few of the same through the ``tracker`` console script, from a file."""
    outcomes: Counter[str] = Counter()
    env = clean_env(import_dir, redis_url, prefix)

    @fuzz(5)
    @given(import_files)
    def check(drawn: tuple[list[bytes], list[tuple[int, bytes]], list[int], bytes, bool]) -> None:
        source, first_bad, _ = import_source(drawn)
        path = tmp_path / "events.jsonl"
        path.write_bytes(source)
        before = log_bytes(import_dir)
        done = subprocess.run([TRACKER, "events", "import", str(path)], env=env,
                              capture_output=True, timeout=120, check=False)  # fmt: skip
        stderr = done.stderr.decode(errors="replace")
        outcomes[
            check_import(done.returncode, stderr, first_bad, before, log_bytes(import_dir))
        ] += 1

    check()
    fault_report.fault = "hypothesis: bad import lines, tracker events import processes"
    fault_report.injected = fault_report.survived = outcomes.total()
    fault_report.checked = "exit 2 naming the first bad line, log unchanged; else exit 0"
    fault_report.detail = {"examples": outcomes.total(), "processes": outcomes.total(), **outcomes}


stream_inputs = st.tuples(
    st.lists(stream_lines, max_size=12),
    st.lists(st.tuples(st.integers(0, 12), bad_input_lines), max_size=2),
    st.lists(st.integers(0, 12), max_size=2),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)


def test_streams_append_lines_in_process(fault_report: Figures, tmp_path: Path) -> None:
    """``streams append --stream-dir DIR -``, how messages get onto a file stream: valid
    flux0 events mixed with broken ones, arbitrary JSON and bytes. Exit 2 naming the first
    bad line and the stream unchanged byte for byte, or exit 0 with every line appended."""
    outcomes: Counter[str] = Counter()
    stream = tmp_path / "stream"
    env = clean_env(tmp_path / "data", "redis://unused", "unused")
    with open_stream_log(stream, create=True, fsync=False) as log:
        log.append(0, [encode_record(StreamRecord(b"s1", b'{"offset": 0}'))])

    @fuzz(150)
    @given(stream_inputs)
    def check(drawn: tuple[list[bytes], list[tuple[int, bytes]], list[int], bytes, bool]) -> None:
        source, first_bad, count = import_source(drawn)
        before = log_bytes(stream.parent, stream.name)
        with FileLog(stream, create=False) as log:
            messages_before = log.count(0)
        result = CliRunner().invoke(
            main, ["streams", "append", "--stream-dir", str(stream), "-"], input=source, env=env
        )
        assert result.exception is None or isinstance(result.exception, SystemExit), result
        after = log_bytes(stream.parent, stream.name)
        outcome = check_import(result.exit_code, result.stderr, first_bad, before, after)
        outcomes[outcome] += 1
        if outcome == "imported":
            with FileLog(stream, create=False) as log:
                found = log.count(0) - messages_before
            outcomes["lost"] += max(0, count - found)
            assert found == count

    check()
    fault_report.fault = "hypothesis: broken events, arbitrary JSON and bytes to streams append"
    fault_report.lost = outcomes.pop("lost", 0)
    fault_report.injected = fault_report.survived = outcomes.total()
    fault_report.checked = "exit 2 naming the first bad line, stream unchanged; else all appended"
    fault_report.detail = {"examples": outcomes.total(), **outcomes}


# -- (c) HTTP bodies, headers and paths ----------------------------------------------------

GRANT_NAMES = ["read", "write", "admin", "user-write", "user-admin"]


class Request(NamedTuple):
    method: str
    url: str
    headers: dict[str, bytes]
    body: bytes


@st.composite
def http_requests(draw: st.DrawFn, known: list[str]) -> Request:
    """One request to a route of the API, with its path, query, body and headers fuzzed."""
    segment = draw(st.sampled_from(known) if draw(st.booleans()) else path_segments)
    method, url = draw(
        st.sampled_from(
            [
                ("POST", "/api/sessions"),
                ("PATCH", f"/api/sessions/{segment}"),
                ("GET", f"/api/sessions/{segment}"),
                ("GET", "/api/sessions"),
                ("DELETE", f"/api/sessions/{segment}"),
                ("POST", f"/api/sessions/{segment}/offsets/{draw(path_segments)}/reset"),
                ("GET", f"/api/sessions/{segment}/history"),
            ]
        )
    )
    if query := draw(queries):
        url += "?" + urlencode(query)
    headers: dict[str, bytes] = {}
    # mostly a valid token, to reach the routes' own checks
    token = draw(st.sampled_from([*GRANT_NAMES, *GRANT_NAMES, "none", "raw", "bearer"]))
    if token == "raw":
        headers["authorization"] = draw(header_values)
    elif token == "bearer":
        headers["authorization"] = (b"Bearer " + draw(header_values)).strip()
    elif token != "none":
        headers["authorization"] = token.encode()
    content_type = draw(st.none() | st.just(b"application/json") | header_values)
    if content_type is not None:
        headers["content-type"] = content_type
    body = draw(bodies) if method in {"POST", "PATCH"} or draw(st.booleans()) else b""
    return Request(method, url, headers, body)


def log_size(data_dir: Path) -> int:
    """The event log's bytes (segments only grow, by appends)."""
    return sum(p.stat().st_size for p in (data_dir / "log").glob("*.seg"))


def flux0_error(status: int, body: bytes) -> None:
    """A 4xx body in flux0's shape: ``{"detail": "..."}`` or pydantic's 422 list."""
    value = json.loads(body)
    assert isinstance(value, dict) and set(value) == {"detail"}, (status, value)
    detail = value["detail"]
    if isinstance(detail, list):
        assert detail and all(
            isinstance(d, dict) and {"type", "loc", "msg", "input"} <= set(d) for d in detail
        ), (status, value)
    else:
        assert isinstance(detail, str) and detail, (status, value)


def test_http_bodies_headers_and_paths(
    fault_report: Figures, tmp_path: Path, redis_url: str, redis_client: redis.Redis
) -> None:
    """A real ``tracker serve``: arbitrary bodies (bytes, JSON, near-valid), header values
    (Authorization, Content-Type) and path segments (percent escapes of invalid UTF-8,
    surrogates, NUL) on every session route. Never a 5xx (but the documented 503 of a
    ``min_position`` not reached in time); a 4xx is a JSON error in flux0's shape and the
    log gains nothing from it."""
    statuses: Counter[int] = Counter()
    with served(tmp_path, redis_url, redis_client, "fuzz-http") as server:
        with server.client("admin") as admin:
            known = [create(admin, user_id=USER, title=f"t{n}")["id"] for n in range(3)]
        tokens = {name.encode(): f"Bearer {server.tokens[name]}".encode() for name in GRANT_NAMES}

        @fuzz(400)
        @given(http_requests(known))
        @example(Request("POST", "/api/sessions", {"authorization": b"write"}, b"1e999"))
        def check(request: Request) -> None:
            headers = {name.encode(): value for name, value in request.headers.items()}
            if (auth := headers.get(b"authorization")) in tokens:
                headers[b"authorization"] = tokens[auth]
            before = log_size(server.data_dir)
            response = client.request(
                request.method, request.url, content=request.body, headers=headers
            )
            statuses[response.status_code] += 1
            waited = response.status_code == 503 and "min_position=" in request.url
            assert response.status_code < 500 or waited, (response.status_code, response.text)
            if response.status_code >= 400:
                flux0_error(response.status_code, response.content)
                assert log_size(server.data_dir) == before, "a refused request was appended"
            elif response.status_code != 204:
                json.loads(response.content)

        try:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                check()
        finally:
            serve_log = server.log.read_text(errors="replace")
        assert "Traceback" not in serve_log, serve_log[-3000:]
        with Tracker(Settings.from_env(clean_env(server.data_dir, redis_url, server.prefix))) as t:
            differences = len(t.verify().differences)
    assert differences == 0
    requests = statuses.total()
    fault_report.fault = "hypothesis: arbitrary bodies, header values, path segments over HTTP"
    fault_report.injected = fault_report.survived = requests
    fault_report.checked = "never a 5xx; 4xx in flux0's error shape, log unchanged; verify 0"
    fault_report.detail = {
        "requests": requests,
        "2xx": sum(n for s, n in statuses.items() if s < 300),
        "4xx": sum(n for s, n in statuses.items() if 400 <= s < 500),
        **{f"status {s}": n for s, n in sorted(statuses.items())},
        "verify differences": differences,
    }


# -- (d) CLI arguments ---------------------------------------------------------------------

COMMANDS = [
    ("sessions", "create"), ("sessions", "show"), ("sessions", "history"), ("sessions", "list"),
    ("sessions", "rename"), ("sessions", "delete"), ("offsets", "commit"), ("offsets", "show"),
    ("offsets", "reset"), ("events", "import"), ("events", "export"), ("verify",), ("status",),
    ("streams", "append"), ("consumers", "lag"), ("tokens", "create"), ("tokens", "list"),
    ("tokens", "revoke"),
]  # fmt: skip
"""Every command that ends by itself (not serve, worker, project or demo)."""
UNBOUNDED = {"--timeout", "--generate", "--sessions"}
"""Options whose arbitrary values could make a command run for long (a wait, a workload)."""
EXIT_CODES = {0, 1, 2, 75}


def options_of(path: tuple[str, ...]) -> list[str]:
    command: Any = main
    for name in path:
        command = command.commands[name]
    names = [o for p in command.params for o in getattr(p, "opts", []) if o.startswith("-")]
    return [n for n in names if n not in UNBOUNDED] + ["--help", "-", "--"]


any_text = st.text(st.characters(codec=None, exclude_characters="\x00"), max_size=12)
"""Any text, lone surrogates included (what undecodable bytes in argv become)."""


@st.composite
def argvs(draw: st.DrawFn, seeded: list[str]) -> list[str]:
    path = draw(st.sampled_from(COMMANDS))
    words = st.one_of(
        st.sampled_from(options_of(path)),
        st.sampled_from(seeded),
        ids,
        positions,
        zoned_times,
        st.integers().map(str),
        any_text,
    )
    return [*path, *draw(st.lists(words, max_size=6))]


def check_cli(code: int, output: str, before: dict[str, bytes], after: dict[str, bytes]) -> None:
    assert code in EXIT_CODES, (code, output)
    assert "Traceback" not in output, output
    if code != 0:
        assert after == before, "a failed command changed the log"
        assert "error: " in output or code == 1, output


def test_cli_arguments_in_process(
    fault_report: Figures,
    import_dir: Path,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Arbitrary argument lists (options of the command, ids, numbers, any text) to every
    command, in-process (click's runner): a documented exit code, no traceback, and the
    log unchanged unless the command succeeded."""
    codes: Counter[int] = Counter()
    env = clean_env(import_dir, redis_url, prefix)
    runner = CliRunner()
    monkeypatch.chdir(tmp_path)  # relative paths in the arguments land here

    @fuzz(500)
    @given(argvs(["seeded", "client", "3", "0:0:0", "2025-01-29T09:27:41Z"]))
    @example(["sessions", "show", "s\udcff"])
    def check(argv: list[str]) -> None:
        before = log_bytes(import_dir)
        result = runner.invoke(main, argv, input=b"", env=env)
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            argv,
            result.stderr,
        )
        codes[result.exit_code] += 1
        check_cli(result.exit_code, result.output, before, log_bytes(import_dir))

    check()
    fault_report.fault = "hypothesis: arbitrary argument lists to every tracker command"
    fault_report.injected = fault_report.survived = codes.total()
    fault_report.checked = "exit 0/1/2/75, no traceback, log unchanged unless exit 0"
    fault_report.detail = {"examples": codes.total(), **{f"exit {c}": n for c, n in codes.items()}}


def test_cli_arguments_through_processes(
    fault_report: Figures, import_dir: Path, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A few of the same as real ``tracker`` processes, with arbitrary bytes in argv (not
    UTF-8: Python hands them on as lone surrogates)."""
    codes: Counter[int] = Counter()
    env = clean_env(import_dir, redis_url, prefix)
    raw_words = st.binary(min_size=1, max_size=8).filter(lambda b: b"\x00" not in b)

    @fuzz(8)
    @given(st.sampled_from(COMMANDS), st.lists(raw_words | ids.map(str.encode), max_size=4))
    @example(("sessions", "show"), [b"s\xff"])
    def check(path: tuple[str, ...], words: list[bytes]) -> None:
        before = log_bytes(import_dir)
        argv = [TRACKER.encode(), *(p.encode() for p in path), *words]
        done = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False,
                              stdin=subprocess.DEVNULL, cwd=tmp_path)  # fmt: skip
        codes[done.returncode] += 1
        output = (done.stdout + done.stderr).decode(errors="replace")
        check_cli(done.returncode, output, before, log_bytes(import_dir))

    check()
    fault_report.fault = "hypothesis: arbitrary bytes as argv of tracker processes"
    fault_report.injected = fault_report.survived = codes.total()
    fault_report.checked = "exit 0/1/2/75, no traceback, log unchanged unless exit 0"
    fault_report.detail = {"processes": codes.total(), **{f"exit {c}": n for c, n in codes.items()}}
