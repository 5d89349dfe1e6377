"""Failure isolation over real sockets: no input from one client, and no bug in one plugin,
ends the node or touches another client (docs/architecture.md, "Failure isolation";
docs/security.md).

Each test runs a node in the test's nursery: an exception that escaped a connection would
reach the nursery and fail the test. Each ends by checking that a second, well-behaved
client still gets its publication back.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import struct
from typing import Any

import httpx
import orjson
import pytest
import trio
from httpkit import open_sse
from nodekit import StartNode, until
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from wskit import next_frame, ws_url

from pyrt._json import MAX_DEPTH
from pyrt.hub.hub import Connection, Hub, HubConfig
from pyrt.hub.protocol import Command, Publish
from pyrt.node.http import HttpExchange, HttpRequest
from pyrt.node.node import Node
from pyrt.plugins.websocket import WebSocketTransport

KEY = "k"


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def deep_text(depth: int) -> str:
    return "[" * depth + "1" + "]" * depth


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(start_node, api_keys=(KEY,), transports=("websocket", "supabase"))


async def request(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    # The standard library's encoder: orjson refuses what these tests send (too deep).
    await ws.send_message(json.dumps(command))
    return await next_frame(ws)


async def round_trip(node: Node, channel: str = "alive") -> None:
    """A second client joins, publishes with echo and gets its publication back."""
    async with open_websocket_url(ws_url(node)) as ws:
        assert (await request(ws, cmd="join", id=1, channel=channel))["reply"] == 1
        reply = await request(
            ws, cmd="publish", id=2, channel=channel, data="hi", ack=True, **{"self": True}
        )
        frames = [reply, await next_frame(ws)]
        assert any(f.get("reply") == 2 and "ok" in f for f in frames)
        assert any(f.get("push") == "pub" and f["data"] == "hi" for f in frames)


async def scrape(node: Node) -> str:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=5) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    return response.text


def sample(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    wanted = f"{name}{{{label_text}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no sample {wanted}")


async def close_code(ws: WebSocketConnection) -> int | None:
    """Reads until the server closes; its close code."""
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as e:
            code = e.reason.code
    # trio-websocket leaves the socket of a connection the server closed open.
    await ws._stream.aclose()
    return code


# -- deep JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        {"cmd": "publish", "channel": "room", "data": nested(255)},
        {"cmd": "track", "channel": "room", "meta": {"a": nested(255)}},
        {"cmd": "mutate", "channel": "room", "key": "k", "op": "set", "value": nested(255)},
        {"cmd": "join", "channel": "room", "since": {"offset": 0, "epoch": nested(255)}},
    ],
    ids=["publish", "track", "mutate", "join"],
)
async def test_deep_json_in_a_command_is_refused_and_the_connection_stays(
    start_node: StartNode, command: dict[str, Any]
) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as ws:
        assert (await request(ws, cmd="join", id=1, channel="room"))["reply"] == 1
        error = await request(ws, id=2, **command)
        while error.get("reply") != 2:  # the join's presence push may come first
            error = await next_frame(ws)
        assert error["error"] == {
            "code": 400,
            "message": f"JSON nested deeper than {MAX_DEPTH} levels",
        }
        # The limit is the limit: one level less is taken.
        ok = await request(
            ws, cmd="publish", id=3, channel="room", data=nested(MAX_DEPTH - 1), ack=True
        )
        assert ok == {"reply": 3, "ok": ok["ok"]}, ok
    await round_trip(node)


async def test_json_too_deep_to_parse_gets_an_error_push_and_the_connection_stays(
    start_node: StartNode,
) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as ws:
        frame = '{"cmd": "publish", "id": 1, "channel": "room", "data": ' + deep_text(5000) + "}"
        await ws.send_message(frame)
        error = await next_frame(ws)
        assert error["push"] == "error"
        assert error["code"] == 400
        assert "nested deeper" in error["message"]
        assert (await request(ws, cmd="ping", id=2)) == {"reply": 2, "ok": {}}
    await round_trip(node)


async def test_deep_json_over_an_sse_session_and_the_rest_api(start_node: StartNode) -> None:
    node = await start_node(transports=("websocket", "sse", "supabase"))
    async with open_sse(node, {"channel": "room"}) as sse:
        body = json.dumps({"cmd": "publish", "id": 7, "channel": "room", "data": nested(255)})
        await sse.send_raw(body.encode())
        with trio.fail_after(5):
            frame = await sse.receive()
            while frame.get("reply") != 7:
                frame = await sse.receive()
        assert frame["error"]["code"] == 400
        await sse.send({"cmd": "ping", "id": 8})
        with trio.fail_after(5):
            assert await sse.receive() == {"reply": 8, "ok": {}}
    headers = {"authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=5) as http:
        for path, body in [
            ("/api/publish", {"channel": "room", "data": nested(255)}),
            (
                "/api/broadcast",
                {"messages": [{"topic": "t", "event": "e", "payload": nested(255)}]},
            ),
        ]:
            response = await http.post(path, content=json.dumps(body), headers=headers)
            assert response.status_code == 400, (path, response.text)
            assert "nested deeper than" in response.text
    await round_trip(node)


async def test_deep_json_in_a_supabase_broadcast_is_refused_and_the_socket_stays(
    start_node: StartNode,
) -> None:
    node = await start_node()
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    async with open_websocket_url(url) as ws:

        async def send(**message: Any) -> dict[str, Any]:
            await ws.send_message(json.dumps(message))
            while True:
                reply = await next_frame(ws)
                if reply.get("ref") == message["ref"]:
                    return reply

        join = await send(topic="realtime:room", event="phx_join", payload={}, ref="1")
        assert join["payload"]["status"] == "ok"
        payload = {"type": "broadcast", "event": "e", "payload": nested(255)}
        refused = await send(topic="realtime:room", event="broadcast", payload=payload, ref="2")
        assert refused["payload"] == {
            "status": "error",
            "response": {"reason": f"InvalidMessage: JSON nested deeper than {MAX_DEPTH} levels"},
        }
        beat = await send(topic="phoenix", event="heartbeat", payload={}, ref="3")
        assert beat["payload"]["status"] == "ok"
    await round_trip(node)


# -- a control frame, then a reset ---------------------------------------------------------


def _handshake(port: int, path: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize(
    ("path", "frame"),
    [
        ("/connection/websocket", _masked(0x9, b"ping")),
        ("/connection/websocket", _masked(0x8, struct.pack("!H", 1000))),
        (f"/realtime/v1/websocket?apikey={KEY}", _masked(0x9, b"ping")),
        (
            f"/realtime/v1/websocket?apikey={KEY}",
            _masked(0x1, b'{"topic":"phoenix","event":"heartbeat","payload":{},"ref":"1"}'),
        ),
    ],
    ids=["ws-ping", "ws-close", "supabase-ping", "supabase-heartbeat"],
)
async def test_a_reset_after_a_control_frame_ends_only_that_connection(
    start_node: StartNode, path: str, frame: bytes
) -> None:
    node = await start_node()
    port = node.port
    assert port is not None

    def attack() -> None:
        for _ in range(30):
            sock = _handshake(port, path)
            sock.sendall(frame * 50)  # replies to write, and the peer gone before they are
            _reset(sock)

    await trio.to_thread.run_sync(attack)
    await round_trip(node)
    await until(lambda: len(node.hub) == 0, "the hub to forget the reset connections")
    assert sample(await scrape(node), "pyrt_connection_errors_total", plugin="websocket") == 0


# -- bugs: a broken plugin, a broken hub ---------------------------------------------------


class BrokenTransport:
    """A transport plugin that fails in every way it can: the node must outlive it."""

    name = "broken"

    def claims(self, request: HttpRequest) -> bool:
        return request.path.startswith("/broken/")

    async def serve(self, node: Node, exchange: HttpExchange) -> None:
        how = exchange.request.path.removeprefix("/broken/")
        if how == "raise":
            raise RuntimeError("a bug before responding")
        if how == "group":
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_fail_soon)
                await trio.sleep_forever()
        if how == "midway":
            await exchange.start_stream(200, "text/plain")
            await exchange.send(b"partial")
            raise KeyError("a bug halfway through a response")
        if how == "upgraded":
            exchange.detach()
            await exchange.stream.send_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
            raise ValueError("a bug after taking over the connection")
        raise AssertionError(how)


async def raw_get(node: Node, path: str) -> bytes:
    """Everything the server sends for one GET, until it closes the connection."""
    assert node.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def _fail_soon() -> None:
    await trio.lowlevel.checkpoint()  # once the plugin's own task waits
    raise ZeroDivisionError("a bug in a task of the plugin's own")


async def test_a_broken_transport_plugin_cannot_stop_the_node(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node(transports=[WebSocketTransport(), BrokenTransport()])
    caplog.set_level(logging.ERROR, logger="pyrt.node")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=5) as http:
        for _ in range(3):
            for how in ("raise", "group"):
                response = await http.get(f"/broken/{how}")
                assert response.status_code == 500
                assert response.json() == {
                    "error": {"code": 500, "message": "internal server error"}
                }
            for how in ("midway", "upgraded"):
                # The response had begun: the connection is closed, nothing more is sent.
                answer = await raw_get(node, f"/broken/{how}")
                assert answer.startswith((b"HTTP/1.1 200 ", b"HTTP/1.1 101 ")), answer
        metrics = await scrape(node)
    assert sample(metrics, "pyrt_connection_errors_total", plugin="broken") == 12
    assert sample(metrics, "pyrt_connection_errors_total", plugin="websocket") == 0
    failures = [r for r in caplog.records if r.name == "pyrt.node"]
    assert len(failures) == 12
    assert all(r.exc_info and r.message.startswith("broken: ") for r in failures)
    kinds = {type(r.exc_info[1]).__name__ for r in failures if r.exc_info}
    assert {"RuntimeError", "KeyError", "ValueError"} <= kinds
    await round_trip(node)


class BrokenHub(Hub):
    """A hub with a bug: publishing on `boom` raises."""

    def handle(
        self, conn: Connection, command: Command, now: float, verdict: bool | None = None
    ) -> None:
        if isinstance(command, Publish) and command.channel.endswith("boom"):
            raise RuntimeError("a bug in the hub")
        super().handle(conn, command, now, verdict)


async def test_a_bug_while_handling_a_frame_closes_that_connection_with_1011(
    start_node: StartNode, caplog: pytest.LogCaptureFixture
) -> None:
    node = await start_node(hub=BrokenHub(HubConfig()))
    caplog.set_level(logging.ERROR, logger="pyrt.node")
    async with open_websocket_url(ws_url(node)) as bystander:
        assert (await request(bystander, cmd="join", id=1, channel="boom"))["reply"] == 1
        async with open_websocket_url(ws_url(node)) as ws:
            await request(ws, cmd="join", id=1, channel="boom")
            await ws.send_message(
                orjson.dumps({"cmd": "publish", "channel": "boom", "data": 1}).decode()
            )
            assert await close_code(ws) == 1011
        assert (await request(bystander, cmd="ping", id=2)) == {"reply": 2, "ok": {}}
    assert sample(await scrape(node), "pyrt_connection_errors_total", plugin="websocket") == 1
    (record,) = [r for r in caplog.records if r.name == "pyrt.node"]
    assert record.exc_info is not None
    assert "a bug in the hub" in str(record.exc_info[1])
    await round_trip(node)


async def test_a_bug_in_the_supabase_dialect_closes_that_socket_with_1011(
    start_node: StartNode,
) -> None:
    node = await start_node(hub=BrokenHub(HubConfig()))
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    async with open_websocket_url(url) as ws:
        join = {"topic": "realtime:boom", "event": "phx_join", "payload": {}, "ref": "1"}
        await ws.send_message(orjson.dumps(join).decode())
        broadcast = {"type": "broadcast", "event": "e", "payload": {}}
        message = {"topic": "realtime:boom", "event": "broadcast", "payload": broadcast, "ref": "2"}
        await ws.send_message(orjson.dumps(message).decode())
        assert await close_code(ws) == 1011
    assert sample(await scrape(node), "pyrt_connection_errors_total", plugin="supabase") == 1
    await round_trip(node)


# -- peers that stop reading ---------------------------------------------------------------


async def _stalled_client(port: int, join: bytes) -> socket.socket:
    sock = await trio.to_thread.run_sync(_handshake, port, "/connection/websocket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(_masked(0x1, join))
    return sock


async def test_a_client_that_never_reads_is_gone_within_the_write_deadline(
    start_node: StartNode,
) -> None:
    # Slow-consumer close (4008) with a peer that reads nothing: its writer cannot even send
    # the close frame. It must still be gone, descriptor and memory, in bounded time.
    node = await start_node(hub=HubConfig(write_timeout=0.5, outbox_bytes=256 * 1024))
    assert node.port is not None
    sock = await _stalled_client(node.port, b'{"cmd": "join", "channel": "flood"}')
    await until(lambda: node.hub.channels().get("flood"), "the join")
    payload = "x" * 60_000
    for _ in range(200):
        node.publish("flood", payload)
        await trio.sleep(0)  # a checkpoint: the writer runs between publications
    # 4008 then at most write_timeout for the close frame, then the 2 s close wait.
    await until(lambda: len(node.hub) == 0, "the slow consumer's end")
    metrics = await scrape(node)
    assert sample(metrics, "pyrt_slow_disconnects_total") == 1
    assert sample(metrics, "pyrt_write_timeouts_total", transport="websocket") == 1
    sock.close()
    await round_trip(node)


async def test_an_idle_client_that_never_reads_is_gone_too(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(write_timeout=0.5, ping_interval=0.2, idle_timeout=0.6))
    assert node.port is not None
    sock = await _stalled_client(node.port, b'{"cmd": "join", "channel": "flood"}')
    await until(lambda: node.hub.channels().get("flood"), "the join")
    for _ in range(100):  # fill its buffers; the outbox keeps less than its limit
        node.publish("flood", "x" * 20_000)
        await trio.sleep(0)  # a checkpoint: the writer runs between publications
    await until(lambda: len(node.hub) == 0, "the idle client's end")
    sock.close()


async def test_a_join_may_carry_at_most_64_row_subscriptions(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as ws:
        changes = [{"table": "t", "filter": f"id=eq.{i}"} for i in range(65)]
        error = await request(ws, cmd="join", id=1, changes=changes)
        assert error["error"] == {
            "code": 400,
            "message": "'changes' may hold at most 64 entries, got 65",
        }
        ok = await request(ws, cmd="join", id=2, changes=changes[:64])
        assert len(ok["ok"]["changes"]) == 64
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    async with open_websocket_url(url) as ws:
        bindings = [{"event": "*", "schema": "public", "table": "t"}] * 65
        join = {"config": {"postgres_changes": bindings}}
        reply = await request(ws, topic="realtime:r", event="phx_join", payload=join, ref="1")
        reason = reply["payload"]["response"]["reason"]
        assert (
            reason
            == "InvalidJoinPayload: 'config.postgres_changes' may hold at most 64 entries, got 65"
        )
    await round_trip(node)


# -- found by the front-door fuzzer --------------------------------------------------------


async def raw_exchange(node: Node, data: bytes) -> bytes:
    """Sends `data` on a new connection; everything the server sends until it closes."""
    assert node.port is not None
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    async with stream:
        await stream.send_all(data)
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some():
                received += chunk
    return received


async def test_head_requests_get_headers_only(start_node: StartNode) -> None:
    node = await start_node()
    answer = await raw_exchange(
        node, b"HEAD /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found")  # /healthz answers GET only
    assert body == b""
    smuggled = (
        b"HEAD / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    head, _, body = (await raw_exchange(node, smuggled)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert body == b""
    # Too large, but whole in one read, so h11 parsed it as a HEAD (the front door fuzzer's
    # find): a 431 without a body, not a bug in the front door.
    big = b"HEAD / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 17_000 + b"\r\n\r\n"
    head, _, body = (await raw_exchange(node, big)).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 Request Header Fields Too Large")
    assert body == b""
    assert sample(await scrape(node), "pyrt_connection_errors_total", plugin="websocket") == 0
    assert "front door" not in node.metrics.connection_errors
    await round_trip(node)


@pytest.mark.parametrize("path", ["/connection/websocket", f"/realtime/v1/websocket?apikey={KEY}"])
async def test_a_ping_after_the_servers_close_is_not_answered(
    start_node: StartNode, path: str
) -> None:
    node = await start_node()
    assert node.port is not None
    sock = await trio.to_thread.run_sync(_handshake, node.port, path)
    try:
        # A frame that is not JSON: the server closes (4000); the client's pings cross it.
        sock.sendall(_masked(0x1, b"not json") + _masked(0x9, b"keepalive") * 3)
        received = b""
        with trio.fail_after(5):
            while chunk := await trio.to_thread.run_sync(sock.recv, 4096):
                received += chunk
        frames = []
        while received:
            size = received[1] & 0x7F
            frames.append((received[0], received[2 : 2 + size]))
            received = received[2 + size :]
        # Pongs for pings read before the close was due (written around it), one close.
        closes = [payload for opcode, payload in frames if opcode == 0x88]
        assert {opcode for opcode, _ in frames} <= {0x8A, 0x88}, frames
        assert [struct.unpack("!H", c[:2])[0] for c in closes] == [4000]
    finally:
        sock.close()
    # The front door counts an error before it lets the connection go (`_admit`).
    await until(lambda: not node.connections_per_address.open, "the server to let go")
    assert not node.metrics.connection_errors
    await round_trip(node)


async def test_a_supabase_join_in_the_same_packet_as_the_upgrade(start_node: StartNode) -> None:
    node = await start_node()
    assert node.port is not None
    join = b'{"topic":"realtime:r","event":"phx_join","payload":{},"ref":"1"}'
    request = (
        f"GET /realtime/v1/websocket?apikey={KEY}&vsn=1.0.0 HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode() + _masked(0x1, join)
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while b'"status":"ok"' not in received:
                chunk = await stream.receive_some()
                assert chunk, received
                received += chunk
    assert received.startswith(b"HTTP/1.1 101 ")
    assert not node.metrics.connection_errors
    await round_trip(node)


async def test_a_ping_in_the_same_packet_as_the_upgrade_is_answered(start_node: StartNode) -> None:
    node = await start_node()
    assert node.port is not None
    request = (
        b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    ) + _masked(0x9, b"early")
    stream = await trio.open_tcp_stream("127.0.0.1", node.port)
    async with stream:
        await stream.send_all(request)
        received = b""
        with trio.fail_after(5):
            while b"\x8a\x05early" not in received:
                chunk = await stream.receive_some()
                assert chunk, received
                received += chunk
    await round_trip(node)
