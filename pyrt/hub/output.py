"""What goes out to connections: frames into outboxes under the slow-consumer policies, closes,
the connections with new frames, and the direct write path of a deliverer that writes to
sockets (the Rust fan-out).

`Output` is the hub's one way to send: every frame the hub makes for a connection goes
through `send`, which keeps a connection's frames in order whichever path carries them (a
connection whose socket is attached is held by the deliverer while anything is queued for
it). The node asks which connections have new frames (`take_ready`) and which to close
(`take_closing`). Sans-IO: the deliverer is the only thing here that may touch a socket.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._core import OutboxBudget
from .config import HubConfig, HubStats
from .connection import Connection
from .deliverer import Deliverer, SocketDeliverer
from .outbox import Outbox, SlowConsumerPolicy
from .protocol import CloseCode, JsonCodec, RequestId


class Output:
    """The outgoing side of every connection of one hub.

    `native` is the codec of the frames a deliverer writes directly (attached connections
    speak it); `deliverer` carries publications, sharing `budget` with the outboxes.
    """

    def __init__(
        self,
        config: HubConfig,
        stats: HubStats,
        budget: OutboxBudget,
        deliverer: Deliverer,
        native: JsonCodec,
    ) -> None:
        self.config = config
        self.stats = stats
        self.budget = budget
        self.deliverer = deliverer
        self.sockets = deliverer if isinstance(deliverer, SocketDeliverer) else None
        """The deliverer, if it writes to sockets (None: `attach` says no)."""
        self.native = native
        self._by_handle: dict[int, Connection] = {}
        self._ready: dict[str, Connection] = {}
        self._closing: dict[str, tuple[CloseCode, str]] = {}
        self._corks = 0

    # -- connections -----------------------------------------------------------------------

    def new_outbox(self) -> Outbox:
        return Outbox(self.config.outbox_messages, self.config.outbox_bytes, self.budget)

    def opened(self, conn: Connection) -> None:
        """`conn` (with its handle in the deliverer) can be sent to."""
        self._by_handle[conn.handle] = conn

    def forget(self, conn: Connection) -> None:
        """The connection is gone: the deliverer lets go of it (and of its socket: before the
        transport closes it) and what it held no longer counts against the budget."""
        self.deliverer.close(conn.handle)
        conn.outbox.clear()
        del self._by_handle[conn.handle]
        conn.direct = False
        self._ready.pop(conn.id, None)
        self._closing.pop(conn.id, None)

    def take_ready(self) -> list[Connection]:
        """Connections that got new frames since the last call."""
        ready = list(self._ready.values())
        self._ready.clear()
        return ready

    def take_closing(self) -> list[tuple[str, CloseCode, str]]:
        """Connections the transport must close (after writing what their outbox holds)."""
        closing = [(conn_id, code, reason) for conn_id, (code, reason) in self._closing.items()]
        self._closing.clear()
        return closing

    # -- frames ----------------------------------------------------------------------------

    def send(
        self,
        conn: Connection,
        frame: bytes,
        *,
        droppable: bool = False,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT,
        key: Any = None,
    ) -> None:
        """Queues `frame` for `conn` under `policy` (only a `droppable` one may be dropped);
        a connection whose outbox (or the hub's budget) overflows is closed as slow."""
        if conn.closing is not None:
            return
        sockets = self.sockets
        if conn.direct and sockets is not None:
            sockets.hold(conn.handle)  # what follows goes after this frame, in order
        result = conn.outbox.push(
            frame, droppable=droppable, policy=policy, key=key, size=len(frame)
        )
        stats = self.stats
        # Frames lost to drop/conflate policies: evicted ones, and a new one refused because
        # only frames that must not be dropped were queued.
        stats.evicted += result.evicted + (not result.accepted and not result.overflow)
        if result.overflow:
            stats.slow_disconnects += 1
            reason = "slow consumer: outbox full, resume from your offsets"
            if result.over_budget:
                # The server is short of room, not just this connection: free what it holds
                # now rather than once its client has read it all (if it ever does).
                stats.budget_disconnects += 1
                conn.outbox.clear()
                if conn.direct and sockets is not None:
                    sockets.discard_pending(conn.handle)
                reason = (
                    "slow consumer: the server's outbox budget is full, resume from your offsets"
                )
            self.close(conn, CloseCode.SLOW, reason)
            return
        if result.accepted:
            stats.frames_out += 1
            stats.bytes_out += len(frame)
            self._ready[conn.id] = conn

    def reply(self, conn: Connection, rid: RequestId, result: Mapping[str, Any]) -> None:
        """The `ok` reply to request `rid` (none for a request without an id)."""
        if rid is not None:
            self.send(conn, conn.codec.reply(rid, result))

    def error(
        self,
        conn: Connection,
        rid: RequestId,
        code: int,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """The `error` reply to request `rid` (counted)."""
        self.stats.errors += 1
        self.send(conn, conn.codec.error(rid, code, message, details))

    def close(self, conn: Connection, code: CloseCode, reason: str) -> None:
        """Asks the transport to close `conn`, after what is queued for it."""
        if conn.closing is None:
            conn.closing = code
            self._closing[conn.id] = (code, reason)
            sockets = self.sockets
            if conn.direct and sockets is not None:
                sockets.hold(conn.handle)

    def queue_slow(
        self,
        slow: list[int],
        native: bytes,
        make: Callable[[JsonCodec], bytes],
        policy: SlowConsumerPolicy,
        key: Any = None,
    ) -> None:
        """Queues a publication for the recipients the deliverer handed back (`slow`), in
        their outboxes under `policy`: the native frame, or what `make` makes with their
        codec (made once per codec)."""
        frames: dict[str, bytes] = {self.native.name: native}
        by_handle = self._by_handle
        for handle in slow:
            conn = by_handle[handle]
            frame = frames.get(conn.codec.name)
            if frame is None:
                frame = frames[conn.codec.name] = make(conn.codec)
            self.send(conn, frame, droppable=True, policy=policy, key=key)

    def count_direct(self, frames: int, size: int, woken: list[int]) -> None:
        """Accounts for frames the deliverer wrote; wakes the writers of partly written ones."""
        if frames:
            stats = self.stats
            stats.frames_out += frames
            stats.direct_frames += frames
            stats.bytes_out += frames * size
        for handle in woken:
            conn = self._by_handle[handle]
            self._ready[conn.id] = conn

    # -- the direct write path (a SocketDeliverer) -----------------------------------------

    def attach(self, conn: Connection, fd: int) -> bool:
        """Lets the deliverer write publications straight to the socket `fd` of `conn` (a
        WebSocket carrying native frames); False when it cannot (see `Hub.attach_socket`)."""
        sockets = self.sockets
        if sockets is None or not self.config.direct_writes:
            return False
        if conn.codec.name != self.native.name or conn.closing is not None:
            return False
        # Up to outbox_bytes wait in the fan-out for a busy writer; more go to the outbox.
        sockets.attach(conn.handle, fd, self.config.outbox_bytes)
        conn.direct = True
        return True

    def take_wire(self, conn: Connection) -> bytes:
        """Bytes the deliverer could write only in part: the transport writes them first."""
        sockets = self.sockets
        return sockets.take_pending(conn.handle) if conn.direct and sockets is not None else b""

    def hold(self, conn: Connection) -> None:
        """The transport is about to write to the socket itself: hands off until `release`."""
        sockets = self.sockets
        if conn.direct and sockets is not None:
            sockets.hold(conn.handle)

    def release(self, conn: Connection) -> bool:
        """The transport has written everything queued: direct writes may resume. Returns
        whether they may (not if something is queued or the connection is closing)."""
        sockets = self.sockets
        if not conn.direct or sockets is None or len(conn.outbox) or conn.closing is not None:
            return False
        return sockets.release(conn.handle)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Within it, direct writes are gathered per connection and sent when it ends, one
        write per connection. Nests."""
        self._corks += 1
        if self._corks == 1:
            self.deliverer.cork()
        try:
            yield
        finally:
            self._corks -= 1
            if not self._corks:
                self.count_direct(0, 0, self.deliverer.uncork())
