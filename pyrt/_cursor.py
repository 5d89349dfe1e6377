"""Cursors: the positions a client has seen, as one opaque token.

SSE event ids and long-poll cursors carry them, so a client that only remembers the last token
(a browser's EventSource remembers exactly one `Last-Event-ID`) still resumes every channel of
its stream. A token is unpadded base64url of the JSON `{"p": {channel: [offset, epoch]}}`,
plus `"s": n` for a long-poll batch number. Clients treat it as opaque.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

import attrs
import orjson

from ._history import StreamPosition

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
        body = orjson.loads(raw)
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
