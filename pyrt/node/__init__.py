"""The trio runtime around the hub: the front door, sessions, plugin contexts, the REST API
and metrics. `Node` owns the nursery, the clock and every socket."""

from .config import NodeConfig
from .node import Node
from .session import Session

__all__ = ["Node", "NodeConfig", "Session"]
