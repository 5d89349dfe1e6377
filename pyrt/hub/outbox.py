"""The per-connection outbox: a bounded queue of encoded frames and a slow-consumer policy.

The hub encodes each message once per wire format and pushes the same ``str`` or ``bytes``
object into the outbox of every recipient; the connection's writer task drains it with
:meth:`Outbox.pop`. An outbox bounds both the number of queued frames and their total size, so
a client that stops reading costs at most ``max_bytes`` of frames however fast events arrive.

When a frame does not fit, the policy it is pushed with decides what gives:

``DISCONNECT``
    Nothing is lost silently. The push reports ``overflow`` and the hub closes the connection
    with the "slow" code; the client reconnects and resumes from the last offset it saw, so it
    still gets every publication (or ``recovered: false`` when history no longer reaches back).
    Frames pushed under this policy are never evicted to make room for others: that would
    break the same promise.
``DROP_OLDEST``
    The connection stays open and the oldest evictable frames are evicted until the new one
    fits. The client sees the loss as a gap in a channel's publication offsets and can
    refetch, or resubscribe from its last offset, if it cares.
``CONFLATE``
    As ``DROP_OLDEST``, but first every queued frame with the new frame's ``key`` is evicted:
    the new frame supersedes them (a newer state of the same row, say). The client sees gaps
    in the offsets, yet for each key the latest state still arrives, and in order.

A frame is *evictable* when it was pushed droppable under ``DROP_OLDEST`` or ``CONFLATE``.
Control frames (``droppable=False``: replies, errors, presence state, disconnect notices) are
never evicted and never conflated; when they do not fit they evict evictable frames, oldest
first, whatever their own policy. If evicting every evictable frame would still not make room,
nothing is evicted: a droppable frame under ``DROP_OLDEST`` or ``CONFLATE`` is itself dropped
(refused, a gap like any other), while a control frame or a ``DISCONNECT`` frame overflows.
A frame larger than ``max_bytes`` can never fit and overflows too. Once overflowed, an
outbox refuses every push and changes no more until the hub closes the connection.

The outboxes of one hub may share a *budget* (``ByteBudget``; the hub's is
``pyrt._core.OutboxBudget``, which the Rust fan-out's backlogs count against too): the bytes
all of them hold together, against one limit. A frame that fits the outbox but not the
budget is treated exactly as one that does not fit the outbox: evictable frames of this
outbox (never another's) are evicted to make room under ``DROP_OLDEST`` and ``CONFLATE``,
and what cannot be made room for is dropped or overflows, the overflow marked
``over_budget``. An outbox holds against the budget what it queues and, until the next
:meth:`Outbox.pop` or :meth:`Outbox.clear`, what the last ``pop`` took: its caller is still
writing those frames.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable
from typing import NamedTuple, Protocol

import attrs

__all__ = ["ByteBudget", "Outbox", "PushResult", "SlowConsumerPolicy", "frame_size"]


class SlowConsumerPolicy(enum.Enum):
    """What to do when a droppable frame does not fit in a connection's outbox."""

    DISCONNECT = "disconnect"
    """Close the connection as slow; the client resumes from its offsets and loses nothing."""
    DROP_OLDEST = "drop_oldest"
    """Evict the oldest evictable frames; the client sees gaps in the offsets."""
    CONFLATE = "conflate"
    """Evict queued frames with the same key, then the oldest; the latest state per key stays."""


class ByteBudget(Protocol):
    """Bytes held by many outboxes (and whatever else counts against it) and their limit."""

    @property
    def limit(self) -> int: ...

    @property
    def held(self) -> int: ...

    def add(self, delta: int, /) -> None:
        """Counts `delta` more bytes as held (negative: frees them)."""


@attrs.frozen(slots=True)
class PushResult:
    """The outcome of :meth:`Outbox.push`."""

    accepted: bool
    """The new frame is queued."""
    evicted: int
    """How many queued frames were evicted (dropped or conflated) to make room for it."""
    overflow: bool
    """The connection must be closed as slow; the outbox is overflowed from now on."""
    over_budget: bool = False
    """The overflow is the shared budget's: the frame would have fit the outbox alone."""


# Pushes are made once per recipient for every event, so the common outcomes are shared.
_ACCEPTED = PushResult(accepted=True, evicted=0, overflow=False)
_OVERFLOW = PushResult(accepted=False, evicted=0, overflow=True)
_OVER_BUDGET = PushResult(accepted=False, evicted=0, overflow=True, over_budget=True)
_DROPPED = PushResult(accepted=False, evicted=0, overflow=False)


def frame_size(frame: str | bytes) -> int:
    """Return the size of *frame* on the wire: its length, UTF-8 encoded if it is a ``str``.

    Measure a frame once and pass ``size=`` to every :meth:`Outbox.push` it goes to.
    """
    if not isinstance(frame, str) or frame.isascii():  # isascii() is a flag read in CPython
        return len(frame)
    # surrogatepass, so that measuring never raises; whether such a frame can be sent is the
    # transport's business, and no error handler makes it longer than this on the wire.
    return len(frame.encode("utf-8", "surrogatepass"))


class _Entry(NamedTuple):
    # A tuple, not an attrs class: one is made per recipient per event.
    frame: str | bytes
    size: int
    evictable: bool
    key: Hashable | None  # None unless evictable: other frames are never conflated


class Outbox:
    """A bounded queue of outgoing frames for one connection. See the module docstring."""

    __slots__ = (
        "_budget",
        "_budget_limit",
        "_by_key",
        "_evictable",
        "_evictable_bytes",
        "_max_bytes",
        "_max_depth",
        "_max_messages",
        "_next_seq",
        "_overflowed",
        "_queue",
        "_queued_bytes",
        "_taken_bytes",
        "_total_cleared",
        "_total_conflated",
        "_total_dropped",
        "_total_popped",
        "_total_pushed",
        "_total_refused",
    )

    def __init__(self, max_messages: int, max_bytes: int, budget: ByteBudget | None = None) -> None:
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, not {max_messages}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._budget = budget
        self._budget_limit = budget.limit if budget is not None else 0
        self._taken_bytes = 0
        """What the last `pop` took: still held (being written) until the next one."""
        # Entries are keyed by a push sequence number. OrderedDicts rather than a deque, as
        # eviction takes entries out of the middle in O(1) (a deque would need tombstones,
        # which pile up unboundedly while nothing is popped); rather than plain dicts, as
        # repeatedly taking the first item of a dict is not O(1).
        self._queue: OrderedDict[int, _Entry] = OrderedDict()  # every queued frame
        self._evictable: OrderedDict[int, _Entry] = OrderedDict()  # the evictable ones
        self._by_key: dict[Hashable, set[int]] = {}  # evictable frames with a key
        self._next_seq = 0
        self._queued_bytes = 0
        self._evictable_bytes = 0
        self._overflowed = False
        self._total_pushed = 0
        self._total_refused = 0
        self._total_popped = 0
        self._total_dropped = 0
        self._total_conflated = 0
        self._total_cleared = 0
        self._max_depth = 0

    def __repr__(self) -> str:
        return (
            f"<Outbox {len(self._queue)}/{self._max_messages} frames, "
            f"{self._queued_bytes}/{self._max_bytes} bytes"
            f"{', overflowed' if self._overflowed else ''}>"
        )

    def push(
        self,
        frame: str | bytes,
        *,
        droppable: bool = True,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT,
        key: Hashable | None = None,
        size: int | None = None,
    ) -> PushResult:
        """Queue *frame*, making room as *policy* allows; the result says what happened.

        *droppable* is False for control frames. *key* names what the frame is the latest
        state of, for ``CONFLATE``; None is never conflated. *size* defaults to
        ``frame_size(frame)``.
        """
        if self._overflowed:
            self._total_refused += 1
            return _OVERFLOW
        if size is None:
            size = frame_size(frame)
        elif size < 0:
            raise ValueError(f"size must not be negative, not {size}")
        if size > self._max_bytes:
            return self._overflow()
        budget = self._budget
        over_budget = 0  # bytes to free for the budget
        if budget is not None:
            if size > self._budget_limit:
                return self._overflow(_OVER_BUDGET)
            over_budget = budget.held + size - self._budget_limit
        evictable = droppable and policy is not SlowConsumerPolicy.DISCONNECT
        if not evictable:
            key = None
        evicted = 0
        over_bytes = self._queued_bytes + size - self._max_bytes  # bytes to free for the outbox
        full = len(self._queue) >= self._max_messages or over_bytes > 0
        if full or over_budget > 0:
            if droppable and not evictable:
                return self._overflow(_OVERFLOW if full else _OVER_BUDGET)  # DISCONNECT
            # Would evicting every evictable frame make room? If not, evict none.
            out_of_messages = len(self._queue) - len(self._evictable) >= self._max_messages
            if out_of_messages or self._evictable_bytes < max(over_bytes, over_budget):
                if droppable:
                    self._total_refused += 1
                    return _DROPPED
                own = out_of_messages or self._evictable_bytes < over_bytes
                return self._overflow(_OVERFLOW if own else _OVER_BUDGET)
            if key is not None:
                hash(key)  # an unhashable key raises here, before anything is evicted
                if policy is SlowConsumerPolicy.CONFLATE:
                    evicted = self._conflate(key)
            evicted += self._drop_oldest(size)
        seq = self._next_seq
        if key is not None:
            # First, so that an unhashable key raises before anything has changed.
            self._by_key.setdefault(key, set()).add(seq)
        self._next_seq = seq + 1
        entry = _Entry(frame, size, evictable, key)
        self._queue[seq] = entry
        self._queued_bytes += size
        if budget is not None:
            budget.add(size)
        if evictable:
            self._evictable[seq] = entry
            self._evictable_bytes += size
        self._total_pushed += 1
        if len(self._queue) > self._max_depth:
            self._max_depth = len(self._queue)
        if evicted:
            return PushResult(accepted=True, evicted=evicted, overflow=False)
        return _ACCEPTED

    def pop(self, max_frames: int | None = None, max_bytes: int | None = None) -> list[str | bytes]:
        """Take queued frames, oldest first, up to *max_frames* frames and *max_bytes* bytes.

        The first frame is always taken, even if it alone is larger than *max_bytes*; after it,
        frames are taken while the next one fits. Returns an empty list only when nothing is
        queued. The frames taken stay counted against the budget until the next ``pop`` (the
        caller comes back for more once it has written them) or :meth:`clear`.
        """
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames must be at least 1, not {max_frames}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, not {max_bytes}")
        queue = self._queue
        frames: list[str | bytes] = []
        taken = 0
        while queue and len(frames) != max_frames:
            seq = next(iter(queue))
            entry = queue[seq]
            if max_bytes is not None and frames and taken + entry.size > max_bytes:
                break
            del queue[seq]
            self._forget(seq, entry)
            frames.append(entry.frame)
            taken += entry.size
        self._total_popped += len(frames)
        written, self._taken_bytes = self._taken_bytes, taken
        if written and self._budget is not None:
            self._budget.add(-written)
        return frames

    def clear(self) -> None:
        """Discard every queued frame (counted as cleared) and give back to the budget what
        it held, the frames the last ``pop`` took included. An overflowed outbox stays so."""
        self._total_cleared += len(self._queue)
        held = self._queued_bytes + self._taken_bytes
        self._queue.clear()
        self._evictable.clear()
        self._by_key.clear()
        self._queued_bytes = 0
        self._taken_bytes = 0
        self._evictable_bytes = 0
        if held and self._budget is not None:
            self._budget.add(-held)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def max_messages(self) -> int:
        """The most frames the outbox holds."""
        return self._max_messages

    @property
    def max_bytes(self) -> int:
        """The most bytes of frames the outbox holds."""
        return self._max_bytes

    @property
    def queued_bytes(self) -> int:
        """The total size of the queued frames."""
        return self._queued_bytes

    @property
    def taken_bytes(self) -> int:
        """The size of the frames the last ``pop`` took (held against the budget)."""
        return self._taken_bytes

    @property
    def overflowed(self) -> bool:
        """Whether a push has overflowed; the connection is to be closed as slow."""
        return self._overflowed

    @property
    def total_pushed(self) -> int:
        """Frames accepted by :meth:`push` so far."""
        return self._total_pushed

    @property
    def total_refused(self) -> int:
        """Pushes not accepted: the overflowing push, pushes after it, and dropped new frames."""
        return self._total_refused

    @property
    def total_popped(self) -> int:
        """Frames taken by :meth:`pop` so far."""
        return self._total_popped

    @property
    def total_dropped(self) -> int:
        """Queued frames evicted, oldest first, to make room."""
        return self._total_dropped

    @property
    def total_conflated(self) -> int:
        """Queued frames evicted because a newer frame with the same key superseded them."""
        return self._total_conflated

    @property
    def total_evicted(self) -> int:
        """Queued frames evicted to make room: dropped plus conflated."""
        return self._total_dropped + self._total_conflated

    @property
    def total_cleared(self) -> int:
        """Queued frames discarded by :meth:`clear`."""
        return self._total_cleared

    @property
    def max_depth(self) -> int:
        """The most frames that have been queued at once."""
        return self._max_depth

    def _overflow(self, result: PushResult = _OVERFLOW) -> PushResult:
        self._overflowed = True
        self._total_refused += 1
        return result

    def _forget(self, seq: int, entry: _Entry) -> None:
        """Account for *entry* having been taken out of ``_queue``."""
        self._queued_bytes -= entry.size
        if entry.evictable:
            del self._evictable[seq]
            self._evictable_bytes -= entry.size
            if entry.key is not None:
                seqs = self._by_key[entry.key]
                seqs.discard(seq)
                if not seqs:
                    del self._by_key[entry.key]

    def _conflate(self, key: Hashable) -> int:
        seqs = self._by_key.pop(key, ())
        freed = 0
        for seq in seqs:
            entry = self._queue.pop(seq)
            del self._evictable[seq]
            freed += entry.size
        self._queued_bytes -= freed
        self._evictable_bytes -= freed
        if freed and self._budget is not None:
            self._budget.add(-freed)
        self._total_conflated += len(seqs)
        return len(seqs)

    def _drop_oldest(self, size: int) -> int:
        """Evict the oldest evictable frames until one more frame of *size* fits, in the
        outbox and in the budget."""
        budget = self._budget
        over_budget = budget.held + size - self._budget_limit if budget is not None else 0
        dropped = freed = 0
        while (
            len(self._queue) >= self._max_messages
            or self._queued_bytes + size > self._max_bytes
            or freed < over_budget
        ):
            # The caller checked that evicting every evictable frame makes room.
            seq = next(iter(self._evictable))
            entry = self._queue.pop(seq)
            self._forget(seq, entry)
            freed += entry.size
            dropped += 1
        if freed and budget is not None:
            budget.add(-freed)
        self._total_dropped += dropped
        return dropped
