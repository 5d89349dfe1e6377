"""Writing to peers with a deadline on progress.

A peer that stops reading fills its socket's buffers, and a plain `send_all` then waits for it
forever, holding the connection's descriptor and whatever is queued for it. Every write pyrt
makes to a client goes through `send_all` here instead: the write may take as long as the peer
keeps reading, but when it makes no progress at all for `timeout` seconds it fails with
`WriteTimeout`, a `trio.BrokenResourceError`, so the connection ends the way it ends when the
peer is gone (`[hub] write_timeout`, docs/security.md).
"""

from __future__ import annotations

import errno

import trio

__all__ = ["WriteTimeout", "has_write_timeout", "is_disconnect", "send_all"]


class WriteTimeout(trio.BrokenResourceError):
    """A write to a peer made no progress for the write timeout: it is not reading."""


async def send_all(stream: trio.abc.SendStream, data: bytes, timeout: float) -> None:
    """`stream.send_all(data)`, failing with WriteTimeout once no byte could be written for
    `timeout` seconds (on a socket, each partial write starts the wait anew)."""
    if not isinstance(stream, trio.SocketStream):
        with trio.move_on_after(timeout) as waited:
            await stream.send_all(data)
        if waited.cancelled_caught:
            raise WriteTimeout(f"no progress writing for {timeout:g} s")
        return
    sock = stream.socket
    with memoryview(data) as view:
        sent = 0
        while sent < len(view):
            with trio.move_on_after(timeout) as waited:
                try:
                    # trio's socket send either sends (some) or, cancelled, sends nothing.
                    sent += await sock.send(view[sent:])
                except OSError as e:
                    if e.errno == errno.EBADF:
                        raise trio.ClosedResourceError("the socket was closed") from None
                    raise trio.BrokenResourceError(f"write failed: {e}") from e
            if waited.cancelled_caught:
                raise WriteTimeout(f"no progress writing for {timeout:g} s")


def has_write_timeout(error: BaseException) -> bool:
    """Whether `error`, or an error in it if it is a group, is a WriteTimeout."""
    if isinstance(error, BaseExceptionGroup):
        return any(has_write_timeout(e) for e in error.exceptions)
    return isinstance(error, WriteTimeout)


def is_disconnect(error: BaseException) -> bool:
    """Whether `error` (or every error of a group) says only that the peer went away, or
    stopped reading (WriteTimeout)."""
    if isinstance(error, BaseExceptionGroup):
        return all(is_disconnect(e) for e in error.exceptions)
    return isinstance(error, (trio.BrokenResourceError, trio.ClosedResourceError))
