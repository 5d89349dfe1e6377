"""One client connection as the hub sees it, and its joins."""

from __future__ import annotations

import enum
from typing import Any

import attrs

from .identity import ANONYMOUS, Action, Identity
from .limits import CommandRate
from .outbox import Outbox
from .protocol import CloseCode, JsonCodec


@attrs.define(slots=True, eq=False)
class ChannelJoin:
    """A connection's join of one channel (or pattern)."""

    sub_id: int
    presence: bool
    tracked_keys: set[str] = attrs.field(factory=set)
    """Presence keys this connection tracked in the channel, untracked when it leaves."""
    row_ids: tuple[int, ...] = ()
    """A join with `changes`: its row subscriptions' ids (it gets only the row events they
    match, not the channel's other publications)."""


@attrs.define(slots=True, eq=False)
class Connection:
    """One client connection as the hub sees it."""

    id: str
    codec: JsonCodec
    outbox: Outbox
    opened: float
    last_seen: float
    last_ping: float
    transport: str = "websocket"
    """The transport plugin's name (for metrics)."""
    idle_timeout: float | None = None
    """Close after this long without a sign of life; None: the transport watches liveness."""
    pings: bool = True
    """Whether the hub sends `ping` pushes (transports with their own heartbeats say no)."""
    joins: dict[str, ChannelJoin] = attrs.field(factory=dict)
    closing: CloseCode | None = None
    told_to_go: bool = False
    """A `disconnect` push was queued (at shutdown)."""
    handle: int = -1
    """The connection's handle in the hub's Rust fan-out."""
    direct: bool = False
    """A socket is attached: the fan-out may write publications to it directly."""
    rate: CommandRate | None = None
    """The connection's command rate (None: no limit)."""
    identity: Identity = ANONYMOUS
    """Who it is (the token it brought); the channel rules decide what it may do."""
    pending: bool = False
    """Opened without a token: nothing but a `connect` command is taken until one comes."""
    grants: dict[tuple[Action, str], Any] = attrs.field(factory=dict)
    """The channel rules' answers for this identity, by (action, channel): a publish asks
    the rules once per channel, not once per message."""
    refresh_asked: bool = False
    """A `refresh` push went out for the current token."""


class _Default(enum.Enum):
    """The type of `DEFAULT`: "what the config says" where None means something else."""

    DEFAULT = enum.auto()


DEFAULT = _Default.DEFAULT
