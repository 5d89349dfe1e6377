"""`connect`: a `Client` that is connected for the length of an `async with` block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ._errors import ConnectionLost
from ._session import Client


@asynccontextmanager
async def connect(url: str, *, timeout: float = 10.0, **options: Any) -> AsyncIterator[Client]:
    """Connects to a hub (trying for up to `timeout` seconds, else ConnectionLost) and keeps
    connected until the block ends. Options go to `Client`."""
    client = Client(url, **options)
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.move_on_after(timeout):
                await nursery.start(client._run)
                connected = True
            if connected:
                try:
                    yield client
                finally:
                    client._close()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The client's own task ends by cancellation, or by raising its failure (an
        # `AuthenticationError`, which its requests in flight raise too): a group holds
        # that, or the caller's exception. Raise it as itself, not wrapped.
        failure = client._failure
        if failure is not None and all(e is failure for e in group.exceptions):
            raise failure from None
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    if not connected:
        raise ConnectionLost(f"could not connect to {url} in {timeout:g} s")
