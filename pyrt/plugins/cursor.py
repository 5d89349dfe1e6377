"""Cursors: the positions a client has seen, as one opaque token; and how HTTP streams use them.

SSE event ids and long-poll cursors carry them, so a client that only remembers the last token
(a browser's EventSource remembers exactly one `Last-Event-ID`) still resumes every channel of
its stream. A token is unpadded base64url of the JSON `{"p": {channel: [offset, epoch]}}`,
plus `"s": n` for a long-poll batch number. Clients treat it as opaque.

Both HTTP transports (SSE, long-poll) open a session the same way (`StreamOpening`: channels
from the query string, joined with `since` from the cursor) and follow the positions they hand
to the client the same way (`PositionTracker`); that shared logic lives here, once.
Sans-IO: no trio, no sockets.
"""

from __future__ import annotations

import base64
import binascii
import urllib.parse
from collections.abc import Mapping
from typing import Protocol

import attrs
import orjson

from ..plugin import (
    ChannelNameError,
    Command,
    HttpError,
    HttpRequest,
    Join,
    StreamPosition,
    check_channel,
    is_pattern,
    json_loads,
)

MAX_CURSOR_CHARS = 16 * 1024


@attrs.frozen(slots=True)
class Cursor:
    positions: Mapping[str, StreamPosition] = attrs.field(factory=dict)
    seq: int | None = None
    """Long-poll only: the number of the last batch the client received."""

    def encode(self) -> str:
        body: dict[str, object] = {
            "p": {ch: [pos.offset, pos.epoch] for ch, pos in self.positions.items()}
        }
        if self.seq is not None:
            body["s"] = self.seq
        return base64.urlsafe_b64encode(orjson.dumps(body)).rstrip(b"=").decode()


def decode_cursor(token: str) -> Cursor:
    """Parses a token; ValueError with a message a client developer can act on."""
    if len(token) > MAX_CURSOR_CHARS:
        raise ValueError(f"cursor longer than {MAX_CURSOR_CHARS} characters")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        body = json_loads(raw, max_depth=3)  # {"p": {channel: [offset, epoch]}}
    except (binascii.Error, ValueError):
        raise ValueError("cursor is not a token this server issued") from None
    if not isinstance(body, dict) or not isinstance(body.get("p"), dict):
        raise ValueError("cursor is not a token this server issued")
    positions: dict[str, StreamPosition] = {}
    for channel, value in body["p"].items():
        if not (
            isinstance(value, list)
            and len(value) == 2
            and type(value[0]) is int
            and value[0] >= 0
            and isinstance(value[1], str)
        ):
            raise ValueError(f"cursor position for '{channel[:64]}' is malformed")
        positions[channel] = StreamPosition(value[0], value[1])
    seq = body.get("s")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise ValueError("cursor batch number is malformed")
    return Cursor(positions, seq)


class PositionTracker:
    """The positions an HTTP stream has handed its client, read off the frames it writes.

    Only two kinds of frame move a position: a join reply that carries an offset (the
    channel's position when joined without `since`, or after a failed recovery) and a `pub`
    push on a channel joined by name. A join reply with `"recovered": true` moves nothing:
    the missed publications follow it, and until each is written the client has not seen it.
    Publications reaching the client only through a pattern join are not tracked (a pattern
    has no position to resume from), which also keeps the cursor as small as the channel list.
    """

    __slots__ = ("_names", "_positions")

    def __init__(self, positions: Mapping[str, StreamPosition] | None = None) -> None:
        self._positions: dict[str, StreamPosition] = dict(positions or {})
        self._names: set[str] = set(self._positions)
        """Channels joined by name on this stream, with or without a position yet."""

    @property
    def positions(self) -> Mapping[str, StreamPosition]:
        return self._positions

    def cursor(self, seq: int | None = None) -> Cursor:
        return Cursor(dict(self._positions), seq)

    def observe(self, frame: bytes) -> bool:
        """Notes what `frame` tells the client; True when a position changed."""
        # The codec writes these keys first (JsonCodec); anything else moves no position, so
        # most frames are never parsed.
        if frame.startswith(b'{"push":"pub",'):
            push = orjson.loads(frame)
            channel = push["channel"]
            if channel not in self._names:
                return False
            return self._move(channel, StreamPosition(push["offset"], push["epoch"]))
        if frame.startswith(b'{"reply":') and b'"offset"' in frame:
            ok = orjson.loads(frame).get("ok")
            if not (isinstance(ok, dict) and {"channel", "offset", "epoch"} <= ok.keys()):
                return False  # a publish ack: no channel named, nothing the client saw
            channel = ok["channel"]
            self._names.add(channel)
            if ok.get("recovered") is True:
                return False
            return self._move(channel, StreamPosition(ok["offset"], ok["epoch"]))
        return False

    def _move(self, channel: str, position: StreamPosition) -> bool:
        if self._positions.get(channel) == position:
            return False
        self._positions[channel] = position
        return True


class CommandSink(Protocol):
    """Where an opening sends its joins (a `pyrt.plugin.Session`)."""

    async def command(self, command: Command) -> None: ...


@attrs.frozen(slots=True)
class StreamOpening:
    """What an SSE or long-poll request asks for when it opens a session: the channels of
    its query string (`channel=`, `presence=`, both repeatable) and where to resume."""

    channels: tuple[str, ...]
    presence: frozenset[str]
    cursor: Cursor

    @classmethod
    def parse(cls, request: HttpRequest, *, max_channels: int, cursor: str | None) -> StreamOpening:
        """Validates the request before any session exists; HttpError otherwise.

        `cursor` is the token to resume from (the `cursor` parameter, or SSE's
        `Last-Event-ID`), if any.
        """
        # In the order given (one list for both names), each once.
        pairs = urllib.parse.parse_qsl(request.target.partition("?")[2], keep_blank_values=True)
        channels = tuple(dict.fromkeys(v for k, v in pairs if k in ("channel", "presence")))
        presence = [v for k, v in pairs if k == "presence"]
        if not channels:
            raise HttpError(400, "give at least one channel: ?channel=<name or pattern>")
        if len(channels) > max_channels:
            raise HttpError(429, f"at most {max_channels} channels per connection")
        for channel in channels:
            try:
                check_channel(channel, pattern=True)
            except ChannelNameError as e:
                raise HttpError(422, f"channel '{channel[:64]}': {e}") from None
        for channel in presence:
            if is_pattern(channel):
                raise HttpError(
                    400, f"presence needs a channel name, not a pattern: '{channel[:64]}'"
                )
        try:
            parsed = decode_cursor(cursor) if cursor else Cursor()
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        return cls(channels, frozenset(presence), parsed)

    async def join(self, session: CommandSink) -> PositionTracker:
        """Joins every channel on `session`, each from its cursor position if it has one;
        returns the tracker for the stream, starting from those positions."""
        resume: dict[str, StreamPosition] = {}
        for channel in self.channels:
            since = None if is_pattern(channel) else self.cursor.positions.get(channel)
            if since is not None:
                resume[channel] = since
            await session.command(
                Join(
                    id=f"join:{channel}",
                    channel=channel,
                    since=since,
                    presence=channel in self.presence,
                )
            )
        return PositionTracker(resume)
