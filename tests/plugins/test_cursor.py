"""Cursors, the position tracker and stream openings: the sans-IO part SSE and long-poll share."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrt.hub.history import Publication, StreamPosition
from pyrt.hub.protocol import Command, Join, JsonCodec
from pyrt.node.http import HttpError, HttpRequest
from pyrt.plugins.cursor import Cursor, PositionTracker, StreamOpening, decode_cursor

codec = JsonCodec()
positions = st.dictionaries(
    st.text(min_size=1, max_size=20),
    st.builds(StreamPosition, st.integers(0, 2**53), st.text(max_size=16)),
    max_size=5,
)


@given(positions, st.none() | st.integers(0, 2**40))
def test_cursors_round_trip(p: dict[str, StreamPosition], seq: int | None) -> None:
    token = Cursor(p, seq).encode()
    assert decode_cursor(token) == Cursor(p, seq)
    assert token.isascii()
    assert not set(token) & set("=+/\r\n")  # safe in a URL and in an SSE id line


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[]", "cursor is not a token this server issued"),
        (b'{"p": {"a": [1]}}', "cursor position for 'a' is malformed"),
        (b'{"p": {"a": [-1, "e"]}}', "cursor position for 'a' is malformed"),
        (b'{"p": {"a": [true, "e"]}}', "cursor position for 'a' is malformed"),
        (b'{"p": {}, "s": -1}', "cursor batch number is malformed"),
        (b'{"p": {}, "s": "1"}', "cursor batch number is malformed"),
    ],
)
def test_bad_cursors_say_what_is_wrong(body: bytes, message: str) -> None:
    import base64

    with pytest.raises(ValueError, match=f"^{message}$"):
        decode_cursor(base64.urlsafe_b64encode(body).decode())


def test_cursor_length_is_bounded() -> None:
    with pytest.raises(ValueError, match="cursor longer than 16384 characters"):
        decode_cursor("A" * 20_000)


def pub(channel: str, offset: int, epoch: str = "e") -> bytes:
    return codec.publication(Publication(channel, offset, epoch, {"x": 1}, 0.0))


def join_reply(channel: str, offset: int, epoch: str = "e", **extra: Any) -> bytes:
    ok = {"channel": channel, "offset": offset, "epoch": epoch, **extra}
    return codec.reply(f"join:{channel}", ok)


def test_the_tracker_follows_join_replies_and_publications() -> None:
    tracker = PositionTracker()
    assert tracker.observe(join_reply("a", 4)) is True
    assert tracker.observe(pub("a", 5)) is True
    assert tracker.observe(pub("a", 5)) is False  # nothing moved
    assert tracker.positions == {"a": StreamPosition(5, "e")}
    assert tracker.cursor(3) == Cursor({"a": StreamPosition(5, "e")}, 3)


def test_the_tracker_ignores_what_moves_no_position() -> None:
    tracker = PositionTracker({"a": StreamPosition(1, "e")})
    ignored = [
        pub("b:1", 9),  # only through a pattern join: no position to resume from
        codec.reply("join:b:*", {"channel": "b:*"}),  # a pattern's join reply
        codec.reply(7, {"offset": 3, "epoch": "e"}),  # a publish ack names no channel
        codec.reply(8, {"channel": "a", "state": {}}),  # a presence reply
        codec.presence_state("a", {}),
        codec.error(9, 400, "'offset' must not be negative"),
        codec.ping(),
        b'{"push":"disconnect","code":1001,"reason":"offset"}',
    ]
    for frame in ignored:
        assert tracker.observe(frame) is False, frame
    assert tracker.positions == {"a": StreamPosition(1, "e")}


def test_a_recovering_join_moves_nothing_until_the_replayed_publications() -> None:
    # The reply carries the channel's top, but the missed publications are still to come:
    # a cursor taken between them must still point before them.
    tracker = PositionTracker({"a": StreamPosition(2, "e")})
    assert tracker.observe(join_reply("a", 5, recovered=True)) is False
    assert tracker.positions["a"] == StreamPosition(2, "e")
    for offset in (3, 4, 5):
        assert tracker.observe(pub("a", offset)) is True
    assert tracker.positions["a"] == StreamPosition(5, "e")
    # A failed recovery has nothing to replay: the client continues from the top.
    assert tracker.observe(join_reply("a", 9, "new", recovered=False)) is True
    assert tracker.positions["a"] == StreamPosition(9, "new")


def test_a_channel_joined_later_over_send_is_tracked_too() -> None:
    tracker = PositionTracker()
    assert tracker.observe(pub("late", 1)) is False  # not joined by name yet
    # A join with `since` sent by the client: no position until a publication arrives.
    assert tracker.observe(join_reply("late", 4, recovered=True)) is False
    assert tracker.observe(pub("late", 4)) is True
    assert tracker.positions == {"late": StreamPosition(4, "e")}


def request(query: str, headers: tuple[tuple[str, str], ...] = ()) -> HttpRequest:
    return HttpRequest("GET", f"/connection/sse?{query}", headers)


class Sink:
    def __init__(self) -> None:
        self.commands: list[Command] = []

    async def command(self, command: Command) -> None:
        self.commands.append(command)


async def test_an_opening_joins_in_order_from_the_cursor() -> None:
    cursor = Cursor({"a": StreamPosition(3, "e"), "gone": StreamPosition(1, "e")}).encode()
    opening = StreamOpening.parse(
        request(f"channel=a&presence=p&channel=b:*&channel=a&cursor={cursor}"),
        max_channels=3,
        cursor=cursor,
    )
    sink = Sink()
    tracker = await opening.join(sink)
    assert sink.commands == [
        Join("join:a", "a", since=StreamPosition(3, "e")),
        Join("join:p", "p", presence=True),
        Join("join:b:*", "b:*"),
    ]
    # Positions of channels not joined again are not carried on.
    assert tracker.positions == {"a": StreamPosition(3, "e")}


@pytest.mark.parametrize(
    ("query", "status", "message"),
    [
        ("", 400, "give at least one channel: ?channel=<name or pattern>"),
        ("channel=", 422, "channel '': empty channel name (at position 0)"),
        ("channel=a&channel=b&channel=c&channel=d", 429, "at most 3 channels per connection"),
        ("channel=a:>:b", 422, "channel 'a:>:b': '>' is only allowed as the last segment"),
        ("presence=a:>", 400, "presence needs a channel name, not a pattern: 'a:>'"),
    ],
)
def test_openings_are_checked_before_any_session(query: str, status: int, message: str) -> None:
    with pytest.raises(HttpError) as caught:
        StreamOpening.parse(request(query), max_channels=3, cursor=None)
    assert caught.value.status == status
    assert caught.value.message.startswith(message)
    assert orjson.loads(caught.value.body())["error"]["code"] == status


def test_a_bad_cursor_is_a_400_with_its_reason() -> None:
    with pytest.raises(HttpError) as caught:
        StreamOpening.parse(request("channel=a"), max_channels=3, cursor="!!")
    assert (caught.value.status, caught.value.message) == (
        400,
        "cursor is not a token this server issued",
    )
