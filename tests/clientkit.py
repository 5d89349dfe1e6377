"""Helpers shared by the Python client's tests."""

from __future__ import annotations

import trio

from pyrt.client import Channel, Message


async def take(channel: Channel, n: int, timeout: float = 10) -> list[Message]:
    """The next `n` messages of `channel`, within `timeout` seconds."""
    out = []
    with trio.fail_after(timeout):
        async for message in channel:
            out.append(message)
            if len(out) == n:
                return out
    raise AssertionError("channel closed")
