"""The storage engine conformance suite: `check_broker` (see `pyrt.testing`)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from ..conflict import LastWriterWins, Mutation, Op, Outcome, Timestamp
from ..hub.broker import (
    StorageEngine,
)
from ..hub.history import Publication, StreamPosition
from ..hub.hub import HubConfig
from ._checks import _check

# -- storage engines -------------------------------------------------------------------------

BrokerFactory = Callable[[HubConfig], StorageEngine]
"""Makes a fresh, empty storage engine with the history limits of the config it is given."""


def check_broker(factory: BrokerFactory) -> None:
    """The conformance suite of a storage engine (`pyrt.hub.broker.StorageEngine`): what the
    hub relies on of its `Broker`, `PresenceManager` and `RecordStorage` parts. Raises
    AssertionError at the first thing the engine does wrong. `MemoryBroker` passes it
    (`check_broker(MemoryBroker)`); so must every engine.

    The checks: offsets go up by one per channel from 1 in one epoch; history keeps order and
    its bounds (`history_size`, `history_age`, `history_max_bytes`, forgetting the oldest of
    any channel first, `charge` counting late); recovery from a position is all or nothing,
    and says recovered=False for another epoch, a forgotten publication, a reset, a dropped
    idle stream or a gap in publications taken from elsewhere (`accept`), never a silent
    gap; presence joins, updates and leaves, several metas per key, a gone connection's
    entries expiring; record tables applying mutations, keeping and compacting tombstones
    and skipping replayed source versions.
    """
    for check in (
        _offsets_and_epochs,
        _history_order_and_size,
        _history_age,
        _history_bytes,
        _reset,
        _idle_streams,
        _accepted_publications,
        _presence_of_engine,
        _records_of_engine,
    ):
        check(factory)


def _offsets(publications: Sequence[Publication]) -> list[int]:
    return [p.offset for p in publications]


def _offsets_and_epochs(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    start = broker.position("a", 0.0)
    _check(start.offset == 0 and bool(start.epoch), f"a new stream starts at offset 0: {start}")
    stamp = Timestamp(1_700_000_000_000, 0, "n1")
    first = broker.publish("a", {"n": 1}, 0.0, publisher="c1", key="k", hlc=stamp)
    _check(
        (first.channel, first.offset, first.epoch, first.data) == ("a", 1, start.epoch, {"n": 1}),
        f"the first publication is offset 1 of the stream's epoch: {first}",
    )
    _check(
        (first.publisher, first.key, first.hlc) == ("c1", "k", stamp),
        f"a publication keeps its publisher, key and clock reading: {first}",
    )
    more = [broker.publish("a", n, 1.0) for n in range(2, 6)]
    _check(_offsets(more) == [2, 3, 4, 5], f"offsets go up by one: {_offsets(more)}")
    _check({p.epoch for p in more} == {start.epoch}, "one epoch while nothing is lost")
    other = broker.publish("b", "x", 1.0)
    _check(other.offset == 1, f"each channel has its own offsets: {other}")
    _check(other.epoch != start.epoch, "each stream has its own epoch")
    _check(broker.position("a", 1.0) == more[-1].position, "the position is the latest one")
    _check(set(broker.channels()) >= {"a", "b"}, f"channels: {broker.channels()}")


def _history_order_and_size(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_size=3))
    whole = broker.history("a", 0.0)
    _check(whole.recovered and not whole.publications, "an empty stream's history is complete")
    published = [broker.publish("a", n, 0.0) for n in range(1, 6)]
    epoch = published[0].epoch
    retained = broker.history("a", 0.0)
    _check(_offsets(retained.publications) == [3, 4, 5], "history_size keeps the newest")
    _check(not retained.recovered, "a history that lost its start says so")
    _check(retained.position == StreamPosition(5, epoch), "history gives the position")
    _check([p.data for p in retained.publications] == [3, 4, 5], "history keeps the data, in order")
    cases = [
        (StreamPosition(2, epoch), True, [3, 4, 5]),
        (StreamPosition(4, epoch), True, [5]),
        (StreamPosition(5, epoch), True, []),
        (StreamPosition(1, epoch), False, []),
        (StreamPosition(0, epoch), False, []),
        (StreamPosition(6, epoch), False, []),
        (StreamPosition(3, "another epoch"), False, []),
    ]
    for since, recovered, offsets in cases:
        recovery = broker.history("a", 0.0, since)
        _check(
            (recovery.recovered, _offsets(recovery.publications)) == (recovered, offsets),
            f"recovery from {since}: {recovery.recovered} {_offsets(recovery.publications)}",
        )
        _check(recovery.position == StreamPosition(5, epoch), "recovery gives the position")
    nothing = factory(HubConfig(history_size=0))
    nothing.publish("a", 1, 0.0)
    top = nothing.position("a", 0.0)
    _check(not nothing.history("a", 0.0).publications, "history_size 0 keeps nothing")
    _check(nothing.history("a", 0.0, top).recovered, "but a client at the top misses nothing")


def _history_age(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_age=10.0))
    first = broker.publish("a", 1, 0.0)
    broker.publish("a", 2, 6.0)
    since = StreamPosition(0, first.epoch)
    _check(broker.history("a", 9.0, since).recovered, "within history_age, all is there")
    later = broker.history("a", 12.0)
    _check(_offsets(later.publications) == [2], "history_age forgets the older ones")
    _check(not broker.history("a", 12.0, since).recovered, "a forgotten one is not recovered")
    _check(broker.history("a", 12.0, first.position).recovered, "after it, all is there")


def _history_bytes(factory: BrokerFactory) -> None:
    limit = 6_000
    broker = factory(HubConfig(history_max_bytes=limit))
    published = []
    for n in range(40):
        channel = "ab"[n % 2] if n % 5 else "c"
        published.append(broker.publish(channel, "x" * 200, 0.0, size=300))
    budget = broker.budget
    _check(0 < budget.bytes <= limit, f"history holds at most history_max_bytes: {budget.bytes}")
    _check(budget.evicted > 0, "the budget forgot publications to stay within it")
    kept = {(p.channel, p.offset) for c in "abc" for p in broker.history(c, 0.0).publications}
    _check(budget.retained == len(kept), f"budget.retained counts them: {budget.retained}")
    order = [(p.channel, p.offset) in kept for p in published]
    _check(
        order == sorted(order) and any(order) and not all(order),
        "the oldest publications of any channel are forgotten first",
    )
    for channel in "abc":
        stream = [p for p in published if p.channel == channel]
        gone = [p for p in stream if (channel, p.offset) not in kept]
        if gone:
            recovery = broker.history(channel, 0.0, StreamPosition(0, stream[0].epoch))
            _check(not recovery.recovered, f"{channel}: forgotten publications are not recovered")
            recovery = broker.history(channel, 0.0, gone[-1].position)
            _check(recovery.recovered, f"{channel}: after the forgotten ones, all is there")
    late = factory(HubConfig())
    before = late.budget.bytes
    publication = late.publish("a", 1, 0.0, size=0)
    counted = late.budget.bytes - before
    late.charge(publication, 1_000)
    _check(
        late.budget.bytes - before == counted + 1_000,
        "charge counts a publication's size after it was published",
    )


def _reset(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    last = [broker.publish("a", n, 0.0) for n in range(3)][-1]
    position = broker.reset("a", 1.0)
    _check(position.epoch != last.epoch, f"a reset makes a new epoch: {position}")
    _check(broker.position("a", 1.0) == position, "the position after a reset is the new one")
    recovery = broker.history("a", 1.0, last.position)
    _check(not recovery.recovered, "a position from before a reset is not recovered")
    _check(recovery.position == position, "recovery after a reset gives the new position")
    after = broker.publish("a", "next", 1.0)
    _check(
        after.position == StreamPosition(position.offset + 1, position.epoch),
        f"publications go on in the new epoch: {after}",
    )
    _check(broker.history("a", 1.0, position).recovered, "from the new position, all is there")


def _idle_streams(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_idle_ttl=10.0))
    a = broker.publish("a", 1, 0.0)
    b = broker.publish("b", 1, 0.0)
    dropped = broker.expire(20.0, lambda channel: channel == "b")
    _check(dropped == ["a"], f"an idle stream nobody uses is dropped: {dropped}")
    _check(broker.position("b", 20.0) == b.position, "a stream in use is kept")
    _check(
        not broker.history("a", 20.0, a.position).recovered,
        "a dropped stream's positions are not recovered (its epoch is gone)",
    )


def _accepted_publications(factory: BrokerFactory) -> None:
    origin, replica = factory(HubConfig()), factory(HubConfig())
    published = [origin.publish("a", n, 0.0, key="k") for n in range(1, 6)]
    epoch = published[0].epoch
    taken = replica.accept(published[0], 100.0)
    _check(taken is not None and taken.position == published[0].position, "accept keeps offsets")
    _check(taken is not None and taken.time == 100.0, "an accepted publication is stamped now")
    _check(replica.accept(published[0], 100.0) is None, "a publication taken twice is a duplicate")
    replica.accept(published[1], 100.0)
    _check(replica.position("a", 100.0) == published[1].position, "the replica follows the stream")
    _check(
        _offsets(replica.history("a", 100.0, published[0].position).publications) == [2],
        "a replica recovers what it took",
    )
    replica.accept(published[3], 100.0)  # offset 3 never arrived
    _check(
        not replica.history("a", 100.0, published[0].position).recovered,
        "a gap in what was taken is never handed out as recovered",
    )
    recovery = replica.history("a", 100.0, published[2].position)
    _check(
        recovery.recovered and _offsets(recovery.publications) == [4],
        "after the gap, all is there",
    )
    elsewhere = factory(HubConfig())
    other = elsewhere.publish("a", "new", 0.0)
    _check(other.epoch != epoch, "two engines make different epochs")
    replica.accept(other, 100.0)
    _check(replica.position("a", 100.0) == other.position, "another epoch starts afresh")
    _check(
        not replica.history("a", 100.0, published[3].position).recovered,
        "positions of the old epoch are not recovered",
    )


def _presence_of_engine(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    _check(broker.presence("room") == {}, "nobody is present in a new channel")
    ref1, diff = broker.track("room", "c1", "ann", {"device": "phone"})
    _check(
        [m.meta for m in diff.joins.get("ann", ())] == [{"device": "phone"}] and not diff.leaves,
        f"a track is a join: {diff}",
    )
    ref2, _ = broker.track("room", "c2", "ann", {"device": "laptop"})
    broker.track("room", "c2", "bob", {})
    state = broker.presence("room")
    _check(
        [(m.ref, m.conn) for m in state["ann"]] == [(ref1, "c1"), (ref2, "c2")],
        f"several metas under one key, oldest first: {state}",
    )
    ref3, diff = broker.track("room", "c1", "ann", {"device": "tablet"}, ref1)
    _check(
        [m.ref for m in diff.leaves.get("ann", ())] == [ref1]
        and [m.prev_ref for m in diff.joins.get("ann", ())] == [ref1],
        f"an update with a ref replaces that entry: {diff}",
    )
    try:
        broker.track("room", "c1", "ann", {}, "no such ref")
    except KeyError:
        pass
    else:
        raise AssertionError("an update of an unknown ref raises KeyError")
    diff = broker.untrack("room", "c1", "ann")
    _check([m.ref for m in diff.leaves.get("ann", ())] == [ref3], f"untrack leaves: {diff}")
    broker.track("lobby", "c2", "bob", {})
    gone = broker.untrack_conn("c2")
    _check(set(gone) == {"room", "lobby"}, f"a gone connection leaves everywhere: {gone}")
    _check(
        {k: len(v) for k, v in gone["room"].leaves.items()} == {"ann": 1, "bob": 1},
        f"with every entry it had: {gone['room']}",
    )
    _check(broker.presence("room") == {} and broker.presence("lobby") == {}, "nobody is left")


def _records_of_engine(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    _check(broker.record_table("todos") is None, "no table before one is made")
    table = broker.new_record_table("todos", LastWriterWins())
    _check(broker.record_table("todos") is table, "the table made is the channel's")
    _check(dict(broker.record_tables()) == {"todos": table}, "record_tables lists it")
    version = itertools.count(1)

    def stamp() -> Timestamp:
        return Timestamp(1_000 * next(version), 0, "n1")

    result = table.apply(Mutation("t1", Op.SET, {"title": "milk"}), stamp())
    _check(result.outcome is Outcome.APPLIED, f"a first write applies: {result}")
    record = table.get("t1")
    _check(record.value == {"title": "milk"} and record.version is not None, f"get: {record}")
    _check(table.get("t2").value is None, "a record never written does not exist")
    table.apply(Mutation("t2", Op.SET, {"title": "eggs"}), stamp())
    deleted = table.apply(Mutation("t1", Op.DELETE), stamp())
    _check(deleted.outcome is Outcome.APPLIED, f"a delete applies: {deleted}")
    _check(table.get("t1").value is None and table.tombstones == 1, "a delete leaves a tombstone")
    _check([r.key for r in table.records()] == ["t1", "t2"], "records lists tombstones too")
    forgotten = table.compact(before=1e15)
    _check(forgotten == 1 and table.tombstones == 0, f"compact forgets tombstones: {forgotten}")
    _check(table.forgotten is not None, "and remembers the newest version it forgot")
    written = table.write("t3", {"title": "bread"}, stamp(), source_version=7)
    _check(written is not None and table.get("t3").value == {"title": "bread"}, "write sets")
    replay = table.write("t3", {"title": "old"}, stamp(), source_version=7)
    _check(replay is None, "a source version already written is a replay: skipped")
    table.remember("origin", 1, "reply", 0.0)
    _check(table.recall("origin", 1, 0.0) == (True, "reply"), "idempotency keys are kept")
    table.expire(100.0, ttl=10.0)
    _check(table.recall("origin", 1, 100.0) == (False, None), "and expire")
