"""pyrt: a pluggable realtime framework for Python with a Rust core."""

from ._core import Matcher as Matcher
from ._core import RowEvent as RowEvent
from ._core import __version__ as __version__
from ._core import check_channel as check_channel
from ._core import parse_filter as parse_filter
from ._errors import ChannelNameError as ChannelNameError
from ._errors import FilterError as FilterError
from .conflict import HybridClock as HybridClock
from .conflict import Mutation as Mutation
from .conflict import Record as Record
from .conflict import Rejection as Rejection
from .conflict import Timestamp as Timestamp
from .hub.history import Publication as Publication
from .hub.history import StreamPosition as StreamPosition
from .hub.hub import Hub as Hub
from .hub.hub import HubConfig as HubConfig
from .hub.outbox import SlowConsumerPolicy as SlowConsumerPolicy
from .hub.protocol import CloseCode as CloseCode
from .hub.protocol import ErrorCode as ErrorCode
from .node.config import NodeConfig as NodeConfig
from .node.http import HttpError as HttpError
from .node.http import HttpExchange as HttpExchange
from .node.http import HttpRequest as HttpRequest
from .node.node import Node as Node
from .node.plugins import Source as Source
from .node.plugins import Transport as Transport
from .node.session import Session as Session
from .node.sources import SourceError as SourceError

__all__ = [
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
    "__version__",
    "check_channel",
    "parse_filter",
]
