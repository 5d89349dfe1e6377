"""The transport conformance kit: `check_transport` (see `pyrt.testing`)."""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import attrs
import trio

from ..hub.hub import HubConfig
from ..node.config import NodeConfig
from ..node.node import Node
from ..plugin import Transport
from ._checks import _check, _nursery, _until
from .auth import open_auth


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
    config = NodeConfig(port=0, hub=KIT_HUB, drain_timeout=5.0, auth=open_auth())
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
        await _tokenless_reads_nothing(factory, open_client, joins_on_open)
    return skips.skipped


async def _nothing_for(node: Node, client: TransportClient, joins_on_open: int) -> None:
    try:
        refused = False
        try:
            await client.send({"id": 1, "cmd": "join", "channel": "kit:secret"})
            refused = "error" in await _reply(client, 1)
        except Closed:
            refused = True
        _check(refused or joins_on_open > 0, "a client without a token joined")
        node.publish("kit:secret", "not for you")
        node.publish("kit:home:1", "nor this")
        with trio.move_on_after(0.5):
            while True:
                frame = await client.receive()
                _check(frame.get("push") != "pub", f"a client without a token got {frame}")
    except Closed:
        pass  # ended: it gets nothing more


CLOSED_TO_ANONYMOUS = ({"channel": ">", "subscribe": "authenticated", "publish": "authenticated"},)


async def _tokenless_reads_nothing(
    factory: Callable[[], Transport], open_client: ClientFactory, joins_on_open: int
) -> None:
    """Under `[auth]` without anonymous access, a client that brings no token (the kit's
    clients bring none) gets nothing: refused when it opens, or its join refused, and a
    publication never reaches it (docs/auth.md)."""
    auth = open_auth(rules=CLOSED_TO_ANONYMOUS, anonymous=False)
    config = NodeConfig(port=0, hub=KIT_HUB, drain_timeout=5.0, auth=auth)
    async with _nursery() as nursery:
        node: Node = await nursery.start(Node(config, transports=[factory()]).run)
        async with contextlib.AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(open_client(node))
            except Exception:  # refused when it opened (a 401), however the client says so
                client = None
            if client is not None:
                await _nothing_for(node, client, joins_on_open)
        node.stop()


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
