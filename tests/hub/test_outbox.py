"""The per-connection outbox: examples for each policy, then a state machine against a model."""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import ClassVar

import attrs
import pytest
from hypothesis import event, settings, target
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from pyrt.hub.outbox import Outbox, PushResult, SlowConsumerPolicy, frame_size

DISCONNECT = SlowConsumerPolicy.DISCONNECT
DROP_OLDEST = SlowConsumerPolicy.DROP_OLDEST
CONFLATE = SlowConsumerPolicy.CONFLATE

ACCEPTED = PushResult(accepted=True, evicted=0, overflow=False)
OVERFLOW = PushResult(accepted=False, evicted=0, overflow=True)
DROPPED = PushResult(accepted=False, evicted=0, overflow=False)


def evicting(n: int) -> PushResult:
    return PushResult(accepted=True, evicted=n, overflow=False)


def counters(outbox: Outbox) -> dict[str, int]:
    names = ["pushed", "refused", "popped", "dropped", "conflated", "evicted", "cleared"]
    found = {name: getattr(outbox, f"total_{name}") for name in names}
    found["max_depth"] = outbox.max_depth
    return found


# --------------------------------------------------------------------------------------------
# Construction and sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("max_messages", "max_bytes"), [(0, 10), (10, 0), (-1, 10), (10, -5)])
def test_limits_must_be_positive(max_messages: int, max_bytes: int) -> None:
    with pytest.raises(ValueError, match="must be at least 1"):
        Outbox(max_messages, max_bytes)


def test_smallest_outbox_holds_one_byte() -> None:
    outbox = Outbox(1, 1)
    assert outbox.push(b"x") == ACCEPTED
    assert (len(outbox), outbox.queued_bytes, outbox.max_messages, outbox.max_bytes) == (1, 1, 1, 1)


@pytest.mark.parametrize(
    ("frame", "size"),
    [
        (b"", 0),
        (b"\xff\x00abc", 5),
        ("", 0),
        ("hello", 5),
        ("é", 2),  # latin-1 range, still two bytes in UTF-8
        ("€", 3),
        ("😀", 4),
        ('{"a":"é€😀"}', 8 + 2 + 3 + 4),
        ("\ud800", 3),  # a lone surrogate is measured, not rejected
    ],
)
def test_frame_size_is_the_utf8_length(frame: str | bytes, size: int) -> None:
    assert frame_size(frame) == size
    outbox = Outbox(10, 100)
    assert outbox.push(frame) == ACCEPTED
    assert outbox.queued_bytes == size


def test_size_argument_overrides_measuring() -> None:
    outbox = Outbox(10, 100)
    frame = "é" * 10  # 20 bytes if measured
    outbox.push(frame, size=7)
    outbox.push(b"abc", size=0)
    assert outbox.queued_bytes == 7
    # The declared size is what the bounds are checked against.
    assert outbox.push(b"x", size=94) == OVERFLOW


def test_negative_size_is_an_error_and_changes_nothing() -> None:
    outbox = Outbox(10, 100)
    with pytest.raises(ValueError, match="negative"):
        outbox.push(b"abc", size=-1)
    assert (len(outbox), outbox.queued_bytes, outbox.overflowed) == (0, 0, False)
    assert counters(outbox)["pushed"] == 0


# --------------------------------------------------------------------------------------------
# Order and pop
# --------------------------------------------------------------------------------------------


def test_frames_come_out_in_push_order_as_the_same_objects() -> None:
    outbox = Outbox(10, 1000)
    frames: list[str | bytes] = ["a" * 300, b"b" * 300, "c", b"d"]
    for frame in frames:
        outbox.push(frame)
    popped = outbox.pop()
    assert popped == frames
    assert all(got is sent for got, sent in zip(popped, frames, strict=True))
    assert outbox.pop() == []
    assert (len(outbox), outbox.queued_bytes) == (0, 0)


def test_pop_max_frames() -> None:
    outbox = Outbox(10, 100)
    for frame in [b"1", b"2", b"3"]:
        outbox.push(frame)
    assert outbox.pop(max_frames=2) == [b"1", b"2"]
    assert outbox.pop(max_frames=2) == [b"3"]
    assert outbox.pop(max_frames=2) == []


def test_pop_max_bytes_takes_whole_frames_and_at_least_one() -> None:
    outbox = Outbox(10, 100)
    for frame in [b"a" * 10, b"b" * 3, b"c" * 3, b"d"]:
        outbox.push(frame)
    # The first frame is larger than the budget but is taken, alone.
    assert outbox.pop(max_bytes=5) == [b"a" * 10]
    # b + c fit exactly; d does not fit after them.
    assert outbox.pop(max_bytes=6) == [b"b" * 3, b"c" * 3]
    assert outbox.queued_bytes == 1
    assert outbox.pop(max_bytes=6) == [b"d"]


def test_pop_stops_at_the_first_frame_that_does_not_fit() -> None:
    outbox = Outbox(10, 100)
    for frame in [b"a", b"b" * 10, b"c"]:
        outbox.push(frame)
    # c would fit in the budget, but taking it would reorder frames.
    assert outbox.pop(max_bytes=5) == [b"a"]
    assert outbox.pop(max_frames=5, max_bytes=11) == [b"b" * 10, b"c"]


def test_pop_both_limits() -> None:
    outbox = Outbox(10, 100)
    for _ in range(5):
        outbox.push(b"xy")
    assert len(outbox.pop(max_frames=2, max_bytes=100)) == 2
    assert len(outbox.pop(max_frames=5, max_bytes=5)) == 2
    assert len(outbox) == 1


@pytest.mark.parametrize("limits", [{"max_frames": 0}, {"max_bytes": 0}, {"max_frames": -1}])
def test_pop_limits_must_be_positive(limits: dict[str, int]) -> None:
    outbox = Outbox(10, 100)
    outbox.push(b"x")
    with pytest.raises(ValueError, match="must be at least 1"):
        outbox.pop(**limits)
    assert len(outbox) == 1


# --------------------------------------------------------------------------------------------
# DISCONNECT
# --------------------------------------------------------------------------------------------


def test_disconnect_when_out_of_messages() -> None:
    outbox = Outbox(2, 100)
    assert outbox.push(b"1") == ACCEPTED
    assert outbox.push(b"2") == ACCEPTED
    assert not outbox.overflowed
    assert outbox.push(b"3") == OVERFLOW
    assert outbox.overflowed
    # Nothing was evicted: the client resumes from its offsets after the reconnect.
    assert outbox.pop() == [b"1", b"2"]


def test_disconnect_when_out_of_bytes() -> None:
    outbox = Outbox(100, 10)
    assert outbox.push(b"x" * 6) == ACCEPTED
    assert outbox.push(b"y" * 4) == ACCEPTED  # exactly full
    assert outbox.push(b"") == ACCEPTED  # empty frames fit a full byte budget
    assert outbox.push(b"z") == OVERFLOW
    assert outbox.queued_bytes == 10
    assert len(outbox) == 3


def test_disconnect_is_the_default_policy() -> None:
    outbox = Outbox(1, 100)
    outbox.push(b"1")
    assert outbox.push(b"2").overflow


def test_overflow_sticks_and_nothing_else_changes() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"1")
    outbox.push(b"2")
    assert outbox.push(b"3") == OVERFLOW
    before = counters(outbox)
    # Popping still works (the writer may flush before closing) but frees no room.
    assert outbox.pop(max_frames=1) == [b"1"]
    for kwargs in [
        {},
        {"policy": DROP_OLDEST},
        {"policy": CONFLATE, "key": "k"},
        {"droppable": False},
    ]:
        assert outbox.push(b"n", **kwargs) == OVERFLOW  # type: ignore[arg-type]
    assert outbox.overflowed
    assert outbox.pop() == [b"2"]
    outbox.clear()
    assert outbox.overflowed
    assert outbox.push(b"x", droppable=False) == OVERFLOW
    after = counters(outbox)
    assert after["refused"] == before["refused"] + 5
    assert after["popped"] == before["popped"] + 2
    assert {k: v for k, v in after.items() if k not in ("refused", "popped")} == {
        k: v for k, v in before.items() if k not in ("refused", "popped")
    }
    assert (len(outbox), outbox.queued_bytes) == (0, 0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"policy": DROP_OLDEST},
        {"policy": CONFLATE, "key": "k"},
        {"droppable": False},
        {"droppable": False, "policy": DROP_OLDEST},
    ],
)
def test_a_frame_larger_than_max_bytes_overflows_whatever_the_policy(
    kwargs: dict[str, object],
) -> None:
    outbox = Outbox(10, 10)
    outbox.push(b"a", policy=DROP_OLDEST, key="k")
    assert outbox.push(b"x" * 11, **kwargs) == OVERFLOW  # type: ignore[arg-type]
    assert outbox.overflowed
    assert outbox.pop() == [b"a"]  # nothing was evicted for it
    assert outbox.total_evicted == 0


def test_oversized_by_declared_size() -> None:
    outbox = Outbox(10, 10)
    assert outbox.push(b"x", size=11) == OVERFLOW
    outbox = Outbox(10, 10)
    assert outbox.push("é" * 5) == ACCEPTED  # 10 bytes
    outbox = Outbox(10, 10)
    assert outbox.push("é" * 5 + "a") == OVERFLOW  # 11 bytes, though 6 characters


# --------------------------------------------------------------------------------------------
# DROP_OLDEST
# --------------------------------------------------------------------------------------------


def test_drop_oldest_by_message_count() -> None:
    outbox = Outbox(3, 100)
    for frame in [b"1", b"2", b"3"]:
        assert outbox.push(frame, policy=DROP_OLDEST) == ACCEPTED
    assert outbox.push(b"4", policy=DROP_OLDEST) == evicting(1)
    assert outbox.push(b"5", policy=DROP_OLDEST) == evicting(1)
    assert not outbox.overflowed
    assert outbox.pop() == [b"3", b"4", b"5"]
    assert (outbox.total_dropped, outbox.total_conflated, outbox.total_evicted) == (2, 0, 2)


def test_drop_oldest_evicts_as_many_as_needed_for_the_bytes() -> None:
    outbox = Outbox(100, 10)
    for frame in [b"aa", b"bb", b"cc", b"dd", b"ee"]:
        outbox.push(frame, policy=DROP_OLDEST)
    assert outbox.push(b"x" * 5, policy=DROP_OLDEST) == evicting(3)
    assert outbox.queued_bytes == 9
    assert outbox.pop() == [b"dd", b"ee", b"x" * 5]


def test_drop_oldest_skips_control_frames() -> None:
    outbox = Outbox(3, 100)
    outbox.push(b"reply", droppable=False)
    outbox.push(b"1", policy=DROP_OLDEST)
    outbox.push(b"2", policy=DROP_OLDEST)
    assert outbox.push(b"3", policy=DROP_OLDEST) == evicting(1)
    assert outbox.pop() == [b"reply", b"2", b"3"]


def test_drop_oldest_never_evicts_frames_pushed_under_disconnect() -> None:
    # A DISCONNECT subscription was promised no gaps; a DROP_OLDEST neighbour cannot take
    # its frames away.
    outbox = Outbox(3, 100)
    outbox.push(b"d1", policy=DISCONNECT)
    outbox.push(b"o1", policy=DROP_OLDEST)
    outbox.push(b"d2", policy=DISCONNECT)
    assert outbox.push(b"o2", policy=DROP_OLDEST) == evicting(1)
    assert outbox.pop() == [b"d1", b"d2", b"o2"]


def test_drop_oldest_drops_the_new_frame_when_nothing_can_make_room() -> None:
    outbox = Outbox(3, 10)
    outbox.push(b"c" * 6, droppable=False)
    outbox.push(b"d" * 2, policy=DISCONNECT)
    outbox.push(b"o", policy=DROP_OLDEST)
    # Evicting o would free 1 byte; 3 are needed. Nothing is evicted, the new frame is dropped,
    # and the connection stays up.
    assert outbox.push(b"n" * 3, policy=DROP_OLDEST) == DROPPED
    assert not outbox.overflowed
    assert outbox.total_refused == 1
    assert outbox.total_evicted == 0
    # Evicting o is enough for a 2-byte frame.
    assert outbox.push(b"m" * 2, policy=DROP_OLDEST) == evicting(1)
    assert outbox.pop() == [b"c" * 6, b"d" * 2, b"m" * 2]


def test_drop_oldest_when_the_queue_is_all_control_frames() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"r1", droppable=False)
    outbox.push(b"r2", droppable=False)
    assert outbox.push(b"x", policy=DROP_OLDEST) == DROPPED
    assert outbox.push(b"x", policy=CONFLATE, key="k") == DROPPED
    assert not outbox.overflowed
    assert outbox.push(b"r3", droppable=False) == OVERFLOW


# --------------------------------------------------------------------------------------------
# CONFLATE
# --------------------------------------------------------------------------------------------


def test_conflate_only_when_there_is_no_room() -> None:
    outbox = Outbox(10, 100)
    for frame in [b"k1", b"k2", b"k3"]:
        assert outbox.push(frame, policy=CONFLATE, key="k") == ACCEPTED
    assert outbox.pop() == [b"k1", b"k2", b"k3"]


def test_conflate_evicts_every_frame_with_the_key_and_queues_at_the_tail() -> None:
    outbox = Outbox(4, 100)
    outbox.push(b"a1", policy=CONFLATE, key="a")
    outbox.push(b"b1", policy=CONFLATE, key="b")
    outbox.push(b"a2", policy=CONFLATE, key="a")
    outbox.push(b"c1", policy=CONFLATE, key="c")
    # Evicting one frame would do, but both earlier states of "a" are superseded.
    assert outbox.push(b"a3", policy=CONFLATE, key="a") == evicting(2)
    assert (outbox.total_conflated, outbox.total_dropped) == (2, 0)
    # b1 is older than a3 and stays ahead of it; per key the order is kept.
    assert outbox.pop() == [b"b1", b"c1", b"a3"]


def test_conflate_then_drops_oldest_if_still_no_room() -> None:
    outbox = Outbox(100, 10)
    outbox.push(b"x" * 4, policy=CONFLATE, key="x")
    outbox.push(b"y" * 2, policy=CONFLATE, key="y")
    outbox.push(b"k", policy=CONFLATE, key="k")
    # 7 bytes queued and 7 more coming: conflating k frees 1 byte, dropping x the rest.
    assert outbox.push(b"K" * 7, policy=CONFLATE, key="k") == evicting(2)
    assert (outbox.total_conflated, outbox.total_dropped) == (1, 1)
    assert outbox.pop() == [b"y" * 2, b"K" * 7]


def test_drop_oldest_with_a_key_does_not_conflate() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"old", policy=DROP_OLDEST)
    outbox.push(b"k1", policy=DROP_OLDEST, key="k")
    assert outbox.push(b"k2", policy=DROP_OLDEST, key="k") == evicting(1)
    assert (outbox.total_conflated, outbox.total_dropped) == (0, 1)
    assert outbox.pop() == [b"k1", b"k2"]


def test_conflate_without_a_key_drops_oldest() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"a", policy=CONFLATE, key=None)
    outbox.push(b"b", policy=CONFLATE, key=None)
    assert outbox.push(b"c", policy=CONFLATE) == evicting(1)
    assert (outbox.total_conflated, outbox.total_dropped) == (0, 1)
    assert outbox.pop() == [b"b", b"c"]


def test_keyed_frames_without_pressure_do_not_conflate_frames_without_a_key() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"plain", policy=CONFLATE)
    outbox.push(b"k1", policy=CONFLATE, key="k")
    assert outbox.push(b"k2", policy=CONFLATE, key="k") == evicting(1)
    assert outbox.total_conflated == 1
    assert outbox.pop() == [b"plain", b"k2"]


def test_control_and_disconnect_frames_are_never_conflated() -> None:
    outbox = Outbox(3, 100)
    outbox.push(b"control", droppable=False, key="k")
    outbox.push(b"protected", policy=DISCONNECT, key="k")
    outbox.push(b"old", policy=CONFLATE, key="k")
    assert outbox.push(b"new", policy=CONFLATE, key="k") == evicting(1)
    assert outbox.pop() == [b"control", b"protected", b"new"]


def test_drop_oldest_frames_with_a_key_can_be_conflated() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"other", policy=DROP_OLDEST)
    outbox.push(b"k1", policy=DROP_OLDEST, key=("row", 1))
    assert outbox.push(b"k2", policy=CONFLATE, key=("row", 1)) == evicting(1)
    assert outbox.pop() == [b"other", b"k2"]


def test_keys_compare_by_equality() -> None:
    outbox = Outbox(1, 100)
    outbox.push(b"1", policy=CONFLATE, key=("row", 1))
    assert outbox.push(b"2", policy=CONFLATE, key=("row", 1)) == evicting(1)
    assert outbox.total_conflated == 1


def test_unhashable_key_raises_before_anything_changes() -> None:
    outbox = Outbox(1, 100)
    outbox.push(b"1", policy=DROP_OLDEST)
    for policy in [DROP_OLDEST, CONFLATE]:
        with pytest.raises(TypeError):
            outbox.push(b"2", policy=policy, key=["unhashable"])  # type: ignore[arg-type]
        assert outbox.pop() == [b"1"]
        with pytest.raises(TypeError):
            outbox.push(b"2", policy=policy, key=["unhashable"])  # type: ignore[arg-type]
        assert len(outbox) == 0
        outbox.push(b"1", policy=DROP_OLDEST)
    assert counters(outbox)["evicted"] == 0


# --------------------------------------------------------------------------------------------
# Control frames
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [DROP_OLDEST, CONFLATE])
def test_control_frames_evict_droppable_frames_whatever_their_own_policy(
    policy: SlowConsumerPolicy,
) -> None:
    outbox = Outbox(3, 100)
    outbox.push(b"1", policy=policy, key="k")
    outbox.push(b"2", policy=policy, key="k")
    outbox.push(b"3", policy=policy, key="k")
    # The control frame's own policy (and key) do not matter: it drops oldest first.
    for own_policy in [DISCONNECT, CONFLATE]:
        result = outbox.push(b"reply", droppable=False, policy=own_policy, key="k")
        assert result == evicting(1)
    assert (outbox.total_dropped, outbox.total_conflated) == (2, 0)
    assert outbox.pop() == [b"3", b"reply", b"reply"]


def test_control_frames_are_never_evicted() -> None:
    outbox = Outbox(3, 100)
    outbox.push(b"r1", droppable=False)
    for i in range(20):
        outbox.push(b"%d" % i, policy=DROP_OLDEST)
    assert outbox.pop()[0] == b"r1"


def test_control_frame_overflows_when_evicting_all_droppable_frames_is_not_enough() -> None:
    outbox = Outbox(100, 10)
    outbox.push(b"r" * 6, droppable=False)
    outbox.push(b"o" * 2, policy=DROP_OLDEST)
    outbox.push(b"p" * 2, policy=DROP_OLDEST)
    assert outbox.push(b"c" * 5, droppable=False) == OVERFLOW
    # It did not evict anything on the way to overflowing.
    assert outbox.total_evicted == 0
    assert outbox.pop() == [b"r" * 6, b"o" * 2, b"p" * 2]


def test_control_frame_does_not_evict_disconnect_frames() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"d1")
    outbox.push(b"d2")
    assert outbox.push(b"reply", droppable=False) == OVERFLOW
    assert outbox.pop() == [b"d1", b"d2"]


# --------------------------------------------------------------------------------------------
# Counters, clear
# --------------------------------------------------------------------------------------------


def test_counters() -> None:
    outbox = Outbox(3, 100)
    assert counters(outbox) == dict.fromkeys(counters(outbox), 0)
    outbox.push(b"a", policy=CONFLATE, key="a")
    outbox.push(b"b", policy=CONFLATE, key="b")
    outbox.push(b"a", policy=CONFLATE, key="a")
    outbox.push(b"c", policy=CONFLATE, key="a")  # conflates both a's
    outbox.push(b"d", policy=CONFLATE, key="d")
    outbox.push(b"e", policy=DROP_OLDEST)  # drops b
    assert outbox.pop(max_frames=1) == [b"c"]
    outbox.clear()  # d and e
    outbox.push(b"f", droppable=False)
    outbox.push(b"x" * 101)  # overflow
    outbox.push(b"g")  # refused
    assert counters(outbox) == {
        "pushed": 7,
        "refused": 2,
        "popped": 1,
        "dropped": 1,
        "conflated": 2,
        "evicted": 3,
        "cleared": 2,
        "max_depth": 3,
    }
    assert len(outbox) == 1


def test_max_depth_is_a_high_water_mark() -> None:
    outbox = Outbox(10, 100)
    for _ in range(4):
        outbox.push(b"x")
    outbox.pop()
    outbox.push(b"x")
    assert (outbox.max_depth, len(outbox)) == (4, 1)


def test_clear_frees_room_and_forgets_keys() -> None:
    outbox = Outbox(2, 100)
    outbox.push(b"k1", policy=CONFLATE, key="k")
    outbox.push(b"r", droppable=False)
    outbox.clear()
    assert (len(outbox), outbox.queued_bytes, outbox.total_cleared) == (0, 0, 2)
    assert outbox.push(b"k2", policy=CONFLATE, key="k") == ACCEPTED
    assert outbox.push(b"x", policy=CONFLATE) == ACCEPTED
    assert outbox.push(b"k3", policy=CONFLATE, key="k") == evicting(1)
    assert outbox.pop() == [b"x", b"k3"]
    assert outbox.total_conflated == 1


def test_memory_stays_bounded_under_endless_conflation() -> None:
    outbox = Outbox(3, 100)
    outbox.push(b"r", droppable=False)
    for i in range(10_000):
        outbox.push(b"%d" % i, policy=CONFLATE, key=i % 4)
    assert len(outbox) == 3
    # No tombstones or stale index entries are left behind for the evicted frames.
    assert len(outbox._queue) == 3
    assert len(outbox._evictable) == 2
    assert sum(len(seqs) for seqs in outbox._by_key.values()) == 2
    assert outbox.total_pushed == outbox.total_evicted + len(outbox)


def test_repr() -> None:
    outbox = Outbox(2, 10)
    outbox.push(b"abc")
    assert repr(outbox) == "<Outbox 1/2 frames, 3/10 bytes>"
    outbox.push(b"x" * 11)
    assert repr(outbox) == "<Outbox 1/2 frames, 3/10 bytes, overflowed>"


# --------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------


@attrs.frozen
class Frame:
    """A frame pushed in the state machine, as the model keeps it."""

    number: int
    data: str | bytes
    size: int
    droppable: bool
    policy: SlowConsumerPolicy
    key: Hashable | None

    @property
    def evictable(self) -> bool:
        return self.droppable and self.policy is not DISCONNECT

    @property
    def protected(self) -> bool:
        """Whether losing it would break a promise: a control frame, or pushed under DISCONNECT."""
        return not self.evictable


class Model:
    """The outbox as a plain list, written to be obviously right rather than fast."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.queue: list[Frame] = []
        self.overflowed = False
        self.counts: Counter[str] = Counter()

    def fits(self, frames: list[Frame], size: int) -> bool:
        return (
            len(frames) < self.max_messages and sum(f.size for f in frames) + size <= self.max_bytes
        )

    def push(self, frame: Frame) -> tuple[PushResult, list[Frame]]:
        """The expected result, and the frames evicted for it."""
        if self.overflowed:
            self.counts["refused"] += 1
            return OVERFLOW, []
        fits = self.fits(self.queue, frame.size)
        # Could evicting every evictable frame make room?
        could_fit = self.fits([f for f in self.queue if not f.evictable], frame.size)
        if (
            frame.size > self.max_bytes
            or (not fits and frame.droppable and not frame.evictable)
            or (not fits and not frame.droppable and not could_fit)
        ):
            self.overflowed = True
            self.counts["refused"] += 1
            return OVERFLOW, []
        if not fits and not could_fit:
            self.counts["refused"] += 1
            return DROPPED, []
        evicted: list[Frame] = []
        if not fits:
            if frame.policy is CONFLATE and frame.evictable and frame.key is not None:
                conflated = [f for f in self.queue if f.evictable and f.key == frame.key]
                self.queue = [f for f in self.queue if f not in conflated]
                self.counts["conflated"] += len(conflated)
                evicted += conflated
            while not self.fits(self.queue, frame.size):
                oldest = next(f for f in self.queue if f.evictable)
                self.queue.remove(oldest)
                self.counts["dropped"] += 1
                evicted.append(oldest)
        self.queue.append(frame)
        self.counts["pushed"] += 1
        self.counts["max_depth"] = max(self.counts["max_depth"], len(self.queue))
        return PushResult(accepted=True, evicted=len(evicted), overflow=False), evicted

    def pop(self, max_frames: int | None, max_bytes: int | None) -> list[Frame]:
        taken: list[Frame] = []
        for frame in self.queue:
            if len(taken) == max_frames:
                break
            if (
                taken
                and max_bytes is not None
                and sum(f.size for f in taken) + frame.size > max_bytes
            ):
                break
            taken.append(frame)
        del self.queue[: len(taken)]
        self.counts["popped"] += len(taken)
        return taken

    def clear(self) -> list[Frame]:
        cleared, self.queue = self.queue, []
        self.counts["cleared"] += len(cleared)
        return cleared


KEYS: list[Hashable | None] = [None, "a", "b", ("row", 1)]

frame_payloads = st.one_of(
    st.binary(max_size=12),
    st.text(st.characters(max_codepoint=127), max_size=12),
    st.text(max_size=6),  # any code point, surrogates included: 1 to 4 bytes each
)


class OutboxMachine(RuleBasedStateMachine):
    """Drives an Outbox and the Model with the same calls and compares everything."""

    stats: ClassVar[Counter[str]] = Counter()

    def __init__(self) -> None:
        super().__init__()
        self.numbers = 0
        # The fate of every accepted frame, by number, as the outbox's results tell it.
        self.accepted: dict[int, Frame] = {}
        self.popped: set[int] = set()
        self.cleared: set[int] = set()
        self.evicted_reported = 0  # the sum of PushResult.evicted
        self.outcomes: set[str] = set()  # the kinds of outcome seen in this run

    @initialize(max_messages=st.integers(1, 6), max_bytes=st.integers(1, 40))
    def create(self, max_messages: int, max_bytes: int) -> None:
        self.outbox = Outbox(max_messages, max_bytes)
        self.model = Model(max_messages, max_bytes)

    def _push(
        self,
        payload: str | bytes,
        declared: int | None,
        droppable: bool,
        policy: SlowConsumerPolicy,
        key: Hashable | None,
    ) -> None:
        number = self.numbers
        self.numbers += 1
        # The number makes every frame distinct, so popped frames can be told apart.
        data: str | bytes = (
            b"%d|" % number + payload if isinstance(payload, bytes) else f"{number}|{payload}"
        )
        measured = (
            len(data) if isinstance(data, bytes) else len(data.encode("utf-8", "surrogatepass"))
        )
        frame = Frame(
            number, data, measured if declared is None else declared, droppable, policy, key
        )
        was_overflowed = self.outbox.overflowed
        before = (len(self.outbox), self.outbox.queued_bytes, counters(self.outbox))
        before[2]["refused"] += 1  # as it will be after any refused push

        result = self.outbox.push(data, droppable=droppable, policy=policy, key=key, size=declared)
        expected, evicted = self.model.push(frame)
        assert result == expected, (frame, self.model.queue)

        if was_overflowed:
            # Nothing changes after an overflow but the count of refused pushes.
            assert result == OVERFLOW
            assert (len(self.outbox), self.outbox.queued_bytes, counters(self.outbox)) == before
        assert not any(f.protected for f in evicted)
        if result.accepted:
            self.accepted[number] = frame
        self.evicted_reported += result.evicted

        outcome = (
            "refused after overflow"
            if was_overflowed
            else "overflow"
            if result.overflow
            else "new frame dropped"
            if not result.accepted
            else "accepted after evicting"
            if result.evicted
            else "accepted"
        )
        self.stats[outcome] += 1
        self.outcomes.add(outcome)
        event(f"push: {outcome}")
        if self.outbox.total_conflated > before[2]["conflated"]:
            self.stats["conflated"] += 1
            event("push: conflated")
        if result.overflow and not was_overflowed and not droppable:
            self.stats["control frame overflow"] += 1
        if not droppable and result.evicted:
            self.stats["control frame evicted"] += 1
        if declared is None and not isinstance(data, bytes) and not data.isascii():
            self.stats["measured non-ASCII"] += 1

    @rule(
        payload=frame_payloads,
        declared=st.none() | st.integers(0, 30),
        droppable=st.booleans(),
        policy=st.sampled_from(SlowConsumerPolicy),
        key=st.sampled_from(KEYS),
    )
    def push(
        self,
        payload: str | bytes,
        declared: int | None,
        droppable: bool,
        policy: SlowConsumerPolicy,
        key: Hashable | None,
    ) -> None:
        self._push(payload, declared, droppable, policy, key)

    @precondition(lambda self: not self.outbox.overflowed)
    @rule(
        pushes=st.lists(
            st.tuples(
                st.integers(0, 12),
                st.sampled_from([DROP_OLDEST, CONFLATE, CONFLATE]),
                st.sampled_from(KEYS),
            ),
            min_size=1,
            max_size=8,
        )
    )
    def push_burst(self, pushes: list[tuple[int, SlowConsumerPolicy, Hashable | None]]) -> None:
        # Droppable frames that are allowed to evict: the runs where eviction gets exercised.
        for size, policy, key in pushes:
            self._push(b"", size, True, policy, key)

    @precondition(lambda self: not self.outbox.overflowed)
    @rule(
        declared=st.integers(0, 8),
        policy=st.sampled_from(SlowConsumerPolicy),
        key=st.sampled_from(KEYS),
    )
    def push_control(self, declared: int, policy: SlowConsumerPolicy, key: Hashable | None) -> None:
        # Small control frames pile up and leave droppable frames nothing to evict.
        self._push("", declared, False, policy, key)

    @rule(
        max_frames=st.none() | st.integers(1, 4),
        max_bytes=st.none() | st.integers(1, 12),
    )
    def pop(self, max_frames: int | None, max_bytes: int | None) -> None:
        got = self.outbox.pop(max_frames=max_frames, max_bytes=max_bytes)
        expected = self.model.pop(max_frames, max_bytes)
        assert [f.data for f in expected] == got
        assert all(f.data is data for f, data in zip(expected, got, strict=True))
        self.popped.update(f.number for f in expected)
        if len(got) > 1:
            self.stats["pop of several"] += 1
        if max_bytes is not None and got and len(got) == 1 and expected[0].size > max_bytes:
            self.stats["pop of one oversized"] += 1

    @precondition(lambda self: len(self.model.queue) >= 2)
    @rule(data=st.data())
    def pop_exactly_filling_max_bytes(self, data: st.DataObject) -> None:
        # A budget that the first few frames fill to the byte: the boundary of "fits".
        count = data.draw(st.integers(1, len(self.model.queue)), label="count")
        budget = max(1, sum(f.size for f in self.model.queue[:count]))
        expected = self.model.pop(None, budget)
        got = self.outbox.pop(max_bytes=budget)
        assert [f.data for f in expected] == got
        self.popped.update(f.number for f in expected)
        if len(got) >= 2 and sum(f.size for f in expected) == budget:
            self.stats["pop filling max_bytes exactly"] += 1

    @rule()
    def clear(self) -> None:
        self.outbox.clear()
        self.cleared.update(f.number for f in self.model.clear())

    @invariant()
    def bounds_hold(self) -> None:
        assert len(self.outbox) <= self.outbox.max_messages
        assert self.outbox.queued_bytes <= self.outbox.max_bytes

    @invariant()
    def agrees_with_model(self) -> None:
        model = self.model
        assert len(self.outbox) == len(model.queue)
        assert self.outbox.queued_bytes == sum(f.size for f in model.queue)
        assert self.outbox.overflowed == model.overflowed
        for name in ["pushed", "refused", "popped", "dropped", "conflated", "cleared"]:
            assert getattr(self.outbox, f"total_{name}") == model.counts[name], name
        assert self.outbox.max_depth == model.counts["max_depth"]

    @invariant()
    def conservation(self) -> None:
        outbox = self.outbox
        assert outbox.total_evicted == outbox.total_dropped + outbox.total_conflated
        assert outbox.total_evicted == self.evicted_reported
        assert outbox.total_pushed == len(self.accepted)
        assert outbox.total_popped == len(self.popped)
        assert outbox.total_cleared == len(self.cleared)
        assert outbox.total_pushed == (
            outbox.total_popped + outbox.total_evicted + outbox.total_cleared + len(outbox)
        )
        assert outbox.max_depth >= len(outbox)

    @invariant()
    def index_is_consistent(self) -> None:
        # White-box: the structures behind the O(1) operations describe the same frames.
        outbox = self.outbox
        queue, evictable, by_key = outbox._queue, outbox._evictable, outbox._by_key
        assert list(evictable) == [seq for seq, entry in queue.items() if entry.evictable]
        assert outbox._evictable_bytes == sum(entry.size for entry in evictable.values())
        assert outbox.queued_bytes == sum(entry.size for entry in queue.values())
        keyed = {seq for seq, entry in evictable.items() if entry.key is not None}
        assert {seq for seqs in by_key.values() for seq in seqs} == keyed
        assert all(seqs for seqs in by_key.values())
        assert all(evictable[seq].key == key for key, seqs in by_key.items() for seq in seqs)

    def teardown(self) -> None:
        if not hasattr(self, "outbox"):
            return
        # Drain what is left: every accepted frame is now popped, evicted or cleared, and no
        # protected frame is among the evicted ones.
        expected = self.model.pop(None, None)
        assert self.outbox.pop() == [f.data for f in expected]
        self.popped.update(f.number for f in expected)
        lost = set(self.accepted) - self.popped - self.cleared
        assert len(lost) == self.outbox.total_evicted
        assert not [n for n in lost if self.accepted[n].protected]
        assert len(self.outbox) == 0
        # Steer generation towards runs that see many kinds of outcome and a fair number of
        # evictions; capped, or it would chase long runs of evicting pushes alone.
        target(float(len(self.outcomes)), label="kinds of push outcome")
        target(float(min(self.outbox.total_dropped, 10)), label="drops, up to 10")
        target(float(min(self.outbox.total_conflated, 10)), label="conflations, up to 10")


def test_outbox_agrees_with_model() -> None:
    OutboxMachine.stats = Counter()
    run_state_machine_as_test(
        OutboxMachine, settings=settings(max_examples=300, stateful_step_count=40, derandomize=True)
    )
    stats = OutboxMachine.stats
    # Not vacuous: every interesting outcome happened, and not only once or twice.
    for name in [
        "accepted",
        "accepted after evicting",
        "new frame dropped",
        "overflow",
        "refused after overflow",
        "conflated",
        "control frame overflow",
        "control frame evicted",
        "measured non-ASCII",
        "pop of several",
        "pop of one oversized",
        "pop filling max_bytes exactly",
    ]:
        assert stats[name] >= 5, (name, stats)
