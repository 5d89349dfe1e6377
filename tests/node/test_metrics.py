"""`GET /metrics` over real sockets, parsed with prometheus-client's own parser."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import orjson
import pytest
import trio
from httpkit import Samples, scrape, value
from nodekit import StartNode, until
from trio_websocket import WebSocketConnection, open_websocket_url
from wskit import ws_url

from pyrt.hub.history import ENTRY_BYTES
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.node.node import Node


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(start_node, api_keys=("k",), transports=("websocket",))


@asynccontextmanager
async def http(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}", timeout=5) as client:
        yield client


def diff(before: Samples, after: Samples) -> dict[str, float]:
    """The samples that changed, by name{labels}, with how much."""
    changed = {}
    for key, new in after.items():
        old = before.get(key, 0.0)
        if new != old:
            name, labels = key
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            changed[f"{name}{{{label_text}}}" if labels else name] = new - old
    return changed


async def ws_raw(ws: WebSocketConnection, **command: Any) -> bytes:
    """Sends a command; the next frame from the server, as the bytes the hub encoded."""
    await ws.send_message(orjson.dumps(command).decode())
    with trio.fail_after(5):
        message = await ws.get_message()
    return message.encode() if isinstance(message, str) else message


async def ws_request(ws: WebSocketConnection, **command: Any) -> dict[str, Any]:
    frame: dict[str, Any] = orjson.loads(await ws_raw(ws, **command))
    return frame


async def test_a_fresh_node_exposes_every_metric_at_zero(start_node: StartNode) -> None:
    node = await start_node()
    async with http(node) as client:
        samples = await scrape(client)
    assert samples == {
        ("pyrt_connections", (("transport", "websocket"),)): 0.0,
        ("pyrt_channels", ()): 0.0,
        ("pyrt_connections_opened_total", ()): 0.0,
        ("pyrt_messages_in_total", (("source", "client"),)): 0.0,
        ("pyrt_messages_in_total", (("source", "api"),)): 0.0,
        ("pyrt_messages_out_total", ()): 0.0,
        ("pyrt_bytes_out_total", ()): 0.0,
        ("pyrt_publications_total", ()): 0.0,
        ("pyrt_outbox_dropped_total", ()): 0.0,
        ("pyrt_slow_disconnects_total", ()): 0.0,
        ("pyrt_budget_disconnects_total", ()): 0.0,
        ("pyrt_outbox_bytes", ()): 0.0,
        ("pyrt_backlog_bytes", ()): 0.0,
        ("pyrt_history_bytes", ()): 0.0,
        ("pyrt_history_publications", ()): 0.0,
        ("pyrt_history_evictions_total", ()): 0.0,
        ("pyrt_recoveries_total", (("result", "hit"),)): 0.0,
        ("pyrt_recoveries_total", (("result", "miss"),)): 0.0,
        ("pyrt_errors_total", ()): 0.0,
        ("pyrt_connection_errors_total", (("plugin", "websocket"),)): 0.0,
        ("pyrt_write_timeouts_total", (("transport", "websocket"),)): 0.0,
        **{
            ("pyrt_http_refused_total", (("status", s),)): 0.0
            for s in ("400", "408", "413", "431", "501")
        },
        ("pyrt_refusals_total", (("reason", "connections_per_ip"),)): 0.0,
        ("pyrt_refusals_total", (("reason", "command_rate"),)): 0.0,
        ("pyrt_refusals_total", (("reason", "channel_publish_rate"),)): 0.0,
        ("pyrt_refusals_total", (("reason", "api_key_pause"),)): 0.0,
        ("pyrt_refusals_total", (("reason", "read_only"),)): 0.0,
        ("pyrt_rate_limit_disconnects_total", ()): 0.0,
        ("pyrt_api_key_failures_total", ()): 0.0,
        ("pyrt_auth_refused_total", ()): 0.0,
        ("pyrt_tokens_expired_total", ()): 0.0,
        ("pyrt_api_key_pauses_total", ()): 0.0,
        ("pyrt_direct_frames_total", ()): 0.0,
        ("pyrt_direct_writes_total", ()): 0.0,
        ("pyrt_direct_overflows_total", ()): 0.0,
        ("pyrt_match_seconds_count", ()): 0.0,
        ("pyrt_match_seconds_sum", ()): 0.0,
    }


async def test_metrics_follow_traffic(start_node: StartNode) -> None:
    node = await start_node()
    async with http(node) as client:
        start_samples = await scrape(client)
        async with open_websocket_url(ws_url(node)) as ws:
            await traffic(node, client, ws, start_samples)
        await until(lambda: len(node.hub) == 0, "the hub to forget the WebSocket client")
        samples = await scrape(client)
        assert value(samples, "pyrt_connections", transport="websocket") == 0
        assert value(samples, "pyrt_channels") == 0


async def traffic(
    node: Node, client: httpx.AsyncClient, ws: WebSocketConnection, start_samples: Samples
) -> None:
    """WebSocket and REST traffic, and what each part of it counts."""
    frames = [
        await ws_raw(ws, cmd="join", id=1, channel="room:1"),
        await ws_raw(ws, cmd="publish", id=2, channel="room:1", data="hi", ack=True),
        await ws_raw(ws, cmd="leave", id=3, channel="elsewhere"),
    ]
    assert orjson.loads(frames[2])["error"]["code"] == 410
    after_ws = await scrape(client)
    # 3 frames in; 3 out: the join reply, the ack (no echo without "self"), the error.
    changed = diff(start_samples, after_ws)
    match_seconds = changed.pop("pyrt_match_seconds_sum")
    # Its `pub` frame (never sent: no echo) plus ENTRY_BYTES.
    assert changed.pop("pyrt_history_bytes") == node.hub.history_budget.bytes > ENTRY_BYTES
    assert changed == {
        'pyrt_connections{transport="websocket"}': 1,
        "pyrt_channels": 1,
        "pyrt_connections_opened_total": 1,
        'pyrt_messages_in_total{source="client"}': 3,
        "pyrt_messages_out_total": 3,
        "pyrt_bytes_out_total": sum(len(f) for f in frames),
        "pyrt_publications_total": 1,
        "pyrt_errors_total": 1,
        "pyrt_match_seconds_count": 1,
        "pyrt_history_publications": 1,
    }
    assert match_seconds > 0  # measured (its size is the bench's business, not a test's)

    response = await client.post(
        "/api/publish",
        json={"channels": ["room:1", "room:2", "room:3"], "data": 1},
        headers={"x-api-key": "k"},
    )
    assert response.status_code == 200
    pub = await ws_raw(ws, cmd="ping")  # the publication is already on its way
    assert orjson.loads(pub)["push"] == "pub"
    changed = diff(after_ws, await scrape(client))
    changed.pop("pyrt_match_seconds_sum")
    assert changed.pop("pyrt_history_bytes") > 3 * ENTRY_BYTES
    assert changed == {
        "pyrt_history_publications": 3,
        'pyrt_messages_in_total{source="api"}': 1,
        'pyrt_messages_in_total{source="client"}': 1,  # the ping
        "pyrt_publications_total": 3,
        "pyrt_match_seconds_count": 3,
        "pyrt_messages_out_total": 1,
        "pyrt_bytes_out_total": len(pub),
        # The publication went to the socket straight from the Rust fan-out, in one write.
        "pyrt_direct_frames_total": 1,
        "pyrt_direct_writes_total": 1,
    }
    # A refused REST publish counts nothing.
    response = await client.post(
        "/api/publish", json={"channel": "a:*", "data": 1}, headers={"x-api-key": "k"}
    )
    assert response.status_code == 422
    assert value(await scrape(client), "pyrt_messages_in_total", source="api") == 1


async def test_slow_consumers_and_dropped_publications(start_node: StartNode) -> None:
    # Without direct writes, so that the outbox alone decides (the kernel's socket buffers
    # would take these frames otherwise: tests/core/test_fanout.py covers that path).
    hub = HubConfig(
        outbox_messages=4,
        channel_policies={"drop:>": SlowConsumerPolicy.DROP_OLDEST},
        direct_writes=False,
    )
    node = await start_node(hub=hub)
    async with (
        http(node) as client,
        open_websocket_url(ws_url(node)) as slow,
        open_websocket_url(ws_url(node)) as lossy,
    ):
        await ws_request(slow, cmd="join", id=1, channel="strict")
        await ws_request(lossy, cmd="join", id=1, channel="drop:1")
        before = await scrape(client)
        # No checkpoint between the publications: neither writer can drain its outbox of 4.
        for n in range(10):
            node.publish("strict", n)
            node.publish("drop:1", n)
        changed = diff(before, await scrape(client))
        # 'slow' took 4 and overflowed on the 5th; 'lossy' took 4 and lost the oldest 6 of 10.
        assert changed["pyrt_slow_disconnects_total"] == 1
        assert changed["pyrt_outbox_dropped_total"] == 6
        assert changed["pyrt_messages_out_total"] == 4 + 10
        assert changed["pyrt_publications_total"] == 20


async def test_recovery_hits_and_misses(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(history_size=2))
    async with http(node) as client, open_websocket_url(ws_url(node)) as ws:
        epoch = node.publish("r", 1).epoch
        node.publish("r", 2)
        before = await scrape(client)
        hit = await ws_request(
            ws, cmd="join", id=1, channel="r", since={"offset": 1, "epoch": epoch}
        )
        assert hit["ok"]["recovered"] is True
        replayed = await ws_request(ws, cmd="leave", id=2, channel="r")
        assert (replayed["push"], replayed["data"]) == ("pub", 2)  # before the leave's reply
        with trio.fail_after(5):
            assert orjson.loads(await ws.get_message()) == {"reply": 2, "ok": {}}
        after_hit = await scrape(client)
        assert value(after_hit, "pyrt_recoveries_total", result="hit") == 1
        assert value(after_hit, "pyrt_recoveries_total", result="miss") == 0
        for since in ({"offset": 1, "epoch": "gone"}, {"offset": 0, "epoch": epoch}):
            node.publish("r", 3)  # offset 1 is trimmed now (history_size=2)
            reply = await ws_request(ws, cmd="join", id=3, channel="r", since=since)
            assert reply["ok"]["recovered"] is False
            await ws_request(ws, cmd="leave", id=4, channel="r")
        changed = diff(before, await scrape(client))
        assert changed['pyrt_recoveries_total{result="hit"}'] == 1
        assert changed['pyrt_recoveries_total{result="miss"}'] == 2


async def test_metrics_is_get_only_and_per_node(start_node: StartNode) -> None:
    a = await start_node()
    b = await start_node()
    a.publish("c", 1)
    async with http(a) as client_a, http(b) as client_b:
        response = await client_a.post("/metrics")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        assert response.json() == {"error": {"code": 405, "message": "use GET for /metrics"}}
        assert value(await scrape(client_a), "pyrt_publications_total") == 1
        assert value(await scrape(client_b), "pyrt_publications_total") == 0


async def test_record_mutations_and_stores(start_node: StartNode) -> None:
    policies = {"todos:>": "reject", "cursors:>": "lww", "docs:>": "merge"}
    # Tombstones are forgotten by the wall clock (the records' hybrid clock): the test moves it.
    wall = [time.time()]
    config = HubConfig(record_policies=policies, tombstone_ttl=0.01)
    node = await start_node(hub=Hub(config, wall_clock=lambda: wall[0]))
    async with http(node) as client, open_websocket_url(ws_url(node)) as ws:
        fresh = await scrape(client)
        for policy in ("lww", "merge", "reject"):
            for outcome in ("applied", "unchanged", "conflict", "duplicate"):
                name = "pyrt_record_mutations_total"
                assert value(fresh, name, policy=policy, outcome=outcome) == 0
            assert value(fresh, "pyrt_records", policy=policy) == 0
            assert value(fresh, "pyrt_record_tombstones", policy=policy) == 0
            assert value(fresh, "pyrt_record_tombstones_compacted_total", policy=policy) == 0
        await ws_request(ws, cmd="join", id=1, channel="todos:1")
        mutate = {"cmd": "mutate", "channel": "todos:1", "op": "set", "value": {"n": 1}}
        created = await ws_request(ws, id=2, key="a", origin="o1", seq=1, **mutate)
        assert created["push"] == "pub"  # the change comes before the reply
        reply = orjson.loads(await ws.get_message())
        assert reply["ok"]["applied"] is True
        again = await ws_request(ws, id=3, key="a", origin="o1", seq=1, **mutate)  # re-sent
        assert again["ok"] == reply["ok"]
        conflict = await ws_request(ws, id=4, key="a", **mutate)  # based on no record
        assert conflict["error"]["code"] == 412
        headers = {"x-api-key": "k"}
        for key in ("b", "c"):
            response = await client.post(
                f"/api/records/todos:2/{key}", json={"op": "set", "value": {}}, headers=headers
            )
            assert response.json()["applied"] is True
        version = response.json()["record"]["version"]
        response = await client.post(
            "/api/records/todos:2/c", json={"op": "delete", "base": version}, headers=headers
        )
        assert response.json()["applied"] is True
        cursor = "/api/records/cursors:1/x"
        await client.post(cursor, json={"op": "set", "value": {"at": 1}}, headers=headers)
        # Under lww a write stamped before the record's is processed without effect.
        await ws_request(ws, cmd="join", id=5, channel="cursors:1")
        old = "0000000000001.00000.old"
        late = {"cmd": "mutate", "channel": "cursors:1", "key": "x", "op": "delete", "hlc": old}
        assert (await ws_request(ws, id=6, **late))["ok"]["applied"] is False
        after = await scrape(client)
        changed = diff(fresh, after)
        traffic = ("pyrt_messages_in_total", "pyrt_messages_out_total", "pyrt_bytes_out_total")
        for name in (*traffic, "pyrt_direct_frames_total", "pyrt_direct_writes_total"):
            for key in [k for k in changed if k.startswith(name)]:
                del changed[key]
        for key in [k for k in changed if k.startswith(("pyrt_match", "pyrt_connections"))]:
            del changed[key]
        assert changed.pop("pyrt_history_bytes") > 5 * ENTRY_BYTES
        assert changed == {
            "pyrt_channels": 2,
            "pyrt_publications_total": 5,
            "pyrt_history_publications": 5,
            "pyrt_errors_total": 1,
            'pyrt_record_mutations_total{outcome="applied",policy="reject"}': 4,
            'pyrt_record_mutations_total{outcome="conflict",policy="reject"}': 1,
            'pyrt_record_mutations_total{outcome="duplicate",policy="reject"}': 1,
            'pyrt_record_mutations_total{outcome="applied",policy="lww"}': 1,
            'pyrt_record_mutations_total{outcome="unchanged",policy="lww"}': 1,
            'pyrt_records{policy="lww"}': 1,
            'pyrt_records{policy="reject"}': 2,  # todos:1/a and todos:2/b
            'pyrt_record_tombstones{policy="reject"}': 1,  # todos:2/c
        }
        wall[0] += 0.05  # past the tombstone ttl
        node.hub.tick(node.now)  # the node's timer does this every ping_interval
        compacted = diff(after, await scrape(client))
        assert compacted == {
            'pyrt_record_tombstones{policy="reject"}': -1,
            'pyrt_record_tombstones_compacted_total{policy="reject"}': 1,
        }
