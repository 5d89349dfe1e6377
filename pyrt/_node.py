"""The trio runtime around the sans-IO hub.

One `Node` owns the nursery: it listens on one port (the front door), hands each request to
the transport plugin that claims it, runs the hub's clock, and shuts everything down in order.
Transports see the hub through a `Session` per client connection.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.resources
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import h11
import orjson
import trio

from ._hub import Hub, HubConfig
from ._protocol import CloseCode

TRANSPORT_GROUP = "pyrt.transports"


@attrs.frozen(slots=True)
class HttpRequest:
    """A parsed HTTP request head, as transports see it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = self.header("upgrade") or ""
        return self.method == "GET" and upgrade.lower() == "websocket"


class Transport(Protocol):
    """What a transport plugin provides. Register a factory returning one under the
    `pyrt.transports` entry point group; the built-in transports register the same way."""

    name: str

    def claims(self, request: HttpRequest) -> bool:
        """Whether this transport serves `request`."""
        ...

    async def serve(
        self, node: Node, stream: trio.abc.Stream, request: HttpRequest, trailing: bytes
    ) -> None:
        """Serves one client connection to its end. `trailing` is what the client sent after
        the request head. The node closes `stream` afterwards."""
        ...


def load_transports(names: Sequence[str] | None = None) -> list[Transport]:
    """Transports registered under the entry point group, all or those named, in name order."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=TRANSPORT_GROUP)}
    wanted = sorted(found) if names is None else list(names)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LookupError(f"no transport plugin named {', '.join(missing)}; have {sorted(found)}")
    return [found[name].load()() for name in wanted]


@attrs.frozen(slots=True, kw_only=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (see Node.port)."""
    hub: HubConfig = attrs.field(factory=HubConfig)
    transports: tuple[str, ...] | None = None
    """Transport plugins to enable, by entry point name; None for every installed one."""
    drain_timeout: float = 5.0
    """On shutdown, how long clients get to receive what is queued for them."""
    request_timeout: float = 10.0
    """How long a client may take to send its request head."""


class Session:
    """One client connection's link to the hub, used by its transport."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.connection = node.hub.open(node.now)
        self.id = self.connection.id
        self._wake = trio.Event()
        self.closed = False

    def receive(self, frame: str | bytes) -> None:
        """Hands one frame from the client to the hub."""
        if not self.closed:
            self._node.hub.receive(self.id, frame, self._node.now)
            self._node.pump()

    @property
    def close_request(self) -> tuple[CloseCode, str] | None:
        """Set once the hub wants this connection closed (after its queued frames)."""
        return self._node._close_requests.get(self.id)

    async def outgoing(self, max_bytes: int = 256 * 1024) -> list[bytes]:
        """The next frames to write; waits for some. Empty once the connection must close
        and everything queued was handed out."""
        outbox = self.connection.outbox
        while True:
            if len(outbox):
                frames = outbox.pop(max_bytes=max_bytes)
                return [f if isinstance(f, bytes) else f.encode() for f in frames]
            if self.close_request is not None or self.closed:
                return []
            await self._wake.wait()
            self._wake = trio.Event()

    def wake(self) -> None:
        self._wake.set()

    def end(self) -> None:
        """The transport is gone: the hub forgets the connection (presence leaves, etc.)."""
        if not self.closed:
            self.closed = True
            self._node._end(self)


class Node:
    """A hub on a port: run it with `await node.run()` or `nursery.start(node.run)`."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        hub: Hub | None = None,
        transports: Sequence[Transport] | None = None,
    ) -> None:
        self.config = config or NodeConfig()
        self.hub = hub or Hub(self.config.hub)
        self.transports = (
            list(transports) if transports is not None else load_transports(self.config.transports)
        )
        self.port: int | None = None
        self._sessions: dict[str, Session] = {}
        self._close_requests: dict[str, tuple[CloseCode, str]] = {}
        self._stop = trio.Event()
        self._sessions_gone = trio.Event()
        self._clock_kick = trio.Event()

    @property
    def now(self) -> float:
        return trio.current_time()

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop()`; then stops accepting, tells clients to go, and drains."""
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
            self.port = listeners[0].socket.getsockname()[1]
            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await trio.serve_listeners(
                        self._serve_connection, listeners, handler_nursery=nursery
                    )

            nursery.start_soon(accept)
            nursery.start_soon(self._clock)
            task_status.started(self)
            await self._stop.wait()
            accepting.cancel()
            self.hub.shutdown(self.now)
            self.pump()
            with trio.move_on_after(self.config.drain_timeout):
                while self._sessions:
                    await self._sessions_gone.wait()
                    self._sessions_gone = trio.Event()
            nursery.cancel_scope.cancel()

    def stop(self) -> None:
        """Begins a graceful shutdown."""
        self._stop.set()

    async def _clock(self) -> None:
        while True:
            due = self.hub.tick(self.now)
            self.pump()
            with trio.move_on_at(due):
                await self._clock_kick.wait()
                self._clock_kick = trio.Event()

    # -- the hub's effects -----------------------------------------------------------------

    def pump(self) -> None:
        """Wakes the writers of connections with new frames or a close to carry out."""
        for conn in self.hub.take_ready():
            session = self._sessions.get(conn.id)
            if session is not None:
                session.wake()
        for conn_id, code, reason in self.hub.take_closing():
            self._close_requests[conn_id] = (code, reason)
            session = self._sessions.get(conn_id)
            if session is not None:
                session.wake()

    def open_session(self) -> Session:
        session = Session(self)
        self._sessions[session.id] = session
        return session

    def _end(self, session: Session) -> None:
        self._sessions.pop(session.id, None)
        self._close_requests.pop(session.id, None)
        self.hub.disconnect(session.id, self.now)
        self.pump()
        self._sessions_gone.set()

    def publish(self, channel: str, data: Any) -> Any:
        """Publishes from the server side (sources, the REST API, your own code)."""
        publication = self.hub.publish(channel, data, self.now)
        self.pump()
        return publication

    # -- the front door --------------------------------------------------------------------

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with stream:
                await self._serve_http(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell anyone

    async def _serve_http(self, stream: trio.SocketStream) -> None:
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        while True:
            request = None
            with trio.move_on_after(self.config.request_timeout):
                request = await _next_request(http, stream)
            if request is None:
                return
            for transport in self.transports:
                if transport.claims(request):
                    trailing, _closed = http.trailing_data
                    await transport.serve(self, stream, request, trailing)
                    return
            reusable = await _discard_body(http, stream, limit=64 * 1024)
            status, content_type, body = self._builtin_route(request)
            await _respond(http, stream, status, content_type, body)
            if not reusable or http.our_state is not h11.DONE or http.their_state is not h11.DONE:
                return
            http.start_next_cycle()

    def _builtin_route(self, request: HttpRequest) -> tuple[int, str, bytes]:
        if request.path == "/healthz":
            body = {"status": "ok", "connections": len(self.hub), "port": self.port}
            return 200, "application/json", orjson.dumps(body)
        if request.path == "/status.json":
            stats = self.hub.stats
            body = {
                "connections": len(self.hub),
                "channels": len(self.hub.channels()),
                "publications": stats.publications,
                "frames_out": stats.frames_out,
                "slow_disconnects": stats.slow_disconnects,
                "time": self.now,
            }
            return 200, "application/json", orjson.dumps(body)
        if request.path == "/":
            return 200, "text/html; charset=utf-8", _status_page()
        message = f"no route for {request.method} {request.path}"
        return 404, "application/json", orjson.dumps({"error": message})


async def _next_request(http: h11.Connection, stream: trio.abc.Stream) -> HttpRequest | None:
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError:
            return None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16 * 1024)
            http.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
            return HttpRequest(event.method.decode(), event.target.decode("latin-1"), headers)
        return None


async def _discard_body(http: h11.Connection, stream: trio.abc.Stream, limit: int) -> bool:
    """Reads and drops a request body (no built-in route takes one yet). False if the body
    is larger than `limit` or the client went away: then the connection is not reused."""
    received = 0
    while True:
        event = http.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16 * 1024)
            http.receive_data(bytes(data))
            if not data:
                return False
            continue
        if not isinstance(event, h11.Data):
            return isinstance(event, h11.EndOfMessage)
        received += len(event.data)
        if received > limit:
            return False


async def _respond(
    http: h11.Connection, stream: trio.abc.Stream, status: int, content_type: str, body: bytes
) -> None:
    headers = [("content-type", content_type), ("content-length", str(len(body)))]
    data = http.send(h11.Response(status_code=status, headers=headers))
    data = (data or b"") + (http.send(h11.Data(data=body)) or b"")
    data += http.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


@functools.cache
def _status_page() -> bytes:
    return importlib.resources.files("pyrt").joinpath("_status.html").read_bytes()
