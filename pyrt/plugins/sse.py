"""The SSE transport: pyrt's native protocol as Server-Sent Events at `/connection/sse`.

One GET opens a session, joins the channels of its query string and streams every frame the
hub has for it as one `data:` event (docs/protocol.md, "Over HTTP: SSE and long-poll").
Commands go the other way through `POST /connection/send`. Events after which the client's
positions moved carry an `id:` holding all of them as one cursor, so a browser's EventSource,
which resumes with the last id it saw (`Last-Event-ID`), resumes every channel.
"""

from __future__ import annotations

import orjson
import trio

from ..plugin import (
    HttpError,
    HttpExchange,
    HttpRequest,
    Session,
    TransportContext,
    check_integer,
    check_seconds,
)
from .cursor import PositionTracker, StreamOpening

_HEADERS = (("cache-control", "no-store"), ("x-accel-buffering", "no"))


class SseTransport:
    """Serves `GET /connection/sse?channel=...` as an event stream.

    `heartbeat`: seconds of silence after which a `: ping` comment is written (it keeps
    proxies from timing the stream out and finds clients that went away).
    `retry_ms`: the reconnection delay the stream tells EventSource to use.
    """

    name = "sse"
    path = "/connection/sse"

    def __init__(self, *, heartbeat: float = 15.0, retry_ms: int = 2000) -> None:
        self.heartbeat = check_seconds("heartbeat", heartbeat)
        self.retry_ms = check_integer("retry_ms", retry_ms, 0, unit=" (milliseconds)")

    def claims(self, request: HttpRequest) -> bool:
        return request.path == self.path

    async def serve(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        request = exchange.request
        if request.method != "GET":
            raise HttpError(405, "use GET")
        # EventSource resends the last id it saw: it is newer than the URL's cursor.
        cursor = request.header("last-event-id") or request.param("cursor")
        opening = StreamOpening.parse(
            request, max_channels=ctx.config.hub.max_channels_per_connection, cursor=cursor
        )
        identity = await ctx.authenticate(request)  # 401 before the stream starts
        # No idle timeout and no pings: the heartbeat is ours, and a client that went away is
        # noticed by the hangup watcher or a failed write.
        session = ctx.open_session(idle_timeout=None, pings=False, identity=identity)
        try:
            tracker = await opening.join(session)
            await exchange.start_stream(200, "text/event-stream; charset=utf-8", _HEADERS)
            hello = orjson.dumps({"push": "session", "session": session.id, "token": session.token})
            await exchange.send(b"retry: %d\n\ndata: %s\n\n" % (self.retry_ms, hello))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_for_hangup, exchange, nursery.cancel_scope)
                await self._write(session, tracker, exchange)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-write (maybe inside the nursery: hence except*)
        finally:
            session.end()

    async def _write(self, session: Session, tracker: PositionTracker, out: HttpExchange) -> None:
        while True:
            frames: list[bytes] | None = None
            with trio.move_on_after(self.heartbeat):
                frames = await session.outgoing()
            if frames is None:
                await out.send(b": ping\n\n")
                continue
            if not frames:
                break
            await out.send(b"".join(_event(frame, tracker) for frame in frames))
        closing = session.close_request
        if closing is not None:
            code, reason = closing
            close = orjson.dumps({"push": "close", "code": int(code), "reason": reason})
            await out.send(b"data: %s\n\n" % close)
        await out.end_stream()


def _event(frame: bytes, tracker: PositionTracker) -> bytes:
    # Frames are compact JSON, which escapes CR and LF inside strings, so one frame is always
    # one `data:` line (SSE splits lines at CR and LF only).
    if tracker.observe(frame):
        return b"id: %s\ndata: %s\n\n" % (tracker.cursor().encode().encode(), frame)
    return b"data: %s\n\n" % frame


async def _watch_for_hangup(exchange: HttpExchange, stream_done: trio.CancelScope) -> None:
    """Ends the stream when the client closes its side, so its session ends (and its presence
    leaves) at once instead of at the next failed write."""
    try:
        data = await exchange.stream.receive_some(16 * 1024)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        data = b""
    if data:
        # A pipelined request: h11 keeps it for after this response. Stop watching rather
        # than buffer more; a gone client is still found by the heartbeat's write.
        exchange.http.receive_data(bytes(data))
        return
    stream_done.cancel()
