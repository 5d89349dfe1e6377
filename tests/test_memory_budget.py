"""Memory budgets: history across every channel (`History(max_bytes=...)`), against a model;
outboxes sharing a budget for the bytes queued for clients, and the Rust fan-out's backlog
counted against it (socket pairs)."""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fanout import pair

from pyrt._core import FanOut, OutboxBudget
from pyrt._history import ENTRY_BYTES, History, Publication, StreamPosition
from pyrt._outbox import Outbox, PushResult, SlowConsumerPolicy

WALL = 1_700_000_000.0
COST = 1000
"""What one publication counts against the budget in the History tests."""


def history(
    max_bytes: int | None,
    *,
    max_size: int = 100,
    max_age: float = 1000.0,
    idle_ttl: float = 1000.0,
) -> History:
    counter = itertools.count(1)
    return History(
        max_size,
        max_age,
        lambda: f"e{next(counter)}",
        idle_ttl,
        max_bytes=max_bytes,
        measure=lambda publication: COST - ENTRY_BYTES,
    )


def offsets(h: History, channel: str) -> list[int]:
    return [p.offset for p in h.stream(channel, 0.0)]


# -- history: eviction order, the budget, recovery ---------------------------------------------


def test_eviction_is_oldest_first_across_channels() -> None:
    h = history(5 * COST)
    for channel in "abacb":
        h.append(channel, None, 0.0)
    assert h.budget.bytes == 5 * COST
    assert h.budget.evicted == 0
    h.append("a", None, 0.0)  # a:1 was the first of all
    assert (offsets(h, "a"), offsets(h, "b"), offsets(h, "c")) == ([2, 3], [1, 2], [1])
    h.append("c", None, 0.0)  # then b:1
    assert (offsets(h, "a"), offsets(h, "b"), offsets(h, "c")) == ([2, 3], [2], [1, 2])
    assert h.budget.evicted == 2
    assert (h.budget.bytes, h.budget.retained) == (5 * COST, 5)


def test_what_a_stream_forgot_by_its_own_bounds_is_skipped_by_the_budget() -> None:
    """A stream's oldest publication can go before the budget gets to it (history_size,
    history_age): the budget then evicts the oldest that is still retained."""
    h = history(4 * COST, max_size=2)
    for _ in range(5):
        h.append("a", None, 0.0)  # keeps a:4 and a:5
    h.append("b", None, 0.0)
    h.append("c", None, 0.0)
    assert h.budget.evicted == 0
    h.append("d", None, 0.0)
    assert offsets(h, "a") == [5]
    h.append("d", None, 0.0)  # a:5 was appended before b:1
    assert (offsets(h, "a"), offsets(h, "b"), offsets(h, "c"), offsets(h, "d")) == (
        [],
        [1],
        [1],
        [1, 2],
    )


def test_a_publication_larger_than_the_budget_is_not_kept() -> None:
    h = history(COST - 1)
    publication = h.append("a", "x", 0.0)
    assert publication.offset == 1
    assert (h.budget.bytes, len(h.stream("a", 0.0)), h.budget.evicted) == (0, 0, 1)
    recovery = h.recover("a", StreamPosition(0, publication.epoch), 0.0)
    assert not recovery.recovered  # offset 1 is gone: no silent gap
    assert h.recover("a", StreamPosition(1, publication.epoch), 0.0).recovered


def test_resuming_from_an_evicted_offset_is_refused_and_the_epoch_stays() -> None:
    h = history(3 * COST)
    for _ in range(3):
        h.append("room", None, 0.0)
    h.append("other", None, 0.0)
    h.append("other", None, 0.0)  # room:1 and room:2 are evicted
    assert offsets(h, "room") == [3]
    epoch = h.stream("room", 0.0).epoch
    assert epoch == "e1"  # eviction forgets from the old end: offsets are still one run
    for since in (0, 1):
        refused = h.recover("room", StreamPosition(since, epoch), 0.0)
        assert (refused.recovered, refused.publications) == (False, ())
        assert refused.position == StreamPosition(3, epoch)
    resumed = h.recover("room", StreamPosition(2, epoch), 0.0)
    assert resumed.recovered
    assert [p.offset for p in resumed.publications] == [3]
    assert h.recover("room", StreamPosition(3, epoch), 0.0).recovered


@attrs.define
class Model:
    """History as a list of every retained publication, evicting by a scan."""

    max_bytes: int
    max_size: int
    max_age: float
    idle_ttl: float
    entries: list[tuple[int, str, int, int, float]] = attrs.Factory(list)
    """(seq, channel, offset, size, time), in append order."""
    tops: dict[str, int] = attrs.Factory(dict)
    last_used: dict[str, float] = attrs.Factory(dict)
    seq: int = 0

    def append(self, channel: str, size: int, now: float) -> None:
        self.seq += 1
        top = self.tops[channel] = self.tops.get(channel, 0) + 1
        self.last_used[channel] = now
        self.entries.append((self.seq, channel, top, size, now))
        mine = [e for e in self.entries if e[1] == channel]
        drop = set(mine[: max(0, len(mine) - self.max_size)])
        drop |= {e for e in mine if e[4] < now - self.max_age}
        self.entries = [e for e in self.entries if e not in drop]
        while sum(e[3] for e in self.entries) > self.max_bytes:
            self.entries.remove(min(self.entries))

    def expire(self, now: float) -> None:
        for channel in list(self.tops):
            mine = {e for e in self.entries if e[1] == channel and e[4] < now - self.max_age}
            self.entries = [e for e in self.entries if e not in mine]
            if now - self.last_used[channel] >= self.idle_ttl:
                self.entries = [e for e in self.entries if e[1] != channel]
                del self.tops[channel], self.last_used[channel]

    def reset(self, channel: str, now: float) -> None:
        self.tops.setdefault(channel, 0)
        self.last_used[channel] = now
        self.entries = [e for e in self.entries if e[1] != channel]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.sampled_from("abcd"), st.integers(0, 3000)),
        st.tuples(st.just("expire"), st.none(), st.none()),
        st.tuples(st.just("reset"), st.sampled_from("abcd"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300)
@given(
    plan=ops,
    dts=st.lists(st.floats(0, 3), min_size=60, max_size=60),
    max_bytes=st.integers(1, 12_000),
    max_size=st.integers(1, 5),
)
def test_history_matches_a_model_and_never_exceeds_its_budget(
    plan: list[tuple[str, Any, Any]], dts: list[float], max_bytes: int, max_size: int
) -> None:
    """Appends (of random sizes), expiry and resets on a few channels, each compared with
    a model that evicts by scanning for the oldest publication."""
    sizes: dict[tuple[str, int], int] = {}

    def measure(publication: Publication) -> int:
        return sizes[(publication.channel, publication.offset)]

    h = History(max_size, 20.0, lambda: "e", 10.0, max_bytes=max_bytes, measure=measure)
    model = Model(max_bytes, max_size, 20.0, 10.0)
    now = 0.0
    for (op, channel, size), dt in zip(plan, dts, strict=False):
        now += dt
        if op == "append":
            offset = model.tops.get(channel, 0) + 1
            sizes[(channel, offset)] = size
            model.append(channel, size + ENTRY_BYTES, now)
            assert h.append(channel, None, now).offset == offset
        elif op == "expire":
            model.expire(now)
            h.expire(now, lambda channel: False)
        else:
            model.reset(channel, now)
            h.reset(channel, now)
        held = {c: [p.offset for p in h._streams[c]] for c in h.channels()}
        expected = {c: [e[2] for e in model.entries if e[1] == c] for c in model.tops}
        assert held == expected
        assert h.budget.bytes == sum(e[3] for e in model.entries) <= max_bytes
        assert h.budget.retained == len(model.entries)


# -- outboxes sharing a budget ------------------------------------------------------------------

DISCONNECT = SlowConsumerPolicy.DISCONNECT
DROP_OLDEST = SlowConsumerPolicy.DROP_OLDEST
CONFLATE = SlowConsumerPolicy.CONFLATE
OVER_BUDGET = PushResult(accepted=False, evicted=0, overflow=True, over_budget=True)


def test_outboxes_sharing_a_budget_hold_no_more_than_it_together() -> None:
    budget = OutboxBudget(1000)
    a, b = Outbox(100, 800, budget), Outbox(100, 800, budget)
    assert a.push(b"x" * 600).accepted
    assert b.push(b"y" * 300).accepted
    assert budget.held == 900
    assert b.push(b"z" * 200) == OVER_BUDGET  # b alone has room: the budget has not
    assert b.overflowed
    assert a.push(b"c" * 200, droppable=False) == OVER_BUDGET  # a control frame too
    a.clear()
    b.clear()
    assert budget.held == 0
    assert Outbox(10, 5000, budget).push(b"w" * 1001) == OVER_BUDGET  # never fits


def test_a_droppable_frame_evicts_only_its_own_outbox_frames_for_the_budget() -> None:
    budget = OutboxBudget(1000)
    mine, other = Outbox(100, 1000, budget), Outbox(100, 1000, budget)
    assert other.push(b"o" * 500).accepted  # under disconnect: never evicted
    for _ in range(3):
        assert mine.push(b"m" * 100, policy=DROP_OLDEST).accepted
    assert mine.push(b"n" * 250, policy=DROP_OLDEST) == PushResult(True, 1, False)
    assert budget.held == 950
    assert mine.push(b"p" * 400, policy=DROP_OLDEST) == PushResult(True, 3, False)
    assert (mine.queued_bytes, other.queued_bytes, budget.held) == (400, 500, 900)
    refused = mine.push(b"q" * 600, policy=CONFLATE, key="k")  # more than mine can free
    assert refused == PushResult(accepted=False, evicted=0, overflow=False)
    assert (mine.queued_bytes, other.queued_bytes, len(other)) == (400, 500, 1)


def test_popped_frames_count_until_the_next_pop_and_clear_frees_everything() -> None:
    budget = OutboxBudget(10_000)
    outbox = Outbox(100, 10_000, budget)
    outbox.push(b"a" * 300)
    outbox.push(b"b" * 200)
    assert outbox.pop(max_frames=1) == [b"a" * 300]
    assert (outbox.taken_bytes, budget.held) == (300, 500)  # being written
    assert outbox.pop() == [b"b" * 200]
    assert budget.held == 200
    assert outbox.pop() == []
    assert budget.held == 0
    outbox.push(b"c" * 100)
    outbox.pop()
    outbox.push(b"d" * 50)
    outbox.clear()
    assert (outbox.taken_bytes, budget.held) == (0, 0)


frames = st.tuples(
    st.integers(0, 3),  # which outbox
    st.integers(0, 700),  # size
    st.booleans(),  # droppable
    st.sampled_from(list(SlowConsumerPolicy)),
    st.sampled_from([None, "k1", "k2"]),
)
outbox_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), frames),
        st.tuples(st.just("pop"), st.tuples(st.integers(0, 3), st.integers(1, 3))),
        st.tuples(st.just("clear"), st.tuples(st.integers(0, 3))),
    ),
    max_size=80,
)


@settings(max_examples=500)
@given(plan=outbox_ops, limit=st.integers(1, 3000))
def test_a_shared_budget_is_the_sum_of_its_outboxes_and_never_exceeded(
    plan: list[tuple[str, Any]], limit: int
) -> None:
    budget = OutboxBudget(limit)
    outboxes = [Outbox(6, 1500, budget) for _ in range(4)]
    for op, args in plan:
        outbox = outboxes[args[0]]
        others = [(o.queued_bytes, len(o)) for o in outboxes if o is not outbox]
        if op == "push":
            _, size, droppable, policy, key = args
            result = outbox.push(b"f" * size, droppable=droppable, policy=policy, key=key)
            if result.over_budget:
                assert budget.held + size > limit
            # Making room for it never takes from another connection's outbox.
            assert [(o.queued_bytes, len(o)) for o in outboxes if o is not outbox] == others
        elif op == "pop":
            outbox.pop(max_frames=args[1])
        else:
            outbox.clear()
        assert budget.held == sum(o.queued_bytes + o.taken_bytes for o in outboxes)
        assert budget.held <= limit


# -- the fan-out's backlog against the budget (socket pairs) ------------------------------------


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def busy_handle(
    fanout: FanOut, pairs: list[tuple[socket.socket, socket.socket]], payload: bytes
) -> int:
    """A handle whose socket stopped taking frames: its writer is woken, it is busy."""
    ours, _ = pair(pairs)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handle = fanout.open()
    fanout.attach(handle, ours.fileno(), 1 << 30)  # its own limit plays no part here
    assert fanout.release(handle)
    for _ in range(1000):
        if fanout.send([handle], payload)[1]:
            assert fanout.busy(handle)
            return handle
    raise AssertionError("the socket buffer never filled")


def test_the_backlog_counts_against_the_budget_until_the_writer_has_written_it(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    budget = OutboxBudget(40_000)
    fanout = FanOut(budget)
    payload = b"p" * 3000
    handle = busy_handle(fanout, pairs, payload)
    other = busy_handle(fanout, pairs, payload)
    while True:  # appended to the backlog until the budget (not its own limit) is full
        slow, _, written = fanout.send([handle], payload)
        if slow:
            break
        assert written == 1
    assert slow == [handle]
    assert fanout.held(handle)  # handed to the outbox, whose policy decides
    stats = fanout.stats()
    assert (stats["overflows"], stats["budget_overflows"]) == (1, 1)
    assert budget.held == fanout.backlog_bytes == stats["backlog_bytes"]
    assert budget.held == fanout.pending_bytes(handle) + fanout.pending_bytes(other)
    assert 40_000 - 3004 < budget.held <= 40_000
    # The other busy connection is out of budget as well: its next frame is handed back.
    assert fanout.send([other], payload)[0] == [other]
    held = budget.held
    taken = fanout.take_pending(handle)
    assert budget.held == held  # the writer holds it until it has written it
    assert fanout.take_pending(handle) == b""  # ...and comes back: written
    assert budget.held == held - len(taken)
    assert fanout.release(handle)
    fanout.close(other)
    assert budget.held == fanout.backlog_bytes == 0


def test_discarding_a_backlog_keeps_only_what_may_be_written_in_part(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    budget = OutboxBudget(1 << 30)
    fanout = FanOut(budget)
    handle = busy_handle(fanout, pairs, b"p" * 3000)
    first = fanout.pending_bytes(handle)  # a frame's rest, or a whole frame refused
    for _ in range(5):
        fanout.send([handle], b"q" * 1000)
    assert fanout.discard_pending(handle) == 5 * 1004  # 4-byte headers
    assert fanout.pending_bytes(handle) == first == budget.held
    fanout.detach(handle)
    assert budget.held == 0
