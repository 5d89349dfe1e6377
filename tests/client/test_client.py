"""The Python client against a real Node over real sockets."""

from __future__ import annotations

import random
from typing import Any

import pytest
import trio
from clientkit import take
from nodekit import until

from pyrt.client import ClientError, ConnectionLost, connect
from pyrt.hub.hub import HubConfig
from pyrt.node.node import Node, NodeConfig
from pyrt.testing import open_auth


async def start(nursery: trio.Nursery, **hub: Any) -> tuple[Node, str]:
    node: Node = await nursery.start(
        Node(NodeConfig(auth=open_auth(), port=0, hub=HubConfig(**hub))).run
    )
    return node, f"ws://127.0.0.1:{node.port}/connection/websocket"


async def test_five_line_usage(nursery: trio.Nursery) -> None:
    _node, url = await start(nursery)
    async with connect(url) as client:
        room = await client.join("room:1")
        offset = await room.publish({"text": "hello"}, echo=True)
        [message] = await take(room, 1)
    assert offset == 1
    assert (message.channel, message.offset, message.data) == ("room:1", 1, {"text": "hello"})
    assert message.sender is not None


async def test_errors_are_raised_with_their_code(nursery: trio.Nursery) -> None:
    _node, url = await start(nursery)
    async with connect(url) as client:
        with pytest.raises(ClientError) as e:
            await client.join("bad channel")
        assert e.value.code == 422
        room = await client.join("room")
        with pytest.raises(ClientError, match="409"):
            await client.join("room")
        with pytest.raises(ClientError) as e:
            await room.publish("x" * 70_000)
        assert e.value.code == 413


async def test_connect_gives_up_after_its_timeout() -> None:
    with pytest.raises(ConnectionLost, match="could not connect"):
        async with connect("ws://127.0.0.1:1/connection/websocket", timeout=0.5):
            pass


async def test_patterns_and_server_publications(nursery: trio.Nursery) -> None:
    node, url = await start(nursery)
    async with connect(url) as client:
        rooms = await client.join("room:*")
        node.publish("room:7", "a")
        node.publish("lobby", "not for us")
        node.publish("room:8", "b")
        got = await take(rooms, 2)
    assert [(m.channel, m.data, m.sender) for m in got] == [
        ("room:7", "a", None),
        ("room:8", "b", None),
    ]


async def test_reconnect_resumes_without_loss_or_duplicates(nursery: trio.Nursery) -> None:
    node, url = await start(nursery)
    async with connect(url, min_backoff=0.01) as client:
        room = await client.join("c")
        node.publish("c", 1)
        assert [m.data for m in await take(room, 1)] == [1]
        client.drop_connection()
        for i in range(2, 6):
            node.publish("c", i)
        got = await take(room, 4)
        assert [m.data for m in got] == [2, 3, 4, 5]
        assert [m.offset for m in got] == [2, 3, 4, 5]
        assert client.connects == 2
        assert room.recovered is True
        assert room.gaps == 0


async def test_out_of_window_resume_resets(nursery: trio.Nursery) -> None:
    node, url = await start(nursery, history_size=2)
    async with connect(url, min_backoff=0.5) as client:  # reconnects after 0.25-0.5 s
        room = await client.join("c", iterate=False)
        resets: list[int | None] = []
        room.on_reset.append(lambda ch: resets.append(ch.offset))
        client.drop_connection()
        await until(lambda: not client.connected, "the client to notice the drop")
        for i in range(5):
            node.publish("c", i)
        await until(lambda: room.recovered is False, "the resume to fail")
        assert resets == [5]  # continue from the top; the app reloads its state
        node.publish("c", "after")
        await until(lambda: room.offset == 6, "the publication after the reset")


async def test_presence_view_and_retrack_after_reconnect(nursery: trio.Nursery) -> None:
    _node, url = await start(nursery)
    async with connect(url, min_backoff=0.01) as a, connect(url) as b:
        doc_a = await a.join("doc", presence=True, iterate=False)
        doc_b = await b.join("doc", presence=True, iterate=False)
        await doc_a.track({"name": "ann"}, key="ann")
        await until(lambda: "ann" in doc_b.presence, "b to see ann")
        assert doc_b.presence["ann"][0]["meta"] == {"name": "ann"}
        first_ref = doc_b.presence["ann"][0]["ref"]
        a.drop_connection()
        # b sees ann leave with the old connection and come back with the new one.
        await until(
            lambda: doc_b.presence.get("ann") and doc_b.presence["ann"][0]["ref"] != first_ref,
            "ann back on a new connection",
        )
        assert len(doc_b.presence["ann"]) == 1
        assert doc_a.presence == doc_b.presence


async def test_kill_connections_under_load_every_message_exactly_once(
    nursery: trio.Nursery,
) -> None:
    """3 clients publish while subscribers' connections are cut at random points; every
    subscriber ends with exactly the sequence an uncut observer saw: nothing lost, nothing
    twice, same order."""
    _node, url = await start(nursery, history_size=2000)
    rng = random.Random(7)
    per_publisher = 150
    async with (
        connect(url) as observer_client,
        connect(url, min_backoff=0.005, max_backoff=0.05) as s1,
        connect(url, min_backoff=0.005, max_backoff=0.05) as s2,
    ):
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
                    if n % 10 == 0:
                        await trio.sleep(0.001)  # the publishers' pace: cuts land between

        async def cutter() -> None:
            for _ in range(12):
                await trio.sleep(rng.uniform(0.005, 0.04))  # cuts at random points in the load
                rng.choice((s1, s2)).drop_connection()

        async with trio.open_nursery() as load:
            for name in ("p1", "p2", "p3"):
                load.start_soon(publisher, name)
            load.start_soon(cutter)
        total = 3 * per_publisher
        await until(lambda: all(len(v) >= total for v in seen.values()), "every message")
        assert len(acked) == total
        truth = seen["observer"]
        assert [o for o, _ in truth] == list(range(1, total + 1))
        assert sorted(map(tuple, (d for _, d in truth))) == sorted(map(tuple, acked))
        for name in ("s0", "s1"):
            assert seen[name] == truth, name
        assert s1.connects + s2.connects > 2  # the cuts happened and were survived


async def test_a_message_in_hand_when_the_link_drops_is_not_lost(nursery: trio.Nursery) -> None:
    """With a full queue the reader waits to hand over a message it has already counted as
    delivered; the link dropping meanwhile must not lose it (nor repeat it after resume)."""
    node, url = await start(nursery)
    async with connect(url, min_backoff=0.01, buffer=1) as client:
        room = await client.join("c")
        for i in range(1, 4):
            node.publish("c", i)
        # 1 fills the queue; the reader holds 2 and waits for room.
        await until(lambda: room.offset == 2, "the reader to hold 2")
        client.drop_connection()
        for i in range(4, 7):
            node.publish("c", i)
        got = await take(room, 6)
    assert [m.data for m in got] == [1, 2, 3, 4, 5, 6]
    assert [m.offset for m in got] == [1, 2, 3, 4, 5, 6]
