"""Supabase Realtime compatibility: the official `realtime` client from PyPI, unmodified,
against a pyrt node under trio (the client runs on its own asyncio loop in a thread), and raw
frames for what the client never sends (vsn 2.0.0, bad input).

docs/supabase.md is the contract these tests hold pyrt to.
"""

from __future__ import annotations

import functools
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import supabasekit
import trio
from nodekit import StartNode, until
from pgserver import PostgresServer
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import RealtimeAcknowledgementStatus
from supabasekit import AsyncioThread, Subscription, config, receive, send, v1
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url
from walkit import run_sql, wal_source

from pyrt.hub.hub import HubConfig
from pyrt.node.node import Node
from pyrt.plugins.supabase import SupabaseTransport
from pyrt.plugins.supabase.phoenix import topic_channel
from pyrt.testing import (
    KIT_HUB,
    SUPABASE_CAPABILITIES,
    ClientFactory,
    Closed,
    SupabaseKitClient,
    check_transport,
)

KEY = "anon-key"

# realtime 2.34 reads websockets' deprecated ConnectionClosed.code and .reason when a server
# closes the socket; under `filterwarnings = error` that would kill its reconnect task.
pytestmark = [
    pytest.mark.filterwarnings("ignore:ConnectionClosed.code is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:ConnectionClosed.reason is deprecated:DeprecationWarning"),
]


# -- the trio side -----------------------------------------------------------------------------


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    """Nodes with the Supabase transport (by entry point name) and its key."""
    return functools.partial(start_node, api_keys=(KEY,), transports=("supabase",))


def supabase(**options: Any) -> dict[str, dict[str, Any]]:
    """`transport_options` for the Supabase transport."""
    return {"supabase": options}


@asynccontextmanager
async def realtime(
    aio: AsyncioThread, node: Node, **options: Any
) -> AsyncIterator[AsyncRealtimeClient]:
    """A connected official client with the tests' key."""
    async with supabasekit.realtime(aio, node, KEY, **options) as client:
        yield client


async def rest_publish(node: Node, channel: str, data: Any) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as client:
        body = {"channel": channel, "data": data}
        response = await client.post(
            "/api/publish", json=body, headers={"authorization": f"Bearer {KEY}"}
        )
        assert response.status_code == 200, response.text


# -- registration ------------------------------------------------------------------------------


def test_the_transport_is_registered_as_an_entry_point() -> None:
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    target = pyproject["project"]["entry-points"]["pyrt.transports"]["supabase"]
    module, _, name = target.partition(":")
    assert (module, name) == ("pyrt.plugins.supabase", "SupabaseTransport")
    assert SupabaseTransport().name == "supabase"
    with pytest.raises(ValueError, match="max_channels must be at least 1"):
        SupabaseTransport(max_channels=0)
    with pytest.raises(TypeError, match="apikeys"):
        SupabaseTransport(apikeys="one-key")  # type: ignore[arg-type]


def test_topics_map_to_channels_native_clients_share() -> None:
    assert topic_channel("realtime:room:1") == "room:1"
    assert topic_channel("realtime:chat room") == "chat%20room"
    assert topic_channel("realtime:a*b:>") == "a%2Ab:%3E"
    assert topic_channel("realtime:a::b") == "a:%:b"
    assert topic_channel("realtime:pg:public:items") == "%70g:public:items"  # not a table
    assert topic_channel("realtime:100%") == "100%25"
    assert topic_channel("realtime:" + "x" * 300).startswith("~")
    assert len(topic_channel("realtime:" + "x" * 300)) == 33


# -- the official client -----------------------------------------------------------------------


async def test_join_and_broadcast_with_self_and_ack(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as a, realtime(aio, node) as b:
        sender = await Subscription(a, "room:1", config(ack=True, echo=True)).subscribe(aio)
        quiet = await Subscription(a, "room:2", config()).subscribe(aio)
        other = await Subscription(b, "room:1").subscribe(aio)
        acks: list[Any] = []

        async def push() -> None:
            push = await sender.channel.push(
                "broadcast", {"type": "broadcast", "event": "hello", "payload": {"n": 1}}
            )
            push.receive(RealtimeAcknowledgementStatus.Ok, acks.append)

        await aio.run(push())
        await until(lambda: bool(acks), "the ack")
        await until(lambda: bool(other.broadcasts), "the broadcast at the other client")
        await until(lambda: bool(sender.broadcasts), "the broadcast back at the sender (self)")
        expected = {"event": "hello", "payload": {"n": 1}}  # the client drops "type"
        assert other.broadcasts == [expected]
        assert sender.broadcasts == [expected]
        # self: false (the default) keeps a sender's own broadcasts from it.
        await aio.run(quiet.channel.send_broadcast("ping", {"n": 2}))
        await aio.run(other.channel.send_broadcast("pong", {"n": 3}))
        await until(lambda: len(sender.broadcasts) == 2, "the other client's broadcast")
        assert sender.broadcasts[1]["event"] == "pong"
        assert quiet.broadcasts == []
        assert [b["event"] for b in other.broadcasts] == ["hello"]
        # A publication from the REST API (or a native client) on the same channel.
        await rest_publish(node, "room:1", {"event": "from-api", "payload": {"ok": True}})
        await rest_publish(node, "room:1", [1, 2])
        await until(lambda: len(other.broadcasts) == 3, "the API's publications")
        assert other.broadcasts[1]["event"] == "from-api"
        assert other.broadcasts[1]["payload"] == {"ok": True}
        assert other.broadcasts[2]["event"] == "message"
        assert other.broadcasts[2]["payload"] == {"value": [1, 2]}


async def test_presence_track_and_untrack_seen_by_another_client(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as a, realtime(aio, node) as b:
        watcher = Subscription(a, "lobby", config(key="ann")).watch_presence()
        await watcher.subscribe(aio)
        await until(lambda: watcher.syncs >= 1, "the first presence_state")
        await aio.run(watcher.channel.track({"name": "ann"}))
        member = await Subscription(b, "lobby", config(key="bob")).subscribe(aio)
        await aio.run(member.channel.track({"name": "bob", "status": "online"}))
        await until(lambda: any(k == "bob" for k, _ in watcher.joins), "bob's join")
        (bob,) = [new for key, new in watcher.joins if key == "bob"]
        assert [{k: v for k, v in p.items() if k != "presence_ref"} for p in bob] == [
            {"name": "bob", "status": "online"}
        ]
        state = watcher.channel.presence_state()
        assert sorted(state) == ["ann", "bob"]
        assert state["ann"][0]["name"] == "ann"
        # Tracking again updates the entry: a leave and a join for one key, one entry after.
        await aio.run(member.channel.track({"name": "bob", "status": "away"}))
        await until(
            lambda: watcher.channel.presence_state()["bob"][0].get("status") == "away",
            "bob's update",
        )
        assert len(watcher.channel.presence_state()["bob"]) == 1
        await aio.run(member.channel.untrack())
        await until(lambda: "bob" not in watcher.channel.presence_state(), "bob's untrack")
        assert watcher.leaves[-1][0] == "bob"
        assert sorted(watcher.channel.presence_state()) == ["ann"]
        # Leaving the channel removes what it tracked.
        await aio.run(member.channel.track({"name": "bob"}))
        await until(lambda: "bob" in watcher.channel.presence_state(), "bob's return")
        await aio.run(b.remove_channel(member.channel))
        await until(lambda: "bob" not in watcher.channel.presence_state(), "bob's leave")
        assert node.hub.presence(topic_channel("realtime:lobby")).keys() == {"ann"}


async def test_two_channels_on_one_socket(start_node: StartNode, aio: AsyncioThread) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:
        first = await Subscription(client, "a").subscribe(aio)
        second = await Subscription(client, "b").subscribe(aio)
        await rest_publish(node, "a", {"event": "x", "payload": {"to": "a"}})
        await rest_publish(node, "b", {"event": "x", "payload": {"to": "b"}})
        # A fence on each: the socket carries frames in order, so a broadcast that went to
        # the wrong channel would arrive before it.
        await rest_publish(node, "a", {"event": "fence", "payload": {}})
        await rest_publish(node, "b", {"event": "fence", "payload": {}})
        await until(lambda: len(first.broadcasts) == len(second.broadcasts) == 2, "the fences")
        assert [b["payload"] for b in first.broadcasts] == [{"to": "a"}, {}]
        assert [b["payload"] for b in second.broadcasts] == [{"to": "b"}, {}]
        # Leaving one keeps the other.
        await aio.run(first.channel.unsubscribe())
        await until(lambda: RealtimeSubscribeStates.CLOSED in first.states, "the leave")
        await rest_publish(node, "a", {"event": "x", "payload": {"to": "a"}})
        await rest_publish(node, "b", {"event": "x", "payload": {"to": "b", "n": 2}})
        await until(lambda: len(second.broadcasts) == 3, "the second broadcast on b")
        assert len(first.broadcasts) == 2
        assert node.hub.channels() == {"b": 1}


async def test_the_client_reconnects_and_rejoins_after_the_server_drops_it(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    # The python client sends a heartbeat every 15 s at most: with a 1.5 s idle timeout the
    # server drops its socket (4009) soon after each connect.
    hub = HubConfig(idle_timeout=1.5, ping_interval=1.0)
    node = await start_node(hub=hub)
    async with realtime(aio, node, initial_backoff=0.1) as client:
        sub = await Subscription(client, "room:r").subscribe(aio)
        await until(
            lambda: sub.states.count(RealtimeSubscribeStates.SUBSCRIBED) >= 2,
            "a rejoin after the server dropped the socket",
        )
        assert RealtimeSubscribeStates.CHANNEL_ERROR in sub.states
        await rest_publish(node, "room:r", {"event": "after", "payload": {}})
        await until(lambda: bool(sub.broadcasts), "a broadcast after the reconnect", timeout=5)
        assert sub.broadcasts[0]["event"] == "after"


async def test_the_client_reconnects_to_a_restarted_server(
    aio: AsyncioThread, start_node: StartNode
) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_node(nursery=nursery)
        port = first.port
        async with realtime(aio, first, initial_backoff=0.2, max_retries=8) as client:
            sub = await Subscription(client, "room:x").subscribe(aio)
            first.stop()
            await until(lambda: RealtimeSubscribeStates.CHANNEL_ERROR in sub.states, "an error")
            second = await start_node(nursery=nursery, port=port)
            await until(
                lambda: sub.states.count(RealtimeSubscribeStates.SUBSCRIBED) >= 2, "the rejoin"
            )
            await rest_publish(second, "room:x", {"event": "back", "payload": {}})
            await until(lambda: bool(sub.broadcasts), "a broadcast from the new server")
        second.stop()


# -- postgres_changes --------------------------------------------------------------------------


async def test_postgres_changes_with_a_filter(
    postgres: PostgresServer,
    wal_db: str,
    aio: AsyncioThread,
    start_node: StartNode,
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery=nursery, sources=[wal_source(postgres, wal_db)])
        async with realtime(aio, node) as client:
            sub = Subscription(client, "db")
            sub.watch_changes("INSERT", table="items", filter="n=gt.5")
            sub.watch_changes("UPDATE", schema="public", table="items", filter="n=gt.5")
            sub.watch_changes("DELETE", table="items")
            sub.watch_changes("*", table="other")
            await sub.subscribe(aio)
            await until(lambda: bool(sub.system), "the system message")
            assert sub.system[0].message == "Subscribed to PostgreSQL"
            assert (sub.system[0].status, sub.system[0].channel) == ("ok", "db")
            ids = [c.id for c in sub.channel.postgres_changes_callbacks]
            assert all(isinstance(i, int) and i > 0 for i in ids)
            assert len(set(ids)) == 4
            await run_sql(
                postgres,
                wal_db,
                "INSERT INTO items VALUES (1, 'small', 1), (2, 'big', 10);"
                "UPDATE items SET body = 'bigger' WHERE id = 2;"
                "UPDATE items SET body = 'still small' WHERE id = 1;"
                "DELETE FROM items WHERE id = 1;"
                "INSERT INTO other VALUES (7, 'o');",
            )
            # A fence: changes arrive in commit order, so one too many would come before it.
            await run_sql(postgres, wal_db, "INSERT INTO other VALUES (8, 'fence');")
            await until(lambda: len(sub.changes) >= 5, "four changes and the fence", timeout=20)
        node.stop()
    seen = [(c["event"], c["data"]["type"], c["data"]["table"]) for c in sub.changes]
    assert seen == [
        ("INSERT", "INSERT", "items"),
        ("UPDATE", "UPDATE", "items"),
        ("DELETE", "DELETE", "items"),
        ("*", "INSERT", "other"),
        ("*", "INSERT", "other"),
    ]
    assert sub.changes[4]["data"]["record"] == {"id": 8, "body": "fence"}
    insert, update, delete, other = (c["data"] for c in sub.changes[:4])
    assert insert["record"] == {"id": 2, "body": "big", "n": 10}
    assert insert["schema"] == "public"
    assert insert["errors"] is None
    assert {"name": "n", "type": "int4"} in insert["columns"]
    assert insert["commit_timestamp"].endswith("Z")
    assert update["record"] == {"id": 2, "body": "bigger", "n": 10}
    assert "old_record" in update
    assert delete["old_record"] == {"id": 1}
    assert "record" not in delete
    assert other["record"] == {"id": 7, "body": "o"}


async def test_mismatched_filters_are_refused_at_join(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:
        sub = Subscription(client, "bad")
        sub.watch_changes("INSERT", table="items", filter="n=between.1")
        await aio.run(
            sub.channel.subscribe(lambda s, e: (sub.states.append(s), sub.errors.append(e)))
        )
        assert sub.states == [RealtimeSubscribeStates.CHANNEL_ERROR]
        assert "InvalidFilter: config.postgres_changes[0].filter" in str(sub.errors[0])
        assert node.hub.channels() == {}


# -- raw frames --------------------------------------------------------------------------------


def socket_url(node: Node, vsn: str | None = None, key: str | None = KEY, path: str = "") -> str:
    url = f"ws://127.0.0.1:{node.port}{path or '/realtime/v1/websocket'}"
    params = [f"apikey={key}"] if key is not None else []
    if vsn is not None:
        params.append(f"vsn={vsn}")
    return url + ("?" + "&".join(params) if params else "")


async def closed_by_server(ws: WebSocketConnection) -> ConnectionClosed:
    with trio.fail_after(5):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as e:
            closed = e
    await ws._stream.aclose()
    return closed


# -- the conformance kit, in Supabase's dialect ----------------------------------------------


class TrioPhoenixSocket:
    """A trio-websocket connection as the kit's `PhoenixSocket`."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, frame: str) -> None:
        await self.ws.send_message(frame)

    async def receive(self) -> str | bytes:
        try:
            return await self.ws.get_message()
        except ConnectionClosed as e:
            raise Closed(e.reason.code) from None


def supabase_kit_client(vsn: str) -> ClientFactory:
    @asynccontextmanager
    async def open_client(node: Node) -> AsyncIterator[SupabaseKitClient]:
        async with open_websocket_url(socket_url(node, vsn)) as ws:
            yield SupabaseKitClient(TrioPhoenixSocket(ws), vsn)
        await ws._stream.aclose()  # see closed_by_server

    return open_client


@pytest.mark.parametrize("vsn", ["1.0.0", "2.0.0"])
async def test_the_supabase_transport_passes_the_conformance_kit_in_its_dialect(vsn: str) -> None:
    def transport() -> SupabaseTransport:
        # Each Phoenix channel is a hub connection of its own: the kit's channel limit is
        # the socket's.
        return SupabaseTransport(apikeys=[KEY], max_channels=KIT_HUB.max_channels_per_connection)

    skipped = await check_transport(
        transport, supabase_kit_client(vsn), capabilities=SUPABASE_CAPABILITIES
    )
    # What Supabase's protocol cannot say, and nothing else.
    assert skipped == [
        "client publications carry their sender (no SENDER)",
        "a bad channel name is refused (no CHANNEL_NAME_ERRORS)",
        "an error without an id is pushed (no ERROR_PUSH)",
        "shutdown pushes 'disconnect' (no DISCONNECT_NOTICE)",
    ]


async def test_the_dialect_kit_fails_a_transport_that_breaks_a_check() -> None:
    # The socket's channel limit left at 100: the kit's fifth join is not refused.
    with pytest.raises(AssertionError, match="the channel limit"):
        await check_transport(
            lambda: SupabaseTransport(apikeys=[KEY]),
            supabase_kit_client("1.0.0"),
            capabilities=SUPABASE_CAPABILITIES,
        )


async def test_the_dialect_refuses_what_phoenix_cannot_say() -> None:
    """A native command with no Phoenix counterpart fails loudly, before anything is sent:
    a test must declare the capability, not get a made-up translation."""
    sent: list[str] = []

    class Recorder:
        async def send(self, frame: str) -> None:
            sent.append(frame)

        async def receive(self) -> str | bytes:
            raise Closed(1000)

    client = SupabaseKitClient(Recorder())
    for command, message in [
        ({"cmd": "mutate", "channel": "c", "key": "k"}, "no 'mutate' command"),
        ({"cmd": "presence", "channel": "c"}, "no 'presence' command"),
        ({"cmd": "publish", "channel": "c", "data": 1, "self": True}, "per channel"),
        ({"cmd": "join", "channel": "a:*"}, "no patterns"),
        ({"cmd": "join"}, "needs a topic"),
        ({"channel": "c"}, "without 'cmd'"),
    ]:
        with pytest.raises(AssertionError, match=message):
            await client.send(command)
    assert sent == []


async def test_heartbeat_and_join_over_raw_v1_frames(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(socket_url(node, path="/socket/websocket")) as ws:
        await send(ws, v1("phoenix", "heartbeat", {}, ref="7"))
        assert await receive(ws) == {
            "topic": "phoenix",
            "event": "phx_reply",
            "payload": {"status": "ok", "response": {}},
            "ref": "7",
        }
        changes = [{"event": "insert", "table": "t", "filter": "id=eq.1", "extra": 1}]
        join = {"config": {"postgres_changes": changes, "broadcast": {"self": "true"}}}
        await send(ws, v1("realtime:r", "phx_join", join, ref="1"))
        reply = await receive(ws)
        assert reply["event"] == "phx_reply"
        assert reply["payload"]["status"] == "ok"
        (echoed,) = reply["payload"]["response"]["postgres_changes"]
        assert echoed == {**changes[0], "id": echoed["id"]}  # as sent, with an integer id
        assert isinstance(echoed["id"], int)
        system = await receive(ws)
        assert system == {
            "topic": "realtime:r",
            "event": "system",
            "payload": {
                "extension": "postgres_changes",
                "status": "ok",
                "message": "Subscribed to PostgreSQL",
                "channel": "r",
            },
            "ref": None,
        }
        # "self" given as a string is understood.
        await send(ws, v1("realtime:r", "broadcast", {"event": "e", "payload": {}}, ref="2"))
        assert (await receive(ws))["payload"]["event"] == "e"
        await send(ws, v1("realtime:r", "phx_leave", {}, ref="3"))
        assert (await receive(ws))["payload"] == {"status": "ok", "response": {}}
        close = await receive(ws)
        assert (close["event"], close["ref"]) == ("phx_close", "1")
        assert node.hub.channels() == {}


async def test_v2_arrays_and_binary_user_broadcasts(start_node: StartNode) -> None:
    node = await start_node()
    async with (
        open_websocket_url(socket_url(node, vsn="2.0.0")) as sender,
        open_websocket_url(socket_url(node, vsn="2.0.0")) as v2_reader,
        open_websocket_url(socket_url(node, vsn="1.0.0")) as v1_reader,
    ):
        await send(sender, [None, "h1", "phoenix", "heartbeat", {}])
        ok = {"status": "ok", "response": {}}
        assert await receive(sender) == [None, "h1", "phoenix", "phx_reply", ok]
        await send(sender, ["j", "j", "realtime:x", "phx_join", {"config": []}])
        refused = await receive(sender)
        assert refused[:4] == ["j", "j", "realtime:x", "phx_reply"]
        assert refused[4]["status"] == "error"
        await send(
            sender, ["1", "1", "realtime:bin", "phx_join", {"config": {"broadcast": {"ack": True}}}]
        )
        assert await receive(sender) == [
            "1",
            "1",
            "realtime:bin",
            "phx_reply",
            {"status": "ok", "response": {"postgres_changes": []}},
        ]
        await send(v2_reader, ["5", "5", "realtime:bin", "phx_join", {}])
        assert (await receive(v2_reader))[3] == "phx_reply"
        await send(v1_reader, v1("realtime:bin", "phx_join", {}))
        assert (await receive(v1_reader))["event"] == "phx_reply"
        # kind 3: join_ref, ref, topic, event, metadata (empty), JSON encoding, payload.
        strings = [b"1", b"2", b"realtime:bin", b"shout", b""]
        header = bytes([3, *(len(s) for s in strings), 1])
        await sender.send_message(header + b"".join(strings) + b'{"loud":true}')
        assert await receive(sender) == [
            "1",
            "2",
            "realtime:bin",
            "phx_reply",
            {"status": "ok", "response": {}},
        ]
        frame = await receive(v2_reader)
        topic, event = b"realtime:bin", b"shout"
        assert frame == bytes([4, len(topic), len(event), 0, 1]) + topic + event + b'{"loud":true}'
        assert await receive(v1_reader) == {
            "topic": "realtime:bin",
            "event": "broadcast",
            "payload": {"type": "broadcast", "event": "shout", "payload": {"loud": True}},
            "ref": None,
        }
        # A JSON broadcast from a v2 client works too, and binary payloads are refused.
        await send(sender, ["1", "3", "realtime:bin", "broadcast", {"event": "e", "payload": {}}])
        assert (await receive(sender))[4]["status"] == "ok"
        await sender.send_message(bytes([3, 1, 1, 12, 1, 0, 0]) + b"14realtime:binx\x00\x01")
        refusal = await receive(sender)
        assert refusal[1] == "4"
        assert refusal[4]["response"]["reason"].startswith("BinaryPayloadNotSupported")


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        ("not json", "frame is not JSON"),
        ("[1, 2]", "frame must be a JSON object {topic, event, payload, ref}"),
        ('{"topic": 1, "event": "x"}', "'topic' and 'event' must be strings"),
        ('{"topic": "t", "event": "x", "ref": []}', "'ref' must be a string or null"),
        (b"\x03\x00", "binary frames need vsn 2.0.0"),
    ],
)
async def test_malformed_frames_close_the_socket_with_4000(
    start_node: StartNode, frame: str | bytes, reason: str
) -> None:
    node = await start_node()
    async with open_websocket_url(socket_url(node)) as ws:
        await ws.send_message(frame)
        closed = await closed_by_server(ws)
    assert closed.reason.code == 4000
    assert closed.reason.reason is not None
    assert closed.reason.reason.startswith(reason)


async def test_malformed_v2_frames_close_the_socket(start_node: StartNode) -> None:
    node = await start_node()
    for frame, reason in [
        ('{"topic": "t"}', "frame must be a JSON array"),
        (b"\x07abc", "binary frame of unknown kind 7"),
        (b"\x03\x05\x00\x00\x00\x00\x01ab", "binary frame shorter than its header says"),
        (b"\x03\x00\x00\x01\x01\x00\x09tx{}", "binary broadcast encoding 9"),
    ]:
        async with open_websocket_url(socket_url(node, vsn="2.0.0")) as ws:
            await ws.send_message(frame)
            closed = await closed_by_server(ws)
        assert closed.reason.code == 4000
        assert closed.reason.reason is not None
        assert closed.reason.reason.startswith(reason)


async def test_unknown_topics_and_events_get_error_replies(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("realtime:nowhere", "broadcast", {"event": "x"}, ref="1"))
        reply = await receive(ws)
        assert (reply["topic"], reply["ref"]) == ("realtime:nowhere", "1")
        assert reply["payload"] == {"status": "error", "response": {"reason": "unmatched topic"}}
        await send(ws, v1("elsewhere", "phx_join", {}, ref="2"))
        assert (await receive(ws))["payload"]["response"]["reason"] == "unmatched topic"
        await send(ws, v1("phoenix", "dance", {}, ref="3"))
        reason = (await receive(ws))["payload"]["response"]["reason"]
        assert reason == "UnknownEvent: 'dance' on phoenix"
        await send(ws, v1("realtime:t", "phx_join", {}, ref="4"))
        await receive(ws)
        await send(ws, v1("realtime:t", "dance", {}, ref="5"))
        assert (await receive(ws))["payload"]["response"] == {"reason": "UnknownEvent: 'dance'"}
        await send(ws, v1("realtime:t", "broadcast", {"payload": {}}, ref="6"))
        reason = (await receive(ws))["payload"]["response"]["reason"]
        assert reason == "InvalidMessage: a broadcast needs an 'event' string"
        await send(ws, v1("realtime:t", "broadcast", [1], ref="7"))
        reason = (await receive(ws))["payload"]["response"]["reason"]
        assert reason == "InvalidMessage: 'payload' must be an object"
        await send(ws, v1("realtime:t", "presence", {"event": "dance"}, ref="8"))
        reason = (await receive(ws))["payload"]["response"]["reason"]
        assert reason == "InvalidMessage: a presence event is track or untrack"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ({"config": []}, "InvalidJoinPayload: 'config' must be an object"),
        ({"config": {"broadcast": {"ack": "yes"}}}, "InvalidJoinPayload: 'config.broadcast.ack'"),
        ({"config": {"postgres_changes": {}}}, "InvalidJoinPayload: 'config.postgres_changes'"),
        ({"config": {"postgres_changes": [{"event": "TRUNCATE"}]}}, "InvalidJoinPayload: "),
        ({"config": {"postgres_changes": [{"event": "*", "filter": "a=zz.1"}]}}, "InvalidFilter: "),
        ({"access_token": 5}, "InvalidJoinPayload: 'access_token' must be a string"),
        ({"config": {"pyrt": {"since": 5}}}, "InvalidJoinPayload: 'config.pyrt.since'"),
    ],
)
async def test_bad_joins_are_refused_with_a_reason(
    start_node: StartNode, payload: Any, reason: str
) -> None:
    node = await start_node()
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("realtime:j", "phx_join", payload, ref="1"))
        reply = await receive(ws)
        assert reply["payload"]["status"] == "error"
        assert reply["payload"]["response"]["reason"].startswith(reason)
    assert node.hub.channels() == {}
    assert len(node.hub) == 0


async def test_a_socket_joins_at_most_max_channels(start_node: StartNode) -> None:
    node = await start_node(transport_options=supabase(max_channels=2))
    async with open_websocket_url(socket_url(node)) as ws:
        for n in range(3):
            await send(ws, v1(f"realtime:c{n}", "phx_join", {}, ref=str(n)))
            reply = await receive(ws)
        assert reply["payload"]["response"] == {
            "reason": "TooManyChannels: at most 2 channels per socket"
        }
        # Joining a topic again replaces its channel (a client's rejoin), within the limit.
        await send(ws, v1("realtime:c0", "phx_join", {}, ref="9"))
        assert (await receive(ws))["payload"]["status"] == "ok"
    await until(lambda: len(node.hub) == 0, "the sessions' end")


@pytest.mark.parametrize(
    ("key", "headers", "status", "error"),
    [
        (None, {}, 401, "missing apikey: send it as ?apikey= or an x-api-key header"),
        ("wrong", {}, 401, "invalid apikey"),
        (None, {"x-api-key": "wrong"}, 401, "invalid apikey"),
    ],
)
async def test_a_bad_apikey_is_refused_before_the_upgrade(
    start_node: StartNode, key: str | None, headers: dict[str, str], status: int, error: str
) -> None:
    node = await start_node()
    async with httpx.AsyncClient() as client:
        response = await client.get(
            socket_url(node, key=key).replace("ws://", "http://"),
            headers={
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                **headers,
            },
        )
    assert response.status_code == status
    assert response.json() == {"error": error}


async def test_the_key_may_come_in_a_header_and_vsn_is_checked(start_node: StartNode) -> None:
    node = await start_node(transport_options=supabase(apikeys=["browser-key"]))
    url = socket_url(node, key=None)
    async with open_websocket_url(url, extra_headers=[("x-api-key", "browser-key")]) as ws:
        await send(ws, v1("phoenix", "heartbeat", {}))
        assert (await receive(ws))["payload"]["status"] == "ok"
    async with httpx.AsyncClient() as client:
        response = await client.get(
            socket_url(node, vsn="3.0.0").replace("ws://", "http://"),
            headers={"connection": "upgrade", "upgrade": "websocket"},
        )
    assert response.status_code == 400
    assert response.json() == {"error": "unsupported vsn '3.0.0': use 1.0.0 or 2.0.0"}


async def test_an_oversized_frame_closes_with_1009(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(max_frame_bytes=1000))
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("phoenix", "heartbeat", {"pad": "x" * 2000}))
        closed = await closed_by_server(ws)
    assert closed.reason.code == 1009
    assert closed.reason.reason == "frame larger than 1000 bytes"


async def test_a_broadcast_over_the_payload_limit_is_refused(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(max_payload_bytes=100))
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("realtime:p", "phx_join", {}))
        await receive(ws)
        await send(ws, v1("realtime:p", "broadcast", {"event": "e", "payload": {"x": "y" * 200}}))
        reply = await receive(ws)
        assert reply["payload"]["status"] == "error"
        assert reply["payload"]["response"]["reason"].startswith("PayloadTooLarge: ")


# -- pyrt's extras ----------------------------------------------------------------------------


async def test_offsets_and_resume_for_clients_that_ask(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("realtime:h", "phx_join", {"config": {"pyrt": {}}}, ref="1"))
        extras = (await receive(ws))["payload"]["response"]["pyrt"]
        assert extras["channel"] == "h"
        assert extras["offset"] == 0
        for n in range(3):
            await rest_publish(node, "h", {"event": "n", "payload": {"n": n}})
        metas = [(await receive(ws))["payload"]["meta"] for _ in range(3)]
        assert [m["offset"] for m in metas] == [1, 2, 3]
        epoch = metas[0]["epoch"]
    # Later: resume after offset 1.
    async with open_websocket_url(socket_url(node)) as ws:
        since = {"offset": 1, "epoch": epoch}
        await send(ws, v1("realtime:h", "phx_join", {"config": {"pyrt": {"since": since}}}))
        reply = (await receive(ws))["payload"]["response"]
        assert reply["pyrt"] == {"channel": "h", "offset": 3, "epoch": epoch, "recovered": True}
        missed = [(await receive(ws))["payload"] for _ in range(2)]
        assert [m["payload"]["n"] for m in missed] == [1, 2]
        # A stale epoch: recovered false.
        await send(ws, v1("realtime:h", "phx_leave", {}, ref="2"))
        await receive(ws)
        await receive(ws)
        since = {"offset": 1, "epoch": "other"}
        await send(ws, v1("realtime:h", "phx_join", {"config": {"pyrt": {"since": since}}}))
        assert (await receive(ws))["payload"]["response"]["pyrt"]["recovered"] is False
    # Clients that do not ask see no extras.
    async with open_websocket_url(socket_url(node)) as ws:
        await send(ws, v1("realtime:h", "phx_join", {}))
        assert (await receive(ws))["payload"]["response"] == {"postgres_changes": []}
        await rest_publish(node, "h", {"event": "n", "payload": {}})
        assert "meta" not in (await receive(ws))["payload"]


# -- REST --------------------------------------------------------------------------------------


async def test_the_broadcast_rest_api(start_node: StartNode, aio: AsyncioThread) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:
        sub = await Subscription(client, "news").subscribe(aio)
        # The client's own http_send: POST /realtime/v1/api/broadcast/news/events/flash.
        await aio.run(sub.channel.http_send("flash", {"n": 1}))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as http:
            body = {"messages": [{"topic": "news", "event": "batch", "payload": {"n": 2}}]}
            response = await http.post("/api/broadcast", json=body, headers={"apikey": KEY})
            assert response.status_code == 202
            good = body
            for headers, body, status, error in [
                ({}, good, 401, "missing apikey: send an apikey header"),
                ({"apikey": "no"}, good, 401, "invalid apikey"),
                ({"apikey": KEY}, {"messages": "x"}, 400, "body must be"),
                ({"apikey": KEY}, {"messages": [{"topic": "news"}]}, 400, "messages[0] needs"),
            ]:
                response = await http.post("/api/broadcast", json=body, headers=headers)
                assert response.status_code == status
                assert response.json()["error"].startswith(error)
            response = await http.get("/api/broadcast", headers={"apikey": KEY})
            assert response.status_code == 405
        await until(lambda: len(sub.broadcasts) == 2, "both REST broadcasts")
    assert [(b["event"], b["payload"]) for b in sub.broadcasts] == [
        ("flash", {"n": 1}),
        ("batch", {"n": 2}),
    ]
