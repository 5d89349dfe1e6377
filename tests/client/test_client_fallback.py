"""The client's transport fallback (WebSocket -> SSE -> long-poll) against a real Node, over
real sockets, with a TCP proxy in between that refuses, freezes or cuts connections by the
transport they serve."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from typing import Any

import attrs
import pytest
import trio
from clientkit import take
from nodekit import until
from trio.testing import MockClock

from pyrt.client import Client, ConnectionLost, connect
from pyrt.hub.hub import HubConfig
from pyrt.node.node import Node, NodeConfig
from pyrt.testing import open_auth

FAST = {"min_backoff": 0.01, "max_backoff": 0.2, "ping_interval": 0.2, "stall_timeout": 1.0}
"""Client options for tests: quick reconnects, and a stall noticed after one second."""


async def start(
    nursery: trio.Nursery, transports: tuple[str, ...] | None = None, **hub: Any
) -> tuple[Node, str]:
    config = NodeConfig(auth=open_auth(), port=0, transports=transports, hub=HubConfig(**hub))
    node: Node = await nursery.start(Node(config).run)
    return node, f"http://127.0.0.1:{node.port}"


# -- a proxy that misbehaves on purpose --------------------------------------------------------

_REQUEST = re.compile(rb"(?:GET|POST) /connection/(websocket|sse|poll|send)")
_KINDS = {b"websocket": "websocket", b"sse": "sse", b"poll": "longpoll", b"send": "send"}


@attrs.define(eq=False)
class _Piped:
    kind: str | None = None
    """The transport of the last request seen on this connection."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)


@attrs.define(eq=False)
class Proxy:
    """Forwards TCP to a node. It reads the request lines going through and can refuse new
    requests of some transports (closing the connection, as a proxy that eats WebSocket
    upgrades does), freeze connections of some transports (nothing goes through either
    way, the sockets stay open) or cut connections."""

    target: int
    port: int = 0
    refuse: set[str] = attrs.field(factory=set)
    _frozen: set[str] = attrs.field(factory=set)
    _changed: trio.Event = attrs.field(factory=trio.Event)
    _pipes: set[_Piped] = attrs.field(factory=set)
    requests: list[str] = attrs.field(factory=list)
    """Kinds of every request seen, in order."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def freeze(self, *kinds: str) -> None:
        self._frozen = set(kinds)
        self._changed.set()
        self._changed = trio.Event()

    def open_kinds(self) -> set[str | None]:
        """The transports of the connections open through the proxy now."""
        return {pipe.kind for pipe in self._pipes}

    def cut(self, kinds: Iterable[str] | None = None) -> None:
        for pipe in list(self._pipes):
            if kinds is None or pipe.kind in kinds:
                pipe.scope.cancel()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._serve, listeners)

    async def _serve(self, client: trio.SocketStream) -> None:
        pipe = _Piped()
        self._pipes.add(pipe)
        try:
            async with client:
                server = await trio.open_tcp_stream("127.0.0.1", self.target)
                async with server, trio.open_nursery() as nursery:
                    with pipe.scope:
                        nursery.start_soon(self._pump, client, server, pipe, True)
                        await self._pump(server, client, pipe, False)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            self._pipes.discard(pipe)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, pipe: _Piped, upstream: bool
    ) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                if upstream:
                    for match in _REQUEST.finditer(data):
                        pipe.kind = _KINDS[match.group(1)]
                        self.requests.append(pipe.kind)
                        if pipe.kind in self.refuse:
                            pipe.scope.cancel()
                            return
                while pipe.kind in self._frozen:
                    await self._changed.wait()
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pipe.scope.cancel()


async def start_proxy(nursery: trio.Nursery, node: Node) -> Proxy:
    assert node.port is not None
    proxy: Proxy = await nursery.start(Proxy(node.port).run)
    return proxy


def transports_seen(client: Client) -> list[str]:
    seen: list[str] = []
    client.on_transport.append(lambda t: seen.append(t) if t is not None else None)
    return seen


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "longpoll"])
async def test_a_server_with_one_http_transport(nursery: trio.Nursery, transport: str) -> None:
    """Only `transport` on the server: the client ends up on it and everything works there:
    join, publish with ack and echo, server publications, presence, resume after a drop."""
    node, url = await start(nursery, (transport,))
    async with connect(url, **FAST) as a, connect(url, **FAST) as b:
        assert (a.transport, b.transport) == (transport, transport)
        room_a = await a.join("room", presence=True)
        room_b = await b.join("room", presence=True, iterate=False)
        assert await room_a.publish({"text": "hi"}, echo=True) == 1
        node.publish("room", "from the server")
        got = await take(room_a, 2)
        assert [(m.offset, m.data) for m in got] == [(1, {"text": "hi"}), (2, "from the server")]
        assert got[0].sender is not None
        assert got[1].sender is None
        await room_a.track({"name": "ann"}, key="ann")
        await until(lambda: "ann" in room_b.presence)
        assert room_b.presence["ann"][0]["meta"] == {"name": "ann"}
        first_ref = room_b.presence["ann"][0]["ref"]

        a.drop_connection()
        for i in range(3, 7):
            node.publish("room", i)
        got = await take(room_a, 4)
        assert [m.offset for m in got] == [3, 4, 5, 6]
        assert (a.connects, a.transport, room_a.recovered, room_a.gaps) == (2, transport, True, 0)
        # Re-tracked on the new session; the old session's entry has left.
        await until(
            lambda: [m["ref"] for m in room_b.presence.get("ann", [])] not in ([], [first_ref])
        )
        await until(lambda: len(room_b.presence["ann"]) == 1)
        await until(lambda: room_a.presence == room_b.presence)


async def test_an_old_websocket_url_still_reaches_the_http_transports(
    nursery: trio.Nursery,
) -> None:
    node, _ = await start(nursery, ("longpoll",))
    url = f"ws://127.0.0.1:{node.port}/connection/websocket"
    async with connect(url, **FAST) as client:
        assert client.transport == "longpoll"
        room = await client.join("c")
        node.publish("c", "x")
        assert [m.data for m in await take(room, 1)] == ["x"]


async def test_no_websocket_endpoint_falls_back_to_sse(nursery: trio.Nursery) -> None:
    _node, url = await start(nursery, ("sse", "longpoll"))
    async with connect(url, **FAST) as client:
        assert client.transport == "sse"


async def test_refused_upgrades_fall_back_to_sse_then_long_poll(nursery: trio.Nursery) -> None:
    node, _ = await start(nursery)
    proxy = await start_proxy(nursery, node)
    proxy.refuse = {"websocket"}
    async with connect(proxy.url, **FAST, probe_interval=None) as client:
        seen = transports_seen(client)
        assert client.transport == "sse"
        room = await client.join("c", iterate=False)
        got: list[int] = []
        room.on_message.append(lambda m: got.append(m.offset))
        node.publish("c", 1)
        await until(lambda: got == [1])
        # SSE goes too: the next link is a long-poll one, resuming where SSE left off.
        proxy.refuse.add("sse")
        mark = len(proxy.requests)
        proxy.cut({"sse"})
        for i in range(2, 5):
            node.publish("c", i)
        await until(lambda: client.transport == "longpoll")
        await until(lambda: got == [1, 2, 3, 4])
        assert seen == ["longpoll"]
        assert room.recovered is True
        # A link that worked and closed is retried on its own transport first.
        opened = [kind for kind in proxy.requests[mark:] if kind != "send"]
        assert opened[:2] == ["sse", "longpoll"]


async def test_a_stalled_transport_is_left_within_stall_timeout(nursery: trio.Nursery) -> None:
    """The proxy stops forwarding (the sockets stay open, nothing errors): the client notices
    the silence, moves to the next transport and resumes, losing nothing."""
    node, _ = await start(nursery, history_size=1000)
    proxy = await start_proxy(nursery, node)
    stall = FAST["stall_timeout"]
    async with connect(proxy.url, **FAST, probe_interval=None) as client:
        seen = transports_seen(client)
        room = await client.join("c", iterate=False)
        got: list[Any] = []
        room.on_message.append(lambda m: got.append(m.data))
        # At each loss: the connections still open through the proxy, and what had come.
        losses: list[tuple[set[str | None], list[Any]]] = []
        client.on_transport.append(
            lambda t: losses.append((proxy.open_kinds(), list(got))) if t is None else None
        )
        expected: list[Any] = []
        for frozen, next_transport in (("websocket", "sse"), ("sse", "longpoll")):
            node.publish("c", f"before {frozen}")
            expected.append(f"before {frozen}")
            await until(lambda: got == expected)
            before = list(expected)
            proxy.freeze(frozen)
            for i in range(5):
                node.publish("c", f"while {frozen} is frozen {i}")
                expected.append(f"while {frozen} is frozen {i}")
                await trio.sleep(0.05)  # publications spread over the silence
            await until(lambda t=next_transport: client.transport == t, timeout=stall + 3)
            # The client gave the link up on its own (its stall watch): the frozen
            # connection was still open, nothing had closed or failed; and nothing sent
            # while it was frozen had come through it.
            open_at_loss, got_at_loss = losses[-1]
            assert frozen in open_at_loss
            assert got_at_loss == before
            await until(lambda: got == expected)
        assert len(losses) == 2
        assert seen == ["sse", "longpoll"]
        assert room.gaps == 0
        assert room.recovered is True
        # The client's own commands work on the link it ended up on.
        assert await room.publish("mine", echo=True) == len(expected) + 1
        await until(lambda: got[-1:] == ["mine"])


async def test_a_full_queue_is_not_a_stall(
    nursery: trio.Nursery, autojump_io_clock: MockClock
) -> None:
    """A reader held up by a channel queue the user does not drain is not a silent link: the
    client stays on its transport however long that lasts. In virtual time (only the timers
    matter): no real seconds spent."""
    node, url = await start(nursery)
    async with connect(url, **FAST, buffer=2) as client:
        room = await client.join("c")
        for i in range(20):
            node.publish("c", i)
        await trio.sleep(FAST["stall_timeout"] * 2.5)  # the span under test (virtual time)
        got = await take(room, 20)
        assert [m.data for m in got] == list(range(20))
        assert (client.transport, client.connects) == ("websocket", 1)


async def test_it_probes_back_to_the_preferred_transport(nursery: trio.Nursery) -> None:
    node, _ = await start(nursery)
    proxy = await start_proxy(nursery, node)
    proxy.refuse = {"websocket"}
    async with connect(proxy.url, **FAST, probe_interval=0.2) as client:
        seen = transports_seen(client)
        assert client.transport == "sse"
        room = await client.join("c", iterate=False)
        got: list[int] = []
        room.on_message.append(lambda m: got.append(m.offset))
        await until(lambda: proxy.requests.count("websocket") >= 3, "two failed probes")
        assert client.transport == "sse"
        proxy.refuse.clear()
        for i in range(30):
            node.publish("c", i)
            await trio.sleep(0.02)  # publications spread over the switch back
        await until(lambda: client.transport == "websocket", timeout=5)
        await until(lambda: got == list(range(1, 31)))
        assert seen == ["websocket"]


async def test_connect_raises_when_every_transport_fails(nursery: trio.Nursery) -> None:
    node, _ = await start(nursery, ())  # a node without any transport: 404 everywhere
    proxy = await start_proxy(nursery, node)  # to see what the client tried
    for target in (proxy.url, "http://127.0.0.1:1"):  # 404s; a refused port
        with pytest.raises(ConnectionLost, match=r"could not connect to .* in 0.8 s"):
            async with connect(target, timeout=0.8, min_backoff=0.05):
                pass
    # It gave up at its timeout after going round every transport, not at the first failure.
    assert {"websocket", "sse", "longpoll"} <= set(proxy.requests)


async def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="transports"):
        Client("http://127.0.0.1:1", transports=("websocket", "pigeon"))
    with pytest.raises(ValueError, match="transports"):
        Client("http://127.0.0.1:1", transports=())
    with pytest.raises(ValueError, match="stall_timeout"):
        Client("http://127.0.0.1:1", ping_interval=5, stall_timeout=5)
    with pytest.raises(ValueError, match="URL"):
        Client("127.0.0.1:8000")


async def test_switching_transports_under_load_every_message_exactly_once(
    nursery: trio.Nursery,
) -> None:
    """3 clients publish while the subscribers' transports are refused, frozen and cut in
    turn, so they move between WebSocket, SSE and long-poll; every subscriber ends with
    exactly the sequence an undisturbed observer saw: nothing lost, nothing twice, same
    order."""
    node, url = await start(nursery, history_size=2000)
    proxy = await start_proxy(nursery, node)
    rng = random.Random(11)
    per_publisher = 150
    options = {**FAST, "stall_timeout": 0.6, "ping_interval": 0.15, "probe_interval": 0.3}
    async with (
        connect(url) as observer_client,
        connect(proxy.url, **options) as s1,
        connect(proxy.url, **options) as s2,
    ):
        used = {id(s): transports_seen(s) for s in (s1, s2)}
        observer = await observer_client.join("load", iterate=False)
        subscribers = [await s.join("load", iterate=False) for s in (s1, s2)]
        seen: dict[str, list[tuple[int, Any]]] = {"observer": []}
        observer.on_message.append(lambda m: seen["observer"].append((m.offset, m.data)))
        for i, sub in enumerate(subscribers):
            seen[f"s{i}"] = []
            sub.on_message.append(lambda m, k=f"s{i}": seen[k].append((m.offset, m.data)))
        acked: list[Any] = []

        async def publisher(name: str) -> None:
            async with connect(url) as client:
                channel = await client.join("load", iterate=False)
                for n in range(per_publisher):
                    data = [name, n]
                    await channel.publish(data)
                    acked.append(data)
                    await trio.sleep(0.01 if n % 5 == 0 else 0)  # the publishers' pace

        async def chaos() -> None:
            kinds = ("websocket", "sse", "longpoll")
            for step in range(14):
                await trio.sleep(rng.uniform(0.05, 0.25))  # chaos at random points in the load
                if step % 5 == 4:
                    proxy.freeze(*kinds)  # every link goes silent: stalls
                    await trio.sleep(options["stall_timeout"] * 0.8)  # how long it lasts
                    proxy.freeze()
                proxy.refuse = set(rng.sample(kinds, rng.randint(0, 2)))
                # Cut live links (on a loaded machine a client may still be reconnecting):
                # then every cut is a reconnect, and the count below cannot come up short.
                with trio.move_on_after(5):
                    for s in (s1, s2):
                        await s.wait_connected()
                proxy.cut()
            proxy.refuse = set()

        async with trio.open_nursery() as load:
            for name in ("p1", "p2", "p3"):
                load.start_soon(publisher, name)
            load.start_soon(chaos)
        total = 3 * per_publisher
        await until(
            lambda: all(len(v) >= total for v in seen.values()), "every message", timeout=30
        )
        assert len(acked) == total
        truth = seen["observer"]
        assert [o for o, _ in truth] == list(range(1, total + 1))
        assert sorted(map(tuple, (d for _, d in truth))) == sorted(map(tuple, acked))
        for name in ("s0", "s1"):
            assert seen[name] == truth, name
        for s in (s1, s2):
            assert len(set(used[id(s)])) >= 2, used[id(s)]  # it really switched
            assert s.connects > 5
