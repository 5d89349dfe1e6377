"""What a plugin provides: the protocols of transports and sources (`pyrt.plugin` re-exports
them). Optional parts are protocols of their own, checked with `isinstance`, so nothing is
found by probing attribute names."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    from .context import SourceContext, TransportContext
    from .http import HttpExchange, HttpRequest


class Transport(Protocol):
    """What a transport plugin provides. Register a factory returning one under the
    `pyrt.transports` entry point group; the built-in transports register the same way."""

    name: str

    def claims(self, request: HttpRequest) -> bool:
        """Whether this transport serves `request`."""
        ...

    async def serve(self, ctx: TransportContext, exchange: HttpExchange) -> None:
        """Serves `exchange.request` to its end: a whole connection for an upgrade (use
        `exchange.stream` and `exchange.trailing`), or one response (`exchange.respond`, or
        `start_stream`/`send`/`end_stream`). Raise `HttpError` for an error response. The
        node reuses the connection if the response ended cleanly, else closes it."""
        ...


@runtime_checkable
class BackgroundTransport(Protocol):
    """A transport whose work outlives its requests (long-poll sessions live between polls):
    its `run` runs under the node's nursery, started (and `task_status.started()` awaited)
    before the node accepts connections, cancelled when the node has drained."""

    async def run(self, ctx: TransportContext, *, task_status: trio.TaskStatus[None]) -> None: ...


class Source(Protocol):
    """What a source plugin provides. Register a factory returning one under the
    `pyrt.sources` entry point group; the built-in sources register the same way.

    `run` produces events through `ctx` until cancelled and calls `task_status.started()`
    once it is live. It handles the outages it expects (reconnect with backoff); an event it
    cannot decode or publish it reports with `ctx.skip` and goes on; anything else it raises,
    and the node stops with that error rather than run on without the source."""

    name: str

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None: ...


@runtime_checkable
class OwnsChannels(Protocol):
    """A source that says which channels it feeds (channel patterns: the WAL source `pg:>`).
    The node reads it once, when it is made, and makes those channels read-only to clients
    (error 423 `read_only`), so nobody can pass an event off as the source's."""

    @property
    def owned_channels(self) -> Sequence[str]: ...


@runtime_checkable
class ReportsLag(Protocol):
    """A source that knows how far behind its upstream it is (`/metrics`:
    `pyrt_source_lag_bytes`, `pyrt_source_lag_seconds`)."""

    @property
    def lag_bytes(self) -> int: ...

    @property
    def lag_seconds(self) -> float: ...
