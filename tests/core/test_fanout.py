"""The Rust fan-out write path (core/engine/src/fanout, bound in core/py/src/fanout.rs) and its
use by the hub.

The first half drives `pyrt._core.FanOut` over real socket pairs: what it writes, what it hands
back, partial writes, descriptor safety and its errors. The second half runs a Node and real
WebSocket clients: order across the direct and the queued path, slow consumers under each
policy, and big frames that the kernel takes only in part.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from fanoutkit import drain, pair, subscriber
from nodekit import until
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    Message,
    Ping,
    Request,
    TextMessage,
)

from pyrt._core import FanOut, Matcher
from pyrt.hub.hub import HubConfig
from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.node.node import Node, NodeConfig
from pyrt.testing import open_auth

# -- FanOut over socket pairs ---------------------------------------------------------------


def read_frames(sock: socket.socket) -> list[bytes]:
    """Every complete WebSocket frame readable now; fails on a partial one."""
    sock.setblocking(False)
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            break
        if not chunk:
            break
        data += chunk
    return list(parse_frames(data))


def parse_frames(data: bytes) -> Iterator[bytes]:
    while data:
        assert data[0] == 0x81, f"not a final text frame: {data[:2]!r}"
        length, start = data[1], 2
        assert length & 0x80 == 0, "server frames are never masked"
        if length == 126:
            (length,), start = struct.unpack("!H", data[2:4]), 4
        elif length == 127:
            (length,), start = struct.unpack("!Q", data[2:10]), 10
        assert len(data) >= start + length, "a frame was cut short"
        yield data[start : start + length]
        data = data[start + length :]


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made: list[tuple[socket.socket, socket.socket]] = []
    yield made
    for a, b in made:
        a.close()
        b.close()


def free_handle(fanout: FanOut, sock: socket.socket) -> int:
    """A new handle with `sock` attached and released: frames go straight to it."""
    handle = fanout.open()
    fanout.attach(handle, sock.fileno())
    assert fanout.release(handle)
    return handle


def test_a_frame_is_written_to_free_attached_sockets_and_the_rest_handed_back(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout, matcher = FanOut(), Matcher()
    socks = [pair(pairs) for _ in range(3)]
    handles = [fanout.open() for _ in range(4)]
    for n, handle in enumerate(handles):
        matcher.add_channel(n, "room")
        fanout.subscribe(n, handle)
    for handle, (ours, _) in zip(handles, socks, strict=False):
        fanout.attach(handle, ours.fileno())
    assert fanout.held(handles[0])  # attached sockets start held: their writer releases them
    for handle in handles[:2]:
        assert fanout.release(handle)
    assert not fanout.release(handles[3])  # not attached: never released
    payload = b'{"push":"pub","data":"' + b"x" * 300 + b'"}'
    slow, woken, written, seconds = fanout.publish(matcher, "room", payload)
    assert sorted(slow) == [handles[2], handles[3]]  # held, and not attached
    assert woken == []
    assert written == 2
    assert seconds >= 0
    for _, theirs in socks[:2]:
        assert read_frames(theirs) == [payload]
    assert read_frames(socks[2][1]) == []
    stats = fanout.stats()
    assert stats["direct_frames"] == 2
    assert stats["direct_bytes"] == 2 * len(payload)
    assert (stats["handles"], stats["attached"], stats["subscriptions"]) == (4, 3, 4)


def test_patterns_reach_a_connection_once_and_skip_leaves_out_the_publisher(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout, matcher = FanOut(), Matcher()
    (a, a_peer), (b, b_peer) = pair(pairs), pair(pairs)
    ha, hb = fanout.open(), fanout.open()
    for handle, sock in ((ha, a), (hb, b)):
        fanout.attach(handle, sock.fileno())
        fanout.release(handle)
    for sub_id, pattern, handle in ((1, "a:*", ha), (2, "a:b", ha), (3, ">", ha), (4, "a:b", hb)):
        matcher.add_channel(sub_id, pattern)
        fanout.subscribe(sub_id, handle)
    assert fanout.publish(matcher, "a:b", b"1")[2] == 2
    assert fanout.publish(matcher, "a:b", b"2", skip=ha)[2] == 1
    assert fanout.unsubscribe(4)
    assert not fanout.unsubscribe(4)
    assert fanout.publish(matcher, "a:b", b"3")[2] == 1
    assert read_frames(a_peer) == [b"1", b"3"]
    assert read_frames(b_peer) == [b"1", b"2"]


def fill(fanout: FanOut, handle: int, payloads: list[bytes]) -> int:
    """Sends `payloads` one by one until the socket stops taking them; returns how many went
    into the kernel or the pending bytes (the last one woke the writer)."""
    for n, payload in enumerate(payloads):
        slow, woken, written = fanout.send([handle], payload)
        assert (slow, written) == ([], 1)
        if woken:
            assert woken == [handle]
            return n + 1
    raise AssertionError("the socket buffer never filled")


def received_frames(theirs: socket.socket, pending: bytes, total: int) -> list[bytes]:
    """The frames of everything the kernel took (total bytes less `pending`), then `pending`."""
    theirs.setblocking(True)
    received = b""
    while len(received) < total - len(pending):
        received += theirs.recv(1 << 16)
    return list(parse_frames(received + pending))


def test_a_full_socket_makes_the_connection_busy_until_its_backlog_is_full(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """The kernel's refusal (or partial take) keeps the rest as pending bytes and wakes the
    writer; later frames are appended behind them, without waking it again, until the
    backlog limit; past it they are handed back (held: the outbox and its policy decide)."""
    fanout = FanOut()
    ours, theirs = pair(pairs)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handle = fanout.open()
    fanout.attach(handle, ours.fileno(), 20_000)
    assert fanout.release(handle)
    payloads = [bytes([65 + n % 26]) * 3000 for n in range(200)]
    sent = fill(fanout, handle, payloads)
    assert fanout.busy(handle)
    assert not fanout.held(handle)
    assert not fanout.release(handle)  # not while bytes are pending
    backlog = fanout.pending_bytes(handle)
    while True:  # appended: taken (written == 1), nobody woken again
        slow, woken, written = fanout.send([handle], payloads[sent])
        if slow:
            break
        assert (woken, written) == ([], 1)
        sent += 1
    assert (slow, woken, written) == ([handle], [], 0)
    assert fanout.pending_bytes(handle) > backlog
    assert fanout.pending_bytes(handle) + 3004 > 20_000  # the next frame did not fit
    assert fanout.held(handle)
    assert fanout.stats()["overflows"] == 1
    assert fanout.send([handle], b"later") == ([handle], [], 0)  # held: handed back
    pending = fanout.take_pending(handle)
    assert fanout.take_pending(handle) == b""
    total = sum(len(p) + 4 for p in payloads[:sent])  # 3000 B: a 4-byte header
    assert received_frames(theirs, pending, total) == payloads[:sent]
    assert fanout.release(handle)  # nothing pending any more
    assert not fanout.busy(handle)
    assert not fanout.held(handle)


def test_frames_for_a_busy_writer_are_appended_in_order(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """While the writer has taken the pending bytes and writes them, frames wait for it:
    the first one wakes it, none is written past it."""
    fanout = FanOut()
    ours, theirs = pair(pairs)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handle = free_handle(fanout, ours)
    payloads = [bytes([97 + n % 26]) * 1500 for n in range(100)]
    sent = fill(fanout, handle, payloads)
    first = fanout.take_pending(handle)  # the writer owns the socket now
    assert fanout.busy(handle)
    assert fanout.pending_bytes(handle) == 0
    assert fanout.send([handle], b"next") == ([], [handle], 1)  # wakes it: more to write
    assert fanout.send([handle], b"after") == ([], [], 1)
    second = fanout.take_pending(handle)
    assert list(parse_frames(second)) == [b"next", b"after"]
    total = sum(len(p) + 4 for p in payloads[:sent]) + len(second)
    assert received_frames(theirs, first + second, total) == [*payloads[:sent], b"next", b"after"]
    assert fanout.release(handle)
    assert fanout.send([handle], b"free") == ([], [], 1)  # written at once again
    assert read_frames(theirs) == [b"free"]


def test_row_events_reach_each_holder_once_with_plain_joins_of_the_table(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """`publish_rows`: the holders of the matched row subscription ids, plus the plain joins
    of the table's channel, each get the frame once; connections without a socket come back
    for their own codec."""
    fanout, matcher = FanOut(), Matcher()
    (a, a_peer), (b, b_peer), (c, c_peer) = pair(pairs), pair(pairs), pair(pairs)
    ha, hb, hc = (free_handle(fanout, sock) for sock in (a, b, c))
    sse = fanout.open()  # no socket: an SSE or Supabase connection
    fanout.subscribe_rows(7, ha)
    fanout.subscribe_rows(8, ha)  # two ids of one event: still one frame
    fanout.subscribe_rows(8, hb)
    fanout.subscribe_rows(8, sse)
    matcher.add_channel(100, "pg:>")
    fanout.subscribe(100, hc)  # a plain (pattern) join of the table's channel
    matcher.add_channel(101, "pg:public:t")
    fanout.subscribe(101, hb)  # hb both holds id 8 and joined plainly: once
    with pytest.raises(ValueError, match="holds row subscription 8 already"):
        fanout.subscribe_rows(8, hb)
    slow, woken, written, seconds = fanout.publish_rows([7, 8], b"e1", matcher, "pg:public:t")
    assert (slow, woken, written) == ([sse], [], 3)
    assert seconds >= 0
    assert fanout.publish_rows([7], b"e2")[:3] == ([], [], 1)  # no channel: ids only
    assert fanout.publish_rows([9], b"e3")[:3] == ([], [], 0)  # nobody holds 9
    assert fanout.unsubscribe_rows(7, ha)
    assert not fanout.unsubscribe_rows(7, ha)
    assert fanout.publish_rows([7, 8], b"e4", matcher, "pg:public:u")[:3] == ([sse], [], 3)
    assert read_frames(a_peer) == [b"e1", b"e2", b"e4"]
    assert read_frames(b_peer) == [b"e1", b"e4"]
    assert read_frames(c_peer) == [b"e1", b"e4"]  # "pg:>" matches both tables
    assert fanout.stats()["row_subscriptions"] == 1
    with pytest.raises(KeyError):
        fanout.subscribe_rows(1, 999)


def test_detach_stops_direct_writes_and_leaves_the_socket_alone(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout = FanOut()
    ours, theirs = pair(pairs)
    handle = free_handle(fanout, ours)
    assert fanout.send([handle], b"direct")[2] == 1
    fanout.detach(handle)
    assert not fanout.attached(handle)
    assert not fanout.release(handle)  # not attached: stays held
    assert fanout.send([handle], b"x") == ([handle], [], 0)  # detached: handed back
    ours.sendall(b"still ours")  # the transport's socket is open: detach closed the fan-out's own
    theirs.settimeout(5)
    expected = b"\x81\x06direct" + b"still ours"
    received = b""
    while len(received) < len(expected):
        received += theirs.recv(100)
    assert received == expected
    fanout.attach(handle, ours.fileno())  # attachable again


def test_a_closed_peer_is_handed_back_not_raised(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout = FanOut()
    ours, theirs = pair(pairs)
    handle = free_handle(fanout, ours)
    theirs.close()
    # Kept for the writer, whose own write then finds the socket broken and ends it.
    assert fanout.send([handle], b"nobody reads this") == ([], [handle], 1)
    assert fanout.stats()["refused_writes"] == 1
    assert fanout.busy(handle)
    assert list(parse_frames(fanout.take_pending(handle))) == [b"nobody reads this"]


def test_corked_frames_go_out_together_at_uncork(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout, matcher = FanOut(), Matcher()
    socks = [pair(pairs) for _ in range(2)]
    handles = []
    for n, (ours, _) in enumerate(socks):
        handle = free_handle(fanout, ours)
        matcher.add_channel(n, "c")
        fanout.subscribe(n, handle)
        handles.append(handle)
    fanout.cork()
    for payload in (b"one", b"two", b"three"):
        assert fanout.publish(matcher, "c", payload)[2] == 2
    for _, theirs in socks:
        assert read_frames(theirs) == []  # gathered, not sent
    assert fanout.uncork() == []
    for _, theirs in socks:
        assert read_frames(theirs) == [b"one", b"two", b"three"]
    assert fanout.send(handles, b"four")[2] == 2  # uncorked: sent at once again
    assert read_frames(socks[0][1]) == [b"four"]


def test_a_connection_held_while_corked_keeps_its_order(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Frames gathered for a connection that the hub then holds (it queued a reply) are
    its oldest bytes: its writer takes them before the queued frames."""
    fanout = FanOut()
    ours, theirs = pair(pairs)
    handle = free_handle(fanout, ours)
    fanout.cork()
    assert fanout.send([handle], b"gathered")[2] == 1
    fanout.hold(handle)  # the hub queues something in its outbox now
    assert fanout.send([handle], b"queued") == ([handle], [], 0)  # to the outbox, after
    assert fanout.uncork() == [handle]  # its writer must run: it has the gathered bytes
    assert read_frames(theirs) == []
    assert list(parse_frames(fanout.take_pending(handle))) == [b"gathered"]
    assert fanout.release(handle)


def test_a_full_socket_at_uncork_leaves_everything_to_the_writer(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout = FanOut()
    ours, theirs = pair(pairs)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    handle = free_handle(fanout, ours)
    payloads = [bytes([97 + n % 26]) * 2000 for n in range(400)]
    fanout.cork()
    for payload in payloads:
        fanout.send([handle], payload)
    assert fanout.uncork() == [handle]  # 800 KB do not fit a 4 KB socket buffer
    assert fanout.busy(handle)
    rest = fanout.take_pending(handle)
    assert received_frames(theirs, rest, sum(len(p) + 4 for p in payloads)) == payloads


def test_frames_gathered_apart_go_out_in_order_past_the_iovec_limit(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """Two connections given alternate frames while corked each hold 1,500 ranges of the
    arena, more than one sendmsg takes (IOV_MAX 1024): both get every frame in order, the
    one with a small socket buffer through its pending bytes."""
    fanout = FanOut()
    (a, a_peer), (b, b_peer) = pair(pairs), pair(pairs)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    ha, hb = free_handle(fanout, a), free_handle(fanout, b)
    payloads = [f"{n:04}".encode() * 10 for n in range(3000)]
    fanout.cork()
    for n, payload in enumerate(payloads):
        assert fanout.send([ha if n % 2 == 0 else hb], payload)[2] == 1
    assert fanout.uncork() == [hb]  # b's buffer took only part
    assert fanout.busy(hb)
    assert not fanout.busy(ha)
    assert read_frames(a_peer) == payloads[0::2]
    rest = fanout.take_pending(hb)
    total = sum(len(p) + 2 for p in payloads[1::2])
    assert received_frames(b_peer, rest, total) == payloads[1::2]


def test_uncork_spreads_its_writes_over_threads(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """With `threads`, a big uncork writes on several threads (256+ connections each): every
    connection gets its frames, once, in order, and each write is counted."""
    fanout, matcher = FanOut(), Matcher()
    assert fanout.threads == 1
    fanout.threads = 4
    with pytest.raises(ValueError, match=r"threads must be 1\.\.64"):
        fanout.threads = 0
    socks = [pair(pairs) for _ in range(1100)]
    for n, (ours, _) in enumerate(socks):
        matcher.add_channel(n, "all" if n % 2 == 0 else "odd")
        fanout.subscribe(n, free_handle(fanout, ours))
    fanout.cork()
    fanout.publish(matcher, "all", b"first")
    fanout.publish(matcher, "odd", b"odd only")
    fanout.publish(matcher, "all", b"last")
    assert fanout.uncork() == []
    for n, (_, theirs) in enumerate(socks):
        want = [b"first", b"last"] if n % 2 == 0 else [b"odd only"]
        assert read_frames(theirs) == want
    stats = fanout.stats()
    assert stats["writes"] == 1100  # one per connection (the evens' two frames are adjacent)
    assert stats["threaded_uncorks"] == 1
    fanout.cork()
    fanout.publish(matcher, "odd", b"550 connections: 2 threads")
    fanout.uncork()
    fanout.threads = 1
    fanout.cork()
    fanout.publish(matcher, "all", b"one thread")
    fanout.uncork()
    assert fanout.stats()["threaded_uncorks"] == 2
    assert read_frames(socks[1][1]) == [b"550 connections: 2 threads"]
    assert read_frames(socks[0][1]) == [b"one thread"]


async def test_publications_made_corked_arrive_in_order(nursery: trio.Nursery) -> None:
    node, url = await start(nursery)
    async with open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"cmd": "join", "id": 0, "channel": "c"}))
        await ws.get_message()
        await trio.testing.wait_all_tasks_blocked()
        with node.corked(), node.corked():  # nests: sent when the outer one ends
            for n in range(50):
                node.publish("c", n)
            assert node.hub.fanout_stats()["direct_frames"] == 50
        with trio.fail_after(5):
            got = [orjson.loads(await ws.get_message())["data"] for _ in range(50)]
    assert got == list(range(50))


def test_bad_handles_and_descriptors_are_errors(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    fanout = FanOut()
    ours, _ = pair(pairs)
    handle = fanout.open()
    with pytest.raises(OSError, match="cannot attach 10000000: Bad file descriptor"):
        fanout.attach(handle, 10_000_000)
    with (
        open(__file__, "rb") as not_a_socket,
        pytest.raises(OSError, match="Socket operation on non-socket"),
    ):
        fanout.attach(handle, not_a_socket.fileno())
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with datagram, pytest.raises(OSError, match="not a stream socket"):
        fanout.attach(handle, datagram.fileno())
    fanout.attach(handle, ours.fileno())
    with pytest.raises(ValueError, match="attached already"):
        fanout.attach(handle, ours.fileno())
    fanout.close(handle)
    for call in (fanout.hold, fanout.release, fanout.take_pending, fanout.detach, fanout.close):
        with pytest.raises(KeyError, match=f"no open handle {handle}"):
            call(handle)
    with pytest.raises(KeyError):
        fanout.send([handle], b"x")
    with pytest.raises(KeyError):
        fanout.subscribe(1, handle)
    assert fanout.open() == handle  # closed handles are reused
    assert not fanout.attached(handle)


# -- the hub's direct path over real WebSockets ---------------------------------------------


async def start(nursery: trio.Nursery, **hub: Any) -> tuple[Node, str]:
    node: Node = await nursery.start(
        Node(NodeConfig(auth=open_auth(), port=0, hub=HubConfig(**hub))).run
    )
    return node, f"ws://127.0.0.1:{node.port}/connection/websocket"


async def test_direct_and_queued_frames_keep_their_order(nursery: trio.Nursery) -> None:
    """Server publications go out directly while the same client's requests put replies in
    its outbox: the client sees every publication once, in offset order, and every reply."""
    node, url = await start(nursery)
    async with open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"cmd": "join", "id": 0, "channel": "c"}))
        assert "ok" in orjson.loads(await ws.get_message())
        offsets: list[int] = []
        replies: list[int] = []
        total = 3000

        async def publish() -> None:
            for n in range(total):
                node.publish("c", n)
                if n % 50 == 0:
                    await trio.sleep(0)  # a checkpoint: the requests interleave

        async def ask() -> None:
            for n in range(1, 200):
                await ws.send_message(orjson.dumps({"cmd": "ping", "id": n}))
                await trio.sleep(0)  # a checkpoint: the publications interleave

        async with trio.open_nursery() as inner:
            inner.start_soon(publish)
            inner.start_soon(ask)
            with trio.fail_after(30):
                while len(offsets) < total or len(replies) < 199:
                    frame = orjson.loads(await ws.get_message())
                    if frame.get("push") == "pub":
                        offsets.append(frame["offset"])
                    elif "reply" in frame:
                        replies.append(frame["reply"])
    assert offsets == list(range(1, total + 1))
    assert replies == list(range(1, 200))
    stats = node.hub.fanout_stats()
    assert stats["direct_frames"] > 0  # the direct path carried some
    assert node.hub.stats.frames_out >= total + 199


async def test_with_direct_writes_off_everything_goes_through_the_outbox(
    nursery: trio.Nursery,
) -> None:
    node, url = await start(nursery, direct_writes=False)
    async with open_websocket_url(url) as ws:
        await ws.send_message(orjson.dumps({"cmd": "join", "id": 0, "channel": "c"}))
        await ws.get_message()
        for n in range(10):
            node.publish("c", n)
        with trio.fail_after(5):
            got = [orjson.loads(await ws.get_message())["data"] for _ in range(10)]
    assert got == list(range(10))
    assert node.hub.fanout_stats()["direct_frames"] == 0
    assert node.hub.fanout_stats()["attached"] == 0


async def test_a_client_that_stops_reading_is_closed_as_slow_and_loses_nothing_before(
    nursery: trio.Nursery,
) -> None:
    """The kernel's buffers, then the connection's fan-out backlog and its outbox (512 KiB
    each here), fill up; the hub closes the connection with 4008. What the client did get is
    every publication up to a point, in order, with no gap: it resumes from there. A reading
    client meanwhile gets them all."""
    node, _ = await start(nursery, outbox_bytes=512 * 1024)
    got: list[int] = []
    payload = "y" * 64 * 1024
    async with subscriber(node.port, "c") as stalled, subscriber(node.port, "c") as reader:
        with trio.fail_after(60):
            for _ in range(400):  # in step with the reader: only `stalled` falls behind
                node.publish("c", payload)
                got.append(orjson.loads(await reader.get_message())["offset"])
        assert got == list(range(1, 401))
        assert node.hub.stats.slow_disconnects == 1
        assert node.hub.fanout_stats()["overflows"] >= 1  # the backlog was full first
        offsets, code = await drain(stalled)
    assert code == 4008
    assert offsets == list(range(1, len(offsets) + 1))
    assert 0 < len(offsets) < 400


async def test_drop_oldest_on_a_full_socket_leaves_gaps_not_disorder(
    nursery: trio.Nursery,
) -> None:
    policies = {"lossy": SlowConsumerPolicy.DROP_OLDEST}
    node, _ = await start(nursery, outbox_bytes=256 * 1024, channel_policies=policies)
    offsets: list[int] = []
    async with subscriber(node.port, "lossy") as stalled:
        for _ in range(300):
            node.publish("lossy", "z" * 32 * 1024)
        # Everything the node does about those publications is done once every task waits
        # (the writers on a full socket): had it disconnected the client, it would have.
        await trio.testing.wait_all_tasks_blocked()
        assert node.hub.stats.slow_disconnects == 0
        assert node.hub.stats.evicted > 0
        with trio.fail_after(30):
            while not offsets or offsets[-1] < 300:
                frame = orjson.loads(await stalled.get_message())
                offsets.append(frame["offset"])
    assert offsets == sorted(set(offsets))  # increasing: gaps, never disorder or repeats
    assert len(offsets) < 300
    assert offsets[-1] == 300  # the newest always arrives


async def test_big_frames_written_in_part_arrive_whole(nursery: trio.Nursery) -> None:
    node, _ = await start(nursery, outbox_bytes=64 * 1024 * 1024, max_payload_bytes=1 << 20)
    payloads = [chr(65 + n % 26) * (300_000 + n) for n in range(60)]
    async with subscriber(node.port, "big") as ws:
        await trio.testing.wait_all_tasks_blocked()  # its writer has handed the socket back
        for payload in payloads:
            node.publish("big", payload)
        stats = node.hub.fanout_stats()
        # The kernel cannot take 18 MB at once: some frame went in part, or was handed back.
        assert stats["partial_writes"] + stats["refused_writes"] > 0
        with trio.fail_after(30):
            got = [orjson.loads(await ws.get_message())["data"] for _ in payloads]
    assert got == payloads


async def test_a_pong_never_lands_inside_a_frame_the_fan_out_wrote_in_part(
    nursery: trio.Nursery,
) -> None:
    """A ping read while the fan-out has written only part of a frame to a client that is
    not reading: the pong goes after the whole frame, so the stream stays valid."""
    big = 8 << 20
    hub = HubConfig(
        max_frame_bytes=2 * big,
        max_payload_bytes=2 * big,
        outbox_bytes=4 * big,
        history_max_bytes=64 * big,
    )
    node: Node = await nursery.start(Node(NodeConfig(auth=open_auth(), port=0, hub=hub)).run)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    ws = WSConnection(ConnectionType.CLIENT)
    events: list[Any] = []

    async def next_event() -> Any:
        while not events:
            data = await stream.receive_some(1 << 16)
            ws.receive_data(data or None)
            events.extend(ws.events())  # a pong inside a frame raises here
        return events.pop(0)

    async with stream:
        await stream.send_all(ws.send(Request(host="x", target="/connection/websocket")))
        assert isinstance(await next_event(), AcceptConnection)
        join = orjson.dumps({"cmd": "join", "id": 1, "channel": "c"}).decode()
        await stream.send_all(ws.send(TextMessage(join)))
        assert orjson.loads((await next_event()).data)["reply"] == 1
        publish = {"cmd": "publish", "id": 2, "channel": "c", "data": "x" * big, "self": True}
        # The publication (echoed to this client) and a ping, in one write; then not reading
        # until the fan-out holds part of the echo.
        await stream.send_all(
            ws.send(TextMessage(orjson.dumps(publish).decode())) + ws.send(Ping(b"p"))
        )
        await until(lambda: node.hub.fanout_stats()["partial_writes"], "a frame written in part")
        got = []
        with trio.fail_after(20):
            while len(got) < 2:
                event = await next_event()
                if isinstance(event, Message) and not event.message_finished:
                    continue
                got.append(type(event).__name__)
        # The echo (no reply: no ack asked), whose first part was out before the ping was
        # read, then the pong.
        assert got == ["TextMessage", "Pong"]


class _Forgetful:
    """A transport that attaches its socket to the fan-out, joins, and returns without ending
    its session (a bug the descriptor rule must survive)."""

    name = "forgetful"

    def __init__(self) -> None:
        self.sessions: list[Any] = []

    def claims(self, request: Any) -> bool:
        return bool(request.path == "/forgetful")

    async def serve(self, ctx: Any, exchange: Any) -> None:
        exchange.detach()
        session = ctx.open_session(idle_timeout=None, pings=False)
        self.sessions.append(session)
        assert session.attach(exchange.stream)
        await session.receive(orjson.dumps({"cmd": "join", "id": 1, "channel": "f"}))


async def test_the_node_ends_sessions_left_attached_before_it_closes_their_socket(
    nursery: trio.Nursery,
) -> None:
    """The descriptor rule, kept by the node: the fan-out borrows an attached socket's
    descriptor, so whatever session a transport leaves attached is ended (and detached)
    before the front door closes the socket; nothing is written to a number the kernel
    reuses afterwards."""
    forgetful = _Forgetful()
    config = NodeConfig(auth=open_auth(), port=0, transports=())
    node: Node = await nursery.start(Node(config, transports=[forgetful]).run)
    with socket.create_connection(("127.0.0.1", node.port)) as client:
        client.sendall(b"GET /forgetful HTTP/1.1\r\nhost: x\r\n\r\n")
        client.settimeout(5)
        # The front door ends the session, then closes the socket.
        await until(lambda: forgetful.sessions and not len(node.hub), "the session to end")
        (session,) = forgetful.sessions
        assert session.closed
        assert node.hub.fanout_stats()["attached"] == 0
        # New sockets may take the closed number now: publishing writes to none of them.
        pairs = [socket.socketpair() for _ in range(8)]
        try:
            node.publish("f", "after")
            for end in (end for both in pairs for end in both):
                end.setblocking(False)
                with pytest.raises(BlockingIOError):
                    end.recv(1)
        finally:
            for a, b in pairs:
                a.close()
                b.close()
