"""The hub: channels, broadcast, history and recovery, presence, liveness, slow consumers.

Sans-IO and synchronous (docs/architecture.md): the node calls `open`, `receive`, `tick` and
`disconnect` with the current time, then writes out what each connection's `outbox` holds
(`take_ready` names the connections with new frames) and closes what `take_closing` names.
Nothing here reads a clock or uses trio, which is what lets hypothesis drive it. One thing
does I/O: the Rust fan-out the hub owns writes publications straight to the sockets that
transports attached (`attach_socket`); a hub with no socket attached writes nothing.

Routing goes through the Rust matcher; a publication is encoded once per codec and the same
frame object is queued for every recipient.

Every publication is stamped with the hub's hybrid logical clock. Channels matching a pattern
of `record_policies` are *records channels*: they hold keyed records changed by `mutate`
commands under the channel's conflict policy and by `apply_record_change` (a database source);
each change is a publication like any other, so history and recovery carry them, and a join
that does not resume gets the records as a snapshot (pyrt.conflict, docs/conflicts.md).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .._core import Matcher, OutboxBudget, PgChange, check_channel
from .._errors import ChannelNameError
from ..conflict import (
    ConflictPolicy,
    HybridClock,
    Mutation,
    Outcome,
    Record,
    Resolver,
    Timestamp,
    origin_tag,
    policy_named,
)
from .broker import DurableHistory, MemoryBroker, RecordTable, StorageEngine
from .config import HubConfig as HubConfig
from .config import HubStats as HubStats
from .connection import DEFAULT as DEFAULT
from .connection import ChannelJoin
from .connection import Connection as Connection
from .connection import _Default as _Default
from .deliverer import DelivererFactory, SocketDeliverer, fan_out
from .history import HistoryBudget, Publication, Recovery, StreamPosition
from .limits import Admission, ChannelRates, CommandRate
from .outbox import Outbox, SlowConsumerPolicy
from .presence import PresenceDiff
from .protocol import (
    CloseCode,
    Command,
    ErrorCode,
    Join,
    JsonCodec,
    Leave,
    Mutate,
    Ping,
    PresenceQuery,
    ProtocolError,
    Publish,
    RequestId,
    Track,
    Untrack,
    encode_record,
    table_channel,
)
from .rows import TRUNCATE, InvalidRowSubscription, RowSubscriptions

if TYPE_CHECKING:
    from .historylog import HistoryLog


@attrs.frozen(slots=True)
class MutationReply:
    """The hub's answer to a mutation, as the `mutate` command's reply carries it: `ok`, the
    reply (`applied`, `record`...), or an error `code` and `message` with the current
    `record` (a conflict)."""

    outcome: Outcome
    ok: Mapping[str, Any] | None = None
    code: ErrorCode | None = None
    message: str = ""
    record: Mapping[str, Any] | None = None


def _seconds(wait: float) -> float:
    """A wait as clients are told it: in seconds, rounded up to the millisecond."""
    return math.ceil(wait * 1000) / 1000


def _is_pattern(channel: str) -> bool:
    return any(segment in ("*", ">") for segment in channel.split(":"))


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
        self._record_policies = [
            policy_named(name, resolvers) for name in self.config.record_policies.values()
        ]
        self._record_matcher = Matcher()
        for index, pattern in enumerate(self.config.record_policies):
            self._record_matcher.add_channel(index, pattern)
        self._connections: dict[str, Connection] = {}
        self._conn_numbers = itertools.count(1)
        self._sub_ids = itertools.count(1)
        self._matcher = Matcher()
        self._subscribers: dict[int, tuple[Connection, str]] = {}
        self._channel_users: dict[str, int] = {}
        self._presence_members: dict[str, dict[str, Connection]] = {}
        self._native = JsonCodec()
        """The codec of the frames the fan-out writes directly (attached connections')."""
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
        self._ready: dict[str, Connection] = {}
        self._closing: dict[str, tuple[CloseCode, str]] = {}
        self._outbox_budget = OutboxBudget(self.config.outbox_total_bytes)
        self._deliverer = (deliverer or fan_out)(self._outbox_budget, self.config)
        self._sockets = self._deliverer if isinstance(self._deliverer, SocketDeliverer) else None
        """The deliverer, if it writes to sockets (None: `attach_socket` says no)."""
        self._rows = RowSubscriptions(self._deliverer)
        self._by_handle: dict[int, Connection] = {}
        self._corks = 0
        self._native = JsonCodec()
        """The codec of the frames the fan-out writes directly (attached connections')."""
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

    # -- connections -----------------------------------------------------------------------

    def open(
        self,
        now: float,
        codec: JsonCodec | None = None,
        *,
        transport: str = "websocket",
        idle_timeout: float | _Default | None = DEFAULT,
        pings: bool = True,
    ) -> Connection:
        """Registers a new connection and returns it (its `id` names it from now on).

        `idle_timeout` defaults to the config's; None leaves liveness to the transport (an
        SSE stream notices a gone client when a write fails). `pings=False` for transports
        that send their own heartbeats or cannot use them.
        """
        conn = Connection(
            id=f"{self.replica}.{next(self._conn_numbers)}",
            codec=codec or JsonCodec(),
            outbox=Outbox(
                self.config.outbox_messages, self.config.outbox_bytes, self._outbox_budget
            ),
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
        self._by_handle[conn.handle] = conn
        self.stats.connections_opened += 1
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
        for channel in list(conn.joins):
            self._drop_join(conn, channel)
        for channel, diff in self._broker.untrack_conn(conn.id).items():
            self._broadcast_presence(channel, diff)
        self._deliverer.close(conn.handle)  # detaches the socket: before the transport closes it
        conn.outbox.clear()  # what it held no longer counts against the budget
        del self._by_handle[conn.handle]
        conn.direct = False
        self._ready.pop(conn_id, None)
        self._closing.pop(conn_id, None)

    # -- the direct write path (Rust fan-out) ------------------------------------------------

    def attach_socket(self, conn: Connection, fd: int) -> bool:
        """Lets the fan-out write publications straight to the socket `fd` (a WebSocket
        carrying this hub's native JSON frames). Returns False when it cannot (direct writes
        are off, or the connection uses another codec): then everything goes through the
        outbox as before. The transport must then write only what `take_wire` hands it,
        call `release` when it has written everything, and end the connection
        (`disconnect`) before it closes the socket."""
        sockets = self._sockets
        if sockets is None or not self.config.direct_writes:
            return False
        if conn.codec.name != self._native.name:
            return False
        if conn.id not in self._connections or conn.closing is not None:
            return False
        # Up to outbox_bytes wait in the fan-out for a busy writer; more go to the outbox.
        sockets.attach(conn.handle, fd, self.config.outbox_bytes)
        conn.direct = True
        return True

    def take_wire(self, conn: Connection) -> bytes:
        """Bytes the fan-out could write only in part: the transport writes them first."""
        sockets = self._sockets
        return sockets.take_pending(conn.handle) if conn.direct and sockets is not None else b""

    def hold(self, conn: Connection) -> None:
        """The transport is about to write to the socket itself (a control frame): the
        fan-out leaves it alone until `release`."""
        sockets = self._sockets
        if conn.direct and sockets is not None:
            sockets.hold(conn.handle)

    def release(self, conn: Connection) -> bool:
        """The transport has written everything queued: the fan-out may write directly
        again. Returns whether it may (not if something is queued or closing)."""
        sockets = self._sockets
        if not conn.direct or sockets is None or len(conn.outbox) or conn.closing is not None:
            return False
        return sockets.release(conn.handle)

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Within it, direct writes are gathered per connection and sent when it ends, one
        write per connection (a burst of publications, a batch of row changes). Nests."""
        self._corks += 1
        if self._corks == 1:
            self._deliverer.cork()
        try:
            yield
        finally:
            self._corks -= 1
            if not self._corks:
                self._count_direct(0, 0, self._deliverer.uncork())

    def fanout_stats(self) -> dict[str, int]:
        """The Rust fan-out's counters (direct frames and bytes, partial and refused
        writes, overflows, backlog bytes, handles, attached sockets, subscriptions)."""
        return self._deliverer.stats()

    @property
    def outbox_budget(self) -> OutboxBudget:
        """What all outboxes and fan-out backlogs hold (`held`), against `outbox_total_bytes`."""
        return self._outbox_budget

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
        ready = list(self._ready.values())
        self._ready.clear()
        return ready

    def take_closing(self) -> list[tuple[str, CloseCode, str]]:
        """Connections the transport must close (after writing what their outbox holds)."""
        closing = [(conn_id, code, reason) for conn_id, (code, reason) in self._closing.items()]
        self._closing.clear()
        return closing

    def push(self, conn_id: str, frame: bytes) -> None:
        """Queues a frame the transport's protocol layer made itself (a reply that sums up
        several hub commands, a notice of its own), in order with the hub's frames."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            self._send(conn, frame)

    def shutdown(self, now: float) -> None:
        """Tells every client to reconnect elsewhere; the transport then closes them all."""
        for conn in list(self._connections.values()):
            reason = "server shutting down, reconnect"
            self._send(conn, conn.codec.disconnect(CloseCode.GOING_AWAY, reason))
            conn.told_to_go = True
            self._close(conn, CloseCode.GOING_AWAY, reason)

    # -- input -----------------------------------------------------------------------------

    def receive(self, conn_id: str, frame: str | bytes, now: float) -> None:
        """One frame from a client."""
        conn = self._connections.get(conn_id)
        if conn is None or conn.closing is not None:
            return
        conn.last_seen = now
        self.stats.frames_in += 1
        if len(frame) > self.config.max_frame_bytes:
            self.frame_too_big(conn_id)
            return
        admission = Admission.ACCEPT if conn.rate is None else conn.rate.admit(now)
        if admission is Admission.CLOSE:
            self.stats.rate_limit_closes += 1
            rate = self.config.command_rate
            self._close(conn, CloseCode.RATE_LIMITED, f"over {rate:g} commands per second")
            return
        try:
            command = conn.codec.decode(frame)
        except ProtocolError as e:
            if e.close is not None:
                self._close(conn, e.close, e.message)
            else:
                self._error(conn, e.id, e.code, e.message)
            return
        if admission is Admission.REFUSE:
            assert conn.rate is not None
            self.stats.rate_limited += 1
            rate = self.config.command_rate
            message = f"over {rate:g} commands per second: not carried out"
            retry = {"retry_after": _seconds(conn.rate.retry_after(now))}
            self._error(conn, command.id, ErrorCode.RATE_LIMITED, message, retry)
            return
        self.handle(conn, command, now)

    def close(self, conn_id: str, code: CloseCode, reason: str) -> None:
        """Asks the transport to close a connection (after what is queued for it)."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            self._close(conn, code, reason)

    def frame_too_big(self, conn_id: str) -> None:
        """Closes a connection that sent a frame over `max_frame_bytes` (1009)."""
        conn = self._connections.get(conn_id)
        if conn is not None:
            limit = self.config.max_frame_bytes
            self._close(conn, CloseCode.MESSAGE_TOO_BIG, f"frame larger than {limit} bytes")

    def handle(self, conn: Connection, command: Command, now: float) -> None:
        """One decoded command from a client."""
        match command:
            case Ping(rid):
                if rid is not None:
                    self._reply(conn, rid, {})
            case Publish():
                self._client_publish(conn, command, now)
            case Mutate():
                self._mutate(conn, command, now)
            case Join():
                self._join(conn, command, now)
            case Leave(rid, channel):
                if channel not in conn.joins:
                    self._error(conn, rid, ErrorCode.NOT_JOINED, f"not joined to '{channel}'")
                    return
                self._drop_join(conn, channel)
                self._reply(conn, rid, {})
            case Track():
                self._track(conn, command)
            case Untrack(rid, channel, key, ref):
                if self._require_presence_channel(conn, rid, channel):
                    diff = self._broker.untrack(channel, conn.id, key or conn.id, ref)
                    self._broadcast_presence(channel, diff)
                    self._reply(conn, rid, {})
            case PresenceQuery(rid, channel):
                if self._require_presence_channel(conn, rid, channel) and rid is not None:
                    self._send(
                        conn, conn.codec.presence_reply(rid, channel, self.presence(channel))
                    )

    def tick(self, now: float) -> float:
        """Heartbeats, idle timeouts and history expiry. Returns when to call again."""
        config = self.config
        next_due = now + config.ping_interval
        for conn in list(self._connections.values()):
            if conn.closing is not None:
                continue
            idle = conn.idle_timeout
            if idle is not None:
                if now - conn.last_seen >= idle:
                    self._close(conn, CloseCode.IDLE_TIMEOUT, f"nothing received for {idle:g} s")
                    continue
                next_due = min(next_due, conn.last_seen + idle)
            if conn.pings:
                if now - conn.last_ping >= config.ping_interval:
                    conn.last_ping = now
                    self._send(conn, conn.codec.ping())
                next_due = min(next_due, conn.last_ping + config.ping_interval)
        self._broker.expire(now, lambda channel: self._channel_users.get(channel, 0) > 0)
        if self._channel_rates is not None:
            self._channel_rates.prune(now)
        horizon = self._physical() - config.tombstone_ttl * 1000
        for store in self._broker.record_tables().values():
            store.expire(now, config.mutation_ttl)
            if store.tombstones:
                store.compact(horizon)
        return next_due

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
        self._count_direct(direct, len(native), woken)
        if slow:
            conflation_key = (channel, key) if key is not None else None
            self._queue_slow(
                slow, native, lambda codec: codec.publication(publication), policy, conflation_key
            )

    def _queue_slow(
        self,
        slow: list[int],
        native: bytes,
        make: Callable[[JsonCodec], bytes],
        policy: SlowConsumerPolicy,
        key: Any = None,
    ) -> None:
        """Queues a publication for the recipients the fan-out handed back (`slow`), in
        their outboxes under `policy`: the native frame, or what `make` makes with their
        codec (made once per codec)."""
        frames: dict[str, bytes] = {self._native.name: native}
        for handle in slow:
            conn = self._by_handle[handle]
            frame = frames.get(conn.codec.name)
            if frame is None:
                frame = frames[conn.codec.name] = make(conn.codec)
            self._send(conn, frame, droppable=True, policy=policy, key=key)

    def _count_direct(self, frames: int, size: int, woken: list[int]) -> None:
        """Accounts for frames the fan-out wrote; wakes the writers of partly written ones."""
        if frames:
            self.stats.frames_out += frames
            self.stats.direct_frames += frames
            self.stats.bytes_out += frames * size
        for handle in woken:
            conn = self._by_handle[handle]
            self._ready[conn.id] = conn

    # -- row events (database sources) -----------------------------------------------------

    def publish_change(
        self, change: PgChange, now: float, *, max_bytes: int | None = None
    ) -> Publication:
        """A row change from a database source: appended to its table's channel
        (`table_channel`) and queued, as one frame per codec, for the joins whose row
        subscriptions match it (found by the Rust matcher) and for plain joins of the channel.

        The payload is the change's Supabase-shaped JSON, encoded once; over `max_bytes` it
        keeps only small fields and says so in `errors` (PgChange.to_json)."""
        started = self._timer()
        ids = self._rows.matcher.match_change(change) if len(self._rows) else []
        self.stats.match_seconds += self._timer() - started
        self.stats.matches += 1
        channel = table_channel(change.schema, change.table)
        return self._publish_row(channel, change.to_json(max_bytes), change, ids, now)

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
        data = {
            "schema": schema,
            "table": table,
            "commit_timestamp": commit_timestamp,
            "type": "TRUNCATE",
            "columns": [{"name": n, "type": t} for n, t in columns or ()],
            "errors": None,
        }
        ids = self._rows.truncate_ids(schema, table)
        channel = table_channel(schema, table)
        return self._publish_row(channel, orjson.dumps(data), (TRUNCATE, schema, table), ids, now)

    def _publish_row(
        self, channel: str, payload: bytes, change: Any, ids: list[int], now: float
    ) -> Publication:
        publication = self._broker.publish(
            channel, orjson.Fragment(payload), now, hlc=self._stamp(), change=change, size=0
        )
        self.stats.publications += 1
        ids.sort()
        native = self._native.change(publication, ids)
        # History counts its `pub` frame, which is this one without `"ids":[...],`.
        self._broker.charge(publication, len(native) - len(orjson.dumps(ids)) - 7)
        # The Rust fan-out finds who holds the ids (and who joined the table's channel: plain
        # joins get every row) and writes the frame to every one it can; the rest come back.
        slow, woken, direct, seconds = self._deliverer.publish_rows(
            ids, native, self._matcher, channel
        )
        self.stats.match_seconds += seconds
        self._count_direct(direct, len(native), woken)
        if slow:
            policy = self._policy(channel)
            self._queue_slow(slow, native, lambda codec: codec.change(publication, ids), policy)
        return publication

    def _replay_rows(
        self,
        conn: Connection,
        row_ids: tuple[int, ...],
        missed: tuple[Publication, ...],
        policy: SlowConsumerPolicy,
    ) -> None:
        """Sends a recovering row subscriber the missed row events its filters match."""
        rows = [p for p in missed if p.change is not None]
        matched = self._rows.replay(row_ids, [p.change for p in rows])
        for publication, ids in zip(rows, matched, strict=True):
            if ids:
                self._send(conn, conn.codec.change(publication, ids), policy=policy)

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
                    self._send(conn, conn.codec.reset(channel, position))
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
            self._error(conn, rid, ErrorCode.READ_ONLY, refusal)
            return False
        return True

    def _channel_admits(self, conn: Connection, rid: RequestId, channel: str, now: float) -> bool:
        wait = self.take_publish_rate((channel,), now)
        if wait:
            rate = self.config.channel_publish_rate
            message = f"'{channel}' takes at most {rate:g} publications per second"
            self._error(conn, rid, ErrorCode.CHANNEL_RATE_LIMITED, message, {"retry_after": wait})
            return False
        return True

    def _client_publish(self, conn: Connection, command: Publish, now: float) -> None:
        rid, channel = command.id, command.channel
        try:
            check_channel(channel)
        except ChannelNameError as e:
            self._error(conn, rid, ErrorCode.INVALID_CHANNEL, str(e))
            return
        if self.config.publish_requires_join and channel not in conn.joins:
            self._error(conn, rid, ErrorCode.FORBIDDEN, f"join '{channel}' before publishing")
            return
        if not self._may_write(conn, rid, channel):
            return
        if self._record_policy(channel) is not None:
            message = f"'{channel}' holds records: change them with mutate"
            self._error(conn, rid, ErrorCode.NOT_ALLOWED, message)
            return
        limit = self.config.max_payload_bytes
        # The frame's size bounds the data's: only encode again when the bound is too big.
        if command.size > limit and len(orjson.dumps(command.data)) > limit:
            self._error(conn, rid, ErrorCode.PAYLOAD_TOO_LARGE, f"data larger than {limit} bytes")
            return
        if not self._channel_admits(conn, rid, channel, now):
            return
        publication = self.publish(
            channel, command.data, now, publisher=conn, echo=command.echo, key=command.key
        )
        if command.ack and rid is not None:
            self._reply(conn, rid, {"offset": publication.offset, "epoch": publication.epoch})

    # -- joining ---------------------------------------------------------------------------

    def _join(self, conn: Connection, command: Join, now: float) -> None:
        rid, channel = command.id, command.channel
        try:
            check_channel(channel, pattern=True)
        except ChannelNameError as e:
            self._error(conn, rid, ErrorCode.INVALID_CHANNEL, str(e))
            return
        pattern = _is_pattern(channel)
        if pattern and (command.since is not None or command.presence):
            message = "'since' and 'presence' need a channel name, not a pattern"
            self._error(conn, rid, ErrorCode.BAD_REQUEST, message)
            return
        if channel in conn.joins:
            self._error(conn, rid, ErrorCode.ALREADY_JOINED, f"already joined to '{channel}'")
            return
        if len(conn.joins) >= self.config.max_channels_per_connection:
            limit = self.config.max_channels_per_connection
            self._error(conn, rid, ErrorCode.TOO_MANY_CHANNELS, f"at most {limit} channels")
            return
        row_ids: tuple[int, ...] = ()
        if command.changes:
            try:
                row_ids = self._rows.add(conn.id, conn, command.changes)
            except InvalidRowSubscription as e:
                details = {"index": e.index, "reason": e.reason, "position": e.position}
                self.stats.errors += 1
                self._send(conn, conn.codec.error(rid, ErrorCode.BAD_REQUEST, str(e), details))
                return
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
            self._reply(conn, rid, reply)
            return
        result: dict[str, Any]
        missed: tuple[Publication, ...] = ()
        if command.since is None:
            position = self._broker.position(channel, now)
            result = {"channel": channel, "offset": position.offset, "epoch": position.epoch}
        else:
            recovery = self._broker.history(channel, now, command.since)
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
        store = self._record_store(channel)
        if store is not None:
            result["policy"] = store.policy.name
            result["mutation_ttl"] = self.config.mutation_ttl
            if not result.get("recovered"):
                # The records as of `offset`: changes after it follow as publications.
                result["records"] = [encode_record(r) for r in store.records()]
                if store.forgotten is not None:
                    # Records not listed are absent at least up to this version.
                    result["forgotten"] = store.forgotten.encode()
        if row_ids:
            result["changes"] = [c.encode(i) for c, i in zip(command.changes, row_ids, strict=True)]
        # Reply first, then the missed publications, then (later) live ones: all in order,
        # because nothing else can run between these lines.
        self._reply(conn, rid, result)
        policy = self._policy(channel)
        if row_ids:
            self._replay_rows(conn, row_ids, missed, policy)
            missed = ()
        for publication in missed:
            key = (channel, publication.key) if publication.key is not None else None
            self._send(conn, conn.codec.publication(publication), policy=policy, key=key)
        if command.presence:
            self._presence_members.setdefault(channel, {})[conn.id] = conn
            self._send(conn, conn.codec.presence_state(channel, self._broker.presence(channel)))

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
        members = self._presence_members.get(channel)
        if members is not None:
            members.pop(conn.id, None)
            if not members:
                del self._presence_members[channel]
        for key in join.tracked_keys:
            self._broadcast_presence(channel, self._broker.untrack(channel, conn.id, key))

    # -- records ---------------------------------------------------------------------------

    def records(self, channel: str) -> list[Record]:
        """The records of a records channel (tombstones included), by key."""
        store = self._record_store(channel)
        if store is None:
            raise ValueError(f"'{channel}' is not a records channel (see record_policies)")
        return store.records()

    @property
    def record_stores(self) -> Mapping[str, RecordTable]:
        """The record store of every records channel used so far, by channel (for metrics)."""
        return self._broker.record_tables()

    def record(self, channel: str, key: str) -> Record:
        """One record (with `value` None if it does not exist)."""
        store = self._record_store(channel)
        if store is None:
            raise ValueError(f"'{channel}' is not a records channel (see record_policies)")
        return store.get(key)

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
        store = self._record_store(channel)
        if store is None:
            raise ValueError(f"'{channel}' is not a records channel (see record_policies)")
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"a record's value is a mapping or None, not {type(value).__name__}")
        version = self._stamp()
        record = store.write(key, value, version, source_version=source_version)
        if record is None:
            return None
        return self._publish(channel, encode_record(record), now, key=key, hlc=version, record=True)

    def is_records_channel(self, channel: str) -> bool:
        """Whether `channel` (a name) holds records: a pattern of `record_policies` matches."""
        return self._record_policy(channel) is not None

    def _record_policy(self, channel: str) -> ConflictPolicy | None:
        if not self._record_policies:
            return None
        matches = self._record_matcher.match_channel(channel)
        return self._record_policies[min(matches)] if matches else None

    def _record_store(self, channel: str) -> RecordTable | None:
        store = self._broker.record_table(channel)
        if store is None:
            policy = self._record_policy(channel)
            if policy is None or _is_pattern(channel):
                return None
            store = self._broker.new_record_table(channel, policy)
        return store

    def _stamp(self) -> Timestamp:
        return self.clock.now(self._physical())

    def _physical(self) -> int:
        return int(self._wall_clock() * 1000)

    def mutate(self, channel: str, mutation: Mutation, now: float) -> MutationReply:
        """Changes a record from server-side code (the REST API) exactly as a client's
        `mutate` does: under the channel's conflict policy, at most once per idempotency key
        (`origin`, `seq`) if it has one, published if it applied. ValueError if `channel`
        holds no records."""
        check_channel(channel)
        store = self._record_store(channel)
        if store is None:
            raise ValueError(f"'{channel}' is not a records channel (see record_policies)")
        return self._apply_mutation(store, channel, mutation, now, None)

    def _mutate(self, conn: Connection, command: Mutate, now: float) -> None:
        rid, channel, mutation = command.id, command.channel, command.mutation
        try:
            check_channel(channel)
        except ChannelNameError as e:
            self._error(conn, rid, ErrorCode.INVALID_CHANNEL, str(e))
            return
        if self.config.publish_requires_join and channel not in conn.joins:
            self._error(conn, rid, ErrorCode.FORBIDDEN, f"join '{channel}' before mutating")
            return
        if not self._may_write(conn, rid, channel):
            return
        store = self._record_store(channel)
        if store is None:
            message = f"'{channel}' holds no records (no record policy matches it)"
            self._error(conn, rid, ErrorCode.NOT_ALLOWED, message)
            return
        limit = self.config.max_payload_bytes
        if command.size > limit and len(orjson.dumps(mutation.value)) > limit:
            self._error(conn, rid, ErrorCode.PAYLOAD_TOO_LARGE, f"value larger than {limit} bytes")
            return
        if not self._channel_admits(conn, rid, channel, now):
            return
        self._mutation_reply(conn, rid, self._apply_mutation(store, channel, mutation, now, conn))

    def _apply_mutation(
        self,
        store: RecordTable,
        channel: str,
        mutation: Mutation,
        now: float,
        publisher: Connection | None,
    ) -> MutationReply:
        origin, seq = mutation.origin, mutation.seq
        if origin is not None and seq is not None:
            processed, reply = store.recall(origin, seq, now)
            if processed:
                # Sent again (the client did not hear back): answer as the first time, and
                # apply nothing. Its publication, if any, went out already.
                self.stats.duplicate_mutations += 1
                if reply is None:
                    current = encode_record(store.get(mutation.key))
                    ok = {"applied": None, "duplicate": True, "record": current}
                    reply = MutationReply(Outcome.UNKNOWN, ok)
                assert isinstance(reply, MutationReply)
                return reply
        physical = self._physical()
        stamp = mutation.hlc
        if stamp is not None:
            if stamp.wall - physical > self.config.max_clock_drift * 1000:
                # Too far ahead to trust (it would win every race for that long): the hub
                # stamps the write itself.
                mutation = attrs.evolve(mutation, hlc=None)
            else:
                self.clock.update(stamp, physical)
        version = self.clock.now(physical)
        result = store.apply(mutation, version)
        self.stats.mutations += 1
        assert result.record is not None
        record = encode_record(result.record)
        if result.outcome is Outcome.APPLIED:
            data = dict(record)
            if origin is not None:
                data.update(writer=origin_tag(origin), seq=seq)
            publication = self._publish(
                channel, data, now, publisher=publisher, key=mutation.key, hlc=version, record=True
            )
            position = {"offset": publication.offset, "epoch": publication.epoch}
            reply = MutationReply(result.outcome, {"applied": True, "record": record, **position})
        elif result.outcome is Outcome.UNCHANGED:
            reply = MutationReply(result.outcome, {"applied": False, "record": record})
        else:
            self.stats.conflicts += 1
            reply = MutationReply(result.outcome, None, ErrorCode.CONFLICT, result.message, record)
        if origin is not None and seq is not None:
            store.remember(origin, seq, reply, now)
        return reply

    def _mutation_reply(self, conn: Connection, rid: RequestId, reply: MutationReply) -> None:
        if reply.ok is not None:
            self._reply(conn, rid, reply.ok)
        else:
            assert reply.code is not None
            self.stats.errors += 1
            details = {"record": reply.record}
            self._send(conn, conn.codec.error(rid, reply.code, reply.message, details))

    # -- presence --------------------------------------------------------------------------

    def _require_presence_channel(self, conn: Connection, rid: RequestId, channel: str) -> bool:
        if channel not in conn.joins:
            self._error(conn, rid, ErrorCode.NOT_JOINED, f"not joined to '{channel}'")
            return False
        if _is_pattern(channel):
            message = "presence needs a channel name, not a pattern"
            self._error(conn, rid, ErrorCode.BAD_REQUEST, message)
            return False
        return True

    def _track(self, conn: Connection, command: Track) -> None:
        rid, channel = command.id, command.channel
        if not self._require_presence_channel(conn, rid, channel):
            return
        key = command.key or conn.id
        try:
            ref, diff = self._broker.track(channel, conn.id, key, command.meta, command.ref)
        except KeyError:
            self._error(conn, rid, ErrorCode.BAD_REQUEST, f"no presence entry '{command.ref}'")
            return
        conn.joins[channel].tracked_keys.add(key)
        self._broadcast_presence(channel, diff)
        self._reply(conn, rid, {"ref": ref})

    def _broadcast_presence(self, channel: str, diff: PresenceDiff) -> None:
        members = self._presence_members.get(channel)
        if not members or diff.is_empty():
            return
        frames: dict[str, bytes] = {}
        for conn in members.values():
            frame = frames.get(conn.codec.name)
            if frame is None:
                frame = frames[conn.codec.name] = conn.codec.presence_diff(channel, diff)
            self._send(conn, frame)

    # -- output ----------------------------------------------------------------------------

    def _send(
        self,
        conn: Connection,
        frame: bytes,
        *,
        droppable: bool = False,
        policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT,
        key: Any = None,
    ) -> None:
        if conn.closing is not None:
            return
        sockets = self._sockets
        if conn.direct and sockets is not None:
            sockets.hold(conn.handle)  # what follows goes after this frame, in order
        result = conn.outbox.push(
            frame, droppable=droppable, policy=policy, key=key, size=len(frame)
        )
        # Frames lost to drop/conflate policies: evicted ones, and a new one refused because
        # only frames that must not be dropped were queued.
        self.stats.evicted += result.evicted + (not result.accepted and not result.overflow)
        if result.overflow:
            self.stats.slow_disconnects += 1
            reason = "slow consumer: outbox full, resume from your offsets"
            if result.over_budget:
                # The server is short of room, not just this connection: free what it holds
                # now rather than once its client has read it all (if it ever does).
                self.stats.budget_disconnects += 1
                conn.outbox.clear()
                if conn.direct and sockets is not None:
                    sockets.discard_pending(conn.handle)
                reason = (
                    "slow consumer: the server's outbox budget is full, resume from your offsets"
                )
            self._close(conn, CloseCode.SLOW, reason)
            return
        if result.accepted:
            self.stats.frames_out += 1
            self.stats.bytes_out += len(frame)
            self._ready[conn.id] = conn

    def _reply(self, conn: Connection, rid: RequestId, result: Mapping[str, Any]) -> None:
        if rid is not None:
            self._send(conn, conn.codec.reply(rid, result))

    def _error(
        self,
        conn: Connection,
        rid: RequestId,
        code: int,
        message: str,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        self.stats.errors += 1
        self._send(conn, conn.codec.error(rid, code, message, details))

    def _close(self, conn: Connection, code: CloseCode, reason: str) -> None:
        if conn.closing is None:
            conn.closing = code
            self._closing[conn.id] = (code, reason)
            sockets = self._sockets
            if conn.direct and sockets is not None:
                sockets.hold(conn.handle)
