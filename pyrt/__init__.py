"""pyrt: a pluggable realtime framework for Python with a Rust core."""

from ._core import Matcher as Matcher
from ._core import RowEvent as RowEvent
from ._core import __version__ as __version__
from ._core import check_channel as check_channel
from ._core import parse_filter as parse_filter
from ._errors import ChannelNameError as ChannelNameError
from ._errors import FilterError as FilterError

__all__ = [
    "ChannelNameError",
    "FilterError",
    "Matcher",
    "RowEvent",
    "__version__",
    "check_channel",
    "parse_filter",
]
