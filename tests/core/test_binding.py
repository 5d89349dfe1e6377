"""What the compiled binding does with Python values, and with bad ones.

Semantics are checked against the reference in test_matcher_differential.py; here are the
conversions, the errors the binding raises itself, and that a failed call changes nothing.
"""

from __future__ import annotations

import collections
import math

import pytest

from pyrt import ChannelNameError, FilterError, Matcher, RowEvent


def test_row_event_round_trips_values() -> None:
    record = {"n": None, "b": True, "i": -7, "f": 2.5, "s": "x", "big": 2**64}
    ev = RowEvent("update", "public", "t", record, old_record={"i": 1})
    assert (ev.type, ev.schema, ev.table) == ("UPDATE", "public", "t")
    assert ev.record == {**record, "big": float(2**64)}  # beyond i64: a float
    assert type(ev.record["b"]) is bool  # type: ignore[index]
    assert ev.old_record == {"i": 1}
    assert RowEvent("INSERT", "s", "t").record is None
    assert "UPDATE" in repr(ev)


def test_row_events_are_values() -> None:
    a = RowEvent("insert", "s", "t", {"a": 1, "b": "x"}, None)
    b = RowEvent("INSERT", "s", "t", {"b": "x", "a": 1.0})  # order and 1 == 1.0 as in Python
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != RowEvent("INSERT", "s", "t", {"a": 2, "b": "x"})
    assert a != RowEvent("INSERT", "s", "t", {"a": 1, "b": "x"}, {"a": 1})
    assert a != RowEvent("UPDATE", "s", "t", {"a": 1, "b": "x"})
    assert a != RowEvent("INSERT", "s", "u", {"a": 1, "b": "x"})
    assert a != ("INSERT", "s", "t")


def test_row_event_accepts_any_mapping() -> None:
    ev = RowEvent("INSERT", "s", "t", collections.OrderedDict(a=1))
    assert ev.record == {"a": 1}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"type": "UPSERT"}, ValueError, "unknown event type 'UPSERT'"),
        ({"record": {"a": [1]}}, TypeError, "column 'a': unsupported value type list"),
        ({"record": {"a": b"x"}}, TypeError, "unsupported value type bytes"),
        ({"record": {1: 1}}, TypeError, "record keys must be str"),
        ({"record": [("a", 1)]}, TypeError, "record must be a mapping"),
        ({"record": {"a": 10**400}}, OverflowError, "too large to convert to float"),
    ],
)
def test_row_event_rejects_bad_input(kwargs: dict[str, object], error: type, message: str) -> None:
    args: dict[str, object] = {"type": "INSERT", "schema": "s", "table": "t", **kwargs}
    with pytest.raises(error, match=message):
        RowEvent(**args)  # type: ignore[arg-type]


def test_failed_adds_change_nothing() -> None:
    m = Matcher()
    m.add_rows(1, "*", "s", "t", "a=eq.1")
    with pytest.raises(ValueError, match="subscription id 1 is already in use"):
        m.add_channel(1, "room")
    with pytest.raises(FilterError) as e:
        m.add_rows(2, "*", "s", "t", "a=eq.1,b=between.2")
    assert (e.value.reason, e.value.position) == ("unknown operator 'between'", 9)
    with pytest.raises(ChannelNameError) as c:
        m.add_channel(3, "room:*x")
    assert (c.value.reason, c.value.position) == ("wildcard must be a whole segment", 5)
    with pytest.raises(OverflowError):
        m.add_channel(-1, "room")
    with pytest.raises(OverflowError):
        m.add_channel(2**64, "room")
    with pytest.raises(TypeError):
        m.add_channel("1", "room")  # type: ignore[arg-type]
    assert len(m) == 1
    assert 1 in m
    assert 2 not in m
    assert -1 not in m
    assert "x" not in m
    assert m.match_row(RowEvent("INSERT", "s", "t", {"a": 1})) == [1]


def test_matching_a_bad_channel_name_raises() -> None:
    m = Matcher()
    m.add_channel(1, ">")
    with pytest.raises(ChannelNameError) as e:
        m.match_channel("room:*")
    assert (e.value.reason, e.value.position) == ("wildcards are only allowed in patterns", 5)
    with pytest.raises(TypeError):
        m.match_channels(["a", 1])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        m.match_rows([RowEvent("INSERT", "s", "t"), "not an event"])  # type: ignore[list-item]
    assert m.match_channels(["a", "b:c"]) == [[1], [1]]


def test_ids_span_u64() -> None:
    m = Matcher()
    m.add_rows(2**64 - 1, "*", "*", "*")
    m.add_channel(0, "x")
    assert m.match_row(RowEvent("DELETE", "a", "b")) == [2**64 - 1]
    assert m.match_channel("x") == [0]


def test_stats_follow_adds_and_removes() -> None:
    m = Matcher()
    m.add_rows(1, "*", "s", "t", "a=gt.1")
    m.add_rows(2, "*", "s", "t", "a=eq.1")
    m.add_channel(3, "a:b:>")
    assert m.stats() == {
        "channel_subscriptions": 1,
        "row_subscriptions": 2,
        "trie_nodes": 3,
        "row_groups": 1,
        "scanned_row_subscriptions": 1,
    }
    for sub_id in (1, 2, 3):
        assert m.remove(sub_id)
    assert not m.remove(1)
    assert m.stats() == {
        "channel_subscriptions": 0,
        "row_subscriptions": 0,
        "trie_nodes": 1,
        "row_groups": 0,
        "scanned_row_subscriptions": 0,
    }


def test_nan_and_negative_zero_follow_postgres() -> None:
    m = Matcher()
    m.add_rows(1, "*", "s", "t", "x=eq.NaN")
    m.add_rows(2, "*", "s", "t", "x=eq.0")
    m.add_rows(3, "*", "s", "t", "x=gt.1e308")
    at = lambda x: sorted(m.match_row(RowEvent("INSERT", "s", "t", {"x": x})))  # noqa: E731
    assert at(math.nan) == [1, 3]  # NaN equals NaN and is above every number
    assert at(-0.0) == [2]
    assert at(math.inf) == [3]
