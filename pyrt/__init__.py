"""pyrt: a pluggable realtime framework for Python with a Rust core."""

from ._core import Matcher as Matcher
from ._core import RowEvent as RowEvent
from ._core import __version__ as __version__
from ._core import check_channel as check_channel
from ._core import parse_filter as parse_filter
from ._errors import ChannelNameError as ChannelNameError
from ._errors import FilterError as FilterError
from ._history import Publication as Publication
from ._history import StreamPosition as StreamPosition
from ._http import HttpError as HttpError
from ._http import HttpExchange as HttpExchange
from ._http import HttpRequest as HttpRequest
from ._hub import Hub as Hub
from ._hub import HubConfig as HubConfig
from ._node import Node as Node
from ._node import NodeConfig as NodeConfig
from ._node import Session as Session
from ._node import Transport as Transport
from ._outbox import SlowConsumerPolicy as SlowConsumerPolicy
from ._pgwire import PgAuthError as PgAuthError
from ._pgwire import PgConnection as PgConnection
from ._pgwire import PgConnectionError as PgConnectionError
from ._pgwire import PgError as PgError
from ._protocol import CloseCode as CloseCode
from ._protocol import ErrorCode as ErrorCode
from ._sources import Source as Source
from ._sources import SourceError as SourceError
from .conflict import HybridClock as HybridClock
from .conflict import Mutation as Mutation
from .conflict import Record as Record
from .conflict import Rejection as Rejection
from .conflict import Timestamp as Timestamp
from .plugins._postgres import PgOptions as PgOptions
from .plugins.notify import CatchUp as CatchUp
from .plugins.notify import NotifySource as NotifySource
from .plugins.wal import WalSource as WalSource

__all__ = [
    "CatchUp",
    "ChannelNameError",
    "CloseCode",
    "ErrorCode",
    "FilterError",
    "HttpError",
    "HttpExchange",
    "HttpRequest",
    "Hub",
    "HubConfig",
    "HybridClock",
    "Matcher",
    "Mutation",
    "Node",
    "NodeConfig",
    "NotifySource",
    "PgAuthError",
    "PgConnection",
    "PgConnectionError",
    "PgError",
    "PgOptions",
    "Publication",
    "Record",
    "Rejection",
    "RowEvent",
    "Session",
    "SlowConsumerPolicy",
    "Source",
    "SourceError",
    "StreamPosition",
    "Timestamp",
    "Transport",
    "WalSource",
    "__version__",
    "check_channel",
    "parse_filter",
]
