"""The pyrt client for trio: join channels, publish, track presence, never lose a message.

```python
import trio
from pyrt.client import connect

async def main():
    async with connect("ws://127.0.0.1:8000/connection/websocket") as client:
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
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url

from ._core import Matcher

__all__ = ["Channel", "Client", "ClientError", "ConnectionLost", "Message", "connect"]


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
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

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
        message = Message(name, offset, epoch, push["data"], push.get("from"))
        for callback in self.on_message:
            callback(message)
        return message

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


class Client:
    """A connection to a pyrt hub that stays connected. Make one with `connect()`."""

    def __init__(
        self,
        url: str,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        ping_interval: float = 20.0,
        buffer: int = 1024,
    ) -> None:
        self.url = url
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.buffer = buffer
        self.client_id: str | None = None
        self.connects = 0
        """How many times a connection was established (1 + reconnects)."""
        self._channels: dict[str, Channel] = {}
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._pending: dict[
            int, tuple[trio.Event, list[Any], Callable[[Mapping[str, Any]], None] | None]
        ] = {}
        self._ws: WebSocketConnection | None = None
        self._connected = trio.Event()
        self._closed = False
        self._reconnect_now = trio.Event()
        self._patterns = Matcher()
        self._pattern_ids: dict[int, Channel] = {}
        self._task_status: Any = None

    @property
    def connected(self) -> bool:
        return self._ws is not None

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
        self._channels[channel] = joined
        pattern = any(segment in ("*", ">") for segment in channel.split(":"))
        if pattern:
            sub_id = next(self._ids)
            self._patterns.add_channel(sub_id, channel)
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
        the client reconnects and resumes."""
        self._reconnect_now.set()

    # -- internals -------------------------------------------------------------------------

    async def _join(self, channel: Channel) -> None:
        command: dict[str, Any] = {"cmd": "join", "channel": channel.name}
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
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        done = trio.Event()
        slot: list[Any] = []
        self._pending[rid] = (done, slot, on_ok)
        try:
            await ws.send_message(orjson.dumps({**command, "id": rid}).decode())
            await done.wait()
        except ConnectionClosed:
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
        attempt = 0
        self._task_status = task_status
        while not self._closed:
            try:
                async with open_websocket_url(self.url) as ws:
                    attempt = 0
                    await self._session(ws)
            except (HandshakeError, ConnectionClosed, OSError, trio.BrokenResourceError):
                pass
            self._lost()
            if self._closed:
                return
            # Exponential backoff with "equal jitter": at least half the delay, so a flapping
            # link is not hammered, and a random rest, so a restarted server is not stampeded.
            delay = min(self.max_backoff, self.min_backoff * 2**attempt)
            attempt += 1
            await trio.sleep(delay / 2 + random.uniform(0, delay / 2))

    async def _session(self, ws: WebSocketConnection) -> None:
        self._reconnect_now = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, ws, nursery.cancel_scope)
                nursery.start_soon(self._ping, ws)
                nursery.start_soon(self._watch_drop, ws)
                self._ws = ws
                self.connects += 1
                self._connected.set()
                # Rejoin and re-track everything, then tell the caller we are up.
                for channel in list(self._channels.values()):
                    nursery.start_soon(self._restore, channel)
                if self._task_status is not None:
                    self._task_status.started()
                    self._task_status = None
        finally:
            await ws._stream.aclose()  # trio-websocket leaves it open after a server close

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

    async def _watch_drop(self, ws: WebSocketConnection) -> None:
        await self._reconnect_now.wait()
        await ws._stream.aclose()

    async def _ping(self, ws: WebSocketConnection) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            await ws.send_message('{"cmd":"ping"}')

    async def _read(self, ws: WebSocketConnection, scope: trio.CancelScope) -> None:
        try:
            while True:
                frame = orjson.loads(await ws.get_message())
                if "reply" in frame:
                    pending = self._pending.get(frame["reply"])
                    if pending is not None:
                        done, slot, on_ok = pending
                        if on_ok is not None and "ok" in frame:
                            on_ok(frame["ok"])
                        slot.append(frame)
                        done.set()
                    continue
                await self._push(frame)
        except ConnectionClosed:
            pass
        finally:
            scope.cancel()

    async def _push(self, push: Mapping[str, Any]) -> None:
        kind = push.get("push")
        channel = self._channels.get(push.get("channel", ""))
        if kind == "pub":
            channel = channel or self._pattern_channel(push["channel"])
            if channel is not None:
                message = channel._deliver(push)
                if message is not None and channel.iterate:
                    await channel._send.send(message)
        elif channel is not None and kind == "presence_state":
            channel._presence_state(push["state"])
        elif channel is not None and kind == "presence_diff":
            channel._presence_diff(push)

    def _pattern_channel(self, name: str) -> Channel | None:
        """The pattern channel a publication on `name` came through, if any."""
        matches = self._patterns.match_channel(name)
        return self._pattern_ids[min(matches)] if matches else None

    def _lost(self) -> None:
        self._ws = None
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
