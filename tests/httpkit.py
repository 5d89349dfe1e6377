"""HTTP clients for pyrt's SSE and long-poll transports, for the tests (httpx, under trio).

`sse_kit_client` and `longpoll_kit_client` are the conformance kit's view of one connection
(`pyrt.testing.TransportClient`); `SseParser` reads an event stream the way the SSE spec
says (lines end at CR, LF or CRLF, and nowhere else). `scrape` reads `/metrics` with
prometheus-client's own parser.
"""

from __future__ import annotations

import itertools
import math
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import httpx
import orjson
import trio
from prometheus_client.parser import text_string_to_metric_families

from pyrt.node.node import Node
from pyrt.testing import Closed

_homes = itertools.count(1)


def base_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.port}"


@attrs.define
class SseEvent:
    data: str | None = None
    id: str | None = None
    retry: int | None = None
    comments: list[str] = attrs.field(factory=list)


class SseParser:
    """Turns event-stream bytes into events (html.spec.whatwg.org, "Server-sent events")."""

    def __init__(self) -> None:
        self._buffer = b""
        self._event = SseEvent()
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[SseEvent]:
        self._buffer += chunk
        events: list[SseEvent] = []
        while True:
            cut = min(
                (i for i in (self._buffer.find(b"\r"), self._buffer.find(b"\n")) if i >= 0),
                default=-1,
            )
            if cut < 0 or (self._buffer[cut : cut + 1] == b"\r" and cut + 1 == len(self._buffer)):
                return events  # no whole line yet (a CR at the end may be half a CRLF)
            line = self._buffer[:cut].decode()
            skip = 2 if self._buffer[cut : cut + 2] == b"\r\n" else 1
            self._buffer = self._buffer[cut + skip :]
            event = self._line(line)
            if event is not None:
                events.append(event)

    def _line(self, line: str) -> SseEvent | None:
        if not line:
            event, self._event = self._event, SseEvent()
            if self._data:
                event.data = "\n".join(self._data)
                self._data = []
            has_fields = event.data is not None or event.retry is not None or event.comments
            return event if has_fields else None
        if line.startswith(":"):
            self._event.comments.append(line[1:].strip())
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            self._data.append(value)
        elif name == "id":
            self._event.id = value
        elif name == "retry":
            self._event.retry = int(value)
        return None


async def post_command(
    http: httpx.AsyncClient, session: str, token: str, body: bytes
) -> httpx.Response:
    return await http.post(
        "/connection/send", params={"session": session, "token": token}, content=body
    )


class StreamedResponse:
    """A response read piece by piece over its own connection (h11).

    Not httpx: closing an httpx stream before its end leaves httpcore's async generators
    unfinished, which trio reports as a ResourceWarning (an error under this suite's
    `filterwarnings = error`); an event stream is closed before its end by design.
    """

    def __init__(self, stream: trio.SocketStream, http: h11.Connection, head: h11.Response):
        self.stream = stream
        self.http = http
        self.status = head.status_code
        self.headers = {k.decode().lower(): v.decode() for k, v in head.headers}

    async def chunk(self) -> bytes:
        """The next piece of the body; b"" at its end."""
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await self.stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                self.http.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data):
                return bytes(event.data)
            return b""  # EndOfMessage, or the connection closed

    async def body(self) -> bytes:
        parts = []
        while piece := await self.chunk():
            parts.append(piece)
        return b"".join(parts)


@asynccontextmanager
async def stream_get(
    node: Node, target: str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[StreamedResponse]:
    """GET `target`; yields once the response head arrived. Leaving closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        http = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET", target=target, headers=[("host", "pyrt.test"), *(headers or {}).items()]
        )
        await stream.send_all((http.send(request) or b"") + (http.send(h11.EndOfMessage()) or b""))
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                http.receive_data(bytes(await stream.receive_some(65536)))
                continue
            assert isinstance(event, h11.Response), event
            break
        yield StreamedResponse(stream, http, event)


def sse_target(params: Any = None) -> str:
    """The stream's URL path; `params` (a mapping or pairs) keep their order."""
    query = urllib.parse.urlencode(params or {})
    return f"/connection/sse?{query}" if query else "/connection/sse"


class SseKitClient:
    """One SSE stream plus `POST /connection/send`."""

    def __init__(self, http: httpx.AsyncClient, response: StreamedResponse) -> None:
        self.http = http
        self.response = response
        self._parser = SseParser()
        self._events: list[SseEvent] = []
        self.session = ""
        self.token = ""
        self.last_event_id: str | None = None
        self.retry: int | None = None
        self.comments: list[str] = []
        self.close_code: int | None = None
        self.ended = False

    async def event(self) -> SseEvent:
        """The next event; raises Closed once the stream ended."""
        while not self._events:
            chunk = await self.response.chunk()
            if not chunk:
                self.ended = True
                raise Closed(self.close_code)
            self._events.extend(self._parser.feed(chunk))
        event = self._events.pop(0)
        if event.id is not None:
            self.last_event_id = event.id
        if event.retry is not None:
            self.retry = event.retry
        self.comments.extend(event.comments)
        return event

    async def start(self) -> None:
        frame = await self.receive_any()
        assert frame["push"] == "session", frame
        self.session, self.token = frame["session"], frame["token"]

    async def receive_any(self) -> dict[str, Any]:
        """The next frame, transport pushes (`session`, `close`) included."""
        while True:
            event = await self.event()
            if event.data is not None:
                frame: dict[str, Any] = orjson.loads(event.data)
                return frame

    async def receive(self) -> dict[str, Any]:
        while True:
            frame = await self.receive_any()
            if frame.get("push") == "close":
                self.close_code = frame["code"]
                continue  # the end of the stream follows
            return frame

    async def send(self, command: Mapping[str, Any]) -> None:
        response = await post_command(self.http, self.session, self.token, orjson.dumps(command))
        assert response.status_code == 202, response.text

    async def send_raw(self, frame: bytes) -> None:
        # The server answers an error when the frame ended the session; the stream tells how.
        await post_command(self.http, self.session, self.token, frame)


@asynccontextmanager
async def open_sse(
    node: Node,
    params: Any = None,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[SseKitClient]:
    """An SSE stream whose `session` event was read."""
    async with (
        httpx.AsyncClient(base_url=base_url(node), timeout=None) as http,
        stream_get(node, sse_target(params), headers) as response,
    ):
        assert response.status == 200, (await response.body()).decode()
        client = SseKitClient(http, response)
        await client.start()
        yield client


@asynccontextmanager
async def sse_kit_client(node: Node) -> AsyncIterator[SseKitClient]:
    """The kit's client: a stream opened on a channel of its own (`joins_on_open=1`)."""
    async with open_sse(node, {"channel": f"kit:home:{next(_homes)}"}) as client:
        yield client


class LongPollKitClient:
    """One long-poll session, always with a poll outstanding (as a real client is)."""

    def __init__(self, http: httpx.AsyncClient, opened: dict[str, Any]) -> None:
        self.http = http
        self.session: str = opened["session"]
        self.token: str = opened["token"]
        self.cursor: str = opened["cursor"]
        self._in, self._out = trio.open_memory_channel[dict[str, Any] | Closed](math.inf)
        self.closed: Closed | None = None
        """Set once `receive` reported the end."""
        self.ended = False
        """Set once the server ended the session (or a poll failed)."""
        self._take(opened)

    def _take(self, batch: dict[str, Any]) -> None:
        for message in batch["messages"]:
            self._in.send_nowait(message)
        self.cursor = batch["cursor"]
        if "close" in batch:
            self._end(Closed(batch["close"]["code"]))

    def _end(self, closed: Closed) -> None:
        self.ended = True
        self._in.send_nowait(closed)

    async def poll_forever(self) -> None:
        while True:
            try:
                response = await self.http.get("/connection/poll", params=self.params())
            except httpx.TransportError:
                self._end(Closed(None))
                return
            if response.status_code != 200:
                self._end(Closed(None))
                return
            batch = response.json()
            self._take(batch)
            if "close" in batch:
                return

    def params(self, cursor: str | None = None) -> dict[str, str]:
        return {"session": self.session, "token": self.token, "cursor": cursor or self.cursor}

    async def receive(self) -> dict[str, Any]:
        if self.closed is not None:
            raise self.closed
        item = await self._out.receive()
        if isinstance(item, Closed):
            self.closed = item
            raise item
        return item

    async def send(self, command: Mapping[str, Any]) -> None:
        response = await post_command(self.http, self.session, self.token, orjson.dumps(command))
        assert response.status_code == 202, response.text

    async def send_raw(self, frame: bytes) -> None:
        await post_command(self.http, self.session, self.token, frame)

    async def end(self) -> None:
        response = await self.http.post(
            "/connection/poll/end", params={"session": self.session, "token": self.token}
        )
        assert response.status_code == 200, response.text


@asynccontextmanager
async def longpoll_kit_client(node: Node) -> AsyncIterator[LongPollKitClient]:
    """The kit's client: opened on a channel of its own (`joins_on_open=1`); ends its session
    when done, as a well-behaved client does."""
    async with httpx.AsyncClient(base_url=base_url(node), timeout=None) as http:
        response = await http.get(
            "/connection/poll", params={"channel": f"kit:home:{next(_homes)}"}
        )
        assert response.status_code == 200, response.text
        client = LongPollKitClient(http, response.json())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.poll_forever)
            yield client
            nursery.cancel_scope.cancel()
        if not client.ended:
            await client.end()


# -- /metrics -------------------------------------------------------------------------------------

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of `/metrics`, by (name, sorted labels)."""


async def scrape(client: httpx.AsyncClient) -> Samples:
    """Every sample of `/metrics` by (name, sorted labels); checks the response on the way."""
    response = await client.get("/metrics")  # no API key: metrics need none
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        assert family.name.startswith("pyrt_")
        assert family.documentation
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]
