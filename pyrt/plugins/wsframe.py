"""Server-to-client WebSocket data frames, built by hand.

Server frames are not masked (RFC 6455 5.1), so one frame built from a payload can be written
to every subscriber's socket unchanged. wsproto still does everything else (handshake, reading,
control frames, close); building the data frames ourselves is what lets fan-out skip its
per-message, per-connection encoder (about 3 us versus 0.3 us per frame on this project's
reference machine).
"""

from __future__ import annotations

import struct

TEXT = 0x1
BINARY = 0x2
_FIN = 0x80


def frame_header(length: int, opcode: int = TEXT) -> bytes:
    """The header of one unfragmented, unmasked frame carrying `length` payload bytes."""
    first = _FIN | opcode
    if length < 126:
        return bytes((first, length))
    if length < 1 << 16:
        return struct.pack("!BBH", first, 126, length)
    return struct.pack("!BBQ", first, 127, length)


def data_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """One complete frame: header and payload."""
    return frame_header(len(payload), opcode) + payload
