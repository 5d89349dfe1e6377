"""The WebSocket link: RFC 6455 over a trio stream, with wsproto doing the protocol.

Not on trio-websocket: that link (in this file's history) took about 1.8 times the CPU per
received message, and 30-65% fewer messages per second into one client, for the same
behaviour. Its reader task hands every message to the caller over a memory channel, one more
trip through trio's scheduler per message; here the reader parses in the caller's task.
`benches/client_link.py` measures both.
"""

from __future__ import annotations

import collections
import contextlib
import ssl
import urllib.parse
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ._link import Link, LinkClosed, decode


@asynccontextmanager
async def open_websocket_link(
    url: str, *, open_timeout: float, stall_timeout: float, token: str | None = None
) -> AsyncGenerator[WebSocketLink, None]:
    """Connects to `url` (ws:// or wss://) and upgrades, each step within `open_timeout`.
    With a `token`, it is sent in a `connect` command, the first frame (not in the URL,
    where proxies and servers log it), and the link is up once the server accepted it."""
    with trio.fail_after(open_timeout):
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "", parts.port
        if parts.scheme == "wss":
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port or 443, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port or 80)
    async with stream:
        link = WebSocketLink(stream, stall_timeout)
        with trio.fail_after(open_timeout):
            await link.open(url)
            if token is not None:
                await link.connect(token)
        try:
            yield link
        finally:
            link.close()


class WebSocketLink(Link):
    """RFC 6455 over a trio stream, with wsproto doing the protocol (as the server does)."""

    transport = "websocket"

    def __init__(self, stream: trio.abc.Stream, stall_timeout: float) -> None:
        super().__init__(stall_timeout)
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: collections.deque[str | bytes] = collections.deque()
        self._parts: list[Any] = []
        self._writing = trio.Lock()
        self.identity: dict[str, Any] | None = None
        """The server's reply to `connect` (client, user, expires_in), once it came."""

    async def open(self, url: str) -> None:
        """The opening handshake; frames that arrive with the answer are kept."""
        parts = urllib.parse.urlsplit(url)
        await self._write(self.ws.send(Request(host=parts.netloc, target=parts.path or "/")))
        accepted = False
        refused: int | None = None
        body = b""
        while not accepted:
            for event in await self._events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    refused = event.status_code
                    if not event.has_body:
                        raise LinkClosed(f"websocket upgrade refused: {refused}", refused)
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        text = body[:200].decode(errors="replace")
                        raise LinkClosed(f"websocket upgrade refused: {refused} {text}", refused)
                else:
                    await self._handle(event)

    async def connect(self, token: str) -> None:
        """Sends the `connect` command and waits for its reply. A refused token closes the
        connection (4401): `LinkClosed` with that code."""
        await self._send(b'{"cmd":"connect","id":"connect","token":%b}' % orjson.dumps(token))
        while True:
            frame = await self.receive()
            if frame.get("reply") != "connect":
                continue  # a ping push: nothing else comes before the reply
            if "error" in frame:
                error = frame["error"]
                code = error.get("code")
                # 401 cannot come for `connect` (a refused token closes), but a server that
                # answers with an error has not taken the token either.
                raise LinkClosed(
                    f"connect refused: {code} {error.get('message')}",
                    4401 if code == 401 else code,
                )
            self.identity = frame.get("ok")
            return

    async def _write(self, data: bytes) -> None:
        async with self._writing:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise LinkClosed(f"websocket write failed: {e!r}") from None

    async def _events(self) -> list[Any]:
        try:
            data = await self.stream.receive_some(64 * 1024)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkClosed(f"websocket read failed: {e!r}") from None
        if not data:
            raise LinkClosed("the server closed the connection")
        try:
            self.ws.receive_data(bytes(data))
            return list(self.ws.events())
        except RemoteProtocolError as e:
            raise LinkClosed(f"websocket protocol error: {e}") from None

    async def _handle(self, event: Any) -> None:
        if isinstance(event, (TextMessage, BytesMessage)):
            self._parts.append(event.data)
            if event.message_finished:
                empty: str | bytes = "" if isinstance(event, TextMessage) else b""
                self.messages.append(empty.join(self._parts))
                self._parts.clear()
        elif isinstance(event, Ping):
            await self._write(self.ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            closed = LinkClosed(f"websocket closed: {event.code} {event.reason}", int(event.code))
            self.closed_by = closed  # known before the answer is written (an await)
            with contextlib.suppress(LocalProtocolError, LinkClosed):
                await self._write(self.ws.send(event.response()))
            raise closed

    async def _send(self, frame: bytes) -> None:
        try:
            data = self.ws.send(TextMessage(frame.decode()))
        except LocalProtocolError:
            raise LinkClosed("websocket closed") from None
        await self._write(data)

    async def receive(self) -> Any:
        while not self.messages:
            for event in await self._events():
                await self._handle(event)
            self.alive()  # any bytes from the server are a sign of life
        return decode(self.messages.popleft())
