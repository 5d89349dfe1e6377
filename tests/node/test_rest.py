"""The REST API (`/api/`) over real sockets, with httpx as the backend and WebSocket clients."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson
import pytest
from nodekit import StartNode, until
from trio_websocket import open_websocket_url
from wskit import next_frame, request, ws_url

from pyrt.conflict import Timestamp
from pyrt.hub.hub import Hub, HubConfig
from pyrt.node.node import Node

KEY = "k"


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(start_node, api_keys=(KEY,), transports=("websocket",))


@asynccontextmanager
async def api(node: Node, key: str | None = KEY) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {key}"} if key is not None else {}
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{node.port}", headers=headers, timeout=5
    ) as client:
        yield client


def error(response: httpx.Response) -> tuple[int, int, str]:
    """(status, code, message) of an error response, checking its shape on the way."""
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    return response.status_code, body["error"]["code"], body["error"]["message"]


# -- auth ----------------------------------------------------------------------------------


async def test_every_api_route_needs_a_key(start_node: StartNode) -> None:
    node = await start_node(api_keys=("first-key", "second-key"))
    routes = [
        ("POST", "/api/publish"),
        ("GET", "/api/history/a"),
        ("GET", "/api/presence/a"),
        ("GET", "/api/channels"),
        ("GET", "/api/nope"),  # auth comes first: no key, no map of the API
    ]
    async with api(node, key=None) as client:
        for method, path in routes:
            response = await client.request(method, path, json={"channel": "a", "data": 1})
            assert error(response) == (
                401,
                401,
                "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'",
            )
            assert response.headers["www-authenticate"] == 'Bearer realm="pyrt"'
        wrong = [
            {"authorization": "Bearer first-kez"},
            {"authorization": "Bearer first-key-and-more"},
            {"x-api-key": "second"},
            {"apikey": ""},
            {"authorization": "Basic first-key"},  # not a bearer token: no key given
        ]
        for headers in wrong:
            response = await client.get("/api/channels", headers=headers)
            assert response.status_code == 401, headers
        assert error(await client.get("/api/channels", headers=wrong[0]))[2] == "wrong API key"
        right = [
            {"authorization": "Bearer first-key"},
            {"authorization": "bearer  second-key"},
            {"x-api-key": "first-key"},
            {"apikey": "second-key"},
        ]
        for headers in right:
            response = await client.get("/api/channels", headers=headers)
            assert (response.status_code, response.json()) == (200, {"channels": []}), headers
    assert node.hub.stats.publications == 0


async def test_without_configured_keys_the_api_is_off(start_node: StartNode) -> None:
    node = await start_node(api_keys=())
    async with api(node, key=None) as client:
        for headers in ({}, {"authorization": "Bearer k"}, {"x-api-key": "anything"}):
            response = await client.post(
                "/api/publish", json={"channel": "a", "data": 1}, headers=headers
            )
            assert error(response) == (
                401,
                401,
                "the REST API is disabled: no API keys configured (set server.api_keys)",
            )
    assert node.hub.stats.publications == 0


# -- POST /api/publish ---------------------------------------------------------------------


async def test_publish_reaches_websocket_subscribers(start_node: StartNode) -> None:
    node = await start_node()
    async with (
        open_websocket_url(ws_url(node)) as a,
        open_websocket_url(ws_url(node)) as b,
        api(node) as client,
    ):
        joined = await request(a, cmd="join", id=1, channel="room:1")
        await request(b, cmd="join", id=1, channel="room:*")
        epoch = joined["ok"]["epoch"]

        response = await client.post(
            "/api/publish", json={"channels": ["room:1", "room:2"], "data": {"t": "hi"}}
        )
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/json"
        [first, second] = response.json()["publications"]
        assert first == {"channel": "room:1", "offset": 1, "epoch": epoch}
        assert (second["channel"], second["offset"]) == ("room:2", 1)

        pub = await next_frame(a)
        assert pub == {
            "push": "pub",
            "channel": "room:1",
            "offset": 1,
            "epoch": epoch,
            "hlc": pub["hlc"],  # the hub's clock (pyrt.conflict.Timestamp, checked below)
            "data": {"t": "hi"},
        }  # no "from": the server published it
        Timestamp.decode(pub["hlc"])
        got = [await next_frame(b), await next_frame(b)]
        assert [(p["channel"], p["offset"], p["data"]) for p in got] == [
            ("room:1", 1, {"t": "hi"}),
            ("room:2", 1, {"t": "hi"}),
        ]

        # One channel, null data and a conflation key; the next offset.
        response = await client.post(
            "/api/publish", json={"channel": "room:1", "data": None, "key": "cursor"}
        )
        assert response.json() == {
            "publications": [{"channel": "room:1", "offset": 2, "epoch": epoch}]
        }
        assert (await next_frame(a))["data"] is None
        assert (await next_frame(b))["offset"] == 2
    assert node.hub.stats.publications == 3


BAD_PUBLISH_BODIES: list[tuple[bytes, int, str]] = [
    (b"{not json", 400, "body is not JSON: "),
    (b"", 400, "body is not JSON: "),
    (b"[1, 2]", 400, "body must be a JSON object, got array"),
    (b'"a"', 400, "body must be a JSON object, got string"),
    (b'{"channel": "ok"}', 400, "'data' is missing (it may be null)"),
    (
        b'{"data": 1}',
        400,
        "give either 'channel' (a string) or 'channels' (a list of strings)",
    ),
    (
        b'{"channel": "ok", "channels": ["ok"], "data": 1}',
        400,
        "give either 'channel' (a string) or 'channels' (a list of strings)",
    ),
    (b'{"channel": 5, "data": 1}', 400, "'channel' must be a string, got number"),
    (b'{"channel": ["ok"], "data": 1}', 400, "'channel' must be a string, got array"),
    (b'{"channels": "ok", "data": 1}', 400, "'channels' must be a list of strings, got string"),
    (b'{"channels": [], "data": 1}', 400, "'channels' must name 1 to 100 channels"),
    (
        orjson.dumps({"channels": [f"c{i}" for i in range(101)], "data": 1}),
        400,
        "'channels' must name 1 to 100 channels",
    ),
    (b'{"channels": ["ok", null], "data": 1}', 400, "'channels[1]' must be a string, got null"),
    (b'{"channels": ["ok", "x", "ok"], "data": 1}', 400, "'channels' names 'ok' more than once"),
    (b'{"channel": "ok", "data": 1, "key": 7}', 400, "'key' must be a string, got number"),
    (
        b'{"channel": "ok", "data": 1, "chanel": "x"}',
        400,
        "unknown field 'chanel': use channel or channels, data, key",
    ),
    (
        b'{"channel": "ok:*", "data": 1}',
        422,
        "channel: wildcards are only allowed in patterns (at position 3)",
    ),
    (
        b'{"channels": ["ok", "room:>"], "data": 1}',
        422,
        "channels[1]: wildcards are only allowed in patterns (at position 5)",
    ),
    (
        b'{"channels": ["ok", "a b"], "data": 1}',
        422,
        "channels[1]: invalid character U+0020 (at position 1)",
    ),
    (b'{"channel": "", "data": 1}', 422, "channel: empty channel name (at position 0)"),
    (
        orjson.dumps({"channels": ["ok", "also:ok"], "data": "x" * 1100}),
        413,
        "data larger than 1024 bytes (1102 as JSON)",
    ),
    (
        orjson.dumps({"channel": "ok", "data": "x" * 5000}),
        413,
        "request body larger than 4096 bytes",
    ),
]


async def test_a_bad_publish_is_refused_whole(start_node: StartNode) -> None:
    node = await start_node(max_body_bytes=4096, hub=HubConfig(max_payload_bytes=1024))
    async with open_websocket_url(ws_url(node)) as ws, api(node) as client:
        await request(ws, cmd="join", id=1, channel="ok")
        for body, status, message in BAD_PUBLISH_BODIES:
            response = await client.post(
                "/api/publish", content=body, headers={"content-type": "application/json"}
            )
            got_status, code, got_message = error(response)
            assert (got_status, code) == (status, status), body[:80]
            if message.endswith(": "):
                assert got_message.startswith(message), body[:80]
            else:
                assert got_message == message, body[:80]
        # Nothing was published to 'ok', though many of those requests named it first.
        assert node.hub.stats.publications == 0
        history = (await client.get("/api/history/ok")).json()
        assert (history["offset"], history["publications"]) == (0, [])
        # Just under both limits is fine, and the subscriber gets only that.
        data = "x" * 1022  # 1024 bytes as JSON
        response = await client.post("/api/publish", json={"channel": "ok", "data": data})
        assert response.json()["publications"][0]["offset"] == 1
        pub = await next_frame(ws)
        assert (pub["push"], pub["offset"], pub["data"]) == ("pub", 1, data)


async def test_an_oversized_body_closes_the_connection_and_the_next_one_works(
    start_node: StartNode,
) -> None:
    node = await start_node(max_body_bytes=1000)
    async with api(node) as client:
        response = await client.post("/api/publish", content=b"x" * 1500)
        assert error(response) == (413, 413, "request body larger than 1000 bytes")
        assert response.headers["connection"] == "close"  # the rest of the body was not read
        response = await client.post("/api/publish", json={"channel": "a", "data": 1})
        assert response.status_code == 200
    assert node.hub.stats.publications == 1


# -- GET /api/history/<channel> ------------------------------------------------------------


async def test_history_since_a_position_with_a_limit(start_node: StartNode) -> None:
    node = await start_node()
    async with (
        open_websocket_url(ws_url(node)) as publisher,
        open_websocket_url(ws_url(node)) as watcher,
        api(node) as client,
    ):
        for n in range(1, 5):
            await client.post("/api/publish", json={"channel": "h:1", "data": n})
        await request(publisher, cmd="join", id=1, channel="h:1")
        await request(watcher, cmd="join", id=1, channel="h:1")
        await request(publisher, cmd="publish", id=2, channel="h:1", data=5, ack=True)
        client_id = (await next_frame(watcher))["from"]

        everything = (await client.get("/api/history/h:1")).json()
        epoch = everything["epoch"]
        assert everything == {
            "channel": "h:1",
            "offset": 5,
            "epoch": epoch,
            "recovered": True,
            "publications": [
                *({"offset": n, "epoch": epoch, "data": n} for n in range(1, 5)),
                {"offset": 5, "epoch": epoch, "data": 5, "from": client_id},
            ],
            "more": False,
        }

        since = (await client.get(f"/api/history/h:1?since=2&epoch={epoch}")).json()
        assert since["recovered"] is True
        assert [p["data"] for p in since["publications"]] == [3, 4, 5]
        assert since["more"] is False

        page = await client.get("/api/history/h:1", params={"since": 1, "epoch": epoch, "limit": 2})
        page_body = page.json()
        assert [p["offset"] for p in page_body["publications"]] == [2, 3]
        assert (page_body["more"], page_body["offset"]) == (True, 5)
        rest = await client.get("/api/history/h:1", params={"since": 3, "epoch": epoch, "limit": 2})
        assert [p["offset"] for p in rest.json()["publications"]] == [4, 5]
        assert rest.json()["more"] is False

        at_top = (await client.get(f"/api/history/h:1?since=5&epoch={epoch}")).json()
        assert (at_top["recovered"], at_top["publications"]) == (True, [])

        for since_query in (f"since=6&epoch={epoch}", "since=2&epoch=another-epoch"):
            missed = (await client.get(f"/api/history/h:1?{since_query}")).json()
            assert (missed["recovered"], missed["publications"]) == (False, [])
            assert (missed["offset"], missed["epoch"]) == (5, epoch)

        # The path is percent-decoded; a channel nobody used has an empty stream.
        encoded = (await client.get("/api/history/h%3A1?limit=1")).json()
        assert (encoded["channel"], encoded["more"]) == ("h:1", True)
        fresh = (await client.get("/api/history/never:used")).json()
        assert (fresh["offset"], fresh["recovered"], fresh["publications"]) == (0, True, [])


async def test_history_trimmed_by_size_is_not_recovered(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(history_size=3))
    async with api(node) as client:
        response = await client.post("/api/publish", json={"channels": ["t", "other"], "data": 0})
        epoch = response.json()["publications"][0]["epoch"]
        for n in range(2, 6):
            await client.post("/api/publish", json={"channel": "t", "data": n})
        retained = (await client.get("/api/history/t")).json()
        # Offsets 1 and 2 are gone: what is left does not reach back to the start.
        assert retained["recovered"] is False
        assert [p["offset"] for p in retained["publications"]] == [3, 4, 5]
        for since, recovered, offsets in ((0, False, []), (1, False, []), (2, True, [3, 4, 5])):
            body = (await client.get(f"/api/history/t?since={since}&epoch={epoch}")).json()
            assert (body["recovered"], [p["offset"] for p in body["publications"]]) == (
                recovered,
                offsets,
            ), since
        untrimmed = (await client.get("/api/history/other")).json()
        assert (untrimmed["recovered"], len(untrimmed["publications"])) == (True, 1)


async def test_history_limit_defaults_to_100_and_stops_at_1000(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(history_size=2000))
    for n in range(1200):
        node.publish("busy", n)
    async with api(node) as client:
        default = (await client.get("/api/history/busy")).json()
        assert (len(default["publications"]), default["more"]) == (100, True)
        assert default["publications"][-1]["data"] == 99
        most = (await client.get("/api/history/busy?limit=1000")).json()
        assert (len(most["publications"]), most["more"]) == (1000, True)
        assert error(await client.get("/api/history/busy?limit=1001")) == (
            400,
            400,
            "'limit' must be an integer from 1 to 1000, got '1001'",
        )


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("since=1", 400, "give 'since' and 'epoch' together (a position), or neither"),
        ("epoch=e", 400, "give 'since' and 'epoch' together (a position), or neither"),
        ("since=-1&epoch=e", 400, "'since' must be an integer of at least 0, got '-1'"),
        ("since=one&epoch=e", 400, "'since' must be an integer of at least 0, got 'one'"),
        ("limit=0", 400, "'limit' must be an integer from 1 to 1000, got '0'"),
        ("limit=", 400, "'limit' must be an integer from 1 to 1000, got ''"),
        ("limit=%C2%B2", 400, "'limit' must be an integer from 1 to 1000, got '²'"),
    ],
)
async def test_bad_history_queries(
    start_node: StartNode, query: str, status: int, message: str
) -> None:
    node = await start_node()
    async with api(node) as client:
        assert error(await client.get(f"/api/history/h?{query}")) == (status, status, message)


async def test_history_and_presence_need_channel_names(start_node: StartNode) -> None:
    node = await start_node()
    async with api(node) as client:
        for route in ("history", "presence"):
            assert error(await client.get(f"/api/{route}/room:*")) == (
                422,
                422,
                "wildcards are only allowed in patterns (at position 5)",
            )
            assert error(await client.get(f"/api/{route}/")) == (
                422,
                422,
                "empty channel name (at position 0)",
            )


# -- GET /api/presence/<channel>, GET /api/channels ----------------------------------------


async def test_presence_is_the_native_protocols_presence_map(start_node: StartNode) -> None:
    node = await start_node()
    async with open_websocket_url(ws_url(node)) as ws, api(node) as client:
        await request(ws, cmd="join", id=1, channel="doc:7", presence=True)
        assert (await next_frame(ws))["push"] == "presence_state"
        diff = await request(ws, cmd="track", id=2, channel="doc:7", key="ann", meta={"c": 1})
        assert diff["push"] == "presence_diff"  # the diff goes out before the reply
        ref = (await next_frame(ws))["ok"]["ref"]
        native = await request(ws, cmd="presence", id=3, channel="doc:7")

        response = await client.get("/api/presence/doc:7")
        assert response.status_code == 200
        assert response.json() == native["ok"]
        [[entry]] = response.json()["state"].values()
        assert response.json()["state"].keys() == {"ann"}
        assert (entry["ref"], entry["meta"]) == (ref, {"c": 1})
        assert isinstance(entry["client"], str)

        empty = await client.get("/api/presence/doc:8")
        assert empty.json() == {"channel": "doc:8", "state": {}}
    # The WebSocket client left: so did its entry.
    await until(lambda: len(node.hub) == 0, "the WebSocket client's connection to end")
    async with api(node) as client:
        assert (await client.get("/api/presence/doc:7")).json()["state"] == {}


async def test_channels_lists_joined_channels_and_patterns(start_node: StartNode) -> None:
    node = await start_node()
    async with (
        open_websocket_url(ws_url(node)) as a,
        open_websocket_url(ws_url(node)) as b,
        api(node) as client,
    ):
        assert (await client.get("/api/channels")).json() == {"channels": []}
        for ws, channel in ((a, "room:b"), (a, "room:a"), (b, "room:*"), (b, "room:a")):
            await request(ws, cmd="join", id=channel, channel=channel)
        # Publishing creates no subscription: it does not make a channel listed.
        await client.post("/api/publish", json={"channel": "quiet", "data": 1})
        assert (await client.get("/api/channels")).json() == {
            "channels": [
                {"channel": "room:*", "subscribers": 1},
                {"channel": "room:a", "subscribers": 2},
                {"channel": "room:b", "subscribers": 1},
            ]
        }
        await request(a, cmd="leave", id=9, channel="room:a")
        listed = (await client.get("/api/channels")).json()["channels"]
        assert {"channel": "room:a", "subscribers": 1} in listed


# -- wrong methods, unknown paths, CORS ----------------------------------------------------


async def test_wrong_methods_and_unknown_paths(start_node: StartNode) -> None:
    node = await start_node()
    async with api(node) as client:
        for method, path, allow in [
            ("GET", "/api/publish", "POST"),
            ("PUT", "/api/publish", "POST"),
            ("POST", "/api/channels", "GET"),
            ("DELETE", "/api/history/a", "GET"),
            ("POST", "/api/presence/a", "GET"),
        ]:
            response = await client.request(method, path)
            assert error(response) == (405, 405, f"use {allow} for {path}"), (method, path)
            assert response.headers["allow"] == allow
        for path in ("/api/nope", "/api/history", "/api/channels/", "/api/publish/a", "/api/"):
            status, _, message = error(await client.get(path))
            assert status == 404, path
            assert message.startswith(f"no API route {path}: there are POST /api/publish")
        # Outside /api/ the node's own 404 answers.
        assert error(await client.get("/apix")) == (404, 404, "no route for GET /apix")
    assert node.hub.stats.publications == 0


async def test_cors_for_allowed_origins(start_node: StartNode) -> None:
    origin = "https://app.example.com"
    node = await start_node(cors_origins=(origin,))
    async with api(node) as client:
        response = await client.get("/api/channels", headers={"origin": origin})
        assert response.headers["access-control-allow-origin"] == origin
        assert response.headers["vary"] == "origin"
        # Errors carry it too, so the page can read why.
        denied = await client.get(
            "/api/channels", headers={"origin": origin, "authorization": "Bearer no"}
        )
        assert denied.status_code == 401
        assert denied.headers["access-control-allow-origin"] == origin
        other = await client.get("/api/channels", headers={"origin": "https://evil.example"})
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers
        preflight = await client.options(
            "/api/publish",
            headers={
                "origin": origin,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == origin
        allowed = {h.strip() for h in preflight.headers["access-control-allow-headers"].split(",")}
        assert {"authorization", "content-type", "x-api-key", "apikey"} <= allowed
        assert "POST" in preflight.headers["access-control-allow-methods"]


# -- records -------------------------------------------------------------------------------

RECORDS = HubConfig(record_policies={"todos:>": "reject", "docs:>": "merge"})


async def test_records_read_and_mutate_like_the_mutate_command(start_node: StartNode) -> None:
    node = await start_node(hub=RECORDS)
    async with api(node) as client, open_websocket_url(ws_url(node)) as ws:
        joined = await request(ws, cmd="join", id=1, channel="todos:1")
        assert joined["ok"]["records"] == []
        empty = await client.get("/api/records/todos:1")
        assert empty.status_code == 200
        assert empty.json() == {
            "channel": "todos:1",
            "policy": "reject",
            "offset": 0,
            "epoch": joined["ok"]["epoch"],
            "records": [],
        }
        created = await client.post(
            "/api/records/todos:1/t1", json={"op": "set", "value": {"title": "milk"}}
        )
        assert created.status_code == 200
        body = created.json()
        assert body["applied"] is True
        assert (body["offset"], body["epoch"]) == (1, joined["ok"]["epoch"])
        record = body["record"]
        assert (record["key"], record["value"]) == ("t1", {"title": "milk"})
        v1 = record["version"]
        Timestamp.decode(v1)
        pub = await next_frame(ws)  # subscribers get the change as from a client
        assert (pub["push"], pub["offset"], pub["data"]) == ("pub", 1, record)
        listed = (await client.get("/api/records/todos:1")).json()
        assert (listed["offset"], listed["records"]) == (1, [record])
        assert (await client.get("/api/records/todos:1/t1")).json() == {
            "channel": "todos:1",
            "record": record,
        }
        # Based on nothing while the record exists: a conflict, with the record as it is.
        conflict = await client.post(
            "/api/records/todos:1/t1", json={"op": "patch", "value": {"done": True}}
        )
        assert conflict.status_code == 412
        error_body = conflict.json()["error"]
        assert error_body["code"] == 412
        assert error_body["message"].startswith("conflict: based on no record")
        assert error_body["record"] == record
        patched = await client.post(
            "/api/records/todos:1/t1",
            json={"op": "patch", "value": {"done": True}, "base": v1},
        )
        assert patched.json()["record"]["value"] == {"title": "milk", "done": True}
        v2 = patched.json()["record"]["version"]
        assert v2 > v1
        # An idempotency key: sent twice, applied once, the same reply both times.
        delete = {"op": "delete", "base": v2, "origin": "backend-1", "seq": 1}
        first = await client.post("/api/records/todos:1/t1", json=delete)
        again = await client.post("/api/records/todos:1/t1", json=delete)
        assert first.status_code == again.status_code == 200
        assert first.json() == again.json()
        assert first.json()["record"]["value"] is None
        assert node.hub.stats.duplicate_mutations == 1
        assert node.hub.stats.publications == 3
        tombstone = (await client.get("/api/records/todos:1/t1")).json()["record"]
        assert tombstone == first.json()["record"]
        # A record never written: no value, no version.
        never = (await client.get("/api/records/todos:1/nothing")).json()
        assert never == {"channel": "todos:1", "record": {"key": "nothing", "value": None}}
        # Keys are percent-decoded after the path is split: any character works.
        slash = await client.post("/api/records/todos:1/a%2Fb%20c", json={"op": "set", "value": {}})
        assert slash.json()["record"]["key"] == "a/b c"


async def test_records_under_field_merge(start_node: StartNode) -> None:
    node = await start_node(hub=RECORDS)
    async with api(node) as client:
        first = await client.post("/api/records/docs:1/d", json={"op": "set", "value": {"a": 1}})
        base = first.json()["record"]["version"]
        for field in ("b", "c"):  # both based on the same version: both win their field
            response = await client.post(
                "/api/records/docs:1/d", json={"op": "patch", "value": {field: 2}, "base": base}
            )
            assert response.json()["applied"] is True
        record = (await client.get("/api/records/docs:1/d")).json()["record"]
        assert record["value"] == {"a": 1, "b": 2, "c": 2}
        assert set(record["fields"]) == {"a", "b", "c"}


async def test_forgotten_tombstones_over_rest(start_node: StartNode) -> None:
    # Tombstones are forgotten by the wall clock (the records' hybrid clock): the test moves it.
    wall = [time.time()]
    hub = Hub(attrs.evolve(RECORDS, tombstone_ttl=0.01), wall_clock=lambda: wall[0])
    node = await start_node(hub=hub)
    async with api(node) as client:
        url = "/api/records/todos:2/t"
        v1 = (await client.post(url, json={"op": "set", "value": {}})).json()["record"]["version"]
        deleted = await client.post(url, json={"op": "delete", "base": v1})
        tombstone = deleted.json()["record"]["version"]
        wall[0] += 0.05  # past the tombstone ttl
        node.hub.tick(node.now)  # the node's timer does this every ping_interval
        listed = (await client.get("/api/records/todos:2")).json()
        assert listed["records"] == []
        assert listed["forgotten"] == tombstone
        # Based on the forgotten tombstone itself (the newest forgotten): creates again.
        again = await client.post(url, json={"op": "set", "value": {"n": 1}, "base": tombstone})
        assert again.json()["applied"] is True
        # Based on a version older than the newest forgotten one: a conflict, whose record
        # gives the version to base the next try on.
        stale = await client.post(
            "/api/records/todos:2/u", json={"op": "set", "value": {}, "base": v1}
        )
        assert stale.status_code == 412
        current = stale.json()["error"]["record"]
        assert current == {"key": "u", "value": None, "version": tombstone}
        retry = await client.post(
            "/api/records/todos:2/u", json={"op": "set", "value": {}, "base": tombstone}
        )
        assert retry.json()["applied"] is True


async def test_bad_record_requests(start_node: StartNode) -> None:
    node = await start_node(hub=RECORDS)
    node.publish("room:1", "not records")
    publications = node.hub.stats.publications
    version = "1718000000000.00003.n1"
    url = "/api/records/todos:1/t1"
    async with api(node) as client:
        bad_bodies: list[tuple[Any, str]] = [
            ([1], "body must be a JSON object, got array"),
            ({}, "'op' must be one of set, patch, delete (missing)"),
            (
                {"op": "put", "value": {}},
                "'op' must be one of set, patch, delete (got string 'put')",
            ),
            ({"op": "set"}, "'value' must be an object for set, got null"),
            ({"op": "patch", "value": [1]}, "'value' must be an object for patch, got array"),
            ({"op": "delete", "value": {}}, "delete takes no 'value'"),
            (
                {"op": "delete", "bsae": version},
                "unknown field 'bsae': use op, value, base, origin, seq",
            ),
            (
                {"op": "delete", "base": 17},
                "'base' must be a record's version (a string) or null, got number",
            ),
            ({"op": "delete", "base": "yesterday"}, "'base': not a timestamp: 'yesterday'"),
            (
                {"op": "delete", "origin": "o"},
                "'origin' and 'seq' go together (an idempotency key), or neither",
            ),
            ({"op": "delete", "origin": "o", "seq": 0}, "'seq' must be an integer of at least 1"),
            (
                {"op": "delete", "origin": "", "seq": 1},
                "'origin' must be a string of 1 to 64 characters",
            ),
        ]
        for body, message in bad_bodies:
            assert error(await client.post(url, json=body)) == (400, 400, message), body
        not_json = await client.post(url, content=b"{op: set")
        status, code, message = error(not_json)
        assert (status, code) == (400, 400)
        assert message.startswith("body is not JSON: ")
        big = {"op": "set", "value": {"x": "y" * 70_000}}
        assert error(await client.post(url, json=big)) == (
            413,
            413,
            "value larger than 65536 bytes (70008 as JSON)",
        )
        for path in ("/api/records/todos:*/t1", "/api/records/todos:*"):
            status, code, message = error(await client.get(path))
            assert (status, code) == (422, 422), path
            assert message.startswith("wildcards are only allowed in patterns")
        for path in ("/api/records/room:1", "/api/records/room:1/t1", "/api/records/never:used"):
            status, code, message = error(await client.get(path))
            assert (status, code) == (404, 404), path
            assert message.endswith(
                "holds no records: no pattern of hub.record_policies matches it"
            )
        status, _, message = error(
            await client.post("/api/records/room:1/t1", json={"op": "delete"})
        )
        assert status == 404
        long_key = "/api/records/todos:1/" + "k" * 257
        for path in (long_key, "/api/records/todos:1/"):
            response = await client.post(path, json={"op": "delete"})
            length = 257 if path == long_key else 0
            assert error(response) == (
                422,
                422,
                f"a record key is 1 to 256 characters, got {length}",
            )
        for method, path, allow in [
            ("POST", "/api/records/todos:1", "GET"),
            ("PUT", "/api/records/todos:1/t1", "GET, POST"),
            ("DELETE", "/api/records/todos:1/t1", "GET, POST"),
        ]:
            response = await client.request(method, path)
            assert error(response) == (405, 405, f"use {allow} for {path}")
            assert response.headers["allow"] == allow
        no_key = await client.post(
            url, json={"op": "delete"}, headers={"authorization": "Bearer x"}
        )
        assert error(no_key) == (401, 401, "wrong API key")
    assert node.hub.stats.publications == publications
    assert node.hub.stats.mutations == 0
