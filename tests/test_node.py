"""The trio Node over real sockets: the front door, the WebSocket transport, shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from pyrt.node.node import Node, NodeConfig, load_transports
from pyrt.plugins.websocket import WebSocketTransport
from pyrt.plugins.wsframe import data_frame
from pyrt.testing import Closed, check_transport


async def start(nursery: trio.Nursery, **config: Any) -> Node:
    node: Node = await nursery.start(Node(NodeConfig(port=0, **config)).run)
    return node


def url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.port}/connection/websocket"


async def request(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    await ws.send_message(orjson.dumps(command).decode())
    return await next_frame(ws)


async def next_frame(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        message = await ws.get_message()
    frame: dict[str, Any] = orjson.loads(message)
    return frame


async def closed_by_server(ws: WebSocketConnection) -> ConnectionClosed:
    """Waits for the server to close `ws` and returns how it closed.

    trio-websocket (0.12) never closes a client's TCP stream when the server closed first:
    aclose() returns early once a close reason is set, and the reader task stops at EOF without
    closing it. We close it here so the test's socket does not leak.
    """
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as e:
            closed = e
    await ws._stream.aclose()
    return closed


async def http_get(node: Node, path: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n".encode()
        )
        data = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_the_websocket_transport_is_an_entry_point_plugin() -> None:
    [transport] = load_transports(["websocket"])
    assert transport.name == "websocket"
    with pytest.raises(LookupError, match="no transport plugin named carrier-pigeon"):
        load_transports(["carrier-pigeon"])


async def test_publish_and_receive_over_websocket(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with open_websocket_url(url(node)) as a, open_websocket_url(url(node)) as b:
        joined = await request(a, cmd="join", id=1, channel="room:1")
        assert joined == {
            "reply": 1,
            "ok": {"channel": "room:1", "offset": 0, "epoch": joined["ok"]["epoch"]},
        }
        assert (await request(b, cmd="join", id=1, channel="room:*"))["ok"] == {"channel": "room:*"}
        ack = await request(a, cmd="publish", id=2, channel="room:1", data={"t": "hi"}, ack=True)
        assert ack["ok"]["offset"] == 1
        pub = await next_frame(b)
        assert pub["push"] == "pub"
        assert (pub["channel"], pub["offset"], pub["data"]) == ("room:1", 1, {"t": "hi"})
        # A server-side publication reaches both.
        node.publish("room:1", "from the server")
        assert (await next_frame(a))["data"] == "from the server"
        assert (await next_frame(b))["data"] == "from the server"


async def test_large_frames_and_the_payload_limit(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with open_websocket_url(url(node)) as a:
        await request(a, cmd="join", id=1, channel="big")
        # Under the 64 KiB payload limit, but the frame out needs a 64-bit length header.
        data = "x" * 65_500
        echo = await request(a, cmd="publish", id=2, channel="big", data=data, ack=True, self=True)
        assert echo["data"] == data
        assert (await next_frame(a))["ok"]["offset"] == 1  # the ack follows the echo
        too_big = await request(a, cmd="publish", id=3, channel="big", data="x" * 70_000)
        assert too_big["error"] == {"code": 413, "message": "data larger than 65536 bytes"}


async def test_a_bad_frame_closes_only_that_connection(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with open_websocket_url(url(node)) as good, open_websocket_url(url(node)) as bad:
        await request(good, cmd="join", id=1, channel="c")
        await bad.send_message("this is not json")
        closed = await closed_by_server(bad)
        assert closed.reason.code == 4000
        assert closed.reason.reason.startswith("frame is not JSON")
        node.publish("c", 1)
        assert (await next_frame(good))["data"] == 1


async def test_healthz_status_page_and_unknown_routes(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with open_websocket_url(url(node)):
        status, body = await http_get(node, "/healthz")
        assert status == 200
        assert orjson.loads(body) == {"status": "ok", "connections": 1, "port": node.port}
    status, body = await http_get(node, "/")
    assert status == 200
    assert b"<title>pyrt</title>" in body
    assert b"/connection/websocket" in body  # the demo chat connects to the hub itself
    node.publish("c", 1)
    status, body = await http_get(node, "/status.json")
    stats = orjson.loads(body)
    assert status == 200
    assert (stats["connections"], stats["channels"], stats["publications"]) == (0, 0, 1)
    status, body = await http_get(node, "/nope")
    assert (status, orjson.loads(body)) == (
        404,
        {"error": {"code": 404, "message": "no route for GET /nope"}},
    )


async def test_graceful_shutdown_tells_clients_to_reconnect() -> None:
    async with trio.open_nursery() as nursery:
        node = await start(nursery)
        async with open_websocket_url(url(node)) as ws:
            await request(ws, cmd="join", id=1, channel="c")
            node.stop()
            notice = await next_frame(ws)
            assert notice == {
                "push": "disconnect",
                "code": 1001,
                "reason": "server shutting down, reconnect",
            }
            assert (await closed_by_server(ws)).reason.code == 1001
    # The node's run() returned: the nursery closed without being cancelled.
    with pytest.raises(OSError, match=r"connect call failed|all attempts to connect"):
        await trio.open_tcp_stream("127.0.0.1", node.port or 0)


def test_hand_built_frames_decode_in_wsproto() -> None:
    from wsproto.frame_protocol import FrameProtocol, Opcode

    for n in (0, 1, 125, 126, 65535, 65536, 200_000):
        reader = FrameProtocol(client=True, extensions=[])
        reader.receive_bytes(data_frame(b"x" * n))
        [frame] = list(reader.received_frames())
        assert (frame.opcode, len(frame.payload), frame.frame_finished) == (Opcode.TEXT, n, True)


class WebSocketKitClient:
    """The conformance kit's view of one WebSocket connection."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, command: Mapping[str, Any]) -> None:
        await self.ws.send_message(orjson.dumps(command).decode())

    async def send_raw(self, frame: bytes) -> None:
        await self.ws.send_message(frame.decode())

    async def receive(self) -> dict[str, Any]:
        try:
            frame: dict[str, Any] = orjson.loads(await self.ws.get_message())
        except ConnectionClosed as e:
            raise Closed(e.reason.code) from None
        return frame


@asynccontextmanager
async def websocket_kit_client(node: Node) -> AsyncIterator[WebSocketKitClient]:
    async with open_websocket_url(url(node)) as ws:
        yield WebSocketKitClient(ws)
    await ws._stream.aclose()  # see closed_by_server


async def test_websocket_transport_passes_the_conformance_kit() -> None:
    await check_transport(WebSocketTransport, websocket_kit_client)
