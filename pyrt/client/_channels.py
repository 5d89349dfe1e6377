"""Channels as the client's user sees them: `Channel` (messages, publish, presence) and
`Records` (a live view of keyed records with optimistic writes, `Write`)."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import attrs
import trio

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
from ..hub.protocol import decode_mutate_reply, decode_record
from ._errors import ClientError, Unsubscribed


class ChannelHost(Protocol):
    """What a channel needs of the client that joined it (`Client` is one). A protocol, so
    that this module does not import the client's: the client uses channels, not the reverse."""

    @property
    def buffer(self) -> int:
        """Messages a channel queues for `async for`."""
        ...

    @property
    def _handles(self) -> Iterator[int]: ...

    async def _request(
        self, command: dict[str, Any], on_ok: Callable[[Mapping[str, Any]], None] | None = None
    ) -> Any: ...

    def _forget(self, channel: Channel) -> None: ...

    def _wake_writer(self) -> None: ...


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
    _client: ChannelHost
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
    unsubscribed: str | None = None
    """Why the server removed us from the channel (an `unsubscribe` push), if it did: then
    `joined` is False, `async for` raises `Unsubscribed`, and no reconnect joins it again."""

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
            if self.unsubscribed is not None:
                reason = f"removed from '{self.name}' by the server: {self.unsubscribed}"
                raise Unsubscribed(403, reason) from None
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

    def _unsubscribed(self, reason: str) -> None:
        """The server ended our join (the client has forgotten the channel already)."""
        self.joined = False
        self.unsubscribed = reason
        self._tracked.clear()
        self._refs.clear()
        self._send.close()  # what is queued is still taken; then `async for` raises

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

    def _unsubscribed(self, reason: str) -> None:
        self._apply(self.store.abandon(f"removed by the server: {reason}"))
        super()._unsubscribed(reason)

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
