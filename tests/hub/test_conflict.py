"""pyrt.conflict: hybrid logical clocks, the policies' merge laws, the server's record store,
the client's optimistic store, and records channels in the sans-IO hub (frames in, frames out).

The convergence state machine is in test_conflict_machine.py; real sockets in
test_conflict_e2e.py.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrt.conflict import (
    ClockDriftError,
    ConflictPolicy,
    CustomResolver,
    FieldMerge,
    HybridClock,
    LastWriterWins,
    Mutation,
    Op,
    OptimisticStore,
    Outcome,
    Record,
    RecordStore,
    Rejection,
    RejectOnConflict,
    Result,
    Timestamp,
    origin_tag,
    policy_named,
)
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.protocol import ErrorCode, decode_record, encode_record
from pyrt.node.config import ConfigError, hub_config
from pyrt.testing import Peer

# -- strategies ---------------------------------------------------------------------------------

NODES = ("a", "b", "n1", "z.9")
walls = st.integers(0, 10**13 - 1)
timestamps = st.builds(
    Timestamp, wall=walls, logical=st.integers(0, 99_999), node=st.sampled_from(NODES)
)
json_values = st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from(["", "x", "yy"])
FIELDS = ("a", "b", "c")
field_values = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=3)


@st.composite
def writes(draw: st.DrawFn, min_size: int = 0, max_size: int = 6) -> list[Mutation]:
    """Mutations of one record, each with its own timestamp (as real clocks give them)."""
    n = draw(st.integers(min_size, max_size))
    stamps = draw(
        st.lists(
            st.builds(
                Timestamp,
                wall=st.integers(0, 20),
                logical=st.integers(0, 3),
                node=st.sampled_from(NODES),
            ),
            min_size=n,
            max_size=n,
            unique=True,
        )
    )
    out = []
    for stamp in stamps:
        op = draw(st.sampled_from(Op))
        value = None if op is Op.DELETE else draw(field_values)
        out.append(Mutation("k", op, value, hlc=stamp))
    return out


def fold(policy: ConflictPolicy, mutations: list[Mutation]) -> Record:
    record = Record("k")
    for mutation in mutations:
        assert mutation.hlc is not None
        decided = policy.apply(record, mutation, mutation.hlc)
        assert isinstance(decided, Record)
        record = decided
    return record


MERGES = {"lww": LastWriterWins.merge, "merge": FieldMerge.merge}
POLICIES = {"lww": LastWriterWins(), "merge": FieldMerge()}


# -- timestamps and hybrid logical clocks -------------------------------------------------------


@settings(max_examples=300)
@given(a=timestamps, b=timestamps)
def test_timestamps_encode_decode_and_sort_as_strings(a: Timestamp, b: Timestamp) -> None:
    assert Timestamp.decode(a.encode()) == a
    assert (a < b) == (a.encode() < b.encode())
    assert (a == b) == (a.encode() == b.encode())


@pytest.mark.parametrize(
    "text",
    ["", "1.2.a", "0000000000001.00001.", "0000000000001.00001.a b", "x000000000001.00001.a"],
)
def test_bad_timestamps_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a timestamp"):
        Timestamp.decode(text)


def test_timestamp_fields_are_checked() -> None:
    with pytest.raises(ValueError, match="node name"):
        Timestamp(1, 0, "")
    with pytest.raises(ValueError, match="logical"):
        Timestamp(1, 100_000, "a")
    with pytest.raises(ValueError, match="wall"):
        Timestamp(-1, 0, "a")


# An execution: each step is a local event, a send or a receive at some node, with the wall
# clock reading the node has then (clocks jump around, also backwards).
steps = st.lists(
    st.tuples(
        st.sampled_from(["local", "send", "receive"]),
        st.sampled_from(NODES),
        st.integers(0, 50),  # wall clock reading
        st.integers(0, 99),  # which message a receive takes
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(steps=steps)
def test_hlc_is_monotonic_and_respects_causality(steps: list[tuple[str, str, int, int]]) -> None:
    clocks = {node: HybridClock(node) for node in NODES}
    last: dict[str, Timestamp] = {}
    network: list[Timestamp] = []
    highest_physical = 0
    for kind, node, physical, pick in steps:
        highest_physical = max(highest_physical, physical)
        clock = clocks[node]
        if kind == "receive":
            if not network:
                continue
            message = network[pick % len(network)]  # any message, any number of times
            stamp = clock.update(message, physical)
            assert stamp > message  # a receipt is after the send
        else:
            stamp = clock.now(physical)
            if kind == "send":
                network.append(stamp)
        if node in last:
            assert stamp > last[node]  # monotonic, whatever the wall clock did
        last[node] = stamp
        assert clock.last == stamp
        assert stamp.node == node
        # Close to physical time: never ahead of the latest wall clock reading anyone had.
        assert stamp.wall <= highest_physical
    # Happened-before is the transitive closure of "earlier on a node" and "send before
    # receive", both checked above: so it implies timestamp order.


def test_hlc_follows_the_wall_clock_and_counts_within_a_millisecond() -> None:
    clock = HybridClock("n1")
    assert clock.now(1000) == Timestamp(1000, 0, "n1")
    assert clock.now(1000) == Timestamp(1000, 1, "n1")
    assert clock.now(999) == Timestamp(1000, 2, "n1")  # the wall clock went back
    assert clock.now(1005) == Timestamp(1005, 0, "n1")
    assert clock.update(Timestamp(1005, 7, "x"), 1001) == Timestamp(1005, 8, "n1")
    assert clock.update(Timestamp(2000, 3, "x"), 1001) == Timestamp(2000, 4, "n1")
    assert clock.observe(Timestamp(2000, 9, "y")) == Timestamp(2000, 10, "n1")


def test_hlc_refuses_a_remote_clock_too_far_ahead() -> None:
    clock = HybridClock("n1", max_drift=500)
    clock.now(1000)
    with pytest.raises(ClockDriftError, match="1000 ms ahead"):
        clock.update(Timestamp(2000, 0, "x"), 1000)
    assert clock.last == Timestamp(1000, 0, "n1")  # unchanged
    assert clock.update(Timestamp(1500, 0, "x"), 1000) == Timestamp(1500, 1, "n1")


def test_hlc_counter_overflow_borrows_the_next_millisecond() -> None:
    clock = HybridClock("n1")
    clock.update(Timestamp(5, 99_999, "x"), 5)
    assert clock.last == Timestamp(6, 0, "n1")
    assert clock.now(5) == Timestamp(6, 1, "n1")


# -- merge laws ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lww", "merge"])
@settings(max_examples=400)
@given(data=st.data())
def test_merge_is_commutative_associative_idempotent(name: str, data: st.DataObject) -> None:
    policy, merge = POLICIES[name], MERGES[name]
    a, b, c = (fold(policy, data.draw(writes())) for _ in range(3))
    assert merge(a, b) == merge(b, a)
    assert merge(a, merge(b, c)) == merge(merge(a, b), c)
    assert merge(a, a) == a
    assert merge(merge(a, b), b) == merge(a, b)


@settings(max_examples=400)
@given(mutations=writes(max_size=8), data=st.data())
def test_field_merge_does_not_depend_on_order(mutations: list[Mutation], data: Any) -> None:
    """Any order of the same writes gives the same record, and merging the records of two
    replicas that saw some of the writes each gives the record of all of them."""
    policy = FieldMerge()
    shuffled = data.draw(st.permutations(mutations))
    assert fold(policy, shuffled) == fold(policy, mutations)
    left = data.draw(st.sets(st.integers(0, max(len(mutations) - 1, 0))))
    seen_a = [m for i, m in enumerate(mutations) if i in left]
    seen_b = [m for i, m in enumerate(mutations) if i not in left or i % 2]
    merged = FieldMerge.merge(fold(policy, seen_a), fold(policy, seen_b))
    assert merged == fold(policy, mutations)


@settings(max_examples=400)
@given(mutations=writes(max_size=8), data=st.data())
def test_lww_of_whole_values_does_not_depend_on_order(mutations: list[Mutation], data: Any) -> None:
    """With set and delete (patches read the current value), the latest write wins whatever
    the order, and it is the write with the largest timestamp."""
    mutations = [m for m in mutations if m.op is not Op.PATCH]
    policy = LastWriterWins()
    shuffled = data.draw(st.permutations(mutations))
    result = fold(policy, shuffled)
    assert result == fold(policy, mutations)
    if mutations:
        latest = max(mutations, key=lambda m: m.hlc or Timestamp(0, 0, "a"))
        assert result.written == latest.hlc
        assert result.value == latest.written_value(None)


def test_two_users_editing_different_fields_both_win() -> None:
    start = fold(FieldMerge(), [Mutation("k", Op.SET, {"title": "a", "done": False}, hlc=ts(1))])
    ann = Mutation("k", Op.PATCH, {"title": "b"}, hlc=ts(2, "ann"))
    bob = Mutation("k", Op.PATCH, {"done": True}, hlc=ts(2, "bob"))
    for first, second in [(ann, bob), (bob, ann)]:
        assert fold(FieldMerge(), [first, second]).value == {"title": "a", "done": False} | {
            "title": "b",
            "done": True,
        }
        record = FieldMerge().apply(start, first, first.hlc or ts(0))
        assert isinstance(record, Record)
        record = FieldMerge().apply(record, second, second.hlc or ts(0))
        assert isinstance(record, Record)
        assert record.value == {"title": "b", "done": True}
    # Under last-writer-wins the later of the two takes the whole record.
    lww = fold(LastWriterWins(), [Mutation("k", Op.SET, {"title": "a", "done": False}, hlc=ts(1))])
    for first, second in [(ann, bob), (bob, ann)]:
        record = LastWriterWins().apply(lww, first, first.hlc or ts(0))
        assert isinstance(record, Record)
        record = LastWriterWins().apply(record, second, second.hlc or ts(0))
        assert isinstance(record, Record)
    assert record.written == bob.hlc  # "bob" > "ann" at the same wall and logical time


def test_field_merge_delete_and_later_patch() -> None:
    policy = FieldMerge()
    record = fold(
        policy,
        [
            Mutation("k", Op.SET, {"a": 1, "b": 2}, hlc=ts(1)),
            Mutation("k", Op.DELETE, hlc=ts(3)),
            Mutation("k", Op.PATCH, {"a": 9}, hlc=ts(2)),  # before the delete: gone with it
        ],
    )
    assert record.value is None
    revived = policy.apply(record, Mutation("k", Op.PATCH, {"b": 5}, hlc=ts(4)), ts(4))
    assert isinstance(revived, Record)
    assert revived.value == {"b": 5}  # a patch after a delete starts a new record


def ts(wall: int, node: str = "a", logical: int = 0) -> Timestamp:
    return Timestamp(wall, logical, node)


# -- the policies, one by one -------------------------------------------------------------------


def test_reject_on_conflict_checks_the_base_version() -> None:
    policy = RejectOnConflict()
    absent = Record("k")
    created = policy.apply(absent, Mutation("k", Op.SET, {"a": 1}), ts(1))
    assert created == Record("k", {"a": 1})
    current = Record("k", {"a": 1}, version=ts(1))
    assert policy.apply(current, Mutation("k", Op.PATCH, {"b": 2}, base=ts(1)), ts(2)) == Record(
        "k", {"a": 1, "b": 2}
    )
    stale = policy.apply(current, Mutation("k", Op.PATCH, {"b": 2}, base=ts(0)), ts(2))
    assert isinstance(stale, Rejection)
    assert "conflict" in stale.reason
    # Creating needs the record absent: base None against an existing record is a conflict.
    assert isinstance(policy.apply(current, Mutation("k", Op.SET, {"a": 2}), ts(2)), Rejection)
    tombstone = Record("k", None, version=ts(5))
    assert policy.apply(tombstone, Mutation("k", Op.SET, {"a": 2}), ts(6)) == Record("k", {"a": 2})


def test_custom_resolver_and_policy_names() -> None:
    def add(current: Record, mutation: Mutation) -> Mapping[str, Any] | Rejection:
        assert mutation.value is not None
        if mutation.value.get("add", 0) < 0:
            return Rejection("only increments")
        return {"n": (current.value or {}).get("n", 0) + mutation.value["add"]}

    policy = policy_named("counter", {"counter": add})
    assert isinstance(policy, CustomResolver)
    assert policy.name == "counter"
    record = policy.apply(Record("k", {"n": 2}), Mutation("k", Op.PATCH, {"add": 3}), ts(1))
    assert record == Record("k", {"n": 5})
    assert policy.apply(Record("k"), Mutation("k", Op.PATCH, {"add": -1}), ts(1)) == Rejection(
        "only increments"
    )
    assert isinstance(policy_named("reject"), RejectOnConflict)
    assert isinstance(policy_named("lww"), LastWriterWins)
    assert isinstance(policy_named("merge"), FieldMerge)
    with pytest.raises(ValueError, match="no conflict policy or resolver named 'nope'"):
        policy_named("nope")
    bad = CustomResolver(lambda current, mutation: 42)  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match="a resolver returns"):
        bad.apply(Record("k"), Mutation("k", Op.DELETE), ts(1))


def test_mutation_value_must_match_its_op() -> None:
    with pytest.raises(ValueError, match="need a value"):
        Mutation("k", Op.SET)
    with pytest.raises(ValueError, match="need a value"):
        Mutation("k", Op.DELETE, {})


@settings(max_examples=200)
@given(
    value=st.none() | field_values,
    stamps=st.lists(st.none() | timestamps, min_size=4, max_size=4),
    field_stamp=timestamps,
)
def test_records_round_trip_through_json(
    value: dict[str, Any] | None, stamps: list[Timestamp | None], field_stamp: Timestamp
) -> None:
    version, written, cleared, _ = stamps
    fields = dict.fromkeys(value or {}, field_stamp)
    record = Record("k", value, version, written, fields, cleared)
    assert decode_record(orjson.loads(orjson.dumps(encode_record(record)))) == record


# -- the server's record store ------------------------------------------------------------------


def test_record_store_idempotency_log() -> None:
    store = RecordStore(RejectOnConflict())
    assert store.recall("o", 1, 0.0) == (False, None)
    store.remember("o", 2, "second", 0.0)
    assert store.recall("o", 1, 0.0) == (False, None)  # a gap is not processed
    assert store.recall("o", 2, 0.0) == (True, "second")
    store.remember("o", 1, "first", 0.0)
    for seq in range(3, 400):
        store.remember("o", seq, seq, 0.0)
    assert store.recall("o", 1, 0.0) == (True, None)  # processed, the reply forgotten
    assert store.recall("o", 399, 10.0) == (True, 399)
    store.expire(100.0, ttl=95.0)
    assert store.origins == 1  # used at 10.0
    store.expire(200.0, ttl=95.0)
    assert store.origins == 0
    assert store.recall("o", 399, 0.0) == (False, None)


def test_record_store_source_writes() -> None:
    store = RecordStore(LastWriterWins())
    written = store.write("k", {"a": 1}, ts(5), source_version=10)
    assert written == Record("k", {"a": 1}, version=ts(5), written=ts(5))
    assert store.write("k", {"a": 0}, ts(6), source_version=9) is None  # older: a replay
    assert store.write("k", {"a": 0}, ts(6), source_version=10) is None
    assert store.write("k", {"a": 1}, ts(6), source_version=11) is None  # no change
    deleted = store.write("k", None, ts(7))
    assert deleted is not None
    assert deleted.value is None
    assert store.records() == [deleted]


# -- the client's optimistic store --------------------------------------------------------------


class Server:
    """A minimal server for one client's store: a RecordStore and a clock."""

    def __init__(self, policy: ConflictPolicy) -> None:
        self.store = RecordStore(policy)
        self.clock = HybridClock("srv")
        self.wall = 1000

    def handle(self, mutation: Mutation) -> Result:
        assert mutation.hlc is not None
        self.clock.update(mutation.hlc, self.wall)
        return self.store.apply(mutation, self.clock.now(self.wall))

    def write(self, key: str, value: dict[str, Any] | None) -> Record:
        record = self.store.write(key, value, self.clock.now(self.wall))
        assert record is not None
        return record


def exchange(client: OptimisticStore, server: Server) -> list[Result]:
    """Sends what the client has to send and hands it the answers (publication first)."""
    results = []
    for mutation in client.take_outgoing(0.0):
        assert mutation.seq is not None
        result = server.handle(mutation)
        results.append(result)
        if result.outcome is Outcome.APPLIED:
            assert result.record is not None
            client.receive(result.record, client.tag, mutation.seq)
        client.replied(mutation.seq, result)
    return results


def test_view_updates_at_once_and_a_rejection_rolls_back() -> None:
    server = Server(RejectOnConflict())
    client = OptimisticStore("c1", RejectOnConflict())
    client.go_online()
    write, update = client.mutate("t", Op.SET, {"title": "milk"}, 1000)
    assert update.keys == {"t"}
    assert client.view == {"t": {"title": "milk"}}
    exchange(client, server)
    assert write.result is not None
    assert write.result.outcome is Outcome.APPLIED
    assert client.confirmed["t"].value == {"title": "milk"}
    # Someone else changes it; our patch, based on the old version, is refused.
    ours, _ = client.mutate("t", Op.PATCH, {"done": True}, 1000)
    assert client.view == {"t": {"title": "milk", "done": True}}
    theirs = server.write("t", {"title": "oat milk"})
    update = client.receive(theirs)
    # Predicted: based on a version that is gone, so the view already shows theirs.
    assert client.view == {"t": {"title": "oat milk"}}
    assert update.keys == {"t"}
    exchange(client, server)
    assert ours.result is not None
    assert ours.result.outcome is Outcome.REJECTED
    assert client.pending == ()
    assert client.view == {"t": {"title": "oat milk"}}


def test_chained_writes_wait_and_cascade_under_reject() -> None:
    server = Server(RejectOnConflict())
    server.write("t", {"n": 0})
    client = OptimisticStore("c1", RejectOnConflict())
    client.reset(server.store.records())
    client.go_online()
    first, _ = client.mutate("t", Op.PATCH, {"n": 1}, 1000)
    second, _ = client.mutate("t", Op.PATCH, {"n": 2}, 1000)
    other, _ = client.mutate("u", Op.SET, {"x": 1}, 1000)
    assert client.view == {"t": {"n": 2}, "u": {"x": 1}}
    # Only the first write of "t" goes out; the second waits for its answer.
    sent = client.take_outgoing(0.0)
    assert [(m.key, m.seq) for m in sent] == [("t", 1), ("u", 2)]
    theirs = server.write("t", {"n": 10})  # gets in first
    client.receive(theirs)
    for mutation in sent:
        assert mutation.seq is not None
        result = server.handle(mutation)
        client.replied(mutation.seq, result)
    assert first.result is not None
    assert first.result.outcome is Outcome.REJECTED
    # Made on top of the refused write: refused with it, never sent.
    assert second.result is not None
    assert second.result.outcome is Outcome.REJECTED
    assert second.seq is None
    assert other.result is not None
    assert other.result.outcome is Outcome.APPLIED
    assert client.view == {"t": {"n": 10}, "u": {"x": 1}}
    assert client.take_outgoing(0.0) == []


def test_chained_writes_rebase_under_lww() -> None:
    server = Server(LastWriterWins())
    client = OptimisticStore("c1", LastWriterWins())
    client.go_online()
    client.mutate("t", Op.SET, {"n": 1}, 1000)
    second, _ = client.mutate("t", Op.PATCH, {"m": 2}, 1000)
    exchange(client, server)  # the first
    assert second.base == client.confirmed["t"].version
    exchange(client, server)  # the second, based on the first's version
    assert second.result is not None
    assert second.result.outcome is Outcome.APPLIED
    assert client.view == {"t": {"n": 1, "m": 2}}
    assert server.store.get("t").value == {"n": 1, "m": 2}


def test_a_remote_update_rebases_pending_writes() -> None:
    server = Server(FieldMerge())
    client = OptimisticStore("c1", FieldMerge())
    client.go_online()
    client.mutate("t", Op.SET, {"title": "a", "done": False}, 1000)
    exchange(client, server)
    client.go_offline()
    client.mutate("t", Op.PATCH, {"done": True}, 1001)
    # Someone else renames it meanwhile: the view shows both (field merge).
    server.wall = 1002
    renamed = server.store.apply(
        Mutation("t", Op.PATCH, {"title": "b"}, hlc=ts(1002, "other")), server.clock.now(1002)
    )
    assert renamed.record is not None
    client.receive(renamed.record)
    assert client.view == {"t": {"title": "b", "done": True}}
    client.go_online()
    exchange(client, server)
    assert (
        client.view
        == {"t": {"title": "b", "done": True}}
        == {k: r.value for k, r in server.store._records.items()}
    )


def test_sent_writes_are_sent_again_with_the_same_key_and_applied_once() -> None:
    server = Server(LastWriterWins())
    client = OptimisticStore("c1", LastWriterWins())
    client.go_online()
    _write, _ = client.mutate("t", Op.SET, {"n": 1}, 1000)
    [first] = client.take_outgoing(0.0)
    result = server.handle(first)  # applied, but the answer is lost with the connection
    assert result.outcome is Outcome.APPLIED
    client.go_offline()
    assert client.take_outgoing(0.0) == []
    client.go_online()
    [again] = client.take_outgoing(1.0)
    assert again == first  # same origin and seq: the server recognises it
    assert (again.origin, again.seq) == ("c1", 1)
    assert client.take_outgoing(1.0) == []  # once per connection


def test_writes_sent_too_long_ago_are_given_up() -> None:
    client = OptimisticStore("c1", LastWriterWins(), resend_window=10.0)
    client.go_online()
    write, _ = client.mutate("t", Op.SET, {"n": 1}, 1000)
    client.take_outgoing(0.0)
    assert client.expire(100.0).resolved == ()  # still on its connection: the answer comes
    client.go_offline()
    assert client.expire(5.0).resolved == ()
    update = client.expire(11.0)
    assert update.resolved == (write,)
    assert write.result is not None
    assert write.result.outcome is Outcome.UNKNOWN
    assert client.view == {}


def test_in_flight_writes_are_bounded() -> None:
    client = OptimisticStore("c1", LastWriterWins(), max_in_flight=2)
    client.go_online()
    for key in "abc":
        client.mutate(key, Op.SET, {}, 1000)
    assert [m.key for m in client.take_outgoing(0.0)] == ["a", "b"]
    with pytest.raises(ValueError, match="max_in_flight"):
        OptimisticStore("c1", max_in_flight=1000)


def test_reset_keeps_pending_writes_on_top_of_the_snapshot() -> None:
    client = OptimisticStore("c1", FieldMerge())
    client.mutate("t", Op.PATCH, {"done": True}, 5000)
    snapshot = [Record("t", {"title": "x"}, ts(10), ts(10), {"title": ts(10)}, ts(10))]
    update = client.reset(snapshot)
    assert update.keys == {"t"}
    assert client.view == {"t": {"title": "x", "done": True}}
    assert client.clock.now(0) > ts(10)  # the client's clock is past what it has seen


# -- records channels in the hub ----------------------------------------------------------------


def make_hub(**config: Any) -> Hub:
    epochs = itertools.count(1)
    config.setdefault("record_policies", {"todo:>": "reject", "doc:>": "merge", "pos:>": "lww"})
    wall = itertools.count(1_700_000_000_000)
    return Hub(
        HubConfig(**config),
        replica="n1",
        new_epoch=lambda: f"e{next(epochs)}",
        wall_clock=lambda: next(wall) / 1000,
    )


def test_join_replies_with_policy_and_snapshot_and_publications_carry_hlc() -> None:
    hub = make_hub()
    a = Peer(hub)
    assert a.request(cmd="join", channel="todo:1")["ok"] == {
        "channel": "todo:1",
        "offset": 0,
        "epoch": "e1",
        "policy": "reject",
        "mutation_ttl": 3600.0,
        "records": [],
    }
    reply = a.request(cmd="mutate", channel="todo:1", key="t1", op="set", value={"x": 1})
    [pub] = a.pending  # the mutator gets its own change too: its view needs it
    record = reply["ok"]["record"]
    assert reply["ok"] == {"applied": True, "record": record, "offset": 1, "epoch": "e1"}
    assert pub["data"] == record
    assert pub["hlc"] == record["version"]
    assert Timestamp.decode(pub["hlc"]).node == "n1"
    # Plain channels' publications are stamped too, and every stamp is later than the last.
    a.request(cmd="join", channel="room")
    hub.publish("room", "hi", 0.0)
    [plain] = a.frames()
    assert Timestamp.decode(plain["hlc"]) > Timestamp.decode(pub["hlc"])
    b = Peer(hub)
    joined = b.request(cmd="join", channel="todo:1")["ok"]
    assert (joined["offset"], joined["records"]) == (1, [record])


def test_resume_replays_record_changes_and_a_miss_gets_a_snapshot() -> None:
    hub = make_hub(history_size=2)
    a = Peer(hub)
    a.request(cmd="join", channel="doc:1")
    hub.apply_record_change("doc:1", "d", {"a": 1}, 0.0)
    a.frames()
    b = Peer(hub)
    b.request(cmd="join", channel="doc:1", since={"offset": 0, "epoch": "e1"})
    assert [f["data"]["value"] for f in b.pending] == [{"a": 1}]  # recovered: replayed
    hub.apply_record_change("doc:1", "d", {"a": 2}, 0.0)
    hub.apply_record_change("doc:1", "d", {"a": 3}, 0.0)
    hub.apply_record_change("doc:1", "e", {"b": 1}, 0.0)
    c = Peer(hub)
    ok = c.request(cmd="join", channel="doc:1", since={"offset": 1, "epoch": "e1"})["ok"]
    assert ok["recovered"] is False  # history holds 2: offsets 3 and 4
    assert [(r["key"], r["value"]) for r in ok["records"]] == [("d", {"a": 3}), ("e", {"b": 1})]
    d = Peer(hub)
    ok = d.request(cmd="join", channel="doc:1", since={"offset": 3, "epoch": "e1"})["ok"]
    assert ok["recovered"] is True
    assert "records" not in ok
    assert [f["data"]["key"] for f in d.pending] == ["e"]


def test_mutate_errors() -> None:
    hub = make_hub()
    a = Peer(hub)
    reply = a.request(cmd="mutate", channel="todo:1", key="k", op="set", value={})
    assert reply["error"]["code"] == ErrorCode.FORBIDDEN
    a.request(cmd="join", channel="room")
    reply = a.request(cmd="mutate", channel="room", key="k", op="set", value={})
    assert reply["error"]["code"] == ErrorCode.NOT_ALLOWED == 405
    a.request(cmd="join", channel="todo:1")
    reply = a.request(cmd="publish", channel="todo:1", data=1)
    assert reply["error"]["code"] == ErrorCode.NOT_ALLOWED
    bad_commands: list[dict[str, Any]] = [
        {"key": "k", "op": "move", "value": {}},
        {"key": "k", "op": "set"},
        {"key": "k", "op": "delete", "value": {}},
        {"key": "", "op": "delete"},
        {"key": "k", "op": "set", "value": []},
        {"key": "k", "op": "delete", "base": "yesterday"},
        {"key": "k", "op": "delete", "origin": "o"},
        {"key": "k", "op": "delete", "origin": "o", "seq": 0},
    ]
    for bad in bad_commands:
        reply = a.request(cmd="mutate", channel="todo:1", **bad)
        assert reply["error"]["code"] == ErrorCode.BAD_REQUEST, bad
    reply = a.request(cmd="mutate", channel="todo:*", key="k", op="delete")
    assert reply["error"]["code"] == ErrorCode.INVALID_CHANNEL
    small = make_hub(max_payload_bytes=10)
    b = Peer(small)
    b.request(cmd="join", channel="todo:1")
    reply = b.request(cmd="mutate", channel="todo:1", key="k", op="set", value={"x": "y" * 20})
    assert reply["error"]["code"] == ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(ValueError, match="not a records channel"):
        hub.apply_record_change("room", "k", {}, 0.0)
    with pytest.raises(ValueError, match="not a records channel"):
        hub.records("room")


def test_conflict_reply_carries_the_current_record() -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    for peer in (a, b):
        peer.request(cmd="join", channel="todo:1")
    created = a.request(cmd="mutate", channel="todo:1", key="t", op="set", value={"n": 0})
    base = created["ok"]["record"]["version"]
    b.frames()
    won = b.request(cmd="mutate", channel="todo:1", key="t", op="patch", value={"n": 1}, base=base)
    assert won["ok"]["applied"] is True
    lost = a.request(cmd="mutate", channel="todo:1", key="t", op="patch", value={"n": 2}, base=base)
    assert lost["error"]["code"] == ErrorCode.CONFLICT == 412
    assert lost["error"]["record"] == won["ok"]["record"]
    assert [f["data"]["value"] for f in a.pending] == [{"n": 1}]  # b's change; nothing of ours
    assert hub.stats.conflicts == 1


def test_resent_mutations_are_answered_as_before_and_applied_once() -> None:
    hub = make_hub()
    a = Peer(hub)
    a.request(cmd="join", channel="pos:1")
    command = {"cmd": "mutate", "channel": "pos:1", "key": "p", "op": "patch"}
    first = a.request(**command, value={"x": 1}, origin="o1", seq=1)
    assert first["ok"]["applied"] is True
    a.request(**command, value={"x": 2}, origin="o1", seq=2)
    [pub] = a.pending
    # Publications name the writer by a tag: the origin stays between the client and the hub.
    assert (pub["data"]["writer"], pub["data"]["seq"]) == (origin_tag("o1"), 2)
    assert "o1" not in orjson.dumps(pub).decode()
    again = a.request(**command, value={"x": 1}, origin="o1", seq=1)
    assert again["ok"] == first["ok"]  # the first answer, record and offset included
    assert a.pending == []  # no new publication
    assert hub.record("pos:1", "p").value == {"x": 2}
    # From another connection (after a reconnect) too.
    b = Peer(hub)
    b.request(cmd="join", channel="pos:1")
    assert b.request(**command, value={"x": 1}, origin="o1", seq=1)["ok"] == first["ok"]
    assert hub.stats.duplicate_mutations == 2
    assert hub.history_position("pos:1", 0.0).offset == 2


def test_client_timestamps_decide_lww_unless_too_far_ahead() -> None:
    hub = make_hub(max_clock_drift=1.0)
    a = Peer(hub)
    a.request(cmd="join", channel="pos:1")
    now = hub.clock.now(1_700_000_000_000)
    late = Timestamp(now.wall + 500, 0, "client")
    early = Timestamp(now.wall - 10_000, 0, "slow")
    command = {"cmd": "mutate", "channel": "pos:1", "key": "p", "op": "set"}
    won = a.request(**command, value={"x": 1}, hlc=late.encode())["ok"]
    assert won["record"]["written"] == late.encode()
    assert Timestamp.decode(won["record"]["version"]) > late  # the hub's clock moved past it
    lost = a.request(**command, value={"x": 2}, hlc=early.encode())["ok"]
    assert lost == {"applied": False, "record": won["record"]}
    future = Timestamp(now.wall + 3_600_000, 0, "fast")
    stamped = a.request(**command, value={"x": 3}, hlc=future.encode())["ok"]["record"]
    assert stamped["written"] == stamped["version"]  # the hub's own stamp instead
    assert Timestamp.decode(stamped["written"]).wall < future.wall


def test_apply_record_change_skips_replays_and_unchanged_values() -> None:
    hub = make_hub()
    a = Peer(hub)
    a.request(cmd="join", channel="todo:1")
    publication = hub.apply_record_change("todo:1", "t", {"n": 1}, 0.0, source_version=7)
    assert publication is not None
    assert hub.apply_record_change("todo:1", "t", {"n": 0}, 0.0, source_version=6) is None
    assert hub.apply_record_change("todo:1", "t", {"n": 1}, 0.0) is None
    assert hub.apply_record_change("todo:1", "t", None, 0.0, source_version=8) is not None
    assert [f["data"]["value"] for f in a.frames()] == [{"n": 1}, None]
    assert hub.records("todo:1")[0].value is None  # a tombstone
    with pytest.raises(TypeError):
        hub.apply_record_change("todo:1", "t", [1], 0.0)  # type: ignore[arg-type]


def test_database_changes_beat_client_writes_under_every_policy() -> None:
    for channel in ("todo:1", "doc:1", "pos:1"):
        hub = make_hub()
        a = Peer(hub)
        a.request(cmd="join", channel=channel)
        far = Timestamp(1_700_000_000_500, 0, "c")  # ahead, within the drift allowed
        a.request(
            cmd="mutate", channel=channel, key="k", op="set", value={"a": 1}, hlc=far.encode()
        )
        hub.apply_record_change(channel, "k", {"b": 2}, 0.0)
        assert hub.record(channel, "k").value == {"b": 2}, channel


def test_resolvers_from_python_and_unknown_names() -> None:
    def add(current: Record, mutation: Mutation) -> dict[str, Any]:
        assert mutation.value is not None
        return {"n": (current.value or {}).get("n", 0) + mutation.value["add"]}

    hub = Hub(HubConfig(record_policies={"count:>": "adder"}), resolvers={"adder": add})
    a = Peer(hub)
    assert a.request(cmd="join", channel="count:1")["ok"]["policy"] == "adder"
    for _ in range(3):
        a.request(cmd="mutate", channel="count:1", key="c", op="patch", value={"add": 2})
    assert hub.record("count:1", "c").value == {"n": 6}
    with pytest.raises(ValueError, match="no conflict policy or resolver named 'adder'"):
        Hub(HubConfig(record_policies={"count:>": "adder"}))


def test_record_channels_are_never_dropped_from_an_outbox() -> None:
    from pyrt.hub.outbox import SlowConsumerPolicy

    hub = make_hub(
        outbox_messages=2,
        channel_policies={"doc:>": SlowConsumerPolicy.DROP_OLDEST},
    )
    a = Peer(hub)
    a.request(cmd="join", channel="doc:1")
    for n in range(3):
        hub.apply_record_change("doc:1", "d", {"n": n}, 0.0)
    # Not dropped (that would leave the client's copy stale): the client is cut as slow and
    # resumes from its offset.
    assert [code for _, code, _ in hub.take_closing()] == [4008]


def test_config_record_policies() -> None:
    config = hub_config({"record_policies": {"todo:>": "reject"}, "max_clock_drift": 2})
    assert config.record_policies == {"todo:>": "reject"}
    assert config.max_clock_drift == 2
    with pytest.raises(ConfigError, match="record_policies"):
        hub_config({"record_policies": {"todo:>": 1}})
    with pytest.raises(ConfigError, match="hub:"):
        hub_config({"record_policies": {"todo:*x": "reject"}})
    with pytest.raises(ValueError, match="mutation_ttl"):
        HubConfig(mutation_ttl=0)


def test_every_error_code_is_in_the_protocol_docs() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text(
        encoding="utf-8"
    )
    table = dict(re.findall(r"^\| (\d{3}) \| (\w+) \|", docs, re.MULTILINE))
    for code in ErrorCode:
        assert table.get(str(code.value)) == code.name.lower(), code
