"""History: offsets, epochs, bounds, and all-or-nothing recovery."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrt.hub.history import ChannelStream, History, StreamPosition


def epochs() -> itertools.count[int]:
    return itertools.count(1)


def make(max_size: int = 10, max_age: float = 100.0, idle_ttl: float = 50.0) -> History:
    counter = itertools.count(1)
    return History(max_size, max_age, lambda: f"e{next(counter)}", idle_ttl)


def test_offsets_count_up_in_one_epoch() -> None:
    h = make()
    pubs = [h.append("room", i, now=float(i), publisher="c1", key="k") for i in range(3)]
    assert [p.offset for p in pubs] == [1, 2, 3]
    assert {p.epoch for p in pubs} == {"e1"}
    assert pubs[0].publisher == "c1"
    assert pubs[0].key == "k"
    assert pubs[2].position == StreamPosition(3, "e1")
    # Another channel has its own offsets and epoch.
    assert h.append("lobby", "x", now=3.0).position == StreamPosition(1, "e2")


def test_recovery_in_window_returns_exactly_what_was_missed() -> None:
    h = make()
    for i in range(5):
        h.append("room", i, now=float(i))
    r = h.recover("room", StreamPosition(2, "e1"), now=5.0)
    assert r.recovered
    assert [p.data for p in r.publications] == [2, 3, 4]
    assert r.position == StreamPosition(5, "e1")
    at_top = h.recover("room", StreamPosition(5, "e1"), now=5.0)
    assert at_top.recovered
    assert at_top.publications == ()
    from_start = h.recover("room", StreamPosition(0, "e1"), now=5.0)
    assert [p.offset for p in from_start.publications] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    ("since", "why"),
    [
        (StreamPosition(3, "e0"), "another epoch"),
        (StreamPosition(6, "e1"), "an offset the stream never reached"),
        (StreamPosition(-1, "e1"), "a negative offset"),
        (StreamPosition(1, "e1"), "trimmed by size: offsets 2..3 are gone"),
    ],
)
def test_recovery_outside_the_window_is_refused_whole(since: StreamPosition, why: str) -> None:
    h = make(max_size=2)
    for i in range(5):
        h.append("room", i, now=0.0)
    r = h.recover("room", since, now=0.0)
    assert not r.recovered, why
    assert r.publications == ()
    assert r.position == StreamPosition(5, "e1")


def test_age_trims_history() -> None:
    h = make(max_age=10.0)
    h.append("room", "old", now=0.0)
    h.append("room", "new", now=8.0)
    assert h.recover("room", StreamPosition(0, "e1"), now=9.0).recovered
    r = h.recover("room", StreamPosition(0, "e1"), now=10.5)
    assert not r.recovered  # "old" expired at 10.0
    r = h.recover("room", StreamPosition(1, "e1"), now=10.5)
    assert [p.data for p in r.publications] == ["new"]


def test_without_history_only_the_top_recovers() -> None:
    h = make(max_size=0)
    h.append("room", 1, now=0.0)
    h.append("room", 2, now=0.0)
    assert h.recover("room", StreamPosition(2, "e1"), now=0.0).recovered
    assert not h.recover("room", StreamPosition(1, "e1"), now=0.0).recovered


def test_idle_unused_streams_expire_and_lose_their_epoch() -> None:
    h = make(idle_ttl=50.0)
    h.append("busy", 1, now=0.0)
    h.append("idle", 1, now=0.0)
    assert h.expire(now=49.0, in_use=lambda c: False) == []
    assert h.expire(now=50.0, in_use=lambda c: c == "busy") == ["idle"]
    assert "idle" not in h
    assert "busy" in h
    # The dropped channel starts over in a new epoch: old positions no longer recover.
    assert not h.recover("idle", StreamPosition(1, "e2"), now=51.0).recovered
    assert h.stream("idle", now=51.0).position == StreamPosition(0, "e3")


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        History(-1, 1.0, lambda: "e", 1.0)


@given(
    max_size=st.integers(0, 6),
    steps=st.lists(st.tuples(st.booleans(), st.floats(0, 5)), max_size=30),
    since=st.integers(0, 30),
    max_age=st.floats(1, 20),
)
def test_recovery_is_all_or_nothing(
    max_size: int, steps: list[tuple[bool, float]], since: int, max_age: float
) -> None:
    stream = ChannelStream("room", "e", max_size, max_age)
    now = 0.0
    published: list[tuple[int, float]] = []
    for publish, dt in steps:
        now += dt
        if publish:
            published.append((stream.append(len(published), now).offset, now))
    top = len(published)
    r = stream.recover(StreamPosition(since, "e"), now)
    kept = [o for o, t in published[-max_size:] if t >= now - max_age] if max_size else []
    # The retained run is consecutive and ends at the top, so it covers everything after
    # `since` iff it starts at or before since + 1.
    covered = since == top or (since < top and bool(kept) and kept[0] <= since + 1)
    assert r.recovered == (since <= top and covered)
    if r.recovered:
        assert [p.offset for p in r.publications] == list(range(since + 1, top + 1))
    else:
        assert r.publications == ()
