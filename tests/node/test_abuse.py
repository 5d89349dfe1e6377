"""The abuse limits over real sockets (docs/http.md, docs/protocol.md): connections per
address, commands per connection (WebSocket, long-poll, the Supabase socket), publications
per channel (clients and the REST API) and the pause after wrong API keys. Each is hit with
its documented answer, counted in /metrics, and leaves other clients alone."""

from __future__ import annotations

import functools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from nodekit import StartNode, until
from prometheus_client.parser import text_string_to_metric_families
from trio.testing import MockClock
from trio_websocket import WebSocketConnection
from trio_websocket import open_websocket_url as ws_open
from wskit import closed, next_frame, request, ws_url

import pyrt.node.config
from pyrt.hub.hub import HubConfig
from pyrt.node.config import ConfigError, node_config
from pyrt.node.node import Node, NodeConfig

KEY = "k"
UPGRADE = {
    "connection": "upgrade",
    "upgrade": "websocket",
    "sec-websocket-version": "13",
    "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
}
OTHER_ADDRESS = "127.0.0.2"
"""Linux routes all of 127.0.0.0/8 to loopback: a second client address on one machine."""


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(
        start_node, api_keys=(KEY,), transports=("websocket", "longpoll", "supabase")
    )


@asynccontextmanager
async def http(
    node: Node, key: str | None = KEY, local: str | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    transport = httpx.AsyncHTTPTransport(local_address=local) if local else None
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{node.port}", headers=headers, timeout=5, transport=transport
    ) as client:
        yield client


async def refusals(node: Node) -> dict[str, float]:
    """The limit counters of /metrics: `pyrt_refusals_total` by reason, and the others."""
    async with http(node, key=None) as client:
        text = (await client.get("/metrics")).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "pyrt_refusals_total":
                out[sample.labels["reason"]] = sample.value
            elif sample.name in (
                "pyrt_rate_limit_disconnects_total",
                "pyrt_api_key_failures_total",
                "pyrt_api_key_pauses_total",
            ):
                out[sample.name.removeprefix("pyrt_").removesuffix("_total")] = sample.value
    return out


def nonzero(counts: dict[str, float]) -> dict[str, float]:
    return {name: count for name, count in counts.items() if count}


# -- connections per address -----------------------------------------------------------------


async def read_to_end(stream: trio.SocketStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def test_connections_over_the_per_address_cap_get_503_and_are_closed(
    start_node: StartNode,
) -> None:
    node = await start_node(max_connections_per_ip=3)
    held = [await trio.open_tcp_stream("127.0.0.1", node.port or 0) for _ in range(3)]
    await until(lambda: node.connections_per_address.open.get("127.0.0.1") == 3, "3 open")

    over = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with over:
        await over.send_all(b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n\r\n")
        with trio.fail_after(1):  # answered and closed at once, whatever the client does
            response = await read_to_end(over)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 503 Service Unavailable"
    assert b"connection: close" in head.split(b"\r\n")
    message = "too many connections from your address (at most 3): close some first"
    assert orjson.loads(body) == {"error": {"code": 503, "message": message}}

    # A client that sends nothing gets the same, and no session or request state is made.
    silent = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with silent:
        with trio.fail_after(1):
            assert (await read_to_end(silent)).startswith(b"HTTP/1.1 503 ")
    async with http(node) as client:  # a WebSocket upgrade too
        response = await client.get("/connection/websocket", headers=UPGRADE)
        assert (response.status_code, response.json()["error"]["code"]) == (503, 503)
    assert len(node.hub) == 0

    # Another address is not affected...
    async with http(node, local=OTHER_ADDRESS) as other:
        assert (await other.get("/healthz")).status_code == 200
    # ...and once one of the three goes, this address may connect again.
    await held.pop().aclose()
    await until(lambda: node.connections_per_address.open.get("127.0.0.1") == 2, "2 open")
    async with ws_open(ws_url(node)) as ws:
        assert await request(ws, cmd="ping", id=1) == {"reply": 1, "ok": {}}
    for stream in held:
        await stream.aclose()
    await until(lambda: not node.connections_per_address.open, "every connection closed")
    assert nonzero(await refusals(node)) == {"connections_per_ip": 3}


async def test_no_per_address_cap_with_zero(start_node: StartNode) -> None:
    node = await start_node(max_connections_per_ip=0)
    held = [await trio.open_tcp_stream("127.0.0.1", node.port or 0) for _ in range(20)]
    async with http(node) as client:
        assert (await client.get("/healthz")).status_code == 200
    for stream in held:
        await stream.aclose()
    assert nonzero(await refusals(node)) == {}


# -- commands per connection -----------------------------------------------------------------

SLOW = HubConfig(command_rate=0.2, command_burst=5)
"""One command every five seconds after a burst of five: a test never earns a sixth."""


async def test_commands_over_the_rate_are_refused_then_the_connection_is_closed(
    start_node: StartNode,
) -> None:
    node = await start_node(hub=SLOW)
    async with ws_open(ws_url(node)) as greedy, ws_open(ws_url(node)) as calm:
        for rid in range(5):
            assert await request(greedy, cmd="ping", id=rid) == {"reply": rid, "ok": {}}
        refused = await request(greedy, cmd="publish", id=5, channel="c", data=1)
        retry_after = refused["error"].pop("retry_after")
        assert 0 < retry_after <= 5
        assert refused == {
            "reply": 5,
            "error": {"code": 430, "message": "over 0.2 commands per second: not carried out"},
        }
        # Another connection is not affected.
        assert await request(calm, cmd="ping", id=1) == {"reply": 1, "ok": {}}
        # Without an id the refusal is an `error` push.
        error = await request(greedy, cmd="ping")
        assert (error["push"], error["code"]) == ("error", 430)
        for rid in range(7, 10):
            assert (await request(greedy, cmd="ping", id=rid))["error"]["code"] == 430
        # Out of refusals too: closed.
        await greedy.send_message(orjson.dumps({"cmd": "ping", "id": 10}).decode())
        reason = await closed(greedy)
        assert (reason.code, reason.reason) == (4029, "over 0.2 commands per second")
        assert await request(calm, cmd="ping", id=2) == {"reply": 2, "ok": {}}
    assert nonzero(await refusals(node)) == {"command_rate": 5, "rate_limit_disconnects": 1}
    assert node.hub.stats.publications == 0  # the refused publish was not carried out


async def test_a_refused_client_that_waits_retry_after_goes_on(
    start_node: StartNode, mock_clock: MockClock
) -> None:
    # The node's time stands still (the mock clock) unless the test moves it: the waits are
    # exact, and no command earns a token by the machine being slow.
    node = await start_node(hub=HubConfig(command_rate=5.0, command_burst=2))
    async with ws_open(ws_url(node)) as ws:
        for rid in range(3):  # sent at once, read after
            await ws.send_message(orjson.dumps({"cmd": "ping", "id": rid}).decode())
        replies = [await next_frame(ws) for _ in range(3)]
        assert [("ok" in r) for r in replies] == [True, True, False]
        retry_after = replies[2]["error"]["retry_after"]
        assert retry_after == 0.2  # one token of 5 a second
        mock_clock.jump(retry_after - 0.01)
        assert (await request(ws, cmd="ping", id=3))["error"]["code"] == 430  # not yet
        mock_clock.jump(0.01)
        assert await request(ws, cmd="ping", id=4) == {"reply": 4, "ok": {}}


async def test_no_command_rate_with_zero(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(command_rate=0))
    async with ws_open(ws_url(node)) as ws:
        for rid in range(500):
            await ws.send_message(orjson.dumps({"cmd": "ping", "id": rid}).decode())
        assert [(await next_frame(ws))["reply"] for _ in range(500)] == list(range(500))
    assert nonzero(await refusals(node)) == {}


async def test_long_poll_sends_count_against_the_command_rate(start_node: StartNode) -> None:
    node = await start_node(hub=SLOW)
    async with http(node, key=None) as client:
        opened = (await client.get("/connection/poll", params={"channel": "c"})).json()
        auth = {"session": opened["session"], "token": opened["token"]}
        for rid in range(10):  # 5 carried out, 5 refused
            body = orjson.dumps({"cmd": "ping", "id": rid})
            response = await client.post("/connection/send", params=auth, content=body)
            assert response.status_code == 202
        body = orjson.dumps({"cmd": "ping", "id": 10})
        response = await client.post("/connection/send", params=auth, content=body)
        assert response.status_code == 400
        assert response.json()["error"]["code"] == 4029
        batch = (
            await client.get("/connection/poll", params={**auth, "cursor": opened["cursor"]})
        ).json()
    replies = [m for m in batch["messages"] if "reply" in m]
    assert [("ok" in r) for r in replies] == [True] * 5 + [False] * 5
    assert {r["error"]["code"] for r in replies[5:]} == {430}
    assert batch["close"]["code"] == 4029
    assert nonzero(await refusals(node)) == {"command_rate": 5, "rate_limit_disconnects": 1}


def phoenix(topic: str, event: str, payload: Any, ref: str) -> str:
    message = {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": ref}
    return orjson.dumps(message).decode()


async def test_the_supabase_socket_counts_its_messages_over_all_its_channels(
    start_node: StartNode,
) -> None:
    node = await start_node(hub=HubConfig(command_rate=0.2, command_burst=3))
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    async with ws_open(url) as ws:
        await ws.send_message(phoenix("realtime:a", "phx_join", {}, "1"))
        assert (await next_frame(ws))["payload"]["status"] == "ok"
        await ws.send_message(phoenix("realtime:b", "phx_join", {}, "2"))
        assert (await next_frame(ws))["payload"]["status"] == "ok"
        await ws.send_message(phoenix("phoenix", "heartbeat", {}, "3"))
        assert (await next_frame(ws))["payload"]["status"] == "ok"
        # Over the rate: refused as Supabase refuses (a join: so its clients wait to rejoin).
        await ws.send_message(phoenix("realtime:c", "phx_join", {}, "4"))
        reply = await next_frame(ws)
        assert reply["payload"]["status"] == "error"
        assert reply["payload"]["response"]["reason"].startswith(
            "ClientJoinRateLimitReached: over 0.2 messages per second; retry in "
        )
        await ws.send_message(phoenix("realtime:a", "broadcast", {"event": "e"}, "5"))
        reply = await next_frame(ws)
        assert reply["payload"]["response"]["reason"].startswith(
            "MessagePerSecondRateLimitReached: over 0.2 messages per second"
        )
        # Heartbeats are answered all the same (they still count).
        await ws.send_message(phoenix("phoenix", "heartbeat", {}, "6"))
        assert (await next_frame(ws))["payload"] == {"status": "ok", "response": {}}
        await ws.send_message(phoenix("phoenix", "heartbeat", {}, "7"))
        reason = await closed(ws)
        assert (reason.code, reason.reason) == (4029, "over 0.2 messages per second")
    assert nonzero(await refusals(node)) == {"command_rate": 2, "rate_limit_disconnects": 1}
    await until(lambda: len(node.hub) == 0, "the socket's channels to end")


# -- publications per channel ----------------------------------------------------------------


async def test_a_channel_takes_publications_at_its_rate_from_everyone_together(
    start_node: StartNode,
) -> None:
    hub = HubConfig(channel_publish_rate=0.2, channel_publish_burst=3, command_rate=0)
    node = await start_node(hub=hub)
    async with ws_open(ws_url(node)) as a, ws_open(ws_url(node)) as b, http(node) as api:
        for ws in (a, b):
            for channel in ("room", "other"):
                assert "ok" in await request(ws, cmd="join", id=channel, channel=channel)
        sent = {"cmd": "publish", "channel": "room", "data": 1, "ack": True}
        assert "ok" in await request(a, **sent, id=1)
        await next_frame(b)  # the publication
        assert "ok" in await request(b, **sent, id=2)
        await next_frame(a)
        response = await api.post("/api/publish", json={"channel": "room", "data": 3})
        assert response.status_code == 200
        await next_frame(a), await next_frame(b)
        # Three publications from three publishers: the channel's burst is spent.
        refused = await request(a, **sent, id=4)
        assert 0 < refused["error"].pop("retry_after") <= 5
        message = "'room' takes at most 0.2 publications per second"
        assert refused == {"reply": 4, "error": {"code": 432, "message": message}}
        assert (await request(b, **sent, id=5))["error"]["code"] == 432
        response = await api.post("/api/publish", json={"channel": "room", "data": 6})
        assert response.status_code == 429
        assert 1 <= int(response.headers["retry-after"]) <= 5
        assert response.json() == {
            "error": {"code": 429, "message": "a channel takes at most 0.2 publications per second"}
        }
        # All or nothing: `fresh` gets nothing when `room` is refused.
        body = {"channels": ["fresh", "room"], "data": 7}
        assert (await api.post("/api/publish", json=body)).status_code == 429
        assert (await api.get("/api/history/fresh")).json()["publications"] == []
        # Other channels are not affected, nor is server-side publishing (sources).
        assert "ok" in await request(a, cmd="publish", id=8, channel="other", data=8, ack=True)
        await next_frame(b)
        node.publish("room", "from the server")
        assert (await next_frame(a))["data"] == "from the server"
        history = (await api.get("/api/history/room")).json()["publications"]
        assert [p["data"] for p in history] == [1, 1, 3, "from the server"]
    assert nonzero(await refusals(node)) == {"channel_publish_rate": 4}


async def test_supabase_broadcasts_share_the_channel_rate(start_node: StartNode) -> None:
    hub = HubConfig(channel_publish_rate=0.2, channel_publish_burst=2, command_rate=0)
    node = await start_node(hub=hub)
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={KEY}&vsn=1.0.0"
    join = {"config": {"broadcast": {"ack": True}}}
    async with ws_open(url) as ws, http(node, key=None) as client:
        await ws.send_message(phoenix("realtime:room", "phx_join", join, "1"))
        assert (await next_frame(ws))["payload"]["status"] == "ok"
        for ref in ("2", "3"):
            await ws.send_message(phoenix("realtime:room", "broadcast", {"event": "e"}, ref))
            assert (await next_frame(ws))["payload"]["status"] == "ok"
        await ws.send_message(phoenix("realtime:room", "broadcast", {"event": "e"}, "4"))
        reason = (await next_frame(ws))["payload"]["response"]["reason"]
        assert reason == (
            "MessagePerSecondRateLimitReached: 'room' takes at most 0.2 publications per second"
        )
        body = {"messages": [{"topic": "room", "event": "e", "payload": {}}]}
        response = await client.post("/api/broadcast", json=body, headers={"apikey": KEY})
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert response.json()["error"].startswith("MessagePerSecondRateLimitReached")
        body = {"messages": [{"topic": "elsewhere", "event": "e", "payload": {}}]}
        response = await client.post("/api/broadcast", json=body, headers={"apikey": KEY})
        assert response.status_code == 202
    assert nonzero(await refusals(node)) == {"channel_publish_rate": 2}


async def test_mutations_count_against_the_channel_rate(start_node: StartNode) -> None:
    hub = HubConfig(
        channel_publish_rate=0.2,
        channel_publish_burst=2,
        record_policies={"todos": "lww"},
        command_rate=0,
    )
    node = await start_node(hub=hub)
    async with ws_open(ws_url(node)) as ws, http(node) as api:
        assert "ok" in await request(ws, cmd="join", id=0, channel="todos")
        mutate = {"cmd": "mutate", "channel": "todos", "key": "t", "op": "set", "value": {}}
        await ws.send_message(orjson.dumps({**mutate, "id": 1}).decode())
        assert (await reply_to(ws, 1))["ok"]["applied"] is True
        response = await api.post("/api/records/todos/t", json={"op": "set", "value": {"n": 2}})
        assert response.status_code == 200
        response = await api.post("/api/records/todos/t", json={"op": "set", "value": {"n": 3}})
        assert response.status_code == 429
        await ws.send_message(orjson.dumps({**mutate, "id": 2}).decode())
        assert (await reply_to(ws, 2))["error"]["code"] == 432
        assert node.hub.record("todos", "t").value == {"n": 2}
    assert nonzero(await refusals(node)) == {"channel_publish_rate": 2}


async def reply_to(ws: WebSocketConnection, rid: int) -> dict[str, Any]:
    """The reply to command `rid`, skipping pushes."""
    while (message := await next_frame(ws)).get("reply") != rid:
        pass
    return message


# -- the pause after wrong API keys ------------------------------------------------------------


async def test_wrong_api_keys_pause_the_address_whatever_key_it_sends(
    start_node: StartNode, mock_clock: MockClock
) -> None:
    # The node's time stands still (the mock clock) unless the test moves it.
    node = await start_node(api_key_max_failures=3, api_key_pause=2.0)
    async with http(node, key="wrong") as wrong, http(node) as right:
        for _ in range(3):
            response = await wrong.get("/api/channels")
            assert (response.status_code, response.json()["error"]["message"]) == (
                401,
                "wrong API key",
            )
        paused = await right.get("/api/channels")
        assert paused.status_code == 429
        assert paused.headers["retry-after"] == "2"
        message = "too many wrong API keys from your address: try again later"
        assert paused.json() == {"error": {"code": 429, "message": message}}
        # The Supabase endpoints check keys against the same pause.
        url = f"http://127.0.0.1:{node.port}/realtime/v1/api/broadcast"
        body = {"messages": [{"topic": "t", "event": "e", "payload": {}}]}
        response = await right.post(url, json=body, headers={"apikey": KEY})
        assert response.status_code == 429
        assert response.headers["retry-after"] == "2"
        # Another address is not paused; other routes (no key) are not paused either.
        async with http(node, local=OTHER_ADDRESS) as elsewhere:
            assert (await elsewhere.get("/api/channels")).status_code == 200
        assert (await right.get("/healthz")).status_code == 200
        mock_clock.jump(1.99)
        assert (await right.get("/api/channels")).status_code == 429  # not yet
        mock_clock.jump(0.01)
        assert (await right.get("/api/channels")).status_code == 200
    assert nonzero(await refusals(node)) == {
        "api_key_pause": 3,
        "api_key_failures": 3,
        "api_key_pauses": 1,
    }


async def test_wrong_supabase_keys_count_too(start_node: StartNode) -> None:
    node = await start_node(api_key_max_failures=2, api_key_pause=30.0)
    upgrade = UPGRADE
    async with http(node, key=None) as client:
        for _ in range(2):
            response = await client.get("/realtime/v1/websocket?apikey=nope", headers=upgrade)
            assert response.status_code == 401
        response = await client.get(f"/realtime/v1/websocket?apikey={KEY}", headers=upgrade)
        assert response.status_code == 429
        assert response.json() == {
            "error": "too many wrong API keys from your address: try again later"
        }
        response = await client.get("/api/channels", headers={"x-api-key": KEY})
        assert response.status_code == 429
        # A missing key is a mistake, not a guess: it is not counted.
    async with http(node, key=None, local=OTHER_ADDRESS) as client:
        for _ in range(5):
            assert (await client.get("/api/channels")).status_code == 401
        assert (await client.get("/api/channels", headers={"x-api-key": KEY})).status_code == 200
    assert nonzero(await refusals(node)) == {
        "api_key_pause": 2,
        "api_key_failures": 2,
        "api_key_pauses": 1,
    }


# -- configuration ----------------------------------------------------------------------------


def test_the_limits_from_a_config_file(tmp_path: Path) -> None:
    example = pyrt.node.config.__doc__ or ""
    path = tmp_path / "pyrt.toml"
    path.write_text(example.split("```toml\n")[1].split("```")[0])
    config = node_config(path)  # the module's example is valid as it stands
    assert (config.max_connections_per_ip, config.api_key_max_failures) == (256, 10)
    assert (config.api_key_failure_window, config.api_key_pause) == (60.0, 60.0)
    hub = config.hub
    assert (hub.command_rate, hub.command_burst) == (100.0, 200)
    assert (hub.channel_publish_rate, hub.channel_publish_burst) == (500.0, 1000)
    assert hub.client_writable == ("pg:public:chat",)
    path.write_text(
        "[server]\nmax_connections_per_ip = 0\napi_key_pause = 5\n"
        "[hub]\ncommand_rate = 0\nchannel_publish_rate = 2\nclient_writable = ['a:>']\n"
    )
    config = node_config(path)
    assert (config.max_connections_per_ip, config.api_key_pause) == (0, 5.0)
    assert (config.hub.command_rate, config.hub.channel_publish_rate) == (0, 2)
    assert config.hub.client_writable == ("a:>",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server]\nmax_connections_per_ip = -1", "server.max_connections_per_ip: expected an"),
        ("[server]\napi_key_max_failures = 1.5", "server.api_key_max_failures: expected an"),
        ("[server]\napi_key_pause = 0", "server.api_key_pause: expected a positive number"),
        ("[server]\napi_key_failure_window = inf", "server.api_key_failure_window: expected a"),
        ("[hub]\ncommand_rate = -1", "hub: command_rate must be a number of at least 0"),
        ("[hub]\nchannel_publish_rate = inf", "hub: channel_publish_rate must be a number"),
        ("[hub]\ncommand_burst = 0", "hub: command_burst must be at least 1"),
        ("[hub]\nclient_writable = 'pg:>'", "hub.client_writable: expected a list of channel"),
        ("[hub]\nclient_writable = ['a::b']", "hub: empty segment"),
    ],
)
def test_bad_limits_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        node_config(path)


def test_bad_limits_in_code_are_refused_too() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        NodeConfig(api_key_pause=-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        NodeConfig(max_connections_per_ip=-1)
    with pytest.raises(ValueError, match="command_burst must be at least 1"):
        HubConfig(command_burst=0)
