"""What every link has in common. A link is one open connection to the hub over some
transport (`_websocket.py`, `_http.py`): it sends commands and yields frames in order; the
client's session logic (`_session.py`) is the same over all of them."""

from __future__ import annotations

import abc
import enum
import urllib.parse
from typing import Any, ClassVar

import attrs
import orjson
import trio


class LinkClosed(Exception):
    """The link ended, or could not carry a command. `code`: the server's close code (a
    WebSocket close, SSE's `close` event, long-poll's `close` field), or the HTTP status
    that refused to open it; None when the network ended it."""

    def __init__(self, reason: str, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Outcome(enum.Enum):
    """How a link's session ended, which decides what the client tries next."""

    FAILED = enum.auto()
    """It could not be opened, or ended before anything arrived: try the next transport."""
    STALLED = enum.auto()
    """Nothing arrived for `stall_timeout`: try the next transport."""
    CLOSED = enum.auto()
    """It worked, then the server or the network closed it: back off, same transport."""
    DROPPED = enum.auto()
    """`drop_connection()`: back off, same transport."""
    PROBED = enum.auto()
    """The preferred transport works again: switch back to it now."""
    UNAUTHORIZED = enum.auto()
    """The server refused the token (401 at the door, close 4401) or it expired (4419):
    with a token provider, reconnect with a new token; else stop."""
    REVOKED = enum.auto()
    """The server ended the connection on purpose (4403): stop, do not reconnect."""


UNAUTHORIZED_CODES = frozenset({401, 4401, 4419})
"""Close codes (and the HTTP status) that say the token was missing, refused or expired."""
REVOKED_CODE = 4403


def outcome_of(error: LinkClosed, otherwise: Outcome) -> Outcome:
    """How a link that ended with `error` ended: refused or revoked by its code, else
    `otherwise`."""
    if error.code in UNAUTHORIZED_CODES:
        return Outcome.UNAUTHORIZED
    if error.code == REVOKED_CODE:
        return Outcome.REVOKED
    return otherwise


@attrs.frozen(slots=True)
class Endpoints:
    """Where each transport lives, derived from the one URL the user gives."""

    websocket: str
    sse: str
    poll: str
    send: str

    @classmethod
    def from_url(cls, url: str) -> Endpoints:
        parts = urllib.parse.urlsplit(url)
        secure = {"ws": False, "http": False, "wss": True, "https": True}.get(parts.scheme)
        if secure is None or not parts.netloc:
            raise ValueError(f"expected an http(s):// or ws(s):// URL, not {url!r}")
        path = parts.path.rstrip("/")
        for suffix in ("/connection/websocket", "/connection/sse", "/connection/poll"):
            path = path.removesuffix(suffix)
        http = f"{'https' if secure else 'http'}://{parts.netloc}{path}/connection"
        ws = f"{'wss' if secure else 'ws'}://{parts.netloc}{path}/connection"
        return cls(f"{ws}/websocket", f"{http}/sse", f"{http}/poll", f"{http}/send")


class Link(abc.ABC):
    """One open connection to the hub over some transport.

    `receive` returns frames in the order the server produced them (replies in-stream with
    publications, so a join's reply is applied before the publications it announces);
    `send` hands one command to the server, in call order. Both raise `LinkClosed` when the
    link is gone. Any sign of life (a frame, an SSE heartbeat, a poll response) pushes back
    `watch`'s deadline: the reader uses it to notice a stall.
    """

    transport: ClassVar[str]

    def __init__(self, stall_timeout: float) -> None:
        self.stall_timeout = stall_timeout
        self.watch: trio.CancelScope | None = None
        self.broken = trio.Event()
        """Set when a send failed (or `drop_connection()`): the session ends."""
        self.broken_as = Outcome.CLOSED
        self.frames = 0
        """Frames the reader took from this link."""
        self.closed = False
        self.opening_channel: str | None = None
        """HTTP sessions: the channel it was opened with, left once it is up."""
        self.ended_as: Outcome | None = None
        self.closed_by: LinkClosed | None = None
        """The server's close (with its code), as soon as the link has read it."""
        self._sends: set[trio.CancelScope] = set()

    def alive(self) -> None:
        if self.watch is not None:
            self.watch.deadline = trio.current_time() + self.stall_timeout

    def break_(self, outcome: Outcome = Outcome.CLOSED) -> None:
        if not self.broken.is_set():
            self.broken_as = outcome
            self.broken.set()

    async def send(self, frame: bytes) -> None:
        if self.closed:
            raise LinkClosed("the link is closed")
        with trio.CancelScope() as scope:
            self._sends.add(scope)
            try:
                await self._send(frame)
            except LinkClosed:
                self.break_()
                raise
            finally:
                self._sends.discard(scope)
        if scope.cancelled_caught:
            raise LinkClosed("the link closed while sending")

    def close(self) -> None:
        """Stops sends in flight (they raise `LinkClosed`); the opener frees the rest."""
        self.closed = True
        for scope in self._sends:
            scope.cancel()

    @abc.abstractmethod
    async def _send(self, frame: bytes) -> None:
        """Writes one command frame (each link's own transport)."""

    @abc.abstractmethod
    async def receive(self) -> Any:
        """The next frame from the server, decoded; `LinkClosed` once the link is gone."""


def decode(data: str | bytes) -> Any:
    try:
        frame = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise LinkClosed("the server sent a frame that is not JSON") from None
    if not isinstance(frame, dict):
        raise LinkClosed("the server sent a frame that is not a JSON object")
    return frame


LINK_ERRORS = (
    LinkClosed,
    OSError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)
"""Errors that mean "this transport did not work this time", from opening or closing a link.
Each link's opener raises these only (a library's own errors become `LinkClosed`)."""
