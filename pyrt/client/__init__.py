"""The pyrt client for trio: join channels, publish, track presence, never lose a message.

```python
import trio
from pyrt.client import connect

async def main():
    async with connect("http://127.0.0.1:8000", token=TOKEN) as client:
        room = await client.join("room:1")
        await room.publish({"text": "hello"})
        async for message in room:
            print(message.offset, message.data)

trio.run(main)
```

The client reconnects by itself (exponential backoff with jitter) and rejoins every channel
with `since` set to the last offset it delivered, so messages published while it was away
arrive in order, once each. When the server no longer has them, `Channel.recovered` turns
False and `Channel.on_reset` callbacks run: reload your state, then carry on.

`token=` is the connection's JWT (sent in a WebSocket's first `connect` command, or as
`Authorization: Bearer` when an SSE or long-poll session opens); `token_provider=`, an async
function returning one, is called before each connection and whenever the server asks for a
refresh before the token expires. A token the server refuses, or lets expire, with no new
one to try, and a connection the server ends on purpose (4403), stop the client with
`AuthenticationError`, raised out of the `async with` block. See `Client`.

Records channels (`client.records(name)`) hold keyed records with optimistic updates: the
view changes at once, the server confirms or rejects, and writes survive reconnects (re-sent
with idempotency keys, applied at most once). See docs/conflicts.md.

```python
todos = await client.records("todos:42")
todos.patch("t1", {"done": True})     # the view shows it now
result = await todos.set("t2", {"title": "milk"})     # or wait for the server's verdict
print(result.outcome, todos.view)
```

It speaks the native protocol over WebSocket, SSE or long-poll, in the order given by
`transports`: a transport that cannot be opened, or that goes silent for `stall_timeout`, is
left for the next one. The request/reply/push logic is the same over all three; a transport is
only a *link* that sends commands and yields frames in order.

The package, arrows pointing down: `_connect` (`connect`) -> `_session` (`Client`: reconnects,
fallback, probes, rejoins) -> `_channels` (`Channel`, `Records`, `Write`, `Message`) and the
links: `_websocket` (on wsproto), `_http` (SSE and long-poll, on httpx), both on
`_link` (what a link is, and how a session on one can end). `_errors` is at the bottom.
"""

from __future__ import annotations

from ._channels import Channel as Channel
from ._channels import Message as Message
from ._channels import Records as Records
from ._channels import Write as Write
from ._connect import connect as connect
from ._errors import AuthenticationError as AuthenticationError
from ._errors import ClientError as ClientError
from ._errors import ConnectionLost as ConnectionLost
from ._errors import Unsubscribed as Unsubscribed
from ._session import TRANSPORTS as TRANSPORTS
from ._session import Client as Client

__all__ = [
    "TRANSPORTS",
    "AuthenticationError",
    "Channel",
    "Client",
    "ClientError",
    "ConnectionLost",
    "Message",
    "Records",
    "Unsubscribed",
    "Write",
    "connect",
]
