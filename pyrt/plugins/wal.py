"""The WAL source: row changes from PostgreSQL logical replication, as row events.

```toml
[sources.wal]
host = "127.0.0.1"
port = 5432
user = "app"                  # needs the REPLICATION attribute
password_env = "PGPASSWORD"   # or password = "..."
database = "app"
publication = "pyrt"          # made by `pyrt pg-setup`
slot = "pyrt"
create_slot = true
max_event_bytes = 1048576
messages_channel = "pg:messages"   # optional: where pg_logical_emit_message goes
records = { "public.todos" = "todos" }   # optional: rows kept as records (docs/conflicts.md)
```
Connection options (host, port, user, password, ssl, reconnect backoff, ...) are the ones
every Postgres source shares: `pyrt.postgres.PgOptions`.

Each INSERT, UPDATE and DELETE of a published table becomes a row event on the table's
channel `pg:<schema>:<table>` (`Hub.publish_change`), each TRUNCATE an event on every
truncated table's channel; clients subscribe with a join's `changes` (docs/protocol.md).

Delivery is at least once from Postgres to the hub and exactly once into history: a commit's
end LSN is acked only after every change of it is in history, a restart resumes from the
slot's confirmed LSN, and what the slot sends again is skipped (a transaction whose commit LSN
is not after the last one put in history, and the changes of a half-published transaction
already in history). With durable history (`[history] dir`) each change is logged with its
commit LSN and place in the transaction, the log is fsynced before every ack, and after a
restart the source skips what the log holds, so a restarted hub puts each change in history
once. docs/sources.md has the details: hub restarts, invalidated slots (a gap: `reset`
pushes, a new epoch, a new slot), reconnecting, lag metrics, rows as records.
"""

from __future__ import annotations

import logging
import random
import struct
import time
from collections.abc import Mapping
from typing import Any

import trio

from ..plugin import (
    TABLE_CHANNEL_PREFIX,
    SourceContext,
    SourceError,
    check_channel,
    check_integer,
    check_seconds,
)
from ..plugin import json_loads as loads
from ..postgres import (
    DecodeError,
    PgConnection,
    PgConnectionError,
    PgError,
    PgOptions,
    quote_ident,
    quote_literal,
)
from ..postgres.options import text_option
from ..postgres.pgoutput import (
    PgBegin,
    PgChange,
    PgCommit,
    PgLogicalMessage,
    PgOutputDecoder,
    PgTruncate,
    PgUnknown,
    format_commit_time,
)
from ..postgres.replication import (
    PG_EPOCH_UNIX,
    ReplicationStream,
    SlotInvalidated,
    check_slot_name,
    drop_slot,
    ensure_slot,
    format_lsn,
    slot_status,
    start_replication,
)

__all__ = ["WalSource"]

log = logging.getLogger("pyrt.sources.wal")


def _record_tables(records: object) -> dict[tuple[str, str], str]:
    """`records = {"public.todos" = "todos"}`: (schema, table) -> records channel."""
    if records is None:
        return {}
    if not isinstance(records, Mapping):
        raise TypeError(f'records must be a table of "schema.table" = "channel", not {records!r}')
    tables = {}
    for name, channel in records.items():
        if not isinstance(name, str) or not name or not isinstance(channel, str):
            raise TypeError(f'records: expected "schema.table" = "channel", not {name!r}')
        schema, dot, table = name.rpartition(".")
        if not table or (dot and not schema):
            raise ValueError(f"records: {name!r} is not a table name (schema.table)")
        try:
            check_channel(channel)
        except ValueError as e:
            raise ValueError(f"records.{name}: {channel!r} is not a channel: {e}") from None
        tables[(schema or "public", table)] = channel
    return tables


def _record_key(values: Mapping[str, Any], key_columns: list[str]) -> str | None:
    """A row's record key: its primary key value (several columns: joined by ':')."""
    parts = [values.get(column) for column in key_columns]
    if not parts or any(part is None for part in parts):
        return None
    return ":".join(str(part) for part in parts)


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def _snapshot_messages(
    schema: str, table: str, columns: list[tuple[str, int, int]], keys: set[str], rows: Any
) -> tuple[bytes, list[bytes]]:
    """pgoutput Relation and Insert messages for rows read with SELECT (text values), so the
    decoder types them exactly as it types the stream's rows."""
    relation = b"R" + struct.pack(">I", 1) + _cstr(schema) + _cstr(table) + b"d"
    relation += struct.pack(">h", len(columns))
    for name, oid, typmod in columns:
        relation += struct.pack(">B", name in keys) + _cstr(name) + struct.pack(">Ii", oid, typmod)
    inserts = []
    for row in rows:
        out = b"I" + struct.pack(">I", 1) + b"N" + struct.pack(">h", len(row))
        for value in row:
            if value is None:
                out += b"n"
            else:
                data = value.encode()
                out += b"t" + struct.pack(">I", len(data)) + data
        inserts.append(out)
    return relation, inserts


class WalSource:
    """Streams a publication through a logical slot into the hub; see the module."""

    name = "wal"

    def __init__(
        self,
        *,
        publication: str = "pyrt",
        slot: str = "pyrt",
        create_slot: bool = True,
        max_event_bytes: int = 1024 * 1024,
        messages_channel: str | None = None,
        records: Mapping[str, str] | None = None,
        status_interval: float = 10.0,
        **connection: Any,
    ) -> None:
        connection.setdefault("application_name", "pyrt-wal")
        self.pg = PgOptions(**connection)
        """Where and how to connect, and the reconnect backoff (the options every Postgres
        source shares: host, port, user, password(_env), database, ssl, ...)."""
        self.publication = str(text_option("publication", publication))
        self.slot = check_slot_name(str(text_option("slot", slot)))
        if not isinstance(create_slot, bool):
            raise TypeError(f"create_slot must be true or false, not {create_slot!r}")
        self.create_slot = create_slot
        self.max_event_bytes = check_integer("max_event_bytes", max_event_bytes, 256, " of bytes")
        self.messages_channel = text_option("messages_channel", messages_channel, optional=True)
        if self.messages_channel is not None:
            try:
                check_channel(self.messages_channel)
            except ValueError as e:
                raise ValueError(f"messages_channel: {e}") from None
        self.status_interval = check_seconds("status_interval", status_interval)
        self.records = _record_tables(records)
        """(schema, table) -> the records channel its rows keep up to date (key: the
        primary key), through `Hub.apply_record_change`."""
        self._records_loaded = False
        self.random = random.Random()

        self.connected = False
        """Whether the source is streaming right now."""
        self.connects = 0
        """Replication sessions started (more than one: it reconnected)."""
        self.last_error: Exception | None = None
        """Why the last session ended or failed."""
        self.invalidations = 0
        """Times the slot was found invalidated (each a gap, reported to clients)."""
        self.events = 0
        """Row events (changes, truncated tables) put in history."""
        self.skipped = 0
        """Changes the slot sent again that were already in history (skipped)."""
        self.committed_lsn = 0
        """End LSN of the last commit whose changes are all in history (what was acked)."""
        self._done_commit_lsn = 0
        self._partial: tuple[int, int] | None = None
        """(commit LSN, changes put in history) of a transaction cut off before its commit."""
        self._message_lsn = 0
        self._server_lsn = 0
        self._stream: ReplicationStream | None = None
        self._open_since: float | None = None
        """Commit time (Unix seconds) of the transaction being read, if any."""
        self._last_delay = 0.0

    def __repr__(self) -> str:
        where = self.pg.where()
        return f"<WalSource {self.name} {where} slot={self.slot} publication={self.publication}>"

    @property
    def owned_channels(self) -> tuple[str, ...]:
        """What the source publishes to, read-only to clients: every table's channel
        (`pg:>`), `messages_channel`, and the records channels of `records`."""
        owned = [f"{TABLE_CHANNEL_PREFIX}:>"]
        if self.messages_channel is not None:
            owned.append(self.messages_channel)
        owned.extend(sorted(set(self.records.values())))
        return tuple(owned)

    # -- lag (for /metrics) ------------------------------------------------------------------

    @property
    def lag_bytes(self) -> int:
        """WAL the server has that is not in history yet: its last known WAL end minus the
        acked position (0 on a quiet, caught-up stream)."""
        stream = self._stream
        if stream is None:
            return max(0, self._server_lsn - self.committed_lsn) if self.committed_lsn else 0
        server = max(self._server_lsn, stream.progress.received)
        return max(0, server - stream.acked_lsn)

    @property
    def lag_seconds(self) -> float:
        """How long the transaction being read has been committed; between transactions,
        how long the last one took from its commit to history."""
        if self._open_since is not None:
            return max(0.0, time.time() - self._open_since)
        return self._last_delay

    # -- connecting ----------------------------------------------------------------------------

    async def connect(self) -> PgConnection:
        """A replication connection (`replication=database`)."""
        return await self.pg.connect(replication=True)

    def _restore(self, ctx: SourceContext) -> None:
        """With durable history: continue after the last change the log holds (its commit
        LSN and place in the transaction), so what the slot sends again is skipped."""
        position = ctx.saved_checkpoint()
        if position is None:
            return
        commit_lsn, seq, message_lsn = position
        self._done_commit_lsn = max(self._done_commit_lsn, commit_lsn - 1)
        self._partial = (commit_lsn, seq)
        self._message_lsn = max(self._message_lsn, message_lsn)
        log.info(
            "%s: history holds changes up to %s (change %d of its transaction)",
            self.name,
            format_lsn(commit_lsn),
            seq,
        )

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        self._restore(ctx)
        started = False
        deadline = trio.current_time() + self.pg.startup_timeout
        attempt = 0
        while True:
            delay = 0.0
            try:
                conn = await self.connect()
                async with conn:
                    await self._prepare(ctx, conn)
                    if self.records and not self._records_loaded:
                        await self._load_records(ctx, conn)
                    async with start_replication(
                        conn,
                        self.slot,
                        [self.publication],
                        messages=True,
                        status_interval=self.status_interval,
                    ) as stream:
                        self._stream = stream
                        self.connected = True
                        self.connects += 1
                        if started:
                            log.info("%s: streaming slot %s again", self.name, self.slot)
                        else:
                            started = True
                            task_status.started()
                        attempt = 0
                        await self.pump(ctx, stream)
                    # The server ended the stream normally (it is shutting down): say so.
                    raise PgConnectionError(stream.ended or "the replication stream ended")
            except SlotInvalidated as e:
                # Lost between the check and START_REPLICATION: the next round's check
                # reports the gap and makes a new slot.
                self.last_error = e
                log.warning("%s: %s", self.name, e)
            except (PgError, PgConnectionError, trio.TooSlowError) as e:
                self.last_error = e
                delay = self.pg.retry_delay(
                    self.name,
                    e,
                    attempt,
                    self.random,
                    started=started,
                    deadline=deadline,
                    retried_codes=("55006",),  # a slot another hub streams: take over
                )
                attempt += 1
                log.warning("%s: %s; retrying in %.1f s", self.name, e, delay)
            finally:
                self.connected = False
                if self._stream is not None:
                    self._server_lsn = max(self._server_lsn, self._stream.progress.received)
                    self._stream = None
                self._open_since = None
            await trio.sleep(delay)

    async def _prepare(self, ctx: SourceContext, conn: PgConnection) -> None:
        """Checks the publication and makes (or finds) the slot; an invalidated slot is a
        gap: reported to clients, then replaced by a new slot."""
        (found,) = await conn.simple_query(
            f"SELECT 1 FROM pg_publication WHERE pubname = {quote_literal(self.publication)}"
        )
        if not found.rows:
            raise PgError(
                {
                    "C": "42704",
                    "M": f"publication {self.publication!r} does not exist",
                    "H": "create it with pyrt pg-setup (or CREATE PUBLICATION)",
                },
                context=f"database {conn.database!r}",
            )
        try:
            await self._ensure_slot(conn)
        except SlotInvalidated as e:
            self.invalidations += 1
            channels = await ctx.reset_channels(f"{TABLE_CHANNEL_PREFIX}:>")
            log.error(
                "%s: %s; %d channel(s) told recovered=false (a gap)", self.name, e, len(channels)
            )
            if not self.create_slot:
                raise SourceError(
                    f"sources.{self.name}: {e}; create_slot is false, so drop and create the"
                    f" slot yourself (changes since it was lost are gone)"
                ) from e
            await drop_slot(conn, self.slot)
            await self._ensure_slot(conn)
            log.warning("%s: made a new slot %s", self.name, self.slot)

    async def _load_records(self, ctx: SourceContext, conn: PgConnection) -> None:
        """Fills the records channels from the tables as they are (the database is the
        source of truth): then changes from the slot keep them up to date."""
        for (schema, table), channel in self.records.items():
            try:
                ctx.records(channel)
            except ValueError as e:
                raise SourceError(
                    f"sources.{self.name}: records for {schema}.{table}: {e}; add it to"
                    " [hub.record_policies]"
                ) from None
            name = f"{quote_ident(schema)}.{quote_ident(table)}"
            (keys,) = await conn.simple_query(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid ="
                " i.indrelid AND a.attnum = ANY(i.indkey) WHERE i.indisprimary AND"
                f" i.indrelid = {quote_literal(name)}::regclass"
            )
            key_columns = {str(row[0]) for row in keys.rows}
            if not key_columns:
                raise SourceError(
                    f"sources.{self.name}: records for {schema}.{table} need a primary key"
                )
            (rows,) = await conn.simple_query(f"SELECT * FROM {name}")
            columns = [(c.name, c.type_oid, c.type_modifier) for c in rows.columns]
            relation, inserts = _snapshot_messages(schema, table, columns, key_columns, rows.rows)
            decoder = PgOutputDecoder()
            decoder.decode(relation)
            ordered = [c[0] for c in columns if c[0] in key_columns]
            for insert in inserts:
                change = decoder.decode(insert)
                assert isinstance(change, PgChange)
                record = loads(change.to_json())["record"]
                key = _record_key(record, ordered)
                if key is not None:
                    await ctx.set_record(channel, key, record)
            log.info(
                "%s: loaded %d row(s) of %s.%s into %s",
                self.name,
                len(inserts),
                schema,
                table,
                channel,
            )
        self._records_loaded = True

    async def _record_change(
        self, ctx: SourceContext, decoder: PgOutputDecoder, change: PgChange, version: int
    ) -> None:
        channel = self.records.get((change.schema, change.table))
        if channel is None:
            return
        relation = decoder.relation(change.relid)
        key_columns = [c[1] for c in relation.columns if c[0] & 1] if relation else []
        data = loads(change.to_json())
        if change.type == "DELETE":
            key = _record_key(data.get("old_record") or {}, key_columns)
            value = None
        else:
            value = data.get("record") or {}
            key = _record_key(value, key_columns)
            if key is not None and change.type == "UPDATE":
                # Unchanged TOAST values are not sent: keep them from the record.
                current = ctx.record(channel, key).value
                if current is not None:
                    value = {**current, **value}
            if change.type == "UPDATE":
                old_key = _record_key(data.get("old_record") or {}, key_columns)
                if old_key is not None and old_key != key:  # the key itself changed
                    await ctx.set_record(channel, old_key, None, version=version)
        if key is None:
            log.warning(
                "%s: a %s on %s.%s without its key columns; records not updated",
                self.name,
                change.type,
                change.schema,
                change.table,
            )
            return
        await ctx.set_record(channel, key, value, version=version)

    async def _truncate_records(
        self, ctx: SourceContext, schema: str, table: str, version: int
    ) -> None:
        channel = self.records.get((schema, table))
        if channel is None:
            return
        for record in ctx.records(channel):
            if record.value is not None:
                await ctx.set_record(channel, record.key, None, version=version)

    async def _ensure_slot(self, conn: PgConnection) -> None:
        if self.create_slot:
            _status, created = await ensure_slot(conn, self.slot)
            if created:
                log.info("%s: created replication slot %s", self.name, self.slot)
            return
        status = await slot_status(conn, self.slot)
        if status is None:
            raise PgError(
                {"C": "42704", "M": f"replication slot {self.slot!r} does not exist"},
                context="create_slot is false: create it, or set create_slot = true",
            )
        if status.wal_status == "lost":
            raise SlotInvalidated(self.slot, "wal_status is 'lost' (max_slot_wal_keep_size)")

    # -- the pump ------------------------------------------------------------------------------

    async def pump(self, ctx: SourceContext, stream: Any) -> None:
        """Decodes the XLogData of one replication session (`async for` over `stream`),
        puts row events in history and calls `stream.ack(end_lsn)` once a commit's are all
        there. Any async iterable of XLogData with an `ack` method will do (tests)."""
        decoder = PgOutputDecoder()  # Relation messages come again in each session
        durable = ctx.durable
        records = self.records
        limit = self.max_event_bytes
        commit_lsn = 0
        commit_time: str | None = None
        skip_all = False
        skip_first = 0
        seq = 0
        async for first in stream:
            batch = [first]
            take_ready = getattr(stream, "take_ready", None)
            if take_ready is not None:
                # A burst is handled as one batch and the transports woken once, so each
                # connection writes its frames together instead of one write per event.
                batch += take_ready()
            ack = 0
            # Each connection gets the batch's events in one write (Hub.corked).
            with ctx.corked():
                for item in batch:
                    self._server_lsn = max(self._server_lsn, item.wal_end)
                    try:
                        message = decoder.decode(item.payload)
                    except DecodeError as e:
                        # Logged, counted and skipped: one bad message does not stop the
                        # source (the slot moves past it with its transaction's commit).
                        ctx.skip(f"cannot decode the message at {format_lsn(item.wal_start)}", e)
                        continue
                    if isinstance(message, PgChange):
                        seq += 1
                        if skip_all or seq <= skip_first:
                            self.skipped += 1
                            continue
                        if durable:
                            ctx.note_checkpoint([commit_lsn, seq, self._message_lsn])
                        try:
                            await ctx.publish_change(message, max_bytes=limit)
                            if records:
                                version = commit_lsn << 32 | seq
                                await self._record_change(ctx, decoder, message, version)
                        except Exception as e:
                            where = f"{message.type} on {message.schema}.{message.table}"
                            ctx.skip(f"cannot publish the {where}", e)
                        self.events += 1
                        self._partial = (commit_lsn, seq)
                    elif isinstance(message, PgBegin):
                        commit_lsn = message.final_lsn
                        commit_time = format_commit_time(message.commit_time)
                        self._open_since = message.commit_time / 1e6 + PG_EPOCH_UNIX
                        seq = 0
                        # Sent again after a reconnect: all of it, or the part before the cut.
                        skip_all = commit_lsn <= self._done_commit_lsn
                        partial = self._partial
                        skip_first = partial[1] if partial and partial[0] == commit_lsn else 0
                    elif isinstance(message, PgCommit):
                        self._done_commit_lsn = max(self._done_commit_lsn, message.commit_lsn)
                        self.committed_lsn = max(self.committed_lsn, message.end_lsn)
                        if self._partial is not None and self._partial[0] <= message.commit_lsn:
                            self._partial = None  # (a commit sent again before it keeps it)
                        if self._open_since is not None:
                            self._last_delay = max(0.0, time.time() - self._open_since)
                        self._open_since = None
                        ack = message.end_lsn
                    elif isinstance(message, PgTruncate):
                        seq += 1
                        if skip_all or seq <= skip_first:
                            self.skipped += 1
                            continue
                        last = len(message.relids) - 1
                        for i, (relid, (schema, table)) in enumerate(
                            zip(message.relids, message.tables, strict=True)
                        ):
                            relation = decoder.relation(relid)
                            columns = [(c[1], c[4]) for c in relation.columns] if relation else []
                            if durable and i == last:
                                # Only the last table's event says the truncate is in
                                # history: a crash halfway publishes it again (twice, never
                                # zero times).
                                ctx.note_checkpoint([commit_lsn, seq, self._message_lsn])
                            await ctx.publish_truncate(
                                schema, table, commit_timestamp=commit_time, columns=columns
                            )
                            if records:
                                version = commit_lsn << 32 | seq
                                await self._truncate_records(ctx, schema, table, version)
                            self.events += 1
                        self._partial = (commit_lsn, seq)
                    elif isinstance(message, PgLogicalMessage):
                        if message.transactional:
                            seq += 1
                            if skip_all or seq <= skip_first:
                                continue
                            self._partial = (commit_lsn, seq)
                        elif message.lsn <= max(self._message_lsn, self._done_commit_lsn):
                            continue
                        else:
                            self._message_lsn = message.lsn
                        if durable and self.messages_channel is not None:
                            ctx.note_checkpoint([commit_lsn, seq, self._message_lsn])
                        try:
                            await self._logical_message(ctx, message)
                        except Exception as e:
                            ctx.skip("cannot publish a logical message", e)
                    elif isinstance(message, PgUnknown):
                        log.warning("%s: skipping pgoutput message %r", self.name, chr(message.tag))
            if ack:
                # The commits' events are written; on disk (durable history) before the slot
                # lets go.
                await ctx.flush()
                stream.ack(ack)

    async def _logical_message(self, ctx: SourceContext, message: PgLogicalMessage) -> None:
        if self.messages_channel is None:
            log.info(
                "%s: skipping a logical message (prefix %r; set messages_channel to publish them)",
                self.name,
                message.prefix,
            )
            return
        data: dict[str, Any] = {
            "prefix": message.prefix,
            "transactional": message.transactional,
            "lsn": format_lsn(message.lsn),
        }
        try:
            data["content"] = message.content.decode()
        except UnicodeDecodeError:
            data["content"] = None
            data["content_hex"] = message.content.hex()
        await ctx.publish(self.messages_channel, data)
