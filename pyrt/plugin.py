"""The plugin API: everything a transport or source plugin uses, built-in ones included.

A plugin imports from this module only (and from `pyrt.postgres` if it speaks to Postgres);
nothing in `pyrt.hub` or `pyrt.node`, no private `pyrt._*` module, and never the hub itself.
docs/plugins.md is the guide, with a worked transport and a worked source.

- **Transports** (`Transport`, entry point group `pyrt.transports`) serve HTTP exchanges the
  node routes to them, through a `TransportContext`; each client connection is a `Session`.
  A transport with background work is also a `BackgroundTransport`.
- **Sources** (`Source`, entry point group `pyrt.sources`) publish through a `SourceContext`.
  Optional parts: `OwnsChannels` (channels clients may not write to) and `ReportsLag`.
- The conformance kits are in `pyrt.testing` (`check_transport`, `check_source`).
- **Authentication** (docs/auth.md): a transport asks `TransportContext.authenticate(request)`
  who a client is before it opens its session (`open_session(identity=...)`), and checks
  `check_origin` before a WebSocket upgrade. The application's `authorize` hook (`Authorize`)
  is given to the node: `Node(config, authorize=hook)`.

Versioning: `API_VERSION` is (major, minor). Within a major version, names here keep their
meaning and signatures; minor versions only add. Plugin loading does not check it: a plugin
that needs a newer minor version checks `API_VERSION` itself and says so.
"""

from __future__ import annotations

from ._core import Matcher, check_channel
from ._errors import ChannelNameError, FilterError
from ._json import MAX_DEPTH as JSON_MAX_DEPTH
from ._json import JsonError
from ._json import depth_exceeds as json_depth_exceeds
from ._json import loads as json_loads
from ._json import too_deep_message as json_too_deep_message
from .hub.history import Publication, Recovery, StreamPosition
from .hub.hub import _is_pattern as is_pattern
from .hub.identity import ANONYMOUS, Action, Identity
from .hub.limits import Admission
from .hub.presence import PresenceDiff, PresenceMeta
from .hub.protocol import (
    MAX_ROW_SUBSCRIPTIONS,
    TABLE_CHANNEL_PREFIX,
    CloseCode,
    Command,
    ErrorCode,
    Join,
    JsonCodec,
    Leave,
    Publish,
    RequestId,
    RowSubscription,
    Track,
    Untrack,
    table_channel,
)
from .node.auth import AuthError
from .node.context import SocketRate, SourceContext, TransportContext
from .node.gate import Authorize
from .node.http import HttpError, HttpExchange, HttpRequest, bearer_token
from .node.io import WriteTimeout, is_disconnect
from .node.options import integer as check_integer
from .node.options import seconds as check_seconds
from .node.plugins import BackgroundTransport, OwnsChannels, ReportsLag, Source, Transport
from .node.session import Session
from .node.sources import SourceError

API_VERSION = (1, 1)
"""The plugin API's version (major, minor): see the module's docstring."""

__all__ = [
    "ANONYMOUS",
    "API_VERSION",
    "JSON_MAX_DEPTH",
    "MAX_ROW_SUBSCRIPTIONS",
    "TABLE_CHANNEL_PREFIX",
    "Action",
    "Admission",
    "AuthError",
    "Authorize",
    "BackgroundTransport",
    "ChannelNameError",
    "CloseCode",
    "Command",
    "ErrorCode",
    "FilterError",
    "HttpError",
    "HttpExchange",
    "HttpRequest",
    "Identity",
    "Join",
    "JsonCodec",
    "JsonError",
    "Leave",
    "Matcher",
    "OwnsChannels",
    "PresenceDiff",
    "PresenceMeta",
    "Publication",
    "Publish",
    "Recovery",
    "ReportsLag",
    "RequestId",
    "RowSubscription",
    "Session",
    "SocketRate",
    "Source",
    "SourceContext",
    "SourceError",
    "StreamPosition",
    "Track",
    "Transport",
    "TransportContext",
    "Untrack",
    "WriteTimeout",
    "bearer_token",
    "check_channel",
    "check_integer",
    "check_seconds",
    "is_disconnect",
    "is_pattern",
    "json_depth_exceeds",
    "json_loads",
    "json_too_deep_message",
    "table_channel",
]
