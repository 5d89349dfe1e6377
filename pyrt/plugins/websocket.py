"""The WebSocket transport: pyrt's native protocol over RFC 6455 at `/connection/websocket`.

wsproto does the handshake, the reading, the control frames and the close; data frames to the
client are built by `pyrt.plugins.wsframe`, so the hub's encoded frame bytes go out as they are.

The socket is attached to the hub's Rust fan-out (`Session.attach`): while nothing is queued
for the connection, publications are written to it straight from Rust. The writer task writes
everything else (and what the fan-out could write only in part), and hands the socket back
when it is done; the reader's control replies (pong, close) hold the fan-out off while they
are written. So one socket never has two writers at once, and frames keep their order.
"""

from __future__ import annotations

import contextlib

import trio
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionState, ConnectionType
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.handshake import H11Handshake
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ..plugin import (
    CloseCode,
    HttpError,
    HttpExchange,
    HttpRequest,
    Identity,
    Session,
    TransportContext,
)
from .wsframe import data_frame


class WebSocketTransport:
    """Serves `/connection/websocket` upgrades."""

    name = "websocket"
    paths = ("/connection/websocket",)

    def claims(self, request: HttpRequest) -> bool:
        return request.is_websocket_upgrade and request.path in self.paths

    async def serve(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        # Before the upgrade: a browser page of another site (403), a bad token (401). No
        # token at all is let through when the client may send `connect` first.
        ctx.check_origin(exchange.request)
        identity = await ctx.authenticate(exchange.request, pending_ok=True)
        ws = await _accept(exchange)
        if ws is None:
            return
        # From here on only the WebSocket lives: the request, its headers and the HTTP and
        # handshake state are let go (a few KiB per connection, held for hours).
        trailing = exchange.detach()
        connection = _Connection(ctx, exchange.stream, ws, identity)
        await connection.run(trailing)


async def _accept(exchange: HttpExchange) -> WsConnection | None:
    """The WebSocket handshake; None (after a 400) when the upgrade request is bad."""
    request, stream = exchange.request, exchange.stream
    handshake = H11Handshake(ConnectionType.SERVER)
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
    try:
        handshake.initiate_upgrade_connection(headers, request.target)
    except RemoteProtocolError as e:
        await exchange.respond_error(HttpError(400, f"bad websocket upgrade: {e}"))
        return None
    for event in handshake.events():
        if isinstance(event, Request):
            await stream.send_all(handshake.send(AcceptConnection()))
    return handshake.connection


class _Connection:
    """One accepted WebSocket: a reader and a writer task around a hub session."""

    def __init__(
        self,
        ctx: TransportContext,
        stream: trio.abc.Stream,
        ws: WsConnection,
        identity: Identity | None,
    ) -> None:
        self.ctx = ctx
        self.stream = stream
        self.ws = ws
        self.session: Session = ctx.open_session(identity=identity)
        self.max_message = ctx.config.hub.max_frame_bytes
        self.send_lock = trio.Lock()
        self.parts: list[bytes] = []
        self.size = 0
        self.done = False
        self.peer_closed: trio.Event | None = None
        """Made when we wait for the client's close (not for every idle connection)."""
        self.replying = 0
        """Control replies being written by the reader (the fan-out must stay off)."""
        self.session.attach(stream)

    async def run(self, trailing: bytes = b"") -> None:
        """Serves the connection; `trailing`: what the client sent after its upgrade request
        (frames in the same packet), read first, its control frames answered."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.write, nursery.cancel_scope)
                try:
                    await self.read(trailing)
                except Exception as e:
                    # A bug while reading: the writer closes with 1011 (bounded by the
                    # write deadline and the close wait), then ends the connection.
                    self.ctx.connection_failed(e, self.session)
                    return
                nursery.cancel_scope.cancel()
        finally:
            self.session.end()

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ctx.send_all(self.stream, data)

    async def reply(self, data: bytes) -> None:
        """A control frame from the reader: the fan-out stays off the socket meanwhile, and
        the rest of a frame it wrote only in part goes first (a pong must not land inside
        a publication). The rest is taken before waiting for the lock: the writer then
        takes nothing of it, and the lock hands over in order."""
        self.replying += 1
        self.session.hold()
        try:
            await self.send(self.session.take_wire() + data)
        finally:
            self.replying -= 1
            self.session.wake()  # the writer hands the socket back to the fan-out

    def idle(self) -> bool:
        return not self.replying

    async def feed(self, data: bytes | None) -> list[bytes]:
        """Gives received bytes to wsproto; returns control replies to send."""
        self.ws.receive_data(data)
        replies: list[bytes] = []
        with self.session.corked():  # what these frames publish goes out in one write each
            await self._feed_events(replies)
        return replies

    async def _feed_events(self, replies: list[bytes]) -> None:
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                chunk = event.data.encode() if isinstance(event.data, str) else bytes(event.data)
                self.parts.append(chunk)
                self.size += len(chunk)
                if event.message_finished or self.size > self.max_message:
                    # An oversized message goes to the hub whole so far: it closes with 1009.
                    message = b"".join(self.parts)
                    self.parts.clear()
                    self.size = 0
                    await self.session.receive(message)
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:  # none once our close is sent
                    replies.append(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.done = True
                if self.peer_closed is not None:
                    self.peer_closed.set()
                with contextlib.suppress(LocalProtocolError):  # we had sent our close already
                    replies.append(self.ws.send(event.response()))

    async def read(self, first: bytes = b"") -> None:
        while not self.done:
            data: bytes | bytearray
            if first:
                data, first = first, b""
            else:
                try:
                    data = await self.stream.receive_some(64 * 1024)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            try:
                replies = await self.feed(bytes(data) if data else None)
            except RemoteProtocolError:
                return
            try:
                for reply in replies:
                    await self.reply(reply)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.ctx.count_write_timeout(e)
                return  # the client went away (a reset after its ping or close)
            if not data:
                return

    async def write(self, cancel_scope: trio.CancelScope) -> None:
        try:
            while True:
                data = await self.session.outgoing_wire(data_frame, self.idle)
                if not data:
                    break
                await self.send(data)
                del data  # not held while waiting for the next (up to 256 KiB)
            code, reason = self.session.close_request or (CloseCode.NORMAL, "")
            with contextlib.suppress(LocalProtocolError):  # the client closed first
                await self.send(self.ws.send(CloseConnection(code=int(code), reason=reason)))
            # Give the client a moment to answer the close, then drop the connection.
            if not self.done:
                self.peer_closed = trio.Event()
                with trio.move_on_after(2.0):
                    await self.peer_closed.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.ctx.count_write_timeout(e)
        cancel_scope.cancel()
