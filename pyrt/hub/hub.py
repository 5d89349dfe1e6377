"""The hub: connections, commands, channels and publishing; liveness, rates and who may write.

Sans-IO and synchronous (docs/architecture.md): the node calls `open`, `receive`, `tick` and
`disconnect` with the current time, then writes out what each connection's `outbox` holds
(`take_ready` names the connections with new frames) and closes what `take_closing` names.
Nothing here reads a clock or uses trio, which is what lets hypothesis drive it.

The hub is made of parts, each in its module, that it alone wires together:
- a storage engine (`broker.py`: history, presence and records, memory by default);
- a deliverer (`deliverer.py`: the Rust fan-out, which writes publications straight to the
  sockets transports attach, or the pure-Python one) and the outgoing side of every
  connection (`output.py`: outboxes, slow consumers, closes);
- records channels (`records.py`), presence as connections see it (`presence_feed.py`) and
  row subscriptions (`rows.py`).

Routing goes through the Rust matcher; a publication is encoded once per codec and the same
frame object is queued for every recipient. Every publication is stamped with the hub's
hybrid logical clock.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .._core import Matcher, OutboxBudget, PgChange, check_channel
from .._errors import ChannelNameError
from ..conflict import ConflictPolicy, HybridClock, Mutation, Record, Resolver, Timestamp
from .broker import DurableHistory, MemoryBroker, RecordTable, StorageEngine
from .config import HubConfig as HubConfig
from .config import HubStats as HubStats
from .connection import DEFAULT as DEFAULT
from .connection import ChannelJoin
from .connection import Connection as Connection
from .connection import _Default as _Default
from .deliverer import DelivererFactory, fan_out
from .history import HistoryBudget, Publication, Recovery, StreamPosition
from .identity import ANONYMOUS, Action, Identity
from .limits import Admission, ChannelRates, CommandRate
from .outbox import SlowConsumerPolicy
from .output import Output
from .presence_feed import PresenceFeed
from .protocol import (
    CloseCode,
    Command,
    Connect,
    ErrorCode,
    Join,
    JsonCodec,
    Leave,
    Mutate,
    Ping,
    PresenceQuery,
    ProtocolError,
    Publish,
    Refresh,
    RequestId,
    Track,
    Untrack,
    is_pattern,
)
from .records import MutationReply as MutationReply
from .records import RecordChannels
from .rows import InvalidRowSubscription, RowEvents, RowSubscriptions, hidden_column
from .rules import Grant, Rules

if TYPE_CHECKING:
    from .historylog import HistoryLog


ALLOWED = Grant(True, "", None, None)
"""What a hub without channel rules answers every question (`Hub.set_rules`)."""

MAX_GRANTS = 256
"""Most rule answers a connection keeps (`Connection.grants`); past it they are asked again."""


def _seconds(wait: float) -> float:
    """A wait as clients are told it: in seconds, rounded up to the millisecond."""
    return math.ceil(wait * 1000) / 1000


_is_pattern = is_pattern  # the name pyrt.plugin imports


class Hub:
    """Every connection, channel, presence entry and record of one node.

    `resolvers` names the user-supplied conflict resolvers (functions or `ConflictPolicy`
    objects) that `record_policies` may refer to. `wall_clock` gives wall time in seconds for
    the hybrid logical clock (`replica` is the clock's node name).

    `broker` is the storage engine that keeps history, presence and records (default: a
    `MemoryBroker` with this config, `replica` and `new_epoch`, which makes epochs).
    `deliverer` makes what carries publications to connections (default: the Rust fan-out,
    `pyrt.hub.deliverer.fan_out`).
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        replica: str | None = None,
        new_epoch: Callable[[], str] | None = None,
        timer: Callable[[], float] = time.perf_counter,
        resolvers: Mapping[str, Resolver | ConflictPolicy] | None = None,
        wall_clock: Callable[[], float] = time.time,
        deliverer: DelivererFactory | None = None,
        broker: StorageEngine | None = None,
    ) -> None:
        self.config = config or HubConfig()
        self.replica = replica or secrets.token_hex(4)
        self.stats = HubStats()
        self._timer = timer
        self._wall_clock = wall_clock
        self.clock = HybridClock(self.replica)
        """Stamps every publication and record version (pyrt.conflict.HybridClock)."""
        self._connections: dict[str, Connection] = {}
        self._conn_numbers = itertools.count(1)
        self._sub_ids = itertools.count(1)
        self._matcher = Matcher()
        self._subscribers: dict[int, tuple[Connection, str]] = {}
        self._channel_users: dict[str, int] = {}
        self._broker: StorageEngine = (
            broker
            if broker is not None
            else MemoryBroker(self.config, replica=self.replica, new_epoch=new_epoch)
        )
        """History, presence and records: reached only through the engine's interfaces."""
        self._policies = list(self.config.channel_policies.values())
        self._policy_matcher = Matcher()
        for index, pattern in enumerate(self.config.channel_policies):
            self._policy_matcher.add_channel(index, pattern)
        self._native = JsonCodec()
        """The codec of the frames a deliverer writes directly (attached connections')."""
        budget = OutboxBudget(self.config.outbox_total_bytes)
        self._deliverer = (deliverer or fan_out)(budget, self.config)
        self._out = Output(self.config, self.stats, budget, self._deliverer, self._native)
        """Every frame to a connection goes through it (`Output.send`)."""
        self._rows = RowSubscriptions(self._deliverer)
        self._records = RecordChannels(
            self.config,
            self.stats,
            self._broker,
            self.clock,
            self._physical,
            self._publish_record,
            resolvers,
        )
        self._presence = PresenceFeed(self._broker, self._out)
        self._row_events = RowEvents(
            self._rows,
            self._broker,
            self._out,
            self._matcher,
            self.stats,
            timer,
            self._stamp,
            self._policy,
        )
        self._owners: list[str] = []
        self._owned = Matcher()
        """Channel patterns sources declared as theirs (`own_channels`), by index in
        `_owners`."""
        self._writable = Matcher()
        for index, pattern in enumerate(self.config.client_writable):
            self._writable.add_channel(index, pattern)
        self._channel_rates = (
            ChannelRates(self.config.channel_publish_rate, self.config.channel_publish_burst)
            if self.config.channel_publish_rate
            else None
        )
        self._rules: Rules | None = None
        """The channel rules (None: every connection may do everything, as a hub without
        `set_rules`; the node always sets them)."""
        self._refresh_before = 30.0
        self._connect_timeout = 10.0
        self._users: dict[str, set[str]] = {}
        """Connection ids by user (`Identity.user`), for the REST API's revocations."""

    # -- who is connected, and what they may do -----------------------------------------------

    def set_rules(
        self, rules: Rules | None, *, refresh_before: float = 30.0, connect_timeout: float = 10.0
    ) -> None:
        """Puts channel rules in force (docs/auth.md): from now on each join, publish,
        presence, history read and mutation is asked of them (once per connection and
        channel). `refresh_before`: seconds before a token's `exp` when the connection is
        sent a `refresh` push. `connect_timeout`: how long a connection opened without a
        token has to send `connect`."""
        self._rules = rules
        self._refresh_before = refresh_before
        self._connect_timeout = connect_timeout
        for conn in self._connections.values():
            conn.grants.clear()

    @property
    def rules(self) -> Rules | None:
        return self._rules

    def grant(
        self, conn: Connection, action: Action, channel: str, verdict: bool | None = None
    ) -> Grant:
        """What the rules allow `conn` to do on `channel` (a name, or a pattern for
        subscribe). `verdict` is the application's `authorize` hook's answer, which wins
        when it is not None (True keeps the rules' forced filter and columns, if any)."""
        rules = self._rules
        if rules is None:
            grant = ALLOWED
        else:
            key = (action, channel)
            cached = conn.grants.get(key)
            if cached is None:
                if len(conn.grants) >= MAX_GRANTS:
                    conn.grants.clear()
                cached = conn.grants[key] = rules.decide(conn.identity, action, channel)
            grant = cached
        if verdict is None or verdict == grant.allowed:
            return grant
        if verdict:
            return Grant(True, "", grant.row_filter, grant.columns)
        return Grant(False, f"the application refuses {action.value} on '{channel}'", None, None)

    def _refused(self, conn: Connection, rid: RequestId, grant: Grant) -> bool:
        """Sends the refusal (403) if `grant` refuses; returns whether it did."""
        if grant.allowed:
            return False
        self.stats.auth_refused += 1
        self._out.error(conn, rid, ErrorCode.FORBIDDEN, grant.reason)
        return True

    def authenticate(
        self, conn: Connection, identity: Identity, now: float, rid: RequestId = None
    ) -> None:
        """`conn` proved `identity` (its `connect` command's token, verified by the node):
        commands are taken from now on, and the token's `channels` are joined. Replies to
        `rid` with the connection's id, its user and when its token expires."""
        if conn.id not in self._connections:
            return
        self._set_identity(conn, identity)
        conn.pending = False
        self._join_token_channels(conn, identity, now)
        if rid is not None:
            self._out.reply(conn, rid, self._identity_reply(conn))

    def refresh_identity(self, conn: Connection, identity: Identity, rid: RequestId = None) -> bool:
        """A new token for `conn` (its `refresh` command): taken if it is for the same user
        (error 401 otherwise). Returns whether it was taken."""
        if conn.id not in self._connections:
            return False
        if identity.user != conn.identity.user or identity.anonymous != conn.identity.anonymous:
            self.stats.auth_refused += 1
            message = "a refresh must carry a token for the same user"
            self._out.error(conn, rid, ErrorCode.UNAUTHORIZED, message)
            return False
        self._set_identity(conn, identity)
        if rid is not None:
            self._out.reply(conn, rid, self._identity_reply(conn))
        return True

    def replace_identity(
        self,
        conn: Connection,
        identity: Identity,
        verdicts: Mapping[tuple[Action, str], bool | None] | None = None,
    ) -> str | None:
        """A new identity for `conn` from a token a dialect verified its own way (Supabase's
        `access_token`): one for the same user, or any one when `conn` has no user yet
        (anonymous, or an API key's role). Its joins are checked again under the new
        identity (`verdicts`: the `authorize` hook's answers, by action and channel): a join
        it may no longer make, or whose forced row filter or columns differ, ends, told with
        an `unsubscribe` push. Returns None when taken, else why not (nothing changed)."""
        if conn.id not in self._connections:
            return "the connection is gone"
        old = conn.identity
        if old.user and identity.user != old.user:
            self.stats.auth_refused += 1
            return "a new token must be for the same user"
        if self._rules is None:
            self._set_identity(conn, identity)
            return None
        verdicts = verdicts or {}
        before = {channel: self.grant(conn, Action.SUBSCRIBE, channel) for channel in conn.joins}
        self._set_identity(conn, identity)
        for channel, granted in before.items():
            join = conn.joins[channel]
            grant = self.grant(
                conn, Action.SUBSCRIBE, channel, verdicts.get((Action.SUBSCRIBE, channel))
            )
            reason = grant.reason
            if grant.allowed and (grant.row_filter, grant.columns) != (
                granted.row_filter,
                granted.columns,
            ):
                reason = f"the rows or columns of '{channel}' shown to you changed: join it again"
            elif grant.allowed and join.presence:
                presence = self.grant(
                    conn, Action.PRESENCE, channel, verdicts.get((Action.PRESENCE, channel))
                )
                reason = presence.reason
            if reason:
                self.stats.auth_refused += 1
                self._drop_join(conn, channel)
                self._out.send(conn, conn.codec.unsubscribe(channel, reason))
        return None

    def _identity_reply(self, conn: Connection) -> dict[str, Any]:
        identity = conn.identity
        reply: dict[str, Any] = {"client": conn.id, "user": identity.user}
        joined = [channel for channel in identity.channels if channel in conn.joins]
        if joined:
            reply["channels"] = joined  # the token's server-side joins, as made
        if identity.expires is not None:
            reply["expires_in"] = _seconds(max(0.0, identity.expires - self._wall_clock()))
        return reply

    def _set_identity(self, conn: Connection, identity: Identity) -> None:
        old = conn.identity.user
        if old:
            holders = self._users.get(old)
            if holders is not None:
                holders.discard(conn.id)
                if not holders:
                    del self._users[old]
        conn.identity = identity
        conn.grants.clear()
        conn.refresh_asked = False
        if identity.user:
            self._users.setdefault(identity.user, set()).add(conn.id)

    def _join_token_channels(self, conn: Connection, identity: Identity, now: float) -> None:
        """Server-side subscriptions: the token's `channels` claim, signed by the
        application, needs no rule. A channel that cannot be joined is skipped."""
        for channel in identity.channels:
            if channel in conn.joins:
                continue
            try:
                check_channel(channel, pattern=True)
            except ChannelNameError:
                continue
            if len(conn.joins) >= self.config.max_channels_per_connection:
                break
            self._add_join(conn, Join(None, channel), (), now)

    def connections_of(self, user: str) -> list[Connection]:
        """The live connections whose identity is `user`."""
        return [self._connections[c] for c in sorted(self._users.get(user, ()))]

    def disconnect_user(self, user: str, reason: str = "disconnected by the server") -> int:
        """Closes every connection of `user` with 4403 (the REST API). Returns how many."""
        conns = self.connections_of(user)
        for conn in conns:
            self._out.close(conn, CloseCode.REVOKED, reason)
        return len(conns)

    def revoke_token(self, jti: str, reason: str = "token revoked") -> int:
        """Closes every connection whose token has the id `jti` with 4403 (the node also
        refuses the token from now on). Returns how many."""
        conns = [c for c in self._connections.values() if c.identity.jti == jti]
        for conn in conns:
            self._out.close(conn, CloseCode.REVOKED, reason)
        return len(conns)

    def unsubscribe_user(self, user: str, channel: str, now: float) -> int:
        """Ends the joins of `channel` (a name or pattern, as joined) of every connection of
        `user`, each told with an `unsubscribe` push (the REST API). Returns how many."""
        count = 0
        for conn in self.connections_of(user):
            if channel in conn.joins:
                self._drop_join(conn, channel)
                self._out.send(conn, conn.codec.unsubscribe(channel, "removed by the server"))
                count += 1
        return count

    # -- connections -----------------------------------------------------------------------

    def open(
        self,
        now: float,
        codec: JsonCodec | None = None,
        *,
        transport: str = "websocket",
        idle_timeout: float | _Default | None = DEFAULT,
        pings: bool = True,
        identity: Identity = ANONYMOUS,
        pending: bool = False,
    ) -> Connection:
        """Registers a new connection and returns it (its `id` names it from now on).

        `idle_timeout` defaults to the config's; None leaves liveness to the transport (an
        SSE stream notices a gone client when a write fails). `pings=False` for transports
        that send their own heartbeats or cannot use them. `identity`: who its token says it
        is; `pending`: it has no token yet and must send `connect` first (WebSocket).
        """
        conn = Connection(
            id=f"{self.replica}.{next(self._conn_numbers)}",
            codec=codec or JsonCodec(),
            outbox=self._out.new_outbox(),
            opened=now,
            last_seen=now,
            last_ping=now,
            transport=transport,
            idle_timeout=self.config.idle_timeout
            if isinstance(idle_timeout, _Default)
            else idle_timeout,
            pings=pings,
            handle=self._deliverer.open(),
            rate=self.new_command_rate(now),
        )
        self._connections[conn.id] = conn
        self._out.opened(conn)
        self.stats.connections_opened += 1
        conn.pending = pending
        self._set_identity(conn, identity)
        if not pending:
            self._join_token_channels(conn, identity, now)
        return conn

    def connection(self, conn_id: str) -> Connection:
        return self._connections[conn_id]

    def new_command_rate(self, now: float) -> CommandRate | None:
        """A command rate as the config says (None: no limit), for a transport that counts
        commands itself (one per socket when a socket carries several hub connections)."""
        config = self.config
        if not config.command_rate:
            return None
        return CommandRate.new(config.command_rate, config.command_burst, now)

    def __len__(self) -> int:
        return len(self._connections)

    def connections_by_transport(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for conn in self._connections.values():
            counts[conn.transport] = counts.get(conn.transport, 0) + 1
        return counts

    def touch(self, conn_id: str, now: float) -> None:
        """A sign of life from a connection other than a frame (a long-poll request)."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            conn.last_seen = now

    def disconnect(self, conn_id: str, now: float) -> None:
        """Forgets a connection whose transport is gone: its joins, its presence."""
        conn = self._connections.pop(conn_id, None)
        if conn is None:
            return
        self._set_identity(conn, ANONYMOUS)
        for channel in list(conn.joins):
            self._drop_join(conn, channel)
        self._presence.gone(conn)
        self._out.forget(conn)  # detaches the socket: before the transport closes it

    # -- the direct write path (a SocketDeliverer: the Rust fan-out) ------------------------

    def attach_socket(self, conn: Connection, fd: int) -> bool:
        """Lets the fan-out write publications straight to the socket `fd` (a WebSocket
        carrying this hub's native JSON frames). Returns False when it cannot (direct writes
        are off, the deliverer writes to no socket, or the connection uses another codec):
        then everything goes through the outbox as before. The transport must then write
        only what `take_wire` hands it, and call `release` when it has written everything.
        The fan-out borrows `fd`: `disconnect` the connection before the socket closes
        (docs/architecture.md, "The descriptor rule")."""
        if conn.id not in self._connections:
            return False
        return self._out.attach(conn, fd)

    def take_wire(self, conn: Connection) -> bytes:
        """Bytes the fan-out could write only in part: the transport writes them first."""
        return self._out.take_wire(conn)

    def hold(self, conn: Connection) -> None:
        """The transport is about to write to the socket itself (a control frame): the
        fan-out leaves it alone until `release`."""
        self._out.hold(conn)

    def release(self, conn: Connection) -> bool:
        """The transport has written everything queued: the fan-out may write directly
        again. Returns whether it may (not if something is queued or closing)."""
        return self._out.release(conn)

    def corked(self) -> AbstractContextManager[None]:
        """Within it, direct writes are gathered per connection and sent when it ends, one
        write per connection (a burst of publications, a batch of row changes). Nests."""
        return self._out.corked()

    def fanout_stats(self) -> dict[str, int]:
        """The deliverer's counters, as the Rust fan-out names them (direct frames and bytes,
        partial and refused writes, overflows, backlog bytes, handles, attached sockets,
        subscriptions)."""
        return self._deliverer.stats()

    @property
    def outbox_budget(self) -> OutboxBudget:
        """What all outboxes and fan-out backlogs hold (`held`), against `outbox_total_bytes`."""
        return self._out.budget

    @property
    def broker(self) -> StorageEngine:
        """The storage engine: history, presence and records (`pyrt.hub.broker`)."""
        return self._broker

    def attach_history_log(self, log: HistoryLog, now: float, wall: float) -> None:
        """Keeps history in the durable `log` (replayed first: offsets and epochs go on from
        where they were). `now` is the hub's time and `wall` the wall clock at that moment.
        TypeError if the storage engine keeps no local log (`DurableHistory`)."""
        if not isinstance(self._broker, DurableHistory):
            raise TypeError(f"{type(self._broker).__name__} keeps no local history log")
        self._broker.attach_log(log, now, wall)

    @property
    def history_budget(self) -> HistoryBudget:
        """What every channel's history holds (`bytes`, `retained`) and forgot because it was
        over `history_max_bytes` (`evicted`)."""
        return self._broker.budget

    def take_ready(self) -> list[Connection]:
        """Connections that got new frames since the last call."""
        return self._out.take_ready()

    def take_closing(self) -> list[tuple[str, CloseCode, str]]:
        """Connections the transport must close (after writing what their outbox holds)."""
        return self._out.take_closing()

    def push(self, conn_id: str, frame: bytes) -> None:
        """Queues a frame the transport's protocol layer made itself (a reply that sums up
        several hub commands, a notice of its own), in order with the hub's frames."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            self._out.send(conn, frame)

    def shutdown(self, now: float) -> None:
        """Tells every client to reconnect elsewhere; the transport then closes them all."""
        for conn in list(self._connections.values()):
            reason = "server shutting down, reconnect"
            self._out.send(conn, conn.codec.disconnect(CloseCode.GOING_AWAY, reason))
            conn.told_to_go = True
            self._out.close(conn, CloseCode.GOING_AWAY, reason)

    # -- input -----------------------------------------------------------------------------

    def receive(self, conn_id: str, frame: str | bytes, now: float) -> None:
        """One frame from a client."""
        command = self.decode(conn_id, frame, now)
        if command is not None:
            self.handle(self._connections[conn_id], command, now)

    def decode(self, conn_id: str, frame: str | bytes, now: float) -> Command | None:
        """One frame from a client, up to the command it carries: the frame size, the
        command rate and the codec. None when nothing is left to do (refused: the error or
        close is queued). The node asks the application's `authorize` hook, if any, between
        this and `handle`."""
        conn = self._connections.get(conn_id)
        if conn is None or conn.closing is not None:
            return None
        conn.last_seen = now
        self.stats.frames_in += 1
        if len(frame) > self.config.max_frame_bytes:
            self.frame_too_big(conn_id)
            return None
        admission = Admission.ACCEPT if conn.rate is None else conn.rate.admit(now)
        if admission is Admission.CLOSE:
            self.stats.rate_limit_closes += 1
            rate = self.config.command_rate
            self._out.close(conn, CloseCode.RATE_LIMITED, f"over {rate:g} commands per second")
            return None
        try:
            command = conn.codec.decode(frame)
        except ProtocolError as e:
            if e.close is not None:
                self._out.close(conn, e.close, e.message)
            elif conn.pending:
                # Before `connect`, anything but a `connect` with a token closes (4401): a
                # malformed one (its token over MAX_TOKEN_CHARS) too, not an error reply.
                self.stats.auth_refused += 1
                self._out.close(conn, CloseCode.UNAUTHORIZED, e.message)
            else:
                self._out.error(conn, e.id, e.code, e.message)
            return None
        if admission is Admission.REFUSE:
            assert conn.rate is not None
            self.stats.rate_limited += 1
            rate = self.config.command_rate
            message = f"over {rate:g} commands per second: not carried out"
            retry = {"retry_after": _seconds(conn.rate.retry_after(now))}
            self._out.error(conn, command.id, ErrorCode.RATE_LIMITED, message, retry)
            return None
        return command

    def close(self, conn_id: str, code: CloseCode, reason: str) -> None:
        """Asks the transport to close a connection (after what is queued for it)."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            self._out.close(conn, code, reason)

    def frame_too_big(self, conn_id: str) -> None:
        """Closes a connection that sent a frame over `max_frame_bytes` (1009)."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            limit = self.config.max_frame_bytes
            self._out.close(conn, CloseCode.MESSAGE_TOO_BIG, f"frame larger than {limit} bytes")

    def handle(
        self, conn: Connection, command: Command, now: float, verdict: bool | None = None
    ) -> None:
        """One decoded command from a client. `verdict`: the application's `authorize`
        hook's answer for it (None: the channel rules decide alone)."""
        if conn.closing is not None:
            return
        if conn.pending and not isinstance(command, Ping):
            # Nothing before the token: a connection without one is not anyone yet.
            self.stats.auth_refused += 1
            message = "send 'connect' with a token first"
            self._out.close(conn, CloseCode.UNAUTHORIZED, message)
            return
        match command:
            case Ping(rid):
                if rid is not None:
                    self._out.reply(conn, rid, {})
            case Publish():
                self._client_publish(conn, command, now, verdict)
            case Mutate():
                self._mutate(conn, command, now, verdict)
            case Join():
                self._join(conn, command, now, verdict)
            case Leave(rid, channel):
                if channel not in conn.joins:
                    self._out.error(conn, rid, ErrorCode.NOT_JOINED, f"not joined to '{channel}'")
                    return
                self._drop_join(conn, channel)
                self._out.reply(conn, rid, {})
            case Track():
                if not self._refused(
                    conn, command.id, self.grant(conn, Action.PRESENCE, command.channel, verdict)
                ):
                    self._presence.track(conn, command)
            case Untrack():
                self._presence.untrack(conn, command)
            case PresenceQuery():
                if not self._refused(
                    conn, command.id, self.grant(conn, Action.PRESENCE, command.channel, verdict)
                ):
                    self._presence.query(conn, command)
            case Connect(rid) | Refresh(rid):
                # Tokens are verified by the node (`Session`), which never hands these here.
                message = "this server takes no tokens"
                self._out.error(conn, rid, ErrorCode.NOT_ALLOWED, message)

    def tick(self, now: float) -> float:
        """Heartbeats, idle timeouts and history expiry. Returns when to call again."""
        config = self.config
        next_due = now + config.ping_interval
        wall = self._wall_clock()
        for conn in list(self._connections.values()):
            if conn.closing is not None:
                continue
            due = self._check_token(conn, now, wall)
            if due is not None:
                if conn.closing is not None:
                    continue
                next_due = min(next_due, due)
            idle = conn.idle_timeout
            if idle is not None:
                if now - conn.last_seen >= idle:
                    self._out.close(
                        conn, CloseCode.IDLE_TIMEOUT, f"nothing received for {idle:g} s"
                    )
                    continue
                next_due = min(next_due, conn.last_seen + idle)
            if conn.pings:
                if now - conn.last_ping >= config.ping_interval:
                    conn.last_ping = now
                    self._out.send(conn, conn.codec.ping())
                next_due = min(next_due, conn.last_ping + config.ping_interval)
        self._broker.expire(now, lambda channel: self._channel_users.get(channel, 0) > 0)
        if self._channel_rates is not None:
            self._channel_rates.prune(now)
        self._records.tick(now)
        return next_due

    def token_due(self, conn: Connection, now: float) -> float | None:
        """When `tick` must next look at `conn`'s token (a `connect` deadline, a refresh
        to ask for, an expiry), or None: for the node, to tick sooner than planned."""
        if conn.pending:
            return conn.opened + self._connect_timeout
        expires = conn.identity.expires
        if expires is None:
            return None
        left = expires - self._wall_clock()
        return now + (left if conn.refresh_asked else left - self._refresh_before)

    def _check_token(self, conn: Connection, now: float, wall: float) -> float | None:
        """Closes a connection whose token expired (4419) or that sent no `connect` in
        time (4401), and asks for a refresh `refresh_before` seconds ahead. Returns when to
        look again (None: nothing to watch)."""
        if conn.pending:
            deadline = conn.opened + self._connect_timeout
            if now >= deadline:
                self.stats.auth_refused += 1
                message = f"no 'connect' within {self._connect_timeout:g} s"
                self._out.close(conn, CloseCode.UNAUTHORIZED, message)
            return deadline
        expires = conn.identity.expires
        if expires is None:
            return None
        left = expires - wall
        if left <= 0:
            self.stats.tokens_expired += 1
            self._out.close(conn, CloseCode.TOKEN_EXPIRED, "token expired")
            return None
        ask = left - self._refresh_before
        if ask <= 0:
            if not conn.refresh_asked:
                conn.refresh_asked = True
                self._out.send(conn, conn.codec.refresh(_seconds(left)))
            return now + left
        return now + ask

    # -- publishing ------------------------------------------------------------------------

    def publish(
        self,
        channel: str,
        data: Any,
        now: float,
        *,
        publisher: Connection | None = None,
        echo: bool = True,
        key: str | None = None,
    ) -> Publication:
        """Appends `data` to the channel's history and queues it for every subscriber.

        For server-side publishers and sources; `channel` must be a valid channel name. On a
        records channel, change records with `apply_record_change` instead: a publication
        that is not a record change is delivered, and clients' record stores skip it.
        """
        check_channel(channel)
        return self._publish(channel, data, now, publisher=publisher, echo=echo, key=key)

    def _publish(
        self,
        channel: str,
        data: Any,
        now: float,
        *,
        publisher: Connection | None = None,
        echo: bool = True,
        key: str | None = None,
        hlc: Timestamp | None = None,
        record: bool = False,
    ) -> Publication:
        publisher_id = publisher.id if publisher else None
        stamp = hlc or self._stamp()
        publication = self._broker.publish(
            channel, data, now, publisher=publisher_id, key=key, hlc=stamp, size=0
        )
        self.stats.publications += 1
        # A record change that is dropped would leave a client's copy stale for good: those
        # are never dropped, whatever the channel's policy (a slow client is disconnected).
        policy = SlowConsumerPolicy.DISCONNECT if record else self._policy(channel)
        skip = None if publisher is None or echo else publisher.handle
        self._fan_out(publication, policy, skip)
        return publication

    def deliver(self, publication: Publication, now: float) -> Publication | None:
        """A publication whose offset and epoch were assigned elsewhere (another node, by a
        storage engine shared between nodes): taken into the local history (`Broker.accept`)
        and queued for this hub's subscribers as `publish` does, with its own offset and
        epoch. Returns it (stamped with `now`), or None if history has it already (a
        duplicate: nothing is sent). A publication past the local top + 1 or of another
        epoch starts the local stream there, so a client resuming from before it is told
        `recovered: false`. Plain publications only: records channels and row events are
        kept by their own engine parts (ValueError)."""
        channel = publication.channel
        check_channel(channel)
        if publication.change is not None or self.is_records_channel(channel):
            raise ValueError("deliver takes plain publications, not records or row events")
        if publication.hlc is not None:
            self.clock.update(publication.hlc, self._physical())
        local = self._broker.accept(publication, now, size=0)
        if local is None:
            return None
        self.stats.publications += 1
        self._fan_out(local, self._policy(channel), None)
        return local

    def _fan_out(
        self, publication: Publication, policy: SlowConsumerPolicy, skip: int | None
    ) -> None:
        """Encodes a publication once (its size counts against the history budget) and hands
        it to the deliverer; queues it for the recipients handed back."""
        channel, key = publication.channel, publication.key
        native = self._native.publication(publication)
        self._broker.charge(publication, len(native))
        # The Rust fan-out matches the channel and writes the frame to every recipient that
        # can take it now; the rest come back here, to their outbox and its policy.
        slow, woken, direct, seconds = self._deliverer.publish(self._matcher, channel, native, skip)
        self.stats.match_seconds += seconds
        self.stats.matches += 1
        self._out.count_direct(direct, len(native), woken)
        if slow:
            conflation_key = (channel, key) if key is not None else None
            self._out.queue_slow(
                slow, native, lambda codec: codec.publication(publication), policy, conflation_key
            )

    # -- row events (database sources) -----------------------------------------------------

    def publish_change(
        self, change: PgChange, now: float, *, max_bytes: int | None = None
    ) -> Publication:
        """A row change from a database source: appended to its table's channel
        (`table_channel`) and queued, as one frame per codec, for the joins whose row
        subscriptions match it (found by the Rust matcher) and for plain joins of the channel.

        The payload is the change's Supabase-shaped JSON, encoded once; over `max_bytes` it
        keeps only small fields and says so in `errors` (PgChange.to_json)."""
        return self._row_events.publish_change(change, now, max_bytes)

    def publish_truncate(
        self,
        schema: str,
        table: str,
        now: float,
        *,
        commit_timestamp: str | None = None,
        columns: list[tuple[str, str]] | None = None,
    ) -> Publication:
        """A TRUNCATE of `schema.table`: an event of type TRUNCATE on its channel, for the
        row subscriptions of every event (`*`) on the table, whatever their filter."""
        return self._row_events.publish_truncate(schema, table, now, commit_timestamp, columns)

    def reset_channels(self, pattern: str, now: float) -> list[str]:
        """History of the channels matching `pattern` was lost upstream (a database source
        lost its replication slot): each gets a new epoch, and each connection joined to one
        by name gets a `reset` push (recovered: false). Returns the channels reset."""
        check_channel(pattern, pattern=True)
        matcher = Matcher()
        matcher.add_channel(0, pattern)
        names = {c for c in self._broker.channels() if not _is_pattern(c)}
        names.update(c for c in self._channel_users if not _is_pattern(c))
        reset = sorted(c for c in names if matcher.match_channel(c))
        positions = {channel: self._broker.reset(channel, now) for channel in reset}
        for conn in list(self._connections.values()):
            for channel in conn.joins:
                position = positions.get(channel)
                if position is not None:
                    self._out.send(conn, conn.codec.reset(channel, position))
        return reset

    def history_position(self, channel: str, now: float) -> StreamPosition:
        return self._broker.position(channel, now)

    def history(self, channel: str, now: float, since: StreamPosition | None = None) -> Recovery:
        """The channel's retained publications after `since` (all retained ones without it).

        With `since`, `recovered` says whether they are all there (as for a join with `since`);
        without, whether the retained ones reach back to the channel's first publication.
        """
        check_channel(channel)
        return self._broker.history(channel, now, since)

    def presence(self, channel: str) -> Mapping[str, tuple[Any, ...]]:
        return self._broker.presence(channel)

    def channels(self) -> dict[str, int]:
        """Joined channels and patterns with their subscriber counts."""
        return dict(self._channel_users)

    def _policy(self, channel: str) -> SlowConsumerPolicy:
        if self._policies:
            matches = self._policy_matcher.match_channel(channel)
            if matches:
                return self._policies[min(matches)]
        return self.config.slow_consumer_policy

    # -- who may write where --------------------------------------------------------------

    def own_channels(self, owner: str, patterns: Iterable[str]) -> None:
        """Declares channels that `owner` (a source, or your own server-side publisher)
        feeds: clients may not publish to them or mutate their records (error 423), unless a
        pattern of `client_writable` opens them. Server-side publishing is not affected."""
        for pattern in patterns:
            check_channel(pattern, pattern=True)
            self._owned.add_channel(len(self._owners), pattern)
            self._owners.append(owner)

    def channel_owner(self, channel: str) -> str | None:
        """The owner of `channel` if it is read-only to clients (see `own_channels`)."""
        if not self._owners:
            return None
        owners = self._owned.match_channel(channel)
        if not owners or self._writable.match_channel(channel):
            return None
        return self._owners[min(owners)]

    def client_write_refusal(self, channel: str) -> str | None:
        """Why a client (a connection, the REST API) may not write to `channel`, or None.
        Counts the refusal."""
        owner = self.channel_owner(channel)
        if owner is None:
            return None
        self.stats.read_only_refused += 1
        return f"'{channel}' is read-only to clients: {owner} publishes to it"

    def take_publish_rate(self, channels: Iterable[str], now: float) -> float:
        """Counts one client publication (or mutation) on each of `channels` against
        `channel_publish_rate`, all of them or none: 0 when taken, otherwise the seconds until
        every channel takes one again (the refusal is counted)."""
        if self._channel_rates is None:
            return 0.0
        wait = self._channel_rates.take(channels, now)
        if wait:
            self.stats.channel_rate_limited += 1
        return _seconds(wait) if wait else 0.0

    def _may_write(self, conn: Connection, rid: RequestId, channel: str) -> bool:
        refusal = self.client_write_refusal(channel)
        if refusal is not None:
            self._out.error(conn, rid, ErrorCode.READ_ONLY, refusal)
            return False
        return True

    def _payload_fits(
        self, conn: Connection, rid: RequestId, size: int, value: Any, what: str
    ) -> bool:
        """Whether `value` (from a frame of `size` bytes) is within `max_payload_bytes`; else
        error 413. The frame's size bounds the value's: only encode again when it is over."""
        limit = self.config.max_payload_bytes
        if size > limit and len(orjson.dumps(value)) > limit:
            self._out.error(
                conn, rid, ErrorCode.PAYLOAD_TOO_LARGE, f"{what} larger than {limit} bytes"
            )
            return False
        return True

    def _channel_admits(self, conn: Connection, rid: RequestId, channel: str, now: float) -> bool:
        wait = self.take_publish_rate((channel,), now)
        if wait:
            rate = self.config.channel_publish_rate
            message = f"'{channel}' takes at most {rate:g} publications per second"
            self._out.error(
                conn, rid, ErrorCode.CHANNEL_RATE_LIMITED, message, {"retry_after": wait}
            )
            return False
        return True

    def _client_may_write(
        self,
        conn: Connection,
        rid: RequestId,
        channel: str,
        action: Action,
        verdict: bool | None,
    ) -> bool:
        """Whether a client may write to `channel` (a valid name, allowed by the rules,
        joined if the config asks, not read-only); else the error is sent."""
        verb = "publishing" if action is Action.PUBLISH else "mutating"
        try:
            check_channel(channel)
        except ChannelNameError as e:
            self._out.error(conn, rid, ErrorCode.INVALID_CHANNEL, str(e))
            return False
        if self._refused(conn, rid, self.grant(conn, action, channel, verdict)):
            return False
        if self.config.publish_requires_join and channel not in conn.joins:
            self._out.error(conn, rid, ErrorCode.FORBIDDEN, f"join '{channel}' before {verb}")
            return False
        return self._may_write(conn, rid, channel)

    def _client_publish(
        self, conn: Connection, command: Publish, now: float, verdict: bool | None = None
    ) -> None:
        rid, channel = command.id, command.channel
        if not self._client_may_write(conn, rid, channel, Action.PUBLISH, verdict):
            return
        if self._records.policy(channel) is not None:
            message = f"'{channel}' holds records: change them with mutate"
            self._out.error(conn, rid, ErrorCode.NOT_ALLOWED, message)
            return
        if not self._payload_fits(conn, rid, command.size, command.data, "data"):
            return
        if not self._channel_admits(conn, rid, channel, now):
            return
        publication = self.publish(
            channel, command.data, now, publisher=conn, echo=command.echo, key=command.key
        )
        if command.ack and rid is not None:
            self._out.reply(conn, rid, {"offset": publication.offset, "epoch": publication.epoch})

    # -- joining ---------------------------------------------------------------------------

    def _join(
        self, conn: Connection, command: Join, now: float, verdict: bool | None = None
    ) -> None:
        rid, channel = command.id, command.channel
        try:
            check_channel(channel, pattern=True)
        except ChannelNameError as e:
            self._out.error(conn, rid, ErrorCode.INVALID_CHANNEL, str(e))
            return
        pattern = _is_pattern(channel)
        if pattern and (command.since is not None or command.presence):
            message = "'since' and 'presence' need a channel name, not a pattern"
            self._out.error(conn, rid, ErrorCode.BAD_REQUEST, message)
            return
        if channel in conn.joins:
            self._out.error(conn, rid, ErrorCode.ALREADY_JOINED, f"already joined to '{channel}'")
            return
        if len(conn.joins) >= self.config.max_channels_per_connection:
            limit = self.config.max_channels_per_connection
            self._out.error(conn, rid, ErrorCode.TOO_MANY_CHANNELS, f"at most {limit} channels")
            return
        grant = self.grant(conn, Action.SUBSCRIBE, channel, verdict)
        if self._refused(conn, rid, grant):
            return
        limited = grant.row_filter is not None or grant.columns is not None
        if limited and not command.changes:
            # The rule shows this identity only some rows or columns: a plain join would
            # get every row, whole. Row subscriptions carry the rule's filter and columns.
            message = f"'{channel}' is filtered for you: join it with 'changes'"
            self._refused(conn, rid, Grant(False, message, None, None))
            return
        if command.presence and self._refused(
            conn, rid, self.grant(conn, Action.PRESENCE, channel, verdict)
        ):
            return
        may_recover = True
        if command.since is not None:
            may_recover = self.grant(conn, Action.HISTORY, channel, verdict).allowed
            if not may_recover:
                self.stats.auth_refused += 1
        row_ids: tuple[int, ...] = ()
        if command.changes:
            specs = command.changes
            hidden = hidden_column(specs, grant.columns)
            if hidden is not None:
                message = f"'{channel}': you may not filter on column {hidden!r}"
                self._refused(conn, rid, Grant(False, message, None, None))
                return
            if limited:
                specs = tuple(
                    attrs.evolve(c, filter=Rules.and_filter(grant.row_filter, c.filter))
                    for c in specs
                )
            try:
                row_ids = self._rows.add(conn.id, conn, specs, grant.columns, grant.row_filter)
            except InvalidRowSubscription as e:
                details = {"index": e.index, "reason": e.reason, "position": e.position}
                self.stats.errors += 1
                self._out.send(conn, conn.codec.error(rid, ErrorCode.BAD_REQUEST, str(e), details))
                return
        self._add_join(conn, command, row_ids, now, may_recover)

    def _add_join(
        self,
        conn: Connection,
        command: Join,
        row_ids: tuple[int, ...],
        now: float,
        may_recover: bool = True,
    ) -> None:
        """Makes the join (checked); `may_recover` False: the rules refuse this identity
        the channel's history, so a `since` is answered `recovered: false`, nothing
        replayed (told, never a silent gap)."""
        rid, channel = command.id, command.channel
        pattern = _is_pattern(channel)
        sub_id = next(self._sub_ids)
        if not row_ids:
            self._matcher.add_channel(sub_id, channel)
            self._deliverer.subscribe(sub_id, conn.handle)
        self._subscribers[sub_id] = (conn, channel)
        conn.joins[channel] = ChannelJoin(sub_id, command.presence, row_ids=row_ids)
        self._channel_users[channel] = self._channel_users.get(channel, 0) + 1
        if pattern:
            reply: dict[str, Any] = {"channel": channel}
            if row_ids:
                reply["changes"] = [
                    c.encode(i) for c, i in zip(command.changes, row_ids, strict=True)
                ]
            self._out.reply(conn, rid, reply)
            return
        result: dict[str, Any]
        missed: tuple[Publication, ...] = ()
        if command.since is None:
            position = self._broker.position(channel, now)
            result = {"channel": channel, "offset": position.offset, "epoch": position.epoch}
        else:
            if may_recover:
                recovery = self._broker.history(channel, now, command.since)
            else:
                position = self._broker.position(channel, now)
                recovery = Recovery(False, (), position)
            if recovery.recovered:
                self.stats.recoveries += 1
            else:
                self.stats.recovery_misses += 1
            missed = recovery.publications
            position = recovery.position
            result = {
                "channel": channel,
                "offset": position.offset,
                "epoch": position.epoch,
                "recovered": recovery.recovered,
            }
        self._records.describe(channel, result)
        if row_ids:
            result["changes"] = [c.encode(i) for c, i in zip(command.changes, row_ids, strict=True)]
        # Reply first, then the missed publications, then (later) live ones: all in order,
        # because nothing else can run between these lines.
        self._out.reply(conn, rid, result)
        policy = self._policy(channel)
        if row_ids:
            self._row_events.replay(conn, row_ids, missed, policy)
            missed = ()
        for publication in missed:
            key = (channel, publication.key) if publication.key is not None else None
            self._out.send(conn, conn.codec.publication(publication), policy=policy, key=key)
        if command.presence:
            self._presence.watch(conn, channel)

    def _drop_join(self, conn: Connection, channel: str) -> None:
        join = conn.joins.pop(channel)
        self._matcher.remove(join.sub_id)
        self._deliverer.unsubscribe(join.sub_id)
        self._rows.remove(conn.id, join.row_ids)
        del self._subscribers[join.sub_id]
        users = self._channel_users[channel] - 1
        if users:
            self._channel_users[channel] = users
        else:
            del self._channel_users[channel]
        self._presence.left(conn, channel, join)

    # -- records ---------------------------------------------------------------------------

    def records(self, channel: str) -> list[Record]:
        """The records of a records channel (tombstones included), by key."""
        return self._records.existing(channel).records()

    @property
    def record_stores(self) -> Mapping[str, RecordTable]:
        """The record store of every records channel used so far, by channel (for metrics)."""
        return self._broker.record_tables()

    def record(self, channel: str, key: str) -> Record:
        """One record (with `value` None if it does not exist)."""
        return self._records.existing(channel).get(key)

    def apply_record_change(
        self,
        channel: str,
        key: str,
        value: Mapping[str, Any] | None,
        now: float,
        *,
        source_version: int | None = None,
    ) -> Publication | None:
        """A record changed at its source of truth (a row in Postgres): set it to `value`
        (None: deleted), whatever the channel's conflict policy, and publish the change.

        `source_version` is the source's own, increasing version of the row (a version
        column, the commit LSN): a change not newer than the last one applied for `key` is a
        replay and is skipped. Returns the publication, or None if nothing changed.
        """
        check_channel(channel)
        return self._records.apply_change(channel, key, value, now, source_version)

    def is_records_channel(self, channel: str) -> bool:
        """Whether `channel` (a name) holds records: a pattern of `record_policies` matches."""
        return self._records.policy(channel) is not None

    def mutate(self, channel: str, mutation: Mutation, now: float) -> MutationReply:
        """Changes a record from server-side code (the REST API) exactly as a client's
        `mutate` does: under the channel's conflict policy, at most once per idempotency key
        (`origin`, `seq`) if it has one, published if it applied. ValueError if `channel`
        holds no records."""
        check_channel(channel)
        table = self._records.existing(channel)
        return self._records.mutate(table, channel, mutation, now, None)

    def _publish_record(
        self,
        channel: str,
        data: Any,
        now: float,
        publisher: Connection | None,
        key: str,
        hlc: Timestamp,
    ) -> Publication:
        return self._publish(channel, data, now, publisher=publisher, key=key, hlc=hlc, record=True)

    def _stamp(self) -> Timestamp:
        return self.clock.now(self._physical())

    def _physical(self) -> int:
        return int(self._wall_clock() * 1000)

    def _mutate(
        self, conn: Connection, command: Mutate, now: float, verdict: bool | None = None
    ) -> None:
        rid, channel, mutation = command.id, command.channel, command.mutation
        if not self._client_may_write(conn, rid, channel, Action.MUTATE, verdict):
            return
        table = self._records.table(channel)
        if table is None:
            message = f"'{channel}' holds no records (no record policy matches it)"
            self._out.error(conn, rid, ErrorCode.NOT_ALLOWED, message)
            return
        if not self._payload_fits(conn, rid, command.size, mutation.value, "value"):
            return
        if not self._channel_admits(conn, rid, channel, now):
            return
        reply = self._records.mutate(table, channel, mutation, now, conn)
        if reply.ok is not None:
            self._out.reply(conn, rid, reply.ok)
        else:
            assert reply.code is not None
            self._out.error(conn, rid, reply.code, reply.message, {"record": reply.record})
