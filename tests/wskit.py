"""WebSocket clients for pyrt's native protocol, for the tests (trio-websocket, under trio).

`request` and `next_frame` speak JSON frames; `closed` waits for the server to end a
connection; `websocket_kit_client` is the conformance kit's view of one connection
(`pyrt.testing.TransportClient`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from trio_websocket import CloseReason, ConnectionClosed, WebSocketConnection, open_websocket_url

from pyrt.node.node import Node
from pyrt.testing import Closed


def ws_url(node: Node, path: str = "/connection/websocket") -> str:
    return f"ws://127.0.0.1:{node.port}{path}"


async def request(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    """Sends one command; the next frame (with an `id`, its reply: the server answers in
    order, so a test that expects no push in between may read it this way)."""
    await ws.send_message(orjson.dumps(command).decode())
    return await next_frame(ws)


async def next_frame(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        message = await ws.get_message()
    frame: dict[str, Any] = orjson.loads(message)
    return frame


async def closed(ws: WebSocketConnection) -> CloseReason:
    """Reads until the server closes `ws`; how it closed (`.code`, `.reason`).

    trio-websocket (0.12) never closes a client's TCP stream when the server closed first:
    aclose() returns early once a close reason is set, and the reader task stops at EOF
    without closing it. This closes it, so the test's socket does not leak.
    """
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as e:
            reason = e.reason
    await ws._stream.aclose()
    return reason


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
    async with open_websocket_url(ws_url(node)) as ws:
        yield WebSocketKitClient(ws)
    await ws._stream.aclose()  # see `closed`
