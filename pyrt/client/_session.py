"""The client's session logic: `Client` keeps a link up (reconnects with backoff, falls back
from one transport to the next, probes back to the preferred one), and on every new link
rejoins each channel where it left off and re-tracks its presence."""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import orjson
import trio

from .._core import Matcher
from ..conflict import ConflictPolicy, OptimisticStore
from ..hub.protocol import encode_mutate, table_channel
from ._channels import Channel, Records
from ._errors import AuthenticationError, ClientError, ConnectionLost
from ._http import open_http_link
from ._link import LINK_ERRORS, Endpoints, Link, LinkClosed, Outcome, outcome_of
from ._websocket import WebSocketLink, open_websocket_link

log = logging.getLogger("pyrt.client")

TRANSPORTS: tuple[str, ...] = ("websocket", "sse", "longpoll")
"""The transports the client can use, in its default order of preference."""

SEND_FAILURE_GRACE = 0.5
"""Seconds a session whose send failed waits for its reader to see why the link ended."""


class Client:
    """A connection to a pyrt hub that stays connected. Make one with `connect()`.

    `url` is the server's base URL (`http://host:port`) or any of its connection endpoints
    (`ws://host:port/connection/websocket`); the others are derived from it.

    Transports are tried in the order of `transports`. One that cannot be opened within
    `open_timeout` (refused, 404, a proxy that eats upgrades), that ends before anything
    arrives, or that goes silent for `stall_timeout` while the client waits for frames, is
    left for the next one at once; after a full round of failures the client backs off
    (exponentially, with jitter) and starts the next round. A link that worked and then
    closed is reopened on the same transport after a short backoff. While on a fallback,
    every `probe_interval` seconds (doubling after each failed probe, up to 32 times) the
    client tries to open the preferred transport (the first one) and, if it opens, moves back
    to it: the fallback link is closed and the new one rejoins everything. `None`: no probes.

    Every new link rejoins each channel with `since` = the last position the client
    delivered and re-tracks its presence, whatever the transport before and after.

    Tokens (docs/auth.md): `token` is a JWT sent on every connection: in a `connect` command,
    the first frame, over WebSocket, and as `Authorization: Bearer` when an SSE or long-poll
    session opens (never in a URL). Or `token_provider`, an async callable returning a token:
    it is called before each connection (the first, every reconnect and transport switch),
    and again when the server asks for a refresh before the token expires, the new token then
    going out in a `refresh` command: the connection carries on with no gap. An exception
    from it is raised out of `connect`'s block.

    When the server refuses the token (401 at the door, close 4401) or the token expired
    (4419), the client reconnects with a new one from `token_provider`; without a provider,
    or when the provider's next token is refused too, it stops with `AuthenticationError`
    rather than retry in a loop. A connection the server ended on purpose (4403: its user
    disconnected, its token revoked) always stops it with `AuthenticationError`.
    """

    def __init__(
        self,
        url: str,
        *,
        transports: Sequence[str] = TRANSPORTS,
        min_backoff: float = 0.1,
        max_backoff: float = 10.0,
        ping_interval: float = 20.0,
        stall_timeout: float = 30.0,
        open_timeout: float = 10.0,
        probe_interval: float | None = 60.0,
        buffer: int = 1024,
        token: str | None = None,
        token_provider: Callable[[], Awaitable[str]] | None = None,
    ) -> None:
        unknown = [t for t in transports if t not in TRANSPORTS]
        if unknown or not transports or len(set(transports)) != len(transports):
            raise ValueError(
                f"transports must be distinct names from {TRANSPORTS}, not {tuple(transports)}"
            )
        if not 0 < ping_interval < stall_timeout:
            # The client's pings are answered: a live link is never silent for longer.
            raise ValueError("need 0 < ping_interval < stall_timeout")
        if token is not None and token_provider is not None:
            raise ValueError("give a token or a token_provider, not both")
        self.url = url
        self.transports = tuple(transports)
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.ping_interval = ping_interval
        self.stall_timeout = stall_timeout
        self.open_timeout = open_timeout
        self.probe_interval = probe_interval
        self.buffer = buffer
        self.token = token
        """The token the next connection sends (the provider's latest, with one)."""
        self.token_provider = token_provider
        self.client_id: str | None = None
        self.user: str | None = None
        """Who the server says the token is for (from the `connect` and `refresh` replies,
        on WebSocket); None before, or on SSE and long-poll."""
        self.connects = 0
        """How many times a link was established (1 + reconnects and switches)."""
        self.on_transport: list[Callable[[str | None], None]] = []
        """Called with the transport's name when a link is up, and None when it is lost."""
        self._endpoints = Endpoints.from_url(url)
        self._channels: dict[str, Channel] = {}
        self._ids = itertools.count(1)
        self._handles = itertools.count(1)
        self._pending: dict[
            int, tuple[trio.Event, list[Any], Callable[[Mapping[str, Any]], None] | None]
        ] = {}
        self._reply_handlers: dict[int, Callable[[Mapping[str, Any]], None]] = {}
        """Replies to commands nobody awaits (record writes), by request id."""
        self._writes_ready = trio.Event()
        self._link: Link | None = None
        self._connected = trio.Event()
        self._closed = False
        self._patterns = Matcher()
        self._pattern_ids: dict[int, Channel] = {}
        self._task_status: Any = None
        self._probe_wait = probe_interval or 0.0
        self._refresh_asked = trio.Event()
        self._token_refused = False
        """The last link's token was refused: the next is the provider's last chance."""
        self._failure: AuthenticationError | None = None
        """Why the client stopped, once it did (raised out of `connect`)."""

    @property
    def connected(self) -> bool:
        return self._link is not None

    @property
    def transport(self) -> str | None:
        """The transport in use ("websocket", "sse" or "longpoll"); None when disconnected."""
        return self._link.transport if self._link is not None else None

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def join(self, channel: str, *, presence: bool = False, iterate: bool = True) -> Channel:
        """Joins `channel` (a name or pattern); it stays joined across reconnects.

        With `iterate=False` messages only go to `on_message` callbacks; otherwise they queue
        (up to `buffer`) for `async for`, and a full queue holds up the connection (the server
        then disconnects it as slow, and it resumes), so iterate promptly.
        """
        if channel in self._channels:
            raise ClientError(409, f"already joined to '{channel}'")
        joined = Channel(channel, self, presence_enabled=presence, iterate=iterate)
        return await self._join_new(joined)

    async def records(self, channel: str, *, policy: ConflictPolicy | None = None) -> Records:
        """Joins a records channel (a name: patterns have no records) and returns its live
        view, with the records as they are now. It stays joined across reconnects; writes
        made while disconnected are sent when the connection is back.

        `policy` predicts the server's conflict policy in the view; by default the one the
        server names (a server-side resolver is predicted as "the write as written").
        """
        if channel in self._channels:
            raise ClientError(409, f"already joined to '{channel}'")
        if any(segment in ("*", ">") for segment in channel.split(":")):
            raise ValueError("records live on channel names, not patterns")
        origin = secrets.token_hex(8)
        store = OptimisticStore(origin, policy)
        joined = Records(channel, self, iterate=False, store=store, policy=policy)
        self._channels[channel] = joined
        try:
            await self._join(joined)
        except BaseException:
            self._forget(joined)
            raise
        return joined

    async def changes(
        self, changes: Sequence[Mapping[str, Any]], *, iterate: bool = True
    ) -> Channel:
        """Subscribes to row changes: `changes` is a list of `{"event", "schema", "table",
        "filter"}` (docs/protocol.md), all on one table (or one `*` pattern). Returns the
        table's channel, which delivers only the matching row events (`Message.data` is the
        change, `Message.ids` the subscriptions it matched) and resumes across reconnects
        like any channel; `subscription_ids` are the server's ids for `changes`."""
        specs = tuple(dict(c) for c in changes)
        names = {table_channel(c.get("schema") or "public", c.get("table") or "*") for c in specs}
        if len(names) != 1:
            raise ValueError("every entry of changes must name the same schema and table")
        (name,) = names
        if name in self._channels:
            raise ClientError(409, f"already joined to '{name}'")
        joined = Channel(name, self, iterate=iterate, changes=specs)
        return await self._join_new(joined)

    async def _join_new(self, joined: Channel) -> Channel:
        """Registers a new channel (a pattern also in the local matcher) and joins it; on
        failure it is forgotten again."""
        self._channels[joined.name] = joined
        if any(segment in ("*", ">") for segment in joined.name.split(":")):
            sub_id = next(self._ids)
            self._patterns.add_channel(sub_id, joined.name)
            self._pattern_ids[sub_id] = joined
        try:
            await self._join(joined)
        except BaseException:
            self._forget(joined)
            raise
        return joined

    def _forget(self, channel: Channel) -> None:
        self._channels.pop(channel.name, None)
        for sub_id, joined in list(self._pattern_ids.items()):
            if joined is channel:
                self._patterns.remove(sub_id)
                del self._pattern_ids[sub_id]

    def channel(self, name: str) -> Channel:
        return self._channels[name]

    def drop_connection(self) -> None:
        """Closes the current connection as a network failure would (for tests and demos);
        the client reconnects on the same transport and resumes."""
        if self._link is not None:
            self._link.break_(Outcome.DROPPED)

    # -- internals -------------------------------------------------------------------------

    async def _join(self, channel: Channel) -> None:
        command: dict[str, Any] = {"cmd": "join", "channel": channel.name}
        if channel.changes:
            command["changes"] = list(channel.changes)
        if channel.presence_enabled:
            command["presence"] = True
        position = channel._positions.get(channel.name)
        if position is not None:
            command["since"] = {"offset": position[0], "epoch": position[1]}
        # The reply is applied by the reader before the publications that follow it.
        await self._request(command, on_ok=channel._joined)
        channel._active = True

    async def _request(
        self, command: dict[str, Any], on_ok: Callable[[Mapping[str, Any]], None] | None = None
    ) -> Any:
        await self._connected.wait()
        link = self._link
        if link is None:
            raise ConnectionLost("not connected")
        rid = next(self._ids)
        done = trio.Event()
        slot: list[Any] = []
        self._pending[rid] = (done, slot, on_ok)
        try:
            with contextlib.suppress(LinkClosed):
                # A send that fails breaks the link: its session ends, and then (knowing
                # why it ended) wakes this request with no reply.
                await link.send(orjson.dumps({**command, "id": rid}))
            await done.wait()
        finally:
            self._pending.pop(rid, None)
        if not slot:
            if self._failure is not None:
                raise self._failure
            raise ConnectionLost("connection closed before the reply")
        reply = slot[0]
        if "error" in reply:
            raise ClientError(reply["error"]["code"], reply["error"]["message"])
        return reply["ok"]

    async def _run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self._task_status = task_status
        index = 0
        failures = 0  # transports that failed in a row
        rounds = 0  # backoff exponent
        while not self._closed:
            transport = self.transports[index]
            outcome = await self._attempt(transport)
            if self._failure is not None:
                raise self._failure
            if self._closed:
                return
            if outcome is Outcome.UNAUTHORIZED:
                # Once, with the provider's next token (`_ended`: refused again, it stops).
                self._token_refused = True
                await trio.sleep(self.min_backoff / 2 + random.uniform(0, self.min_backoff / 2))
                continue
            if index == 0 and self.probe_interval is not None:
                # A preferred transport that stalls is probed less and less often.
                if outcome is Outcome.STALLED:
                    self._probe_wait = min(self._probe_wait * 2, self.probe_interval * 32)
                elif outcome in (Outcome.CLOSED, Outcome.DROPPED):
                    self._probe_wait = self.probe_interval
            if outcome is Outcome.PROBED:
                index, failures, rounds = 0, 0, 0
                continue
            if outcome in (Outcome.FAILED, Outcome.STALLED):
                index = (index + 1) % len(self.transports)
                failures += 1
                if failures % len(self.transports):
                    continue  # the next transport, right away
                delay = min(self.max_backoff, self.min_backoff * 2**rounds)
                rounds += 1
            else:
                failures = 0
                delay = self.min_backoff
                rounds = 1
            # Exponential backoff with "equal jitter": at least half the delay, so a flapping
            # link is not hammered, and a random rest, so a restarted server is not stampeded.
            await trio.sleep(delay / 2 + random.uniform(0, delay / 2))

    async def _attempt(self, transport: str) -> Outcome:
        """Opens a link on `transport` and runs a session on it until it ends."""
        outcome = Outcome.FAILED
        opened = False
        if self.token_provider is not None:
            self.token = await self.token_provider()
        try:
            async with self._open_link(transport) as link:
                opened = True
                outcome = await self._session(link)
        except LinkClosed as e:
            if not opened:  # refused at the door, or its `connect` was
                outcome = self._ended(e, Outcome.FAILED)
        except LINK_ERRORS:
            pass  # failing to open it, or an error while closing it after the session
        return outcome

    def _ended(self, error: LinkClosed, otherwise: Outcome) -> Outcome:
        """The outcome of a link that `error` ended. When the server refused the token and
        there is no new one to try, or revoked it, the client fails: set before the link's
        requests are woken, so they raise the same `AuthenticationError`."""
        outcome = outcome_of(error, otherwise)
        if outcome is Outcome.REVOKED or (
            outcome is Outcome.UNAUTHORIZED and (self.token_provider is None or self._token_refused)
        ):
            self._failure = self._authentication_error(error)
        return outcome

    def _authentication_error(self, error: LinkClosed) -> AuthenticationError:
        assert error.code is not None
        if error.code == 4419 and self.token_provider is None:
            reason = f"the token expired and there is no token_provider ({error.reason})"
        elif error.code == 4403:
            reason = f"the server ended the connection, do not reconnect ({error.reason})"
        elif self.token is None and self.token_provider is None:
            reason = f"the server wants a token: give connect() token= ({error.reason})"
        else:
            reason = f"the server refused the token ({error.reason})"
        return AuthenticationError(error.code, reason)

    def _open_link(self, transport: str) -> AbstractAsyncContextManager[Link]:
        """Opens a link on `transport` (it raises only `LINK_ERRORS`)."""
        if transport == "websocket":
            return open_websocket_link(
                self._endpoints.websocket,
                open_timeout=self.open_timeout,
                stall_timeout=self.stall_timeout,
                token=self.token,
            )
        return open_http_link(
            transport,
            self._endpoints,
            open_timeout=self.open_timeout,
            stall_timeout=self.stall_timeout,
            token=self.token,
        )

    async def _session(self, link: Link) -> Outcome:
        ended: list[Outcome] = []
        try:
            async with trio.open_nursery() as nursery:

                def end(outcome: Outcome) -> None:
                    if not ended:
                        ended.append(outcome)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(self._read, link, end)
                nursery.start_soon(self._ping, link)
                nursery.start_soon(self._send_writes, link)
                nursery.start_soon(self._watch, link, end)
                self._refresh_asked = trio.Event()
                nursery.start_soon(self._refresh, link)
                if self.probe_interval is not None and link.transport != self.transports[0]:
                    nursery.start_soon(self._probe, end)
                self._link = link
                self._token_refused = False  # this one was taken
                if isinstance(link, WebSocketLink) and link.identity is not None:
                    self.client_id = link.identity.get("client")
                    self.user = link.identity.get("user")
                self.connects += 1
                self._connected.set()
                self._announce(link.transport)
                if link.opening_channel is not None:
                    nursery.start_soon(self._leave_quietly, link.opening_channel)
                # Rejoin and re-track everything, then tell the caller we are up.
                for channel in list(self._channels.values()):
                    nursery.start_soon(self._restore, channel)
                if self._task_status is not None:
                    self._task_status.started()
                    self._task_status = None
        finally:
            outcome = ended[0] if ended else Outcome.CLOSED
            if outcome is Outcome.CLOSED and not link.frames:
                outcome = Outcome.FAILED  # it opened, then died before saying anything
            if link.closed_by is not None:
                # The server said why it closed (however the session noticed it ended).
                outcome = self._ended(link.closed_by, outcome)
            self._lost()  # after `_ended`: requests woken here raise the client's failure
        link.ended_as = outcome
        return outcome

    async def _restore(self, channel: Channel) -> None:
        if not channel._active:
            return  # its first join is still on its way: the user's join() sends it
        with trio.move_on_after(30):
            try:
                await self._join(channel)
                for handle in list(channel._tracked):
                    await channel._track(handle)
            except (ConnectionLost, ClientError):
                pass  # the next connection tries again

    async def _leave_quietly(self, channel: str) -> None:
        with contextlib.suppress(ConnectionLost, ClientError):
            await self._request({"cmd": "leave", "channel": channel})

    async def _refresh(self, link: Link) -> None:
        """Answers the server's `refresh` pushes with a new token from the provider. Without
        one, or when the new token is refused, the connection lasts until its token expires
        (4419), and then the client reconnects with a new token or stops."""
        while True:
            await self._refresh_asked.wait()
            self._refresh_asked = trio.Event()
            if self.token_provider is None:
                log.warning("the server asks for a new token, and there is no token_provider")
                continue
            self.token = await self.token_provider()
            try:
                identity = await self._request({"cmd": "refresh", "token": self.token})
            except ClientError as e:
                log.warning("the server refused the refreshed token: %s", e)
                continue
            except ConnectionLost:
                return
            if isinstance(link, WebSocketLink):
                self.user = identity.get("user")

    async def _watch(self, link: Link, end: Callable[[Outcome], None]) -> None:
        await link.broken.wait()
        if link.broken_as is Outcome.CLOSED:
            # A send failed: the server may have closed the link, and the reader be about
            # to read why (a close code that decides what to do next). It ends the session
            # (cancelling this wait) as soon as it does.
            await trio.sleep(min(SEND_FAILURE_GRACE, self.stall_timeout))
        end(link.broken_as)

    async def _ping(self, link: Link) -> None:
        # With an id, so the server answers: the answer is what tells a live link from a
        # stalled one when there is no other traffic.
        while True:
            await trio.sleep(self.ping_interval)
            try:
                await link.send(b'{"cmd":"ping","id":"ping"}')
            except LinkClosed:
                return  # the link is broken: the watch ends the session

    async def _probe(self, end: Callable[[Outcome], None]) -> None:
        assert self.probe_interval is not None
        while True:
            await trio.sleep(self._probe_wait)
            try:
                async with self._open_link(self.transports[0]):
                    pass
            except LINK_ERRORS:
                self._probe_wait = min(self._probe_wait * 2, self.probe_interval * 32)
                continue
            end(Outcome.PROBED)
            return

    async def _read(self, link: Link, end: Callable[[Outcome], None]) -> None:
        try:
            while True:
                # The deadline only runs while waiting for the link: a consumer that holds up
                # the reader (a full channel queue) is not a stalled transport.
                with trio.CancelScope(deadline=trio.current_time() + self.stall_timeout) as watch:
                    link.watch = watch
                    frame = await link.receive()
                link.watch = None
                if watch.cancelled_caught:
                    end(Outcome.STALLED)
                    return
                link.frames += 1
                if "reply" in frame:
                    pending = self._pending.get(frame["reply"])
                    if pending is not None:
                        done, slot, on_ok = pending
                        if on_ok is not None and "ok" in frame:
                            on_ok(frame["ok"])
                        slot.append(frame)
                        done.set()
                    else:
                        handler = self._reply_handlers.pop(frame["reply"], None)
                        if handler is not None:
                            handler(frame)
                    continue
                await self._push(frame)
        except LinkClosed:
            end(Outcome.CLOSED)

    async def _push(self, push: Mapping[str, Any]) -> None:
        kind = push.get("push")
        channel = self._channels.get(push.get("channel", ""))
        if kind == "pub":
            channel = channel or self._pattern_channel(push["channel"])
            if channel is not None:
                message = channel._deliver(push)
                if message is not None and channel.iterate:
                    await channel._queue(message)
        elif channel is not None and kind == "reset":
            channel._reset(push)
        elif channel is not None and kind == "presence_state":
            channel._presence_state(push["state"])
        elif channel is not None and kind == "presence_diff":
            channel._presence_diff(push)
        elif kind == "refresh":
            self._refresh_asked.set()
        elif channel is not None and kind == "unsubscribe":
            # Not joined again on a reconnect: the server (its REST API) removed us.
            self._forget(channel)
            channel._unsubscribed(str(push.get("reason") or "removed by the server"))

    def _pattern_channel(self, name: str) -> Channel | None:
        """The pattern channel a publication on `name` came through, if any."""
        matches = self._patterns.match_channel(name)
        return self._pattern_ids[min(matches)] if matches else None

    def _announce(self, transport: str | None) -> None:
        for callback in self.on_transport:
            callback(transport)

    def _wake_writer(self) -> None:
        self._writes_ready.set()

    async def _send_writes(self, link: Link) -> None:
        """Sends record writes as they become ready (re-sends first), until the link ends.
        Their replies come to `_reply_handlers`, in frame order like every reply."""
        while True:
            await self._writes_ready.wait()
            self._writes_ready = trio.Event()
            for channel in list(self._channels.values()):
                if not isinstance(channel, Records):
                    continue
                channel._apply(channel.store.expire(trio.current_time()))
                for mutation in channel.store.take_outgoing(trio.current_time()):
                    assert mutation.seq is not None
                    rid = next(self._ids)
                    self._reply_handlers[rid] = functools.partial(channel._replied, mutation.seq)
                    command = encode_mutate(channel.name, mutation, rid)
                    try:
                        await link.send(orjson.dumps(command))
                    except LinkClosed:
                        return  # the session ends; the store re-sends on the next link

    def _close(self) -> None:
        """The user's `connect` block ended: no more links, and every `async for` ends."""
        self._closed = True
        for channel in self._channels.values():
            channel._send.close()

    def _lost(self) -> None:
        self._reply_handlers.clear()
        for channel in self._channels.values():
            if isinstance(channel, Records):
                channel.store.go_offline()
        if self._link is not None:
            self._link = None
            self._announce(None)
        if self._connected.is_set():
            # Only a set event is replaced: requests waiting on an unset one keep waiting
            # for the next link.
            self._connected = trio.Event()
        for done, _slot, _on_ok in self._pending.values():
            done.set()  # wakes requests with an empty slot: ConnectionLost
