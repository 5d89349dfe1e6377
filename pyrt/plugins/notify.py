"""The NOTIFY source: PostgreSQL `NOTIFY` on mapped channels, published to pyrt channels.

```toml
[sources.notify]
host = "127.0.0.1"
port = 5432
user = "app"
password_env = "PGPASSWORD"       # or password = "..."
database = "app"
channels = { orders = "db:orders", "Audit" = { channel = "audit:all", event = "audit" } }
catch_up = "myapp.realtime:catch_up"   # optional, see below
```
`NOTIFY orders, '{"id": 42}'` publishes `{"event": "orders", "payload": {"id": 42}}` on
`db:orders`: the payload as JSON when it parses as JSON (else the text; `json = false`:
always the text), and the event name (default: the Postgres channel's name).

Postgres forgets notifications for sessions that are not listening: whatever is sent while
the source is reconnecting is gone. So after each (re)connect, once LISTEN is in place, the
source calls the catch-up hook, which can query what changed and publish it
(`CatchUp.publish`). Anything committed after LISTEN arrives as a notification, anything
before is the hook's to find: an event may come twice, never not at all.

Outages (the server restarting, the network) are retried with exponential backoff and
jitter, forever; an idle connection is checked with `SELECT 1` every `ping_interval`. At
startup the node waits for the first connection (up to `startup_timeout`), and a wrong
password or database name stops it with a `SourceError` instead of retrying. docs/sources.md
has the details (the 8000-byte limit, transactions, the "send the row id" pattern).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from ..plugin import JsonError, SourceContext, check_channel, check_seconds, json_loads
from ..postgres import PgConnection, PgConnectionError, PgError, PgOptions

__all__ = ["CatchUp", "NotifySource", "Route"]

log = logging.getLogger("pyrt.sources.notify")

MAX_CHANNEL_BYTES = 63
"""Postgres truncates longer identifiers (NAMEDATALEN - 1), so a longer name never matches."""


@attrs.frozen(slots=True)
class Route:
    """Where notifications on one Postgres channel go."""

    channel: str
    """The pyrt channel."""
    event: str
    """The `event` field of what is published."""


@attrs.frozen(slots=True, eq=False)
class CatchUp:
    """What the catch-up hook gets, after each (re)connect, once LISTEN is in place."""

    source: NotifySource
    ctx: SourceContext
    connection: PgConnection
    """The listening connection: query with it (notifications that arrive meanwhile wait)."""
    reconnect: bool
    """False the first time, True after an outage (when notifications may have been lost)."""

    async def publish(self, pg_channel: str, payload: Any) -> None:
        """Publishes `payload` as a notification on `pg_channel` would be (same channel,
        same `{"event", "payload"}` shape)."""
        await self.source.publish(self.ctx, pg_channel, payload)


CatchUpHook = Callable[[CatchUp], Awaitable[None] | None]


def _routes(channels: object) -> dict[str, Route]:
    if not isinstance(channels, Mapping) or not channels:
        raise TypeError(
            'channels must be a non-empty table of Postgres channel = "pyrt channel"'
            f" (or = {{ channel = ..., event = ... }}), not {channels!r}"
        )
    routes = {}
    for pg_channel, target in channels.items():
        if not isinstance(pg_channel, str) or not pg_channel:
            raise ValueError(f"channels: {pg_channel!r} is not a Postgres channel name")
        if len(pg_channel.encode()) > MAX_CHANNEL_BYTES or "\0" in pg_channel:
            raise ValueError(
                f"channels: Postgres channel {pg_channel!r} is longer than 63 bytes"
                " (Postgres would truncate it)"
            )
        channel: object
        event: object
        if isinstance(target, str):
            channel, event = target, pg_channel
        elif isinstance(target, Mapping) and set(target) <= {"channel", "event"}:
            channel, event = target.get("channel"), target.get("event", pg_channel)
        else:
            raise TypeError(
                f'channels.{pg_channel}: expected "pyrt channel" or'
                f" {{ channel = ..., event = ... }}, not {target!r}"
            )
        if not isinstance(channel, str) or not isinstance(event, str):
            raise TypeError(f"channels.{pg_channel}: channel and event must be strings")
        try:
            check_channel(channel)
        except ValueError as e:
            raise ValueError(
                f"channels.{pg_channel}: {channel!r} is not a pyrt channel: {e}"
            ) from None
        routes[pg_channel] = Route(channel, event)
    return routes


def _hook(value: object) -> CatchUpHook | None:
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"catch_up must be a dotted path or a callable, not {value!r}")
    module_name, colon, attr = value.partition(":")
    if not colon:
        module_name, _, attr = value.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"catch_up: {value!r} is not a path like 'package.module:function'")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"catch_up: cannot import {value!r}: {e}") from None
    if not callable(found):
        raise TypeError(f"catch_up: {value!r} is not callable")
    return found  # type: ignore[no-any-return]


class NotifySource:
    """LISTENs on the mapped channels and publishes each notification; see the module."""

    name = "notify"

    def __init__(
        self,
        *,
        channels: Mapping[str, str | Mapping[str, str]],
        json: bool = True,
        catch_up: str | CatchUpHook | None = None,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
        **connection: Any,
    ) -> None:
        self.routes = _routes(channels)
        connection.setdefault("application_name", "pyrt-notify")
        self.pg = PgOptions(**connection)
        """Where and how to connect, and the reconnect backoff (the options every Postgres
        source shares: host, port, user, password(_env), database, ssl, ...)."""
        if not isinstance(json, bool):
            raise TypeError(f"json must be true or false, not {json!r}")
        self.json = json
        self.catch_up = _hook(catch_up)
        self.ping_interval = check_seconds("ping_interval", ping_interval)
        self.ping_timeout = check_seconds("ping_timeout", ping_timeout)
        self.random = random.Random()
        self.connected = False
        """Whether the source is listening right now."""
        self.connects = 0
        """Successful connections so far (more than one: it reconnected)."""
        self.last_error: Exception | None = None
        """Why the last connection ended or failed."""

    @property
    def owned_channels(self) -> tuple[str, ...]:
        """The pyrt channels notifications are published on, read-only to clients."""
        return tuple(sorted({route.channel for route in self.routes.values()}))

    def __repr__(self) -> str:
        return f"<NotifySource {self.name} {self.pg.where()}>"

    # -- publishing --------------------------------------------------------------------

    def payload(self, text: str) -> Any:
        """The published form of a notification's payload: JSON if it parses, else text."""
        if self.json:
            try:
                return json_loads(text)
            except JsonError:  # not JSON, or too deep to publish: as text
                pass
        return text

    async def publish(self, ctx: SourceContext, pg_channel: str, payload: Any) -> None:
        route = self.routes.get(pg_channel)
        if route is None:
            raise KeyError(f"{pg_channel!r} is not one of the source's channels")
        await ctx.publish(route.channel, {"event": route.event, "payload": payload})

    # -- running -------------------------------------------------------------------------

    async def connect(self) -> PgConnection:
        return await self.pg.connect()

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        deadline = trio.current_time() + self.pg.startup_timeout
        attempt = 0
        while True:
            delay = 0.0
            try:
                conn = await self.connect()
                async with conn:
                    await conn.listen(*self.routes)
                    await self._catch_up(ctx, conn, reconnect=started)
                    self.connected = True
                    self.connects += 1
                    if started:
                        log.info("%s: listening again on %s", self.name, conn.address)
                    else:
                        started = True
                        task_status.started()
                    attempt = 0
                    await self._relay(ctx, conn)
            except (PgError, PgConnectionError, trio.TooSlowError) as e:
                self.last_error = e
                delay = self.pg.retry_delay(
                    self.name,
                    e,
                    attempt,
                    self.random,
                    started=started,
                    deadline=deadline,
                )
                attempt += 1
                log.warning("%s: %s; retrying in %.1f s", self.name, e, delay)
            finally:
                self.connected = False
            await trio.sleep(delay)

    async def _catch_up(self, ctx: SourceContext, conn: PgConnection, *, reconnect: bool) -> None:
        if self.catch_up is not None:
            result = self.catch_up(CatchUp(self, ctx, conn, reconnect))
            if inspect.isawaitable(result):
                await result

    async def _relay(self, ctx: SourceContext, conn: PgConnection) -> None:
        while True:
            with trio.move_on_after(self.ping_interval) as idle:
                notification = await conn.next_notification()
            if idle.cancelled_caught:
                with trio.fail_after(self.ping_timeout):
                    await conn.simple_query("SELECT 1")  # is the link still there?
                continue
            if notification.channel in self.routes:
                try:
                    payload = self.payload(notification.payload)
                    await self.publish(ctx, notification.channel, payload)
                except Exception as e:  # one bad notification does not stop the source
                    ctx.skip("cannot publish a notification", e)
