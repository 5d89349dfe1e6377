"""Channels a source feeds are read-only to clients: a source declares them
(`owned_channels`), the node hands them to the hub, and every way a client writes (a native
`publish` or `mutate`, `POST /api/publish` and `/api/records/...`, a Supabase broadcast) is
refused with error 423 `read_only` unless `hub.client_writable` opens the channel. The attack
this stops: a client joined `pg:public:items` and published a fake row event that went into
the table's history beside the real rows."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import trio
from nodekit import StartNode
from pgserver import PostgresServer
from trio_websocket import WebSocketConnection
from trio_websocket import open_websocket_url as ws_open
from walkit import run_sql, wal_source

from pyrt.hub.hub import Hub, HubConfig
from pyrt.node.node import Node, NodeConfig
from pyrt.plugin import SourceContext
from pyrt.plugins.notify import NotifySource
from pyrt.plugins.wal import WalSource
from pyrt.testing import Peer, open_auth

KEY = "k"


def test_the_hub_refuses_client_writes_to_owned_channels() -> None:
    config = HubConfig(record_policies={"todos:>": "lww"}, client_writable=("pg:public:chat",))
    hub = Hub(config)
    client = Peer(hub)
    assert client.request(cmd="publish", id=0, channel="pg:public:items", data=1) == {
        "reply": 0,
        "error": {"code": 403, "message": "join 'pg:public:items' before publishing"},
    }
    hub.own_channels("source wal", ["pg:>", "todos:mine"])
    for channel in ("pg:public:items", "pg:public:chat", "todos:mine", "todos:yours", "room"):
        assert "ok" in client.request(cmd="join", id=channel, channel=channel)
    assert client.request(cmd="publish", id=1, channel="pg:public:items", data=1) == {
        "reply": 1,
        "error": {
            "code": 423,
            "message": "'pg:public:items' is read-only to clients: source wal publishes to it",
        },
    }
    mutate = {"cmd": "mutate", "key": "k", "op": "set", "value": {}}
    reply = client.request(**mutate, id=2, channel="todos:mine")
    assert reply["error"]["code"] == 423
    # What is not owned, or opened by client_writable, takes client writes as before.
    assert "ok" in client.request(cmd="publish", id=3, channel="pg:public:chat", data=1, ack=True)
    assert "ok" in client.request(**mutate, id=4, channel="todos:yours")
    assert "ok" in client.request(cmd="publish", id=5, channel="room", data=1, ack=True)
    # Records channels take mutations only, as before.
    assert client.request(cmd="publish", id=6, channel="todos:yours", data=1)["error"] == {
        "code": 405,
        "message": "'todos:yours' holds records: change them with mutate",
    }
    # The owner (server-side code) publishes as always.
    hub.publish("pg:public:items", {"real": True}, 0.0)
    assert hub.stats.read_only_refused == 2
    assert hub.channel_owner("pg:public:items") == "source wal"
    assert hub.channel_owner("pg:public:chat") is None
    assert hub.channel_owner("room") is None


def test_sources_declare_what_they_feed() -> None:
    wal = WalSource(messages_channel="db:messages", records={"public.todos": "todos"})
    assert wal.owned_channels == ("pg:>", "db:messages", "todos")
    assert WalSource().owned_channels == ("pg:>",)
    notify = NotifySource(
        channels={"a": "db:orders", "b": {"channel": "db:audit"}, "c": "db:orders"}
    )
    assert notify.owned_channels == ("db:audit", "db:orders")


class Ticker:
    """A source of the test's own: publishes on `ticks:<n>`, which it owns."""

    name = "ticker"
    owned_channels = ("ticks:>",)

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        task_status.started()
        await trio.sleep_forever()


@asynccontextmanager
async def api(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{node.port}", headers={"x-api-key": KEY}, timeout=5
    ) as client:
        yield client


async def request(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    await ws.send_message(orjson.dumps(command).decode())
    with trio.fail_after(5):
        while (reply := orjson.loads(await ws.get_message())).get("reply") != command["id"]:
            pass
    return dict(reply)


async def test_every_client_path_is_refused_on_a_source_channel(start_node: StartNode) -> None:
    node = await start_node(
        api_keys=(KEY,),
        transports=("websocket", "supabase"),
        hub=HubConfig(record_policies={"todos": "lww"}, client_writable=("ticks:open",)),
        sources=[Ticker()],
    )
    native = f"ws://127.0.0.1:{node.port}/connection/websocket"
    phoenix = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    async with ws_open(native) as ws, ws_open(phoenix) as sb, api(node) as client:
        assert "ok" in await request(ws, cmd="join", id=0, channel="ticks:1")
        reply = await request(ws, cmd="publish", id=1, channel="ticks:1", data="fake", ack=True)
        message = "'ticks:1' is read-only to clients: source ticker publishes to it"
        assert reply == {"reply": 1, "error": {"code": 423, "message": message}}

        response = await client.post("/api/publish", json={"channel": "ticks:1", "data": "x"})
        assert (response.status_code, response.json()) == (
            403,
            {"error": {"code": 423, "message": message}},
        )
        # A batch with one owned channel publishes nothing.
        body = {"channels": ["free", "ticks:2"], "data": "x"}
        assert (await client.post("/api/publish", json=body)).status_code == 403
        # A records channel takes record changes only: a plain publication is refused.
        response = await client.post("/api/publish", json={"channel": "todos", "data": "x"})
        assert (response.status_code, response.json()["error"]["code"]) == (403, 405)

        # Supabase: a topic whose channel is owned (realtime:ticks:1 is `ticks:1`).
        join = {"config": {"broadcast": {"ack": True}}}
        await sb.send_message(phoenix_message("realtime:ticks:1", "phx_join", join))
        joined = await phoenix_reply(sb)
        assert joined["status"] == "ok", joined
        broadcast = {"event": "e", "payload": {}}
        await sb.send_message(phoenix_message("realtime:ticks:1", "broadcast", broadcast))
        assert (await phoenix_reply(sb))["response"] == {"reason": f"ReadOnlyChannel: {message}"}
        body = {"messages": [{"topic": "ticks:1", "event": "e", "payload": {}}]}
        response = await client.post("/api/broadcast", json=body, headers={"apikey": KEY})
        assert response.status_code == 403
        assert response.json() == {"error": f"messages[0]: {message}"}

        # Opened by client_writable: clients publish there.
        assert "ok" in await request(ws, cmd="join", id=2, channel="ticks:open")
        assert "ok" in await request(
            ws, cmd="publish", id=3, channel="ticks:open", data=1, ack=True
        )
        response = await client.post("/api/publish", json={"channel": "ticks:open", "data": 2})
        assert response.status_code == 200

        history = (await client.get("/api/history/ticks:1")).json()
        assert history["publications"] == []
        assert (await client.get("/api/history/free")).json()["publications"] == []
        metrics = (await client.get("/metrics")).text
    assert 'pyrt_refusals_total{reason="read_only"} 5.0' in metrics.splitlines()


def phoenix_message(topic: str, event: str, payload: Any) -> str:
    message = {"topic": topic, "event": event, "payload": payload, "ref": "1", "join_ref": "1"}
    return orjson.dumps(message).decode()


async def phoenix_reply(ws: WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(5):
        while (message := orjson.loads(await ws.get_message()))["event"] != "phx_reply":
            pass
    return dict(message["payload"])


async def test_a_fake_row_event_is_refused_and_history_holds_only_real_rows(
    postgres: PostgresServer,
    wal_db: str,
) -> None:
    config = NodeConfig(
        auth=open_auth(), port=0, api_keys=(KEY,), transports=("websocket",), drain_timeout=1.0
    )
    node = Node(config, sources=[wal_source(postgres, wal_db)])
    fake = {
        "schema": "public",
        "table": "items",
        "commit_timestamp": "2026-01-01T00:00:00.000Z",
        "type": "INSERT",
        "columns": [{"name": "id", "type": "int4"}, {"name": "body", "type": "text"}],
        "record": {"id": 666, "body": "fake"},
        "old_record": {},
        "errors": None,
    }
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        url = f"ws://127.0.0.1:{node.port}/connection/websocket"
        async with ws_open(url) as attacker, ws_open(url) as reader, api(node) as client:
            for ws in (attacker, reader):
                assert "ok" in await request(ws, cmd="join", id=0, channel="pg:public:items")
            reply = await request(
                attacker, cmd="publish", id=1, channel="pg:public:items", data=fake, ack=True
            )
            assert reply["error"]["code"] == 423
            response = await client.post(
                "/api/publish", json={"channel": "pg:public:items", "data": fake}
            )
            assert (response.status_code, response.json()["error"]["code"]) == (403, 423)

            await run_sql(postgres, wal_db, "INSERT INTO items VALUES (1, 'real', 1)")
            with trio.fail_after(20):
                event = orjson.loads(await reader.get_message())
            assert (event["push"], event["data"]["record"]["body"]) == ("pub", "real")

            history = (await client.get("/api/history/pg:public:items")).json()
        node.stop()
    assert [(p["offset"], p["data"]["record"]) for p in history["publications"]] == [
        (1, {"id": 1, "body": "real", "n": 1})
    ]
    assert node.hub.stats.read_only_refused == 2
