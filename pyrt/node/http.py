"""HTTP on the front door: one request as transports and routes see it.

h11 parses and frames; this module adds what every HTTP endpoint of pyrt needs: requests bounded
in size and in time, refusals of heads h11 lets through but a proxy may read otherwise, JSON
responses and errors in one shape, CORS, and streamed responses (SSE). One `HttpExchange`
serves one request; the front door reuses the TCP connection when the exchange ended cleanly.
"""

from __future__ import annotations

import contextlib
import math
import urllib.parse
from collections.abc import Iterable, Sequence
from http import HTTPStatus
from typing import Any

import attrs
import h11
import orjson
import trio

from .. import _json
from ..hub.protocol import _mapping
from .io import send_all

__all__ = ["HttpError", "HttpExchange", "HttpRequest"]

MAX_HEAD_BYTES = 16 * 1024
"""The default limit of a request head (request line and headers): `NodeConfig.max_head_bytes`."""

_DRAIN_BYTES = 64 * 1024
"""A body the route did not read is read and dropped up to this size (to keep the connection);
a longer one is left unread and the connection closed after the response."""


@attrs.frozen(slots=True)
class HttpRequest:
    """A parsed HTTP request head, as transports see it."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        return urllib.parse.unquote(self.target.split("?", 1)[0])

    @property
    def query(self) -> dict[str, list[str]]:
        """Query parameters, each with every value it was given, in order."""
        _, _, query = self.target.partition("?")
        return urllib.parse.parse_qs(query, keep_blank_values=True)

    def param(self, name: str) -> str | None:
        """The last value of query parameter `name`, if any."""
        values = self.query.get(name)
        return values[-1] if values else None

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k == name), None)

    @property
    def is_websocket_upgrade(self) -> bool:
        upgrade = self.header("upgrade") or ""
        return self.method == "GET" and upgrade.lower() == "websocket"


class HttpError(Exception):
    """An HTTP error with pyrt's JSON body `{"error": {"code", "message"}}` (docs/http.md)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: int | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.headers = tuple(headers)
        """Extra response headers (a 401's `www-authenticate`)."""
        self.code = status if code is None else code
        self.message = message
        self.head_request = False
        """The refused request was a HEAD: its answer has headers only (`refuse`)."""

    def body(self) -> bytes:
        return orjson.dumps({"error": {"code": self.code, "message": self.message}})


@attrs.frozen(slots=True)
class CorsPolicy:
    """Which browser origins may read pyrt's HTTP responses (SSE, long-poll, the REST API)."""

    origins: tuple[str, ...] = ()
    """Allowed `Origin` values; `*` allows any. Empty: no CORS headers (same origin only)."""

    def allow(self, origin: str | None) -> str | None:
        """The `access-control-allow-origin` value for a request from `origin`, if allowed."""
        if origin is None or not self.origins:
            return None
        if "*" in self.origins or origin in self.origins:
            return origin
        return None


_DETACHED = h11.Connection(h11.SERVER)
"""Stands in for the HTTP state of exchanges that were `detach`ed (never used by them)."""


class HttpExchange:
    """One request and its response on a front-door connection."""

    def __init__(
        self,
        http: h11.Connection,
        stream: trio.abc.Stream,
        request: HttpRequest,
        cors: CorsPolicy | None = None,
        deadline: float = math.inf,
        write_timeout: float = math.inf,
    ) -> None:
        self.http = http
        self.write_timeout = write_timeout
        """Writes making no progress for this long fail with `pyrt.node.io.WriteTimeout`."""
        self.stream = stream
        self.request = request
        self.deadline = deadline
        """When the whole request (its body too) must have arrived, in trio time."""
        self.refused: int | None = None
        """The status of the error `body` raised: 400 (malformed), 408 (late) or 413 (too
        long); the connection is closed after the response."""
        self._cors = cors or CorsPolicy()
        self._body_read = False
        self._must_close = False
        self._detached = False
        self.served_by = "http"
        """The transport or route serving it (for logs and metrics)."""

    @property
    def detached(self) -> bool:
        """`detach` was called: the connection is no longer HTTP."""
        return self._detached

    def detach(self) -> bytes:
        """For protocol upgrades, once the switch is answered: returns what the client sent
        after the request head and lets go of the HTTP state and the request's headers
        (`request` keeps its method and target). The connection is then not reusable."""
        trailing = self.trailing
        self._detached = True
        self.http = _DETACHED
        self.request = attrs.evolve(self.request, headers=())
        return trailing

    @property
    def trailing(self) -> bytes:
        """What the client sent after the request head (for protocol upgrades)."""
        data, _closed = self.http.trailing_data
        return bytes(data)

    @property
    def reusable(self) -> bool:
        """Whether the connection can carry another request after this one."""
        return (
            not self._must_close
            and not self._detached
            and self.http.our_state is h11.DONE
            and self.http.their_state is h11.DONE
        )

    async def body(self, limit: int) -> bytes:
        """The request body. HttpError 413 when longer than `limit` (the rest is not read), 408
        when it has not all arrived by `deadline`, 400 when its chunked encoding is malformed or
        it ends early; after any of these the connection is closed once the error is answered.

        Call once; responding without calling it reads and drops the body.
        """
        try:
            return await self._read_body(limit)
        except HttpError as e:
            self.refused = e.status
            raise

    async def _read_body(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        self._body_read = True
        while True:
            try:
                event = self.http.next_event()
            except h11.RemoteProtocolError as e:
                raise self._fatal(400, f"malformed request body: {_describe(e)}") from None
            if event is h11.NEED_DATA:
                data: bytes | bytearray | None = None
                # The deadline bounds waiting for the client, not reading what has come.
                with trio.move_on_at(self.deadline):
                    data = await self.stream.receive_some(64 * 1024)
                if data is None:
                    raise self._fatal(408, "the request body did not arrive in time")
                if not data:
                    raise self._fatal(400, "the request body ended early")
                self.http.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise self._fatal(413, f"request body larger than {limit} bytes")
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts)
            raise self._fatal(400, "malformed request body")

    def _fatal(self, status: int, message: str) -> HttpError:
        """An error after which the request's framing is lost: the connection must close."""
        self._must_close = True
        return HttpError(status, message)

    async def json_body(self, limit: int) -> Any:
        """The body parsed as JSON; HttpError 400 when it is not."""
        raw = await self.body(limit)
        try:
            return _json.loads(raw)
        except _json.JsonError as e:
            raise HttpError(400, f"body is {e.message}") from None

    async def _send_all(self, data: bytes) -> None:
        await send_all(self.stream, data, self.write_timeout)

    def _headers(
        self, content_type: str | None, extra: Iterable[tuple[str, str]]
    ) -> list[tuple[str, str]]:
        headers = [("content-type", content_type)] if content_type else []
        headers.extend(extra)
        allowed = self._cors.allow(self.request.header("origin"))
        if allowed is not None:
            headers += [("access-control-allow-origin", allowed), ("vary", "origin")]
        return headers

    async def _drain(self) -> None:
        if not self._body_read:
            # A body too long, late or malformed only closes the connection after the
            # route's response (`_read_body` marked it so).
            with contextlib.suppress(HttpError):
                await self._read_body(_DRAIN_BYTES)

    async def respond(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = "application/json",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        """A complete response."""
        await self._drain()
        all_headers = self._headers(content_type, headers)
        all_headers.append(("content-length", str(len(body))))
        if self._must_close:
            all_headers.append(("connection", "close"))
        data = self.http.send(_response(status, all_headers)) or b""
        if body and self.request.method != "HEAD":  # HEAD: the headers of a GET, no body
            data += self.http.send(h11.Data(data=body)) or b""
        data += self.http.send(h11.EndOfMessage()) or b""
        await self._send_all(data)

    async def respond_json(
        self, status: int, value: Any, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        await self.respond(status, orjson.dumps(value, default=_mapping), headers=headers)

    async def respond_error(self, error: HttpError) -> None:
        await self.respond(error.status, error.body(), headers=error.headers)

    async def start_stream(
        self, status: int, content_type: str, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """Starts a response whose body follows in `send` calls (chunked)."""
        await self._drain()
        all_headers = self._headers(content_type, headers)
        if self._must_close:
            all_headers.append(("connection", "close"))
        data = self.http.send(_response(status, all_headers)) or b""
        await self._send_all(data)

    async def send(self, chunk: bytes) -> None:
        """A piece of a streamed body."""
        if chunk:
            await self._send_all(self.http.send(h11.Data(data=chunk)) or b"")

    async def end_stream(self) -> None:
        await self._send_all(self.http.send(h11.EndOfMessage()) or b"")

    async def preflight(self, methods: str, allow_headers: str) -> bool:
        """Answers a CORS preflight (OPTIONS) if its origin is allowed; False if it is not."""
        allowed = self._cors.allow(self.request.header("origin"))
        if allowed is None:
            return False
        await self.respond(
            204,
            content_type=None,
            headers=[
                ("access-control-allow-methods", methods),
                ("access-control-allow-headers", allow_headers),
                ("access-control-max-age", "600"),
            ],
        )
        return True


def _response(status: int, headers: list[tuple[str, str]]) -> h11.Response:
    try:
        reason = HTTPStatus(status).phrase.encode()
    except ValueError:
        reason = b""
    return h11.Response(status_code=status, headers=headers, reason=reason)


def _describe(error: h11.RemoteProtocolError) -> str:
    # h11's messages quote what it could not parse: keep an echo of the client's bytes short.
    text = str(error)
    return text if len(text) <= 120 else text[:120] + "..."


async def next_request(
    http: h11.Connection, stream: trio.abc.Stream, max_head_bytes: int = MAX_HEAD_BYTES
) -> HttpRequest | None:
    """Reads the next request head; None when the client closed the connection (between
    requests, or inside a head: there is nobody to answer).

    HttpError for a head that cannot be served: 431 when longer than `max_head_bytes`
    (`http` must have been made with that `max_incomplete_event_size`), 501 for a transfer
    coding other than chunked, 400 when malformed or framed ambiguously (content-length with
    transfer-encoding, a bad content-length). Answer it with `refuse`, then close.
    """
    buffered = _buffered(http)
    received = 0
    ended = False
    while True:
        try:
            event = http.next_event()
        except h11.RemoteProtocolError as e:
            if ended:
                return None
            if e.error_status_hint == 431:
                raise HttpError(431, f"request head larger than {max_head_bytes} bytes") from None
            if e.error_status_hint == 501:
                raise HttpError(501, f"not implemented: {_describe(e)}") from None
            raise HttpError(400, f"malformed request head: {_describe(e)}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(16 * 1024)
            received += len(data)
            ended = not data
            http.receive_data(bytes(data))
            continue
        if isinstance(event, h11.Request):
            try:
                # h11 refuses a head once more than `max_head_bytes` of it is buffered without
                # its end; one that arrived whole in a single read is measured here.
                if buffered + received - _buffered(http) > max_head_bytes:
                    raise HttpError(431, f"request head larger than {max_head_bytes} bytes")
                _check_framing(event)
            except HttpError as e:
                e.head_request = event.method == b"HEAD"  # its answer has no body
                raise
            headers = tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers)
            return HttpRequest(event.method.decode(), event.target.decode("latin-1"), headers)
        return None


def _buffered(http: h11.Connection) -> int:
    return len(http.trailing_data[0])


def _check_framing(request: h11.Request) -> None:
    """What h11 lets through but a proxy in front may read otherwise (request smuggling):
    h11 itself refuses bad and conflicting content-lengths and unknown transfer codings."""
    names = {name for name, _ in request.headers}
    if b"transfer-encoding" in names:
        if b"content-length" in names:
            raise HttpError(
                400, "a request must not have both content-length and transfer-encoding"
            )
        if request.http_version == b"1.0":
            raise HttpError(400, "transfer-encoding is not allowed in an HTTP/1.0 request")


async def refuse(
    http: h11.Connection, stream: trio.abc.Stream, error: HttpError, write_timeout: float
) -> None:
    """Answers a request head that `next_request` refused; close the connection after it."""
    body = error.body()
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    data = http.send(_response(error.status, headers)) or b""
    if not error.head_request:
        data += http.send(h11.Data(data=body)) or b""
    data += http.send(h11.EndOfMessage()) or b""
    await send_all(stream, data, write_timeout)


def bearer_token(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header value, or None."""
    if value is not None and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None
