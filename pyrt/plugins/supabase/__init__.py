"""The Supabase Realtime transport: the official Supabase clients (supabase-js, supabase-py's
`realtime`) against pyrt's hub, unmodified (docs/supabase.md).

Serves WebSocket upgrades at `/realtime/v1/websocket` and `/socket/websocket` (Phoenix
channels, vsn 1.0.0 or 2.0.0; frames in pyrt.plugins.supabase.phoenix) and Supabase's
broadcast REST API at `POST /api/broadcast` and `POST /api/broadcast/<topic>/events/<event>`
(also under `/realtime/v1`). Each Phoenix channel of a socket is one hub connection, with a
`ChannelCodec` naming its topic: broadcasts are publications on the topic's channel, presence
is the hub's presence, and `postgres_changes` are the hub's row-change subscriptions (one
hub join per table), so Supabase and native clients share channels, history and rows.

Who a client is (docs/supabase.md, "Keys, tokens and channel rules"): the socket's `apikey`
gives the identity of its role (an anon key: anonymous, `role` anon; a service_role key or a
server API key: `role` service_role); a join's `access_token`, verified with the `[auth]`
keys at join and again on each `access_token` push, makes that channel's identity the user's.
The channel rules decide every join (private or not), broadcast and presence.

wsproto does the handshake, control frames and close, as in the native WebSocket transport;
data frames are built by pyrt.plugins.wsframe.
"""

from __future__ import annotations

import contextlib
import hmac
import math
import time
from collections.abc import Sequence
from typing import Any

import attrs
import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from ...plugin import (
    Action,
    Admission,
    AuthError,
    ChannelNameError,
    CloseCode,
    HttpError,
    HttpExchange,
    HttpRequest,
    Identity,
    Join,
    JsonError,
    Leave,
    Publish,
    Session,
    Track,
    TransportContext,
    Untrack,
    bearer_token,
    check_channel,
    check_integer,
    is_disconnect,
    json_loads,
)
from ..wsframe import BINARY, TEXT, data_frame
from .phoenix import (
    PHOENIX_TOPIC,
    TOPIC_PREFIX,
    VERSIONS,
    VSN_1,
    BadFrame,
    ChannelCodec,
    JoinError,
    Message,
    TooDeep,
    decode,
    encode,
    is_binary,
    new_presence_key,
    parse_join,
    topic_channel,
)

SOCKET_PATHS = ("/realtime/v1/websocket", "/socket/websocket")
BROADCAST_PATHS = ("/api/broadcast", "/realtime/v1/api/broadcast")
MAX_REST_MESSAGES = 100
"""Most messages one `POST /api/broadcast` may carry."""

ANON_KEY = Identity(claims={"role": "anon"}, anonymous=True)
"""The identity of a client whose `apikey` is one of the transport's `apikeys`: Supabase's
anon role (anonymous to the channel rules, `role:anon` to a role rule)."""
SERVICE_KEY = Identity(claims={"role": "service_role"}, anonymous=False)
"""The identity of a socket whose `apikey` is one of `server.api_keys`: Supabase's
service_role (authenticated, with no user)."""
KEY_ROLES = ("anon", "service_role")
"""The roles an `apikey` that is a JWT may carry (Supabase's anon and service_role keys)."""
_CHANNEL_CLOSES = (CloseCode.TOKEN_EXPIRED, CloseCode.REVOKED, CloseCode.UNAUTHORIZED)
"""Closes the hub asks for that end one Phoenix channel (its token), not the socket."""


def _matches(given: str, keys: Sequence[str]) -> bool:
    # Compared with every key, without stopping at a match (as the REST API does).
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    return matched


class _Refused(Exception):
    """An HTTP request refused the way Supabase does: `status` and `{"error": message}`
    (429s say when to retry, in `retry-after`)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _role_identity(identity: Identity) -> Identity:
    """A verified token's identity on this endpoint: role `anon` is anonymous to the rules
    (Supabase's anon key, or a token minted for that role); a `channels` claim joins
    nothing (a Phoenix channel is one topic)."""
    if identity.role == "anon":
        return attrs.evolve(identity, anonymous=True, channels=())
    return attrs.evolve(identity, channels=()) if identity.channels else identity


def _looks_like_jwt(value: str) -> bool:
    return value.count(".") == 2


def _expired(identity: Identity, now: float) -> bool:
    return identity.expires is not None and identity.expires <= now


def _paused(ctx: TransportContext, stream: trio.abc.Stream) -> None:
    """Refuses (429) while the client's address is paused for wrong keys."""
    wait = ctx.api_key_pause(stream)
    if wait:
        raise _Refused(429, "too many wrong API keys from your address: try again later", wait)


class SupabaseTransport:
    """Supabase Realtime's protocol over WebSocket, and its broadcast REST API.

    `apikeys`: keys a client may give as `apikey` (query) or `x-api-key`/`apikey` (header),
    besides the node's `api_keys`; Supabase apps ship their anon key in the browser, so give
    them one of these rather than a server key. With no key configured at all, the socket
    is open (as `/connection/websocket` is) and the REST API refuses.
    `max_channels`: Phoenix channels one socket may join (Supabase's hosted limit is 100).
    """

    name = "supabase"

    def __init__(self, *, apikeys: Sequence[str] = (), max_channels: int = 100) -> None:
        if isinstance(apikeys, str) or not all(isinstance(k, str) and k for k in apikeys):
            raise TypeError("apikeys must be a list of non-empty strings")
        self.apikeys = tuple(apikeys)
        self.max_channels = check_integer("max_channels", max_channels, 1)

    def claims(self, request: HttpRequest) -> bool:
        path = request.path
        return path in SOCKET_PATHS or any(
            path == p or path.startswith(p + "/") for p in BROADCAST_PATHS
        )

    def keys(self, ctx: TransportContext) -> tuple[str, ...]:
        return self.apikeys + tuple(ctx.config.api_keys)

    async def key_identity(
        self, ctx: TransportContext, stream: trio.abc.Stream, key: str
    ) -> Identity | None:
        """Who an `apikey` says the client is: `ANON_KEY` for one of `apikeys`, None (a
        server: trusted) for one of `server.api_keys`, and for a JWT signed with the `[auth]`
        keys whose `role` is anon or service_role, its identity. `_Refused` otherwise: 401
        (a wrong key counts against the client's address), 403 for a JWT of another role."""
        if _matches(key, self.apikeys):
            return ANON_KEY
        if ctx.api_key_valid(key):
            return None
        if not _looks_like_jwt(key):
            ctx.api_key_failed(stream)
            raise _Refused(401, "invalid apikey")
        try:
            identity = await ctx.verify_token(key, audience_optional=True)
        except AuthError as e:
            ctx.api_key_failed(stream)
            raise _Refused(401, f"invalid apikey: {e}") from None
        if identity.role not in KEY_ROLES:
            role = identity.role
            shown = f"'{role[:32]}'" if role is not None else "none"
            raise _Refused(403, f"an apikey's role must be anon or service_role, not {shown}")
        return _role_identity(identity)

    async def serve(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        try:
            if exchange.request.path in SOCKET_PATHS:
                await self._socket(ctx, exchange)
            else:
                await self._rest(ctx, exchange)
        except _Refused as e:
            headers = []
            if e.retry_after is not None:
                headers.append(("retry-after", str(max(1, math.ceil(e.retry_after)))))
            await exchange.respond(e.status, orjson.dumps({"error": e.message}), headers=headers)

    # -- the socket ------------------------------------------------------------------------

    async def _socket(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        request = exchange.request
        if not request.is_websocket_upgrade:
            raise _Refused(400, "this endpoint takes WebSocket upgrades only")
        vsn = request.param("vsn") or VSN_1
        if vsn not in VERSIONS:
            raise _Refused(400, f"unsupported vsn '{vsn[:16]}': use 1.0.0 or 2.0.0")
        _paused(ctx, exchange.stream)
        given = request.param("apikey") or request.header("x-api-key") or request.header("apikey")
        identity: Identity | None
        if given:
            identity = await self.key_identity(ctx, exchange.stream, given)
            if identity is None:
                identity = SERVICE_KEY
        elif self.keys(ctx):
            raise _Refused(401, "missing apikey: send it as ?apikey= or an x-api-key header")
        else:  # no key at all: a native token, or anonymous where [auth] lets it in
            try:
                identity = await ctx.authenticate(request)
            except HttpError as e:
                raise _Refused(e.status, e.message) from None
            assert identity is not None
            identity = _role_identity(identity)
        auth = ctx.config.auth
        if auth is not None and auth.allowed_origins:
            # Only when origins are listed: Supabase apps are served from their own site,
            # never the realtime server's, and send their key explicitly (no cookie).
            try:
                ctx.check_origin(request)
            except HttpError as e:
                raise _Refused(e.status, e.message) from None
        ws = WSConnection(ConnectionType.SERVER)
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
        try:
            ws.initiate_upgrade_connection(headers, request.target)
        except RemoteProtocolError as e:
            raise _Refused(400, f"bad websocket upgrade: {e}") from None
        stream = exchange.stream
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
        socket = _Socket(ctx, stream, ws, vsn, self.max_channels, identity, given)
        await socket.run(exchange.trailing)

    # -- REST ------------------------------------------------------------------------------

    async def _rest(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        request = exchange.request
        if request.method != "POST":
            raise _Refused(405, f"use POST for {request.path[:128]}")
        identity = await self._authorize(ctx, exchange)
        path = next(p for p in BROADCAST_PATHS if request.path.startswith(p))
        rest = request.path[len(path) :]
        limit = ctx.config.hub.max_payload_bytes
        if not rest:
            body = await self._json(ctx, exchange)
            messages = _broadcast_messages(body)
        else:
            topic, slash, event = rest[1:].partition("/events/")
            if not slash or not topic or not event or "/" in event:
                raise _Refused(404, "use POST /api/broadcast/<topic>/events/<event>")
            content_type = (request.header("content-type") or "").split(";")[0].strip()
            if content_type == "application/octet-stream":
                raise _Refused(415, "binary broadcast payloads are not supported by pyrt yet")
            payload = await self._json(ctx, exchange)
            messages = [(topic, event, payload)]
        channels = []
        for index, (topic, event, payload) in enumerate(messages):
            size = len(orjson.dumps(payload))
            if size > limit:
                raise _Refused(413, f"messages[{index}].payload larger than {limit} bytes")
            channel = _channel_of(TOPIC_PREFIX + topic)
            refusal = ctx.write_refusal(channel)
            if refusal is not None:
                raise _Refused(403, f"messages[{index}]: {refusal[1]}")
            if identity is not None:
                reason = await ctx.refusal(identity, Action.PUBLISH, channel)
                if reason is not None:
                    raise _Refused(403, f"messages[{index}]: Unauthorized: {reason}")
            channels.append((channel, event, payload))
        wait = ctx.take_publish_rate(dict.fromkeys(c for c, _, _ in channels))
        if wait:
            rate = ctx.config.hub.channel_publish_rate
            message = f"MessagePerSecondRateLimitReached: at most {rate:g} per channel"
            raise _Refused(429, message, wait)
        for channel, event, payload in channels:
            await ctx.publish(channel, {"event": event, "payload": payload})
        await exchange.respond(202, b"")

    async def _authorize(self, ctx: TransportContext, exchange: HttpExchange) -> Identity | None:
        """Who publishes: None for a server API key (trusted, as `POST /api/publish`), else
        the identity the channel rules judge: the `Authorization: Bearer` user token when
        there is one besides the key, else the key's (an anon key, a JWT key)."""
        request = exchange.request
        stream = exchange.stream
        _paused(ctx, stream)
        key = request.header("apikey") or request.header("x-api-key")
        bearer = bearer_token(request.header("authorization"))
        if key is None:
            key, bearer = bearer, None  # `Authorization: Bearer <key>` alone
        if key is None or (not self.keys(ctx) and not _looks_like_jwt(key)):
            if not self.keys(ctx):
                raise _Refused(401, "the broadcast API is disabled: no API keys configured")
            raise _Refused(401, "missing apikey: send an apikey header")
        identity = await self.key_identity(ctx, stream, key)
        if bearer is None or bearer == key:
            return identity
        if not _looks_like_jwt(bearer):
            if ctx.api_key_valid(bearer) or _matches(bearer, self.apikeys):
                return identity  # a key twice (the clients send the anon key as both)
            ctx.api_key_failed(stream)
            raise _Refused(401, "InvalidJWTToken: the Authorization bearer is not a JWT")
        try:
            return _role_identity(await ctx.verify_token(bearer))
        except AuthError as e:
            raise _Refused(401, f"InvalidJWTToken: {e}") from None

    async def _json(self, ctx: TransportContext, exchange: HttpExchange) -> Any:
        try:
            raw = await exchange.body(ctx.config.max_body_bytes)
        except HttpError as e:
            raise _Refused(e.status, e.message) from None
        try:
            return json_loads(raw)
        except JsonError as e:
            raise _Refused(400, f"body is {e.message}") from None


def _unauthorized(channel: str, action: Action, reason: str) -> str:
    """A join's refusal by the channel rules, in Supabase's words (and the rules' reason)."""
    what = "read from" if action is Action.SUBSCRIBE else "use presence on"
    where = f"this Channel topic: {channel}"
    return f"Unauthorized: You do not have permissions to {what} {where}: {reason}"


def _channel_of(topic: str) -> str:
    channel = topic_channel(topic)
    try:
        check_channel(channel)
    except ChannelNameError:
        # A character one side calls whitespace and the other does not: hash it.
        channel = topic_channel(TOPIC_PREFIX + "\x00" * 256 + topic)
    return channel


def _broadcast_messages(body: Any) -> list[tuple[str, str, Any]]:
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise _Refused(400, 'body must be {"messages": [{topic, event, payload}, ...]}')
    items = body["messages"]
    if not 1 <= len(items) <= MAX_REST_MESSAGES:
        raise _Refused(400, f"'messages' must hold 1 to {MAX_REST_MESSAGES} messages")
    out = []
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise _Refused(400, f"{where} must be an object")
        topic, event = item.get("topic"), item.get("event")
        if not isinstance(topic, str) or not topic or not isinstance(event, str) or not event:
            raise _Refused(400, f"{where} needs a 'topic' and an 'event' (non-empty strings)")
        out.append((topic, event, item.get("payload", {})))
    return out


@attrs.define(eq=False)
class _Channel:
    """One joined Phoenix channel of a socket: a hub session and its settings."""

    topic: str
    session: Session
    codec: ChannelCodec
    channel: str
    """The hub channel of its broadcasts and presence."""
    ack: bool
    echo: bool
    presence_key: str
    track_ref: str | None = None
    """The ref of this channel's presence entry, replaced by the next track."""
    access_token: str | None = None
    leaving: bool = False


class _Socket:
    """One accepted Supabase socket: a reader, and a writer task per joined channel."""

    def __init__(
        self,
        ctx: TransportContext,
        stream: trio.abc.Stream,
        ws: WSConnection,
        vsn: str,
        max_channels: int,
        identity: Identity,
        apikey: str | None,
    ) -> None:
        self.ctx = ctx
        self.identity = identity
        """Who the socket's `apikey` says it is: each channel's identity until a join's
        `access_token` brings a user's."""
        self.apikey = apikey
        self.stream = stream
        self.ws = ws
        self.vsn = vsn
        self.max_channels = max_channels
        self.max_message = ctx.config.hub.max_frame_bytes
        self.idle_timeout = ctx.config.hub.idle_timeout
        self.channels: dict[str, _Channel] = {}
        self.send_lock = trio.Lock()
        self.parts: list[bytes] = []
        self.size = 0
        self.done = False
        self.closing = False
        self.read_scope = trio.CancelScope()
        self.nursery: trio.Nursery | None = None
        self.rate = ctx.socket_rate()
        """The socket's message rate (`hub.command_rate`), over all its channels."""

    async def run(self, trailing: bytes = b"") -> None:
        """Serves the socket; `trailing`: what the client sent after its upgrade request (a
        join in the same packet), read once the nursery its channels' writers run in is open."""
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                try:
                    if trailing:
                        await self.feed(trailing)
                    await self.read()
                except Exception as e:
                    if is_disconnect(e):
                        raise
                    # A bug while reading: this socket closes with 1011, nothing else.
                    self.ctx.connection_failed(e)
                    await self.close(CloseCode.INTERNAL_ERROR, "internal server error")
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # The client went away, or stopped reading; maybe inside the nursery.
            self.ctx.count_write_timeout(group)
        finally:
            for channel in list(self.channels.values()):
                channel.session.end()
            self.channels.clear()

    # -- writing ---------------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        async with self.send_lock:
            await self.ctx.send_all(self.stream, data)

    async def send_frames(self, frames: Sequence[bytes]) -> None:
        wire = b"".join(data_frame(f, BINARY if is_binary(f) else TEXT) for f in frames if f)
        if wire:
            await self.send(wire)

    async def send_message(self, message: Message) -> None:
        """A frame of the socket's own (heartbeat replies, refusals before a channel exists)."""
        await self.send_frames([encode(message, self.vsn)])

    async def reply(self, message: Message, status: str, response: dict[str, Any]) -> None:
        join_ref = message.join_ref
        if join_ref is None and message.event == "phx_join":
            join_ref = message.ref  # a join's reply names the join
        payload = {"status": status, "response": response}
        await self.send_message(Message(message.topic, "phx_reply", payload, message.ref, join_ref))

    async def refuse(self, message: Message, reason: str) -> None:
        await self.reply(message, "error", {"reason": reason})

    async def close(self, code: CloseCode, reason: str) -> None:
        """Sends the close frame; the reader then waits (2 s at most) for the client's."""
        if self.closing:
            return
        self.closing = True
        self.read_scope.deadline = min(self.read_scope.deadline, trio.current_time() + 2.0)
        with contextlib.suppress(LocalProtocolError):
            await self.send(self.ws.send(CloseConnection(code=int(code), reason=reason[:120])))

    async def write(self, channel: _Channel) -> None:
        """Writes what the hub queues for one channel until it is left or closed."""
        session = channel.session
        try:
            while True:
                frames = await session.outgoing()
                if not frames:
                    break
                await self.send_frames(frames)
                if channel.leaving and not session.queued:
                    break
            closing = session.close_request
            if closing is not None and not channel.leaving:
                code, reason = closing
                codec = channel.codec
                if code == CloseCode.SLOW:
                    # This channel fell behind: it errors (the client rejoins); others go on.
                    error = codec.message("phx_error", {"reason": reason}, codec.join_ref)
                    await self.send_frames([error])
                elif code in _CHANNEL_CLOSES:
                    # Its token expired or was revoked: this channel ends, as Supabase ends
                    # it (a `system` error, then `phx_close`); the socket and others go on.
                    if code == CloseCode.TOKEN_EXPIRED:
                        expires = session.identity.expires or time.time()
                        ago = max(0, int(time.time() - expires))
                        reason = f"InvalidJWTToken: Token has expired {ago} seconds ago"
                    else:
                        reason = f"Unauthorized: {reason}"
                    closed = codec.message("phx_close", {}, codec.join_ref)
                    await self.send_frames([codec.system("error", reason), closed])
                else:
                    await self.close(code, reason)  # before the session ends: a node
                    # shutting down waits for its sessions, not for its sockets
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self.ctx.count_write_timeout(e)
            if self.nursery is not None:
                self.nursery.cancel_scope.cancel()  # the socket is unusable: end it all
        finally:
            session.end()
            if self.channels.get(channel.topic) is channel:
                del self.channels[channel.topic]

    # -- reading ---------------------------------------------------------------------------

    async def read(self) -> None:
        while not self.done:
            self.read_scope = trio.CancelScope(
                deadline=trio.current_time() + self.idle_timeout
                if not self.closing
                else self.read_scope.deadline
            )
            data = None
            with self.read_scope:
                try:
                    data = await self.stream.receive_some(64 * 1024)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if self.read_scope.cancelled_caught:
                if self.closing:
                    return  # the client did not answer our close
                idle = self.idle_timeout
                await self.close(CloseCode.IDLE_TIMEOUT, f"nothing received for {idle:g} s")
                continue
            try:
                await self.feed(bytes(data) if data else None)
            except RemoteProtocolError:
                return
            if not data:
                return

    async def feed(self, data: bytes | None) -> None:
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, (TextMessage, BytesMessage)):
                if self.closing:
                    continue
                chunk = event.data.encode() if isinstance(event.data, str) else bytes(event.data)
                self.parts.append(chunk)
                self.size += len(chunk)
                if self.size > self.max_message:
                    self.parts.clear()
                    limit = self.max_message
                    await self.close(CloseCode.MESSAGE_TOO_BIG, f"frame larger than {limit} bytes")
                    continue
                if event.message_finished:
                    frame = b"".join(self.parts)
                    self.parts.clear()
                    self.size = 0
                    await self.receive(frame, binary=isinstance(event, BytesMessage))
            elif isinstance(event, Ping):
                if self.ws.state is ConnectionState.OPEN:  # none once our close is sent
                    await self.send(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.done = True
                with contextlib.suppress(LocalProtocolError):  # we had sent our close already
                    await self.send(self.ws.send(event.response()))

    async def receive(self, frame: bytes, *, binary: bool) -> None:
        admission = Admission.ACCEPT if self.rate is None else self.rate.admit()
        if admission is Admission.CLOSE:
            assert self.rate is not None
            rate = self.rate.per_second
            await self.close(CloseCode.RATE_LIMITED, f"over {rate:g} messages per second")
            return
        try:
            message = decode(frame, self.vsn, binary=binary)
        except BadFrame as e:
            await self.close(e.code, e.message)
            return
        except TooDeep as e:
            await self.refuse(e.message, e.reason)
            return
        heartbeat = message.topic == PHOENIX_TOPIC and message.event == "heartbeat"
        if admission is Admission.REFUSE and not heartbeat:
            # Heartbeats are answered all the same (a client without answers reconnects);
            # they count against the rate like every message.
            assert self.rate is not None
            self.rate.refused()
            code = "ClientJoinRateLimitReached" if message.event == "phx_join" else None
            retry = math.ceil(self.rate.retry_after() * 1000) / 1000
            reason = f"over {self.rate.per_second:g} messages per second; retry in {retry:g} s"
            await self.refuse(message, f"{code or 'MessagePerSecondRateLimitReached'}: {reason}")
            return
        if message.topic == PHOENIX_TOPIC:
            if heartbeat:
                await self.reply(message, "ok", {})
            else:
                await self.refuse(message, f"UnknownEvent: '{message.event[:64]}' on phoenix")
            return
        if message.event == "phx_join":
            await self.join(message, len(frame))
            return
        channel = self.channels.get(message.topic)
        if channel is None:
            await self.refuse(message, "unmatched topic")
            return
        await self.handle(channel, message, len(frame))

    # -- channels --------------------------------------------------------------------------

    async def join(self, message: Message, size: int) -> None:
        topic = message.topic
        if not topic.startswith(TOPIC_PREFIX):
            await self.refuse(message, "unmatched topic")
            return
        try:
            request = parse_join(message.payload)
        except JoinError as e:
            await self.refuse(message, e.reason)
            return
        previous = self.channels.pop(topic, None)
        if previous is not None:  # joined again (a client's rejoin): the new join replaces it
            previous.leaving = True
            previous.session.end()
            previous.session.wake()  # its writer sees the end
        if len(self.channels) >= self.max_channels:
            limit = self.max_channels
            await self.refuse(message, f"TooManyChannels: at most {limit} channels per socket")
            return
        groups = request.groups()
        if len(groups) + 1 > self.ctx.config.hub.max_channels_per_connection:
            limit = self.ctx.config.hub.max_channels_per_connection - 1
            await self.refuse(message, f"TooManyChannels: at most {limit} tables per channel")
            return
        identity = await self.channel_identity(message, request.access_token)
        if identity is None:
            return
        channel_name = _channel_of(topic)
        join_ref = message.join_ref if message.join_ref is not None else message.ref
        codec = ChannelCodec(topic, join_ref, self.vsn, extras=request.extras)
        session = self.ctx.open_session(idle_timeout=None, pings=False, identity=identity)
        session.codec = codec
        # The channel rules (and the application's hook) first: the reply comes before the
        # hub's join of the channel, so a refusal must be known now.
        actions = [Action.SUBSCRIBE] + ([Action.PRESENCE] if request.presence_enabled else [])
        for action in actions:
            refusal = await session.refusal(action, channel_name)
            if refusal is not None:
                session.end()
                await self.refuse(message, _unauthorized(channel_name, action, refusal))
                return
        ids = [0] * len(request.changes)
        for table, indexes in groups.items():
            subs = tuple(request.changes[i].subscription for i in indexes)
            await session.command(Join(None, table, changes=subs))
            if not session.joined(table):  # refused: by the rules (the binding was checked)
                refusal = await session.refusal(Action.SUBSCRIBE, table)
                session.end()
                if refusal is not None:
                    reason = _unauthorized(table, Action.SUBSCRIBE, refusal)
                else:
                    reason = f"InvalidJoinPayload: cannot subscribe to {table}"
                await self.refuse(message, reason)
                return
            for index, sub_id in zip(indexes, session.row_subscriptions(table), strict=True):
                ids[index] = sub_id
        response: dict[str, Any] = {
            "postgres_changes": [
                {**binding.raw, "id": sub_id}
                for binding, sub_id in zip(request.changes, ids, strict=True)
            ]
        }
        if request.extras:
            if request.since is not None:
                recovery = self.ctx.history(channel_name, since=request.since)
                position, recovered = recovery.position, recovery.recovered
            else:
                position, recovered = self.ctx.history_position(channel_name), True
            response["pyrt"] = {
                "channel": channel_name,
                "offset": position.offset,
                "epoch": position.epoch,
                "recovered": recovered,
            }
        # The reply, then what the join sends (missed broadcasts, presence_state), then the
        # row subscriptions' confirmation: they are live from the table joins above.
        session.push(codec.ok(message.ref, response))
        await session.command(
            Join(None, channel_name, since=request.since, presence=request.presence_enabled)
        )
        if request.changes:
            session.push(codec.system("ok", "Subscribed to PostgreSQL", "postgres_changes"))
        channel = _Channel(
            topic,
            session,
            codec,
            channel_name,
            ack=request.ack,
            echo=request.echo,
            presence_key=request.presence_key or new_presence_key(),
            access_token=request.access_token or self.apikey,
        )
        self.channels[topic] = channel
        assert self.nursery is not None
        self.nursery.start_soon(self.write, channel)

    async def channel_identity(self, message: Message, token: str | None) -> Identity | None:
        """A joining channel's identity: its `access_token`'s (verified now), else the
        socket's. None when refused (the join is answered `InvalidJWTToken: ...`)."""
        if token is None or token == self.apikey:
            identity = self.identity
            if _expired(identity, time.time()):
                await self.refuse(message, "InvalidJWTToken: the apikey has expired")
                return None
            return identity
        try:
            return _role_identity(await self.ctx.verify_token(token))
        except AuthError as e:
            await self.refuse(message, f"InvalidJWTToken: {e}")
            return None

    async def shut(self, channel: _Channel, reason: str) -> None:
        """Ends a channel as Supabase does when its token goes bad: a `system` error with
        `reason`, then `phx_close` (the clients report CHANNEL_ERROR, then CLOSED)."""
        session = channel.session
        for joined in session.joins():
            await session.command(Leave(None, joined))
        channel.leaving = True
        if self.channels.get(channel.topic) is channel:
            del self.channels[channel.topic]
        codec = channel.codec
        session.push(codec.system("error", reason))
        session.push(codec.message("phx_close", {}, codec.join_ref))

    async def handle(self, channel: _Channel, message: Message, size: int) -> None:
        session = channel.session
        payload = message.payload
        event = message.event
        if not isinstance(payload, dict):
            await self.refuse(message, "InvalidMessage: 'payload' must be an object")
            return
        if event == "broadcast":
            name = payload.get("event")
            if not isinstance(name, str) or not name:
                await self.refuse(message, "InvalidMessage: a broadcast needs an 'event' string")
                return
            data = payload.get("payload", {})
            if isinstance(data, bytes):
                reason = "BinaryPayloadNotSupported: binary broadcast payloads are not supported"
                await self.refuse(message, f"{reason} by pyrt yet; send JSON")
                return
            publish = Publish(
                message.ref,
                channel.channel,
                {"event": name, "payload": data},
                ack=channel.ack,
                echo=channel.echo,
                size=size,
            )
            await session.command(publish)
        elif event == "presence":
            kind = payload.get("event")
            if kind == "track":
                meta = payload.get("payload", {})
                if not isinstance(meta, dict):
                    await self.refuse(message, "InvalidMessage: presence payload must be an object")
                    return
                key = channel.presence_key
                track = Track(message.ref, channel.channel, key, meta, channel.track_ref)
                await session.command(track)
                channel.track_ref = session.presence_ref(channel.channel, key)
            elif kind == "untrack":
                await session.command(Untrack(message.ref, channel.channel, channel.presence_key))
                channel.track_ref = None
            else:
                await self.refuse(message, "InvalidMessage: a presence event is track or untrack")
        elif event == "access_token":
            token = payload.get("access_token")
            if token is not None and not isinstance(token, str):
                await self.refuse(message, "InvalidMessage: 'access_token' must be a string")
                return
            if token is not None and token != channel.access_token:
                # A new token: checked as at join; the channel's identity becomes its own.
                if token == self.apikey:
                    identity = self.identity
                else:
                    try:
                        identity = _role_identity(await self.ctx.verify_token(token))
                    except AuthError as e:
                        await self.shut(channel, f"InvalidJWTToken: {e}")
                        return
                refusal = await session.reidentify(identity)
                if refusal is not None:
                    await self.shut(channel, f"Unauthorized: {refusal}")
                    return
                channel.access_token = token
            session.push(channel.codec.ok(message.ref))
        elif event == "phx_leave":
            for joined in session.joins():
                await session.command(Leave(None, joined))
            channel.leaving = True
            del self.channels[channel.topic]
            codec = channel.codec
            session.push(codec.ok(message.ref))
            session.push(codec.message("phx_close", {}, codec.join_ref))
        else:
            await self.refuse(message, f"UnknownEvent: '{event[:64]}'")
