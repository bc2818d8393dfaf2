"""History and point-in-time reads: a session's past folded from the log, read-your-writes.

The property test drives a real :class:`Tracker` (file log, real Redis) with random
commands and records what the projection said after each one; ``session_as_of`` at
that command's position, or at its time, must say the same. The expected values come
from Redis, never from a second copy of the fold.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.test_cli import (
    FLUX_AGENT,
    FLUX_SESSION,
    FLUX_USER,
    Cli,
    assert_flux0_session,
    one_line_error,
)
from tracker import (
    InvalidInputError,
    Position,
    SessionDTO,
    SessionExistsError,
    SessionNotFoundError,
    Settings,
    Tracker,
)
from tracker.events import OffsetCommitted, SessionCreated
from tracker.history import check_as_of, parse_as_of
from tracker.keys import partition_for


@pytest.fixture
def tracker_settings(tmp_path: Path, redis_url: str, prefix: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix, fsync=False)


@pytest.fixture
def tracker(tracker_settings: Settings) -> Iterator[Tracker]:
    with Tracker.open(settings=tracker_settings) as opened:
        yield opened


# -- parse_as_of -------------------------------------------------------------------------

AS_OF_MESSAGE = (
    "as_of: expected an ISO 8601 time with a zone or a position PARTITION:OFFSET:INDEX, got "
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-29T09:27:41Z", datetime(2025, 1, 29, 9, 27, 41, tzinfo=UTC)),
        ("2025-01-29T10:27:41.250+01:00", datetime(2025, 1, 29, 9, 27, 41, 250_000, tzinfo=UTC)),
        ("0:0:0", Position(0, 0, 0)),
        ("3:1234:17", Position(3, 1234, 17)),
    ],
)
def test_parse_as_of_reads_times_with_a_zone_and_positions(
    text: str, expected: datetime | Position
) -> None:
    parsed = parse_as_of(text)
    assert parsed == expected
    if isinstance(parsed, datetime):
        assert parsed.utcoffset() is not None


@pytest.mark.parametrize(
    "text",
    ["", "yesterday", "0:1", "0:1:2:3", "-1:0:0", "0:0:0 ", "٠:٠:٠", "2025-01-29", "1:a:2"],
)
def test_parse_as_of_refuses_anything_else_in_one_line(text: str) -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_as_of(text)
    message = str(info.value)
    assert message.startswith(AS_OF_MESSAGE + repr(text)), message
    assert "\n" not in message


def test_parse_as_of_refuses_a_time_without_a_zone() -> None:
    with pytest.raises(InvalidInputError, match="it has no time zone"):
        parse_as_of("2025-01-29T09:27:41")


def test_a_position_of_another_partition_is_refused() -> None:
    sid = next(f"s{n}" for n in itertools.count() if partition_for(f"s{n}", 12) != 0)
    check_as_of(Position(partition_for(sid, 12), 5, 0), sid, 12)
    with pytest.raises(InvalidInputError, match=f"events of session {sid} are in partition"):
        check_as_of(Position(0, 5, 0), sid, 12)
    with pytest.raises(InvalidInputError, match="names partition 12"):
        check_as_of(Position(12, 5, 0), sid, 12)
    with pytest.raises(InvalidInputError, match="has no time zone"):
        check_as_of(datetime(2025, 1, 1), sid, 12)


# -- the property: the past equals what the projection said then ---------------------------


class Op(msgspec.Struct, frozen=True):
    kind: str
    consumer: str = "client"
    offset: int = 0
    title: str | None = None


consumers = st.sampled_from(["client", "notifier"])
offsets = st.integers(0, 5)
titles = st.one_of(st.none(), st.sampled_from(["first", "second", "[b]x[/b]"]))
ops = st.one_of(
    st.builds(Op, st.just("create"), title=titles),
    st.builds(Op, st.just("commit"), consumer=consumers, offset=offsets),
    st.builds(Op, st.just("rename"), title=titles),
    st.builds(Op, st.just("reset"), consumer=consumers, offset=offsets),
    st.builds(Op, st.just("delete")),
    st.builds(Op, st.just("other"), consumer=consumers, offset=offsets),
)
KINDS = {
    "create": "session_created",
    "commit": "offset_committed",
    "rename": "title_changed",
    "reset": "offset_reset",
    "delete": "session_deleted",
}
_examples = itertools.count()


def run(tracker: Tracker, sid: str, op: Op) -> bool:
    """Apply ``op``; whether it appended an event of ``sid`` (a refused command appends none)."""
    try:
        if op.kind == "create":
            tracker.create_session("agent-1", "user-1", session_id=sid, title=op.title)
        elif op.kind == "commit":
            result = tracker.commit(sid, op.consumer, op.offset, strict=False)
            assert result.position == tracker.applied_position(0)
        elif op.kind == "rename":
            tracker.rename(sid, op.title)
        elif op.kind == "reset":
            plan = tracker.reset_offset(sid, op.consumer, op.offset, reason="test")
            assert plan.position == tracker.applied_position(0)
        elif op.kind == "delete":
            assert tracker.delete_session(sid) == tracker.applied_position(0)
        else:
            tracker.commit(f"{sid}-other", op.consumer, op.offset, strict=False)
            return False
    except (SessionNotFoundError, SessionExistsError):
        return False
    return True


def state_at(
    times: list[datetime], states: list[SessionDTO | None], at: datetime
) -> SessionDTO | None:
    """What the projection said after the last own command recorded at or before ``at``."""
    earlier = [state for time, state in zip(times, states, strict=True) if time <= at]
    return earlier[-1] if earlier else None


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(commands=st.lists(ops, max_size=10))
def test_the_past_equals_what_the_projection_said_then(
    tracker: Tracker, commands: list[Op]
) -> None:
    sid = f"h{next(_examples)}"
    start = tracker.applied_position(0)
    seen: list[tuple[Position, SessionDTO | None]] = []  # after every command
    own: list[tuple[Op, Position, SessionDTO | None]] = []  # after commands appending to sid
    for op in commands:
        appended = run(tracker, sid, op)
        position = tracker.applied_position(0)
        if position is None or (seen and seen[-1][0] == position) or position == start:
            continue  # refused: nothing appended
        now = tracker.get_session(sid)
        seen.append((position, now))
        if appended:
            own.append((op, position, now))

    for position, expected in seen:
        assert tracker.session_as_of(sid, position) == expected, position
    if seen and seen[0][0].offset > 0:
        before = Position(0, seen[0][0].offset - 1, 0)
        assert tracker.session_as_of(sid, before) is None

    if not own:
        with pytest.raises(SessionNotFoundError, match=f"session {sid} not found"):
            tracker.history(sid)
        return
    event(f"own commands: {min(len(own), 5)}{'+' if len(own) > 5 else ''}")
    event("deleted" if any(op.kind == "delete" for op, _, _ in own) else "not deleted")
    history = tracker.history(sid)
    assert [entry.position for entry in history] == [p.token() for _, p, _ in own]
    assert [entry.event["type"] for entry in history] == [KINDS[op.kind] for op, _, _ in own]
    assert all(entry.event["session_id"] == sid for entry in history)

    times = [entry.recorded_at for entry in history]
    if times != sorted(times):
        event("the wall clock went backwards: time checks left out")
        return
    states = [state for _, _, state in own]
    probes = [times[0] - timedelta(milliseconds=1)]
    for time in times:
        probes += [time, time + timedelta(microseconds=500)]
    for at in probes:
        assert tracker.session_as_of(sid, at) == state_at(times, states, at), at


# -- a few cases spelt out ---------------------------------------------------------------


def test_a_time_takes_the_events_recorded_by_then_in_log_order(tracker: Tracker) -> None:
    """Imported events may be recorded earlier than those before them in the log."""
    t1, t2, t3 = (datetime(2025, 1, 29, 9, minute, tzinfo=UTC) for minute in (1, 2, 3))
    tracker.import_events(
        [
            SessionCreated(
                session_id="imp", agent_id="a", user_id="u", created_at=t1, recorded_at=t1
            ),
            OffsetCommitted(session_id="imp", consumer="client", offset=9, recorded_at=t3),
            OffsetCommitted(session_id="imp", consumer="client", offset=7, recorded_at=t2),
        ]
    )
    assert tracker.session_as_of("imp", t1 - timedelta(seconds=1)) is None
    at_t1 = tracker.session_as_of("imp", t1)
    assert at_t1 is not None and at_t1.consumption_offsets == {}
    at_t2 = tracker.session_as_of("imp", t2)
    assert at_t2 is not None and at_t2.consumption_offsets == {"client": 7}
    assert tracker.session_as_of("imp", t3) == tracker.get_session("imp")
    assert [entry.recorded_at for entry in tracker.history("imp")] == [t1, t3, t2]


def test_history_and_the_past_of_a_deleted_session(tracker: Tracker) -> None:
    tracker.create_session("a", "u", session_id="gone", title="t")
    commit = tracker.commit("gone", "client", 4)
    alive = tracker.get_session("gone")
    deleted_at = tracker.delete_session("gone")
    tracker.commit("gone", "client", 8, strict=False)  # recorded, changes nothing
    assert tracker.get_session("gone") is None
    assert tracker.session_as_of("gone", commit.position) == alive
    assert tracker.session_as_of("gone", deleted_at) is None
    history = tracker.history("gone")
    types = [entry.event["type"] for entry in history]
    assert types == ["session_created", "offset_committed", "session_deleted", "offset_committed"]


def test_bad_ids_and_naive_times_are_refused(tracker: Tracker) -> None:
    with pytest.raises(InvalidInputError, match="session_id"):
        tracker.history("not an id")
    with pytest.raises(InvalidInputError, match="session_id"):
        tracker.session_as_of("not an id", Position(0, 0, 0))
    with pytest.raises(InvalidInputError, match="no time zone"):
        tracker.session_as_of("s1", datetime(2025, 1, 1))
    with pytest.raises(InvalidInputError, match="names partition 1"):
        tracker.session_as_of("s1", Position(1, 0, 0))
    assert tracker.session_as_of("never-seen", datetime.now(UTC)) is None


# -- the CLI -----------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path, redis_url: str, prefix: str) -> Cli:
    return Cli(tmp_path / "data", redis_url, prefix)


POSITION = re.compile(r"\(position (\d+:\d+:\d+)\)")
FLUX = FLUX_SESSION


def commit_position(cli: Cli, *args: str) -> str:
    """Commit through the CLI; the position it printed."""
    match = POSITION.search(cli.ok("offsets", "commit", *args).stdout)
    assert match is not None
    return match.group(1)


def test_cli_history_is_the_export_of_the_sessions_events(cli: Cli) -> None:
    cli.create("s1")
    commit_position(cli, "s1", "client", "3")
    cli.create("s2")
    cli.ok("sessions", "rename", "s1", "[bold]mine[/bold]")
    cli.ok("sessions", "rename", "s1", "--clear")
    lines = cli.json_lines("sessions", "history", "s1", "--json")
    exported = [line for line in cli.export() if line["session_id"] == "s1"]
    assert [line["event"] for line in lines] == exported
    for line, original in zip(lines, exported, strict=True):
        assert set(line) == {"position", "recorded_at", "event"}
        position = original["position"]
        assert line["position"] == f"{position['partition']}:{position['offset']}:0"
        assert line["recorded_at"] == original["recorded_at"]

    table = cli.ok("sessions", "history", "s1")
    out = table.stdout
    for word in ("position", "recorded_at", "type", "details", "0:0:0", "session_created"):
        assert word in out, word
    assert "title=[bold]mine[/bold]" in out.replace("\n", "").replace(" ", "").replace("│", "")
    assert "title cleared" in out
    assert "0:2:0" not in out  # s2's event
    assert table.stderr == "4 events\n"


def test_cli_history_of_an_unknown_session_fails_in_one_line(cli: Cli) -> None:
    cli.create("s1")
    one_line_error(cli.fails(1, "sessions", "history", "nope"), "session nope not found")
    one_line_error(cli.fails(2, "sessions", "history", "no pe"), "session_id")


def test_cli_show_as_of(cli: Cli) -> None:
    cli.create(FLUX, FLUX_AGENT, FLUX_USER)
    first = commit_position(cli, FLUX, "client", "3")
    commit_position(cli, FLUX, "client", "5")
    then = cli.json("sessions", "show", FLUX, "--as-of", first)
    assert_flux0_session(then)
    assert then["consumption_offsets"] == {"client": 3}
    recorded = cli.json_lines("sessions", "history", FLUX, "--json")[1]["recorded_at"]
    assert cli.json("sessions", "show", FLUX, "--as-of", recorded) == then
    table = cli.ok("sessions", "show", FLUX, "--as-of", first).stdout
    assert "offset client" in table and "3" in table
    cli.ok("sessions", "delete", FLUX)
    one_line_error(cli.fails(1, "sessions", "show", FLUX), "deleted")
    assert cli.json("sessions", "show", FLUX, "--as-of", first) == then

    before = one_line_error(
        cli.fails(1, "sessions", "show", FLUX, "--as-of", "2000-01-01T00:00:00Z"),
        f"session {FLUX} did not exist at 2000-01-01T00:00:00Z",
    )
    assert before == f"error: session {FLUX} did not exist at 2000-01-01T00:00:00Z"
    one_line_error(cli.fails(1, "sessions", "show", "zz", "--as-of", first), "did not exist")


@pytest.mark.parametrize("bad", ["yesterday", "2025-01-29T09:27:41", "0:1", "1:0:0"])
def test_cli_show_refuses_a_bad_as_of_in_one_line(cli: Cli, bad: str) -> None:
    cli.create("s1")
    line = one_line_error(cli.fails(2, "sessions", "show", "s1", "--as-of", bad), "as_of")
    assert bad in line


def test_cli_show_min_position_reads_your_writes(cli: Cli) -> None:
    cli.create("s1")
    position = commit_position(cli, "s1", "client", "7")
    shown = cli.json("sessions", "show", "s1", "--min-position", position, "--timeout", "5")
    assert shown["consumption_offsets"] == {"client": 7}
    partition, offset, _ = position.split(":")
    ahead = f"{partition}:{int(offset) + 100}:0"
    line = one_line_error(
        cli.fails(75, "sessions", "show", "s1", "--min-position", ahead, "--timeout", "0"),
        f"position {ahead} is not visible",
        "past the end of the log",
    )
    assert line.startswith("error: ")
    one_line_error(cli.fails(2, "sessions", "show", "s1", "--min-position", "soon"), "min_position")
    one_line_error(cli.fails(2, "sessions", "show", "s1", "--min-position", "9:0:0"), "partition")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--timeout", "1"], ["--timeout applies to --min-position only"]),
        (["--as-of", "0:0:0", "--min-position", "0:0:0"], ["at most one of"]),
        (["--min-position", "0:0:0", "--timeout", "-1"], ["--timeout"]),
    ],
)
def test_cli_show_refuses_conflicting_options(cli: Cli, args: list[str], words: list[str]) -> None:
    cli.create("s1")
    one_line_error(cli.fails(2, "sessions", "show", "s1", *args), *words)
