"""Delivery: what carries the hub's publications to its connections.

The hub decides who gets a publication (its matcher holds the subscriptions) and encodes the
frame once; a *deliverer* takes the frame to the subscribers. It knows each connection by a
*handle* and each subscription by the matcher's id, and answers every publication with the
handles it could not serve itself: for those ("slow") the hub queues the frame in the
connection's outbox, which its transport's writer empties. Two deliverers:

- `fan_out`: the Rust fan-out (`pyrt._core.FanOut`), a `SocketDeliverer`. A transport may
  lend it a connection's socket (`Hub.attach_socket`); it then writes publications to that
  socket straight from Rust while nothing is queued for it, without a Python step per
  recipient. What it cannot write now it keeps as pending bytes for the connection's writer.
  A connection without a socket attached is always handed back.
- `MemoryDeliverer`: pure Python, no sockets: every recipient is handed back, so every frame
  goes through an outbox. It is what the Rust fan-out does when no socket is attached
  (tests/hub/test_delivery.py checks it against the Rust one), in code the state machines can
  read, and it is the test double of the sans-IO hub (tests/hub/test_hub.py).

A `Hub` is made with a factory (`Hub(config, deliverer=...)`), because the deliverer shares
the hub's `OutboxBudget` with the outboxes. `Hub()` gets the Rust fan-out
(docs/architecture.md says why).

The descriptor rule: a `SocketDeliverer` borrows a socket's descriptor; `close` (the hub's
`disconnect`) lets go of it, and must come before the socket is closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from .._core import FanOut, Matcher, OutboxBudget
from .config import HubConfig

__all__ = [
    "Delivered",
    "Deliverer",
    "DelivererFactory",
    "MemoryDeliverer",
    "SocketDeliverer",
    "fan_out",
]

Delivered = tuple[list[int], list[int], int, float]
"""What a deliverer answers to a publication: the handles it hands back (slow: the hub queues
the frame in their outboxes, in this order), the handles whose writer must run (woken: bytes
are pending for them), how many frames it wrote itself, and the seconds it spent matching."""


class Deliverer(Protocol):
    """What the hub needs of a deliverer: a handle per connection, the subscriptions each
    holds, and one call per publication (`publish`, `publish_rows`)."""

    def open(self) -> int:
        """A handle for a new connection."""
        ...

    def close(self, handle: int) -> None:
        """Forgets `handle` (unsubscribe its subscriptions first); KeyError if not open."""
        ...

    def subscribe(self, sub_id: int, handle: int) -> None:
        """Channel subscription `sub_id` (of the hub's matcher) belongs to `handle`."""
        ...

    def unsubscribe(self, sub_id: int) -> bool:
        """Forgets channel subscription `sub_id`; returns whether it was known."""
        ...

    def subscribe_rows(self, sub_id: int, handle: int) -> None:
        """`handle` holds row subscription `sub_id` (several handles may hold one)."""
        ...

    def unsubscribe_rows(self, sub_id: int, handle: int) -> bool:
        """`handle` no longer holds row subscription `sub_id`; returns whether it did."""
        ...

    def cork(self) -> None:
        """From now on, frames written directly are gathered until `uncork`."""
        ...

    def uncork(self) -> list[int]:
        """Writes what was gathered, one write per connection; returns the woken handles."""
        ...

    def publish(
        self, matcher: Matcher, channel: str, payload: bytes, skip: int | None = None
    ) -> Delivered:
        """Delivers `payload` to every connection whose subscription in `matcher` matches
        `channel`, once each, except `skip`."""
        ...

    def publish_rows(
        self,
        ids: Sequence[int],
        payload: bytes,
        matcher: Matcher | None = None,
        channel: str | None = None,
    ) -> Delivered:
        """Delivers a row event's `payload` to every holder of one of the row subscriptions
        `ids` and, with `channel`, to every connection whose subscription in `matcher`
        matches it, once each: holders in the order of `ids`, then channel subscribers."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters (the Rust fan-out's keys: direct frames and bytes, writes, backlog bytes,
        handles, attached sockets, subscriptions...)."""
        ...


@runtime_checkable
class SocketDeliverer(Deliverer, Protocol):
    """A deliverer that writes to the sockets transports lend it (the Rust fan-out). The hub
    uses these calls only for a connection with a socket attached."""

    def attach(self, handle: int, fd: int, limit: int = ...) -> None:
        """Borrows the socket `fd` for `handle` (which starts held), keeping at most `limit`
        bytes pending for it."""
        ...

    def hold(self, handle: int) -> None:
        """Frames to `handle` go through its outbox from now on."""
        ...

    def release(self, handle: int) -> bool:
        """Direct writes to `handle` may resume (its writer wrote everything queued)."""
        ...

    def take_pending(self, handle: int) -> bytes:
        """The bytes pending for `handle`: its writer writes them first."""
        ...

    def discard_pending(self, handle: int) -> int:
        """Discards the pending frames nothing of was written; returns the bytes freed."""
        ...

    def pending_bytes(self, handle: int) -> int:
        """Bytes pending for `handle`."""
        ...


DelivererFactory = Callable[[OutboxBudget, HubConfig], Deliverer]
"""Makes a hub's deliverer, given the hub's budget for queued bytes and its config."""


def fan_out(budget: OutboxBudget, config: HubConfig) -> SocketDeliverer:
    """The Rust fan-out (`pyrt._core.FanOut`), counting its backlog against `budget` and
    spreading a corked batch's writes over `config.write_threads` threads."""
    deliverer = FanOut(budget)
    deliverer.threads = config.write_threads
    return deliverer


_STATS = (
    "direct_frames",
    "writes",
    "direct_bytes",
    "partial_writes",
    "refused_writes",
    "overflows",
    "budget_overflows",
    "backlog_bytes",
    "threaded_uncorks",
)


class MemoryDeliverer:
    """A deliverer without sockets: every recipient of a publication is handed back (slow),
    in the order the Rust fan-out hands back recipients without a socket, so every frame goes
    through its connection's outbox. Pure Python, for the sans-IO hub's tests.

    `budget` and `config` are taken to be a `DelivererFactory`; nothing is ever pending here,
    so the budget is never charged. The seconds spent matching are reported as 0 (nothing
    here reads a clock)."""

    def __init__(self, budget: OutboxBudget | None = None, config: HubConfig | None = None) -> None:
        self._open: list[bool] = []
        self._free: list[int] = []
        self._subs: dict[int, int] = {}
        """Channel subscription id -> its handle."""
        self._rows: dict[int, list[int]] = {}
        """Row subscription id -> the handles holding it."""

    def _check(self, handle: int) -> None:
        if not (0 <= handle < len(self._open) and self._open[handle]):
            raise KeyError(f"no open handle {handle}")

    def open(self) -> int:
        if self._free:
            handle = self._free.pop()
            self._open[handle] = True
        else:
            handle = len(self._open)
            self._open.append(True)
        return handle

    def close(self, handle: int) -> None:
        self._check(handle)
        self._open[handle] = False
        self._free.append(handle)

    def subscribe(self, sub_id: int, handle: int) -> None:
        self._check(handle)
        self._subs[sub_id] = handle

    def unsubscribe(self, sub_id: int) -> bool:
        return self._subs.pop(sub_id, None) is not None

    def subscribe_rows(self, sub_id: int, handle: int) -> None:
        self._check(handle)
        holders = self._rows.setdefault(sub_id, [])
        if handle in holders:
            raise ValueError(f"handle {handle} holds row subscription {sub_id} already")
        holders.append(handle)

    def unsubscribe_rows(self, sub_id: int, handle: int) -> bool:
        holders = self._rows.get(sub_id)
        if holders is None or handle not in holders:
            return False
        # As the Rust fan-out does (swap_remove): the last holder takes the place of the one
        # leaving, which decides the order recipients are handed back in.
        at = holders.index(handle)
        holders[at] = holders[-1]
        holders.pop()
        if not holders:
            del self._rows[sub_id]
        return True

    def cork(self) -> None:
        pass  # nothing is written directly, so nothing is gathered

    def uncork(self) -> list[int]:
        return []

    def publish(
        self, matcher: Matcher, channel: str, payload: bytes, skip: int | None = None
    ) -> Delivered:
        subs = self._subs
        recipients = [subs[s] for s in matcher.match_channel(channel) if s in subs]
        return _once(recipients, skip), [], 0, 0.0

    def publish_rows(
        self,
        ids: Sequence[int],
        payload: bytes,
        matcher: Matcher | None = None,
        channel: str | None = None,
    ) -> Delivered:
        recipients = [h for sub_id in ids for h in self._rows.get(sub_id, ())]
        if matcher is not None and channel is not None:
            subs = self._subs
            recipients.extend(subs[s] for s in matcher.match_channel(channel) if s in subs)
        return _once(recipients, None), [], 0, 0.0

    def stats(self) -> dict[str, int]:
        counts = dict.fromkeys(_STATS, 0)
        counts.update(
            row_subscriptions=len(self._rows),
            handles=sum(self._open),
            attached=0,
            subscriptions=len(self._subs),
        )
        return counts


def _once(recipients: list[int], skip: int | None) -> list[int]:
    """`recipients` without `skip`, each once, in order of first appearance."""
    seen: set[int] = set()
    slow = []
    for handle in recipients:
        if handle != skip and handle not in seen:
            seen.add(handle)
            slow.append(handle)
    return slow
