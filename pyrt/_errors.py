"""Errors raised by pyrt, each with a reason a user can act on."""

from __future__ import annotations


class _PositionedError(ValueError):
    """A ValueError that points at the character where the input went wrong."""

    def __init__(self, reason: str, position: int) -> None:
        super().__init__(f"{reason} (at position {position})")
        self.reason = reason
        self.position = position


class FilterError(_PositionedError):
    """A row filter (or row subscription) was rejected at subscribe time."""


class ChannelNameError(_PositionedError):
    """A channel name or channel pattern is not valid."""


class DecodeError(ValueError):
    """A pgoutput message is malformed or truncated: `reason` and the byte `offset`.

    Raised by `pyrt._core.PgOutputDecoder` (and by the reference decoder in
    `pyrt.reference.pgoutput`, which must fail the same way)."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(f"{reason} (at byte {offset})")
        self.reason = reason
        self.offset = offset
