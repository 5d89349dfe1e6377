"""Memory budgets: history across every channel (`history_max_bytes`), and the bytes queued for
clients across every connection (`outbox_total_bytes`).

Sans-IO first (History and its budget against a model, recovery after eviction, durable
history replayed within the budget; outboxes sharing a budget), then the Rust fan-out's
backlog over socket pairs, then a Node over real sockets.
"""

from __future__ import annotations

import itertools
import socket
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trio.testing
from fanoutkit import drain, pair, subscriber
from httpkit import scrape, value
from hypothesis import given, settings
from hypothesis import strategies as st
from nodekit import until
from trio_websocket import open_websocket_url

from pyrt._core import FanOut, OutboxBudget
from pyrt.hub.history import ENTRY_BYTES, History, Publication, StreamPosition
from pyrt.hub.historylog import HistoryLog
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.outbox import Outbox, PushResult, SlowConsumerPolicy
from pyrt.node.node import Node, NodeConfig
from pyrt.testing import open_auth

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


def test_a_hub_tells_a_client_resuming_from_an_evicted_offset_recovered_false() -> None:
    hub = Hub(HubConfig(history_max_bytes=12_000))  # about four publications of 2 KB
    conn = hub.open(0.0)
    epochs = {}
    for channel in ("a", "a", "a", "b", "b", "b", "b"):
        epochs[channel] = hub.publish(channel, "x" * 2000, 0.0).epoch
    assert hub.history_budget.evicted >= 3
    assert hub.history_budget.bytes <= 12_000
    assert [p.offset for p in hub.history("b", 0.0).publications] == [1, 2, 3, 4]
    for n, (channel, since) in enumerate((("a", 0), ("b", 3))):
        position = {"offset": since, "epoch": epochs[channel]}
        join = {"cmd": "join", "id": n, "channel": channel, "since": position}
        hub.receive(conn.id, orjson.dumps(join), 0.0)
    frames = [orjson.loads(f) for f in conn.outbox.pop()]
    assert frames[0]["ok"] == {
        "channel": "a",
        "offset": 3,
        "epoch": epochs["a"],
        "recovered": False,
    }
    assert frames[1]["ok"]["recovered"] is True
    assert [(f["push"], f["channel"], f["offset"]) for f in frames[2:]] == [("pub", "b", 4)]


def test_the_hub_counts_a_publication_as_its_pub_frame() -> None:
    """Client and server publications count their `pub` frame; a row event counts its frame
    without the subscription ids (not kept in history); publications replayed from a
    durable log count the same (`measure`)."""
    hub = Hub()
    conn = hub.open(0.0)
    hub.receive(conn.id, orjson.dumps({"cmd": "join", "id": 1, "channel": "room"}), 0.0)
    rows = [{"event": "*", "table": "orders"}]
    hub.receive(conn.id, orjson.dumps({"cmd": "join", "id": 2, "changes": rows}), 0.0)
    conn.outbox.pop()
    before = hub.history_budget.bytes
    frame = {"cmd": "publish", "channel": "room", "data": {"text": "hé"}, "self": True}
    hub.receive(conn.id, orjson.dumps(frame), 0.0)
    (pub,) = conn.outbox.pop()
    assert hub.history_budget.bytes - before == len(pub) + ENTRY_BYTES
    before = hub.history_budget.bytes
    publication = hub.publish_truncate("public", "orders", 0.0)
    (change,) = conn.outbox.pop()
    assert orjson.loads(change)["ids"]  # the frame carries ids, history does not
    measured = hub.broker.streams.measure(publication)
    assert hub.history_budget.bytes - before == measured + ENTRY_BYTES
    assert measured == len(hub._native.publication(publication))


@pytest.mark.parametrize("data", [None, {"text": "hi"}, "x" * 100, "x" * 60_000])
def test_what_history_counts_follows_what_it_holds_in_memory(data: Any) -> None:
    """ENTRY_BYTES: a retained publication's objects, measured (tracemalloc) against what
    the budget counts for it, for small and big data."""
    hub = Hub(HubConfig(history_size=1000))
    conn = hub.open(0.0)
    hub.receive(conn.id, orjson.dumps({"cmd": "join", "id": 1, "channel": "room"}), 0.0)
    conn.outbox.pop()
    frame = orjson.dumps({"cmd": "publish", "channel": "room", "data": data})
    hub.receive(conn.id, frame, 0.0)
    count = 200
    tracemalloc.start()
    try:
        memory = tracemalloc.get_traced_memory()[0]
        counted = hub.history_budget.bytes
        for _ in range(count):
            hub.receive(conn.id, frame, 0.0)
        memory = tracemalloc.get_traced_memory()[0] - memory
    finally:
        tracemalloc.stop()
    counted = hub.history_budget.bytes - counted
    # The budget may count more than is held (the safe side: it evicts early), not much less.
    # How much a `null` publication holds varies with the allocator's state: 257 to 317 bytes
    # of its 530 counted, in a full run and alone; hence the wide lower bound.
    assert 0.33 <= memory / counted <= 1.25, (memory / count, counted / count)


# -- durable history ---------------------------------------------------------------------------


def durable_hub(directory: Path, **config: Any) -> tuple[Hub, HistoryLog]:
    """A hub whose history is in `directory` (replayed now)."""
    hub = Hub(HubConfig(publish_requires_join=False, **config))
    log = HistoryLog(directory, segment_bytes=64 * 1024, wall_clock=lambda: WALL)
    hub.attach_history_log(log, 0.0, WALL)
    return hub, log


def retained(hub: Hub) -> dict[str, list[int]]:
    return {c: [p.offset for p in hub.history(c, 0.0).publications] for c in hub.broker.channels()}


def test_durable_history_keeps_to_the_budget_on_disk_and_after_a_restart(tmp_path: Path) -> None:
    budget = 200_000
    hub, log = durable_hub(tmp_path, history_max_bytes=budget)
    conn = hub.open(0.0)
    for n in range(300):
        frame = {"cmd": "publish", "channel": f"c{n % 3}", "data": "x" * 5000}
        hub.receive(conn.id, orjson.dumps(frame), 0.0)
    hub.disconnect(conn.id, 0.0)
    before = retained(hub)
    held = hub.history_budget.bytes
    epochs = {c: hub.history_position(c, 0.0).epoch for c in before}
    assert hub.history_budget.evicted > 0
    assert held <= budget
    # Segments none of whose publications is retained are gone.
    assert sum(p.stat().st_size for p in log.segments) <= budget + 2 * log.segment_bytes
    log.close()

    again, again_log = durable_hub(tmp_path, history_max_bytes=budget)
    assert retained(again) == before  # replayed oldest first, evicted alike
    assert again.history_budget.bytes == held  # counted as when they were published
    assert {c: again.history_position(c, 0.0).epoch for c in before} == epochs
    first = before["c0"][0]
    assert not again.history("c0", 0.0, StreamPosition(first - 2, epochs["c0"])).recovered
    assert again.history("c0", 0.0, StreamPosition(first - 1, epochs["c0"])).recovered
    again_log.close()

    smaller, _ = durable_hub(tmp_path, history_max_bytes=budget // 2)  # a budget cut by config
    assert smaller.history_budget.bytes <= budget // 2
    assert all(retained(smaller)[c] == before[c][-len(retained(smaller)[c]) :] for c in before)


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


# -- over real sockets --------------------------------------------------------------------------


async def start(nursery: trio.Nursery, **hub: Any) -> Node:
    config = NodeConfig(auth=open_auth(), port=0, transports=("websocket",), hub=HubConfig(**hub))
    node: Node = await nursery.start(Node(config).run)
    return node


async def request(ws: Any, **command: Any) -> dict[str, Any]:
    await ws.send_message(orjson.dumps(command))
    while True:
        frame: dict[str, Any] = orjson.loads(await ws.get_message())
        if frame.get("reply") == command["id"]:
            return frame


async def test_history_stays_in_its_budget_and_evicted_offsets_do_not_recover(
    nursery: trio.Nursery,
) -> None:
    """One client floods three channels with 20 KB publications (the attack, scaled down);
    history keeps to its budget, /metrics shows it, and a client resuming from before what
    was kept is told `recovered: false`, while one resuming from within it gets the rest."""
    node = await start(nursery, history_max_bytes=300_000)
    url = f"ws://127.0.0.1:{node.port}/connection/websocket"
    data = "x" * 20_000
    async with open_websocket_url(url) as ws:
        for n in range(3):
            assert "ok" in await request(ws, cmd="join", id=f"j{n}", channel=f"flood:{n}")
        acks = [
            (await request(ws, cmd="publish", id=n, channel=f"flood:{n % 3}", data=data, ack=True))
            for n in range(60)
        ]
    epoch = acks[0]["ok"]["epoch"]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as client:
        samples = await scrape(client)
    assert value(samples, "pyrt_history_bytes") <= 300_000
    assert value(samples, "pyrt_history_bytes") == node.hub.history_budget.bytes
    assert value(samples, "pyrt_history_evictions_total") > 0
    assert value(samples, "pyrt_history_publications") < 60
    async with open_websocket_url(url) as ws:
        lost = await request(
            ws, cmd="join", id=1, channel="flood:0", since={"offset": 1, "epoch": epoch}
        )
        assert lost["ok"] == {
            "channel": "flood:0",
            "offset": 20,
            "epoch": epoch,
            "recovered": False,
        }
        back = {"offset": 18, "epoch": acks[2]["ok"]["epoch"]}
        kept = await request(ws, cmd="join", id=2, channel="flood:2", since=back)
        assert kept["ok"]["recovered"] is True
        with trio.fail_after(5):
            pubs = [orjson.loads(await ws.get_message()) for _ in range(2)]
        assert [(p["channel"], p["offset"], p["data"]) for p in pubs] == [
            ("flood:2", 19, data),
            ("flood:2", 20, data),
        ]


async def test_the_outbox_budget_closes_a_stalled_subscriber_and_frees_what_it_held(
    nursery: trio.Nursery,
) -> None:
    """A client that stops reading fills its kernel buffers, then its backlog, until the
    hub's outbox budget (smaller here than its own `outbox_bytes`) is full: it is closed as
    slow (4008), and what was queued for it is discarded then, not once it has read it.
    What it did get is gap-free; a reading client meanwhile misses nothing."""
    budget = 1024 * 1024
    node = await start(nursery, outbox_total_bytes=budget, outbox_bytes=16 * budget)
    hub = node.hub
    got: list[int] = []
    payload = "y" * 64 * 1024
    async with subscriber(node.port, "c") as stalled, subscriber(node.port, "c") as reader:
        with trio.fail_after(60):
            while not hub.stats.budget_disconnects:
                node.publish("c", payload)
                got.append(orjson.loads(await reader.get_message())["offset"])
                assert hub.outbox_budget.held <= budget + 70_000  # a frame's rest at most
        assert got == list(range(1, len(got) + 1))
        assert hub.stats.slow_disconnects == 1
        assert hub.fanout_stats()["budget_overflows"] >= 1
        # Freed at once: all but what its writer took and is still writing, and the
        # frame after it, which may be written in part.
        stalled_conn = next(c for c in hub._connections.values() if c.closing is not None)
        assert len(stalled_conn.outbox) == 0
        assert hub._out.sockets.pending_bytes(stalled_conn.handle) <= len(payload) + 200
        assert hub.outbox_budget.held < budget // 4
        for _ in range(20):  # the reader carries on
            node.publish("c", payload)
            got.append(orjson.loads(await reader.get_message())["offset"])
        offsets, code = await drain(stalled)
    assert code == 4008
    assert offsets == list(range(1, len(offsets) + 1))
    assert len(offsets) < len(got)
    await until(lambda: not len(hub) and not hub.outbox_budget.held, "the hub to let go")
    assert hub.outbox_budget.held == 0


async def test_under_drop_oldest_the_budget_drops_frames_and_keeps_the_connection(
    nursery: trio.Nursery,
) -> None:
    budget = 512 * 1024
    policies = {"lossy": SlowConsumerPolicy.DROP_OLDEST}
    node = await start(
        nursery, outbox_total_bytes=budget, outbox_bytes=16 * budget, channel_policies=policies
    )
    received: list[int] = []
    async with subscriber(node.port, "lossy") as stalled:
        for _ in range(300):
            node.publish("lossy", "z" * 32 * 1024)
            assert node.hub.outbox_budget.held <= budget + 40_000
        # Everything the node does about those publications is done once every task waits
        # (the writers on a full socket): had it disconnected the client, it would have.
        await trio.testing.wait_all_tasks_blocked()
        assert node.hub.stats.slow_disconnects == 0
        assert node.hub.stats.evicted > 0
        # Everything that was not dropped, until nothing more comes: a drain, not an event
        # (under the global budget even the newest frame may be the one dropped, so there
        # is no last offset to wait for).
        while True:
            with trio.move_on_after(1):
                frame = orjson.loads(await stalled.get_message())
                if frame.get("push") == "pub":  # (the hub's pings come too)
                    received.append(frame["offset"])
                continue
            break
    assert received == sorted(set(received))  # gaps, never disorder or repeats
    assert 0 < len(received) < 300
