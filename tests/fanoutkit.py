"""What the tests of the Rust fan-out's write path share (test_fanout, test_memory_budget):
socket pairs for `pyrt._core.FanOut`, and `subscriber`, a WebSocket client on wsproto that
reads only when told, so the frames it is sent wait in the kernel's buffers as for a stalled
client."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, Request, TextMessage


def pair(made: list[tuple[socket.socket, socket.socket]]) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    made.append((a, b))
    return a, b


class ConnectionClosed(Exception):
    pass


class Subscriber:
    """A WebSocket client on wsproto that reads only when told to: while it does not, the
    frames it is sent wait in the kernel's buffers, as for a stalled client."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Any] = []
        self.parts: list[str] = []

    async def next_event(self) -> Any:
        while not self.events:
            data = await self.stream.receive_some(1 << 16)
            self.ws.receive_data(data or None)
            self.events.extend(self.ws.events())
        return self.events.pop(0)

    async def get_message(self) -> str:
        """The next whole text message; raises ConnectionClosed with the close code."""
        while True:
            event = await self.next_event()
            if isinstance(event, CloseConnection):
                raise ConnectionClosed(event)
            if isinstance(event, TextMessage):
                self.parts.append(event.data)
                if event.message_finished:
                    text = "".join(self.parts)
                    self.parts.clear()
                    return text


@asynccontextmanager
async def subscriber(port: int, channel: str) -> AsyncIterator[Subscriber]:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = Subscriber(stream)
        request = Request(host="127.0.0.1", target="/connection/websocket")
        await stream.send_all(client.ws.send(request))
        assert isinstance(await client.next_event(), AcceptConnection)
        join = orjson.dumps({"cmd": "join", "id": 0, "channel": channel}).decode()
        await stream.send_all(client.ws.send(Message(data=join)))
        assert "ok" in orjson.loads(await client.get_message())
        yield client


async def drain(client: Subscriber) -> tuple[list[int], int]:
    """Offsets of every publication left to read, and the close code."""
    offsets: list[int] = []
    with trio.fail_after(30):
        try:
            while True:
                frame = orjson.loads(await client.get_message())
                if frame.get("push") == "pub":
                    offsets.append(frame["offset"])
        except ConnectionClosed as e:
            return offsets, e.args[0].code
