"""Logical replication over a `PgConnection`: slots, publications and the CopyBoth stream.

The stream hands out raw `XLogData` (pgoutput messages, undecoded: the decoder is
`pyrt._core.PgOutputDecoder`) and takes acknowledgements. Acking follows the
at-least-once rule (docs/sources.md): ack a commit's end LSN only once its events are safe; the
slot's `confirmed_flush_lsn` follows the acks, and a restart resumes from there.

Keepalives are answered inside: a reply when the server asks, a status update at least
every `status_interval` seconds (and a third of `wal_sender_timeout`), so the walsender never
times out even while the consumer is busy. When everything handed out has been acked, a
keepalive's WAL position is acked too, so the slot advances on a quiet database instead of
holding WAL back.

The sans-IO part (`parse_copy_payload`, `standby_status_update`, `ReplicationProgress`,
LSN text) reads no clock and touches no socket.
"""

from __future__ import annotations

import math
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Final

import attrs
import trio

from .connection import PgConnection
from .errors import PgConnectionError, PgError, PgProtocolError
from .protocol import (
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    ErrorResponse,
    ReadyForQuery,
    State,
    quote_ident,
    quote_literal,
)

__all__ = [
    "PrimaryKeepalive",
    "PublicationReport",
    "ReplicationProgress",
    "ReplicationStream",
    "SlotInvalidated",
    "SlotStatus",
    "SystemIdentity",
    "TableIdentity",
    "XLogData",
    "drop_slot",
    "ensure_slot",
    "format_lsn",
    "identify_system",
    "parse_copy_payload",
    "parse_lsn",
    "setup_publication",
    "slot_status",
    "standby_status_update",
    "start_replication",
]

PG_EPOCH_UNIX: Final = 946684800
"""2000-01-01 00:00:00 UTC, PostgreSQL's epoch, in Unix seconds."""


class SlotInvalidated(Exception):
    """The replication slot lost WAL it needed (`wal_status = 'lost'`, after
    `max_slot_wal_keep_size` was exceeded): it can never stream again. Drop it, take a new
    snapshot and tell clients there is a gap."""

    def __init__(self, slot: str, reason: str) -> None:
        super().__init__(f"replication slot {slot!r} is invalidated: {reason}")
        self.slot = slot
        self.reason = reason


# -- LSNs and times ------------------------------------------------------------------------


def format_lsn(lsn: int) -> str:
    """`0x16B3748` -> `'0/16B3748'` (how PostgreSQL writes an LSN)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    high, sep, low = text.partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        raise ValueError(f"not an LSN: {text!r}") from None


def pg_time(unix_seconds: float) -> int:
    """Microseconds since PostgreSQL's epoch, as the replication protocol counts time."""
    return int((unix_seconds - PG_EPOCH_UNIX) * 1_000_000)


# -- replication CopyData messages ---------------------------------------------------------


@attrs.frozen(slots=True)
class XLogData:
    """One pgoutput message and where it sits in the WAL. For a commit (`C`), `wal_start`
    is the transaction's end LSN: the position to ack once its events are safe."""

    wal_start: int
    wal_end: int
    send_time: int
    """Microseconds since 2000-01-01 UTC, by the server's clock."""
    payload: bytes


@attrs.frozen(slots=True)
class PrimaryKeepalive:
    wal_end: int
    send_time: int
    reply_requested: bool


def parse_copy_payload(data: bytes) -> XLogData | PrimaryKeepalive:
    """A CopyData body of the replication stream: `w` XLogData or `k` keepalive."""
    kind = data[:1]
    if kind == b"w" and len(data) >= 25:
        start, end, sent = struct.unpack_from("!QQq", data, 1)
        return XLogData(start, end, sent, data[25:])
    if kind == b"k" and len(data) == 18:
        end, sent, reply = struct.unpack_from("!Qq?", data, 1)
        return PrimaryKeepalive(end, sent, reply)
    raise PgProtocolError(f"unknown replication message {data[:1]!r} ({len(data)} bytes)")


def standby_status_update(
    write: int, flush: int, apply: int, now: int, reply_requested: bool = False
) -> bytes:
    """The CopyData body `r`: positions received, flushed (safe) and applied, and the
    client's clock in microseconds since 2000-01-01."""
    return b"r" + struct.pack("!QQQq?", write, flush, apply, now, reply_requested)


class ReplicationProgress:
    """What was received and acked, and what to report (sans-IO).

    `received` is the highest `wal_start` handed out; `acked` only grows. A keepalive
    moves `acked` to its WAL position when nothing handed out is waiting for an ack."""

    def __init__(self, start: int = 0) -> None:
        self.received = start
        self.acked = start
        self.reported = -1
        self.reply_due = False

    def data(self, message: XLogData) -> None:
        self.received = max(self.received, message.wal_start)

    def ack(self, lsn: int) -> None:
        self.acked = max(self.acked, lsn)

    def keepalive(self, message: PrimaryKeepalive) -> None:
        if self.acked >= self.received:
            # Nothing in flight: everything up to wal_end was sent and is safe (or was not
            # for us). In-progress transactions are not skipped: their commits lie later.
            self.received = self.acked = max(self.acked, message.wal_end)
        if message.reply_requested:
            self.reply_due = True

    @property
    def changed(self) -> bool:
        return self.reply_due or self.acked != self.reported

    def status_update(self, now: int) -> bytes:
        """The status update to send now (write = flush = apply = acked)."""
        self.reported = self.acked
        self.reply_due = False
        return standby_status_update(self.acked, self.acked, self.acked, now)


# -- commands over a replication connection ------------------------------------------------


@attrs.frozen(slots=True)
class SystemIdentity:
    system_id: str
    timeline: int
    xlogpos: int
    database: str | None


async def identify_system(conn: PgConnection) -> SystemIdentity:
    (result,) = await conn.simple_query("IDENTIFY_SYSTEM")
    system_id, timeline, xlogpos, database = result.rows[0]
    return SystemIdentity(str(system_id), int(str(timeline)), parse_lsn(str(xlogpos)), database)


_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def check_slot_name(name: str) -> str:
    if not _SLOT_NAME.fullmatch(name):
        raise ValueError(
            f"replication slot name {name!r}: use 1 to 63 lower-case letters, digits and _"
        )
    return name


@attrs.frozen(slots=True)
class SlotStatus:
    """A row of `pg_replication_slots`."""

    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    active: bool
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    wal_status: str | None
    """reserved, extended, unreserved or lost (lost: `SlotInvalidated`)."""


def _lsn_or_none(text: str | None) -> int | None:
    return None if text is None else parse_lsn(text)


async def slot_status(conn: PgConnection, name: str) -> SlotStatus | None:
    """The slot's row in pg_replication_slots, None if there is no such slot. Works over a
    replication connection and a regular one."""
    (result,) = await conn.simple_query(
        "SELECT slot_name, plugin, slot_type, database, active, restart_lsn,"
        " confirmed_flush_lsn, wal_status FROM pg_replication_slots"
        f" WHERE slot_name = {quote_literal(name)}"
    )
    if not result.rows:
        return None
    slot, plugin, kind, database, active, restart, confirmed, wal_status = result.rows[0]
    return SlotStatus(
        name=slot or name,
        plugin=plugin,
        slot_type=kind or "",
        database=database,
        active=active == "t",
        restart_lsn=_lsn_or_none(restart),
        confirmed_flush_lsn=_lsn_or_none(confirmed),
        wal_status=wal_status,
    )


def _check_usable(conn: PgConnection, status: SlotStatus) -> None:
    if status.slot_type != "logical" or status.plugin != "pgoutput":
        raise ValueError(
            f"replication slot {status.name!r} exists but is a {status.slot_type} slot"
            f" with plugin {status.plugin!r}, not a logical pgoutput slot; drop it or pick"
            " another name"
        )
    if status.database != conn.database:
        raise ValueError(
            f"replication slot {status.name!r} belongs to database {status.database!r},"
            f" not {conn.database!r}"
        )
    if status.wal_status == "lost":
        raise SlotInvalidated(status.name, "wal_status is 'lost' (max_slot_wal_keep_size)")


async def ensure_slot(conn: PgConnection, name: str) -> tuple[SlotStatus, bool]:
    """Creates the persistent logical slot `name` (pgoutput) or reuses it; returns its
    status and whether it was created. Raises `SlotInvalidated` for a lost slot and
    ValueError for a slot of another kind or database. `conn` must be a replication
    connection."""
    check_slot_name(name)
    status = await slot_status(conn, name)
    created = False
    if status is None:
        try:
            await conn.simple_query(
                f"CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'nothing')"
            )
            created = True
        except PgError as e:
            if e.code != "42710":  # duplicate_object: created meanwhile by someone else
                raise
        status = await slot_status(conn, name)
        if status is None:
            raise PgConnectionError(f"replication slot {name!r} vanished right after creation")
    _check_usable(conn, status)
    return status, created


async def drop_slot(conn: PgConnection, name: str) -> None:
    """Drops the slot, waiting for a consumer of it to go; no error if it does not exist."""
    if await slot_status(conn, check_slot_name(name)) is not None:
        await conn.simple_query(f"SELECT pg_drop_replication_slot({quote_literal(name)})")


def _is_invalidation(error: PgError) -> bool:
    # 55000 (object_not_in_prerequisite_state) is also "wal_level must be logical" etc.
    return error.code == "55000" and "invalidated" in f"{error.message} {error.detail}"


# -- the stream ----------------------------------------------------------------------------


class ReplicationStream:
    """`async for message in stream`: XLogData in WAL order; `stream.ack(lsn)` once the
    events up to `lsn` are safe. Made by `start_replication`.

    The iteration ends (after the messages already received) when the server ends the
    stream normally: a server shutting down does so once the client has acked all it sent,
    and `ended` then says why. An error ends it with that error."""

    def __init__(
        self, conn: PgConnection, slot: str, start: int, status_interval: float, buffer: int
    ) -> None:
        self.slot = slot
        self.progress = ReplicationProgress(start)
        self._conn = conn
        self._interval = status_interval
        self._send, self._receive = trio.open_memory_channel[XLogData](buffer)
        self._error: BaseException | None = None
        self._scope = trio.CancelScope()
        self._kick = trio.Event()
        self.status_updates = 0
        """How many status updates went to the server (for tests and metrics)."""
        self.keepalives = 0
        self.ended: str | None = None
        """Why the server ended the stream, once it has (None while it streams)."""

    def __aiter__(self) -> ReplicationStream:
        return self

    async def __anext__(self) -> XLogData:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            if self._error is not None:
                raise self._error from None
            raise StopAsyncIteration from None

    def take_ready(self, limit: int = 1024) -> list[XLogData]:
        """Up to `limit` messages already received, without waiting (none: empty), so a
        consumer can handle a burst as one batch after `async for` gave it the first."""
        ready: list[XLogData] = []
        while len(ready) < limit:
            try:
                ready.append(self._receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return ready

    def ack(self, lsn: int) -> None:
        """Everything up to `lsn` is safe: the slot may let go of it. The status update goes
        out at once (from the stream's own task); acks never move backwards."""
        if lsn > self.progress.acked:
            self.progress.ack(lsn)
            self._kick.set()

    @property
    def acked_lsn(self) -> int:
        return self.progress.acked

    async def _run(self) -> None:
        with self._scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._read)
                nursery.start_soon(self._guarded, self._report)
        self._send.close()

    async def _guarded(self, task: Callable[[], Awaitable[None]]) -> None:
        try:
            await task()
        except Exception as e:
            if self._error is None:
                self._error = e
            self._scope.cancel()

    async def _read(self) -> None:
        conn = self._conn
        while True:
            event = await conn.receive_message()
            match event:
                case CopyData(data):
                    message = parse_copy_payload(data)
                    if isinstance(message, XLogData):
                        self.progress.data(message)
                        try:
                            # Not `send`: it yields every time, so the consumer would get
                            # one message per scheduler round. This yields at socket reads.
                            self._send.send_nowait(message)
                        except trio.WouldBlock:
                            await self._send.send(message)
                    else:
                        self.keepalives += 1
                        self.progress.keepalive(message)
                        if self.progress.changed:
                            self._kick.set()
                case ErrorResponse(fields):
                    error = PgError(fields, context=f"streaming slot {self.slot!r}")
                    if _is_invalidation(error):
                        raise SlotInvalidated(self.slot, error.detail or error.message) from error
                    raise error
                case CommandComplete():
                    # The end of COPY without the server's CopyDone: its walsender is
                    # stopping because the server shuts down (it sends CommandComplete
                    # "COPY 0" once everything it sent is acked, then closes the connection).
                    self.ended = (
                        f"PostgreSQL at {conn.address} stopped streaming slot {self.slot!r}:"
                        " the server is shutting down"
                    )
                    self._scope.cancel()
                    return
                case CopyDone():
                    raise PgConnectionError(f"the server ended replication of slot {self.slot!r}")
                case _:
                    raise PgProtocolError(f"unexpected {type(event).__name__} while streaming")

    async def _report(self) -> None:
        while True:
            with trio.move_on_after(self._interval):
                await self._kick.wait()
            self._kick = trio.Event()
            await self._status_update()

    async def _status_update(self) -> None:
        if self._conn.frontend.state is not State.COPY_BOTH:
            return  # the server has left COPY mode (its error, or its end)
        update = self.progress.status_update(pg_time(time.time()))
        await self._conn.send_copy_data(update)
        self.status_updates += 1

    async def _finish(self, timeout: float) -> None:
        """Reports the last ack and leaves COPY mode so the connection can be reused; if
        the server does not play along within `timeout`, the connection is marked broken.
        After the server's own end the connection is usable only if ReadyForQuery follows
        (a server shutting down closes it instead)."""
        conn = self._conn
        if isinstance(self._error, PgConnectionError):
            return  # already broken
        ok = False
        with trio.CancelScope(shield=True), trio.move_on_after(timeout):
            try:
                if conn.frontend.state is State.COPY_BOTH:  # else the server left COPY mode
                    await self._status_update()
                    await conn.send_copy_done()
                while True:
                    event = await conn.receive_message()
                    if isinstance(event, ReadyForQuery):
                        ok = True
                        break
                    if not isinstance(event, (CopyData, CopyDone, CommandComplete)):
                        break
            except (PgConnectionError, PgError):
                pass
        if not ok:
            conn.mark_broken(self.ended or f"replication of slot {self.slot!r} did not end cleanly")


async def start_replication_stream(
    conn: PgConnection,
    slot: str,
    publications: Sequence[str],
    *,
    messages: bool = True,
    proto_version: int = 1,
    start_lsn: int = 0,
) -> None:
    """Sends START_REPLICATION and waits for CopyBothResponse (`start_replication` is the
    way to use it)."""
    check_slot_name(slot)
    if not publications:
        raise ValueError("at least one publication is needed")
    names = ",".join(quote_ident(p) for p in publications)
    options = [
        f"proto_version {quote_literal(str(proto_version))}",
        f"publication_names {quote_literal(names)}",
    ]
    if messages:
        options.append("messages 'true'")
    sql = f"START_REPLICATION SLOT {slot} LOGICAL {format_lsn(start_lsn)} ({', '.join(options)})"
    with conn.exclusive():
        await conn.send_query(sql)
        error = await _until_streaming(conn, slot)
    if error is not None:
        if _is_invalidation(error):
            raise SlotInvalidated(slot, error.detail or error.message) from error
        raise error


async def _until_streaming(conn: PgConnection, slot: str) -> PgError | None:
    """Reads the answer to START_REPLICATION: None once streaming, or the server's error
    (after its ReadyForQuery, so the connection is still in step)."""
    error: PgError | None = None
    while True:
        event = await conn.receive_message()
        match event:
            case CopyBothResponse() if error is None:
                return None
            case ErrorResponse(fields):
                error = PgError(fields, context=f"START_REPLICATION of slot {slot!r}")
            case ReadyForQuery() if error is not None:
                return error
            case _:
                raise PgProtocolError(f"unexpected {type(event).__name__} for START_REPLICATION")


@asynccontextmanager
async def start_replication(
    conn: PgConnection,
    slot: str,
    publications: Sequence[str],
    *,
    messages: bool = True,
    proto_version: int = 1,
    start_lsn: int = 0,
    status_interval: float = 10.0,
    buffer: int = 256,
) -> AsyncIterator[ReplicationStream]:
    """Streams the logical slot `slot` (see `ensure_slot`) for `publications` over the
    replication connection `conn`; yields the `ReplicationStream`.

    `start_lsn` 0 resumes where the slot's acks left off. Up to `buffer` messages wait in
    memory for the consumer; the server is still answered while they wait. Leaving the
    block reports the last ack and ends the stream (the connection is usable again).
    Raises `SlotInvalidated` for a lost slot, `PgError` for other refusals (`55006`: the
    slot is in use by another connection).
    """
    status = await slot_status(conn, slot)
    if status is None:
        raise PgError(
            {"C": "42704", "M": f"replication slot {slot!r} does not exist"},
            context="create it with ensure_slot",
        )
    _check_usable(conn, status)
    (setting,) = await conn.simple_query(
        "SELECT setting FROM pg_settings WHERE name = 'wal_sender_timeout'"
    )
    sender_timeout_ms = int(setting.rows[0][0] or 0) if setting.rows else 0
    if sender_timeout_ms > 0:
        status_interval = min(status_interval, sender_timeout_ms / 3000)
    if not (status_interval > 0 and math.isfinite(status_interval)):
        raise ValueError(f"status_interval must be a positive number, not {status_interval}")
    await start_replication_stream(
        conn,
        slot,
        publications,
        messages=messages,
        proto_version=proto_version,
        start_lsn=start_lsn,
    )
    start = start_lsn or status.confirmed_flush_lsn or 0
    stream = ReplicationStream(conn, slot, start, status_interval, buffer)
    try:
        # Cancelling a read loses nothing (the parser keeps partial messages), so the
        # connection stays in step unless _finish finds otherwise.
        with conn.exclusive(desync_on_error=False):
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(stream._run)
                    try:
                        yield stream
                    finally:
                        stream._scope.cancel()
            finally:
                await stream._finish(timeout=5.0)
    except BaseExceptionGroup as group:
        # The stream's tasks never raise (their errors come out of the iteration), so the
        # group holds what the block raised: let it out as itself.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


# -- publications --------------------------------------------------------------------------


@attrs.frozen(slots=True)
class TableIdentity:
    """A published table and what its UPDATE and DELETE messages can carry."""

    schema: str
    table: str
    replica_identity: str
    """`d` default (the primary key), `n` nothing, `f` full (the whole old row), `i` an index."""
    primary_key: bool

    @property
    def name(self) -> str:
        return f"{quote_ident(self.schema)}.{quote_ident(self.table)}"

    @property
    def updates_fail(self) -> bool:
        """Without a replica identity, UPDATE and DELETE on a table published for them fail
        (SQLSTATE 55000) until it gets a primary key or REPLICA IDENTITY FULL."""
        return self.replica_identity == "n" or (
            self.replica_identity == "d" and not self.primary_key
        )

    @property
    def key_only(self) -> bool:
        """Old rows of UPDATE and DELETE carry the key columns only (filters on other
        columns cannot see the old values): REPLICA IDENTITY FULL sends them all."""
        return not self.updates_fail and self.replica_identity != "f"


@attrs.frozen(slots=True)
class PublicationReport:
    publication: str
    created: bool
    all_tables: bool
    wal_level: str
    tables: tuple[TableIdentity, ...]
    added: tuple[str, ...] = ()
    """Tables added to an existing publication."""

    @property
    def without_identity(self) -> list[TableIdentity]:
        return [t for t in self.tables if t.updates_fail]

    @property
    def key_only(self) -> list[TableIdentity]:
        return [t for t in self.tables if t.key_only]

    def lines(self) -> list[str]:
        """The report in words, with the SQL that fixes what needs fixing."""
        what = "all tables" if self.all_tables else f"{len(self.tables)} table(s)"
        verb = "created" if self.created else "exists"
        out = [f"publication {self.publication!r} {verb} ({what})"]
        if self.added:
            out.append(f"added: {', '.join(self.added)}")
        if self.wal_level != "logical":
            out.append(
                f"WARNING: wal_level is {self.wal_level!r}; logical replication needs"
                " wal_level = logical (ALTER SYSTEM SET wal_level = logical; then restart)"
            )
        if self.without_identity:
            out.append(
                "Tables without a primary key or replica identity: UPDATE and DELETE on"
                " them fail while they are published. Add a primary key, or:"
            )
            out += [f"  ALTER TABLE {t.name} REPLICA IDENTITY FULL;" for t in self.without_identity]
        if self.key_only:
            out.append(
                "Tables whose UPDATE/DELETE old rows carry the key only (row filters on other"
                " columns cannot match old values); for full old rows:"
            )
            out += [f"  ALTER TABLE {t.name} REPLICA IDENTITY FULL;" for t in self.key_only]
        if not self.tables:
            out.append("no tables are published yet")
        return out


def _table_name(name: str) -> str:
    schema, dot, table = name.partition(".")
    return f"{quote_ident(schema)}.{quote_ident(table)}" if dot else quote_ident(name)


async def setup_publication(
    conn: PgConnection, publication: str, tables: Sequence[str] | None = None
) -> PublicationReport:
    """Creates the publication (FOR ALL TABLES, or for `tables`: `name` or `schema.name`)
    unless it exists (then adds those of `tables` it lacks), and reports on the replica
    identity of every published table (`pyrt pg-setup` prints the report)."""
    pub = quote_literal(publication)
    (found,) = await conn.simple_query(
        f"SELECT puballtables FROM pg_publication WHERE pubname = {pub}"
    )
    created = not found.rows
    added: list[str] = []
    if created:
        target = "ALL TABLES" if not tables else "TABLE " + ", ".join(map(_table_name, tables))
        await conn.simple_query(f"CREATE PUBLICATION {quote_ident(publication)} FOR {target}")
        all_tables = not tables
    else:
        all_tables = found.rows[0][0] == "t"
        if tables and not all_tables:
            (have,) = await conn.simple_query(
                "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename)"
                f" FROM pg_publication_tables WHERE pubname = {pub}"
            )
            present = {row[0] for row in have.rows}
            for table in tables:
                name = _table_name(table)
                (canonical,) = await conn.simple_query(
                    f"SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
                    f" FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                    f" WHERE c.oid = {quote_literal(name)}::regclass"
                )
                if canonical.rows[0][0] not in present:
                    await conn.simple_query(
                        f"ALTER PUBLICATION {quote_ident(publication)} ADD TABLE {name}"
                    )
                    added.append(table)
    (level,) = await conn.simple_query("SHOW wal_level")
    (rows,) = await conn.simple_query(
        "SELECT n.nspname, c.relname, c.relreplident,"
        " EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)"
        " FROM pg_publication_tables p"
        " JOIN pg_namespace n ON n.nspname = p.schemaname"
        " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename"
        f" WHERE p.pubname = {pub} ORDER BY 1, 2"
    )
    identities = tuple(
        TableIdentity(str(schema), str(table), str(ident), pk == "t")
        for schema, table, ident, pk in rows.rows
    )
    return PublicationReport(
        publication=publication,
        created=created,
        all_tables=all_tables,
        wal_level=str(level.rows[0][0]),
        tables=identities,
        added=tuple(added),
    )
