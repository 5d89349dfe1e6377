"""`Session`: one client connection's link to the hub, used by its transport."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import trio

from ..hub.hub import DEFAULT, Hub, _Default
from ..hub.identity import ANONYMOUS, Action, Identity
from ..hub.protocol import CloseCode, Command, JsonCodec
from .gate import HANDLED, Gate


class SessionHost(Protocol):
    """What a `Session` needs of the node that made it (`Node` is one)."""

    hub: Hub
    gate: Gate

    @property
    def now(self) -> float: ...

    def pump(self) -> None: ...

    def corked(self) -> AbstractContextManager[None]: ...

    def connection_failed(
        self, plugin: str, error: BaseException, session: Session | None = None
    ) -> None: ...

    def close_request(self, session_id: str) -> tuple[CloseCode, str] | None: ...

    def end_session(self, session: Session) -> None: ...

    def watch_token(self, session: Session) -> None: ...

    def attached(self, session: Session, stream: trio.abc.Stream) -> None: ...


class Session:
    """One client connection's link to the hub, used by its transport: frames in
    (`receive`, `command`), frames out (`outgoing`, `outgoing_wire`, `take`), and its end.
    Made by `TransportContext.open_session`. What the hub raises while handling this
    connection's input ends this connection only (1011), never the node."""

    def __init__(
        self,
        node: SessionHost,
        *,
        transport: str = "websocket",
        idle_timeout: float | _Default | None = DEFAULT,
        pings: bool = True,
        identity: Identity | None = ANONYMOUS,
    ) -> None:
        self._node = node
        self._connection = node.hub.open(
            node.now,
            transport=transport,
            idle_timeout=idle_timeout,
            pings=pings,
            identity=identity or ANONYMOUS,
            pending=identity is None,
        )
        self.id = self._connection.id
        self.token = secrets.token_urlsafe(18)
        """Authorizes commands sent over HTTP (`POST /connection/send`) for this session."""
        self._wake = trio.Event()
        self._pulse: trio.Event | None = None
        """Made by the first `wait_changed` (long-poll): idle WebSockets need none."""
        self.closed = False

    @property
    def transport(self) -> str:
        """The name of the transport that opened it."""
        return self._connection.transport

    @property
    def idle_timeout(self) -> float | None:
        """After how long without a sign of life the hub closes it (None: never)."""
        return self._connection.idle_timeout

    @property
    def identity(self) -> Identity:
        """Who it is: the identity its token proved (`ANONYMOUS` without one)."""
        return self._connection.identity

    @property
    def codec(self) -> JsonCodec:
        """The codec of the frames the hub sends it (default: the native protocol's)."""
        return self._connection.codec

    @codec.setter
    def codec(self, codec: JsonCodec) -> None:
        """A dialect's codec (the Supabase transport's Phoenix frames): set it before the
        session joins anything."""
        self._connection.codec = codec

    # -- frames in -------------------------------------------------------------------------

    async def receive(self, frame: str | bytes) -> None:
        """Hands one frame from the client to the hub."""
        if not self.closed:
            command = None
            with self._isolated():
                command = self._node.hub.decode(self.id, frame, self._node.now)
            if command is not None:
                await self._carry_out(command)
            self._node.pump()

    async def command(self, command: Command) -> None:
        """Hands a command built by the transport (a dialect's, not read from the wire) to
        the hub."""
        if not self.closed:
            await self._carry_out(command)
            self._node.pump()

    async def _carry_out(self, command: Command) -> None:
        """The node's say first (tokens, the application's `authorize` hook: it may wait),
        then the hub's."""
        node = self._node
        with self._isolated():
            verdict: object = None
            gate = node.gate
            if gate.needs_screen(command):
                verdict = await gate.screen(node.hub, self._connection, command)
                if verdict is HANDLED or self.closed:
                    if not self.closed:
                        node.watch_token(self)  # a new token: a new expiry to watch
                    return  # (or it ended meanwhile: the hub has forgotten it)
            assert verdict is None or isinstance(verdict, bool)
            node.hub.handle(self._connection, command, node.now, verdict)

    async def refusal(self, action: Action, channel: str) -> str | None:
        """Why this session may not do `action` on `channel` (the channel rules, and the
        application's `authorize` hook, which wins when it answers), or None when it may.
        For a dialect that must know before it answers its client (Supabase's join reply
        precedes the hub's join); the hub checks the command itself all the same."""
        node = self._node
        verdict = await node.gate.ask_hook(self.identity, action, channel)
        grant = node.hub.grant(self._connection, action, channel, verdict)
        return None if grant.allowed else grant.reason

    async def reidentify(self, identity: Identity) -> str | None:
        """A new identity for this session, from a token its transport verified its own way
        (`TransportContext.verify_token`: Supabase's `access_token` push). Taken when it is
        for the same user, or when the session has no user yet (anonymous, or an API key's
        role). Its joins are checked again under it: those it may no longer make, or whose
        forced row filter or columns differ, end (the client gets an `unsubscribe` push,
        in its codec's words). Its expiry is watched from now on. Returns None when taken,
        else why not (the session keeps its identity)."""
        if self.closed:
            return "the session has ended"
        node = self._node
        conn = self._connection
        verdicts: dict[tuple[Action, str], bool | None] = {}
        if node.gate.hook is not None:
            for channel, join in list(conn.joins.items()):
                actions = (
                    (Action.SUBSCRIBE, Action.PRESENCE) if join.presence else (Action.SUBSCRIBE,)
                )
                for action in actions:
                    verdicts[action, channel] = await node.gate.ask_hook(identity, action, channel)
            if self.closed:
                return "the session has ended"
        with self._isolated():
            reason = node.hub.replace_identity(conn, identity, verdicts)
            if reason is None:
                node.watch_token(self)
            node.pump()
            return reason
        return "internal error"

    def frame_too_big(self) -> None:
        """The client sent a frame over the limit without it being read whole (1009)."""
        if not self.closed:
            with self._isolated():
                self._node.hub.frame_too_big(self.id)
            self._node.pump()

    def push(self, frame: bytes) -> None:
        """Queues a frame the transport made (a dialect's reply) after what is queued."""
        if not self.closed:
            self._node.hub.push(self.id, frame)
            self._node.pump()

    def touch(self) -> None:
        """A sign of life that is not a frame (a long-poll request)."""
        self._node.hub.touch(self.id, self._node.now)

    @contextlib.contextmanager
    def _isolated(self) -> Iterator[None]:
        """An exception while the hub handles this connection's input ends this connection
        (1011, logged and counted: `Node.connection_failed`) and nothing else."""
        try:
            yield
        except Exception as e:
            self._node.connection_failed(self.transport, e, self)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Publications made within it (by frames read at once) reach each WebSocket in one
        write when it ends."""
        with self._node.corked():
            yield

    # -- what the hub holds for it ---------------------------------------------------------

    def joined(self, channel: str) -> bool:
        """Whether it is joined to `channel`."""
        return channel in self._connection.joins

    def row_subscriptions(self, channel: str) -> tuple[int, ...]:
        """The ids of the row subscriptions its join of a table channel made (in the order
        of the join's `changes`); empty if it did not join `channel` so."""
        joined = self._connection.joins.get(channel)
        return joined.row_ids if joined is not None else ()

    def joins(self) -> list[str]:
        """The channels it is joined to."""
        return list(self._connection.joins)

    def presence_ref(self, channel: str, key: str) -> str | None:
        """The ref of its newest presence entry under `key` in `channel`, or None."""
        entries = self._node.hub.presence(channel).get(key, ())
        mine = [m for m in entries if m.conn == self.id]
        return mine[-1].ref if mine else None

    # -- frames out ------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Frames queued for it and not yet handed out."""
        return len(self._connection.outbox)

    @property
    def close_request(self) -> tuple[CloseCode, str] | None:
        """Set once the hub wants this connection closed (after its queued frames)."""
        return self._node.close_request(self.id)

    def take(self, *, max_frames: int | None = None, max_bytes: int | None = None) -> list[bytes]:
        """The queued frames (at most so many), without waiting; taking also says the frames
        taken last time are written. For transports that batch (long-poll)."""
        frames = self._connection.outbox.pop(max_frames=max_frames, max_bytes=max_bytes)
        return [f if isinstance(f, bytes) else f.encode() for f in frames]

    async def outgoing(self, max_bytes: int = 256 * 1024) -> list[bytes]:
        """The next frames to write; waits for some. Empty once the connection must close
        and everything queued was handed out."""
        outbox = self._connection.outbox
        while True:
            # Popping (even nothing) also says the frames popped last time are written.
            frames = outbox.pop(max_bytes=max_bytes)
            if frames:
                return [f if isinstance(f, bytes) else f.encode() for f in frames]
            if self.close_request is not None or self.closed:
                return []
            await self._wake.wait()
            self._wake = trio.Event()

    def attach(self, stream: trio.abc.Stream) -> bool:
        """Offers the connection's socket (`stream` is the exchange's stream: a trio
        SocketStream) to the Rust fan-out, which then writes publications to it directly
        while nothing is queued. Returns False when it cannot (not a socket, direct writes
        off, another codec). A transport that attaches must write only what `outgoing_wire`
        returns, and call `hold` before writing anything else (a control frame) itself.

        The fan-out borrows the socket's descriptor: the session detaches it when it ends,
        and the node ends every session still attached to a connection before it closes
        that connection. Never close the stream yourself while the session lives
        (docs/architecture.md, "The descriptor rule")."""
        socket = getattr(stream, "socket", None)
        if self.closed or socket is None:
            return False
        if not self._node.hub.attach_socket(self._connection, socket.fileno()):
            return False
        self._node.attached(self, stream)
        return True

    def take_wire(self) -> bytes:
        """For transports that `attach`: the rest of a frame the fan-out wrote only in part
        (empty if none). Call `hold` first; write it before anything else of your own."""
        return self._node.hub.take_wire(self._connection)

    def hold(self) -> None:
        """Keeps the fan-out off the socket while the transport writes to it itself (call
        `wake` once done, so that the writer hands the socket back)."""
        self._node.hub.hold(self._connection)

    async def outgoing_wire(
        self, frame: Callable[[bytes], bytes], idle: Callable[[], bool], max_bytes: int = 256 * 1024
    ) -> bytes:
        """For transports that `attach`: the next bytes to write, waiting for some: what the
        fan-out wrote only in part, then queued frames, each wrapped by `frame`. Empty once
        the connection must close and everything was handed out. When nothing is queued and
        `idle()` (the transport writes nothing itself just now), the socket is handed back
        to the fan-out before waiting."""
        hub, conn, outbox = self._node.hub, self._connection, self._connection.outbox
        while True:
            data = hub.take_wire(conn)
            # Popping (even nothing) also says the frames popped last time are written.
            frames = outbox.pop(max_bytes=max_bytes)
            if frames:
                wire = (frame(f if isinstance(f, bytes) else f.encode()) for f in frames)
                return data + b"".join(wire)
            if data:
                return data
            if self.close_request is not None or self.closed:
                return b""
            if idle():
                hub.release(conn)
            await self._wake.wait()
            self._wake = trio.Event()

    async def wait_changed(self) -> None:
        """Waits for the hub's next nudge (frames queued, or a close asked) without taking
        anything, for transports that `take` frames themselves (long-poll). Check the state
        first: a nudge before the call is not seen."""
        if self._pulse is None:
            self._pulse = trio.Event()
        await self._pulse.wait()

    def wake(self) -> None:
        """Wakes whoever waits in `outgoing`, `outgoing_wire` or `wait_changed`."""
        self._wake.set()
        if self._pulse is not None:
            self._pulse.set()
            self._pulse = None

    def end(self) -> None:
        """The transport is gone: the hub forgets the connection (presence leaves, etc.)."""
        if not self.closed:
            self.closed = True
            self._node.end_session(self)
