"""The HTTP links, on httpx: SSE (frames on an event stream) and long-poll (frames in poll
responses). Both send commands the same way, one POST each, so they share `HttpLink`."""

from __future__ import annotations

import collections
import contextlib
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import trio

from ._link import Endpoints, Link, LinkClosed, Outcome, decode


@asynccontextmanager
async def open_http_link(
    transport: str,
    endpoints: Endpoints,
    *,
    open_timeout: float,
    stall_timeout: float,
    token: str | None = None,
) -> AsyncGenerator[SseLink | PollLink, None]:
    """Opens an SSE (`transport` "sse") or long-poll ("longpoll") session; an error of
    httpx's, opening, during or closing, is raised as `LinkClosed`. A `token` goes in the
    opening request's `Authorization: Bearer` header (not the URL, where it is logged);
    later requests carry the session's own token."""
    # HTTP sessions open with at least one channel. The client's channels are all joined
    # the same way on every transport, with `join` and `since` (the server's cursor only
    # knows what it sent, the client knows what it delivered), so the session opens with
    # a channel of its own that nobody publishes to, left at once.
    opening = f"_pyrt:open:{secrets.token_hex(8)}"
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    try:
        async with contextlib.AsyncExitStack() as stack:
            link: SseLink | PollLink
            with trio.fail_after(open_timeout):
                http = await stack.enter_async_context(
                    httpx.AsyncClient(timeout=httpx.Timeout(open_timeout, read=None))
                )
                if transport == "sse":
                    response = await stack.enter_async_context(
                        http.stream(
                            "GET", endpoints.sse, params={"channel": opening}, headers=headers
                        )
                    )
                    content_type = response.headers.get("content-type", "")
                    if response.status_code != 200 or not content_type.startswith(
                        "text/event-stream"
                    ):
                        body = (await response.aread())[:200]
                        raise _refused("no event stream", response.status_code, body)
                    lines = cast("AsyncGenerator[str, None]", response.aiter_lines())
                    lines = await stack.enter_async_context(contextlib.aclosing(lines))
                    link = SseLink(http, endpoints, stall_timeout, lines)
                    await link.open()
                else:
                    link = PollLink(http, endpoints, stall_timeout)
                    await link.open([("channel", opening)], headers)
            link.opening_channel = opening
            try:
                yield link
            finally:
                link.close()
                if isinstance(link, PollLink) and link.ended_as is not Outcome.STALLED:
                    await link.end()
    except httpx.HTTPError as e:
        raise LinkClosed(f"{transport}: {e!r}") from None


def _refused(what: str, status: int, body: bytes) -> LinkClosed:
    """The opening request was answered `status`: a 401 is the server refusing the token."""
    return LinkClosed(f"{what}: {status} {body.decode(errors='replace')}", status)


class HttpLink(Link):
    """A session over plain HTTP: commands are POSTed, frames come back on a stream or polls."""

    def __init__(self, http: httpx.AsyncClient, endpoints: Endpoints, stall_timeout: float):
        super().__init__(stall_timeout)
        self.http = http
        self.endpoints = endpoints
        self.session = ""
        self.token = ""
        self._posting = trio.Lock()

    async def _send(self, frame: bytes) -> None:
        # One POST at a time: concurrent requests could reach the hub in any order, and the
        # protocol's ordering (join before publish, track after join) is per connection.
        async with self._posting:
            try:
                request = self.http.build_request(
                    "POST",
                    self.endpoints.send,
                    params={"session": self.session, "token": self.token},
                    content=frame,
                    headers={"content-type": "application/json"},
                    timeout=self.stall_timeout,
                )
                request.stream = Body(frame)
                response = await self.http.send(request)
            except httpx.TimeoutException:
                self.break_(Outcome.STALLED)
                raise LinkClosed("sending a command timed out") from None
            except httpx.HTTPError as e:
                raise LinkClosed(f"sending a command failed: {e!r}") from None
        if response.status_code != 202:
            # 404: the session expired; 401: bad token; 400: the frame closed the session.
            raise LinkClosed(f"command refused: {response.status_code} {response.text[:200]}")


class Body(httpx.AsyncByteStream):
    """A request body that is not an async generator: httpx's own, for `content=bytes`, is
    one, and a POST cancelled mid-send leaves it unfinalized (a ResourceWarning at GC)."""

    def __init__(self, data: bytes) -> None:
        self._chunks = [data]

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop()


class SseLink(HttpLink):
    transport = "sse"

    def __init__(
        self,
        http: httpx.AsyncClient,
        endpoints: Endpoints,
        stall_timeout: float,
        lines: AsyncIterator[str],
    ) -> None:
        super().__init__(http, endpoints, stall_timeout)
        self.lines = lines

    async def open(self) -> None:
        first = await self.receive()
        if first.get("push") != "session":
            raise LinkClosed(f"expected the session event first, got {str(first)[:200]}")
        self.session, self.token = first["session"], first["token"]

    async def receive(self) -> Any:
        data: list[str] = []
        while True:
            try:
                line = await anext(self.lines)
            except StopAsyncIteration:
                raise LinkClosed("the event stream ended") from None
            except httpx.HTTPError as e:
                raise LinkClosed(f"the event stream broke: {e!r}") from None
            self.alive()  # heartbeat comments count
            if not line:
                if not data:
                    continue
                frame = decode("\n".join(data))
                if frame.get("push") == "close":
                    code = frame.get("code")
                    self.closed_by = LinkClosed(
                        f"closed by the server: {code} {frame.get('reason')}",
                        code if isinstance(code, int) else None,
                    )
                    await self._drain()
                    raise self.closed_by
                return frame
            if line.startswith(":"):
                continue  # a comment: the server's heartbeat
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
            # `id` (the server's cursor) and `retry` are for browsers: this client resumes
            # every channel with `since` from what it delivered, on any transport.

    async def _drain(self) -> None:
        """Reads the stream to its end (the server ends it right after a close event), so
        httpx's nested async generators finish instead of being garbage collected open."""
        with trio.move_on_after(1.0), contextlib.suppress(httpx.HTTPError):
            async for _line in self.lines:
                pass


class PollLink(HttpLink):
    transport = "longpoll"

    def __init__(self, http: httpx.AsyncClient, endpoints: Endpoints, stall_timeout: float):
        super().__init__(http, endpoints, stall_timeout)
        self.cursor = ""
        self.queue: collections.deque[Any] = collections.deque()

    async def open(self, params: Sequence[tuple[str, str]], headers: Mapping[str, str]) -> None:
        try:
            response = await self.http.get(
                self.endpoints.poll, params=list(params), headers=headers
            )
        except httpx.HTTPError as e:
            raise LinkClosed(f"opening a long-poll session failed: {e!r}") from None
        if response.status_code == 401:
            raise _refused("long-poll refused", 401, response.content[:200])
        body = self._batch(response)
        self.session, self.token = body["session"], body["token"]

    def _batch(self, response: httpx.Response) -> Any:
        if response.status_code != 200:
            # 404: the session expired; 409: out of step with the server's batches.
            raise LinkClosed(f"poll refused: {response.status_code} {response.text[:200]}")
        body = decode(response.content)
        messages = body.get("messages")
        if not isinstance(messages, list) or not isinstance(body.get("cursor"), str):
            raise LinkClosed(f"not a poll response: {response.text[:200]}")
        self.queue.extend(messages)
        # Sent with the next poll, which happens only once every frame of this batch was
        # handed to the reader and handled: the cursor acknowledges what was delivered.
        self.cursor = body["cursor"]
        close = body.get("close")
        if close is not None:
            code = close.get("code") if isinstance(close, dict) else None
            self.closed_by = LinkClosed(
                f"closed by the server: {close}", code if isinstance(code, int) else None
            )
        return body

    async def end(self) -> None:
        """Ends the session on the server now (its presence leaves at once rather than when
        the server expires it). Best effort: the server expires it anyway."""
        with (
            trio.CancelScope(deadline=trio.current_time() + 0.5, shield=True),
            contextlib.suppress(httpx.HTTPError),
        ):
            await self.http.post(
                f"{self.endpoints.poll}/end",
                params={"session": self.session, "token": self.token},
            )

    async def receive(self) -> Any:
        while not self.queue:
            if self.closed_by is not None:
                raise self.closed_by
            await self._poll()
        return self.queue.popleft()

    async def _poll(self) -> None:
        params = {"session": self.session, "token": self.token, "cursor": self.cursor}
        for attempt in range(3):
            try:
                # No read timeout: the server holds a poll up to ~25 s, and the reader's
                # stall watch bounds the wait.
                response = await self.http.get(
                    self.endpoints.poll, params=params, timeout=httpx.Timeout(10.0, read=None)
                )
            except httpx.TransportError as e:
                if attempt == 2:
                    raise LinkClosed(f"polling failed: {e!r}") from None
                # A lost response: the same cursor gets the same batch again.
                await trio.sleep(0.05 * (attempt + 1))
                continue
            self.alive()
            self._batch(response)
            return
