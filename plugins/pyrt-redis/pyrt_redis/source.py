"""The Redis source: Redis pub/sub and Redis streams, published on pyrt channels.

```toml
[sources.redis]
host = "127.0.0.1"
port = 6379
password_env = "REDIS_PASSWORD"      # or password = "...", and username for an ACL user
channels = { orders = "redis:orders" }           # SUBSCRIBE orders
patterns = { "audit.*" = "redis:audit" }         # PSUBSCRIBE audit.*
streams = { "events" = "redis:events" }          # XREAD events
```

Pub/sub: `PUBLISH orders '{"id": 42}'` publishes `{"event": "orders", "payload": {"id": 42}}`
on `redis:orders` (for a pattern, `event` is the channel the message was published on). The
payload is JSON when it parses (depth-limited, `pyrt.plugin.json_loads`), else the text;
`json = false` keeps it text. Redis forgets messages sent while nobody is subscribed, so what
is published during an outage is gone, as with Postgres NOTIFY.

Streams: each entry (`XADD events * kind paid id 42`) publishes `{"stream": "events", "id":
"1700000000000-0", "fields": {"kind": "paid", "id": 42}}` on the stream's channel, each field's
value read as a payload is. Entries are read with XREAD from the last id published, so a
reconnect loses nothing and repeats nothing; the ids are the source's checkpoint, kept in
durable history (`[history] dir`) with the publications, so a restarted node resumes where
its history ends. Without a checkpoint, reading starts at the stream's end (`start =
"new"`) or its beginning (`start = "all"`). A stream trimmed past the source's position
(entries deleted before it read them) starts a new epoch on its channel: clients resuming
across it are told `recovered: false`.

An entry or message that cannot be published (not UTF-8, or refused by the hub) is skipped:
logged, counted in `pyrt_source_events_skipped_total`, never fatal. Outages are retried with
exponential backoff and jitter, forever; an idle connection is checked with PING every
`ping_interval`. At startup the node waits for the first connection (up to
`startup_timeout`); a wrong password, or a server error other than a connection problem,
stops it at once with a `SourceError` naming `sources.<name>`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import coredis
import coredis.exceptions
import trio
from coredis.response.types import StreamEntry
from coredis.retry import NoRetryPolicy

from pyrt.plugin import (
    JsonError,
    SourceContext,
    SourceError,
    check_channel,
    check_integer,
    check_seconds,
    json_loads,
)

__all__ = ["RedisSource"]

log = logging.getLogger("pyrt.sources.redis")

START = ("new", "all")
"""Where a stream without a checkpoint is read from: its end, or its beginning."""

RETRIED = (
    coredis.exceptions.ConnectionError,  # refused, lost, closed; the server loading its data
    TimeoutError,  # a subscription not acknowledged in time
    trio.TooSlowError,  # a PING or read not answered in time
    OSError,
    # coredis's pub/sub, cancelled or cut off, may find its connection closed (anyio streams)
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
    anyio.EndOfStream,
)
"""What an outage looks like: retried with backoff, before startup until startup_timeout."""

_STREAM_ID = re.compile(r"(?:b')?(\d+)-(\d+)'?")


def _mapping(option: str, value: object, what: str) -> dict[str, str]:
    """A `{redis name = "pyrt channel"}` table, checked."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f'{option} must be a table of {what} = "pyrt channel", not {value!r}')
    routes = {}
    for name, channel in value.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"{option}: {name!r} is not a {what}")
        if not isinstance(channel, str):
            raise TypeError(f'{option}.{name}: expected "pyrt channel", not {channel!r}')
        try:
            check_channel(channel)
        except ValueError as e:
            raise ValueError(f"{option}.{name}: {channel!r} is not a pyrt channel: {e}") from None
        routes[name] = channel
    return routes


def _optional_str(name: str, value: object) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise TypeError(f"{name} must be a non-empty string, not {value!r}")
    return value


def stream_id(text: str) -> tuple[int, int]:
    """A stream entry id (`"1700000000000-3"`) as (milliseconds, sequence); ValueError if it
    is not one."""
    match = _STREAM_ID.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a stream entry id")
    return int(match[1]), int(match[2])


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for e in error.exceptions for leaf in _leaves(e)]
    return [error]


def _retried(error: BaseException) -> bool:
    """Whether retrying may fix `error`: connection trouble, except a server certificate
    that does not verify."""
    return isinstance(error, RETRIED) and not isinstance(
        error.__cause__, ssl.SSLCertVerificationError
    )


class RedisSource:
    """Subscribes to Redis channels and patterns and reads Redis streams, publishing each
    message and entry on its pyrt channel; see the module."""

    name = "redis"

    def __init__(
        self,
        *,
        channels: Mapping[str, str] | None = None,
        patterns: Mapping[str, str] | None = None,
        streams: Mapping[str, str] | None = None,
        start: str = "new",
        json: bool = True,
        batch: int = 100,
        host: str = "127.0.0.1",
        port: int = 6379,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        password_env: str | None = None,
        ssl: bool = False,
        ssl_root_cert: str | None = None,
        client_name: str = "pyrt-redis",
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        connect_timeout: float = 10.0,
        startup_timeout: float = 30.0,
        ping_interval: float = 30.0,
        ping_timeout: float = 10.0,
    ) -> None:
        self.channels = _mapping("channels", channels, "Redis channel")
        self.patterns = _mapping("patterns", patterns, "Redis channel pattern")
        self.streams = _mapping("streams", streams, "Redis stream key")
        """Redis name -> pyrt channel, for each kind."""
        if not (self.channels or self.patterns or self.streams):
            raise ValueError("give at least one of channels, patterns and streams")
        if start not in START:
            raise ValueError(f'start must be "new" or "all", not {start!r}')
        self.start = start
        if not isinstance(json, bool):
            raise TypeError(f"json must be true or false, not {json!r}")
        self.json = json
        self.batch = check_integer("batch", batch, 1)
        if not isinstance(host, str) or not host:
            raise TypeError(f"host must be a non-empty string, not {host!r}")
        self.host = host
        self.port = check_integer("port", port, 1)
        if self.port > 65535:
            raise ValueError(f"port must be at most 65535, not {port}")
        self.db = check_integer("db", db, 0)
        self.username = _optional_str("username", username)
        self.password = _optional_str("password", password)
        self.password_env = _optional_str("password_env", password_env)
        if password is not None and password_env is not None:
            raise ValueError("give password or password_env, not both")
        if not isinstance(ssl, bool):
            raise TypeError(f"ssl must be true or false, not {ssl!r}")
        self.ssl_root_cert = _optional_str("ssl_root_cert", ssl_root_cert)
        self.ssl = ssl or self.ssl_root_cert is not None
        if not isinstance(client_name, str) or not client_name or " " in client_name:
            raise ValueError(
                f"client_name must be a non-empty string without spaces, not {client_name!r}"
            )
        self.client_name = client_name
        self.reconnect_min = check_seconds("reconnect_min", reconnect_min)
        self.reconnect_max = check_seconds("reconnect_max", reconnect_max)
        if self.reconnect_max < self.reconnect_min:
            raise ValueError(
                f"reconnect_max ({reconnect_max}) must not be less than reconnect_min"
                f" ({reconnect_min})"
            )
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self.startup_timeout = check_seconds("startup_timeout", startup_timeout)
        self.ping_interval = check_seconds("ping_interval", ping_interval)
        self.ping_timeout = check_seconds("ping_timeout", ping_timeout)

        self.random = random.Random()
        self.positions: dict[str, str] | None = None
        """Each stream's last entry id handled (published or skipped); None before the first
        connection."""
        self.connected = False
        """Whether the source is subscribed and reading right now."""
        self.connects = 0
        """Successful connections so far (more than one: it reconnected)."""
        self.last_error: BaseException | None = None
        """Why the last connection ended or failed."""
        self.gaps = 0
        """Times a stream had been trimmed past the source's position (a new epoch each)."""
        self._lag_bytes = 0
        self._lag_seconds = 0.0
        self._read: set[str] = set()
        """The streams whose position is an entry the source read (not where it started)."""

    def __repr__(self) -> str:
        return f"<RedisSource {self.name} {self.where()}>"

    def where(self) -> str:
        user = f", user {self.username!r}" if self.username else ""
        return f"Redis at {self.host}:{self.port}, db {self.db}{user}"

    @property
    def owned_channels(self) -> tuple[str, ...]:
        """The pyrt channels the source publishes on, read-only to clients (OwnsChannels)."""
        routes = (self.channels, self.patterns, self.streams)
        return tuple(sorted({channel for route in routes for channel in route.values()}))

    @property
    def lag_bytes(self) -> int:
        """Bytes of stream entries read from Redis and not yet in history (ReportsLag)."""
        return self._lag_bytes

    @property
    def lag_seconds(self) -> float:
        """While a batch of stream entries is being published, how long ago the entry at
        hand was added (from its id; the clocks of Redis and this machine); between batches,
        how long the last entry took from XADD to history."""
        return self._lag_seconds

    # -- decoding --------------------------------------------------------------------------

    def value(self, data: bytes) -> Any:
        """A payload or field value as published: JSON if it parses (and `json`), else the
        text. UnicodeDecodeError if it is not UTF-8."""
        text = data.decode()
        if self.json:
            try:
                return json_loads(text)
            except JsonError:  # not JSON, or too deep: as text
                pass
        return text

    # -- running ---------------------------------------------------------------------------

    def _password(self) -> str | None:
        if self.password_env is None:
            return self.password
        password = os.environ.get(self.password_env)
        if password is None:
            raise SourceError(
                f"sources.{self.name}: the environment variable {self.password_env} (password_env)"
                " is not set"
            )
        return password

    @asynccontextmanager
    async def client(self) -> AsyncIterator[coredis.Redis[bytes]]:
        """A connected client, its credentials checked with a PING."""
        context = None
        if self.ssl:
            context = ssl.create_default_context(cafile=self.ssl_root_cert)
        client: coredis.Redis[bytes] = coredis.Redis(
            host=self.host,
            port=self.port,
            db=self.db,
            username=self.username,
            password=self._password(),
            connect_timeout=self.connect_timeout,
            ssl_context=context,
            client_name=self.client_name,
            retry_policy=NoRetryPolicy(),
        )
        async with client:
            with trio.fail_after(self.connect_timeout + self.ping_timeout):
                await client.ping()
            yield client

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        started = False
        deadline = trio.current_time() + self.startup_timeout
        attempt = 0
        while True:
            error: BaseException | None = None
            try:
                async with self.client() as client, trio.open_nursery() as nursery:
                    if self.streams:
                        await nursery.start(self._read_streams, ctx, client)
                    if self.channels or self.patterns:
                        await nursery.start(self._subscribe, ctx, client)
                    nursery.start_soon(self._ping, client)
                    self.connected = True
                    self.connects += 1
                    attempt = 0
                    if started:
                        log.info("%s: connected again to %s", self.name, self.where())
                    else:
                        started = True
                        task_status.started()
            except* coredis.exceptions.RedisError as group:
                error = group
            except* RETRIED as group:
                error = group
            finally:
                self.connected = False
            if error is None:  # the tasks cannot end by themselves
                error = RuntimeError("the connection's tasks ended")
            delay = self._retry_delay(error, attempt, started=started, deadline=deadline)
            attempt += 1
            await trio.sleep(delay)

    def _retry_delay(
        self, error: BaseException, attempt: int, *, started: bool, deadline: float
    ) -> float:
        """The delay before reconnect attempt `attempt`; before the first connection, a
        SourceError instead for an error retrying cannot fix, or past startup_timeout."""
        leaves = _leaves(error)
        fatal = [e for e in leaves if not _retried(e)]
        cause = (fatal or leaves)[0]
        self.last_error = cause
        ceiling = min(self.reconnect_max, self.reconnect_min * 2 ** min(attempt, 30))
        delay = self.random.uniform(ceiling / 2, ceiling)
        if not started:
            why = self._describe(cause)
            if fatal:
                raise SourceError(f"sources.{self.name}: {why} ({self.where()})") from cause
            if trio.current_time() + delay > deadline:
                raise SourceError(
                    f"sources.{self.name}: no connection to Redis within startup_timeout"
                    f" ({self.startup_timeout:g} s): {why} ({self.where()})"
                ) from cause
        log.warning("%s: %s; retrying in %.1f s", self.name, self._describe(cause), delay)
        return delay

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, trio.TooSlowError):
            return f"no answer from Redis in time (ping_timeout {self.ping_timeout:g} s)"
        text = str(error) or type(error).__name__
        if isinstance(error, coredis.exceptions.ConnectionError) and error.__cause__:
            text += f": {error.__cause__}"  # why (refused, the certificate, ...)
        return text

    async def _ping(self, client: coredis.Redis[bytes]) -> None:
        """Checks the server every ping_interval: a link that died silently is noticed."""
        while True:
            await trio.sleep(self.ping_interval)
            with trio.fail_after(self.ping_timeout):
                await client.ping()

    # -- pub/sub ---------------------------------------------------------------------------

    async def _subscribe(
        self,
        ctx: SourceContext,
        client: coredis.Redis[bytes],
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        pubsub = client.pubsub(
            channels=list(self.channels),
            patterns=list(self.patterns),
            ignore_subscribe_messages=True,
            retry_policy=NoRetryPolicy(),  # the source reconnects, and resubscribes
            subscription_timeout=self.connect_timeout,
            max_idle_seconds=self.ping_interval,
        )
        async with pubsub:  # subscribed: SUBSCRIBE and PSUBSCRIBE were acknowledged
            task_status.started()
            while True:
                message = await pubsub.get_message()
                if message is None:  # a subscription's acknowledgement
                    continue
                try:
                    pattern = message["pattern"]
                    if pattern is not None:
                        channel = self.patterns[_text(pattern)]
                    else:
                        channel = self.channels[_text(message["channel"])]
                    data = {
                        "event": _text(message["channel"]),
                        "payload": self.value(_bytes(message["data"])),
                    }
                    await ctx.publish(channel, data)
                except Exception as e:  # one bad message does not stop the source
                    ctx.skip(f"cannot publish a message on {message['channel']!r}", e)

    # -- streams ---------------------------------------------------------------------------

    async def _read_streams(
        self,
        ctx: SourceContext,
        client: coredis.Redis[bytes],
        *,
        task_status: trio.TaskStatus[None],
    ) -> None:
        positions = await self._positions(ctx, client)
        task_status.started()
        keys = {stream.encode(): stream for stream in self.streams}
        block = int(self.ping_interval * 1000)
        while True:
            with trio.fail_after(self.ping_interval + self.ping_timeout):
                reply = await client.xread(dict(positions), count=self.batch, block=block)
            if not reply:
                continue
            self._lag_bytes = sum(
                len(k) + len(v)
                for entries in reply.values()
                for entry in entries
                for k, v in entry.field_values.items()
            )
            with ctx.corked():
                for key, entries in reply.items():
                    stream = keys[_bytes(key)]
                    for entry in entries:
                        await self._publish_entry(ctx, stream, entry, positions)
            self._lag_bytes = 0

    async def _positions(self, ctx: SourceContext, client: coredis.Redis[bytes]) -> dict[str, str]:
        """Where each stream is read from: the last entry handled (in this process, or the
        checkpoint in durable history); else `start`. Checks the streams for a gap."""
        if self.positions is None:
            saved = ctx.saved_checkpoint()
            saved = saved if isinstance(saved, Mapping) else {}
            positions = {}
            for stream in self.streams:
                at = saved.get(stream)
                if isinstance(at, str):
                    positions[stream] = at
                    self._read.add(stream)
                elif self.start == "all":
                    positions[stream] = "0-0"
                else:
                    positions[stream] = await self._last_id(client, stream)
            self.positions = positions
            resumed = {s for s in self.streams if isinstance(saved.get(s), str)}
        else:
            resumed = set(self.streams)
        for stream in sorted(resumed):
            await self._check_gap(ctx, client, stream, self.positions[stream])
        return self.positions

    async def _last_id(self, client: coredis.Redis[bytes], stream: str) -> str:
        """The stream's last id ever (0-0 for a stream not made yet): entries after it are new."""
        try:
            info = await client.xinfo_stream(stream)
        except coredis.exceptions.ResponseError as e:
            if "no such key" in str(e).lower():
                return "0-0"
            raise
        return _text(info["last-generated-id"])

    async def _check_gap(
        self, ctx: SourceContext, client: coredis.Redis[bytes], stream: str, position: str
    ) -> None:
        """Entries after `position` that the stream lost before the source read them (XDEL,
        or trimmed): the channel starts a new epoch, so resuming clients know. A trim that
        removed the entry at `position` (the last one read) may or may not have removed
        unread ones too (Redis does not say): counted as a gap."""
        try:
            info = await client.xinfo_stream(stream)
        except coredis.exceptions.ResponseError as e:
            if "no such key" in str(e).lower():
                return  # deleted or never made: nothing to lose that was not already gone
            raise
        at = stream_id(position)
        deleted = stream_id(str(info.get("max-deleted-entry-id") or "0-0"))
        first = info.get("first-entry")
        if stream not in self._read:
            trimmed = False  # `position` is where reading started, not an entry that was read
        elif info.get("length") and first is not None:
            trimmed = stream_id(_text(first.identifier)) > at  # the entry at `position` is gone
        else:  # empty: were there entries after `position`?
            trimmed = stream_id(_text(info.get("last-generated-id") or b"0-0")) > at
        if not (deleted > at or trimmed):
            return
        channel = self.streams[stream]
        self.gaps += 1
        log.warning(
            "%s: stream %r lost entries after %s before they were read (trimmed or deleted):"
            " channel %r starts a new epoch",
            self.name,
            stream,
            position,
            channel,
        )
        await ctx.reset_channels(channel)

    async def _publish_entry(
        self, ctx: SourceContext, stream: str, entry: StreamEntry, positions: dict[str, str]
    ) -> None:
        entry_id = _text(entry.identifier)
        positions[stream] = entry_id
        self._read.add(stream)
        ctx.note_checkpoint(dict(positions))  # kept with the publication, in durable history
        try:
            fields = {_text(k): self.value(_bytes(v)) for k, v in entry.field_values.items()}
            added = stream_id(entry_id)[0] / 1000
            self._lag_seconds = max(0.0, time.time() - added)
            await ctx.publish(
                self.streams[stream], {"stream": stream, "id": entry_id, "fields": fields}
            )
        except Exception as e:  # one bad entry does not stop the source
            ctx.skip(f"cannot publish entry {entry_id} of stream {stream!r}", e)


def _bytes(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"expected bytes from Redis, not {value!r}")


def _text(value: object) -> str:
    return _bytes(value).decode()
