"""Memory budgets: outboxes sharing a budget for the bytes queued for clients (`OutboxBudget`),
and the Rust fan-out's backlog counted against it (socket pairs)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fanout import pair

from pyrt._core import FanOut, OutboxBudget
from pyrt._outbox import Outbox, PushResult, SlowConsumerPolicy

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
