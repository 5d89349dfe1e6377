"""Who a connection is: the identity its token proved (or an anonymous one). Sans-IO.

The node verifies tokens (`pyrt.node.auth`) and hands the hub an `Identity`; the hub's channel
rules (`pyrt.hub.rules`) decide what that identity may do on which channel (docs/auth.md).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import attrs


class Action(enum.Enum):
    """What a client asks to do on a channel, as channel rules and `authorize` hooks name it."""

    SUBSCRIBE = "subscribe"
    """Join the channel (or a pattern of channels): receive its publications and row events."""
    PUBLISH = "publish"
    PRESENCE = "presence"
    """Track a presence entry, or read the channel's presence."""
    HISTORY = "history"
    """Resume from a position (`since`): receive what it missed."""
    MUTATE = "mutate"
    """Change a record of a records channel."""


@attrs.frozen(slots=True)
class Identity:
    """A connection's identity. `user` is the token's `sub` ("" when anonymous); `claims`
    all of the verified token's claims (read them, do not change them); `expires` its `exp`
    as wall-clock seconds (None: never); `jti` its id, for revocation; `channels` the
    channels its `channels` claim joins the connection to."""

    user: str = ""
    claims: Mapping[str, Any] = attrs.field(factory=dict, eq=False)
    anonymous: bool = True
    expires: float | None = None
    jti: str | None = None
    channels: tuple[str, ...] = ()

    @property
    def role(self) -> str | None:
        """The `role` claim, when it is a string (Supabase's tokens carry one)."""
        role = self.claims.get("role")
        return role if isinstance(role, str) else None


ANONYMOUS = Identity()
"""The identity of a connection without a token (where anonymous access is allowed)."""
