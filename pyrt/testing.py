"""Conformance kit for plugin authors.

A transport plugin passes when `check_transport` passes with it: the same checks every
built-in transport's tests run (in the spirit of `trio.testing.check_two_way_stream`).

```python
from pyrt.testing import check_transport

async def test_my_transport():
    await check_transport(MyTransport, open_my_client)
```

`open_client(node)` is an async context manager yielding a `TransportClient` for one
connection to `node` over your transport: it sends native-protocol commands and returns the
frames the server sends (docs/protocol.md), and reports how the server closed it. Leaving it
ends the connection the way a client of your transport does when it is done.

The checks: joins, publications and replies in order; awkward payloads (every kind of line
break, NUL, astral characters, 10 KB) arriving unchanged; resuming with and without history;
presence, including the leave of a client that went away; the channel, payload and frame
limits (1009) and bad input (4000), each hurting only its own connection; the hub forgetting
clients that left; and, last, a shutdown: `disconnect`, then the end, and `Node.run` returning
once the transport let go of every session. HTTP transports whose clients join channels when
they open say how many with `joins_on_open` (the SSE and long-poll tests do).

A transport whose protocol is not the native one passes the same checks through a client that
translates (a dialect): `SupabaseKitClient` turns the kit's commands into Phoenix messages and
the Supabase transport's frames back. What a protocol cannot express at all is declared, not
guessed: `check_transport(..., capabilities=...)` skips the checks that need a `Capability`
the transport lacks and returns their names, so the test pins them (`SUPABASE_CAPABILITIES`).

A source plugin passes when `check_source` passes with it:

```python
from pyrt.testing import check_source

async def test_my_source():
    await check_source(lambda: MySource(...), make_it_emit, channel="db:orders")
```
`produce(values)` makes the source emit one event per string, in order (for the NOTIFY
source: one NOTIFY each); `value(data)` takes the string back out of what the source
published. The checks: the node starts with the source; its events are published on
`channel`, in order and unchanged; an event the source cannot publish (the kit makes
publishing fail once) is logged, counted in `node.metrics.source_events_skipped[name]` and
skipped, and the next event is published (one bad event never stops a source, nor the
node); and a node stops with the source running, promptly.

A storage engine (`Broker`, `PresenceManager` and `RecordStorage` in one object: a
`StorageEngine`, as `Hub(broker=...)` takes) passes when `check_broker` passes with it:

```python
from pyrt.testing import check_broker

def test_my_engine():
    check_broker(lambda config: MyEngine(config))
```
`factory(config)` makes a fresh, empty engine with the history limits of `config` (a
`HubConfig`). The checks are listed in `check_broker`'s docstring; `MemoryBroker`, the
default engine, passes them (`check_broker(MemoryBroker)`).

`Peer` drives a sans-IO `Hub` at the frame level, without sockets or trio: one client that
sends native-protocol commands and reads the frames queued for it (pyrt's own hub tests use
it; so can a plugin's tests of what it puts into a hub).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

import attrs
import orjson
import trio

from .conflict import LastWriterWins, Mutation, Op, Outcome, Timestamp
from .hub.broker import (
    Broker,
    MemoryBroker,
    PresenceManager,
    RecordStorage,
    RecordTable,
    StorageEngine,
)
from .hub.history import Publication, StreamPosition
from .hub.hub import Hub, HubConfig
from .node.config import NodeConfig
from .node.node import Node
from .plugin import Session, Source, Transport

__all__ = [
    "SUPABASE_CAPABILITIES",
    "Broker",
    "BrokerFactory",
    "Capability",
    "ClientFactory",
    "Closed",
    "MemoryBroker",
    "Peer",
    "PhoenixSocket",
    "PresenceManager",
    "RecordStorage",
    "RecordTable",
    "SourceKitFailure",
    "StorageEngine",
    "SupabaseKitClient",
    "TransportClient",
    "check_broker",
    "check_source",
    "check_transport",
]


class TransportClient(Protocol):
    """One client connection over the transport under test."""

    async def send(self, command: Mapping[str, Any]) -> None:
        """Sends one command (a JSON object) to the server."""
        ...

    async def receive(self) -> dict[str, Any]:
        """The next frame from the server (a reply or a push); raises `Closed` at the end."""
        ...

    async def send_raw(self, frame: bytes) -> None:
        """Sends bytes that may not be a valid command (for the bad-input checks)."""
        ...


class Closed(Exception):
    """The server closed the connection; `code` is its close code (or None if it cannot be
    carried by the transport)."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed with {code}")
        self.code = code


ClientFactory = Callable[[Node], AbstractAsyncContextManager[TransportClient]]


def _check(condition: bool, message: object) -> None:
    """The kit's assert: unlike `assert`, it also checks under `python -O`."""
    if not condition:
        raise AssertionError(message)


async def _reply(client: TransportClient, rid: int) -> dict[str, Any]:
    """Waits for the reply to `rid`, skipping pushes."""
    with trio.fail_after(10):
        while True:
            frame = await client.receive()
            if frame.get("reply") == rid:
                return frame


async def _push(client: TransportClient, kind: str) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            frame = await client.receive()
            if frame.get("push") == kind:
                return frame


async def _request(client: TransportClient, rid: int, **command: Any) -> dict[str, Any]:
    await client.send({"id": rid, **command})
    reply = await _reply(client, rid)
    if "ok" not in reply:
        raise AssertionError(f"{command} failed: {reply}")
    result: dict[str, Any] = reply["ok"]
    return result


async def _closed(client: TransportClient) -> Closed:
    """Reads until the server ends the connection; how it ended."""
    try:
        with trio.fail_after(10):
            while True:
                await client.receive()
    except Closed as closed:
        return closed


async def _until(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    """Waits for something the server does after the client saw the end (no event to await)."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(message)


class Capability(enum.Enum):
    """What the native protocol says that another transport's protocol may have no words for.
    `check_transport` skips a check that needs a capability the transport lacks, and returns
    the names of the checks it skipped."""

    SENDER = "publications name their sender ('from')"
    CHANNEL_NAME_ERRORS = "a channel name the hub cannot hold is refused (422)"
    ERROR_PUSH = "an error to a command without an id comes as an 'error' push"
    DISCONNECT_NOTICE = "a shutdown sends a 'disconnect' push before the close"


@attrs.define
class _Skips:
    capabilities: frozenset[Capability]
    skipped: list[str] = attrs.field(factory=list)

    def can(self, capability: Capability, check: str) -> bool:
        """Whether the transport has `capability`; if not, `check` is noted as skipped."""
        if capability in self.capabilities:
            return True
        self.skipped.append(f"{check} (no {capability.name})")
        return False


KIT_HUB = HubConfig(
    history_size=3,
    max_channels_per_connection=4,
    max_payload_bytes=16 * 1024,
    max_frame_bytes=32 * 1024,
)
"""The hub limits the checks run under."""


async def check_transport(
    factory: Callable[[], Transport],
    open_client: ClientFactory,
    *,
    closes_with_codes: bool = True,
    joins_on_open: int = 0,
    capabilities: frozenset[Capability] = frozenset(Capability),
) -> list[str]:
    """Runs the conformance checks; raises AssertionError naming the first that fails.

    Leaving `open_client`'s context must end the connection the way a client of the
    transport does when it is done (close the socket, end the session), and `receive` must
    raise `Closed` once the server ended it.

    `closes_with_codes`: whether the transport can tell the client a close code (WebSocket
    and pyrt's SSE and long-poll can; a transport that cannot still has to end the
    connection).
    `joins_on_open`: how many channels a client has joined by the time `open_client` yields
    it (an HTTP stream is opened with its channels in the URL; join ones nobody else uses).
    The channel-limit check counts them.

    The last check shuts the node down: `disconnect`, then the end, for every client, and
    the node's `run` returns once the transport ended every session.

    `capabilities`: what the transport's protocol can express (all of `Capability` for the
    native protocol). Returns the checks skipped for want of one, in order, so a test can
    assert exactly which (nothing is skipped silently).
    """
    config = NodeConfig(port=0, hub=KIT_HUB, drain_timeout=5.0)
    skips = _Skips(frozenset(capabilities))
    with trio.fail_after(120):
        async with _nursery() as nursery:  # a failed check comes out as itself
            node: Node = await nursery.start(Node(config, transports=[factory()]).run)
            await _join_publish_in_order(node, open_client, skips)
            await _payloads_arrive_intact(node, open_client)
            await _resume(node, open_client)
            await _presence(node, open_client)
            await _limits_and_bad_input(node, open_client, closes_with_codes, joins_on_open, skips)
            await _oversized_frame(node, open_client, closes_with_codes)
            await _sessions_end_with_clients(node, open_client)
            await _shutdown(node, open_client, closes_with_codes, skips)
            # No cancel here: run() must return by itself once the transport let go.
        _check(len(node.hub) == 0, "sessions left after the node stopped")
    return skips.skipped


async def _join_publish_in_order(node: Node, open_client: ClientFactory, skips: _Skips) -> None:
    async with open_client(node) as a, open_client(node) as b:
        joined = await _request(a, 1, cmd="join", channel="kit:order")
        _check(joined["offset"] == 0, joined)
        await _request(b, 1, cmd="join", channel="kit:order")
        for n in range(20):
            await a.send({"cmd": "publish", "channel": "kit:order", "data": n})
        ack = await _request(a, 2, cmd="publish", channel="kit:order", data="last", ack=True)
        _check(ack["offset"] == 21, ack)
        got = [(await _push(b, "pub")) for _ in range(21)]
        _check([p["offset"] for p in got] == list(range(1, 22)), "publications out of order")
        _check([p["data"] for p in got] == [*range(20), "last"], "publications changed")
        if skips.can(Capability.SENDER, "client publications carry their sender"):
            _check(all(p["from"] for p in got), "client publications carry their sender")
        # Replies come in the order the commands were sent.
        for rid in range(10, 20):
            await a.send({"id": rid, "cmd": "ping"})
        replies: list[Any] = []
        with trio.fail_after(10):
            while len(replies) < 10:
                frame = await a.receive()
                if "reply" in frame:
                    replies.append(frame["reply"])
        _check(replies == list(range(10, 20)), f"replies out of order: {replies}")


# Strings that break naive framing: line breaks of every kind (SSE splits lines at CR and LF;
# some line readers also at U+2028 and friends), NUL, what an event stream's own fields
# look like, and characters outside the BMP.
_AWKWARD = [
    "line\nbreak",
    "crlf\r\nand\rcr",
    "u2028\u2028u2029\u2029nel\x85vt\x0bff\x0c",
    "nul\x00byte",
    "\n\ndata: injected\nid: 1\n\n",
    "emoji 🎉 and 𝄞",
    "",
]


async def _payloads_arrive_intact(node: Node, open_client: ClientFactory) -> None:
    big = "ü€𝄞x" * 1000  # 10 KB of UTF-8, under the kit's 16 KiB payload limit
    values: list[Any] = [*_AWKWARD, {"nested": {"list": [1, 2.5, None, True]}}, None, big]
    async with open_client(node) as a, open_client(node) as b:
        await _request(a, 1, cmd="join", channel="kit:payloads")
        await _request(b, 1, cmd="join", channel="kit:payloads")
        for value in values:
            await a.send({"cmd": "publish", "channel": "kit:payloads", "data": value})
        got = [(await _push(b, "pub"))["data"] for _ in values]
        _check(got == values, f"publications changed on the way: {got!r} != {values!r}")
        # Not before: a client's send need not be handled yet when send() returns.
        node.publish("kit:payloads", {"server": _AWKWARD})
        server = (await _push(b, "pub"))["data"]
        _check(server == {"server": _AWKWARD}, f"a server publication changed: {server!r}")


async def _resume(node: Node, open_client: ClientFactory) -> None:
    async with open_client(node) as a:
        position = await _request(a, 1, cmd="join", channel="kit:resume")
    node.publish("kit:resume", "missed 1")
    node.publish("kit:resume", "missed 2")
    since = {"offset": position["offset"], "epoch": position["epoch"]}
    async with open_client(node) as again:
        result = await _request(again, 1, cmd="join", channel="kit:resume", since=since)
        _check(result["recovered"] is True, result)
        got = [(await _push(again, "pub"))["data"] for _ in range(2)]
        _check(got == ["missed 1", "missed 2"], got)
        node.publish("kit:resume", "live")
        _check((await _push(again, "pub"))["data"] == "live", "live after the recovered ones")
    for n in range(5):  # more than the history of 3
        node.publish("kit:resume", n)
    async with open_client(node) as late:
        result = await _request(late, 1, cmd="join", channel="kit:resume", since=since)
        _check(result["recovered"] is False, result)
        _check(result["offset"] == 8, result)
        node.publish("kit:resume", "after")
        pub = await _push(late, "pub")
        _check((pub["offset"], pub["data"]) == (9, "after"), f"no replay without history: {pub}")


async def _presence(node: Node, open_client: ClientFactory) -> None:
    async with open_client(node) as a:
        await _request(a, 1, cmd="join", channel="kit:presence", presence=True)
        state = (await _push(a, "presence_state"))["state"]
        _check(state == {}, f"presence of an empty channel: {state}")
        async with open_client(node) as b:
            await _request(b, 1, cmd="join", channel="kit:presence", presence=True)
            await _request(b, 2, cmd="track", channel="kit:presence", key="bob", meta={"x": 1})
            diff = await _push(a, "presence_diff")
            _check(list(diff["joins"]) == ["bob"], diff)
            _check(
                diff["joins"]["bob"][0]["meta"] == {"x": 1},
                'diff["joins"]["bob"][0]["meta"] == {"x": 1}',
            )
        # b went away without untracking: a is told bob left.
        diff = await _push(a, "presence_diff")
        _check(list(diff["leaves"]) == ["bob"], f"a client that went away must leave: {diff}")
    async with open_client(node) as c:
        await _request(c, 1, cmd="join", channel="kit:presence", presence=True)
        state = (await _push(c, "presence_state"))["state"]
        _check(state == {}, f"presence of closed connections must go: {state}")


async def _limits_and_bad_input(
    node: Node,
    open_client: ClientFactory,
    closes_with_codes: bool,
    joins_on_open: int,
    skips: _Skips,
) -> None:
    limit = node.hub.config.max_channels_per_connection
    async with open_client(node) as a, open_client(node) as other:
        await _request(other, 1, cmd="join", channel="kit:bystander")
        for n in range(limit - joins_on_open):
            await _request(a, n + 1, cmd="join", channel=f"kit:limit:{n}")
        await a.send({"id": 9, "cmd": "join", "channel": "kit:limit:9"})
        reply = await _reply(a, 9)
        _check(reply.get("error", {}).get("code") == 429, f"the channel limit: {reply}")
        await a.send({"id": 10, "cmd": "fly"})
        reply = await _reply(a, 10)
        _check(reply.get("error", {}).get("code") == 404, f"an unknown command: {reply}")
        if skips.can(Capability.CHANNEL_NAME_ERRORS, "a bad channel name is refused"):
            await a.send({"id": 11, "cmd": "publish", "channel": "kit limit", "data": 1})
            reply = await _reply(a, 11)
            _check(reply.get("error", {}).get("code") == 422, f"a bad channel name: {reply}")
        await a.send({"id": 12, "cmd": "publish", "channel": "kit:elsewhere", "data": 1})
        reply = await _reply(a, 12)
        _check(reply.get("error", {}).get("code") == 403, f"publishing unjoined: {reply}")
        too_big = "x" * (node.hub.config.max_payload_bytes + 1)
        await a.send({"id": 13, "cmd": "publish", "channel": "kit:limit:0", "data": too_big})
        reply = await _reply(a, 13)
        _check(reply.get("error", {}).get("code") == 413, f"the payload limit: {reply}")
        if skips.can(Capability.ERROR_PUSH, "an error without an id is pushed"):
            await a.send({"cmd": "join"})  # no id: the error comes as a push
            error = await _push(a, "error")
            _check(error.get("code") == 400, f"an error without an id: {error}")
        await _request(a, 14, cmd="ping")  # still usable after errors
        await a.send_raw(b"{not json")
        closed = await _closed(a)
        if closes_with_codes:
            _check(closed.code == 4000, f"a bad frame closes with 4000, not {closed.code}")
        # Only that connection.
        node.publish("kit:bystander", "still here")
        _check((await _push(other, "pub"))["data"] == "still here", "a bystander was hurt")


async def _oversized_frame(node: Node, open_client: ClientFactory, closes_with_codes: bool) -> None:
    limit = node.hub.config.max_frame_bytes
    async with open_client(node) as a, open_client(node) as other:
        await _request(a, 1, cmd="join", channel="kit:big")
        await _request(other, 1, cmd="join", channel="kit:big")
        # Just under the limit is fine (the payload limit answers, not the frame limit).
        frame = b'{"id":2,"cmd":"ping","pad":"%s"}' % (b"x" * (limit - 40))
        await a.send_raw(frame)
        _check("ok" in await _reply(a, 2), "a frame under max_frame_bytes must be read")
        await a.send_raw(b'{"id":3,"cmd":"ping","pad":"%s"}' % (b"x" * limit))
        closed = await _closed(a)
        if closes_with_codes:
            _check(closed.code == 1009, f"a frame over the limit closes with 1009: {closed.code}")
        node.publish("kit:big", "after")
        _check((await _push(other, "pub"))["data"] == "after", "a bystander was hurt")


async def _sessions_end_with_clients(node: Node, open_client: ClientFactory) -> None:
    # Every client of the checks before has left (some ended by the server, some not).
    await _until(lambda: len(node.hub) == 0, "the hub must forget clients that left")
    async with open_client(node) as a:
        await _request(a, 1, cmd="join", channel="kit:gone")
        _check(len(node.hub) == 1, "one client, one hub connection")
    await _until(lambda: len(node.hub) == 0, "the hub must forget a client that left")
    _check("kit:gone" not in node.hub.channels(), "a client that left is still joined")


async def _shutdown(
    node: Node, open_client: ClientFactory, closes_with_codes: bool, skips: _Skips
) -> None:
    async with open_client(node) as a, open_client(node) as b:
        await _request(a, 1, cmd="join", channel="kit:shutdown")
        await _request(b, 1, cmd="join", channel="kit:shutdown")
        node.stop()
        notice = skips.can(Capability.DISCONNECT_NOTICE, "shutdown pushes 'disconnect'")
        for client in (a, b):
            if notice:
                pushed = await _push(client, "disconnect")
                _check(pushed.get("code") == 1001, f"shutdown tells clients to go: {pushed}")
            closed = await _closed(client)
            if closes_with_codes:
                _check(closed.code == 1001, f"shutdown closes with 1001, not {closed.code}")
        await _until(lambda: len(node.hub) == 0, "sessions must end at shutdown", timeout=3.0)


# -- sources -------------------------------------------------------------------------------


class SourceKitFailure(Exception):
    """The error `check_source` makes publishing one event raise: the source must log,
    count (`Node.metrics.source_events_skipped`) and skip that event, and go on."""


class _FailingHub(Hub):
    armed = 0
    """How many of the next publications fail."""

    def _fail(self, what: str) -> None:
        if self.armed:
            self.armed -= 1
            raise SourceKitFailure(f"check_source: publishing {what} failed (on purpose)")

    def publish(
        self, channel: str, data: Any, now: float, *args: Any, **kwargs: Any
    ) -> Publication:
        self._fail(f"on {channel!r}")
        return super().publish(channel, data, now, *args, **kwargs)

    def publish_change(self, change: Any, now: float, *args: Any, **kwargs: Any) -> Publication:
        self._fail("a row change")
        return super().publish_change(change, now, *args, **kwargs)


SOURCE_KIT_VALUES = [*(f"kit-{n}" for n in range(20)), "kit ünïcödé € 𝄞 🎉", "kit 'quoted' \\"]
"""What `check_source` asks the source to produce, in this order."""


async def check_source(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    *,
    channel: str,
    value: Callable[[Any], Any] = lambda data: data,
    timeout: float = 20.0,
) -> None:
    """Runs the conformance checks for a source plugin; raises AssertionError naming the
    first that fails.

    `factory()` makes a fresh source (it is called twice); `produce(values)` makes it emit
    one event per string in `values`, in order, and returns once they are sent; `value`
    gets the string back out of a publication's data; `channel` is where they must appear.
    `timeout` bounds each wait.
    """
    config = NodeConfig(port=0, transports=(), drain_timeout=2.0)
    await _source_publishes_in_order(factory, produce, config, channel, value, timeout)
    await _bad_event_is_skipped(factory, produce, config, channel, value, timeout)


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose body's lone error (a failed check) comes out as itself."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


async def _source_publishes_in_order(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    config: NodeConfig,
    channel: str,
    value: Callable[[Any], Any],
    timeout: float,
) -> None:
    node = Node(config, transports=[], sources=[factory()])
    stopped = trio.Event()

    async def run_node(*, task_status: trio.TaskStatus[Node]) -> None:
        try:
            await node.run(task_status=task_status)
        finally:
            stopped.set()

    async with _nursery() as nursery:
        with trio.fail_after(timeout):
            await nursery.start(run_node)
        session = node.open_session(transport="check_source", pings=False)
        await session.receive(orjson.dumps({"id": 1, "cmd": "join", "channel": channel}))
        reply = await _next_frame(session, timeout)
        _check(reply.get("reply") == 1 and "ok" in reply, f"joining {channel!r}: {reply}")
        with trio.fail_after(timeout):
            await produce(SOURCE_KIT_VALUES)
        got = []
        for _ in SOURCE_KIT_VALUES:
            frame = await _next_push(session, timeout)
            _check(frame.get("channel") == channel, f"published elsewhere: {frame}")
            got.append(value(frame["data"]))
        _check(got == SOURCE_KIT_VALUES, f"events out of order or changed: {got!r}")
        # A node stops with its source running (the source must not hold on past cancel).
        session.end()
        node.stop()
        with trio.move_on_after(config.drain_timeout + 5):
            await stopped.wait()
        hung = not stopped.is_set()
        if hung:
            nursery.cancel_scope.cancel()
    _check(not hung, "the node did not stop with the source running")


async def _bad_event_is_skipped(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    config: NodeConfig,
    channel: str,
    value: Callable[[Any], Any],
    timeout: float,
) -> None:
    hub = _FailingHub(config.hub)
    source = factory()
    node = Node(config, hub=hub, transports=[], sources=[source])
    async with _nursery() as nursery:
        with trio.fail_after(timeout):
            await nursery.start(node.run)
        session = node.open_session(transport="check_source", pings=False)
        await session.receive(orjson.dumps({"id": 1, "cmd": "join", "channel": channel}))
        await _next_frame(session, timeout)
        hub.armed = 1
        with trio.fail_after(timeout):
            await produce(["kit-fail", "kit-after"])
        frame = await _next_push(session, timeout)
        _check(
            value(frame["data"]) == "kit-after",
            f"after an event it could not publish, the source must go on: got {frame}",
        )
        skipped = node.metrics.source_events_skipped[source.name]
        _check(skipped == 1, f"the skipped event must be counted once, not {skipped} times")
        session.end()
        node.stop()


async def _next_frame(session: Session, timeout: float) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            if session.queued:
                result: dict[str, Any] = orjson.loads(session.take(max_frames=1)[0])
                return result
            await session.wait_changed()


async def _next_push(session: Session, timeout: float) -> dict[str, Any]:
    while True:
        frame = await _next_frame(session, timeout)
        if frame.get("push") == "pub":
            return frame


# -- storage engines -------------------------------------------------------------------------

BrokerFactory = Callable[[HubConfig], StorageEngine]
"""Makes a fresh, empty storage engine with the history limits of the config it is given."""


def check_broker(factory: BrokerFactory) -> None:
    """The conformance suite of a storage engine (`pyrt.hub.broker.StorageEngine`): what the
    hub relies on of its `Broker`, `PresenceManager` and `RecordStorage` parts. Raises
    AssertionError at the first thing the engine does wrong. `MemoryBroker` passes it
    (`check_broker(MemoryBroker)`); so must every engine.

    The checks: offsets go up by one per channel from 1 in one epoch; history keeps order and
    its bounds (`history_size`, `history_age`, `history_max_bytes`, forgetting the oldest of
    any channel first, `charge` counting late); recovery from a position is all or nothing,
    and says recovered=False for another epoch, a forgotten publication, a reset, a dropped
    idle stream or a gap in publications taken from elsewhere (`accept`), never a silent
    gap; presence joins, updates and leaves, several metas per key, a gone connection's
    entries expiring; record tables applying mutations, keeping and compacting tombstones
    and skipping replayed source versions.
    """
    for check in (
        _offsets_and_epochs,
        _history_order_and_size,
        _history_age,
        _history_bytes,
        _reset,
        _idle_streams,
        _accepted_publications,
        _presence_of_engine,
        _records_of_engine,
    ):
        check(factory)


def _offsets(publications: Sequence[Publication]) -> list[int]:
    return [p.offset for p in publications]


def _offsets_and_epochs(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    start = broker.position("a", 0.0)
    _check(start.offset == 0 and bool(start.epoch), f"a new stream starts at offset 0: {start}")
    stamp = Timestamp(1_700_000_000_000, 0, "n1")
    first = broker.publish("a", {"n": 1}, 0.0, publisher="c1", key="k", hlc=stamp)
    _check(
        (first.channel, first.offset, first.epoch, first.data) == ("a", 1, start.epoch, {"n": 1}),
        f"the first publication is offset 1 of the stream's epoch: {first}",
    )
    _check(
        (first.publisher, first.key, first.hlc) == ("c1", "k", stamp),
        f"a publication keeps its publisher, key and clock reading: {first}",
    )
    more = [broker.publish("a", n, 1.0) for n in range(2, 6)]
    _check(_offsets(more) == [2, 3, 4, 5], f"offsets go up by one: {_offsets(more)}")
    _check({p.epoch for p in more} == {start.epoch}, "one epoch while nothing is lost")
    other = broker.publish("b", "x", 1.0)
    _check(other.offset == 1, f"each channel has its own offsets: {other}")
    _check(other.epoch != start.epoch, "each stream has its own epoch")
    _check(broker.position("a", 1.0) == more[-1].position, "the position is the latest one")
    _check(set(broker.channels()) >= {"a", "b"}, f"channels: {broker.channels()}")


def _history_order_and_size(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_size=3))
    whole = broker.history("a", 0.0)
    _check(whole.recovered and not whole.publications, "an empty stream's history is complete")
    published = [broker.publish("a", n, 0.0) for n in range(1, 6)]
    epoch = published[0].epoch
    retained = broker.history("a", 0.0)
    _check(_offsets(retained.publications) == [3, 4, 5], "history_size keeps the newest")
    _check(not retained.recovered, "a history that lost its start says so")
    _check(retained.position == StreamPosition(5, epoch), "history gives the position")
    _check([p.data for p in retained.publications] == [3, 4, 5], "history keeps the data, in order")
    cases = [
        (StreamPosition(2, epoch), True, [3, 4, 5]),
        (StreamPosition(4, epoch), True, [5]),
        (StreamPosition(5, epoch), True, []),
        (StreamPosition(1, epoch), False, []),
        (StreamPosition(0, epoch), False, []),
        (StreamPosition(6, epoch), False, []),
        (StreamPosition(3, "another epoch"), False, []),
    ]
    for since, recovered, offsets in cases:
        recovery = broker.history("a", 0.0, since)
        _check(
            (recovery.recovered, _offsets(recovery.publications)) == (recovered, offsets),
            f"recovery from {since}: {recovery.recovered} {_offsets(recovery.publications)}",
        )
        _check(recovery.position == StreamPosition(5, epoch), "recovery gives the position")
    nothing = factory(HubConfig(history_size=0))
    nothing.publish("a", 1, 0.0)
    top = nothing.position("a", 0.0)
    _check(not nothing.history("a", 0.0).publications, "history_size 0 keeps nothing")
    _check(nothing.history("a", 0.0, top).recovered, "but a client at the top misses nothing")


def _history_age(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_age=10.0))
    first = broker.publish("a", 1, 0.0)
    broker.publish("a", 2, 6.0)
    since = StreamPosition(0, first.epoch)
    _check(broker.history("a", 9.0, since).recovered, "within history_age, all is there")
    later = broker.history("a", 12.0)
    _check(_offsets(later.publications) == [2], "history_age forgets the older ones")
    _check(not broker.history("a", 12.0, since).recovered, "a forgotten one is not recovered")
    _check(broker.history("a", 12.0, first.position).recovered, "after it, all is there")


def _history_bytes(factory: BrokerFactory) -> None:
    limit = 6_000
    broker = factory(HubConfig(history_max_bytes=limit))
    published = []
    for n in range(40):
        channel = "ab"[n % 2] if n % 5 else "c"
        published.append(broker.publish(channel, "x" * 200, 0.0, size=300))
    budget = broker.budget
    _check(0 < budget.bytes <= limit, f"history holds at most history_max_bytes: {budget.bytes}")
    _check(budget.evicted > 0, "the budget forgot publications to stay within it")
    kept = {(p.channel, p.offset) for c in "abc" for p in broker.history(c, 0.0).publications}
    _check(budget.retained == len(kept), f"budget.retained counts them: {budget.retained}")
    order = [(p.channel, p.offset) in kept for p in published]
    _check(
        order == sorted(order) and any(order) and not all(order),
        "the oldest publications of any channel are forgotten first",
    )
    for channel in "abc":
        stream = [p for p in published if p.channel == channel]
        gone = [p for p in stream if (channel, p.offset) not in kept]
        if gone:
            recovery = broker.history(channel, 0.0, StreamPosition(0, stream[0].epoch))
            _check(not recovery.recovered, f"{channel}: forgotten publications are not recovered")
            recovery = broker.history(channel, 0.0, gone[-1].position)
            _check(recovery.recovered, f"{channel}: after the forgotten ones, all is there")
    late = factory(HubConfig())
    before = late.budget.bytes
    publication = late.publish("a", 1, 0.0, size=0)
    counted = late.budget.bytes - before
    late.charge(publication, 1_000)
    _check(
        late.budget.bytes - before == counted + 1_000,
        "charge counts a publication's size after it was published",
    )


def _reset(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    last = [broker.publish("a", n, 0.0) for n in range(3)][-1]
    position = broker.reset("a", 1.0)
    _check(position.epoch != last.epoch, f"a reset makes a new epoch: {position}")
    _check(broker.position("a", 1.0) == position, "the position after a reset is the new one")
    recovery = broker.history("a", 1.0, last.position)
    _check(not recovery.recovered, "a position from before a reset is not recovered")
    _check(recovery.position == position, "recovery after a reset gives the new position")
    after = broker.publish("a", "next", 1.0)
    _check(
        after.position == StreamPosition(position.offset + 1, position.epoch),
        f"publications go on in the new epoch: {after}",
    )
    _check(broker.history("a", 1.0, position).recovered, "from the new position, all is there")


def _idle_streams(factory: BrokerFactory) -> None:
    broker = factory(HubConfig(history_idle_ttl=10.0))
    a = broker.publish("a", 1, 0.0)
    b = broker.publish("b", 1, 0.0)
    dropped = broker.expire(20.0, lambda channel: channel == "b")
    _check(dropped == ["a"], f"an idle stream nobody uses is dropped: {dropped}")
    _check(broker.position("b", 20.0) == b.position, "a stream in use is kept")
    _check(
        not broker.history("a", 20.0, a.position).recovered,
        "a dropped stream's positions are not recovered (its epoch is gone)",
    )


def _accepted_publications(factory: BrokerFactory) -> None:
    origin, replica = factory(HubConfig()), factory(HubConfig())
    published = [origin.publish("a", n, 0.0, key="k") for n in range(1, 6)]
    epoch = published[0].epoch
    taken = replica.accept(published[0], 100.0)
    _check(taken is not None and taken.position == published[0].position, "accept keeps offsets")
    _check(taken is not None and taken.time == 100.0, "an accepted publication is stamped now")
    _check(replica.accept(published[0], 100.0) is None, "a publication taken twice is a duplicate")
    replica.accept(published[1], 100.0)
    _check(replica.position("a", 100.0) == published[1].position, "the replica follows the stream")
    _check(
        _offsets(replica.history("a", 100.0, published[0].position).publications) == [2],
        "a replica recovers what it took",
    )
    replica.accept(published[3], 100.0)  # offset 3 never arrived
    _check(
        not replica.history("a", 100.0, published[0].position).recovered,
        "a gap in what was taken is never handed out as recovered",
    )
    recovery = replica.history("a", 100.0, published[2].position)
    _check(
        recovery.recovered and _offsets(recovery.publications) == [4],
        "after the gap, all is there",
    )
    elsewhere = factory(HubConfig())
    other = elsewhere.publish("a", "new", 0.0)
    _check(other.epoch != epoch, "two engines make different epochs")
    replica.accept(other, 100.0)
    _check(replica.position("a", 100.0) == other.position, "another epoch starts afresh")
    _check(
        not replica.history("a", 100.0, published[3].position).recovered,
        "positions of the old epoch are not recovered",
    )


def _presence_of_engine(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    _check(broker.presence("room") == {}, "nobody is present in a new channel")
    ref1, diff = broker.track("room", "c1", "ann", {"device": "phone"})
    _check(
        [m.meta for m in diff.joins.get("ann", ())] == [{"device": "phone"}] and not diff.leaves,
        f"a track is a join: {diff}",
    )
    ref2, _ = broker.track("room", "c2", "ann", {"device": "laptop"})
    broker.track("room", "c2", "bob", {})
    state = broker.presence("room")
    _check(
        [(m.ref, m.conn) for m in state["ann"]] == [(ref1, "c1"), (ref2, "c2")],
        f"several metas under one key, oldest first: {state}",
    )
    ref3, diff = broker.track("room", "c1", "ann", {"device": "tablet"}, ref1)
    _check(
        [m.ref for m in diff.leaves.get("ann", ())] == [ref1]
        and [m.prev_ref for m in diff.joins.get("ann", ())] == [ref1],
        f"an update with a ref replaces that entry: {diff}",
    )
    try:
        broker.track("room", "c1", "ann", {}, "no such ref")
    except KeyError:
        pass
    else:
        raise AssertionError("an update of an unknown ref raises KeyError")
    diff = broker.untrack("room", "c1", "ann")
    _check([m.ref for m in diff.leaves.get("ann", ())] == [ref3], f"untrack leaves: {diff}")
    broker.track("lobby", "c2", "bob", {})
    gone = broker.untrack_conn("c2")
    _check(set(gone) == {"room", "lobby"}, f"a gone connection leaves everywhere: {gone}")
    _check(
        {k: len(v) for k, v in gone["room"].leaves.items()} == {"ann": 1, "bob": 1},
        f"with every entry it had: {gone['room']}",
    )
    _check(broker.presence("room") == {} and broker.presence("lobby") == {}, "nobody is left")


def _records_of_engine(factory: BrokerFactory) -> None:
    broker = factory(HubConfig())
    _check(broker.record_table("todos") is None, "no table before one is made")
    table = broker.new_record_table("todos", LastWriterWins())
    _check(broker.record_table("todos") is table, "the table made is the channel's")
    _check(dict(broker.record_tables()) == {"todos": table}, "record_tables lists it")
    version = itertools.count(1)

    def stamp() -> Timestamp:
        return Timestamp(1_000 * next(version), 0, "n1")

    result = table.apply(Mutation("t1", Op.SET, {"title": "milk"}), stamp())
    _check(result.outcome is Outcome.APPLIED, f"a first write applies: {result}")
    record = table.get("t1")
    _check(record.value == {"title": "milk"} and record.version is not None, f"get: {record}")
    _check(table.get("t2").value is None, "a record never written does not exist")
    table.apply(Mutation("t2", Op.SET, {"title": "eggs"}), stamp())
    deleted = table.apply(Mutation("t1", Op.DELETE), stamp())
    _check(deleted.outcome is Outcome.APPLIED, f"a delete applies: {deleted}")
    _check(table.get("t1").value is None and table.tombstones == 1, "a delete leaves a tombstone")
    _check([r.key for r in table.records()] == ["t1", "t2"], "records lists tombstones too")
    forgotten = table.compact(before=1e15)
    _check(forgotten == 1 and table.tombstones == 0, f"compact forgets tombstones: {forgotten}")
    _check(table.forgotten is not None, "and remembers the newest version it forgot")
    written = table.write("t3", {"title": "bread"}, stamp(), source_version=7)
    _check(written is not None and table.get("t3").value == {"title": "bread"}, "write sets")
    replay = table.write("t3", {"title": "old"}, stamp(), source_version=7)
    _check(replay is None, "a source version already written is a replay: skipped")
    table.remember("origin", 1, "reply", 0.0)
    _check(table.recall("origin", 1, 0.0) == (True, "reply"), "idempotency keys are kept")
    table.expire(100.0, ttl=10.0)
    _check(table.recall("origin", 1, 100.0) == (False, None), "and expire")


# -- a client at the frame level -----------------------------------------------------------


class Peer:
    """One client of a sans-IO `Hub`, at the frame level: it sends native-protocol commands
    (docs/protocol.md) as JSON frames and reads the frames the hub queued for it. No sockets
    and no trio; time is what the caller passes as `now` (seconds, any monotonic origin).

    ```python
    hub = Hub(HubConfig(history_size=10))
    a, b = Peer(hub), Peer(hub)
    a.request(cmd="join", channel="room")   # {"reply": 1, "ok": {...}}
    b.request(cmd="join", channel="room")
    a.send(cmd="publish", channel="room", data="hi")
    b.frames()                              # [{"push": "pub", "channel": "room", ...}]
    ```
    """

    def __init__(self, hub: Hub, now: float = 0.0) -> None:
        self.hub = hub
        self.id = hub.open(now).id
        """The hub's id of this connection (what other clients see as a publication's `from`)."""
        self.pending: list[dict[str, Any]] = []
        """The frames the last `request` read besides its reply (pushes, other replies)."""
        self._ids = itertools.count(1)

    def send(self, now: float = 0.0, /, **command: Any) -> Any:
        """Sends one command; returns its request id: the command's own `id` if it has one,
        else the next number of this peer's."""
        rid = command.pop("id") if "id" in command else next(self._ids)
        self.hub.receive(self.id, orjson.dumps({"id": rid, **command}), now)
        return rid

    def raw(self, frame: bytes | str, now: float = 0.0) -> None:
        """Sends a frame as it is (bad input, a command without an id)."""
        self.hub.receive(self.id, frame, now)

    def frames(self) -> list[dict[str, Any]]:
        """Every frame queued for this client since the last call, oldest first (taken)."""
        outbox = self.hub.connection(self.id).outbox
        frames: list[dict[str, Any]] = []
        while len(outbox):
            frames.extend(orjson.loads(frame) for frame in outbox.pop())
        return frames

    def request(self, now: float = 0.0, /, **command: Any) -> dict[str, Any]:
        """Sends one command and returns its reply; the other frames read meanwhile are in
        `pending`. The hub answers at once, so a command that gets no reply fails here."""
        rid = self.send(now, **command)
        frames = self.frames()
        replies = [f for f in frames if f.get("reply") == rid]
        _check(len(replies) == 1, f"one reply to {rid!r}, not: {frames}")
        self.pending = [f for f in frames if f.get("reply") != rid]
        return replies[0]


# -- the Supabase dialect of the transport kit ----------------------------------------------

SUPABASE_CAPABILITIES = frozenset[Capability]()
"""What Supabase Realtime's protocol can say of `Capability`: none of it. Broadcasts do not
name their sender; any topic is a channel (pyrt percent-encodes what a name cannot hold);
every Phoenix message has a topic, so no command goes without a channel; and a shutdown is
told by the close frame alone."""

_TOPIC_PREFIX = "realtime:"
_PHOENIX_TOPIC = "phoenix"
_KIT_EVENT = "kit"
"""The broadcast event the dialect publishes under."""
_NATIVE_COMMANDS = ("ping", "publish", "mutate", "join", "leave", "track", "untrack", "presence")
_REASON_CODES = {
    "InvalidMessage": 400,
    "InvalidJoinPayload": 400,
    "InvalidFilter": 400,
    "Forbidden": 403,
    "UnknownEvent": 404,
    "NotAllowed": 405,
    "AlreadyJoined": 409,
    "NotJoined": 410,
    "Conflict": 412,
    "PayloadTooLarge": 413,
    "InvalidChannel": 422,
    "ReadOnlyChannel": 423,
    "TooManyChannels": 429,
    "ClientJoinRateLimitReached": 430,
    "MessagePerSecondRateLimitReached": 430,
}
"""A refusal's reason prefix (docs/supabase.md, "Errors") as the native error code."""


class PhoenixSocket(Protocol):
    """A WebSocket to the Supabase transport, as `SupabaseKitClient` uses it: any client
    library fits behind these two calls."""

    async def send(self, frame: str) -> None:
        """Sends one text frame."""
        ...

    async def receive(self) -> str | bytes:
        """The next frame (bytes: a binary one); raises `Closed` once the server closed."""
        ...


@attrs.frozen
class _Sent:
    """What a ref's reply answers, in native terms."""

    rid: Any
    has_id: bool
    """Whether the native command had an `id` (an error without one is a push)."""
    answers_ok: bool = True
    """Whether a success is answered natively (a publish is only when it asked for an ack;
    the dialect joins every channel with `ack`, so the other successes are dropped)."""
    join: str | None = None
    """The channel, for a join's reply."""
    quiet: bool = False
    """A join the dialect made itself (to change the presence key): no native reply."""


@attrs.define
class _Topic:
    """A channel the dialect joined: what a rejoin repeats."""

    join_ref: str
    presence: bool = False
    presence_key: str | None = None


class _NoTranslation(AssertionError):
    """A native command Supabase's protocol has no words for (a test, not a transport, is
    at fault: declare the capability instead)."""


class SupabaseKitClient:
    """The conformance kit's client for the Supabase transport: a `TransportClient` that
    speaks Phoenix (vsn 1.0.0 or 2.0.0) over a `PhoenixSocket`, translating each native
    command into the message a Supabase client would send and each frame back:

    - `join` is `phx_join` on `realtime:<channel>` with `config.pyrt` (pyrt's offsets; `since`
      there), `config.broadcast.ack` and, for `presence`, `config.presence`; its reply is
      the native one (`response.pyrt`).
    - `publish` is a `broadcast` of event `kit` with payload `{"value": data}`; a broadcast
      back (`meta` has its offset and epoch) is a `pub` whose data is `payload["value"]`
      when that is the payload's only key, else the payload (a server publication that is
      an object arrives as it is).
    - `track` is a presence `track`. Supabase fixes a channel's presence key when it joins,
      so tracking under another key first joins the topic again with that key (as a
      Supabase client makes a new channel); `untrack` and `leave` map one to one.
    - `ping` is a heartbeat on topic `phoenix`; any other command name is an event there,
      which Supabase refuses as `UnknownEvent` (the native 404).
    - A refusal's reason (`TooManyChannels: ...`) is the native error with that code;
      `unmatched topic` (a push to a topic not joined) is 403.
    - `send_raw` sends a frame that is no JSON object as it is; one that is a native
      command is translated and, when it carries a `pad` string (the frame-size checks),
      padded back to the native frame's length, so the size limit is met at the same size.

    A native command with no Phoenix counterpart (`mutate`, `presence`, a per-message
    `self`, patterns, a join without a channel) raises AssertionError: declare the
    capability instead (`SUPABASE_CAPABILITIES`). Frames with no native counterpart
    (`system`, `phx_error`, `postgres_changes`) come as pushes named `phoenix:<event>`.
    """

    def __init__(self, socket: PhoenixSocket, vsn: str = "1.0.0") -> None:
        if vsn not in ("1.0.0", "2.0.0"):
            raise ValueError(f"vsn must be 1.0.0 or 2.0.0, not {vsn!r}")
        self.socket = socket
        self.vsn = vsn
        self._refs = itertools.count(1)
        self._sent: dict[str, _Sent] = {}
        self._topics: dict[str, _Topic] = {}
        self._last_ref = ""

    # -- TransportClient ---------------------------------------------------------------------

    async def send(self, command: Mapping[str, Any]) -> None:
        for frame in self._translate(dict(command)):
            await self.socket.send(frame)

    async def send_raw(self, frame: bytes) -> None:
        try:
            command = orjson.loads(frame)
        except orjson.JSONDecodeError:
            command = None
        if not isinstance(command, dict) or not isinstance(command.get("cmd"), str):
            await self.socket.send(frame.decode())  # bad input stays bad input
            return
        frames = self._translate(command)
        pad = command.get("pad")
        if isinstance(pad, str):
            over = len(frames[-1].encode()) - len(frame)
            if over > 0:
                command["pad"] = pad[: max(0, len(pad) - over)]
                self._sent.pop(self._last_ref, None)
                frames[-1:] = self._translate(command)
        for text in frames:
            await self.socket.send(text)

    async def receive(self) -> dict[str, Any]:
        while True:
            frame = self._native(await self.socket.receive())
            if frame is not None:
                return frame

    # -- native to Phoenix -------------------------------------------------------------------

    def _message(self, topic: str, event: str, payload: Any, sent: _Sent) -> str:
        ref = str(next(self._refs))
        self._sent[ref] = sent
        self._last_ref = ref
        joined = self._topics.get(topic)
        join_ref = ref if event == "phx_join" else (joined.join_ref if joined else None)
        if event == "phx_join":
            self._topics[topic].join_ref = ref
        if self.vsn == "2.0.0":
            return orjson.dumps([join_ref, ref, topic, event, payload]).decode()
        message = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        message["join_ref"] = join_ref
        return orjson.dumps(message).decode()

    def _join(self, topic: str, sent: _Sent, since: Any = None) -> str:
        joined = self._topics[topic]
        config: dict[str, Any] = {"broadcast": {"ack": True}, "pyrt": {}}
        if since is not None:
            config["pyrt"]["since"] = since
        presence: dict[str, Any] = {}
        if joined.presence:
            presence["enabled"] = True
        if joined.presence_key is not None:
            presence["key"] = joined.presence_key
        if presence:
            config["presence"] = presence
        return self._message(topic, "phx_join", {"config": config}, sent)

    def _translate(self, command: dict[str, Any]) -> list[str]:
        cmd = command.get("cmd")
        has_id = "id" in command
        rid = command.get("id")
        rest = {k: v for k, v in command.items() if k not in ("cmd", "id")}
        if cmd == "ping":
            return [self._message(_PHOENIX_TOPIC, "heartbeat", rest, _Sent(rid, has_id))]
        if not isinstance(cmd, str) or cmd not in _NATIVE_COMMANDS:
            if not isinstance(cmd, str):
                raise _NoTranslation(f"no Phoenix message for a command without 'cmd': {command}")
            return [self._message(_PHOENIX_TOPIC, cmd, rest, _Sent(rid, has_id))]
        channel = command.get("channel")
        if not isinstance(channel, str):
            raise _NoTranslation(f"a Phoenix message needs a topic: {command}")
        if any(segment in ("*", ">") for segment in channel.split(":")):
            raise _NoTranslation(f"Supabase topics are no patterns: {command}")
        topic = _TOPIC_PREFIX + channel
        if cmd == "join":
            self._topics[topic] = _Topic("", presence=command.get("presence") is True)
            return [self._join(topic, _Sent(rid, has_id, join=channel), command.get("since"))]
        if cmd == "publish":
            if "self" in command:
                raise _NoTranslation(
                    f"Supabase's 'self' is per channel, not per message: {command}"
                )
            payload = {
                "type": "broadcast",
                "event": _KIT_EVENT,
                "payload": {"value": command.get("data")},
            }
            answers_ok = has_id and command.get("ack") is True
            return [self._message(topic, "broadcast", payload, _Sent(rid, has_id, answers_ok))]
        if cmd == "track":
            frames = []
            joined = self._topics.get(topic)
            key = command.get("key")
            if joined is not None and key is not None and key != joined.presence_key:
                joined.presence_key = str(key)
                frames.append(self._join(topic, _Sent(None, False, join=channel, quiet=True)))
            meta = command.get("meta", {})
            payload = {"type": "presence", "event": "track", "payload": meta}
            frames.append(self._message(topic, "presence", payload, _Sent(rid, has_id)))
            return frames
        if cmd == "untrack":
            payload = {"type": "presence", "event": "untrack"}
            return [self._message(topic, "presence", payload, _Sent(rid, has_id))]
        if cmd == "leave":
            frame = self._message(topic, "phx_leave", {}, _Sent(rid, has_id))
            self._topics.pop(topic, None)
            return [frame]
        raise _NoTranslation(f"Supabase's protocol has no '{cmd}' command: {command}")

    # -- Phoenix to native -------------------------------------------------------------------

    def _native(self, raw: str | bytes) -> dict[str, Any] | None:
        if isinstance(raw, bytes):
            topic, payload = _user_broadcast(raw)
            return _publication(topic, payload)
        value = orjson.loads(raw)
        if self.vsn == "2.0.0":
            _join_ref, ref, topic, event, payload = value
        else:
            topic, event, payload, ref = (value[k] for k in ("topic", "event", "payload", "ref"))
        channel = topic.removeprefix(_TOPIC_PREFIX)
        if event == "phx_reply":
            return self._reply(ref, payload)
        if event == "broadcast":
            return _publication(topic, payload)
        if event == "presence_state":
            return {"push": "presence_state", "channel": channel, "state": _presences(payload)}
        if event == "presence_diff":
            return {
                "push": "presence_diff",
                "channel": channel,
                "joins": _presences(payload["joins"]),
                "leaves": _presences(payload["leaves"]),
            }
        if event == "phx_close":
            return None  # after a leave's reply: nothing to tell natively
        return {"push": f"phoenix:{event}", "channel": channel, "payload": payload}

    def _reply(self, ref: Any, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        sent = self._sent.pop(ref, None)
        _check(sent is not None, f"a reply to ref {ref!r}, which the client never sent")
        assert sent is not None
        response = payload.get("response", {})
        if payload.get("status") != "ok":
            if sent.join is not None:
                self._topics.pop(_TOPIC_PREFIX + sent.join, None)
            reason = str(response.get("reason", ""))
            name, _, message = reason.partition(": ")
            if reason == "unmatched topic":
                code: int | None = 403
                message = reason
            else:
                code = _REASON_CODES.get(name)
            error = {"code": code, "message": message or reason}
            if sent.has_id:
                return {"reply": sent.rid, "error": error}
            return {"push": "error", **error}
        if sent.quiet or not (sent.has_id and sent.answers_ok):
            return None
        if sent.join is not None:
            return {"reply": sent.rid, "ok": response["pyrt"]}
        return {"reply": sent.rid, "ok": response}


def _publication(topic: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    body = payload.get("payload", {})
    data = body["value"] if isinstance(body, dict) and set(body) == {"value"} else body
    meta = payload.get("meta") or {}
    return {
        "push": "pub",
        "channel": topic.removeprefix(_TOPIC_PREFIX),
        "offset": meta.get("offset"),
        "epoch": meta.get("epoch"),
        "data": data,
    }


def _user_broadcast(frame: bytes) -> tuple[str, dict[str, Any]]:
    """A vsn 2.0.0 binary broadcast (kind 4: `[4, topic_len, event_len, meta_len,
    encoding]`, the strings, the payload) as (topic, broadcast payload)."""
    _check(len(frame) >= 5 and frame[0] == 4, f"a binary frame of kind {frame[:1]!r}")
    sizes, encoding = frame[1:4], frame[4]
    _check(encoding == 1, f"a binary broadcast with encoding {encoding} (JSON is 1)")
    parts, offset = [], 5
    for size in sizes:
        parts.append(frame[offset : offset + size].decode())
        offset += size
    topic, event, meta = parts
    payload: dict[str, Any] = {"event": event, "payload": orjson.loads(frame[offset:])}
    if meta:
        payload["meta"] = orjson.loads(meta)
    return topic, payload


def _presences(state: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Supabase's `{key: {metas: [{phx_ref, phx_ref_prev?, ...fields}]}}` as the native
    `{key: [{ref, prev_ref?, meta}]}` (Supabase does not say which client tracked it)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, entry in state.items():
        metas = []
        for meta in entry["metas"]:
            fields = dict(meta)
            native = {"ref": fields.pop("phx_ref", None)}
            if "phx_ref_prev" in fields:
                native["prev_ref"] = fields.pop("phx_ref_prev")
            native["meta"] = fields
            metas.append(native)
        out[key] = metas
    return out
