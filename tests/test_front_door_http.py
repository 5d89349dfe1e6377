"""The HTTP front door under bad input, over raw sockets: deadlines, bodies, status lines.

Every refusal is checked the same way: the documented status (with its reason phrase and
pyrt's JSON error body), then the server closes the connection, and a second client is
served normally afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from httpkit import base_url, open_sse, stream_get
from trio_websocket import open_websocket_url

from pyrt._config import ConfigError, node_config
from pyrt._node import Node, NodeConfig

KEY = "k"
TIMEOUT = 0.5
"""`request_timeout` of the nodes here: short, so that deadlines are seen quickly."""


async def start(nursery: trio.Nursery, **config: Any) -> Node:
    config.setdefault("api_keys", (KEY,))
    config.setdefault("request_timeout", TIMEOUT)
    node: Node = await nursery.start(Node(NodeConfig(port=0, **config)).run)
    return node


@attrs.frozen
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes


@attrs.frozen
class Conversation:
    replies: list[Reply]
    rest: bytes
    """Bytes after the last whole response (none, normally)."""
    seconds: float
    """From the first byte sent to the server's close."""


def parse(data: bytes) -> tuple[list[Reply], bytes]:
    """Responses with a content-length, one after the other, and what follows them."""
    replies = []
    while b"\r\n\r\n" in data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, reason = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        replies.append(Reply(int(status), reason, headers, data[:length]))
        data = data[length:]
    return replies, data


async def converse(
    node: Node, *pieces: bytes, pause: float = 0.0, within: float = 5.0
) -> Conversation:
    """Sends `pieces` (`pause` seconds apart, for as long as the server reads) and reads
    everything until the server closes the connection; fails if it has not within `within`."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        started = trio.current_time()
        received = bytearray()

        async def read() -> None:
            with trio.fail_after(within):
                while True:
                    try:
                        chunk = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break  # reset: the server closed with our bytes unread
                    if not chunk:
                        break
                    received.extend(chunk)
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                for i, piece in enumerate(pieces):
                    if i and pause:
                        await trio.sleep(pause)
                    await stream.send_all(piece)
            except trio.BrokenResourceError:
                pass  # the server closed while we were still sending
            await trio.sleep_forever()
        seconds = trio.current_time() - started
    replies, rest = parse(bytes(received))
    return Conversation(replies, rest, seconds)


def assert_refused(conversation: Conversation, status: int, message: str) -> None:
    """One error response with `status`, pyrt's JSON body and `connection: close`, then the
    server closed (`converse` returned)."""
    [reply] = conversation.replies
    assert conversation.rest == b""
    assert (reply.status, reply.reason) == (status, HTTPStatus(status).phrase)
    assert reply.headers["connection"] == "close"
    assert reply.headers["content-type"] == "application/json"
    error = orjson.loads(reply.body)["error"]
    assert error["code"] == status
    assert message in error["message"], error


async def assert_served(node: Node) -> None:
    """A second client gets its answer: a publish over the REST API reaches a WebSocket."""
    async with (
        open_websocket_url(f"ws://127.0.0.1:{node.port}/connection/websocket") as ws,
        httpx.AsyncClient(base_url=base_url(node), timeout=5) as http,
    ):
        await ws.send_message(orjson.dumps({"cmd": "join", "id": 1, "channel": "after"}).decode())
        with trio.fail_after(5):
            assert orjson.loads(await ws.get_message())["reply"] == 1
            response = await http.post(
                "/api/publish",
                json={"channel": "after", "data": "still here"},
                headers={"x-api-key": KEY},
            )
            assert response.status_code == 200, response.text
            assert orjson.loads(await ws.get_message())["data"] == "still here"


def post(target: str, headers: Sequence[str] = (), *, key: bool = True) -> bytes:
    """A POST head (no body)."""
    lines = [f"POST {target} HTTP/1.1", "host: pyrt.test", *headers]
    if key:
        lines.append(f"x-api-key: {KEY}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


PUBLISH = b'{"channel": "c", "data": 1}'


# -- the request deadline: head and body -----------------------------------------------------


async def test_a_body_that_never_arrives_is_answered_408_at_the_deadline(
    nursery: trio.Nursery,
) -> None:
    node = await start(nursery)
    conversation = await converse(node, post("/api/publish", ["content-length: 100"]))
    assert_refused(conversation, 408, "the request body did not arrive in time")
    assert TIMEOUT * 0.9 <= conversation.seconds < TIMEOUT + 2
    await assert_served(node)


async def test_a_body_dripping_one_byte_at_a_time_ends_at_the_deadline(
    nursery: trio.Nursery,
) -> None:
    node = await start(nursery)
    async with open_sse(node, {"channel": "c"}) as sse:
        target = f"/connection/send?session={sse.session}&token={sse.token}"
        frame = b'{"cmd": "ping", "id": 1}'
        head = post(target, [f"content-length: {len(frame)}"], key=False)
        drip = [head, *(frame[i : i + 1] for i in range(len(frame)))]
        conversation = await converse(node, *drip, pause=0.1)
    assert_refused(conversation, 408, "did not arrive in time")
    assert TIMEOUT * 0.9 <= conversation.seconds < TIMEOUT + 2
    await assert_served(node)


async def test_a_chunked_body_that_never_ends_is_answered_408(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    head = post("/api/publish", ["transfer-encoding: chunked"])
    conversation = await converse(node, head + b'5\r\n{"cha\r\n')
    assert_refused(conversation, 408, "did not arrive in time")
    await assert_served(node)


async def test_a_route_that_reads_no_body_answers_then_closes_at_the_deadline(
    nursery: trio.Nursery,
) -> None:
    # The body is read and dropped to keep the connection; it never comes, so the route's
    # answer goes out at the deadline and the connection is closed.
    node = await start(nursery)
    conversation = await converse(node, post("/healthz", ["content-length: 10"], key=False))
    [reply] = conversation.replies
    assert (reply.status, reply.headers["connection"]) == (404, "close")
    assert TIMEOUT * 0.9 <= conversation.seconds < TIMEOUT + 2
    await assert_served(node)


async def test_many_heads_without_bodies_are_all_let_go_at_the_deadline(
    nursery: trio.Nursery,
) -> None:
    node = await start(nursery)
    results: list[Conversation] = []

    async def one() -> None:
        results.append(await converse(node, post("/api/publish", ["content-length: 10"])))

    async with trio.open_nursery() as clients:
        for _ in range(100):
            clients.start_soon(one)
    assert len(results) == 100
    for conversation in results:
        assert_refused(conversation, 408, "did not arrive in time")
    assert max(c.seconds for c in results) < TIMEOUT + 3
    await assert_served(node)


async def test_a_head_that_never_ends_is_closed_without_an_answer(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    conversation = await converse(node, b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n")
    assert (conversation.replies, conversation.rest) == ([], b"")
    assert TIMEOUT * 0.9 <= conversation.seconds < TIMEOUT + 2
    # One byte at a time, within the deadline each, does not extend it.
    drip = [bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\nx-slow: yes"]
    conversation = await converse(node, *drip, pause=0.05)
    assert (conversation.replies, conversation.rest) == ([], b"")
    assert conversation.seconds < TIMEOUT + 2
    await assert_served(node)


async def test_an_idle_keep_alive_connection_is_closed_after_request_timeout(
    nursery: trio.Nursery,
) -> None:
    node = await start(nursery)
    get = b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n\r\n"
    # Two requests on one connection, the second within the deadline, then silence.
    conversation = await converse(node, get, get, pause=TIMEOUT / 2)
    assert [r.status for r in conversation.replies] == [200, 200]
    assert "connection" not in conversation.replies[0].headers
    assert conversation.rest == b""
    assert TIMEOUT * 1.4 <= conversation.seconds < TIMEOUT * 1.5 + 2


async def test_streams_outlive_the_request_deadline(nursery: trio.Nursery) -> None:
    options = {"longpoll": {"poll_timeout": 3 * TIMEOUT, "session_ttl": 10.0}}
    node = await start(nursery, transport_options=options)
    async with (
        open_sse(node, {"channel": "sse"}) as sse,
        open_websocket_url(f"ws://127.0.0.1:{node.port}/connection/websocket") as ws,
        httpx.AsyncClient(base_url=base_url(node), timeout=5) as http,
    ):
        opened = (await http.get("/connection/poll", params={"channel": "poll"})).json()
        params = {"session": opened["session"], "token": opened["token"]}
        # A long-poll wait longer than the deadline ends with an empty batch, not a 408.
        started = trio.current_time()
        response = await http.get("/connection/poll", params={**params, "cursor": opened["cursor"]})
        assert response.status_code == 200
        assert response.json()["messages"] == []
        assert trio.current_time() - started >= 3 * TIMEOUT * 0.9
        await trio.sleep(TIMEOUT)
        # The SSE stream and the WebSocket, open for several deadlines, still carry frames.
        node.publish("sse", "late")
        with trio.fail_after(5):
            frame = await sse.receive()
            while frame.get("push") != "pub":
                frame = await sse.receive()
        assert frame["data"] == "late"
        await ws.send_message(orjson.dumps({"cmd": "join", "id": 1, "channel": "ws"}).decode())
        with trio.fail_after(5):
            assert orjson.loads(await ws.get_message())["reply"] == 1


# -- chunked bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hexadecimal
        b"5\r\nhelloXX0\r\n\r\n",  # no CRLF after the chunk
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"5;" + b"x" * 20_000,  # a chunk-size line that does not end within the head limit
    ],
)
async def test_a_malformed_chunked_body_is_a_400(nursery: trio.Nursery, body: bytes) -> None:
    node = await start(nursery)
    conversation = await converse(node, post("/api/publish", ["transfer-encoding: chunked"]) + body)
    assert_refused(conversation, 400, "malformed request body")
    await assert_served(node)


async def test_a_malformed_chunked_command_is_a_400(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with open_sse(node, {"channel": "c"}) as sse:
        target = f"/connection/send?session={sse.session}&token={sse.token}"
        head = post(target, ["transfer-encoding: chunked"], key=False)
        conversation = await converse(node, head + b"nope\r\n")
    assert_refused(conversation, 400, "malformed request body")
    await assert_served(node)


async def test_a_malformed_chunked_body_nobody_reads_closes_after_the_answer(
    nursery: trio.Nursery,
) -> None:
    node = await start(nursery)
    head = post("/healthz", ["transfer-encoding: chunked"], key=False)
    conversation = await converse(node, head + b"zz\r\n")
    [reply] = conversation.replies
    assert (reply.status, reply.headers["connection"]) == (404, "close")
    await assert_served(node)


# -- status lines --------------------------------------------------------------------------------


async def test_every_status_line_has_its_reason_phrase(nursery: trio.Nursery) -> None:
    node = await start(nursery, cors_origins=("https://app.test",))
    seen = {}
    requests = {
        200: b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        204: b"OPTIONS /api/publish HTTP/1.1\r\nhost: x\r\norigin: https://app.test\r\n"
        b"connection: close\r\n\r\n",
        400: b"GET /connection/websocket HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
        b"connection: upgrade\r\n\r\n",  # no sec-websocket-key
        401: b"GET /api/channels HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        404: b"GET /nope HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        405: b"POST /metrics HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    }
    for request in requests.values():
        conversation = await converse(node, request)
        [reply] = conversation.replies
        seen[reply.status] = reply.reason
    assert seen == {status: HTTPStatus(status).phrase for status in requests}
    # The bad upgrade's 400 has pyrt's error body too.
    conversation = await converse(node, requests[400])
    body = orjson.loads(conversation.replies[0].body)
    assert body["error"]["message"].startswith("bad websocket upgrade")
    # A streamed response, and the WebSocket switch (made by wsproto).
    async with stream_get(node, "/connection/sse?channel=c") as response:
        assert response.status == 200
    async with await trio.open_tcp_stream("127.0.0.1", node.port or 0) as stream:
        upgrade = (
            b"GET /connection/websocket HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n"
            b"connection: upgrade\r\nsec-websocket-version: 13\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        await stream.send_all(upgrade)
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")


async def test_a_streamed_status_line_has_its_reason_phrase(nursery: trio.Nursery) -> None:
    node = await start(nursery)
    async with await trio.open_tcp_stream("127.0.0.1", node.port or 0) as stream:
        await stream.send_all(b"GET /connection/sse?channel=c HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


# -- configuration ----------------------------------------------------------------------------


def test_the_request_timeout_is_a_server_setting() -> None:
    assert node_config(overrides={"request_timeout": 2}).request_timeout == 2.0
    for value in [0, True, float("nan"), "10s"]:
        with pytest.raises(ConfigError, match=r"server\.request_timeout"):
            node_config(overrides={"request_timeout": value})
