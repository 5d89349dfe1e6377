"""The long-poll transport: pyrt's native protocol in batches at `/connection/poll`.

`GET /connection/poll?channel=...` opens a session and answers at once; then each
`GET /connection/poll?session=ID&token=T&cursor=C` waits for frames and answers them as one
batch (docs/protocol.md, "Over HTTP: SSE and long-poll"). Commands go the other way through
`POST /connection/send`; `POST /connection/poll/end?session=ID&token=T` ends a session at once.

The cursor a batch carries acknowledges it: the next poll sends it back. A poll that sends
the previous batch's cursor lost its response and gets that batch again, byte for byte; so
a client loses nothing to a dropped response, and the server keeps one batch per session.

Sessions outlive the requests that serve them, so the transport owns them: `run`, which the
node starts in its nursery, holds a nursery with one keeper task per session. The keeper
follows the hub's nudges for its session and, when the hub asks to close it (the client
stopped polling, shutdown, a slow consumer), gives a poll a moment to carry the close to the
client, then ends the session (presence leaves, the hub forgets it). Cancelling the node
cancels the keepers, and each ends its session on the way out: no session outlives its node.
"""

from __future__ import annotations

from typing import Any

import attrs
import orjson
import trio

from ..plugin import (
    CloseCode,
    HttpError,
    HttpExchange,
    HttpRequest,
    Session,
    TransportContext,
    bearer_token,
    check_integer,
    check_seconds,
)
from .cursor import PositionTracker, StreamOpening, decode_cursor

CLOSE_GRACE = 2.0
"""Seconds a session the hub closed waits for a poll to collect its last frames and close;
counted from the last poll, so a client draining several batches is not cut short."""


@attrs.define(eq=False)
class _PollSession:
    """One long-poll session: what its polls and its keeper share."""

    session: Session
    tracker: PositionTracker
    seq: int = 0
    """Number of the last batch handed out (the opening response is batch 0)."""
    last_batch: bytes = b""
    """Batch `seq`'s response body, sent again to a poll that lost it."""
    generation: int = 0
    """Counts polls; a waiting poll answers at once when a newer one came."""
    close: tuple[CloseCode, str] | None = None
    finished: bool = False
    keeper: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    _changed: trio.Event = attrs.field(factory=trio.Event)

    def notify(self) -> None:
        """Wakes every task waiting for a change (frames, a close, a newer poll, the end)."""
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        await self._changed.wait()

    def ready(self) -> bool:
        """Whether a poll has something to answer with: frames, or the close."""
        session = self.session
        return bool(session.queued) or session.close_request is not None or self.finished


class LongPollTransport:
    """Serves `/connection/poll`.

    `poll_timeout`: seconds a poll waits for frames before answering with none.
    `session_ttl`: seconds a session lives without a poll (closed with 4009 after that);
    must exceed `poll_timeout`.
    `max_batch_messages`, `max_batch_bytes`: bounds of one response (a frame larger than
    `max_batch_bytes` still goes, alone).
    """

    name = "longpoll"
    path = "/connection/poll"
    end_path = "/connection/poll/end"

    def __init__(
        self,
        *,
        poll_timeout: float = 25.0,
        session_ttl: float = 60.0,
        max_batch_messages: int = 512,
        max_batch_bytes: int = 1024 * 1024,
    ) -> None:
        self.poll_timeout = check_seconds("poll_timeout", poll_timeout)
        self.session_ttl = check_seconds("session_ttl", session_ttl)
        if session_ttl <= poll_timeout:
            raise ValueError(
                f"session_ttl ({session_ttl}) must exceed poll_timeout ({poll_timeout}): "
                "a session must outlive the wait between two polls"
            )
        self.max_batch_messages = check_integer("max_batch_messages", max_batch_messages, 1)
        self.max_batch_bytes = check_integer("max_batch_bytes", max_batch_bytes, 1)
        self._sessions: dict[str, _PollSession] = {}
        self._nursery: trio.Nursery | None = None

    def claims(self, request: HttpRequest) -> bool:
        return request.path in (self.path, self.end_path)

    # -- owning the sessions ---------------------------------------------------------------

    async def run(
        self,
        ctx: TransportContext,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Owns the sessions' keepers until the node cancels it."""
        if self._nursery is not None:
            raise RuntimeError("a LongPollTransport serves one node at a time")
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    async def _keep(self, poll: _PollSession) -> None:
        session = poll.session
        try:
            with poll.keeper:
                while session.close_request is None:
                    await session.wait_changed()
                    poll.notify()
                code, _ = session.close_request
                if code is CloseCode.IDLE_TIMEOUT:
                    return  # nobody is polling: end it now, so its presence leaves now
                while True:
                    with trio.move_on_after(CLOSE_GRACE) as grace:
                        await poll.changed()
                    if grace.cancelled_caught:
                        return
        finally:
            self._finish(poll)

    def _finish(self, poll: _PollSession) -> None:
        if poll.finished:
            return
        if poll.close is None:
            poll.close = poll.session.close_request
        poll.finished = True
        self._sessions.pop(poll.session.id, None)
        poll.session.end()
        poll.keeper.cancel()
        poll.notify()

    # -- requests --------------------------------------------------------------------------

    async def serve(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        request = exchange.request
        if request.path == self.end_path:
            if request.method != "POST":
                raise HttpError(405, "use POST")
            poll = self._lookup(ctx, request)
            self._finish(poll)
            await exchange.respond_json(200, {})
            return
        if request.method != "GET":
            raise HttpError(405, "use GET")
        if request.param("session") is None:
            await self._open(ctx, exchange)
        else:
            await self._poll(ctx, exchange)

    def _lookup(self, ctx: TransportContext, request: HttpRequest) -> _PollSession:
        session_id = request.param("session")
        token = request.param("token") or bearer_token(request.header("authorization"))
        if session_id is None or token is None:
            raise HttpError(400, "'session' and 'token' query parameters are required")
        session = ctx.session(session_id, token)  # 404 for unknown or gone, 401 for a bad token
        poll = self._sessions.get(session.id)
        if poll is None:
            raise HttpError(404, f"session '{session_id[:64]}' is not a long-poll session")
        return poll

    async def _open(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        if self._nursery is None:
            raise HttpError(503, "the long-poll transport is not running (see Transport.run)")
        request = exchange.request
        opening = StreamOpening.parse(
            request,
            max_channels=ctx.config.hub.max_channels_per_connection,
            cursor=request.param("cursor"),
        )
        identity = await ctx.authenticate(request)  # 401 before the session opens
        session = ctx.open_session(idle_timeout=self.session_ttl, pings=False, identity=identity)
        poll = _PollSession(session, await opening.join(session))
        self._sessions[session.id] = poll
        self._nursery.start_soon(self._keep, poll)
        # The joins' replies are queued already: batch 0 carries them.
        body = self._next_batch(poll, {"session": session.id, "token": session.token})
        await exchange.respond(200, body)

    async def _poll(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        request = exchange.request
        poll = self._lookup(ctx, request)
        token = request.param("cursor")
        if token is None:
            raise HttpError(400, "'cursor' is required: send the cursor of the last response")
        try:
            seq = decode_cursor(token).seq
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        if seq is None:
            raise HttpError(400, "cursor has no batch number: send the cursor of the last poll")
        poll.session.touch()
        poll.generation += 1
        mine = poll.generation
        poll.notify()  # answers an older poll still waiting
        if seq == poll.seq - 1:
            body = poll.last_batch  # its response was lost: the same batch again
        elif seq != poll.seq:
            raise HttpError(409, "cursor out of step: open a new session with your cursor")
        else:
            body = await self._wait(poll, mine, token)
        poll.session.touch()
        await exchange.respond(200, body)

    async def _wait(self, poll: _PollSession, mine: int, token: str) -> bytes:
        """The next batch, or an empty answer on timeout or when a newer poll came."""
        with trio.move_on_after(self.poll_timeout):
            while True:
                # Superseded first: only the newest poll may take a batch, or the batch would
                # go to a request its client gave up on while the newer one waits for the next.
                if poll.generation != mine:
                    return _batch_body([], token)  # keeps the cursor it came with
                if poll.ready():
                    return self._next_batch(poll)
                await poll.changed()
        return _batch_body([], poll.tracker.cursor(poll.seq).encode())

    def _next_batch(self, poll: _PollSession, opening: dict[str, Any] | None = None) -> bytes:
        """Takes the next batch from the session, remembers it and returns its body.

        `opening`: the session fields of the opening response, which is batch 0.
        """
        session = poll.session
        frames = session.take(max_frames=self.max_batch_messages, max_bytes=self.max_batch_bytes)
        for frame in frames:
            poll.tracker.observe(frame)
        fields: dict[str, Any] = dict(opening or {})
        if not session.queued and (session.close_request is not None or poll.finished):
            # Everything is out: this batch carries the close, and the session ends.
            self._finish(poll)
            code, reason = poll.close or (CloseCode.NORMAL, "session ended")
            fields["close"] = {"code": int(code), "reason": reason}
        if opening is None:
            poll.seq += 1
        poll.last_batch = _batch_body(frames, poll.tracker.cursor(poll.seq).encode(), fields)
        return poll.last_batch


def _batch_body(frames: list[bytes], cursor: str, fields: dict[str, Any] | None = None) -> bytes:
    """`{...fields, "messages": [...], "cursor"}` around the already-encoded frames."""
    head = orjson.dumps(fields or {})[:-1]  # without its closing brace
    return b'%s%s"messages":[%s],"cursor":%s}' % (
        head,
        b"," if fields else b"",
        b",".join(frames),
        orjson.dumps(cursor),
    )
