"""The WebSocket link, on trio-websocket (trio's WebSocket client; wsproto underneath, as on
the server)."""

from __future__ import annotations

import ssl
import sys
import urllib.parse
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import trio
import trio_websocket
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError
from wsproto.utilities import LocalProtocolError

from ._link import LINK_ERRORS, Link, LinkClosed, decode

MESSAGE_QUEUE_SIZE = 64
"""Messages trio-websocket's reader may hold before the link's reader takes them. Past that it
stops reading the socket: the server sees backpressure, as it did from the client's queues."""

RECEIVE_BYTES = 64 * 1024
"""The most one read of the socket takes (trio-websocket's default is 4 KiB)."""


@asynccontextmanager
async def open_websocket_link(
    url: str, *, open_timeout: float, stall_timeout: float
) -> AsyncGenerator[WebSocketLink, None]:
    """Connects to `url` (ws:// or wss://, with the system's default TLS context) and upgrades;
    each of the two steps gets `open_timeout`. Failures are `LINK_ERRORS`; a refused upgrade
    is `LinkClosed`. On the way out the TCP connection is closed at once (no close handshake:
    the link ends either because the server closed it, or because the client gave up on it)."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "", parts.port
    with trio.fail_after(open_timeout):
        if parts.scheme == "wss":
            stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                host, port or 443, ssl_context=ssl.create_default_context()
            )
        else:
            stream = await trio.open_tcp_stream(host, port or 80)
    watched = _Watched(stream)
    try:
        async with stream, trio.open_nursery() as nursery:
            link: WebSocketLink | None = None
            try:
                with trio.fail_after(open_timeout), trio.CancelScope() as upgrade:
                    watched.upgrading = upgrade.cancel
                    ws = await trio_websocket.wrap_client_stream(
                        nursery,
                        # Any trio stream will do: the connection only reads and writes it.
                        cast("trio.SocketStream", watched),
                        parts.netloc,
                        parts.path or "/",
                        message_queue_size=MESSAGE_QUEUE_SIZE,
                        # No limit of the client's own, as before: the hub bounds what it
                        # sends (a records join's reply can pass the library's 1 MiB).
                        max_message_size=sys.maxsize,
                        receive_buffer_size=RECEIVE_BYTES,
                    )
                watched.upgrading = None
                if upgrade.cancelled_caught:
                    raise LinkClosed("the server closed the connection during the upgrade")
                link = WebSocketLink(ws, stall_timeout)
                watched.link = link
                yield link
            finally:
                if link is not None:
                    link.close()
                nursery.cancel_scope.cancel()  # trio-websocket's reader
    except BaseExceptionGroup as group:
        # The nursery holds trio-websocket's reader, which raises a refused upgrade.
        failed, rest = group.split((*LINK_ERRORS, HandshakeError))
        if rest is not None:
            raise
        assert failed is not None
        raise LinkClosed(_reason(failed.exceptions[0])) from None


class WebSocketLink(Link):
    """One WebSocket connection: each command is a text message, each frame one message."""

    transport = "websocket"

    def __init__(self, ws: trio_websocket.WebSocketConnection, stall_timeout: float) -> None:
        super().__init__(stall_timeout)
        self.ws = ws

    async def _send(self, frame: bytes) -> None:
        try:
            await self.ws.send_message(frame.decode())
        except (ConnectionClosed, LocalProtocolError) as e:
            raise LinkClosed(_reason(e)) from None

    async def receive(self) -> Any:
        # The messages that arrived before a close are still delivered, then it raises.
        try:
            message = await self.ws.get_message()
        except ConnectionClosed as e:
            raise LinkClosed(_reason(e)) from None
        return decode(message)


def _reason(error: BaseException) -> str:
    if isinstance(error, ConnectionRejected):
        return f"websocket upgrade refused: {error.status_code}"
    if isinstance(error, ConnectionClosed) and error.reason is not None:
        return f"websocket closed: {error.reason.code} {error.reason.reason or ''}".rstrip()
    if isinstance(error, LinkClosed):
        return error.reason
    return f"websocket failed: {error!r}"


class _Watched(trio.abc.Stream):
    """The stream under the WebSocket, as trio-websocket reads and writes it.

    - Any bytes from the server are a sign of life for the link (a frame still arriving, a
      ping), not only whole messages.
    - A connection that fails or ends during the upgrade fails the upgrade at once, through
      `upgrading`; trio-websocket's handshake would wait for the timeout (a proxy that eats
      upgrades closes the connection, and the client moves on to SSE).
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.upgrading: Callable[[], None] | None = None
        self.link: WebSocketLink | None = None

    def _failed(self) -> None:
        if self.upgrading is not None:
            self.upgrading()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError:
            self._failed()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except trio.BrokenResourceError:
            self._failed()
            raise
        if not data:
            self._failed()
        elif self.link is not None:
            self.link.alive()
        return data

    async def aclose(self) -> None:
        self._failed()  # trio-websocket closes it on a protocol error
        await self.stream.aclose()
