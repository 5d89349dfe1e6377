"""The pyrt client for trio: join channels, publish, track presence, never lose a message.

```python
import trio
from pyrt.client import connect

async def main():
    async with connect("http://127.0.0.1:8000") as client:
        room = await client.join("room:1")
        await room.publish({"text": "hello"})
        async for message in room:
            print(message.offset, message.data)

trio.run(main)
```

The client reconnects by itself (exponential backoff with jitter) and rejoins every channel
with `since` set to the last offset it delivered, so messages published while it was away
arrive in order, once each. When the server no longer has them, `Channel.recovered` turns
False and `Channel.on_reset` callbacks run: reload your state, then carry on.

Records channels (`client.records(name)`) hold keyed records with optimistic updates: the
view changes at once, the server confirms or rejects, and writes survive reconnects (re-sent
with idempotency keys, applied at most once). See docs/conflicts.md.

```python
todos = await client.records("todos:42")
todos.patch("t1", {"done": True})     # the view shows it now
result = await todos.set("t2", {"title": "milk"})     # or wait for the server's verdict
print(result.outcome, todos.view)
```

It speaks the native protocol over WebSocket, SSE or long-poll, in the order given by
`transports`: a transport that cannot be opened, or that goes silent for `stall_timeout`, is
left for the next one. The request/reply/push logic is the same over all three; a transport is
only a *link* that sends commands and yields frames in order.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import itertools
import random
import secrets
import ssl
import time
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, cast

import attrs
import httpx
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from .._core import Matcher
from ..conflict import (
    ConflictPolicy,
    Op,
    OptimisticStore,
    PendingWrite,
    Record,
    Result,
    StoreUpdate,
    Timestamp,
    policy_named,
)
from ..hub.protocol import decode_mutate_reply, decode_record, encode_mutate, table_channel

__all__ = [
    "TRANSPORTS",
    "Channel",
    "Client",
    "ClientError",
    "ConnectionLost",
    "Message",
    "Records",
    "Write",
    "connect",
]

TRANSPORTS: tuple[str, ...] = ("websocket", "sse", "longpoll")
"""The transports the client can use, in its default order of preference."""


class ClientError(Exception):
    """The server answered a command with an error (see docs/protocol.md for codes)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection dropped before the server answered. The command may or may not have
    taken effect; joins and presence are restored by the client on its own."""


@attrs.frozen(slots=True)
class Message:
    """A publication as the client delivers it."""

    channel: str
    offset: int
    epoch: str
    data: Any
    sender: str | None = None
    ids: tuple[int, ...] = ()
    """For a row event: the ids of this channel's row subscriptions it matched."""


@attrs.define(eq=False)
class Channel:
    """A joined channel: iterate it for messages, publish to it, track presence on it."""

    name: str
    _client: Client
    presence_enabled: bool = False
    recovered: bool | None = None
    """None before any rejoin; then whether the last rejoin recovered every missed message."""
    presence: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)
    """The current presence view: key -> metas (each with ref, client, meta)."""
    on_message: list[Callable[[Message], None]] = attrs.field(factory=list)
    on_reset: list[Callable[[Channel], None]] = attrs.field(factory=list)
    on_presence: list[Callable[[Channel], None]] = attrs.field(factory=list)
    gaps: int = 0
    """Jumps in offsets the server's drop/conflate policies caused (never under disconnect)."""
    _send: trio.MemorySendChannel[Message] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Message] = attrs.field(init=False)
    _tracked: dict[str, tuple[str, dict[str, Any]]] = attrs.field(factory=dict)
    """Our presence entries: local handle -> (key, meta), re-tracked after a reconnect."""
    _refs: dict[str, str] = attrs.field(factory=dict)
    """Local handle -> the server's ref for it on the current connection."""
    _positions: dict[str, tuple[int, str]] = attrs.field(factory=dict)
    """Concrete channel -> (offset, epoch) of the last message delivered (several for a
    pattern)."""
    joined: bool = True
    iterate: bool = True
    """Whether messages are queued for `async for` (else only callbacks see them)."""
    _active: bool = False
    """Joined on the server at least once: reconnects rejoin it."""
    changes: tuple[Mapping[str, Any], ...] = ()
    """Row-change subscriptions (`Client.changes`): only matching row events arrive."""
    subscription_ids: list[int] = attrs.field(factory=list)
    """The server's id for each of `changes`, in order (from the last join's reply)."""
    _carry: collections.deque[Message] = attrs.field(factory=collections.deque)
    """Delivered messages whose hand-over to the queue was cut short (the connection ended
    while the queue was full): they go out after the queued ones, before any newer one."""
    _carry_taken: trio.Event = attrs.field(factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel(self._client.buffer)

    @property
    def offset(self) -> int | None:
        """Offset of the last message delivered (or of the join's position)."""
        position = self._positions.get(self.name)
        return position[0] if position else None

    @property
    def epoch(self) -> str | None:
        position = self._positions.get(self.name)
        return position[1] if position else None

    def __aiter__(self) -> Channel:
        return self

    async def __anext__(self) -> Message:
        try:
            if self._carry:
                try:
                    return self._receive.receive_nowait()
                except trio.WouldBlock:
                    message = self._carry.popleft()
                    self._carry_taken.set()
                    self._carry_taken = trio.Event()
                    return message
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def _queue(self, message: Message) -> None:
        """Hands a delivered message (its offset counted as seen) to `async for`: kept in
        `_carry` if the connection ends while waiting for room, never lost."""
        while self._carry:  # newer messages wait until `async for` took the carried ones
            await self._carry_taken.wait()
        try:
            await self._send.send(message)
        except trio.Cancelled:
            try:
                self._send.send_nowait(message)  # `async for` may be waiting right now
            except trio.WouldBlock:
                self._carry.append(message)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # nobody iterates any more
            raise

    async def publish(self, data: Any, *, key: str | None = None, echo: bool = False) -> int:
        """Publishes `data` and returns its offset once the server has given it one."""
        command: dict[str, Any] = {"cmd": "publish", "channel": self.name, "data": data}
        command.update(ack=True, self=echo)
        if key is not None:
            command["key"] = key

        def acked(result: Mapping[str, Any]) -> None:
            # Runs in frame order: everything before our message was delivered already.
            if not echo and self._positions.get(self.name) == (
                result["offset"] - 1,
                result["epoch"],
            ):
                # Ours: seen, so a rejoin does not ask for it.
                self._positions[self.name] = (result["offset"], result["epoch"])

        result = await self._client._request(command, on_ok=acked)
        offset: int = result["offset"]
        return offset

    async def track(self, meta: Mapping[str, Any], key: str | None = None) -> str:
        """Adds a presence entry (kept across reconnects); returns a handle for untrack."""
        handle = f"t{next(self._client._handles)}"
        self._tracked[handle] = (key or "", dict(meta))
        await self._track(handle)
        return handle

    async def untrack(self, handle: str) -> None:
        key, _meta = self._tracked.pop(handle)
        ref = self._refs.pop(handle, None)
        if ref is not None:
            await self._client._request(
                {"cmd": "untrack", "channel": self.name, "key": key or None, "ref": ref}
            )

    async def _track(self, handle: str) -> None:
        key, meta = self._tracked[handle]
        command = {"cmd": "track", "channel": self.name, "key": key or None, "meta": meta}
        result = await self._client._request(command)
        self._refs[handle] = result["ref"]

    async def leave(self) -> None:
        self.joined = False
        self._client._forget(self)
        try:
            await self._client._request({"cmd": "leave", "channel": self.name})
        finally:
            self._send.close()

    # -- fed by the client's reader ----------------------------------------------------------

    def _joined(self, result: Mapping[str, Any]) -> None:
        if self.changes:
            self.subscription_ids = [entry["id"] for entry in result.get("changes", ())]
        if "offset" not in result:
            return  # a pattern: no single position to resume from
        recovered = result.get("recovered")
        if recovered is not None:
            self.recovered = recovered
        if recovered is not True:
            # A fresh join, or history no longer covers us: continue from the server's top.
            self._positions[self.name] = (result["offset"], result["epoch"])
            if recovered is False:
                for callback in self.on_reset:
                    callback(self)

    def _deliver(self, push: Mapping[str, Any]) -> Message | None:
        name, offset, epoch = push["channel"], push["offset"], push["epoch"]
        last = self._positions.get(name)
        if last is not None and last[1] == epoch:
            if offset <= last[0]:
                return None  # already delivered: a duplicate after a resend
            if offset > last[0] + 1:
                self.gaps += 1
        self._positions[name] = (offset, epoch)
        ids: tuple[int, ...] = ()
        if "ids" in push:
            # A row event lists every subscription it matched hub-wide: keep ours.
            ids = tuple(i for i in push["ids"] if i in self.subscription_ids)
        message = Message(name, offset, epoch, push["data"], push.get("from"), ids)
        for callback in self.on_message:
            callback(message)
        return message

    def _reset(self, push: Mapping[str, Any]) -> None:
        """The server lost the channel's history while we were joined (a source's gap)."""
        self.recovered = False
        self._positions[self.name] = (push["offset"], push["epoch"])
        for callback in self.on_reset:
            callback(self)

    def _presence_state(self, state: Mapping[str, list[dict[str, Any]]]) -> None:
        self.presence = {k: list(v) for k, v in state.items()}
        for callback in self.on_presence:
            callback(self)

    def _presence_diff(self, push: Mapping[str, Any]) -> None:
        for key, metas in push["leaves"].items():
            gone = {m["ref"] for m in metas}
            kept = [m for m in self.presence.get(key, []) if m["ref"] not in gone]
            if kept:
                self.presence[key] = kept
            else:
                self.presence.pop(key, None)
        for key, metas in push["joins"].items():
            self.presence.setdefault(key, []).extend(metas)
        for callback in self.on_presence:
            callback(self)


class Write:
    """A write to a records channel, already in the view. `await` it for the server's verdict
    (a `pyrt.conflict.Result`); or don't, and watch `Records.on_result`."""

    def __init__(self, pending: PendingWrite, done: trio.Event) -> None:
        self.pending = pending
        self._done = done

    @property
    def result(self) -> Result | None:
        """The outcome, once the server has answered (None before)."""
        return self.pending.result

    def __await__(self) -> Any:
        return self._wait().__await__()

    async def _wait(self) -> Result:
        await self._done.wait()
        assert self.pending.result is not None
        return self.pending.result


@attrs.define(eq=False)
class Records(Channel):
    """A joined records channel: a live view of its records, with optimistic writes.

    `view` is always the confirmed records with the pending writes applied on top (by the
    channel's conflict policy, which the server names on joining). `set`, `patch` and
    `delete` change the view at once and return a `Write`; when the server answers, the write
    is confirmed, or it is rolled back and the writes after it are rebased. Pending writes
    survive reconnects: they are sent again with the same idempotency key. `on_change`
    callbacks get the keys whose value changed; `on_result` callbacks every resolved write.
    """

    store: OptimisticStore = attrs.field(kw_only=True)
    policy: ConflictPolicy | None = attrs.field(default=None, kw_only=True)
    """Your own prediction of the server's policy (for a resolver); else the server's name."""
    on_change: list[Callable[[Records, frozenset[str]], None]] = attrs.field(factory=list)
    on_result: list[Callable[[PendingWrite], None]] = attrs.field(factory=list)
    _waiters: dict[int, trio.Event] = attrs.field(factory=dict)
    _settled: trio.Event = attrs.field(factory=trio.Event)

    @property
    def view(self) -> dict[str, Mapping[str, Any]]:
        """Key -> value of each record that exists, as this client sees it now."""
        return self.store.view

    def get(self, key: str) -> Mapping[str, Any] | None:
        return self.store.record(key).value

    def record(self, key: str) -> Record:
        """The record as the view shows it (its `version` is a stand-in while pending)."""
        return self.store.record(key)

    @property
    def pending(self) -> tuple[PendingWrite, ...]:
        return self.store.pending

    def set(self, key: str, value: Mapping[str, Any]) -> Write:
        """Replaces the record's value (creating it)."""
        return self._write(key, Op.SET, value)

    def patch(self, key: str, fields: Mapping[str, Any]) -> Write:
        """Sets some fields of the record (creating it)."""
        return self._write(key, Op.PATCH, fields)

    def delete(self, key: str) -> Write:
        return self._write(key, Op.DELETE, None)

    async def settled(self) -> None:
        """Waits until no write is pending."""
        while self.store.pending:
            await self._settled.wait()

    async def leave(self) -> None:
        self._apply(self.store.abandon("left the channel"))
        await super().leave()

    def _write(self, key: str, op: Op, value: Mapping[str, Any] | None) -> Write:
        if not self.joined:
            raise ClientError(410, f"not joined to '{self.name}'")
        pending, update = self.store.mutate(key, op, value, _wall_ms())
        done = self._waiters[pending.number] = trio.Event()
        if self._settled.is_set():
            self._settled = trio.Event()
        self._apply(update)
        self._client._wake_writer()
        return Write(pending, done)

    def _apply(self, update: StoreUpdate) -> None:
        if update.resolved:
            # A resolved write may unblock the next write of its record.
            self._client._wake_writer()
        for write in update.resolved:
            event = self._waiters.pop(write.number, None)
            if event is not None:
                event.set()
            for callback in self.on_result:
                callback(write)
        if update.keys:
            for change in self.on_change:
                change(self, update.keys)
        if not self.store.pending:
            self._settled.set()

    # -- fed by the client's reader ----------------------------------------------------------

    def _joined(self, result: Mapping[str, Any]) -> None:
        super()._joined(result)
        name = result.get("policy")
        policy = self.policy
        if policy is None and isinstance(name, str):
            try:
                policy = policy_named(name)
            except ValueError:
                policy = None  # a resolver on the server: predict writes as written
        if policy is not None:
            self.store.policy = policy
        ttl = result.get("mutation_ttl")
        if isinstance(ttl, (int, float)) and ttl > 0:
            # Stop re-sending well before the hub may forget a write's idempotency key.
            self.store.resend_window = min(self.store.resend_window, ttl / 2)
        records = result.get("records")
        if isinstance(records, list):
            forgotten = result.get("forgotten")
            floor = Timestamp.decode(forgotten) if isinstance(forgotten, str) else None
            self._apply(self.store.reset(_records(records), forgotten=floor))
        self.store.go_online()
        self._client._wake_writer()

    def _deliver(self, push: Mapping[str, Any]) -> Message | None:
        message = super()._deliver(push)
        if message is not None and message.channel == self.name:
            data = message.data
            try:
                record = decode_record(data)
            except (ValueError, TypeError):
                return message  # not a record: nothing for the store
            writer, seq = data.get("writer"), data.get("seq")
            if not isinstance(writer, str) or not isinstance(seq, int):
                writer, seq = None, None
            self._apply(self.store.receive(record, writer, seq))
        return message

    def _replied(self, seq: int, frame: Mapping[str, Any]) -> None:
        self._apply(self.store.replied(seq, decode_mutate_reply(frame)))


def _record(data: Any) -> Record | None:
    try:
        return decode_record(data)
    except (ValueError, TypeError):
        return None


def _records(items: list[Any]) -> list[Record]:
    return [r for r in map(_record, items) if r is not None]


def _wall_ms() -> int:
    return int(time.time() * 1000)


# -- links: one per transport, all carrying the same native-protocol frames -----------------


class _LinkClosed(Exception):
    """The link ended, or could not carry a command."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Outcome(enum.Enum):
    """How a link's session ended, which decides what the client tries next."""

    FAILED = enum.auto()
    """It could not be opened, or ended before anything arrived: try the next transport."""
    STALLED = enum.auto()
    """Nothing arrived for `stall_timeout`: try the next transport."""
    CLOSED = enum.auto()
    """It worked, then the server or the network closed it: back off, same transport."""
    DROPPED = enum.auto()
    """`drop_connection()`: back off, same transport."""
    PROBED = enum.auto()
    """The preferred transport works again: switch back to it now."""


@attrs.frozen(slots=True)
class _Endpoints:
    """Where each transport lives, derived from the one URL the user gives."""

    websocket: str
    sse: str
    poll: str
    send: str

    @classmethod
    def from_url(cls, url: str) -> _Endpoints:
        parts = urllib.parse.urlsplit(url)
        secure = {"ws": False, "http": False, "wss": True, "https": True}.get(parts.scheme)
        if secure is None or not parts.netloc:
            raise ValueError(f"expected an http(s):// or ws(s):// URL, not {url!r}")
        path = parts.path.rstrip("/")
        for suffix in ("/connection/websocket", "/connection/sse", "/connection/poll"):
            path = path.removesuffix(suffix)
        http = f"{'https' if secure else 'http'}://{parts.netloc}{path}/connection"
        ws = f"{'wss' if secure else 'ws'}://{parts.netloc}{path}/connection"
        return cls(f"{ws}/websocket", f"{http}/sse", f"{http}/poll", f"{http}/send")


class _Link:
    """One open connection to the hub over some transport.

    `receive` returns frames in the order the server produced them (replies in-stream with
    publications, so a join's reply is applied before the publications it announces);
    `send` hands one command to the server, in call order. Both raise `_LinkClosed` when the
    link is gone. Any sign of life (a frame, an SSE heartbeat, a poll response) pushes back
    `watch`'s deadline: the reader uses it to notice a stall.
    """

    transport: ClassVar[str]

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.watch: trio.CancelScope | None = None
        self.broken = trio.Event()
        """Set when a send failed (or `drop_connection()`): the session ends."""
        self.broken_as = _Outcome.CLOSED
        self.frames = 0
        """Frames the reader took from this link."""
        self.closed = False
        self.opening_channel: str | None = None
        """HTTP sessions: the channel it was opened with, left once it is up."""
        self.ended_as: _Outcome | None = None
        self._sends: set[trio.CancelScope] = set()

    def alive(self) -> None:
        if self.watch is not None:
            self.watch.deadline = trio.current_time() + self.stall_timeout

    def break_(self, outcome: _Outcome = _Outcome.CLOSED) -> None:
        if not self.broken.is_set():
            self.broken_as = outcome
            self.broken.set()

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise _LinkClosed("the link is closed")
        with trio.CancelScope() as scope:
            self._sends.add(scope)
            try:
                await self._send(frame)
            except _LinkClosed:
                self.break_()
                raise
            finally:
                self._sends.discard(scope)
        if scope.cancelled_caught:
            raise _LinkClosed("the link closed while sending")

    def close(self) -> None:
        """Stops sends in flight (they raise `_LinkClosed`); the opener frees the rest."""
        self.closed = True
        for scope in self._sends:
            scope.cancel()

    async def _send(self, frame: bytes) -> None:
        raise NotImplementedError

    async def receive(self) -> Any:
        raise NotImplementedError


class _WebSocketLink(_Link):
    """RFC 6455 over a trio stream, with wsproto doing the protocol (as the server does)."""

    transport = "websocket"

    def __init__(self, stream: trio.abc.Stream, stall_timeout: float) -> None:
        super().__init__(stall_timeout)
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: collections.deque[str | bytes] = collections.deque()
        self._parts: list[Any] = []
        self._writing = trio.Lock()

    async def open(self, url: str) -> None:
        """The opening handshake; frames that arrive with the answer are kept."""
        parts = urllib.parse.urlsplit(url)
        await self._write(self.ws.send(Request(host=parts.netloc, target=parts.path or "/")))
        accepted = False
        while not accepted:
            for event in await self._events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                elif isinstance(event, RejectConnection):
                    raise _LinkClosed(f"websocket upgrade refused: {event.status_code}")
                else:
                    await self._handle(event)

    async def _write(self, data: bytes) -> None:
        async with self._writing:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise _LinkClosed(f"websocket write failed: {e!r}") from None

    async def _events(self) -> list[Any]:
        try:
            data = await self.stream.receive_some(64 * 1024)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise _LinkClosed(f"websocket read failed: {e!r}") from None
        if not data:
            raise _LinkClosed("the server closed the connection")
        try:
            self.ws.receive_data(bytes(data))
            return list(self.ws.events())
        except RemoteProtocolError as e:
            raise _LinkClosed(f"websocket protocol error: {e}") from None

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
            with contextlib.suppress(LocalProtocolError, _LinkClosed):
                await self._write(self.ws.send(event.response()))
            raise _LinkClosed(f"websocket closed: {event.code} {event.reason}")

    async def _send(self, frame: bytes) -> None:
        try:
            data = self.ws.send(TextMessage(frame.decode()))
        except LocalProtocolError:
            raise _LinkClosed("websocket closed") from None
        await self._write(data)

    async def receive(self) -> Any:
        while not self.messages:
            for event in await self._events():
                await self._handle(event)
            self.alive()  # any bytes from the server are a sign of life
        return _decode(self.messages.popleft())


class _HttpLink(_Link):
    """A session over plain HTTP: commands are POSTed, frames come back on a stream or polls."""

    def __init__(self, http: httpx.AsyncClient, endpoints: _Endpoints, stall_timeout: float):
        super().__init__(stall_timeout)
        self.http = http
        self.endpoints = endpoints
        self.session = ""
        self.token = ""
        self._posting = trio.Lock()

    async def _send(self, frame: bytes) -> None:
        # One POST at a time: concurrent requests could reach the hub in any order, and the
        # protocol's ordering (join before publish, track after join) is per connection.
        async with self._posting:
            try:
                request = self.http.build_request(
                    "POST",
                    self.endpoints.send,
                    params={"session": self.session, "token": self.token},
                    content=frame,
                    headers={"content-type": "application/json"},
                    timeout=self.stall_timeout,
                )
                request.stream = _Body(frame)
                response = await self.http.send(request)
            except httpx.TimeoutException:
                self.break_(_Outcome.STALLED)
                raise _LinkClosed("sending a command timed out") from None
            except httpx.HTTPError as e:
                raise _LinkClosed(f"sending a command failed: {e!r}") from None
        if response.status_code != 202:
            # 404: the session expired; 401: bad token; 400: the frame closed the session.
            raise _LinkClosed(f"command refused: {response.status_code} {response.text[:200]}")


class _Body(httpx.AsyncByteStream):
    """A request body that is not an async generator: httpx's own, for `content=bytes`, is
    one, and a POST cancelled mid-send leaves it unfinalized (a ResourceWarning at GC)."""

    def __init__(self, data: bytes) -> None:
        self._chunks = [data]

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop()


class _SseLink(_HttpLink):
    transport = "sse"

    def __init__(
        self,
        http: httpx.AsyncClient,
        endpoints: _Endpoints,
        stall_timeout: float,
        lines: AsyncIterator[str],
    ) -> None:
        super().__init__(http, endpoints, stall_timeout)
        self.lines = lines

    async def open(self) -> None:
        first = await self.receive()
        if first.get("push") != "session":
            raise _LinkClosed(f"expected the session event first, got {str(first)[:200]}")
        self.session, self.token = first["session"], first["token"]

    async def receive(self) -> Any:
        data: list[str] = []
        while True:
            try:
                line = await anext(self.lines)
            except StopAsyncIteration:
                raise _LinkClosed("the event stream ended") from None
            except httpx.HTTPError as e:
                raise _LinkClosed(f"the event stream broke: {e!r}") from None
            self.alive()  # heartbeat comments count
            if not line:
                if not data:
                    continue
                frame = _decode("\n".join(data))
                if frame.get("push") == "close":
                    await self._drain()
                    raise _LinkClosed(f"closed by the server: {frame.get('code')}")
                return frame
            if line.startswith(":"):
                continue  # a comment: the server's heartbeat
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
            # `id` (the server's cursor) and `retry` are for browsers: this client resumes
            # every channel with `since` from what it delivered, on any transport.

    async def _drain(self) -> None:
        """Reads the stream to its end (the server ends it right after a close event), so
        httpx's nested async generators finish instead of being garbage collected open."""
        with trio.move_on_after(1.0), contextlib.suppress(httpx.HTTPError):
            async for _line in self.lines:
                pass


class _PollLink(_HttpLink):
    transport = "longpoll"

    def __init__(self, http: httpx.AsyncClient, endpoints: _Endpoints, stall_timeout: float):
        super().__init__(http, endpoints, stall_timeout)
        self.cursor = ""
        self.queue: collections.deque[Any] = collections.deque()
        self.close_reason: str | None = None

    async def open(self, params: Sequence[tuple[str, str]]) -> None:
        try:
            response = await self.http.get(self.endpoints.poll, params=list(params))
        except httpx.HTTPError as e:
            raise _LinkClosed(f"opening a long-poll session failed: {e!r}") from None
        body = self._batch(response)
        self.session, self.token = body["session"], body["token"]

    def _batch(self, response: httpx.Response) -> Any:
        if response.status_code != 200:
            # 404: the session expired; 409: out of step with the server's batches.
            raise _LinkClosed(f"poll refused: {response.status_code} {response.text[:200]}")
        body = _decode(response.content)
        messages = body.get("messages")
        if not isinstance(messages, list) or not isinstance(body.get("cursor"), str):
            raise _LinkClosed(f"not a poll response: {response.text[:200]}")
        self.queue.extend(messages)
        # Sent with the next poll, which happens only once every frame of this batch was
        # handed to the reader and handled: the cursor acknowledges what was delivered.
        self.cursor = body["cursor"]
        close = body.get("close")
        if close is not None:
            self.close_reason = f"closed by the server: {close}"
        return body

    async def end(self) -> None:
        """Ends the session on the server now (its presence leaves at once rather than when
        the server expires it). Best effort: the server expires it anyway."""
        with (
            trio.CancelScope(deadline=trio.current_time() + 0.5, shield=True),
            contextlib.suppress(httpx.HTTPError),
        ):
            await self.http.post(
                f"{self.endpoints.poll}/end",
                params={"session": self.session, "token": self.token},
            )

    async def receive(self) -> Any:
        while not self.queue:
            if self.close_reason is not None:
                raise _LinkClosed(self.close_reason)
            await self._poll()
        return self.queue.popleft()

    async def _poll(self) -> None:
        params = {"session": self.session, "token": self.token, "cursor": self.cursor}
        for attempt in range(3):
            try:
                # No read timeout: the server holds a poll up to ~25 s, and the reader's
                # stall watch bounds the wait.
                response = await self.http.get(
                    self.endpoints.poll, params=params, timeout=httpx.Timeout(10.0, read=None)
                )
            except httpx.TransportError as e:
                if attempt == 2:
                    raise _LinkClosed(f"polling failed: {e!r}") from None
                # A lost response: the same cursor gets the same batch again.
                await trio.sleep(0.05 * (attempt + 1))
                continue
            self.alive()
            self._batch(response)
            return


def _decode(data: str | bytes) -> Any:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _LinkClosed("the server sent a frame that is not JSON") from None
    if not isinstance(frame, dict):
        raise _LinkClosed("the server sent a frame that is not a JSON object")
    return frame


# Errors that mean "this transport did not work this time", from opening or closing a link.
_LINK_ERRORS = (
    _LinkClosed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    httpx.HTTPError,
)


class Client:
    """A connection to a pyrt hub that stays connected. Make one with `connect()`.

    `url` is the server's base URL (`http://host:port`) or any of its connection endpoints
    (`ws://host:port/connection/websocket`); the others are derived from it.

    Transports are tried in the order of `transports`. One that cannot be opened within
    `open_timeout` (refused, 404, a proxy that eats upgrades), that ends before anything
    arrives, or that goes silent for `stall_timeout` while the client waits for frames, is
    left for the next one at once; after a full round of failures the client backs off
    (exponentially, with jitter) and starts the next round. A link that worked and then
    closed is reopened on the same transport after a short backoff. While on a fallback,
    every `probe_interval` seconds (doubling after each failed probe, up to 32 times) the
    client tries to open the preferred transport (the first one) and, if it opens, moves back
    to it: the fallback link is closed and the new one rejoins everything. `None`: no probes.

    Every new link rejoins each channel with `since` = the last position the client
    delivered and re-tracks its presence, whatever the transport before and after.
    """

    def __init__(
        self,
        url: str,
        *,
        transports: Sequence[str] = TRANSPORTS,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        ping_interval: float = 20.0,
        stall_timeout: float = 30.0,
        open_timeout: float = 10.0,
        probe_interval: float | None = 60.0,
        buffer: int = 1024,
    ) -> None:
        unknown = [t for t in transports if t not in TRANSPORTS]
        if unknown or not transports or len(set(transports)) != len(transports):
            raise ValueError(
                f"transports must be distinct names from {TRANSPORTS}, not {tuple(transports)}"
            )
        if not 0 < ping_interval < stall_timeout:
            # The client's pings are answered: a live link is never silent for longer.
            raise ValueError("need 0 < ping_interval < stall_timeout")
        self.url = url
        self.transports = tuple(transports)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.stall_timeout = stall_timeout
        self.open_timeout = open_timeout
        self.probe_interval = probe_interval
        self.buffer = buffer
        self.client_id: str | None = None
        self.connects = 0
        """How many times a link was established (1 + reconnects and switches)."""
        self.on_transport: list[Callable[[str | None], None]] = []
        """Called with the transport's name when a link is up, and None when it is lost."""
        self._endpoints = _Endpoints.from_url(url)
        self._channels: dict[str, Channel] = {}
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._pending: dict[
            int, tuple[trio.Event, list[Any], Callable[[Mapping[str, Any]], None] | None]
        ] = {}
        self._reply_handlers: dict[int, Callable[[Mapping[str, Any]], None]] = {}
        """Replies to commands nobody awaits (record writes), by request id."""
        self._writes_ready = trio.Event()
        self._link: _Link | None = None
        self._connected = trio.Event()
        self._closed = False
        self._patterns = Matcher()
        self._pattern_ids: dict[int, Channel] = {}
        self._task_status: Any = None
        self._probe_wait = probe_interval or 0.0

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def transport(self) -> str | None:
        """The transport in use ("websocket", "sse" or "longpoll"); None when disconnected."""
        return self._link.transport if self._link is not None else None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def join(self, channel: str, *, presence: bool = False, iterate: bool = True) -> Channel:
        """Joins `channel` (a name or pattern); it stays joined across reconnects.

        With `iterate=False` messages only go to `on_message` callbacks; otherwise they queue
        (up to `buffer`) for `async for`, and a full queue holds up the connection (the server
        then disconnects it as slow, and it resumes), so iterate promptly.
        """
        if channel in self._channels:
            raise ClientError(409, f"already joined to '{channel}'")
        joined = Channel(channel, self, presence_enabled=presence, iterate=iterate)
        return await self._join_new(joined)

    async def records(self, channel: str, *, policy: ConflictPolicy | None = None) -> Records:
        """Joins a records channel (a name: patterns have no records) and returns its live
        view, with the records as they are now. It stays joined across reconnects; writes
        made while disconnected are sent when the connection is back.

        `policy` predicts the server's conflict policy in the view; by default the one the
        server names (a server-side resolver is predicted as "the write as written").
        """
        if channel in self._channels:
            raise ClientError(409, f"already joined to '{channel}'")
        if any(segment in ("*", ">") for segment in channel.split(":")):
            raise ValueError("records live on channel names, not patterns")
        origin = secrets.token_hex(8)
        store = OptimisticStore(origin, policy)
        joined = Records(channel, self, iterate=False, store=store, policy=policy)
        self._channels[channel] = joined
        try:
            await self._join(joined)
        except BaseException:
            self._forget(joined)
            raise
        return joined

    async def changes(
        self, changes: Sequence[Mapping[str, Any]], *, iterate: bool = True
    ) -> Channel:
        """Subscribes to row changes: `changes` is a list of `{"event", "schema", "table",
        "filter"}` (docs/protocol.md), all on one table (or one `*` pattern). Returns the
        table's channel, which delivers only the matching row events (`Message.data` is the
        change, `Message.ids` the subscriptions it matched) and resumes across reconnects
        like any channel; `subscription_ids` are the server's ids for `changes`."""
        specs = tuple(dict(c) for c in changes)
        names = {table_channel(c.get("schema") or "public", c.get("table") or "*") for c in specs}
        if len(names) != 1:
            raise ValueError("every entry of changes must name the same schema and table")
        (name,) = names
        if name in self._channels:
            raise ClientError(409, f"already joined to '{name}'")
        joined = Channel(name, self, iterate=iterate, changes=specs)
        return await self._join_new(joined)

    async def _join_new(self, joined: Channel) -> Channel:
        """Registers a new channel (a pattern also in the local matcher) and joins it; on
        failure it is forgotten again."""
        self._channels[joined.name] = joined
        if any(segment in ("*", ">") for segment in joined.name.split(":")):
            sub_id = next(self._ids)
            self._patterns.add_channel(sub_id, joined.name)
            self._pattern_ids[sub_id] = joined
        try:
            await self._join(joined)
        except BaseException:
            self._forget(joined)
            raise
        return joined

    def _forget(self, channel: Channel) -> None:
        self._channels.pop(channel.name, None)
        for sub_id, joined in list(self._pattern_ids.items()):
            if joined is channel:
                self._patterns.remove(sub_id)
                del self._pattern_ids[sub_id]

    def channel(self, name: str) -> Channel:
        return self._channels[name]

    def drop_connection(self) -> None:
        """Closes the current connection as a network failure would (for tests and demos);
        the client reconnects on the same transport and resumes."""
        if self._link is not None:
            self._link.break_(_Outcome.DROPPED)

    # -- internals -------------------------------------------------------------------------

    async def _join(self, channel: Channel) -> None:
        command: dict[str, Any] = {"cmd": "join", "channel": channel.name}
        if channel.changes:
            command["changes"] = list(channel.changes)
        if channel.presence_enabled:
            command["presence"] = True
        position = channel._positions.get(channel.name)
        if position is not None:
            command["since"] = {"offset": position[0], "epoch": position[1]}
        # The reply is applied by the reader before the publications that follow it.
        await self._request(command, on_ok=channel._joined)
        channel._active = True

    async def _request(
        self, command: dict[str, Any], on_ok: Callable[[Mapping[str, Any]], None] | None = None
    ) -> Any:
        await self._connected.wait()
        link = self._link
        if link is None:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        done = trio.Event()
        slot: list[Any] = []
        self._pending[rid] = (done, slot, on_ok)
        try:
            await link.send(orjson.dumps({**command, "id": rid}))
            await done.wait()
        except _LinkClosed:
            raise ConnectionLost("connection closed before the reply") from None
        finally:
            self._pending.pop(rid, None)
        if not slot:
            raise ConnectionLost("connection closed before the reply")
        reply = slot[0]
        if "error" in reply:
            raise ClientError(reply["error"]["code"], reply["error"]["message"])
        return reply["ok"]

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        index = 0
        failures = 0  # transports that failed in a row
        rounds = 0  # backoff exponent
        while not self._closed:
            transport = self.transports[index]
            outcome = await self._attempt(transport)
            if self._closed:
                return
            if index == 0 and self.probe_interval is not None:
                # A preferred transport that stalls is probed less and less often.
                if outcome is _Outcome.STALLED:
                    self._probe_wait = min(self._probe_wait * 2, self.probe_interval * 32)
                elif outcome in (_Outcome.CLOSED, _Outcome.DROPPED):
                    self._probe_wait = self.probe_interval
            if outcome is _Outcome.PROBED:
                index, failures, rounds = 0, 0, 0
                continue
            if outcome in (_Outcome.FAILED, _Outcome.STALLED):
                index = (index + 1) % len(self.transports)
                failures += 1
                if failures % len(self.transports):
                    continue  # the next transport, right away
                delay = min(self.max_backoff, self.min_backoff * 2**rounds)
                rounds += 1
            else:
                failures = 0
                delay = self.min_backoff
                rounds = 1
            # Exponential backoff with "equal jitter": at least half the delay, so a flapping
            # link is not hammered, and a random rest, so a restarted server is not stampeded.
            await trio.sleep(delay / 2 + random.uniform(0, delay / 2))

    async def _attempt(self, transport: str) -> _Outcome:
        """Opens a link on `transport` and runs a session on it until it ends."""
        outcome = _Outcome.FAILED
        try:
            async with self._open_link(transport) as link:
                outcome = await self._session(link)
        except _LINK_ERRORS:
            pass  # failing to open it, or an error while closing it after the session
        return outcome

    @asynccontextmanager
    async def _open_link(self, transport: str) -> AsyncGenerator[_Link, None]:
        endpoints = self._endpoints
        if transport == "websocket":
            with trio.fail_after(self.open_timeout):
                parts = urllib.parse.urlsplit(endpoints.websocket)
                host, port = parts.hostname or "", parts.port
                if parts.scheme == "wss":
                    stream: trio.abc.Stream = await trio.open_ssl_over_tcp_stream(
                        host, port or 443, ssl_context=ssl.create_default_context()
                    )
                else:
                    stream = await trio.open_tcp_stream(host, port or 80)
            async with stream:
                ws_link = _WebSocketLink(stream, self.stall_timeout)
                with trio.fail_after(self.open_timeout):
                    await ws_link.open(endpoints.websocket)
                try:
                    yield ws_link
                finally:
                    ws_link.close()
            return
        # HTTP sessions open with at least one channel. The client's channels are all joined
        # the same way on every transport, with `join` and `since` (the server's cursor only
        # knows what it sent, the client knows what it delivered), so the session opens with
        # a channel of its own that nobody publishes to, left at once.
        opening = f"_pyrt:open:{secrets.token_hex(8)}"
        async with contextlib.AsyncExitStack() as stack:
            link: _SseLink | _PollLink
            with trio.fail_after(self.open_timeout):
                http = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=httpx.Timeout(self.open_timeout, read=None))
                )
                if transport == "sse":
                    response = await stack.enter_async_context(
                        http.stream("GET", endpoints.sse, params={"channel": opening})
                    )
                    content_type = response.headers.get("content-type", "")
                    if response.status_code != 200 or not content_type.startswith(
                        "text/event-stream"
                    ):
                        body = (await response.aread())[:200]
                        raise _LinkClosed(f"no event stream: {response.status_code} {body!r}")
                    lines = cast("AsyncGenerator[str, None]", response.aiter_lines())
                    lines = await stack.enter_async_context(contextlib.aclosing(lines))
                    link = _SseLink(http, endpoints, self.stall_timeout, lines)
                    await link.open()
                else:
                    link = _PollLink(http, endpoints, self.stall_timeout)
                    await link.open([("channel", opening)])
            link.opening_channel = opening
            try:
                yield link
            finally:
                link.close()
                if isinstance(link, _PollLink) and link.ended_as is not _Outcome.STALLED:
                    await link.end()

    async def _session(self, link: _Link) -> _Outcome:
        ended: list[_Outcome] = []
        try:
            async with trio.open_nursery() as nursery:

                def end(outcome: _Outcome) -> None:
                    if not ended:
                        ended.append(outcome)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._read, link, end)
                nursery.start_soon(self._ping, link)
                nursery.start_soon(self._send_writes, link)
                nursery.start_soon(self._watch, link, end)
                if self.probe_interval is not None and link.transport != self.transports[0]:
                    nursery.start_soon(self._probe, end)
                self._link = link
                self.connects += 1
                self._connected.set()
                self._announce(link.transport)
                if link.opening_channel is not None:
                    nursery.start_soon(self._leave_quietly, link.opening_channel)
                # Rejoin and re-track everything, then tell the caller we are up.
                for channel in list(self._channels.values()):
                    nursery.start_soon(self._restore, channel)
                if self._task_status is not None:
                    self._task_status.started()
                    self._task_status = None
        finally:
            self._lost()
        outcome = ended[0] if ended else _Outcome.CLOSED
        if outcome is _Outcome.CLOSED and not link.frames:
            outcome = _Outcome.FAILED  # it opened, then died before saying anything
        link.ended_as = outcome
        return outcome

    async def _restore(self, channel: Channel) -> None:
        if not channel._active:
            return  # its first join is still on its way: the user's join() sends it
        with trio.move_on_after(30):
            try:
                await self._join(channel)
                for handle in list(channel._tracked):
                    await channel._track(handle)
            except (ConnectionLost, ClientError):
                pass  # the next connection tries again

    async def _leave_quietly(self, channel: str) -> None:
        with contextlib.suppress(ConnectionLost, ClientError):
            await self._request({"cmd": "leave", "channel": channel})

    async def _watch(self, link: _Link, end: Callable[[_Outcome], None]) -> None:
        await link.broken.wait()
        end(link.broken_as)

    async def _ping(self, link: _Link) -> None:
        # With an id, so the server answers: the answer is what tells a live link from a
        # stalled one when there is no other traffic.
        while True:
            await trio.sleep(self.ping_interval)
            try:
                await link.send(b'{"cmd":"ping","id":"ping"}')
            except _LinkClosed:
                return  # the link is broken: the watch ends the session

    async def _probe(self, end: Callable[[_Outcome], None]) -> None:
        assert self.probe_interval is not None
        while True:
            await trio.sleep(self._probe_wait)
            try:
                async with self._open_link(self.transports[0]):
                    pass
            except _LINK_ERRORS:
                self._probe_wait = min(self._probe_wait * 2, self.probe_interval * 32)
                continue
            end(_Outcome.PROBED)
            return

    async def _read(self, link: _Link, end: Callable[[_Outcome], None]) -> None:
        try:
            while True:
                # The deadline only runs while waiting for the link: a consumer that holds up
                # the reader (a full channel queue) is not a stalled transport.
                with trio.CancelScope(deadline=trio.current_time() + self.stall_timeout) as watch:
                    link.watch = watch
                    frame = await link.receive()
                link.watch = None
                if watch.cancelled_caught:
                    end(_Outcome.STALLED)
                    return
                link.frames += 1
                if "reply" in frame:
                    pending = self._pending.get(frame["reply"])
                    if pending is not None:
                        done, slot, on_ok = pending
                        if on_ok is not None and "ok" in frame:
                            on_ok(frame["ok"])
                        slot.append(frame)
                        done.set()
                    else:
                        handler = self._reply_handlers.pop(frame["reply"], None)
                        if handler is not None:
                            handler(frame)
                    continue
                await self._push(frame)
        except _LinkClosed:
            end(_Outcome.CLOSED)

    async def _push(self, push: Mapping[str, Any]) -> None:
        kind = push.get("push")
        channel = self._channels.get(push.get("channel", ""))
        if kind == "pub":
            channel = channel or self._pattern_channel(push["channel"])
            if channel is not None:
                message = channel._deliver(push)
                if message is not None and channel.iterate:
                    await channel._queue(message)
        elif channel is not None and kind == "reset":
            channel._reset(push)
        elif channel is not None and kind == "presence_state":
            channel._presence_state(push["state"])
        elif channel is not None and kind == "presence_diff":
            channel._presence_diff(push)

    def _pattern_channel(self, name: str) -> Channel | None:
        """The pattern channel a publication on `name` came through, if any."""
        matches = self._patterns.match_channel(name)
        return self._pattern_ids[min(matches)] if matches else None

    def _announce(self, transport: str | None) -> None:
        for callback in self.on_transport:
            callback(transport)

    def _wake_writer(self) -> None:
        self._writes_ready.set()

    async def _send_writes(self, link: _Link) -> None:
        """Sends record writes as they become ready (re-sends first), until the link ends.
        Their replies come to `_reply_handlers`, in frame order like every reply."""
        while True:
            await self._writes_ready.wait()
            self._writes_ready = trio.Event()
            for channel in list(self._channels.values()):
                if not isinstance(channel, Records):
                    continue
                channel._apply(channel.store.expire(trio.current_time()))
                for mutation in channel.store.take_outgoing(trio.current_time()):
                    assert mutation.seq is not None
                    rid = next(self._ids)
                    self._reply_handlers[rid] = functools.partial(channel._replied, mutation.seq)
                    command = encode_mutate(channel.name, mutation, rid)
                    try:
                        await link.send(orjson.dumps(command))
                    except _LinkClosed:
                        return  # the session ends; the store re-sends on the next link

    def _lost(self) -> None:
        self._reply_handlers.clear()
        for channel in self._channels.values():
            if isinstance(channel, Records):
                channel.store.go_offline()
        if self._link is not None:
            self._link = None
            self._announce(None)
        if self._connected.is_set():
            # Only a set event is replaced: requests waiting on an unset one keep waiting
            # for the next link.
            self._connected = trio.Event()
        for done, _slot, _on_ok in self._pending.values():
            done.set()  # wakes requests with an empty slot: ConnectionLost


@asynccontextmanager
async def connect(url: str, *, timeout: float = 10.0, **options: Any) -> AsyncIterator[Client]:
    """Connects to a hub (trying for up to `timeout` seconds, else ConnectionLost) and keeps
    connected until the block ends. Options go to `Client`."""
    client = Client(url, **options)
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(timeout):
                await nursery.start(client._run)
                connected = True
            if connected:
                try:
                    yield client
                finally:
                    client._closed = True
                    for channel in client._channels.values():
                        channel._send.close()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own tasks only end by cancellation, so a group holds the caller's
        # exception: raise it as itself, not wrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if not connected:
        raise ConnectionLost(f"could not connect to {url} in {timeout:g} s")
