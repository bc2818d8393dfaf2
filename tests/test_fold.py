"""The pure fold and its batch deltas: each event's effect, and the laws the projector needs.

The hypothesis strategies here (random event sequences over a few session ids, consumers
and colliding offsets) are shared with ``test_projection.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tracker.events import (
    AnyEvent,
    OffsetCommitted,
    OffsetReset,
    SessionCreated,
    SessionDeleted,
    TitleChanged,
)
from tracker.fold import (
    Delta,
    SessionState,
    apply_delta,
    compose,
    fold,
    fold_all,
    fold_batch,
    is_empty,
    visible,
)
from tracker.model import MAX_OFFSET, SessionDTO

# -- strategies (shared with test_projection.py) ----------------------------------------

SESSION_IDS = ("s1", "s2", "s3", "s4")
CONSUMERS = ("client", "notifier", "idx.v2")

T0 = datetime(2025, 1, 25, 22, 41, 41, tzinfo=UTC)
T1 = datetime(2025, 1, 26, 8, 0, 0, 250_000, tzinfo=UTC)

session_ids = st.sampled_from(SESSION_IDS)
consumers = st.sampled_from(CONSUMERS)
offsets = st.one_of(st.integers(0, 6), st.integers(MAX_OFFSET - 3, MAX_OFFSET))
titles = st.one_of(
    st.none(),
    st.sampled_from(["", "first", "second"]),
    st.text(st.characters(codec="utf-8"), max_size=200),
)
created_ats = st.one_of(
    st.sampled_from([T0, T1]),
    st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
)


def creates(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[SessionCreated]:
    return st.builds(
        SessionCreated,
        session_id=sid,
        agent_id=st.sampled_from(["agent-1", "agent_2"]),
        user_id=st.sampled_from(["user-1", "user_2"]),
        created_at=created_ats,
        title=titles,
    )


def commits(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[OffsetCommitted]:
    return st.builds(OffsetCommitted, session_id=sid, consumer=consumers, offset=offsets)


def resets(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[OffsetReset]:
    return st.builds(OffsetReset, session_id=sid, consumer=consumers, offset=offsets)


def title_changes(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[TitleChanged]:
    return st.builds(TitleChanged, session_id=sid, title=titles)


def deletes(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[SessionDeleted]:
    return st.builds(SessionDeleted, session_id=sid)


WEIGHTS = ((commits, 6), (resets, 2), (creates, 3), (title_changes, 4), (deletes, 1))


def any_events(sid: st.SearchStrategy[str] = session_ids) -> st.SearchStrategy[AnyEvent]:
    """All five event types; commits weighted up and deletes down, so sessions live a while."""
    built: list[st.SearchStrategy[AnyEvent]] = [kind(sid) for kind, _ in WEIGHTS]
    weighted = [
        strategy
        for strategy, (_, weight) in zip(built, WEIGHTS, strict=True)
        for _ in range(weight)
    ]
    # sampled_from keeps these proportions; one_of over repeated branches does not
    return st.sampled_from(weighted).flatmap(lambda strategy: strategy)


event_lists = st.lists(any_events(), max_size=40)


def histories(sid: str) -> st.SearchStrategy[list[AnyEvent]]:
    """A prior history of one session: none, never created, or created first (equally often)."""
    rest = st.lists(any_events(st.just(sid)), max_size=12)

    def without_creates(events: list[AnyEvent]) -> list[AnyEvent]:
        return [e for e in events if not isinstance(e, SessionCreated)]

    uncreated = rest.map(without_creates)
    created_first = st.tuples(creates(st.just(sid)), rest).map(lambda t: [t[0], *t[1]])
    choices: list[st.SearchStrategy[list[AnyEvent]]] = [st.just([]), uncreated, created_first]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


@st.composite
def split(draw: st.DrawFn, items: Sequence[AnyEvent]) -> list[list[AnyEvent]]:
    """``items`` cut into consecutive batches at random points (empty batches included)."""
    cuts = sorted(draw(st.lists(st.integers(0, len(items)), max_size=8)))
    bounds = [0, *cuts, len(items)]
    return [list(items[a:b]) for a, b in itertools.pairwise(bounds)]


def apply_batches(
    batches: Sequence[Sequence[AnyEvent]], states: dict[str, SessionState] | None = None
) -> dict[str, SessionState]:
    """What the projector does: one delta per session per batch, applied in batch order."""
    result = {} if states is None else dict(states)
    for batch in batches:
        for sid, delta in fold_batch(batch).items():
            result[sid] = apply_delta(result.get(sid), delta)
    return result


def delta_of(sid: str, events: Sequence[AnyEvent]) -> Delta:
    return fold_batch(events).get(sid, Delta(sid))


# -- each event's effect ---------------------------------------------------------------


def created(sid: str = "s1", title: str | None = None, at: datetime = T0) -> SessionCreated:
    return SessionCreated(
        session_id=sid, agent_id="agent-1", user_id="user-1", created_at=at, title=title
    )


def commit(offset: int, consumer: str = "client", sid: str = "s1") -> OffsetCommitted:
    return OffsetCommitted(session_id=sid, consumer=consumer, offset=offset)


def reset(offset: int, consumer: str = "client", sid: str = "s1") -> OffsetReset:
    return OffsetReset(session_id=sid, consumer=consumer, offset=offset)


def state_after(events: Sequence[AnyEvent], sid: str = "s1") -> SessionState:
    return fold_all(events)[sid]


def test_create_sets_the_immutable_fields_and_no_offsets() -> None:
    state = state_after([created(title="hello")])
    assert state.created
    assert (state.agent_id, state.user_id, state.created_at, state.title) == (
        "agent-1",
        "user-1",
        T0,
        "hello",
    )
    assert state.to_dto() == SessionDTO(
        id="s1",
        agent_id="agent-1",
        user_id="user-1",
        consumption_offsets={},
        created_at=T0,
        title="hello",
    )


def test_commits_are_max_registers() -> None:
    state = state_after([created(), commit(5), commit(3), commit(5), commit(1, "notifier")])
    assert state.offsets == {"client": 5, "notifier": 1}
    assert state_after([created(), commit(5), commit(7)]).offsets == {"client": 7}


def test_a_stale_commit_returns_the_state_unchanged() -> None:
    before = state_after([created(), commit(5)])
    assert fold(before, commit(4)) is before
    assert fold(before, commit(5)) is before


def test_offset_zero_is_recorded() -> None:
    assert state_after([created(), commit(0)]).offsets == {"client": 0}


def test_reset_moves_an_offset_backwards_and_commits_go_on_from_there() -> None:
    assert state_after([created(), commit(9), reset(2)]).offsets == {"client": 2}
    assert state_after([created(), commit(9), reset(2), commit(3)]).offsets == {"client": 3}
    assert state_after([created(), commit(9), reset(2), commit(1)]).offsets == {"client": 2}
    assert state_after([created(), reset(4)]).offsets == {"client": 4}


def test_a_second_create_changes_nothing() -> None:
    second = SessionCreated(
        session_id="s1", agent_id="other", user_id="other", created_at=T1, title="second"
    )
    state = state_after([created(title="first"), commit(3), second])
    assert (state.agent_id, state.user_id, state.created_at, state.title) == (
        "agent-1",
        "user-1",
        T0,
        "first",
    )
    assert state.offsets == {"client": 3}


def test_title_last_write_wins_and_none_clears() -> None:
    rename = [TitleChanged(session_id="s1", title=t) for t in ("a", "b", None, "c")]
    assert state_after([created(title="x"), *rename]).title == "c"
    assert state_after([created(title="x"), *rename[:3]]).title is None


def test_delete_is_a_tombstone_and_later_events_do_not_revive() -> None:
    later: list[AnyEvent] = [
        created(title="again", at=T1),
        commit(99),
        reset(1),
        TitleChanged(session_id="s1", title="t"),
    ]
    state = state_after([created(), commit(3), SessionDeleted(session_id="s1"), *later])
    assert state == SessionState("s1", deleted=True)
    assert state.to_dto() is None
    assert not is_empty(state)


def test_delete_of_a_session_never_seen_is_still_a_tombstone() -> None:
    state = state_after([SessionDeleted(session_id="s1"), created()])
    assert state.deleted
    assert state.to_dto() is None


def test_commits_before_the_create_are_kept() -> None:
    early = state_after([commit(4), commit(2, "notifier")])
    assert not early.created
    assert early.offsets == {"client": 4, "notifier": 2}
    assert early.to_dto() is None
    later = fold(early, created())
    dto = later.to_dto()
    assert dto is not None
    assert dto.consumption_offsets == {"client": 4, "notifier": 2}


def test_create_after_a_title_change_sets_its_own_title() -> None:
    before = [TitleChanged(session_id="s1", title="early")]
    assert state_after([*before, created(title="from create")]).title == "from create"
    assert state_after([*before, created(title=None)]).title is None
    assert state_after(before).title == "early"
    assert not state_after(before).created


def test_visible_drops_only_empty_states() -> None:
    states = fold_all(
        [
            TitleChanged(session_id="cleared", title="x"),
            TitleChanged(session_id="cleared", title=None),
            TitleChanged(session_id="titled", title=""),
            commit(1, sid="offsets"),
            SessionDeleted(session_id="gone"),
            created(sid="live"),
        ]
    )
    assert set(states) == {"cleared", "titled", "offsets", "gone", "live"}
    assert set(visible(states)) == {"titled", "offsets", "gone", "live"}


def test_fold_does_not_mutate_the_state_it_is_given() -> None:
    state = state_after([created(), commit(1)])
    fold(state, commit(5))
    fold(state, reset(0, "other"))
    assert state.offsets == {"client": 1}


# -- deltas: hand-picked cases ----------------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "expected"),
    [
        ([commit(3), reset(1), commit(2)], {"client": 2}),
        ([reset(1), commit(0)], {"client": 1}),
        ([commit(8), reset(1)], {"client": 1}),
        ([commit(2), commit(7), commit(4)], {"client": 7}),
    ],
)
def test_delta_offsets_equal_the_fold(batch: list[AnyEvent], expected: dict[str, int]) -> None:
    prior = state_after([created(), commit(5)])
    delta = delta_of("s1", batch)
    assert apply_delta(prior, delta).offsets == expected
    assert fold_all(batch, {"s1": prior})["s1"].offsets == expected


def test_delta_keeps_one_entry_per_session_in_order_of_first_appearance() -> None:
    batch: list[AnyEvent] = [commit(1, sid="b"), commit(1, sid="a"), commit(2, sid="b")]
    assert list(fold_batch(batch)) == ["b", "a"]


def test_delta_title_before_and_after_create() -> None:
    batch: list[AnyEvent] = [
        TitleChanged(session_id="s1", title="before"),
        created(title="create"),
        TitleChanged(session_id="s1", title="after"),
    ]
    assert apply_delta(None, delta_of("s1", batch)).title == "after"
    assert apply_delta(None, delta_of("s1", batch[:2])).title == "create"
    # the session already exists: the create is ignored, the last rename wins
    existing = state_after([created(title="old")])
    assert apply_delta(existing, delta_of("s1", batch[:2])).title == "before"


# -- properties ---------------------------------------------------------------------------


@settings(max_examples=300)
@given(st.data())
def test_batched_deltas_equal_the_per_event_fold(data: st.DataObject) -> None:
    """Property A: any split into batches, folded as deltas, equals the per-event fold."""
    events = data.draw(event_lists, label="events")
    batches = data.draw(split(events), label="batches")
    expected = fold_all(events)
    assert apply_batches(batches) == expected
    assert visible(apply_batches(batches)) == visible(expected)


@settings(max_examples=300)
@given(
    prior=histories("s1"),
    first=st.lists(any_events(st.just("s1")), max_size=12),
    second=st.lists(any_events(st.just("s1")), max_size=12),
)
def test_compose_equals_applying_in_turn(
    prior: list[AnyEvent], first: list[AnyEvent], second: list[AnyEvent]
) -> None:
    """Property B: ``compose(d1, d2)`` applied equals ``d1`` then ``d2``, from any prior state."""
    state = fold_all(prior).get("s1")
    d1, d2 = delta_of("s1", first), delta_of("s1", second)
    in_turn = apply_delta(apply_delta(state, d1), d2)
    assert apply_delta(state, compose(d1, d2)) == in_turn
    assert apply_delta(state, delta_of("s1", first + second)) == in_turn
    assert in_turn == fold_all(prior + first + second).get("s1", SessionState("s1"))


@settings(max_examples=200)
@given(
    a=st.lists(any_events(st.just("s1")), max_size=8),
    b=st.lists(any_events(st.just("s1")), max_size=8),
    c=st.lists(any_events(st.just("s1")), max_size=8),
    prior=histories("s1"),
)
def test_compose_is_associative_in_effect(
    a: list[AnyEvent], b: list[AnyEvent], c: list[AnyEvent], prior: list[AnyEvent]
) -> None:
    state = fold_all(prior).get("s1")
    da, db, dc = delta_of("s1", a), delta_of("s1", b), delta_of("s1", c)
    left = apply_delta(state, compose(compose(da, db), dc))
    right = apply_delta(state, compose(da, compose(db, dc)))
    assert left == right


no_reset_events = st.lists(
    st.one_of(commits(), commits(), creates(), title_changes(), deletes()), max_size=40
)


@settings(max_examples=300)
@given(st.data())
def test_redelivered_commits_change_nothing_without_resets(data: st.DataObject) -> None:
    """Property C: with no resets in the log, commits may be redelivered any number of times,
    in any order, at any later point: offsets are max-registers and tombstones absorb them.
    (Creates, renames and deletes are not redelivery-safe in general, and resets are not at
    all; the checkpoint fence is what applies those exactly once, see test_projection.py.)
    """
    events = data.draw(no_reset_events, label="events")
    redelivered = data.draw(
        st.lists(st.sampled_from(events)) if events else st.just([]), label="redelivered"
    )
    redelivered = [e for e in redelivered if isinstance(e, OffsetCommitted)]
    assert fold_all(events + redelivered) == fold_all(events)


@settings(max_examples=300)
@given(
    prior=histories("s1"),
    batch=st.lists(st.one_of(commits(st.just("s1")), deletes(st.just("s1"))), max_size=12),
)
def test_a_redelivered_commit_batch_delta_is_idempotent(
    prior: list[AnyEvent], batch: list[AnyEvent]
) -> None:
    """Property C for deltas: a batch of commits (and deletes) applied twice equals once."""
    state = fold_all(prior).get("s1")
    delta = delta_of("s1", batch)
    once = apply_delta(state, delta)
    assert apply_delta(once, delta) == once


def test_a_redelivered_reset_batch_is_not_idempotent() -> None:
    """Why the fence exists: redelivering ``commit 5`` after ``reset 2`` would undo the reset."""
    batches: list[list[AnyEvent]] = [[created(), commit(5)], [reset(2)]]
    assert apply_batches(batches)["s1"].offsets == {"client": 2}
    assert apply_batches([*batches, batches[0]])["s1"].offsets == {"client": 5}
    # without the reset, the same redelivery is harmless
    assert apply_batches([batches[0], [commit(3)], batches[0]])["s1"].offsets == {"client": 5}


def test_a_title_before_the_create_is_not_redelivery_safe() -> None:
    """Another case the fence covers: re-applying ``[rename, create]`` changes the title."""
    batch: list[AnyEvent] = [TitleChanged(session_id="s1", title="early"), created(title="mine")]
    once = fold_all(batch)["s1"]
    assert once.title == "mine"
    assert fold_all(batch + batch)["s1"].title == "early"
