"""The SSE transport over real sockets: the conformance kit, the stream's format, resuming
with Last-Event-ID, heartbeats, CORS and the errors it answers before any stream."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import orjson
import pytest
import trio
from httpkit import SseParser, base_url, open_sse, sse_kit_client, sse_target, stream_get
from nodekit import StartNode, until
from trio.testing import MockClock

from pyrt.hub.history import StreamPosition
from pyrt.hub.hub import HubConfig
from pyrt.node.node import load_transports
from pyrt.plugins.cursor import Cursor, decode_cursor
from pyrt.plugins.sse import SseTransport
from pyrt.testing import Closed, check_transport


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    """Nodes with the SSE transport loaded as a plugin (by entry point name)."""
    return functools.partial(start_node, transports=("sse",))


def sse(**options: Any) -> dict[str, dict[str, Any]]:
    """`transport_options` for the SSE transport."""
    return {"sse": options}


async def frame_of(client: Any, push: str) -> dict[str, Any]:
    with trio.fail_after(5):
        while True:
            frame: dict[str, Any] = await client.receive()
            if frame.get("push") == push:
                return frame


async def test_sse_transport_passes_the_conformance_kit() -> None:
    await check_transport(SseTransport, sse_kit_client, joins_on_open=1)


def test_sse_is_an_entry_point_plugin_with_checked_options() -> None:
    [transport] = load_transports(["sse"], {"sse": {"heartbeat": 2, "retry_ms": 500}})
    assert isinstance(transport, SseTransport)
    assert (transport.name, transport.heartbeat, transport.retry_ms) == ("sse", 2.0, 500)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"heartbeat": 0}, "heartbeat must be a positive number of seconds, not 0"),
        ({"heartbeat": float("inf")}, "heartbeat must be a positive number"),
        ({"heartbeat": "15"}, "heartbeat must be a number of seconds, not '15'"),
        ({"retry_ms": -1}, "retry_ms must not be negative"),
        ({"retry_ms": 1.5}, r"retry_ms must be an integer \(milliseconds\), not 1.5"),
        ({"retry_ms": True}, "retry_ms must be an integer"),
        ({"heartbeats": 1}, "unexpected keyword argument 'heartbeats'"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=r"^transports\.sse: .*" + message):
            load_transports(["sse"], {"sse": options})


async def test_the_stream_format(start_node: StartNode) -> None:
    node = await start_node(transport_options=sse(retry_ms=1234))
    target = sse_target([("channel", "room:1"), ("presence", "room:2"), ("channel", "feed:*")])
    async with stream_get(node, target) as response:
        assert response.status == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-accel-buffering"] == "no"
        raw = b""
        while raw.count(b"\n\n") < 6:  # retry, session, 3 join replies, presence_state
            raw += await response.chunk()
        node.publish("room:1", {"text": "hi"})
        node.publish("feed:a", 1)
        while raw.count(b"\n\n") < 8:
            raw += await response.chunk()
    events = raw.split(b"\n\n")
    assert events[0] == b"retry: 1234"
    session = orjson.loads(events[1].removeprefix(b"data: "))
    assert session == {"push": "session", "session": session["session"], "token": session["token"]}
    # Every other event: an optional id line, then one data line with one frame.
    parsed = []
    for event in events[2:8]:
        lines = event.split(b"\n")
        ids = [line.removeprefix(b"id: ").decode() for line in lines if line.startswith(b"id: ")]
        [data] = [line.removeprefix(b"data: ") for line in lines if line.startswith(b"data: ")]
        assert len(lines) == len(ids) + 1
        parsed.append((orjson.loads(data), ids[0] if ids else None))
    # Joined in the URL's order; the presence state follows its join reply.
    (join1, id1), (join2, id2), (state, id4), (join3, id3), (pub, id5), (pattern_pub, id6) = parsed
    assert (join1["reply"], join2["reply"], join3["reply"]) == (
        "join:room:1",
        "join:room:2",
        "join:feed:*",
    )
    epoch1, epoch2 = join1["ok"]["epoch"], join2["ok"]["epoch"]
    # Ids follow the positions the client has been handed, all channels in each.
    assert id1 is not None
    assert decode_cursor(id1) == Cursor({"room:1": StreamPosition(0, epoch1)})
    assert id2 is not None
    assert decode_cursor(id2) == Cursor(
        {"room:1": StreamPosition(0, epoch1), "room:2": StreamPosition(0, epoch2)}
    )
    assert id3 is None  # a pattern has no position
    assert (state["push"], id4) == ("presence_state", None)
    assert (pub["push"], pub["data"]) == ("pub", {"text": "hi"})
    assert id5 is not None
    assert decode_cursor(id5).positions["room:1"] == StreamPosition(1, epoch1)
    # A publication that came through a pattern moves no tracked position.
    assert (pattern_pub["channel"], id6) == ("feed:a", None)


async def test_commands_go_through_connection_send(start_node: StartNode) -> None:
    node = await start_node()
    async with open_sse(node, {"channel": "room:1"}) as a, open_sse(node, {"channel": "x"}) as b:
        await b.send({"id": "j", "cmd": "join", "channel": "room:1"})
        joined = await b.receive()
        while joined.get("reply") != "j":
            joined = await b.receive()
        await b.send({"id": 2, "cmd": "publish", "channel": "room:1", "data": "yo", "ack": True})
        assert (await frame_of(a, "pub"))["data"] == "yo"
        # The session's token is needed; and only for its own session.
        async with httpx.AsyncClient(base_url=base_url(node)) as http:
            send = "/connection/send"
            wrong = await http.post(send, params={"session": a.session, "token": b.token})
            assert (wrong.status_code, wrong.json()["error"]["message"]) == (
                401,
                "wrong session token",
            )
            gone = await http.post(send, params={"session": "nope.1", "token": "t"}, content=b"{}")
            assert gone.status_code == 404


async def test_last_event_id_resumes_every_channel(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(history_size=10))
    params = [("channel", "a"), ("channel", "b")]
    async with open_sse(node, params) as first:
        node.publish("a", "a1")
        node.publish("b", "b1")
        assert (await frame_of(first, "pub"))["data"] == "a1"
        assert (await frame_of(first, "pub"))["data"] == "b1"
        resume_id = first.last_event_id
        assert resume_id is not None
        # Seen too, but the reconnect below resumes from the id before it, as a browser
        # whose connection broke before this event reached it would.
        node.publish("a", "a2")
        assert (await frame_of(first, "pub"))["data"] == "a2"
    node.publish("a", "a3")
    node.publish("b", "b2")
    node.publish("b", "b3")
    # Last-Event-ID wins over the URL's cursor, which would replay from the start.
    old_cursor = Cursor({"a": StreamPosition(0, "other-epoch")}).encode()
    async with open_sse(
        node, [*params, ("cursor", old_cursor)], headers={"last-event-id": resume_id}
    ) as again:
        frames: list[dict[str, Any]] = []
        with trio.fail_after(5):
            while len([f for f in frames if f.get("push") == "pub"]) < 4:
                frames.append(await again.receive())
        replies = {f["reply"]: f["ok"] for f in frames if "reply" in f}
        assert replies["join:a"]["recovered"] is True
        assert replies["join:b"]["recovered"] is True
        pubs = [f["data"] for f in frames if f.get("push") == "pub"]
        assert pubs == ["a2", "a3", "b2", "b3"]  # each missed one once, in order per channel
        # Its own ids carry on from there.
        assert again.last_event_id is not None
        positions = decode_cursor(again.last_event_id).positions
        assert (positions["a"].offset, positions["b"].offset) == (3, 3)


async def test_resume_beyond_history_says_so(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(history_size=2))
    async with open_sse(node, {"channel": "a"}) as first:
        node.publish("a", 0)
        await frame_of(first, "pub")
        token = first.last_event_id
    assert token is not None
    for n in range(5):
        node.publish("a", n)
    async with open_sse(node, {"channel": "a", "cursor": token}) as again:
        reply = await again.receive()
        assert reply["ok"]["recovered"] is False
        assert reply["ok"]["offset"] == 6
        assert again.last_event_id is not None
        assert decode_cursor(again.last_event_id).positions["a"].offset == 6
        node.publish("a", "live")
        pub = await frame_of(again, "pub")
        assert (pub["offset"], pub["data"]) == (7, "live")  # nothing replayed before it


async def test_heartbeat_comments_while_idle(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node(transport_options=sse(heartbeat=0.05))
    async with open_sse(node, {"channel": "quiet"}) as client:
        await client.receive()  # the join reply
        with trio.move_on_after(3):
            while len(client.comments) < 3:
                await client.event()
        assert client.comments[:3] == ["ping", "ping", "ping"]
        assert client.retry == 2000


async def test_no_heartbeat_while_frames_flow(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node(transport_options=sse(heartbeat=1.0))
    async with open_sse(node, {"channel": "busy"}) as client:
        await client.receive()
        for n in range(8):
            node.publish("busy", n)
            await trio.sleep(0.1)  # the publisher's pace, never a second of silence (virtual)
            assert (await frame_of(client, "pub"))["data"] == n
        assert client.comments == []


async def test_cors_headers_only_for_allowed_origins(start_node: StartNode) -> None:
    node = await start_node(cors_origins=("https://app.example",))
    target = sse_target({"channel": "c"})
    async with stream_get(node, target, {"origin": "https://app.example"}) as response:
        assert response.status == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
    async with stream_get(node, target, {"origin": "https://evil.example"}) as response:
        assert response.status == 200
        assert "access-control-allow-origin" not in response.headers
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        error = await http.get("/connection/sse", headers={"origin": "https://app.example"})
        assert error.status_code == 400
        assert error.headers["access-control-allow-origin"] == "https://app.example"
        preflight = await http.options(
            "/connection/sse",
            headers={
                "origin": "https://app.example",
                "access-control-request-headers": "last-event-id",
            },
        )
        assert preflight.status_code == 204
        assert "last-event-id" in preflight.headers["access-control-allow-headers"]


async def test_errors_before_any_stream(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(max_channels_per_connection=2))
    cases: list[tuple[Any, dict[str, str], int, str]] = [
        ({}, {}, 400, "give at least one channel: ?channel=<name or pattern>"),
        ({"channel": "a b"}, {}, 422, "channel 'a b': invalid character U+0020 (at position 1)"),
        (
            [("channel", "a"), ("channel", "b"), ("channel", "c")],
            {},
            429,
            "at most 2 channels per connection",
        ),
        ({"channel": "a", "cursor": "%%%"}, {}, 400, "cursor is not a token this server issued"),
        (
            {"channel": "a"},
            {"last-event-id": "bm90IGpzb24"},
            400,
            "cursor is not a token this server issued",
        ),
        ({"presence": "a:*"}, {}, 400, "presence needs a channel name, not a pattern: 'a:*'"),
    ]
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        for params, headers, status, message in cases:
            response = await http.get("/connection/sse", params=params, headers=headers)
            assert response.status_code == status, (params, response.text)
            assert response.headers["content-type"] == "application/json"
            error = response.json()["error"]
            assert (error["code"], error["message"]) == (status, message)
        posted = await http.post("/connection/sse", params={"channel": "a"})
        assert posted.status_code == 405
    assert len(node.hub) == 0  # no session was opened for any of them


async def test_duplicate_channels_join_once_and_presence_implies_the_join(
    start_node: StartNode,
) -> None:
    node = await start_node()
    params = [("channel", "a"), ("channel", "a"), ("presence", "a"), ("presence", "p")]
    async with open_sse(node, params) as client:
        frames = [await client.receive() for _ in range(4)]
        assert [f.get("reply") or f["push"] for f in frames] == [
            "join:a",
            "presence_state",
            "join:p",
            "presence_state",
        ]
        assert all("ok" in f for f in frames if "reply" in f)
        assert node.hub.channels() == {"a": 1, "p": 1}


async def test_a_client_that_hangs_up_leaves_at_once(start_node: StartNode) -> None:
    # The heartbeat is far away: only the hangup watcher can notice.
    node = await start_node(transport_options=sse(heartbeat=60))
    async with open_sse(node, {"presence": "room"}) as watcher:
        await frame_of(watcher, "presence_state")
        async with open_sse(node, {"presence": "room"}) as leaver:
            await frame_of(leaver, "presence_state")
            await leaver.send({"id": 1, "cmd": "track", "channel": "room", "key": "ann"})
            assert list((await frame_of(watcher, "presence_diff"))["joins"]) == ["ann"]
        with trio.fail_after(2):
            diff = await frame_of(watcher, "presence_diff")
        assert list(diff["leaves"]) == ["ann"]
        assert len(node.hub) == 1


async def test_the_hub_closing_the_session_ends_the_stream_with_a_close_event(
    start_node: StartNode,
) -> None:
    node = await start_node()
    async with open_sse(node, {"channel": "a"}) as client:
        await client.receive()
        await client.send_raw(b"[1]")  # not an object: closes with 4000
        frame = await client.receive_any()
        assert frame == {"push": "close", "code": 4000, "reason": "frame must be a JSON object"}
        with pytest.raises(Closed):
            await client.event()
    # The server ends the session right after the stream's last bytes went out.
    await until(lambda: len(node.hub) == 0, "the session to end", timeout=2)


def test_the_test_parser_follows_the_spec_line_endings() -> None:
    parser = SseParser()
    events = parser.feed(b"retry: 5\r\n\r\ndata: a\rdata: b\r")
    assert [(e.data, e.retry) for e in events] == [(None, 5)]
    events = parser.feed(b"\nid: x\n: note\n\n")
    assert [(e.data, e.id, e.comments) for e in events] == [("a\nb", "x", ["note"])]
    # U+2028 inside data is not a line break for SSE.
    assert [e.data for e in SseParser().feed("data: x\u2028y\n\n".encode())] == ["x\u2028y"]
