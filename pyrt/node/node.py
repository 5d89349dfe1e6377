"""The trio runtime around the sans-IO hub.

One `Node` owns the nursery: it listens on one port (the front door), hands each request to
the transport plugin that claims it, runs the hub's clock, and shuts everything down in order.
Transports see the hub through a `Session` per client connection.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import importlib.metadata
import importlib.resources
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import h11
import orjson
import trio

from ..hub.deliverer import fan_out
from ..hub.historylog import HistoryLog
from ..hub.hub import DEFAULT, Hub, _Default
from ..hub.identity import ANONYMOUS, Identity
from ..hub.limits import ConnectionsPerAddress, KeyFailures, address_key
from ..hub.protocol import CloseCode
from .config import NodeConfig
from .context import SourceContext, TransportContext
from .gate import Authorize, Gate
from .http import (
    CorsPolicy,
    HttpError,
    HttpExchange,
    bearer_token,
    next_request,
    refuse,
)
from .io import has_write_timeout, is_disconnect, send_all
from .metrics import NodeMetrics
from .plugins import BackgroundTransport, OwnsChannels, Source, Transport
from .rest import api_route
from .session import Session
from .sources import load_sources

Route = Callable[["Node", HttpExchange], Awaitable[bool]]
"""A built-in HTTP route: handles the exchange and returns True, or returns False to pass."""

TRANSPORT_GROUP = "pyrt.transports"

log = logging.getLogger("pyrt.node")


def load_transports(
    names: Sequence[str] | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Transport]:
    """Transports registered under the entry point group, all or those named, in name order.

    `options[name]` are keyword arguments for that plugin's factory (`[transports.<name>]` in
    the config file)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=TRANSPORT_GROUP)}
    wanted = sorted(found) if names is None else list(names)
    missing = [n for n in wanted if n not in found]
    if missing:
        raise LookupError(f"no transport plugin named {', '.join(missing)}; have {sorted(found)}")
    transports = []
    for name in wanted:
        try:
            transports.append(found[name].load()(**(options or {}).get(name, {})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"transports.{name}: {e}") from None
    return transports


class Node:
    """A hub on a port: run it with `await node.run()` or `nursery.start(node.run)`."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        hub: Hub | None = None,
        transports: Sequence[Transport] | None = None,
        sources: Sequence[Source] | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        self.config = config or NodeConfig()
        # The Rust fan-out writes publications straight to the WebSocket sockets that
        # transports attach (docs/architecture.md). (An empty Hub is falsy: `is not None`.)
        self.hub = hub if hub is not None else Hub(self.config.hub, deliverer=fan_out)
        self.transports = (
            list(transports)
            if transports is not None
            else load_transports(self.config.transports, self.config.transport_options)
        )
        self.sources = list(sources) if sources is not None else load_sources(self.config.sources)
        """Started after the transports' run hooks, before accepting (see `Source`)."""
        self.history_log: HistoryLog | None = None
        """The durable history log (`config.history_dir`), or None: history in memory."""
        if self.config.history_dir is not None:
            if not self.config.history_fsync_interval > 0:
                raise ValueError("history_fsync_interval must be positive")
            self.history_log = HistoryLog(
                self.config.history_dir, segment_bytes=self.config.history_segment_bytes
            )
        for source in self.sources:
            # Channels a source feeds are read-only to clients (`OwnsChannels`).
            if isinstance(source, OwnsChannels):
                self.hub.own_channels(f"source {source.name}", source.owned_channels)
        self.gate = Gate(self.config.auth, authorize)
        """Tokens, revocation and the `authorize` hook (docs/auth.md); the channel rules it
        loads are put in force on the hub."""
        self.gate.install(self.hub)
        self._contexts = {t.name: TransportContext(self, t.name) for t in self.transports}
        """What each transport sees of the node (`pyrt.plugin.TransportContext`)."""
        self.cors = CorsPolicy(self.config.cors_origins)
        self.connections_per_address = ConnectionsPerAddress(self.config.max_connections_per_ip)
        """Open connections per peer address (`max_connections_per_ip`)."""
        self.key_failures = KeyFailures(
            self.config.api_key_max_failures,
            self.config.api_key_failure_window,
            self.config.api_key_pause,
        )
        """Wrong API keys per peer address, and the addresses paused for them."""
        self._refusing = 0
        self.metrics = NodeMetrics(self)
        """The registry `/metrics` serves (add your own collectors to `metrics.registry`)."""
        self.routes: list[Route] = [Node._builtin_route, api_route, self.metrics.route]
        self.port: int | None = None
        self.generated_api_key = False
        """Whether `config.api_keys` was made up at startup (`pyrt serve` prints it)."""
        self._sessions: dict[str, Session] = {}
        self._close_requests: dict[str, tuple[CloseCode, str]] = {}
        self._attached: dict[trio.abc.Stream, list[Session]] = {}
        """Sessions whose socket the fan-out borrowed, by the stream that owns the socket."""
        self._stop = trio.Event()
        self._sessions_gone = trio.Event()
        self._clock_kick = trio.Event()
        self._clock_due = math.inf
        """When the clock ticks next (the hub's answer to the last tick)."""

    @property
    def now(self) -> float:
        return trio.current_time()

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serves until `stop()`; then stops accepting, tells clients to go, and drains."""
        log = self.history_log
        if log is not None:
            # Replayed before anything can publish or join: offsets and epochs continue.
            self.hub.attach_history_log(log, self.now, time.time())
        try:
            await self._run(task_status)
        finally:
            if log is not None:
                log.close()
            with trio.CancelScope(shield=True):
                await self.gate.aclose()

    async def _run(self, task_status: Any) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.host)
            self.port = listeners[0].socket.getsockname()[1]
            accepting = trio.CancelScope()

            async def accept() -> None:
                with accepting:
                    await trio.serve_listeners(self._admit, listeners, handler_nursery=nursery)

            try:
                for transport in self.transports:
                    if isinstance(transport, BackgroundTransport):
                        await nursery.start(transport.run, self._contexts[transport.name])
                for source in self.sources:
                    await nursery.start(source.run, SourceContext(self, source.name))
            except BaseException:
                for listener in listeners:  # serve_listeners would have closed them
                    await trio.aclose_forcefully(listener)
                raise
            nursery.start_soon(accept)
            nursery.start_soon(self._clock)
            if self.history_log is not None:
                nursery.start_soon(self._sync_history, self.history_log)
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

    async def _sync_history(self, log: HistoryLog) -> None:
        while True:
            await trio.sleep(self.config.history_fsync_interval)
            await log.sync_async()

    async def _clock(self) -> None:
        while True:
            due = self._clock_due = self.hub.tick(self.now)
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

    def open_session(
        self,
        *,
        transport: str = "websocket",
        idle_timeout: float | _Default | None = DEFAULT,
        pings: bool = True,
        identity: Identity | None = ANONYMOUS,
    ) -> Session:
        """A new hub connection for a transport; see `Hub.open` for the options. `identity`
        None: it has no token yet and must send `connect` (WebSocket)."""
        session = Session(
            self, transport=transport, idle_timeout=idle_timeout, pings=pings, identity=identity
        )
        self._sessions[session.id] = session
        idle = session.idle_timeout
        if idle is not None and self.now + idle < self._clock_due:
            self._clock_kick.set()  # it expires before the clock's next tick: tick sooner
        self.watch_token(session)
        return session

    def watch_token(self, session: Session) -> None:
        """Ticks sooner if `session`'s token needs looking at before the next tick (its
        `connect` deadline, its refresh, its expiry)."""
        due = self.hub.token_due(self.hub.connection(session.id), self.now)
        if due is not None and due < self._clock_due:
            self._clock_kick.set()

    def session(self, session_id: str, token: str) -> Session:
        """The live session `session_id` if `token` is its token; HttpError otherwise."""
        session = self._sessions.get(session_id)
        if session is None or session.closed:
            raise HttpError(
                404, f"no session '{session_id[:64]}' (it ended or expired): open a new one"
            )
        if not hmac.compare_digest(session.token.encode(), token.encode()):
            raise HttpError(401, "wrong session token")
        return session

    def close_request(self, session_id: str) -> tuple[CloseCode, str] | None:
        """The close the hub asked for `session_id`, once it has (`Session.close_request`)."""
        return self._close_requests.get(session_id)

    def attached(self, session: Session, stream: trio.abc.Stream) -> None:
        """`Session.attach`: the fan-out borrows `stream`'s descriptor, so `session` ends
        before the front door closes `stream` (`_serve_connection`)."""
        self._attached.setdefault(stream, []).append(session)

    def end_session(self, session: Session) -> None:
        """`Session.end`: the hub forgets the connection."""
        self._sessions.pop(session.id, None)
        self._close_requests.pop(session.id, None)
        self.hub.disconnect(session.id, self.now)
        self.pump()
        self._sessions_gone.set()

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Publications made within it reach each WebSocket in one write when it ends
        (`Hub.corked`); the writers of connections left with frames are woken then."""
        try:
            with self.hub.corked():
                yield
        finally:
            self.pump()

    def connection_failed(
        self, plugin: str, error: BaseException, session: Session | None = None
    ) -> None:
        """An exception while serving one connection (a bug in pyrt or in a plugin): logged
        with its traceback, counted (`pyrt_connection_errors_total`), and `session`, if
        given, closed with 1011. Transports call it for errors they catch themselves; the
        front door calls it for whatever escapes a transport."""
        log.error(
            "%s: error while serving a connection, which is closed (1011)",
            plugin,
            exc_info=error,
        )
        self.metrics.connection_errors[plugin] += 1
        if session is not None and not session.closed:
            self.hub.close(session.id, CloseCode.INTERNAL_ERROR, "internal server error")
            self.pump()

    async def send_all(self, stream: trio.abc.SendStream, data: bytes) -> None:
        """Writes to a client with the node's write deadline (`[hub] write_timeout`):
        `pyrt.node.io.WriteTimeout`, a BrokenResourceError, once no progress is made for it."""
        await send_all(stream, data, self.hub.config.write_timeout)

    def count_write_timeout(self, transport: str, error: BaseException) -> None:
        """Counts `error` in `pyrt_write_timeouts_total` if it is (or holds) a WriteTimeout;
        for transports that end a connection on BrokenResourceError themselves."""
        if has_write_timeout(error):
            self.metrics.write_timeouts[transport] += 1

    def count_event_skipped(self, source: str) -> None:
        """A source skipped an event (`pyrt_source_events_skipped_total`)."""
        self.metrics.source_events_skipped[source] += 1

    def count_api_messages(self, count: int) -> None:
        """Publications made through an API (`pyrt_api_messages_in_total`)."""
        self.metrics.api_messages_in += count

    def revoke(self, jti: str, until: float) -> None:
        """Refuses the token `jti` until `until` (wall-clock seconds: its `exp`)."""
        self.gate.revoke(jti, until)

    def publish(self, channel: str, data: Any) -> Any:
        """Publishes from the server side (sources, the REST API, your own code)."""
        publication = self.hub.publish(channel, data, self.now)
        self.pump()
        return publication

    # -- the front door --------------------------------------------------------------------

    @staticmethod
    def address_of(stream: trio.abc.Stream) -> str | None:
        """The key per-address limits count `stream`'s peer under (`pyrt.hub.limits.address_key`);
        None when it has no IP address."""
        socket = getattr(stream, "socket", None)
        if socket is None:
            return None
        try:
            return address_key(socket.getpeername())
        except OSError:
            return None

    async def _admit(self, stream: trio.SocketStream) -> None:
        """Every accepted connection comes here first: over its address's connection limit it
        gets a 503 and is closed, without a request being read or a session made."""
        address = self.address_of(stream)
        if not self.connections_per_address.acquire(address):
            await self._refuse_connection(stream)
            return
        try:
            await self._serve_connection(stream)
        finally:
            self.connections_per_address.release(address)

    async def _refuse_connection(self, stream: trio.SocketStream) -> None:
        # After the response and our FIN, read (and drop) what the client sent: closing with
        # unread bytes would reset the connection, and a reset can destroy the response
        # before the client reads it. At most _MAX_REFUSING connections linger so, for at
        # most a second each, so refusals cannot hold many descriptors themselves.
        self._refusing += 1
        try:
            with trio.move_on_after(1.0):
                try:
                    await stream.send_all(_too_many_connections(self.config.max_connections_per_ip))
                    await stream.send_eof()
                    if self._refusing <= _MAX_REFUSING:
                        dropped = 0
                        while dropped < 64 * 1024:
                            data = await stream.receive_some(16 * 1024)
                            if not data:
                                break
                            dropped += len(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        finally:
            self._refusing -= 1
            await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # Nothing raised while serving one connection reaches the node's nursery: the
        # other connections and the node go on (docs/architecture.md, "Failure isolation").
        try:
            async with stream:
                try:
                    await self._serve_http(stream)
                finally:
                    # The descriptor rule: sessions whose socket the fan-out borrowed end
                    # before the socket closes, even if their transport forgot to end them.
                    for session in self._attached.pop(stream, ()):
                        session.end()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away; nothing to tell anyone
        except* Exception as group:
            self.connection_failed("front door", group)

    async def _serve_http(self, stream: trio.SocketStream) -> None:
        config = self.config
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_head_bytes)
        while True:
            # One deadline for the request's head and body; serving the response is not
            # bounded by it.
            deadline = trio.current_time() + config.request_timeout
            request = None
            try:
                with trio.move_on_at(deadline):
                    request = await next_request(http, stream, config.max_head_bytes)
            except HttpError as e:
                self.metrics.count_refused(e.status)
                await refuse(http, stream, e, self.hub.config.write_timeout)
                return
            if request is None:
                return
            exchange = HttpExchange(
                http,
                stream,
                request,
                self.cors,
                deadline,
                write_timeout=self.hub.config.write_timeout,
            )
            # No references here while the exchange is served: a WebSocket `detach`es it
            # and the request's and HTTP's state is then freed for the connection's life.
            del http, request
            try:
                await self._route(exchange)
            except HttpError as e:
                if exchange.detached or exchange.http.our_state is not h11.SEND_RESPONSE:
                    return  # a streamed response had begun: all we can do is end it
                await exchange.respond_error(e)
            except Exception as e:
                if is_disconnect(e):
                    self.count_write_timeout(exchange.served_by, e)
                else:
                    self.connection_failed(exchange.served_by, e)
                    if not exchange.detached and exchange.http.our_state is h11.SEND_RESPONSE:
                        await exchange.respond_error(HttpError(500, "internal server error"))
                return
            finally:
                if exchange.refused is not None:
                    self.metrics.count_refused(exchange.refused)
            if not exchange.reusable:
                return
            http = exchange.http
            http.start_next_cycle()

    async def _route(self, exchange: HttpExchange) -> None:
        request = exchange.request
        if request.method == "OPTIONS" and request.header("origin") is not None:
            methods = "GET, POST, OPTIONS"
            headers = "content-type, authorization, last-event-id, x-api-key, apikey"
            if await exchange.preflight(methods, headers):
                return
        claimant = next((t for t in self.transports if t.claims(request)), None)
        if claimant is not None:
            exchange.served_by = claimant.name
            del request  # see _serve_http
            await claimant.serve(self._contexts[claimant.name], exchange)
            return
        for route in self.routes:
            if await route(self, exchange):
                return
        raise HttpError(404, f"no route for {request.method} {request.path}")

    async def _builtin_route(self, exchange: HttpExchange) -> bool:
        path, method = exchange.request.path, exchange.request.method
        if path == "/connection/send":
            if method != "POST":
                raise HttpError(405, "use POST")
            await self._http_command(exchange)
            return True
        if method != "GET":
            return False
        if path == "/healthz":
            body = {"status": "ok", "connections": len(self.hub), "port": self.port}
            await exchange.respond_json(200, body)
        elif path == "/status.json":
            stats = self.hub.stats
            body = {
                "connections": len(self.hub),
                "channels": len(self.hub.channels()),
                "publications": stats.publications,
                "frames_out": stats.frames_out,
                "slow_disconnects": stats.slow_disconnects,
                "time": self.now,
            }
            await exchange.respond_json(200, body)
        elif path == "/":
            await exchange.respond(200, _status_page(), "text/html; charset=utf-8")
        elif path == "/dev/token":
            await self._development_token(exchange)
        else:
            return False
        return True

    async def _development_token(self, exchange: HttpExchange) -> None:
        """`GET /dev/token`: a token for the status page's demo, only while the node runs on
        its made-up development secret (no `[auth]` table), listens on loopback only, and
        the request comes from loopback. 404 otherwise."""
        if not (self.gate.development and _loopback(self.config.host)) or not _from_loopback(
            exchange.stream
        ):
            raise HttpError(404, "no development token here (docs/auth.md)")
        await exchange.respond_json(200, {"token": self.gate.development_token()})

    async def _http_command(self, exchange: HttpExchange) -> None:
        """`POST /connection/send?session=ID&token=T`: one command for an HTTP session (SSE,
        long-poll). Its reply, like everything else, comes on the session's stream."""
        request = exchange.request
        session_id = request.param("session")
        token = request.param("token") or bearer_token(request.header("authorization"))
        if session_id is None or token is None:
            raise HttpError(400, "'session' and 'token' query parameters are required")
        session = self.session(session_id, token)
        limit = self.hub.config.max_frame_bytes
        try:
            frame = await exchange.body(limit)
        except HttpError as e:
            if e.status == 413:
                session.frame_too_big()  # as on WebSocket, an oversized frame ends it (1009)
            raise
        session.touch()
        await session.receive(frame)
        closing = session.close_request
        if closing is not None:
            code, reason = closing
            raise HttpError(400, f"session closed: {reason}", code=int(code))
        await exchange.respond_json(202, {})


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _from_loopback(stream: trio.abc.Stream) -> bool:
    socket = getattr(stream, "socket", None)
    try:
        return socket is not None and _loopback(socket.getpeername()[0])
    except (OSError, IndexError, TypeError):
        return False


_MAX_REFUSING = 64
"""Refused connections that may linger (for a second at most) to get their 503 across."""


@functools.cache
def _too_many_connections(limit: int) -> bytes:
    message = f"too many connections from your address (at most {limit}): close some first"
    body = orjson.dumps({"error": {"code": 503, "message": message}})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body


@functools.cache
def _status_page() -> bytes:
    return importlib.resources.files("pyrt.node").joinpath("status.html").read_bytes()
