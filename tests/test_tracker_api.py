"""The ``Tracker`` facade end to end: file log in tmp_path, a real Redis, a prefix per test."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from tests.conftest import PrivateRedis
from tests.services import free_port, pid_alive
from tracker import (
    ClosedError,
    InvalidInputError,
    NotYetVisibleError,
    Position,
    Reader,
    SessionDTO,
    SessionExistsError,
    SessionNotFoundError,
    Settings,
    SnapshotStoreError,
    SnapshotUnavailableError,
    Tracker,
    TrackerError,
)
from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    SessionCreated,
    TitleChanged,
    encode_validated,
)
from tracker.logs.file import FileLog
from tracker.model import MAX_OFFSET
from tracker.projector import Projector
from tracker.rebuild import ReplayReport

ID = re.compile(r"^[A-Za-z0-9]{10}$")


@pytest.fixture
def settings(tmp_path: Path, redis_url: str, prefix: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=redis_url, prefix=prefix, fsync=False)


@pytest.fixture
def tracker(settings: Settings) -> Iterator[Tracker]:
    with Tracker.open(settings=settings) as opened:
        yield opened


def create(tracker: Tracker, sid: str, user: str = "user-1", agent: str = "agent-1") -> SessionDTO:
    return tracker.create_session(agent, user, session_id=sid)


Snapshot = tuple[list[SessionDTO], dict[str, dict[str, int] | None]]


def snapshot(tracker: Tracker, session_ids: list[str]) -> Snapshot:
    """Everything a user can query: the session list, and each id's offsets (None if gone)."""
    offsets: dict[str, dict[str, int] | None] = {}
    for sid in session_ids:
        try:
            offsets[sid] = tracker.offsets(sid)
        except SessionNotFoundError:
            offsets[sid] = None
    return tracker.list_sessions(), offsets


def populate(tracker: Tracker) -> list[str]:
    """A little of everything; returns the session ids involved."""
    a = create(tracker, "sess-a", user="u1").id
    b = tracker.create_session("agent-2", "u2", title="B").id
    c = create(tracker, "sess-c", user="u1").id
    tracker.commit(a, "client", 5)
    tracker.commit(a, "client", 3)
    tracker.commit_many([(a, "notifier", 2), (b, "client", 9), ("early", "client", 4)])
    tracker.reset_offset(b, "client", 1, reason="reprocess", actor="ops")
    tracker.rename(a, "renamed")
    tracker.delete_session(c)
    tracker.commit(c, "client", 100, strict=False)
    return [a, b, c, "early", "unknown"]


# -- commands and queries -------------------------------------------------------------------


def test_create_and_get(tracker: Tracker) -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    dto = tracker.create_session("agent-1", "user-1", title="Hello")
    assert ID.match(dto.id)
    assert (dto.agent_id, dto.user_id, dto.title, dto.consumption_offsets) == (
        "agent-1",
        "user-1",
        "Hello",
        {},
    )
    assert dto.created_at.tzinfo is not None
    assert before <= dto.created_at <= datetime.now(UTC)
    assert tracker.get_session(dto.id) == dto
    assert tracker.event_count() == 1
    named = tracker.create_session("agent-1", "user-1", session_id="zv3h4j5Fjv")
    assert named.id == "zv3h4j5Fjv"
    assert named.title is None
    assert b'"title"' not in msgspec.json.encode(named), "a null title is omitted"
    assert tracker.get_session("nothere") is None


def test_list_sessions_by_user_and_agent(tracker: Tracker) -> None:
    a = tracker.create_session("ag1", "u1", session_id="a")
    b = tracker.create_session("ag2", "u1", session_id="b")
    c = tracker.create_session("ag1", "u2", session_id="c")
    d = tracker.create_session("ag1", "u1", session_id="d")
    tracker.commit("never-created", "client", 1, strict=False)
    tracker.delete_session("d")
    assert tracker.list_sessions() == [a, b, c]
    assert tracker.list_sessions(user_id="u1") == [a, b]
    assert tracker.list_sessions(agent_id="ag1") == [a, c]
    assert tracker.list_sessions(user_id="u1", agent_id="ag1") == [a]
    assert tracker.list_sessions(user_id="nobody") == []
    assert d not in tracker.list_sessions(user_id="u1")


def test_rename_sets_and_clears_the_title(tracker: Tracker) -> None:
    sid = create(tracker, "s1").id
    assert tracker.rename(sid, "first").title == "first"
    assert tracker.rename(sid, "second").title == "second"
    dto = tracker.rename(sid, None)
    assert dto.title is None
    assert tracker.get_session(sid) == dto
    with pytest.raises(SessionNotFoundError):
        tracker.rename("missing", "x")


def test_commit_is_a_max_register(tracker: Tracker) -> None:
    sid = create(tracker, "s1").id
    first = tracker.commit(sid, "client", 5)
    assert (first.previous, first.current, first.changed, first.stale) == (None, 5, True, False)
    stale = tracker.commit(sid, "client", 3)
    assert (stale.previous, stale.current, stale.changed, stale.stale) == (5, 5, False, True)
    same = tracker.commit(sid, "client", 5)
    assert (same.changed, same.stale) == (False, False)
    later = tracker.commit(sid, "client", 8)
    assert later.changed and later.current == 8
    assert first.position < stale.position < same.position < later.position
    assert tracker.applied_position() == later.position
    assert tracker.offsets(sid) == {"client": 8}
    dto = tracker.get_session(sid)
    assert dto is not None and dto.consumption_offsets == {"client": 8}
    assert tracker.event_count() == 5, "stale commits are recorded too"


def test_get_session_and_position_is_get_session_and_applied_position(
    tracker: Tracker, settings: Settings
) -> None:
    assert tracker.get_session_and_position("nobody") == (None, None)
    sid = create(tracker, "s1").id
    last = tracker.commit(sid, "client", 7).position
    session, applied = tracker.get_session_and_position(sid)
    assert session == tracker.get_session(sid)
    assert session is not None and session.consumption_offsets == {"client": 7}
    assert applied == last == tracker.applied_position()
    with Tracker(settings) as other:
        other.replay()  # a new generation: the first tracker's one is retired
        other.commit(sid, "client", 9)
        assert tracker.get_session_and_position(sid) == (
            other.get_session(sid),
            other.applied_position(),
        )
    with pytest.raises(InvalidInputError, match="session_id"):
        tracker.get_session_and_position("not an id")


def test_offsets_up_to_2_63_minus_1(tracker: Tracker) -> None:
    sid = create(tracker, "s1").id
    tracker.commit(sid, "client", MAX_OFFSET - 1)
    tracker.commit(sid, "client", MAX_OFFSET)
    tracker.commit(sid, "client", 2**53)
    assert tracker.offsets(sid) == {"client": MAX_OFFSET}


def test_commit_many_is_one_append(tracker: Tracker) -> None:
    a, b = create(tracker, "a").id, create(tracker, "b").id
    result = tracker.commit_many([(a, "client", 3), (b, "client", 1), (a, "client", 2)])
    assert result.count == 3
    assert result.last == tracker.applied_position()
    assert result.last is not None
    assert result.last.index == 2, "the three events are one batch"
    assert tracker.offsets(a) == {"client": 3}
    assert tracker.offsets(b) == {"client": 1}
    assert tracker.event_count() == 5
    assert tracker.commit_many([]).count == 0
    assert tracker.event_count() == 5


def test_commit_many_strict_refuses_unknown_sessions_and_appends_nothing(
    tracker: Tracker,
) -> None:
    a = create(tracker, "a").id
    with pytest.raises(SessionNotFoundError, match="ghost"):
        tracker.commit_many([(a, "client", 3), ("ghost", "client", 1)], strict=True)
    assert tracker.event_count() == 1
    assert tracker.offsets(a) == {}
    tracker.commit_many([("orphan", "client", 1)])  # kept: strict=False is the default
    gone = create(tracker, "gone").id
    tracker.delete_session(gone)
    count = tracker.event_count()
    for refused in ("orphan", gone):
        with pytest.raises(SessionNotFoundError, match=refused):
            tracker.commit_many([(a, "client", 3), (refused, "client", 2)], strict=True)
    assert tracker.event_count() == count
    assert tracker.commit_many([(a, "client", 3)], strict=True).count == 1
    assert tracker.offsets(a) == {"client": 3}


def test_reset_moves_backwards_with_a_plan_first(tracker: Tracker) -> None:
    sid = create(tracker, "s1").id
    tracker.commit(sid, "client", 10)
    count = tracker.event_count()
    plan = tracker.plan_reset(sid, "client", 4)
    assert (plan.current, plan.target, plan.applied, plan.position) == (10, 4, False, None)
    assert tracker.event_count() == count, "a plan appends nothing"
    done = tracker.reset_offset(sid, "client", 4, reason="reprocess", actor="ops")
    assert done.applied and done.position == tracker.applied_position()
    assert tracker.offsets(sid) == {"client": 4}
    tracker.commit(sid, "client", 6)
    assert tracker.offsets(sid) == {"client": 6}
    exported = list(tracker.export_events())
    reset_event = next(e for e in exported if type(e).__name__ == "OffsetReset")
    assert (getattr(reset_event, "actor", None), getattr(reset_event, "reason", None)) == (
        "ops",
        "reprocess",
    )
    with pytest.raises(SessionNotFoundError):
        tracker.reset_offset("missing", "client", 1)


def test_delete_hides_the_session_and_later_events_do_not_revive(tracker: Tracker) -> None:
    sid = create(tracker, "s1").id
    tracker.commit(sid, "client", 2)
    position = tracker.delete_session(sid)
    assert position == tracker.applied_position()
    assert tracker.get_session(sid) is None
    assert tracker.list_sessions() == []
    state = tracker.session_state(sid)
    assert state is not None and state.deleted
    with pytest.raises(SessionNotFoundError, match="deleted"):
        tracker.offsets(sid)
    with pytest.raises(SessionNotFoundError):
        tracker.delete_session(sid)
    with pytest.raises(SessionExistsError):
        create(tracker, sid)
    with pytest.raises(SessionNotFoundError):
        tracker.commit(sid, "client", 9)
    count = tracker.event_count()
    tracker.commit(sid, "client", 9, strict=False)
    tracker.commit_many([(sid, "other", 1)])
    tracker.import_events(
        [
            SessionCreated(session_id=sid, agent_id="a", user_id="u", created_at=datetime.now(UTC)),
            TitleChanged(session_id=sid, title="back"),
        ]
    )
    assert tracker.event_count() == count + 4, "the events are recorded"
    assert tracker.get_session(sid) is None, "but change nothing"
    assert tracker.list_sessions() == []
    state = tracker.session_state(sid)
    assert state is not None and state.deleted and state.offsets == {}


def test_commits_to_a_session_never_created(tracker: Tracker) -> None:
    with pytest.raises(SessionNotFoundError):
        tracker.commit("later", "client", 3)
    assert tracker.event_count() == 0
    result = tracker.commit("later", "client", 3, strict=False)
    assert result.current == 3
    assert tracker.event_count() == 1
    assert tracker.offsets("later") == {"client": 3}
    assert tracker.get_session("later") is None
    state = tracker.session_state("later")
    assert state is not None and not state.created and not state.deleted
    assert tracker.list_sessions() == []
    with pytest.raises(SessionNotFoundError, match="never created"):
        tracker.commit("later", "client", 4)
    dto = tracker.create_session("agent-1", "user-1", session_id="later")
    assert dto.consumption_offsets == {"client": 3}
    assert tracker.commit("later", "client", 4).current == 4


def test_creating_an_existing_id_is_refused(tracker: Tracker) -> None:
    dto = create(tracker, "s1")
    with pytest.raises(SessionExistsError, match="s1"):
        tracker.create_session("agent-9", "user-9", session_id="s1")
    assert tracker.event_count() == 1
    assert tracker.get_session("s1") == dto


# -- bad input: refused, naming the field, and nothing appended -------------------------------

Call = Callable[[Tracker], object]

BAD_INPUT: list[tuple[str, Call, str]] = [
    ("agent id", lambda t: t.create_session("bad id!", "u"), "agent_id"),
    ("user id", lambda t: t.create_session("a", "bad/user"), "user_id"),
    ("empty id", lambda t: t.create_session("a", "u", session_id=""), "session_id"),
    ("long id", lambda t: t.create_session("a", "u", session_id="x" * 65), "session_id"),
    ("id with dot", lambda t: t.create_session("a", "u", session_id="a.b"), "session_id"),
    ("long title", lambda t: t.create_session("a", "u", title="x" * 201), "title"),
    ("rename long", lambda t: t.rename("s1", "x" * 201), "title"),
    ("commit id", lambda t: t.commit("bad id", "client", 1), "session_id"),
    ("commit id lax", lambda t: t.commit("bad id", "client", 1, strict=False), "session_id"),
    ("consumer", lambda t: t.commit("s1", "bad consumer!", 1), "consumer"),
    ("consumer empty", lambda t: t.commit("s1", "", 1), "consumer"),
    ("consumer long", lambda t: t.commit("s1", "c" * 65, 1), "consumer"),
    ("negative", lambda t: t.commit("s1", "client", -1), "offset"),
    ("2**63", lambda t: t.commit("s1", "client", 2**63), "offset"),
    ("float", lambda t: t.commit("s1", "client", 1.5), "offset"),  # type: ignore[arg-type]
    ("string", lambda t: t.commit("s1", "client", "3"), "offset"),  # type: ignore[arg-type]
    ("bool", lambda t: t.commit("s1", "client", True), "offset"),
    ("lax negative", lambda t: t.commit("s1", "client", -1, strict=False), "offset"),
    ("many id", lambda t: t.commit_many([("bad id", "client", 1)]), "session_id"),
    ("many consumer", lambda t: t.commit_many([("s1", "a b", 1)]), "consumer"),
    ("many negative", lambda t: t.commit_many([("s1", "client", -1)]), "offset"),
    ("many 2**63", lambda t: t.commit_many([("s1", "client", 2**63)]), "offset"),
    ("many float", lambda t: t.commit_many([("s1", "client", 1.5)]), "offset"),  # type: ignore[list-item]
    ("many string", lambda t: t.commit_many([("s1", "client", "3")]), "offset"),  # type: ignore[list-item]
    ("many bool", lambda t: t.commit_many([("s1", "client", True)]), "offset"),
    ("many shape", lambda t: t.commit_many([("s1", "client")]), "commit 1"),  # type: ignore[list-item]
    (
        "many second bad",
        lambda t: t.commit_many([("s1", "client", 1), ("s1", "client", -5)]),
        "commit 2",
    ),
    ("reset negative", lambda t: t.reset_offset("s1", "client", -1), "offset"),
    ("reset consumer", lambda t: t.reset_offset("s1", "a/b", 1), "consumer"),
    ("reset 2**63", lambda t: t.reset_offset("s1", "client", 2**63), "offset"),
    ("reset actor", lambda t: t.reset_offset("s1", "client", 1, actor="a" * 201), "actor"),
    ("reset reason", lambda t: t.reset_offset("s1", "client", 1, reason="r" * 1001), "reason"),
    (
        "import event id",
        lambda t: t.import_events(
            [OffsetCommitted(session_id="s1", consumer="c", offset=1, event_id="e" * 65)]
        ),
        "event_id",
    ),
    (
        "import offset",
        lambda t: t.import_events([OffsetCommitted(session_id="s1", consumer="c", offset=-1)]),
        "offset",
    ),
    (
        "import title",
        lambda t: t.import_events([TitleChanged(session_id="s1", title="x" * 201)]),
        "title",
    ),
    (
        "import second bad",
        lambda t: t.import_events(
            [
                OffsetCommitted(session_id="s1", consumer="c", offset=1),
                OffsetCommitted(session_id="bad id", consumer="c", offset=1),
            ]
        ),
        "session_id",
    ),
    ("get id", lambda t: t.get_session("bad id"), "session_id"),
    ("list user", lambda t: t.list_sessions(user_id="u!"), "user_id"),
]


@pytest.mark.parametrize(
    ("call", "field"), [(c, f) for _, c, f in BAD_INPUT], ids=[n for n, _, _ in BAD_INPUT]
)
def test_bad_input_is_refused_naming_the_field(tracker: Tracker, call: Call, field: str) -> None:
    create(tracker, "s1")
    tracker.commit("s1", "client", 7)
    count = tracker.event_count()
    before = snapshot(tracker, ["s1"])
    with pytest.raises(InvalidInputError, match=re.escape(field)):
        call(tracker)
    assert tracker.event_count() == count
    assert snapshot(tracker, ["s1"]) == before


# -- import and export ----------------------------------------------------------------------


def test_export_then_import_into_another_tracker(
    tracker: Tracker, tmp_path: Path, redis_url: str, make_prefix: Callable[[], str]
) -> None:
    ids = populate(tracker)
    exported = list(tracker.export_events())
    assert len(exported) == tracker.event_count()
    positions = [e.position for e in exported]
    assert all(p is not None for p in positions)
    assert positions == sorted(p for p in positions if p is not None)
    assert all(e.event_id and e.recorded_at for e in exported)
    # through the JSON lines format of `events export`
    lines = [msgspec.json.encode(e) for e in exported]
    decoded: list[AnyEvent] = [msgspec.json.decode(line, type=AnyEvent) for line in lines]
    other = Settings(
        data_dir=tmp_path / "other", redis_url=redis_url, prefix=make_prefix(), fsync=False
    )
    with Tracker.open(settings=other) as copy:
        result = copy.import_events(decoded)
        assert result.count == len(exported)
        assert snapshot(copy, ids) == snapshot(tracker, ids)
        again = list(copy.export_events())
        assert [e.event_id for e in again] == [e.event_id for e in exported]
        assert copy.verify().differences == []


# -- replay, verify, reopen -----------------------------------------------------------------


@pytest.fixture
def private_settings(tmp_path: Path, private_redis: PrivateRedis) -> Settings:
    return Settings(data_dir=tmp_path / "data", redis_url=private_redis.url, fsync=False)


def flushall(private_redis: PrivateRedis) -> None:
    with private_redis.client() as client:
        client.flushall()


def test_replay_after_flushall_restores_the_state(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with Tracker.open(settings=private_settings) as tracker:
        ids = populate(tracker)
        before = snapshot(tracker, ids)
        assert before[0], "some sessions to compare"
        flushall(private_redis)
        report = tracker.replay()
        assert report.events == tracker.event_count()
        assert report.sessions == 4, "a, b, the tombstone of c and early"
        assert snapshot(tracker, ids) == before
        assert tracker.verify().differences == []
        # a second replay (into the next generation) changes nothing either
        tracker.replay()
        assert snapshot(tracker, ids) == before
        with private_redis.client() as client:
            data = {key.split(":")[1] for key in client.scan_iter("trk:g*") if ":cp" not in key}
            retired = {
                key: client.get(key)
                for key in client.scan_iter("trk:g*:cp")
                if key.split(":")[1] not in data
            }
        assert len(data) == 1, f"old generations are dropped: {data}"
        assert retired, "the old generations' checkpoints are kept"
        assert set(retired.values()) == {"retired"}, "and poisoned"


def test_a_long_lived_tracker_notices_that_redis_was_flushed(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    """No restart: the next read that misses finds the projection gone and rebuilds it."""
    with Tracker.open(settings=private_settings) as tracker:
        ids = populate(tracker)
        before = snapshot(tracker, ids)
        flushall(private_redis)
        session = tracker.get_session("sess-a")
        assert session is not None, "the first read after the flush already finds it"
        assert session.title == "renamed"
        assert snapshot(tracker, ids) == before
        assert tracker.verify().differences == []


def test_verify_names_damaged_sessions(tracker: Tracker, redis_client: redis.Redis) -> None:
    ids = populate(tracker)
    clean = tracker.verify()
    assert clean.differences == []
    assert clean.events == tracker.event_count()
    assert clean.sessions == 4
    store = tracker.store
    a, b = ids[0], ids[1]
    redis_client.hset(store.keys.session(0, a), "oclient", "999")
    redis_client.delete(store.keys.session(0, b))
    report = tracker.verify()
    problems = {d.session_id: d.problem for d in report.differences}
    assert set(problems) == {a, b}
    assert "offset of client 999 in Redis, 5 in the log" in problems[a]
    assert "missing" in problems[b]
    tracker.replay()
    assert tracker.verify().differences == []


def test_reopening_with_an_empty_redis_rebuilds_on_open(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with Tracker.open(settings=private_settings) as tracker:
        ids = populate(tracker)
        before = snapshot(tracker, ids)
        applied = tracker.applied_position()
    with Tracker.open(settings=private_settings) as tracker:
        assert snapshot(tracker, ids) == before
        assert tracker.applied_position() == applied
    flushall(private_redis)
    with Tracker.open(settings=private_settings) as tracker:
        assert tracker.applied_position() == applied
        assert snapshot(tracker, ids) == before
        assert tracker.verify().differences == []


def test_reopening_catches_up_with_events_appended_meanwhile(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "s1")
        tracker.commit("s1", "client", 1)
    # another writer appended to the log while no tracker was open
    with FileLog(settings.data_dir / "log") as log:
        log.append(
            0,
            encode_validated(
                [
                    OffsetCommitted(session_id="s1", consumer="client", offset=5),
                    TitleChanged(session_id="s1", title="from elsewhere"),
                ]
            ),
        )
    with Tracker.open(settings=settings) as tracker:
        dto = tracker.get_session("s1")
        assert dto is not None
        assert (dto.consumption_offsets, dto.title) == ({"client": 5}, "from elsewhere")
        assert tracker.applied_position() == Position(0, 2, 1)


def test_verify_catches_a_snapshot_behind_its_checkpoint(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with Tracker.open(settings=private_settings) as tracker:
        create(tracker, "s1")
        tracker.commit("s1", "client", 1)
    with private_redis.client() as client:
        # Redis lost a write but kept the checkpoint (e.g. a hand edit or a bad restore)
        for key in client.scan_iter("trk:*"):
            if client.type(key) == "hash" and client.hexists(key, "oclient"):
                client.hset(key, "oclient", "0")
    # a reopen does not re-apply what the checkpoint says is applied; verify sees it
    with Tracker.open(settings=private_settings) as tracker:
        assert tracker.offsets("s1") == {"client": 0}
        assert [d.session_id for d in tracker.verify().differences] == ["s1"]
        tracker.replay()
        assert tracker.offsets("s1") == {"client": 1}


def test_redis_lost_and_restarted_empty_is_rebuilt_from_the_log(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with Tracker.open(settings=private_settings) as tracker:
        ids = populate(tracker)
        before = snapshot(tracker, ids)
        before_pid = private_redis.pid
        private_redis.kill()
        count = tracker.event_count()
        # appended, then the projection fails: the log keeps the commit, the error says so
        with pytest.raises(NotYetVisibleError, match="durable") as info:
            tracker.commit_many([("sess-a", "client", 50)])
        assert info.value.retriable
        assert info.value.positions == [list(tracker.export_events())[-1].position]
        assert isinstance(info.value.__cause__, SnapshotUnavailableError)
        assert tracker.event_count() == count + 1
        private_redis.restart()
        assert private_redis.pid != before_pid
        assert not pid_alive(before_pid)
        # the same long-lived tracker notices the empty Redis and rebuilds it
        assert tracker.offsets("sess-a") == {"client": 50, "notifier": 2}
        assert [s.id for s in tracker.list_sessions()] == [s.id for s in before[0]]
    with Tracker.open(settings=private_settings) as tracker:
        assert tracker.offsets("sess-a") == {"client": 50, "notifier": 2}
        after = snapshot(tracker, ids)
        assert [s.id for s in after[0]] == [s.id for s in before[0]]
        assert after[1] == {**before[1], "sess-a": {"client": 50, "notifier": 2}}
        assert tracker.verify().differences == []


def test_an_unreachable_redis_is_refused_and_the_log_released(tmp_path: Path, prefix: str) -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    settings = Settings(data_dir=tmp_path / "data", redis_url=url, prefix=prefix)
    with pytest.raises(SnapshotStoreError, match="cannot reach Redis") as info:
        Tracker.open(settings=settings)
    assert "secret" not in str(info.value), "the password is masked"
    with FileLog(tmp_path / "data" / "log", lock_timeout=0) as log:
        assert log.count(0) == 0


def test_an_evicting_redis_is_warned_about(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", "allkeys-lru")
    with Tracker.open(settings=private_settings) as tracker:
        assert any("noeviction" in warning for warning in tracker.warnings)
    with private_redis.client() as client:
        client.config_set("maxmemory-policy", "noeviction")
    with Tracker.open(settings=private_settings) as tracker:
        assert tracker.warnings == []


def test_a_torn_log_tail_is_repaired_and_reported_on_open(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "s1")
        tracker.commit("s1", "client", 4)
    (segment,) = (settings.data_dir / "log").glob("*.seg")
    with open(segment, "ab") as file:
        file.write(b"TRKF\x00\x01")  # a crash in the middle of the next append
    with Tracker.open(settings=settings) as tracker:
        assert any("repaired" in warning for warning in tracker.warnings)
        assert tracker.offsets("s1") == {"client": 4}
        tracker.commit("s1", "client", 5)
    with Tracker.open(settings=settings) as tracker:
        assert tracker.warnings == []
        assert tracker.offsets("s1") == {"client": 5}


def test_embedded_redis_by_default_and_stopped_on_close(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "emb", fsync=False)
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "s1")
        tracker.commit("s1", "client", 42)
        info: dict[str, Any] = tracker.client.info("server")
        pid = int(info["process_id"])
        assert pid_alive(pid)
    assert not pid_alive(pid), "the embedded redis-server was stopped"
    with Tracker.open(settings=settings) as tracker:
        assert tracker.offsets("s1") == {"client": 42}
        second = int(tracker.client.info("server")["process_id"])
        assert second != pid
    assert not pid_alive(second)


def test_a_prefix_holding_another_logs_projection_is_refused_until_replay(
    tracker: Tracker, settings: Settings, tmp_path: Path
) -> None:
    populate(tracker)
    tracker.close()
    elsewhere = Settings(
        data_dir=tmp_path / "new-data", redis_url=settings.redis_url, prefix=settings.prefix
    )
    with Tracker.open(settings=elsewhere) as other:
        for call in (
            lambda: other.get_session("sess-a"),
            other.list_sessions,
            lambda: other.commit("sess-a", "client", 1, strict=False),
            lambda: other.create_session("a", "u"),
            other.verify,
        ):
            with pytest.raises(SnapshotStoreError, match="another --prefix"):
                call()
        assert other.event_count() == 0, "nothing was appended"
        with pytest.raises(SnapshotStoreError, match="--force"):
            other.replay()
        report = other.replay(force=True)
        assert report.events == 0
        assert other.list_sessions() == []
        create(other, "fresh")
        assert [s.id for s in other.list_sessions()] == ["fresh"]
        assert other.verify().differences == []


def test_a_checkpoint_past_the_end_of_the_log_is_refused(
    tracker: Tracker, settings: Settings
) -> None:
    populate(tracker)
    end = tracker.applied_position()
    assert end is not None
    tracker.close()
    for segment in (settings.data_dir / "log").glob("*.seg"):
        segment.unlink()  # the same log (same log.json identity), cut back to nothing
    # refused on open, or (if open defers it) by every query until a replay
    with (
        pytest.raises(SnapshotStoreError, match=r"replay") as info,
        Tracker.open(settings=settings) as reopened,
    ):
        reopened.list_sessions()
    assert end.token() in str(info.value)


def test_a_cut_log_can_be_replayed(tracker: Tracker, settings: Settings) -> None:
    populate(tracker)
    tracker.close()
    for segment in (settings.data_dir / "log").glob("*.seg"):
        segment.unlink()
    with Tracker.open(settings=settings) as reopened:
        with pytest.raises(SnapshotStoreError):
            reopened.list_sessions()
        reopened.replay()
        assert reopened.list_sessions() == []


def test_tracker_open_with_data_dir_and_url_arguments(
    tmp_path: Path, redis_url: str, prefix: str
) -> None:
    base = Settings(prefix=prefix, fsync=False)
    with Tracker.open(tmp_path / "d", redis_url, settings=base) as tracker:
        assert tracker.settings.data_dir == tmp_path / "d"
        assert tracker.settings.redis_url == redis_url
        create(tracker, "s1")
    assert (tmp_path / "d" / "log").is_dir()


def test_a_tracker_survives_a_copy_of_its_data_dir(
    tracker: Tracker, settings: Settings, tmp_path: Path, make_prefix: Callable[[], str]
) -> None:
    """A copied data dir is the same log: a new prefix rebuilds it on open."""
    ids = populate(tracker)
    before = snapshot(tracker, ids)
    applied = tracker.applied_position()
    tracker.close()
    copy = tmp_path / "copy"
    shutil.copytree(settings.data_dir, copy)
    (copy / "log" / "LOCK").unlink()
    moved = Settings(data_dir=copy, redis_url=settings.redis_url, prefix=make_prefix(), fsync=False)
    with Tracker.open(settings=moved) as reopened:
        assert snapshot(reopened, ids) == before
        assert reopened.applied_position() == applied


# -- threads, waiting, the error contract --------------------------------------------------


def test_eight_threads_share_one_tracker(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        for k in range(4):
            create(tracker, f"th-{k}")
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                for i in range(60):
                    if i % 3 == 0:
                        tracker.commit(f"th-{i % 4}", f"thread-{t}", i)
                    else:
                        batch = [(f"th-{k}", f"thread-{t}", i) for k in range(4)]
                        tracker.commit_many(batch, wait=i % 2 == 0)
                    if i % 10 == 0:
                        tracker.list_sessions()
            except BaseException as error:  # reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        last = list(tracker.export_events())[-1].position
        assert last is not None
        tracker.wait_for(last)
        for k in range(4):
            assert tracker.offsets(f"th-{k}") == {f"thread-{t}": 59 for t in range(8)}
    with Tracker.open(settings=settings) as reopened:
        assert reopened.warnings == [], "the log needed no repair"
        assert reopened.event_count() == 4 + 8 * (20 + 40 * 4)
        assert reopened.verify().differences == []


def test_commit_many_without_waiting_returns_at_the_log_ack(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "nw-1")
        result = tracker.commit_many([("nw-1", "client", 5)], wait=False)
        assert result.last is not None and result.count == 1
        tracker.wait_for(result.last, timeout=10)
        assert tracker.offsets("nw-1") == {"client": 5}
        assert tracker.applied_position() == result.last


def test_closing_projects_what_was_appended_without_waiting(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "nw-2")
        results = [tracker.commit_many([("nw-2", "client", i)], wait=False) for i in range(1, 200)]
    assert settings.redis_url is not None
    with Reader.connect(settings.redis_url, settings.prefix) as reader:
        assert reader.applied_position() == results[-1].last
        assert reader.offsets("nw-2") == {"client": 199}


def test_wait_for_a_position_never_appended_times_out_clearly(settings: Settings) -> None:
    with Tracker.open(settings=settings) as tracker:
        create(tracker, "wf-1")
        ahead = Position(0, 10**6, 0)
        started = time.monotonic()
        with pytest.raises(
            NotYetVisibleError, match=r"not visible after 0\.2 s: it is past the end of the log"
        ) as info:
            tracker.wait_for(ahead, timeout=0.2)
        assert time.monotonic() - started < 5
        assert info.value.retriable and info.value.positions == [ahead]


def test_every_method_of_a_closed_tracker_says_so(settings: Settings) -> None:
    tracker = Tracker.open(settings=settings)
    create(tracker, "cl-1")
    tracker.close()
    tracker.close()  # closing twice is fine
    calls: list[Callable[[], object]] = [
        lambda: tracker.get_session("cl-1"),
        lambda: tracker.commit("cl-1", "client", 1),
        lambda: tracker.commit_many([("cl-1", "client", 1)]),
        tracker.list_sessions,
        tracker.verify,
        tracker.replay,
        lambda: tracker.wait_for(Position(0, 0, 0)),
        lambda: tracker.history("cl-1"),
        lambda: tracker.session_as_of("cl-1", Position(0, 0, 0)),
    ]
    for call in calls:
        with pytest.raises(ClosedError, match="closed") as info:
            call()
        assert not info.value.retriable, "a retry loop would never end"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: t.commit_many(None), "expected an iterable"),
        (lambda t: t.commit_many(5), "expected an iterable"),
        (lambda t: t.commit_many([{"session_id": "a"}]), "commit 1"),
        (lambda t: t.commit_many([(["a"], "client", 1)]), "commit 1: session_id"),
        (lambda t: t.import_events([{"type": "offset_committed"}]), "event 1: expected an event"),
        (lambda t: t.import_events(None), "expected an iterable"),
        (lambda t: t.import_events(5), "expected an iterable"),
    ],
)
def test_wrong_types_from_python_callers_are_invalid_input(
    tracker: Tracker, call: Callable[[Tracker], object], message: str
) -> None:
    count = tracker.event_count()
    with pytest.raises(InvalidInputError, match=message):
        call(tracker)
    assert tracker.event_count() == count


def commands_sent(client: redis.Redis, action: Callable[[], object]) -> list[str]:
    """The commands Redis received from clients during ``action`` (not those run by Lua)."""
    marker = f"end-{time.monotonic_ns()}"
    seen: list[str] = []
    with client.monitor() as monitor:  # type: ignore[no-untyped-call]
        action()
        client.echo(marker)
        for command in monitor.listen():
            if marker in command["command"]:
                break
            name = command["command"].split()[0].upper()
            if command["client_type"] != "lua" and name not in {"HELLO", "CLIENT"}:
                seen.append(name)  # the handshake of the test's own connection aside
    return seen


def test_a_single_command_costs_two_redis_round_trips(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    """One pipelined read of what the command needs, then one fenced merge: no SCRIPT
    EXISTS before it, no read after it."""
    with Tracker.open(settings=private_settings) as tracker, private_redis.client() as client:
        create(tracker, "rt-0")
        read, merge = ["HGETALL", "HGET"], ["EVALSHA"]
        assert commands_sent(client, lambda: create(tracker, "rt-1")) == read + merge
        assert commands_sent(client, lambda: tracker.commit("rt-1", "client", 3)) == read + merge
        assert commands_sent(client, lambda: tracker.rename("rt-1", "t")) == read + merge
        assert commands_sent(client, lambda: tracker.get_session("rt-1")) == read


def test_replay_on_a_flushed_redis_does_the_work_once(
    private_settings: Settings, private_redis: PrivateRedis
) -> None:
    with Tracker.open(settings=private_settings) as tracker:
        populate(tracker)
    flushall(private_redis)
    with private_redis.client() as client:
        client.config_resetstat()
        with Tracker(private_settings, catch_up=False) as tracker:
            report = tracker.replay()
            generation = tracker.generations.store.keys.generation
        keys = list(client.scan_iter("trk:g*"))
    assert report.events > 0
    others = [key for key in keys if not key.startswith(f"trk:g{generation}:")]
    assert others == [], "opening for a replay projected nothing into another generation"


@pytest.mark.parametrize("bad", ["abc\n", "x" * 64 + "\n", "abc\r", "\nabc"])
def test_a_trailing_newline_is_not_part_of_a_valid_id(tracker: Tracker, bad: str) -> None:
    """``$`` matches before a final newline; the id patterns must not let one through."""
    with pytest.raises(InvalidInputError, match="session_id"):
        tracker.create_session("agent", "user", session_id=bad)
    with pytest.raises(InvalidInputError, match="agent_id"):
        tracker.create_session(bad, "user")
    with pytest.raises(InvalidInputError, match="consumer"):
        tracker.commit_many([("abc", bad, 1)])
    assert tracker.event_count() == 0


def test_a_session_with_thousands_of_consumers_replays(tracker: Tracker) -> None:
    """One delta with 9,000 consumers: more values than Lua's unpack() takes at once."""
    create(tracker, "wide")
    for start in range(0, 9000, 3000):
        tracker.commit_many([("wide", f"c{i}", i) for i in range(start, start + 3000)])
    tracker.commit_many([("wide", f"d{i}", 1) for i in range(9000)])
    report = tracker.replay()
    assert report.sessions == 1
    offsets = tracker.offsets("wide")
    assert len(offsets) == 18000 and offsets["c8999"] == 8999 and offsets["d0"] == 1
    assert tracker.verify().differences == []


def test_a_replay_overtaken_by_another_is_superseded_not_promoted(
    private_settings: Settings,
) -> None:
    """Two replays at once: the newer generation wins, the active one is never retired."""
    with Tracker.open(settings=private_settings) as tracker:
        ids = populate(tracker)
        before = snapshot(tracker, ids)
        overtaken: list[ReplayReport] = []

        def overtake(_: int) -> None:
            if not overtaken:
                with Tracker(private_settings, catch_up=False) as other:
                    overtaken.append(other.replay())

        slow = tracker.replay(overtake)
        assert overtaken and not overtaken[0].superseded
        assert slow.superseded
        assert slow.generation == overtaken[0].generation
        assert snapshot(tracker, ids) == before
        tracker.commit("sess-a", "client", 99)
        assert tracker.offsets("sess-a")["client"] == 99
        assert tracker.verify().differences == []


@pytest.mark.parametrize("title", ["caf\udce9", "\ud800"])
def test_text_that_is_not_unicode_is_invalid_input(tracker: Tracker, title: str) -> None:
    """What Python makes of non-UTF-8 bytes in argv (surrogate escapes), or a lone surrogate."""
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        tracker.create_session("agent", "user", title=title)
    assert tracker.event_count() == 0


def test_closing_while_other_threads_commit_raises_only_tracker_errors(
    settings: Settings,
) -> None:
    tracker = Tracker.open(settings=settings)
    create(tracker, "cc-1")
    unexpected: list[BaseException] = []
    appended_but_closed: list[NotYetVisibleError] = []

    def work(t: int) -> None:
        for i in range(2000):
            try:
                tracker.commit_many([("cc-1", f"t{t}", i)], wait=i % 2 == 0)
            except NotYetVisibleError as error:
                appended_but_closed.append(error)
            except TrackerError:
                return
            except BaseException as error:  # the defect this test is about
                unexpected.append(error)
                return

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    tracker.close()
    for thread in threads:
        thread.join()
    assert unexpected == []
    assert all(error.positions for error in appended_but_closed)


def test_a_projection_of_an_older_schema_is_refused_until_replay(
    tracker: Tracker, settings: Settings, redis_client: redis.Redis
) -> None:
    populate(tracker)
    tracker.close()
    redis_client.hset(f"{settings.prefix}:meta", "schema", "1")
    with Tracker.open(settings=settings) as reopened:
        with pytest.raises(SnapshotStoreError, match=r"another version .* run `tracker replay`"):
            reopened.get_session("sess-a")
        reopened.replay()
        assert reopened.offsets("sess-a") == {"client": 5, "notifier": 2}
    assert redis_client.hget(f"{settings.prefix}:meta", "schema") == "2"


def test_ids_validated_before_do_not_let_near_copies_through(tracker: Tracker) -> None:
    """Validated strings are remembered; only the exact same string skips the check."""
    tracker.commit_many([("known-1", "client", 1)])
    for bad in ("known-1\n", "known-1 ", "known-1" + "x" * 60):
        with pytest.raises(InvalidInputError, match="session_id"):
            tracker.commit_many([("known-1", "client", 2), (bad, "client", 2)])
    assert tracker.offsets("known-1") == {"client": 1}


def test_a_commit_right_after_another_process_promotes_is_visible(settings: Settings) -> None:
    """A replay that promoted and died before dropping the old generation: a process still
    bound to the old one must not commit into it (readers have moved on)."""
    with Tracker.open(settings=settings) as worker:
        create(worker, "w-1")
        worker.commit_many([("w-1", "c", 1)])
        with Tracker(settings, catch_up=False) as replayer:
            generations = replayer.generations
            store = generations.begin(1)
            Projector(replayer._log, store).catch_up()
            assert generations.promote(store, replayer._log.log_id)
            store.close()  # and the replay dies here: no retire_older()
        worker.commit_many([("w-1", "c", 2)])
        assert settings.redis_url is not None
        with Reader.connect(settings.redis_url, settings.prefix) as reader:
            assert reader.offsets("w-1") == {"c": 2}


def test_a_retired_generation_that_nothing_replaced_is_rebuilt(
    settings: Settings, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay that died after retiring the active generation and before promoting its own."""
    monkeypatch.setattr("tracker.projector.PROMOTION_WAIT", 0.3)
    with Tracker.open(settings=settings) as worker:
        create(worker, "w-2")
        worker.commit_many([("w-2", "c", 1)])
        active = worker.generations.store.keys
        redis_client.set(active.checkpoint(0), "retired")
        worker.commit_many([("w-2", "c", 2)])
        assert worker.generations.store.keys.generation > active.generation
        assert settings.redis_url is not None
        with Reader.connect(settings.redis_url, settings.prefix) as reader:
            assert reader.offsets("w-2") == {"c": 2}
        assert worker.verify().differences == []
