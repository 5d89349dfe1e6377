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
frames the server sends (docs/protocol.md), and reports how the server closed it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

import trio

from ._hub import HubConfig
from ._node import Node, NodeConfig, Transport

__all__ = ["ClientFactory", "Closed", "TransportClient", "check_transport"]


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


async def check_transport(
    factory: Callable[[], Transport],
    open_client: ClientFactory,
    *,
    closes_with_codes: bool = True,
) -> None:
    """Runs the conformance checks; raises AssertionError naming the first that fails.

    `closes_with_codes`: whether the transport can tell the client a close code (WebSocket
    can; a transport that cannot still has to end the connection).
    """
    config = NodeConfig(port=0, hub=HubConfig(history_size=3, max_channels_per_connection=4))
    async with trio.open_nursery() as nursery:
        node: Node = await nursery.start(Node(config, transports=[factory()]).run)
        await _join_publish_in_order(node, open_client)
        await _resume(node, open_client)
        await _presence(node, open_client)
        await _limits_and_bad_input(node, open_client, closes_with_codes)
        nursery.cancel_scope.cancel()


async def _join_publish_in_order(node: Node, open_client: ClientFactory) -> None:
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
        _check(all(p["from"] for p in got), "client publications carry their sender")


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
    for n in range(5):  # more than the history of 3
        node.publish("kit:resume", n)
    async with open_client(node) as late:
        result = await _request(late, 1, cmd="join", channel="kit:resume", since=since)
        _check(result["recovered"] is False, result)
        _check(result["offset"] == 7, result)


async def _presence(node: Node, open_client: ClientFactory) -> None:
    async with open_client(node) as a, open_client(node) as b:
        await _request(a, 1, cmd="join", channel="kit:presence", presence=True)
        state = (await _push(a, "presence_state"))["state"]
        _check(state == {}, f"presence of an empty channel: {state}")
        await _request(b, 1, cmd="join", channel="kit:presence", presence=True)
        await _request(b, 2, cmd="track", channel="kit:presence", key="bob", meta={"x": 1})
        diff = await _push(a, "presence_diff")
        _check(list(diff["joins"]) == ["bob"], diff)
        _check(
            diff["joins"]["bob"][0]["meta"] == {"x": 1},
            'diff["joins"]["bob"][0]["meta"] == {"x": 1}',
        )
    # b went away: a was gone too, so check from a fresh member.
    async with open_client(node) as c:
        await _request(c, 1, cmd="join", channel="kit:presence", presence=True)
        state = (await _push(c, "presence_state"))["state"]
        _check(state == {}, f"presence of closed connections must go: {state}")


async def _limits_and_bad_input(
    node: Node, open_client: ClientFactory, closes_with_codes: bool
) -> None:
    async with open_client(node) as a:
        for n in range(4):
            await _request(a, n + 1, cmd="join", channel=f"kit:limit:{n}")
        await a.send({"id": 9, "cmd": "join", "channel": "kit:limit:9"})
        reply = await _reply(a, 9)
        _check(reply.get("error", {}).get("code") == 429, f"the channel limit: {reply}")
        await a.send({"id": 10, "cmd": "fly"})
        reply = await _reply(a, 10)
        _check(reply.get("error", {}).get("code") == 404, f"an unknown command: {reply}")
        await a.send({"id": 11, "cmd": "publish", "channel": "kit limit", "data": 1})
        reply = await _reply(a, 11)
        _check(reply.get("error", {}).get("code") == 422, f"a bad channel name: {reply}")
        await _request(a, 12, cmd="ping")  # still usable after errors
        await a.send_raw(b"{not json")
        try:
            with trio.fail_after(10):
                while True:
                    await a.receive()
        except Closed as closed:
            if closes_with_codes:
                _check(closed.code == 4000, closed.code)
        else:  # pragma: no cover - receive() only ends by raising
            raise AssertionError("a bad frame must end the connection")
