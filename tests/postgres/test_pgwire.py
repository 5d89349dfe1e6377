"""The PostgreSQL client: sans-IO codec units, then a real server (tests/pgserver.py) for
logins, queries, errors, LISTEN/NOTIFY, TLS and logical replication (slots, the stream,
acks, keepalives, wal_sender_timeout, invalidated slots) and `pyrt pg-setup`."""

from __future__ import annotations

import hashlib
import os
import pwd
import ssl
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from pgserver import PASSWORD, PostgresServer

from pyrt.postgres import PgAuthError, PgConnection, PgConnectionError, PgError, PgProtocolError
from pyrt.postgres.protocol import (
    NEED_DATA,
    AuthenticationMD5Password,
    AuthenticationOk,
    AuthenticationSASL,
    AuthenticationUnsupported,
    Authenticator,
    BackendParser,
    CommandComplete,
    DataRow,
    ErrorResponse,
    NotificationResponse,
    ParameterStatus,
    ReadyForQuery,
    TransactionStatus,
    md5_password,
    quote_ident,
    quote_literal,
    startup_message,
)
from pyrt.postgres.replication import (
    PrimaryKeepalive,
    ReplicationProgress,
    SlotInvalidated,
    XLogData,
    drop_slot,
    ensure_slot,
    format_lsn,
    identify_system,
    parse_copy_payload,
    parse_lsn,
    setup_publication,
    slot_status,
    standby_status_update,
    start_replication,
    start_replication_stream,
)

# -- sans-IO -------------------------------------------------------------------------------


def backend(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


SAMPLE = [
    (backend(b"R", struct.pack("!i", 0)), AuthenticationOk()),
    (backend(b"S", b"TimeZone\0UTC\0"), ParameterStatus("TimeZone", "UTC")),
    (
        backend(
            b"D",
            struct.pack("!h", 3)
            + struct.pack("!i", 2)
            + b"ab"
            + struct.pack("!i", -1)
            + struct.pack("!i", 0),
        ),
        DataRow((b"ab", None, b"")),
    ),
    (backend(b"C", b"SELECT 1\0"), CommandComplete("SELECT 1")),
    (
        backend(b"A", struct.pack("!i", 42) + b"chan\0p\xc3\xa4yload\0"),
        NotificationResponse(42, "chan", "päyload"),
    ),
    (
        backend(b"E", b"SERROR\0VERROR\0C42601\0Msyntax error\0P3\0\0"),
        ErrorResponse({"S": "ERROR", "V": "ERROR", "C": "42601", "M": "syntax error", "P": "3"}),
    ),
    (backend(b"Z", b"I"), ReadyForQuery(TransactionStatus.IDLE)),
]


@given(st.lists(st.sampled_from(SAMPLE), max_size=12), st.data())
def test_parser_splits_any_chunking(messages: list[tuple[bytes, Any]], data: st.DataObject) -> None:
    stream = b"".join(m for m, _ in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = BackendParser()
    events = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        parser.receive_data(stream[start:end])
        while (event := parser.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [e for _, e in messages]
    assert parser.buffered == 0


def test_parser_rejects_garbage() -> None:
    parser = BackendParser()
    parser.receive_data(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(PgProtocolError, match="claims"):
        parser.next_event()
    parser = BackendParser()
    parser.receive_data(backend(b"?", b""))
    with pytest.raises(PgProtocolError, match="unexpected message type"):
        parser.next_event()
    parser = BackendParser()
    parser.receive_data(backend(b"K", b"\0\0"))  # BackendKeyData needs 8 bytes
    with pytest.raises(PgProtocolError, match="shorter"):
        parser.next_event()


def test_startup_message_layout() -> None:
    message = startup_message({"user": "u", "replication": "database"})
    assert struct.unpack("!ii", message[:8]) == (len(message), 196608)
    assert message[8:] == b"user\0u\0replication\0database\0\0"
    with pytest.raises(ValueError, match="NUL"):
        startup_message({"user": "a\0b"})


def test_authenticator_refusals() -> None:
    with pytest.raises(PgAuthError, match="none given"):
        Authenticator("bob", None).respond(AuthenticationMD5Password(b"salt"))
    with pytest.raises(PgAuthError, match="GSSAPI"):
        Authenticator("bob", "pw").respond(AuthenticationUnsupported(7))
    with pytest.raises(PgAuthError, match="not SCRAM-SHA-256"):
        Authenticator("bob", "pw").respond(AuthenticationSASL(("SCRAM-SHA-256-PLUS",)))
    scram = Authenticator("bob", "pw")
    scram.respond(AuthenticationSASL(("SCRAM-SHA-256",)))
    with pytest.raises(PgAuthError, match="without proof"):
        scram.respond(AuthenticationOk())  # a server that skips SASLFinal is not trusted


def test_md5_answer_matches_the_stored_hash(postgres: PostgresServer) -> None:
    # The server keeps "md5" + md5(password + user) and checks md5(that + salt).
    stored = postgres.sql("SELECT rolpassword FROM pg_authid WHERE rolname = 'pyrt_md5'")
    salt = b"\x01\x02\x03\x04"
    expected = "md5" + hashlib.md5(stored[3:].encode() + salt).hexdigest()
    assert md5_password("pyrt_md5", PASSWORD, salt) == expected


@given(st.integers(0, 2**64 - 1))
def test_lsn_text_round_trip(lsn: int) -> None:
    text = format_lsn(lsn)
    assert parse_lsn(text) == lsn
    assert text == text.upper()


def test_replication_messages() -> None:
    data = b"w" + struct.pack("!QQq", 0x10, 0x20, 7) + b"Bpayload"
    assert parse_copy_payload(data) == XLogData(0x10, 0x20, 7, b"Bpayload")
    data = b"k" + struct.pack("!Qq?", 0x30, 8, True)
    assert parse_copy_payload(data) == PrimaryKeepalive(0x30, 8, True)
    with pytest.raises(PgProtocolError):
        parse_copy_payload(b"x123")
    update = standby_status_update(1, 2, 3, 4)
    assert len(update) == 34
    assert update[:1] == b"r"
    assert struct.unpack("!QQQq?", update[1:]) == (1, 2, 3, 4, False)


def test_progress_acks_keepalives_only_when_nothing_is_in_flight() -> None:
    progress = ReplicationProgress(100)
    progress.keepalive(PrimaryKeepalive(150, 0, False))
    assert progress.acked == 150  # quiet: the slot may advance
    progress.data(XLogData(200, 200, 0, b"C"))
    progress.keepalive(PrimaryKeepalive(300, 0, True))
    assert progress.acked == 150  # a commit at 200 is not acked yet: hold
    assert progress.reply_due
    update = progress.status_update(now=0)
    assert struct.unpack("!QQQq?", update[1:])[:3] == (150, 150, 150)
    assert not progress.changed
    progress.ack(200)
    progress.ack(190)  # acks never go back
    assert progress.acked == 200
    progress.keepalive(PrimaryKeepalive(300, 0, False))
    assert progress.acked == 300


# -- a real server -------------------------------------------------------------------------


async def connect(
    postgres: PostgresServer, user: str = "pyrt_scram", database: str = "postgres", **kw: Any
) -> PgConnection:
    return await PgConnection.connect(
        "127.0.0.1", postgres.port, user, kw.pop("password", PASSWORD), database, **kw
    )


async def sql(postgres: PostgresServer, query: str, database: str = "postgres") -> str:
    """Admin SQL through psql, off the event loop (the stream's tasks keep running)."""
    return await trio.to_thread.run_sync(postgres.sql, query, database)


@pytest.mark.parametrize(("user", "method"), [("pyrt_scram", "SCRAM-SHA-256"), ("pyrt_md5", "md5")])
async def test_login(postgres: PostgresServer, user: str, method: str) -> None:
    async with await connect(postgres, user) as conn:
        assert conn.auth_method == method
        (result,) = await conn.simple_query("SELECT current_user, current_database()")
        assert result.rows == ((user, "postgres"),)
        assert conn.parameters["client_encoding"] == "UTF8"
        assert conn.backend_pid is not None


@pytest.mark.parametrize("user", ["pyrt_scram", "pyrt_md5"])
async def test_wrong_password(postgres: PostgresServer, user: str) -> None:
    with pytest.raises(PgError) as caught:
        await connect(postgres, user, password="wrong")
    assert caught.value.code == "28P01"
    text = str(caught.value)
    assert "password authentication failed" in text
    assert f"127.0.0.1:{postgres.port}" in text
    assert repr(user) in text


async def test_unknown_database(postgres: PostgresServer) -> None:
    with pytest.raises(PgError) as caught:
        await connect(postgres, database="no_such_db")
    assert caught.value.code == "3D000"
    assert "no_such_db" in str(caught.value)


async def test_refused_connection_names_the_address() -> None:
    with trio.socket.socket() as s:  # a port nobody listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PgConnectionError) as caught:
        await PgConnection.connect("127.0.0.1", port, "pyrt_scram", PASSWORD, "postgres")
    text = str(caught.value)
    assert f"127.0.0.1:{port}" in text
    assert "'pyrt_scram'" in text
    assert "refused" in text.lower()


@asynccontextmanager
async def fake_server(reply: bytes) -> AsyncIterator[int]:
    """A TCP server that answers every connection with `reply` and then says nothing."""
    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.send_all(reply)
                await trio.sleep_forever()

        nursery.start_soon(trio.serve_listeners, handle, listeners)
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def test_silent_server_times_out() -> None:
    async with fake_server(b"") as port:
        with trio.fail_after(5):
            with pytest.raises(PgConnectionError) as caught:
                await PgConnection.connect("127.0.0.1", port, "u", "p", "d", timeout=0.3)
    assert str(caught.value).startswith(
        f"timed out after 0.3 s connecting to PostgreSQL at 127.0.0.1:{port}"
    )


async def test_a_server_that_is_not_postgres() -> None:
    async with fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n") as port:
        with pytest.raises(PgProtocolError, match="does not speak PostgreSQL's protocol"):
            await PgConnection.connect("127.0.0.1", port, "u", "p", "d", timeout=5)


async def test_simple_queries(postgres: PostgresServer) -> None:
    async with await connect(postgres) as conn:
        results = await conn.simple_query(
            "CREATE TEMP TABLE q (id int, name text);"
            "INSERT INTO q VALUES (1, 'ä'), (2, NULL);"
            "SELECT id, name FROM q ORDER BY id;"
            "SELECT 'x' WHERE false"
        )
        assert [r.command for r in results] == [
            "CREATE TABLE",
            "INSERT 0 2",
            "SELECT 2",
            "SELECT 0",
        ]
        assert results[2].column_names == ("id", "name")
        assert results[2].rows == (("1", "ä"), ("2", None))
        assert results[2].dicts() == [{"id": "1", "name": "ä"}, {"id": "2", "name": None}]
        assert results[2].columns[0].type_oid == 23  # int4
        assert results[3].rows == ()
        (empty,) = await conn.simple_query("")
        assert empty.command == ""
        await conn.simple_query("BEGIN")
        assert conn.transaction_status is TransactionStatus.IN_TRANSACTION
        await conn.simple_query("ROLLBACK")
        assert conn.transaction_status is TransactionStatus.IDLE


async def test_errors_are_values_and_the_connection_stays_usable(postgres: PostgresServer) -> None:
    async with await connect(postgres) as conn:
        with pytest.raises(PgError) as caught:
            await conn.simple_query("SELEC 1")
        assert caught.value.code == "42601"
        assert caught.value.severity == "ERROR"
        assert caught.value.position == 1
        assert "syntax error" in caught.value.message
        (ok,) = await conn.simple_query("SELECT 1")
        assert ok.rows == (("1",),)
        with pytest.raises(PgError) as caught:
            await conn.simple_query(
                "DO $$ BEGIN RAISE EXCEPTION 'boom' USING DETAIL = 'the detail',"
                " HINT = 'the hint', ERRCODE = 'P0001'; END $$"
            )
        error = caught.value
        assert (error.code, error.message, error.detail, error.hint) == (
            "P0001",
            "boom",
            "the detail",
            "the hint",
        )
        assert "DETAIL: the detail" in str(error)
        # A failed statement in a transaction: the transaction is failed until rollback.
        await conn.simple_query("BEGIN")
        with pytest.raises(PgError, match="division by zero"):
            await conn.simple_query("SELECT 1/0")
        assert conn.transaction_status is TransactionStatus.FAILED
        with pytest.raises(PgError) as caught:
            await conn.simple_query("SELECT 1")
        assert caught.value.code == "25P02"
        await conn.simple_query("ROLLBACK")
        await conn.simple_query("DO $$ BEGIN RAISE NOTICE 'just so you know'; END $$")
        assert conn.notices[-1].message == "just so you know"


@pytest.mark.parametrize(
    "text", ["plain", "it's", "back\\slash", "both \\' mixed", "ünï 🎉", "", "'; DROP TABLE x; --"]
)
async def test_quoting_round_trips_through_the_server(postgres: PostgresServer, text: str) -> None:
    async with await connect(postgres) as conn:
        (result,) = await conn.simple_query(
            f"SELECT {quote_literal(text)} AS {quote_ident(text or 'x')}"
        )
        assert result.rows == ((text,),)
        assert result.column_names == (text or "x",)


async def test_one_task_at_a_time(postgres: PostgresServer) -> None:
    async with await connect(postgres) as holder, await connect(postgres) as conn:
        # A query that waits for as long as the test wants: for a lock `holder` has.
        await holder.simple_query("SELECT pg_advisory_lock(1)")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.simple_query, "SELECT pg_advisory_lock(1)")
            await trio.testing.wait_all_tasks_blocked()  # it waits for the answer
            with pytest.raises(trio.BusyResourceError):
                await conn.simple_query("SELECT 1")
            await holder.simple_query("SELECT pg_advisory_unlock(1)")
        (result,) = await conn.simple_query("SELECT 2")
        assert result.rows == (("2",),)


async def test_a_query_cancelled_halfway_breaks_the_connection(postgres: PostgresServer) -> None:
    async with await connect(postgres) as conn:
        with trio.move_on_after(0.1):
            await conn.simple_query("SELECT pg_sleep(1)")
        assert conn.broken
        with pytest.raises(PgConnectionError, match="open a new connection"):
            await conn.simple_query("SELECT 1")


async def test_listen_notify(postgres: PostgresServer) -> None:
    async with await connect(postgres) as listener, await connect(postgres) as sender:
        await listener.listen("Mixed Case", "plain")
        await sender.notify("Mixed Case", "first")
        await sender.simple_query("NOTIFY plain, 'second'")
        await sender.simple_query("NOTIFY mixed, 'not ours: other channel'")
        with trio.fail_after(5):
            one = await listener.next_notification()
            two = await listener.next_notification()
        assert (one.channel, one.payload) == ("Mixed Case", "first")
        assert (two.channel, two.payload) == ("plain", "second")
        assert one.pid == sender.backend_pid

        # Waiting can be cancelled without harm; a notification during a query is kept.
        with trio.move_on_after(0.1):
            await listener.next_notification()
        assert not listener.broken
        # Committed before the listener's query is sent, so the server sends it before that
        # query's ReadyForQuery (if not before the query): the client reads it with the answer.
        await sender.notify("plain", "during")
        await listener.simple_query("SELECT 1")
        with trio.fail_after(5):
            assert (await listener.next_notification()).payload == "during"

        # Transactional: nothing until commit, nothing at all after a rollback.
        await sender.simple_query("BEGIN; NOTIFY plain, 'rolled back'; ROLLBACK")
        await sender.simple_query("BEGIN; NOTIFY plain, 'a'; NOTIFY plain, 'a'; COMMIT")
        with trio.fail_after(5):
            got = await listener.next_notification()
        assert got.payload == "a"  # identical ones in a transaction collapse into one
        await sender.notify("plain", "after")
        with trio.fail_after(5):
            assert (await listener.next_notification()).payload == "after"

        # The payload limit: 7999 bytes work, 8000 fail.
        await sender.notify("plain", "x" * 7999)
        with trio.fail_after(5):
            assert len((await listener.next_notification()).payload) == 7999
        with pytest.raises(PgError) as caught:
            await sender.notify("plain", "x" * 8000)
        assert caught.value.code == "22023"

        async def notify_later() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the listener is waiting
            await sender.notify("plain", "iterated")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(notify_later)
            with trio.fail_after(5):
                async for n in listener.notifications():
                    assert n.payload == "iterated"
                    break
        await listener.unlisten()


async def test_terminated_session_ends_the_wait(postgres: PostgresServer) -> None:
    async with await connect(postgres) as listener:
        await listener.listen("x")
        await sql(postgres, f"SELECT pg_terminate_backend({listener.backend_pid})")
        with trio.fail_after(5), pytest.raises((PgError, PgConnectionError)) as caught:
            await listener.next_notification()
        if isinstance(caught.value, PgError):
            assert caught.value.code == "57P01"
        assert listener.broken


# -- TLS -----------------------------------------------------------------------------------


async def reloaded(postgres: PostgresServer, setting: str, value: str) -> None:
    """Waits until a new session sees `setting` at `value`: pg_reload_conf() only signals
    the server, which reloads its configuration (and TLS context) on its own."""

    async def seen() -> bool:
        return await sql(postgres, f"SHOW {setting}") == value

    await wait_for(seen, f"the server did not reload {setting} = {value}")


@contextmanager
def server_tls(postgres: PostgresServer) -> Iterator[Path]:
    """Turns TLS on with a fresh self-signed certificate for 127.0.0.1; yields its path."""
    cert, key = postgres.data / "pyrt_test.crt", postgres.data / "pyrt_test.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    key.chmod(0o600)
    if os.geteuid() == 0:
        uid = pwd.getpwnam("postgres").pw_uid
        for path in (cert, key):
            os.chown(path, uid, -1)
    postgres.sql(f"ALTER SYSTEM SET ssl_cert_file = '{cert}'")
    postgres.sql(f"ALTER SYSTEM SET ssl_key_file = '{key}'")
    postgres.sql("ALTER SYSTEM SET ssl = on")
    postgres.sql("SELECT pg_reload_conf()")
    try:
        yield cert
    finally:
        for setting in ("ssl", "ssl_cert_file", "ssl_key_file"):
            postgres.sql(f"ALTER SYSTEM RESET {setting}")
        postgres.sql("SELECT pg_reload_conf()")


async def test_tls(postgres: PostgresServer) -> None:
    with pytest.raises(PgConnectionError, match="does not accept TLS"):
        await connect(postgres, ssl_context=ssl.create_default_context())
    with server_tls(postgres) as cert:
        await reloaded(postgres, "ssl", "on")
        context = ssl.create_default_context(cafile=str(cert))
        for user in ("pyrt_scram", "pyrt_md5"):
            async with await connect(postgres, user, ssl_context=context) as conn:
                assert conn.tls
                (result,) = await conn.simple_query(
                    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                )
                assert result.rows == (("t",),)
        async with await connect(postgres) as plain:  # still allowed without TLS here
            assert not plain.tls
        with pytest.raises(PgConnectionError, match="TLS with PostgreSQL at"):
            await connect(postgres, ssl_context=ssl.create_default_context())  # unknown CA


# -- logical replication -------------------------------------------------------------------


@pytest.fixture
def repl_db(postgres: PostgresServer) -> Iterator[str]:
    """A database with a published table; its slots are dropped afterwards (slots are
    limited, and unacked ones hold WAL for the rest of the session)."""
    db = postgres.new_database("repl")
    postgres.sql(
        "CREATE TABLE items (id int PRIMARY KEY, body text);"
        "CREATE TABLE keyless (body text);"
        "CREATE PUBLICATION pub FOR TABLE items",
        db,
    )
    yield db
    postgres.sql(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
        f" WHERE database = '{db}' AND NOT active"
    )


async def slot_lsns(postgres: PostgresServer, db: str, slot: str) -> tuple[int, int]:
    row = await sql(
        postgres,
        "SELECT restart_lsn, confirmed_flush_lsn FROM pg_replication_slots"
        f" WHERE slot_name = '{slot}'",
        db,
    )
    restart, confirmed = row.split("|")
    return parse_lsn(restart), parse_lsn(confirmed)


async def wait_for(condition: Callable[[], Any], message: str, timeout: float = 10) -> None:
    """`until` for a condition only the server can answer (a query each time)."""
    with trio.move_on_after(timeout):
        while not await condition():
            await trio.sleep(0.1)  # a poll: each asks the server
        return
    raise AssertionError(message)


async def transaction(stream: AsyncIterator[XLogData]) -> list[XLogData]:
    """Messages up to and including the next commit."""
    got = []
    with trio.fail_after(10):
        async for message in stream:
            got.append(message)
            if message.payload[:1] == b"C":
                return got
    raise AssertionError("the stream ended")


def commit_end_lsn(commit: XLogData) -> int:
    _flags, _commit_lsn, end_lsn, _ts = struct.unpack_from("!bQQq", commit.payload, 1)
    return int(end_lsn)


async def test_slot_created_then_reused(postgres: PostgresServer, repl_db: str) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        system = await identify_system(conn)
        assert system.database == repl_db
        assert system.timeline >= 1
        status, created = await ensure_slot(conn, "reuse")
        assert created
        assert (status.plugin, status.slot_type, status.database) == (
            "pgoutput",
            "logical",
            repl_db,
        )
        assert status.wal_status == "reserved"
        again, created = await ensure_slot(conn, "reuse")
        assert not created
        assert again.confirmed_flush_lsn == status.confirmed_flush_lsn
    async with await connect(postgres, "pyrt_md5", repl_db, replication=True) as other:
        _, created = await ensure_slot(other, "reuse")
        assert not created
    with pytest.raises(ValueError, match="lower-case"):
        async with await connect(postgres, database=repl_db, replication=True) as conn:
            await ensure_slot(conn, "Bad-Name")
    other_db = postgres.new_database("other")
    async with await connect(postgres, database=other_db, replication=True) as conn:
        with pytest.raises(ValueError, match="belongs to database"):
            await ensure_slot(conn, "reuse")
        await drop_slot(conn, "reuse")
        assert await slot_status(conn, "reuse") is None


async def test_stream_delivers_and_acks_advance_the_slot(
    postgres: PostgresServer, repl_db: str
) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "acks")
        async with start_replication(conn, "acks", ["pub"]) as stream:
            await sql(postgres, "INSERT INTO items VALUES (1, 'one'), (2, 'two')", repl_db)
            messages = await transaction(stream)
            kinds = [m.payload[:1] for m in messages]
            assert kinds == [b"B", b"R", b"I", b"I", b"C"]
            assert b"one" in messages[2].payload
            end = commit_end_lsn(messages[-1])
            assert messages[-1].wal_start == end
            _, confirmed = await slot_lsns(postgres, repl_db, "acks")
            assert confirmed < end
            stream.ack(end)

            async def acked() -> bool:
                return (await slot_lsns(postgres, repl_db, "acks"))[1] >= end

            await wait_for(acked, "confirmed_flush_lsn did not follow the ack")
            # A logical message (pg_logical_emit_message) comes through too ('M').
            await sql(postgres, "SELECT pg_logical_emit_message(true, 'pyrt', 'hi')", repl_db)
            kinds = [m.payload[:1] for m in await transaction(stream)]
            assert kinds == [b"B", b"M", b"C"]
        # The connection is usable after the stream ended.
        (result,) = await conn.simple_query("SELECT 1")
        assert result.rows == (("1",),)


async def test_without_ack_the_transaction_comes_again(
    postgres: PostgresServer, repl_db: str
) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "replay")
        async with start_replication(conn, "replay", ["pub"]) as stream:
            await sql(postgres, "INSERT INTO items VALUES (10, 'unacked')", repl_db)
            first = await transaction(stream)
        restart, confirmed = await slot_lsns(postgres, repl_db, "replay")
        assert confirmed < commit_end_lsn(first[-1])
        assert restart <= first[0].wal_start  # WAL is retained for it
    # A new connection gets the same transaction again (at-least-once), then acks it.
    async with (
        await connect(postgres, database=repl_db, replication=True) as conn,
        start_replication(conn, "replay", ["pub"]) as stream,
    ):
        again = await transaction(stream)
        assert [m.payload for m in again if m.payload[:1] == b"I"] == [
            m.payload for m in first if m.payload[:1] == b"I"
        ]
        stream.ack(commit_end_lsn(again[-1]))
    async with (
        await connect(postgres, database=repl_db, replication=True) as conn,
        start_replication(conn, "replay", ["pub"]) as stream,
    ):
        await sql(postgres, "INSERT INTO items VALUES (11, 'next')", repl_db)
        inserts = [m.payload for m in await transaction(stream) if m.payload[:1] == b"I"]
        assert len(inserts) == 1
        assert b"next" in inserts[0]


async def test_quiet_stream_keepalives_advance_the_slot(
    postgres: PostgresServer, repl_db: str
) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "quiet")
        _, before = await slot_lsns(postgres, repl_db, "quiet")
        got: list[XLogData] = []
        async with start_replication(conn, "quiet", ["pub"]) as stream, trio.open_nursery() as n:

            async def consume() -> None:
                async for message in stream:
                    got.append(message)

            n.start_soon(consume)
            # WAL the slot has no interest in: another database, an unpublished table.
            await sql(
                postgres, "CREATE TABLE IF NOT EXISTS noise (x int); INSERT INTO noise VALUES (1)"
            )
            await sql(postgres, "INSERT INTO keyless VALUES ('unpublished')", repl_db)

            async def advanced() -> bool:
                return (await slot_lsns(postgres, repl_db, "quiet"))[1] > before

            await wait_for(advanced, "keepalive acks did not advance the quiet slot")
            n.cancel_scope.cancel()
        assert stream.keepalives > 0
        assert [m.payload[:1] for m in got if m.payload[:1] not in (b"B", b"C")] == []


@pytest.fixture
def short_sender_timeout(postgres: PostgresServer) -> Iterator[None]:
    postgres.sql("ALTER SYSTEM SET wal_sender_timeout = '2s'")
    postgres.sql("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        postgres.sql("ALTER SYSTEM RESET wal_sender_timeout")
        postgres.sql("SELECT pg_reload_conf()")


@pytest.mark.slow
async def test_stream_outlives_wal_sender_timeout(
    postgres: PostgresServer, repl_db: str, short_sender_timeout: None
) -> None:
    await reloaded(postgres, "wal_sender_timeout", "2s")
    # The control: a client that reads but never answers is cut off after the timeout.
    async with await connect(postgres, database=repl_db, replication=True) as mute:
        await ensure_slot(mute, "mute")
        await start_replication_stream(mute, "mute", ["pub"])

        async def drain() -> None:
            while True:
                await mute.receive_message()

        with trio.fail_after(10), pytest.raises((PgError, PgConnectionError)):
            await drain()
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "lively")
        async with start_replication(conn, "lively", ["pub"]) as stream:
            await sql(postgres, "INSERT INTO items VALUES (20, 'before')", repl_db)
            # A consumer that does not read for a while: the stream still answers.
            await trio.sleep(5)  # the behaviour under test: silent 2.5 x wal_sender_timeout
            first = await transaction(stream)
            end = commit_end_lsn(first[-1])
            stream.ack(end)

            async def acked() -> bool:
                return (await slot_lsns(postgres, repl_db, "lively"))[1] >= end

            await wait_for(acked, "the ack did not reach the slot")
            await sql(postgres, "INSERT INTO items VALUES (21, 'after')", repl_db)
            second = await transaction(stream)
            assert any(b"after" in m.payload for m in second)
        assert stream.status_updates >= 5


async def test_invalidated_slot_is_detected(postgres: PostgresServer, repl_db: str) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "doomed")
        postgres.sql("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        postgres.sql("SELECT pg_reload_conf()")
        try:
            # Push the slot's restart_lsn out of the kept WAL, then let a checkpoint drop it.
            for n in range(4):
                postgres.sql(f"INSERT INTO keyless VALUES ('{n}')", repl_db)
                postgres.sql("SELECT pg_switch_wal()")
            postgres.sql("CHECKPOINT")
        finally:
            postgres.sql("ALTER SYSTEM RESET max_slot_wal_keep_size")
            postgres.sql("SELECT pg_reload_conf()")
        status = await slot_status(conn, "doomed")
        assert status is not None
        assert status.wal_status == "lost"
        with pytest.raises(SlotInvalidated, match="doomed"):
            await ensure_slot(conn, "doomed")
        with pytest.raises(SlotInvalidated):
            async with start_replication(conn, "doomed", ["pub"]):
                pass
        # The server's own answer (SQLSTATE 55000) is recognized too, not just wal_status.
        with pytest.raises(SlotInvalidated) as caught:
            await start_replication_stream(conn, "doomed", ["pub"])
        cause = caught.value.__cause__
        assert isinstance(cause, PgError)
        assert cause.code == "55000"
        (result,) = await conn.simple_query("SELECT 1")  # still in step
        assert result.rows == (("1",),)
        await drop_slot(conn, "doomed")


async def test_slot_invalidated_while_streaming(postgres: PostgresServer, repl_db: str) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "streaming_doomed")
        await sql(postgres, "ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
        await sql(postgres, "SELECT pg_reload_conf()")
        try:
            with pytest.raises(PgError) as caught:  # noqa: PT012 (the stream ends in the loop)
                async with start_replication(conn, "streaming_doomed", ["pub"]) as stream:
                    for n in range(4):  # nothing is acked: restart_lsn stays behind
                        await sql(postgres, f"INSERT INTO items VALUES ({100 + n}, 'x')", repl_db)
                        await sql(postgres, "SELECT pg_switch_wal()")
                    await sql(postgres, "CHECKPOINT")
                    with trio.fail_after(10):
                        async for _ in stream:
                            pass
        finally:
            await sql(postgres, "ALTER SYSTEM RESET max_slot_wal_keep_size")
            await sql(postgres, "SELECT pg_reload_conf()")
        assert caught.value.code == "57P01"  # the checkpoint ended the walsender
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        with pytest.raises(SlotInvalidated, match="streaming_doomed"):
            async with start_replication(conn, "streaming_doomed", ["pub"]):
                pass
        await drop_slot(conn, "streaming_doomed")


async def test_slot_in_use_is_an_error(postgres: PostgresServer, repl_db: str) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as a:
        await ensure_slot(a, "busy")
        async with (
            start_replication(a, "busy", ["pub"]),
            await connect(postgres, database=repl_db, replication=True) as b,
        ):
            with pytest.raises(PgError) as caught:
                async with start_replication(b, "busy", ["pub"]):
                    pass
            assert caught.value.code == "55006"
            (result,) = await b.simple_query("SELECT 1")
            assert result.rows == (("1",),)


async def test_body_errors_come_out_as_themselves(postgres: PostgresServer, repl_db: str) -> None:
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "raises")
        with pytest.raises(KeyError, match="mine"):
            async with start_replication(conn, "raises", ["pub"]):
                raise KeyError("mine")
        (result,) = await conn.simple_query("SELECT 1")  # the stream ended cleanly anyway
        assert result.rows == (("1",),)


async def test_a_server_shutdown_ends_the_stream_normally(
    postgres: PostgresServer, repl_db: str
) -> None:
    # A walsender that stops with its server waits until the client has acked what it sent,
    # then sends CommandComplete "COPY 0" (no CopyDone) and closes the connection: the
    # stream ends as an iteration does, and says why.
    async with await connect(postgres, database=repl_db, replication=True) as conn:
        await ensure_slot(conn, "shutdown")
        async with start_replication(conn, "shutdown", ["pub"], status_interval=0.5) as stream:
            await sql(postgres, "INSERT INTO items VALUES (20, 'before')", repl_db)
            stream.ack(commit_end_lsn((await transaction(stream))[-1]))
            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, postgres.restart)
                    rest = [message async for message in stream]
        assert rest == []
        assert stream.ended is not None
        assert stream.ended == (
            f"PostgreSQL at {postgres.host}:{postgres.port} stopped streaming slot"
            " 'shutdown': the server is shutting down"
        )
        assert conn.broken  # the server closed it
        with pytest.raises(PgConnectionError, match="closed the connection"):
            await conn.simple_query("SELECT 1")


# -- publications and `pyrt pg-setup` ------------------------------------------------------


async def test_setup_publication_reports_replica_identity(postgres: PostgresServer) -> None:
    db = postgres.new_database("setup")
    postgres.sql(
        "CREATE TABLE keyed (id int PRIMARY KEY, v text);"
        "CREATE TABLE bare (v text);"
        "CREATE TABLE full_row (v text); ALTER TABLE full_row REPLICA IDENTITY FULL",
        db,
    )
    async with await connect(postgres, database=db) as conn:
        report = await setup_publication(conn, "everything")
        assert report.created
        assert report.all_tables
        assert report.wal_level == "logical"
        assert [t.table for t in report.without_identity] == ["bare"]
        assert [t.table for t in report.key_only] == ["keyed"]
        text = "\n".join(report.lines())
        assert 'ALTER TABLE "public"."bare" REPLICA IDENTITY FULL;' in text
        # The report is right: UPDATE on the table without identity fails.
        with pytest.raises(PgError) as caught:
            await conn.simple_query("UPDATE bare SET v = 'x'")
        assert caught.value.code == "55000"
        again = await setup_publication(conn, "everything")
        assert not again.created
        some = await setup_publication(conn, "some", ["keyed"])
        assert [t.table for t in some.tables] == ["keyed"]
        more = await setup_publication(conn, "some", ["keyed", "public.full_row"])
        assert more.added == ("public.full_row",)
        assert [t.table for t in more.tables] == ["full_row", "keyed"]
        assert more.without_identity == []


def test_pg_setup_command(postgres: PostgresServer) -> None:
    db = postgres.new_database("cli")
    postgres.sql("CREATE TABLE orders (id int PRIMARY KEY); CREATE TABLE log (line text)", db)
    args = ["--host", "127.0.0.1", "--port", str(postgres.port), "--user", "pyrt_scram"]
    command = [sys.executable, "-m", "pyrt._cli", "pg-setup", *args, "--database", db]
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert "publication 'pyrt' created (all tables)" in done.stdout
    assert 'ALTER TABLE "public"."log" REPLICA IDENTITY FULL;' in done.stdout
    assert postgres.sql("SELECT puballtables FROM pg_publication WHERE pubname = 'pyrt'", db) == "t"
    env["PGPASSWORD"] = "wrong"
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    assert "28P01" in done.stderr
    assert f"127.0.0.1:{postgres.port}" in done.stderr


def test_pg_setup_without_tables_tells_a_non_superuser_to_name_them(
    postgres: PostgresServer,
) -> None:
    db = postgres.new_database("owner")
    role = f"owner_{db.rsplit('_', 1)[1]}"  # roles are per cluster
    postgres.sql(
        f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'; GRANT CREATE ON DATABASE {db} TO {role}"
    )
    postgres.sql(
        f"CREATE TABLE orders (id int PRIMARY KEY); ALTER TABLE orders OWNER TO {role}", db
    )
    args = ["--host", "127.0.0.1", "--port", str(postgres.port), "--user", role]
    command = [sys.executable, "-m", "pyrt._cli", "pg-setup", *args, "--database", db]
    env = {**os.environ, "PGPASSWORD": PASSWORD}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    server, hint = done.stderr.splitlines()[-2:]
    assert server == (
        "pyrt pg-setup: must be superuser to create FOR ALL TABLES publication (SQLSTATE 42501)"
    )
    assert hint.startswith("pyrt pg-setup: without --table, pg-setup creates the publication")
    assert f"only a superuser may do, and '{role}' is not one" in hint
    assert "--table public.orders" in hint
    # As told: the same user, naming the table.
    done = subprocess.run(
        [*command, "--table", "public.orders"], capture_output=True, text=True, env=env, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "publication 'pyrt' created (1 table(s))" in done.stdout
    # Another refusal (no CREATE on the database), with --table given: no such hint.
    postgres.sql(f"REVOKE CREATE ON DATABASE {db} FROM {role}")
    denied = [*command, "--publication", "other", "--table", "public.orders"]
    done = subprocess.run(denied, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    assert "42501" in done.stderr
    assert "--table" not in done.stderr
