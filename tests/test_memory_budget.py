"""Memory budgets: the Rust fan-out's backlog counted against the budget for the bytes queued
for clients (`OutboxBudget`), over socket pairs."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from test_fanout import pair

from pyrt._core import FanOut, OutboxBudget

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
