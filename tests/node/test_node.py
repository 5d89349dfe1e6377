"""The trio Node over real sockets: the front door, the WebSocket transport, shutdown."""

from __future__ import annotations

import orjson
import pytest
import trio
from nodekit import StartNode
from trio_websocket import open_websocket_url
from wskit import closed, next_frame, request, websocket_kit_client, ws_url

from pyrt.node.node import Node, load_transports
from pyrt.plugins.websocket import WebSocketTransport
from pyrt.plugins.wsframe import data_frame
from pyrt.testing import check_transport


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


async def test_publish_and_receive_over_websocket(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as a, open_websocket_url(ws_url(node)) as b:
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


async def test_large_frames_and_the_payload_limit(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as a:
        await request(a, cmd="join", id=1, channel="big")
        # Under the 64 KiB payload limit, but the frame out needs a 64-bit length header.
        data = "x" * 65_500
        echo = await request(a, cmd="publish", id=2, channel="big", data=data, ack=True, self=True)
        assert echo["data"] == data
        assert (await next_frame(a))["ok"]["offset"] == 1  # the ack follows the echo
        too_big = await request(a, cmd="publish", id=3, channel="big", data="x" * 70_000)
        assert too_big["error"] == {"code": 413, "message": "data larger than 65536 bytes"}


async def test_a_bad_frame_closes_only_that_connection(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as good, open_websocket_url(ws_url(node)) as bad:
        await request(good, cmd="join", id=1, channel="c")
        await bad.send_message("this is not json")
        reason = await closed(bad)
        assert reason.code == 4000
        assert reason.reason.startswith("frame is not JSON")
        node.publish("c", 1)
        assert (await next_frame(good))["data"] == 1


async def test_healthz_status_page_and_unknown_routes(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)):
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


async def test_graceful_shutdown_tells_clients_to_reconnect(start_node: StartNode) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery=nursery)
        async with open_websocket_url(ws_url(node)) as ws:
            await request(ws, cmd="join", id=1, channel="c")
            node.stop()
            notice = await next_frame(ws)
            assert notice == {
                "push": "disconnect",
                "code": 1001,
                "reason": "server shutting down, reconnect",
            }
            assert (await closed(ws)).code == 1001
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


async def test_websocket_transport_passes_the_conformance_kit() -> None:
    await check_transport(WebSocketTransport, websocket_kit_client)
