"""The HTTP front door under bad input, over raw sockets: deadlines, framing, head limits.

Every refusal is checked the same way: the documented status (with its reason phrase and
pyrt's JSON error body), then the server closes the connection, and a second client is
served normally afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from http import HTTPStatus

import attrs
import httpx
import orjson
import pytest
import trio
from httpkit import base_url, open_sse, stream_get
from nodekit import StartNode
from trio.testing import MockClock
from trio_websocket import open_websocket_url

from pyrt.node.config import ConfigError, node_config
from pyrt.node.node import Node

KEY = "k"
TIMEOUT = 0.5
"""`request_timeout` of the nodes here: short, so that deadlines are seen quickly."""


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(start_node, api_keys=(KEY,), request_timeout=TIMEOUT)


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
                        await trio.sleep(pause)  # a slow client: the behaviour under test
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
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node()
    conversation = await converse(node, post("/api/publish", ["content-length: 100"]))
    assert_refused(conversation, 408, "the request body did not arrive in time")
    assert conversation.seconds == pytest.approx(TIMEOUT)
    await assert_served(node)


async def test_a_body_dripping_one_byte_at_a_time_ends_at_the_deadline(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node()
    async with open_sse(node, {"channel": "c"}) as sse:
        target = f"/connection/send?session={sse.session}&token={sse.token}"
        frame = b'{"cmd": "ping", "id": 1}'
        head = post(target, [f"content-length: {len(frame)}"], key=False)
        drip = [head, *(frame[i : i + 1] for i in range(len(frame)))]
        conversation = await converse(node, *drip, pause=0.1)
    assert_refused(conversation, 408, "did not arrive in time")
    assert conversation.seconds == pytest.approx(TIMEOUT)
    await assert_served(node)


async def test_a_chunked_body_that_never_ends_is_answered_408(start_node: StartNode) -> None:
    node = await start_node()
    head = post("/api/publish", ["transfer-encoding: chunked"])
    conversation = await converse(node, head + b'5\r\n{"cha\r\n')
    assert_refused(conversation, 408, "did not arrive in time")
    await assert_served(node)


async def test_a_route_that_reads_no_body_answers_then_closes_at_the_deadline(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    # The body is read and dropped to keep the connection; it never comes, so the route's
    # answer goes out at the deadline and the connection is closed.
    node = await start_node()
    conversation = await converse(node, post("/healthz", ["content-length: 10"], key=False))
    [reply] = conversation.replies
    assert (reply.status, reply.headers["connection"]) == (404, "close")
    assert conversation.seconds == pytest.approx(TIMEOUT)
    await assert_served(node)


async def test_many_heads_without_bodies_are_all_let_go_at_the_deadline(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node()
    results: list[Conversation] = []

    async def one() -> None:
        results.append(await converse(node, post("/api/publish", ["content-length: 10"])))

    async with trio.open_nursery() as clients:
        for _ in range(100):
            clients.start_soon(one)
    assert len(results) == 100
    for conversation in results:
        assert_refused(conversation, 408, "did not arrive in time")
    assert [c.seconds for c in results] == [pytest.approx(TIMEOUT)] * 100
    await assert_served(node)


async def test_a_head_that_never_ends_is_closed_without_an_answer(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node()
    conversation = await converse(node, b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n")
    assert (conversation.replies, conversation.rest) == ([], b"")
    assert conversation.seconds == pytest.approx(TIMEOUT)
    # One byte at a time, within the deadline each, does not extend it.
    drip = [bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\nx-slow: yes"]
    conversation = await converse(node, *drip, pause=0.05)
    assert (conversation.replies, conversation.rest) == ([], b"")
    assert conversation.seconds == pytest.approx(TIMEOUT)  # not one pause more
    await assert_served(node)


async def test_an_idle_keep_alive_connection_is_closed_after_request_timeout(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node()
    get = b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n\r\n"
    # Two requests on one connection, the second within the deadline, then silence.
    conversation = await converse(node, get, get, pause=TIMEOUT / 2)
    assert [r.status for r in conversation.replies] == [200, 200]
    assert "connection" not in conversation.replies[0].headers
    assert conversation.rest == b""
    assert conversation.seconds == pytest.approx(TIMEOUT / 2 + TIMEOUT)  # from the second


async def test_streams_outlive_the_request_deadline(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    options = {"longpoll": {"poll_timeout": 3 * TIMEOUT, "session_ttl": 10.0}}
    node = await start_node(transport_options=options)
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
        assert trio.current_time() - started == pytest.approx(3 * TIMEOUT)  # poll_timeout
        await trio.sleep(TIMEOUT)  # virtual time (the autojump clock): one more deadline passes
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


# -- framing: content-length and transfer-encoding -------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (["content-length: abc"], "bad Content-Length"),
        (["content-length: -1"], "bad Content-Length"),
        (["content-length: +5"], "bad Content-Length"),
        (["content-length: 0x5"], "bad Content-Length"),
        (["content-length: 5", "content-length: 6"], "conflicting Content-Length"),
        (["content-length: 5, 6"], "conflicting Content-Length"),
        (
            ["content-length: 5", "transfer-encoding: chunked"],
            "must not have both content-length and transfer-encoding",
        ),
        (
            ["transfer-encoding: chunked", "content-length: 0"],
            "must not have both content-length and transfer-encoding",
        ),
    ],
)
async def test_ambiguous_or_bad_framing_is_a_400(
    start_node: StartNode, headers: list[str], message: str
) -> None:
    node = await start_node()
    conversation = await converse(node, post("/api/publish", headers) + b"0\r\n\r\n")
    assert_refused(conversation, 400, message)
    await assert_served(node)


async def test_a_smuggled_request_is_not_served(start_node: StartNode) -> None:
    # Content-length says the body is the chunked terminator; transfer-encoding would make
    # what follows a second request. Neither is believed: one 400, then the connection ends.
    node = await start_node()
    smuggled = b"GET /healthz HTTP/1.1\r\nhost: pyrt.test\r\n\r\n"
    head = post("/api/publish", ["content-length: 5", "transfer-encoding: chunked"])
    conversation = await converse(node, head + b"0\r\n\r\n" + smuggled)
    assert_refused(conversation, 400, "both content-length and transfer-encoding")
    await assert_served(node)


async def test_transfer_encoding_in_http_1_0_is_a_400(start_node: StartNode) -> None:
    node = await start_node()
    request = b"POST /api/publish HTTP/1.0\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    conversation = await converse(node, request)
    assert_refused(conversation, 400, "transfer-encoding is not allowed in an HTTP/1.0 request")
    await assert_served(node)


async def test_an_unknown_transfer_coding_is_a_501(start_node: StartNode) -> None:
    node = await start_node()
    conversation = await converse(node, post("/api/publish", ["transfer-encoding: gzip"]))
    assert_refused(conversation, 501, "Transfer-Encoding: chunked")
    await assert_served(node)


async def test_the_same_content_length_twice_is_one_content_length(
    start_node: StartNode,
) -> None:
    node = await start_node()
    n = len(PUBLISH)
    head = post(
        "/api/publish", [f"content-length: {n}", f"content-length: {n}", "connection: close"]
    )
    conversation = await converse(node, head + PUBLISH)
    [reply] = conversation.replies
    assert (reply.status, reply.reason) == (200, "OK")


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
async def test_a_malformed_chunked_body_is_a_400(start_node: StartNode, body: bytes) -> None:
    node = await start_node()
    conversation = await converse(node, post("/api/publish", ["transfer-encoding: chunked"]) + body)
    assert_refused(conversation, 400, "malformed request body")
    await assert_served(node)


async def test_a_malformed_chunked_command_is_a_400(start_node: StartNode) -> None:
    node = await start_node()
    async with open_sse(node, {"channel": "c"}) as sse:
        target = f"/connection/send?session={sse.session}&token={sse.token}"
        head = post(target, ["transfer-encoding: chunked"], key=False)
        conversation = await converse(node, head + b"nope\r\n")
    assert_refused(conversation, 400, "malformed request body")
    await assert_served(node)


async def test_a_malformed_chunked_body_nobody_reads_closes_after_the_answer(
    start_node: StartNode,
) -> None:
    node = await start_node()
    head = post("/healthz", ["transfer-encoding: chunked"], key=False)
    conversation = await converse(node, head + b"zz\r\n")
    [reply] = conversation.replies
    assert (reply.status, reply.headers["connection"]) == (404, "close")
    await assert_served(node)


# -- request heads ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (b"HELLO\r\n\r\n", "malformed request head: illegal request line"),
        (b"GET / HTTP/1.1\r\n\r\n", "Missing mandatory Host: header"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nno colon here\r\n\r\n", "illegal header line"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nname : value\r\n\r\n", "illegal header line"),
        (b"GET /\x00 HTTP/1.1\r\nhost: x\r\n\r\n", "illegal request line"),
        (b"GET / HTTP/1.1\r\nhost: x\r\nx-a: b\x00\r\n\r\n", "illegal header line"),
    ],
)
async def test_a_malformed_head_is_a_400(start_node: StartNode, head: bytes, message: str) -> None:
    node = await start_node()
    assert_refused(await converse(node, head), 400, message)
    await assert_served(node)


async def test_an_oversized_head_is_a_431(start_node: StartNode) -> None:
    node = await start_node()
    message = "request head larger than 16384 bytes"
    # Whole, in one write: measured once it is parsed.
    big = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 17_000 + b"\r\n\r\n"
    assert_refused(await converse(node, big), 431, message)
    # Endless: refused once 16 KiB arrived without the end of the head.
    endless = [b"GET /healthz HTTP/1.1\r\nhost: x\r\n"] + [
        b"x-%d: %s\r\n" % (i, b"a" * 1000) for i in range(40)
    ]
    assert_refused(await converse(node, *endless), 431, message)
    # Many small headers count the same.
    many = b"GET /healthz HTTP/1.1\r\nhost: x\r\n" + b"x: y\r\n" * 3000 + b"\r\n"
    assert_refused(await converse(node, many), 431, message)
    await assert_served(node)


async def test_a_head_just_under_the_limit_is_served(start_node: StartNode) -> None:
    node = await start_node()
    start_line = b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\nx-big: "
    filler = 16 * 1024 - len(start_line) - 4
    conversation = await converse(node, start_line + b"a" * filler + b"\r\n\r\n")
    assert [r.status for r in conversation.replies] == [200]
    conversation = await converse(node, start_line + b"a" * (filler + 1) + b"\r\n\r\n")
    assert_refused(conversation, 431, "request head larger than 16384 bytes")


async def test_max_head_bytes_is_configurable(start_node: StartNode) -> None:
    node = await start_node(max_head_bytes=2048)
    head = b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 3000 + b"\r\n\r\n"
    assert_refused(await converse(node, head), 431, "request head larger than 2048 bytes")
    await assert_served(node)


async def test_a_client_that_closes_inside_a_head_gets_no_answer(start_node: StartNode) -> None:
    node = await start_node()
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        await stream.send_eof()
        with trio.fail_after(5):
            assert await stream.receive_some(65536) == b""
    await assert_served(node)


# -- status lines --------------------------------------------------------------------------------


async def test_every_status_line_has_its_reason_phrase(start_node: StartNode) -> None:
    node = await start_node(cors_origins=("https://app.test",))
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


async def test_a_streamed_status_line_has_its_reason_phrase(start_node: StartNode) -> None:
    node = await start_node()
    async with await trio.open_tcp_stream("127.0.0.1", node.port or 0) as stream:
        await stream.send_all(b"GET /connection/sse?channel=c HTTP/1.1\r\nhost: x\r\n\r\n")
        with trio.fail_after(5):
            data = await stream.receive_some(65536)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


# -- metrics and configuration ----------------------------------------------------------------


async def test_refusals_are_counted_in_metrics(start_node: StartNode) -> None:
    node = await start_node(max_body_bytes=1000)
    await converse(node, b"HELLO\r\n\r\n")
    await converse(node, b"GET / HTTP/1.1\r\nhost: x\r\nx: " + b"a" * 20_000 + b"\r\n\r\n")
    await converse(node, post("/api/publish", ["content-length: 10"]))
    await converse(node, post("/api/publish", ["transfer-encoding: chunked"]) + b"zz\r\n")
    async with httpx.AsyncClient(base_url=base_url(node), timeout=5) as http:
        big = await http.post("/api/publish", content=b"x" * 2000, headers={"x-api-key": KEY})
        assert big.status_code == 413
        text = (await http.get("/metrics")).text
    counts = {
        line.split('"')[1]: float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("pyrt_http_refused_total{")
    }
    assert counts == {"400": 2.0, "408": 1.0, "413": 1.0, "431": 1.0, "501": 0.0}


def test_the_http_limits_are_server_settings() -> None:
    config = node_config(overrides={"request_timeout": 2, "max_head_bytes": 4096})
    assert (config.request_timeout, config.max_head_bytes) == (2.0, 4096)
    assert node_config().max_head_bytes == 16 * 1024
    for key, value in [
        ("max_head_bytes", 100),
        ("max_head_bytes", "16k"),
        ("request_timeout", 0),
        ("request_timeout", True),
        ("request_timeout", float("nan")),
    ]:
        with pytest.raises(ConfigError, match=rf"server\.{key}"):
            node_config(overrides={key: value})
