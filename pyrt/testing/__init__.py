"""Conformance kit for plugin authors.

A transport plugin passes when `check_transport` passes with it: the same checks every
built-in transport's tests run (in the spirit of `trio.testing.check_two_way_stream`).

```python
from pyrt.testing import check_transport

async def test_my_transport():
    await check_transport(MyTransport, open_my_client)
```

`open_client(node)` is an async context manager yielding a `TransportClient` for one
connection to `node` over your transport: it sends native-protocol commands and returns the
frames the server sends (docs/protocol.md), and reports how the server closed it. Leaving it
ends the connection the way a client of your transport does when it is done.

The checks: joins, publications and replies in order; awkward payloads (every kind of line
break, NUL, astral characters, 10 KB) arriving unchanged; resuming with and without history;
presence, including the leave of a client that went away; the channel, payload and frame
limits (1009) and bad input (4000), each hurting only its own connection; the hub forgetting
clients that left; and, last, a shutdown: `disconnect`, then the end, and `Node.run` returning
once the transport let go of every session. HTTP transports whose clients join channels when
they open say how many with `joins_on_open` (the SSE and long-poll tests do).

A transport whose protocol is not the native one passes the same checks through a client that
translates (a dialect): `SupabaseKitClient` turns the kit's commands into Phoenix messages and
the Supabase transport's frames back. What a protocol cannot express at all is declared, not
guessed: `check_transport(..., capabilities=...)` skips the checks that need a `Capability`
the transport lacks and returns their names, so the test pins them (`SUPABASE_CAPABILITIES`).

A source plugin passes when `check_source` passes with it:

```python
from pyrt.testing import check_source

async def test_my_source():
    await check_source(lambda: MySource(...), make_it_emit, channel="db:orders")
```
`produce(values)` makes the source emit one event per string, in order (for the NOTIFY
source: one NOTIFY each); `value(data)` takes the string back out of what the source
published. The checks: the node starts with the source; its events are published on
`channel`, in order and unchanged; an event the source cannot publish (the kit makes
publishing fail once) is logged, counted in `node.metrics.source_events_skipped[name]` and
skipped, and the next event is published (one bad event never stops a source, nor the
node); and a node stops with the source running, promptly.

A storage engine (`Broker`, `PresenceManager` and `RecordStorage` in one object: a
`StorageEngine`, as `Hub(broker=...)` takes) passes when `check_broker` passes with it:

```python
from pyrt.testing import check_broker

def test_my_engine():
    check_broker(lambda config: MyEngine(config))
```
`factory(config)` makes a fresh, empty engine with the history limits of `config` (a
`HubConfig`). The checks are listed in `check_broker`'s docstring; `MemoryBroker`, the
default engine, passes them (`check_broker(MemoryBroker)`).

`Peer` drives a sans-IO `Hub` at the frame level, without sockets or trio: one client that
sends native-protocol commands and reads the frames queued for it (pyrt's own hub tests use
it; so can a plugin's tests of what it puts into a hub).
"""

from ..hub.broker import (
    Broker,
    MemoryBroker,
    PresenceManager,
    RecordStorage,
    RecordTable,
    StorageEngine,
)
from .auth import OPEN_RULES, TEST_SECRET, TestTokens, open_auth
from .brokers import BrokerFactory, check_broker
from .peer import Peer
from .sources import SourceKitFailure, check_source
from .supabase import SUPABASE_CAPABILITIES, PhoenixSocket, SupabaseKitClient
from .transports import (
    KIT_HUB,
    Capability,
    ClientFactory,
    Closed,
    TransportClient,
    check_transport,
)

__all__ = [
    "KIT_HUB",
    "OPEN_RULES",
    "SUPABASE_CAPABILITIES",
    "TEST_SECRET",
    "Broker",
    "BrokerFactory",
    "Capability",
    "ClientFactory",
    "Closed",
    "MemoryBroker",
    "Peer",
    "PhoenixSocket",
    "PresenceManager",
    "RecordStorage",
    "RecordTable",
    "SourceKitFailure",
    "StorageEngine",
    "SupabaseKitClient",
    "TestTokens",
    "TransportClient",
    "check_broker",
    "check_source",
    "check_transport",
    "open_auth",
]
