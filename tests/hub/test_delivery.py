"""The pure-Python `MemoryDeliverer` against the Rust fan-out with no socket attached: the same
answers call for call, and a hub on either makes the same frames, closes and counts."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pgoutputkit import row_changes

from pyrt._core import FanOut, Matcher, OutboxBudget
from pyrt.hub.deliverer import Deliverer, MemoryDeliverer, SocketDeliverer, fan_out
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.hub.protocol import CloseCode

CHANNELS = ("a", "b", "a:x", "a:y", "pg:public:items")
PATTERNS = (*CHANNELS, "a:*", "a:>", "pg:public:*", "pg:*:*")


def test_the_rust_fan_out_is_a_socket_deliverer_and_the_memory_one_is_not() -> None:
    rust = fan_out(OutboxBudget(1000), HubConfig(write_threads=3))
    assert isinstance(rust, SocketDeliverer)
    assert isinstance(rust, FanOut)
    assert rust.threads == 3
    memory: Deliverer = MemoryDeliverer()
    assert not isinstance(memory, SocketDeliverer)


def test_a_hub_on_the_memory_deliverer_attaches_no_socket() -> None:
    hub = Hub(deliverer=MemoryDeliverer)
    conn = hub.open(0.0)
    assert hub.attach_socket(conn, 0) is False
    assert not conn.direct
    assert hub.take_wire(conn) == b""
    assert hub.release(conn) is False
    assert hub.fanout_stats()["handles"] == 1


class SideBySide(RuleBasedStateMachine):
    """Every call goes to both deliverers; their answers must be equal (the seconds spent
    matching aside: the memory deliverer reads no clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.rust = FanOut()
        self.memory = MemoryDeliverer()
        self.matcher = Matcher()
        self.sub_ids = itertools.count(1)
        self.handles: list[int] = []
        self.subs: dict[int, int] = {}
        self.row_holders: set[tuple[int, int]] = set()

    def both(self, method: str, *args: Any) -> Any:
        answers = []
        for deliverer in (self.rust, self.memory):
            try:
                answers.append(("ok", getattr(deliverer, method)(*args)))
            except (KeyError, ValueError) as e:
                answers.append(("raised", type(e)))
        rust, memory = answers
        if method.startswith("publish") and rust[0] == "ok":
            rust, memory = (rust[0], rust[1][:3]), (memory[0], memory[1][:3])
        assert rust == memory, (method, args)
        return rust[1]

    @rule()
    def open(self) -> None:
        self.handles.append(self.both("open"))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def close(self, data: st.DataObject) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        self.both("close", handle)
        self.handles.remove(handle)

    @rule(handle=st.integers(0, 6))
    def close_any(self, handle: int) -> None:
        """A handle that may be closed or never opened: both refuse it alike."""
        if handle not in self.handles:
            self.both("close", handle)

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), pattern=st.sampled_from(PATTERNS))
    def subscribe(self, data: st.DataObject, pattern: str) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        sub_id = next(self.sub_ids)
        self.matcher.add_channel(sub_id, pattern)
        self.both("subscribe", sub_id, handle)
        self.subs[sub_id] = handle

    @precondition(lambda self: self.subs)
    @rule(data=st.data())
    def unsubscribe(self, data: st.DataObject) -> None:
        sub_id = data.draw(st.sampled_from(sorted(self.subs)))
        self.matcher.remove(sub_id)
        assert self.both("unsubscribe", sub_id) is True
        del self.subs[sub_id]
        assert self.both("unsubscribe", sub_id) is False

    @precondition(lambda self: self.handles)
    @rule(data=st.data(), row=st.integers(1, 4))
    def subscribe_rows(self, data: st.DataObject, row: int) -> None:
        handle = data.draw(st.sampled_from(self.handles))
        self.both("subscribe_rows", row, handle)  # a second time: ValueError in both
        self.row_holders.add((row, handle))

    @rule(row=st.integers(1, 4), handle=st.integers(0, 6))
    def unsubscribe_rows(self, row: int, handle: int) -> None:
        self.both("unsubscribe_rows", row, handle)
        self.row_holders.discard((row, handle))

    @rule(channel=st.sampled_from(CHANNELS), skip=st.none() | st.integers(0, 6))
    def publish(self, channel: str, skip: int | None) -> None:
        self.both("publish", self.matcher, channel, b'{"x":1}', skip)

    @rule(
        ids=st.lists(st.integers(1, 5), max_size=4),
        channel=st.none() | st.sampled_from(CHANNELS),
    )
    def publish_rows(self, ids: list[int], channel: str | None) -> None:
        matcher = self.matcher if channel is not None else None
        self.both("publish_rows", ids, b"{}", matcher, channel)

    @rule(channel=st.sampled_from(CHANNELS))
    def corked_publish(self, channel: str) -> None:
        self.both("cork")
        self.both("publish", self.matcher, channel, b"{}", None)
        assert self.both("uncork") == []

    @invariant()
    def same_stats(self) -> None:
        self.both("stats")


SideBySide.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
TestMemoryDelivererMatchesTheRustOne = SideBySide.TestCase


# -- a hub on either deliverer ----------------------------------------------------------------

ROW_SPECS = [
    {"table": "items"},
    {"table": "items", "filter": "n=gt.5"},
    {"event": "INSERT", "table": "items", "filter": "id=eq.2"},
]

op = st.one_of(
    st.tuples(st.just("open")),
    st.tuples(st.just("join"), st.integers(0, 5), st.sampled_from(PATTERNS), st.booleans()),
    st.tuples(st.just("join_rows"), st.integers(0, 5), st.sampled_from(range(len(ROW_SPECS)))),
    st.tuples(st.just("leave"), st.integers(0, 5), st.sampled_from(PATTERNS)),
    st.tuples(st.just("publish"), st.integers(0, 5), st.sampled_from(CHANNELS), st.booleans()),
    st.tuples(st.just("track"), st.integers(0, 5), st.sampled_from(CHANNELS)),
    st.tuples(st.just("server_publish"), st.sampled_from(CHANNELS), st.integers(1, 6)),
    st.tuples(st.just("change"), st.integers(0, 9), st.integers(0, 9)),
    st.tuples(st.just("read"), st.integers(0, 5), st.integers(1, 4)),
    st.tuples(st.just("disconnect"), st.integers(0, 5)),
    st.tuples(st.just("tick"), st.floats(0, 30)),
    st.tuples(st.just("corked"), st.sampled_from(CHANNELS), st.integers(1, 4)),
)


class Driver:
    """One hub and its clients; `run` applies an op and returns what came out."""

    def __init__(self, deliverer: Any) -> None:
        epochs = itertools.count(1)
        config = HubConfig(
            history_size=4,
            outbox_messages=6,
            outbox_total_bytes=6_000,
            ping_interval=5,
            idle_timeout=20,
            channel_policies={
                "b": SlowConsumerPolicy.DROP_OLDEST,
                "a:>": SlowConsumerPolicy.CONFLATE,
            },
        )
        self.hub = Hub(
            config,
            replica="n1",
            new_epoch=lambda: f"e{next(epochs)}",
            wall_clock=lambda: 1.7e9,
            timer=lambda: 0.0,
            deliverer=deliverer,
        )
        self.conns: list[str] = []
        self.now = 0.0
        self.rids = itertools.count(1)
        self.counter = itertools.count()

    def conn(self, index: int) -> str | None:
        return self.conns[index % len(self.conns)] if self.conns else None

    def send(self, index: int, command: dict[str, Any]) -> None:
        conn_id = self.conn(index)
        if conn_id is not None:
            frame = orjson.dumps({"id": next(self.rids), **command})
            self.hub.receive(conn_id, frame, self.now)

    def run(self, op: tuple[Any, ...]) -> Any:
        hub = self.hub
        match op:
            case ("open",):
                self.conns.append(hub.open(self.now).id)
            case ("join", index, channel, presence):
                pattern = "*" in channel or ">" in channel
                self.send(
                    index, dict(cmd="join", channel=channel, presence=presence and not pattern)
                )
            case ("join_rows", index, spec):
                self.send(
                    index, dict(cmd="join", channel="pg:public:items", changes=[ROW_SPECS[spec]])
                )
            case ("leave", index, channel):
                self.send(index, {"cmd": "leave", "channel": channel})
            case ("publish", index, channel, echo):
                data = next(self.counter)
                self.send(
                    index,
                    {"cmd": "publish", "channel": channel, "data": data, "self": echo, "key": "k"},
                )
            case ("track", index, channel):
                meta = {"n": next(self.counter)}
                self.send(index, {"cmd": "track", "channel": channel, "meta": meta})
            case ("server_publish", channel, count):
                for _ in range(count):
                    hub.publish(channel, {"n": next(self.counter)}, self.now, key="k")
            case ("change", row_id, n):
                (change,) = row_changes((row_id, "body", n))
                hub.publish_change(change, self.now)
            case ("read", index, count):
                conn_id = self.conn(index)
                if conn_id is not None:
                    return hub.connection(conn_id).outbox.pop(max_frames=count)
            case ("disconnect", index):
                conn_id = self.conn(index)
                if conn_id is not None:
                    hub.disconnect(conn_id, self.now)
                    self.conns.remove(conn_id)
            case ("tick", seconds):
                self.now += seconds
                return hub.tick(self.now)
            case ("corked", channel, count):
                with hub.corked():
                    for _ in range(count):
                        hub.publish(channel, next(self.counter), self.now)
        return None

    def state(self) -> Any:
        hub = self.hub
        ready = sorted(c.id for c in hub.take_ready())
        closing = hub.take_closing()
        outboxes = {
            c: (len(hub.connection(c).outbox), hub.connection(c).outbox.queued_bytes)
            for c in self.conns
        }
        stats = attrs.asdict(hub.stats)
        del stats["match_seconds"]  # a cost measured in time
        return ready, closing, outboxes, stats, hub.outbox_budget.held, hub.fanout_stats()


@settings(max_examples=300)
@given(ops=st.lists(op, max_size=60))
def test_a_hub_on_either_deliverer_does_the_same(ops: list[tuple[Any, ...]]) -> None:
    rust, memory = Driver(fan_out), Driver(MemoryDeliverer)
    for step in [("open",), ("open",), *ops]:
        assert rust.run(step) == memory.run(step), step
        assert rust.state() == memory.state(), step


@pytest.mark.parametrize("deliverer", [fan_out, MemoryDeliverer], ids=["rust", "memory"])
def test_the_driver_reaches_slow_consumers_and_row_events(deliverer: Any) -> None:
    """The comparison above is not vacuous: this script closes a slow consumer, drops frames
    under a drop policy and delivers row events."""
    driver = Driver(deliverer)
    script: list[tuple[Any, ...]] = [
        ("open",),
        ("open",),
        ("open",),
        ("join", 0, "a", True),
        ("join", 1, "b", False),
        ("join_rows", 2, 1),
        ("server_publish", "a", 6),
        ("server_publish", "b", 8),
        ("change", 1, 9),
    ]
    for step in script:
        driver.run(step)
    hub = driver.hub
    assert [code for _, code, _ in hub.take_closing()] == [CloseCode.SLOW]
    assert hub.stats.evicted > 0
    frames = [orjson.loads(f) for f in hub.connection(driver.conns[2]).outbox.pop()]
    assert any("ids" in f for f in frames)
