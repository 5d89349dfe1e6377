"""The HTTP front door over raw sockets: what the node answers, byte for byte."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import attrs
import orjson
import trio
from httpkit import stream_get

from pyrt._node import Node, NodeConfig

KEY = "k"
TIMEOUT = 0.5
"""`request_timeout` of the nodes here: short, so that deadlines are seen quickly."""


async def start(nursery: trio.Nursery, **config: Any) -> Node:
    config.setdefault("api_keys", (KEY,))
    config.setdefault("request_timeout", TIMEOUT)
    node: Node = await nursery.start(Node(NodeConfig(port=0, **config)).run)
    return node


@attrs.frozen
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


@attrs.frozen
class Conversation:
    replies: list[Reply]
    rest: bytes
    """Bytes after the last whole response (none, normally)."""
    seconds: float
    """From the first byte sent to the server's close."""


def parse(data: bytes) -> tuple[list[Reply], bytes]:
    """Responses with a content-length, one after the other, and what follows them."""
    replies = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        replies.append(Reply(int(status), reason, headers, data[:length]))
        data = data[length:]
    return replies, data


async def converse(
    node: Node, *pieces: bytes, pause: float = 0.0, within: float = 5.0
) -> Conversation:
    """Sends `pieces` (`pause` seconds apart, for as long as the server reads) and reads
    everything until the server closes the connection; fails if it has not within `within`."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        started = trio.current_time()
        received = bytearray()

        async def read() -> None:
            with trio.fail_after(within):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break  # reset: the server closed with our bytes unread
                    if not chunk:
                        break
                    received.extend(chunk)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                for i, piece in enumerate(pieces):
                    if i and pause:
                        await trio.sleep(pause)
                    await stream.send_all(piece)
            except trio.BrokenResourceError:
                pass  # the server closed while we were still sending
            await trio.sleep_forever()
        seconds = trio.current_time() - started
    replies, rest = parse(bytes(received))
    return Conversation(replies, rest, seconds)


# -- status lines --------------------------------------------------------------------------------


async def test_every_status_line_has_its_reason_phrase(nursery: trio.Nursery) -> None:
    node = await start(nursery, cors_origins=("https://app.test",))
    seen = {}
    requests = {
        200: b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        204: b"OPTIONS /api/publish HTTP/1.1\r\nhost: x\r\norigin: https://app.test\r\n"
        b"connection: close\r\n\r\n",
        400: b"GET /connection/websocket HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
        b"connection: upgrade\r\n\r\n",  # no sec-websocket-key
        401: b"GET /api/channels HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        404: b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        405: b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    }
    for request in requests.values():
        conversation = await converse(node, request)
        [reply] = conversation.replies
        seen[reply.status] = reply.reason
    assert seen == {status: HTTPStatus(status).phrase for status in requests}
    # The bad upgrade's 400 has pyrt's error body too.
    conversation = await converse(node, requests[400])
    body = orjson.loads(conversation.replies[0].body)
    assert body["error"]["message"].startswith("bad websocket upgrade")
    # A streamed response, and the WebSocket switch (made by wsproto).
    async with stream_get(node, "/connection/sse?channel=c") as response:
        assert response.status == 200
    async with await trio.open_tcp_stream("127.0.0.1", node.port or 0) as stream:
        upgrade = (
            b"GET /connection/websocket HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
            b"connection: upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        await stream.send_all(upgrade)
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


async def test_a_streamed_status_line_has_its_reason_phrase(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", node.port or 0) as stream:
        await stream.send_all(b"GET /connection/sse?channel=c HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
