"""The sans-IO half of the PostgreSQL client (pyrt.postgres.protocol.Frontend), fed bytes as
a server would send them, with no server and no socket: startup and authentication (SCRAM
against scramp's server side), queries, COPY, replication streaming and its end at a server
shutdown, and what each state refuses."""

from __future__ import annotations

import ast
import struct
from pathlib import Path
from typing import Any

import pytest
import scramp  # type: ignore[import-untyped]
from hypothesis import given
from hypothesis import strategies as st

import pyrt.postgres.protocol
from pyrt.postgres.errors import PgAuthError, PgProtocolError, PgStateError
from pyrt.postgres.protocol import (
    NEED_DATA,
    AuthenticationMD5Password,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    CommandComplete,
    CopyData,
    CopyDone,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    ErrorResponse,
    Frontend,
    NoticeResponse,
    NotificationResponse,
    ParameterStatus,
    ReadyForQuery,
    RowDescription,
    State,
    TransactionStatus,
    copy_data,
    copy_done,
    md5_password,
    password_message,
    query_message,
    terminate,
)

# -- what a server sends -------------------------------------------------------------------


def message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def auth(code: int, data: bytes = b"") -> bytes:
    return message(b"R", struct.pack("!i", code) + data)


def ready(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def error(severity: str, code: str, text: str) -> bytes:
    fields = f"S{severity}\0V{severity}\0C{code}\0M{text}\0\0"
    return message(b"E", fields.encode())


def complete(tag: str) -> bytes:
    return message(b"C", tag.encode() + b"\0")


def copy_response(kind: bytes) -> bytes:
    return message(kind, struct.pack("!bh", 0, 0))


PARAMETER = message(b"S", b"server_version\x0015.8\0")
NOTICE = message(b"N", b"SWARNING\0C01000\0Mjust so you know\0\0")
NOTIFICATION = message(b"A", struct.pack("!i", 7) + b"chan\0payload\0")
KEY_DATA = message(b"K", struct.pack("!ii", 4242, 99))
ROW_DESCRIPTION = message(
    b"T", struct.pack("!h", 1) + b"n\0" + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)
)
DATA_ROW = message(b"D", struct.pack("!hi", 1, 1) + b"1")


def events(frontend: Frontend, data: bytes) -> list[Any]:
    """Feeds `data` and takes every event it holds."""
    frontend.receive_data(data)
    out = []
    while (event := frontend.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def ready_frontend() -> Frontend:
    """A frontend past a trusted startup: IDLE."""
    frontend = Frontend("alice", None, {"database": "app"})
    frontend.start()
    events(frontend, auth(0) + ready())
    assert frontend.state is State.IDLE
    return frontend


def streaming_frontend() -> Frontend:
    frontend = ready_frontend()
    frontend.query("START_REPLICATION SLOT s LOGICAL 0/0")
    events(frontend, copy_response(b"W"))
    assert frontend.state is State.COPY_BOTH
    return frontend


# -- startup and authentication ----------------------------------------------------------


def test_startup_message_carries_the_user_and_parameters() -> None:
    frontend = Frontend("alice", None, {"database": "app", "replication": "database"})
    data = frontend.start()
    assert struct.unpack("!ii", data[:8]) == (len(data), 3 << 16)
    assert data[8:] == b"user\0alice\0database\0app\0replication\0database\0\0"
    with pytest.raises(PgStateError, match="already started"):
        frontend.start()


def test_scram_login_against_scramps_server_side() -> None:
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    stored = mechanism.make_auth_info("s3cret", iteration_count=4096)
    server = mechanism.make_server(lambda _user: stored)
    frontend = Frontend("alice", "s3cret", {"database": "app"})
    frontend.start()

    assert events(frontend, auth(10, b"SCRAM-SHA-256\0\0")) == [
        AuthenticationSASL(("SCRAM-SHA-256",))
    ]
    initial = frontend.data_to_send()
    assert initial[:1] == b"p"
    assert initial[5:19] == b"SCRAM-SHA-256\0"
    (length,) = struct.unpack("!i", initial[19:23])
    server.set_client_first(initial[23 : 23 + length].decode())
    assert frontend.data_to_send() == b""  # handed out once

    server_first = server.get_server_first().encode()
    assert events(frontend, auth(11, server_first)) == [AuthenticationSASLContinue(server_first)]
    final = frontend.data_to_send()
    assert final[:1] == b"p"
    server.set_client_final(final[5:].decode())  # raises if the proof is wrong

    server_final = server.get_server_final().encode()
    login = events(frontend, auth(12, server_final) + auth(0) + PARAMETER + KEY_DATA + ready())
    assert login[0] == AuthenticationSASLFinal(server_final)
    assert login[-1] == ReadyForQuery(TransactionStatus.IDLE)
    assert frontend.data_to_send() == b""
    assert frontend.state is State.IDLE
    assert frontend.auth_method == "SCRAM-SHA-256"
    assert frontend.parameters == {"server_version": "15.8"}
    assert (frontend.backend_pid, frontend.secret_key) == (4242, 99)


def test_a_server_with_a_forged_scram_proof_is_refused() -> None:
    mechanism = scramp.ScramMechanism("SCRAM-SHA-256")
    # The server side knows another password, so its final message proves the wrong key.
    server = mechanism.make_server(lambda _user: mechanism.make_auth_info("other", 4096))
    frontend = Frontend("alice", "s3cret", {})
    frontend.start()
    events(frontend, auth(10, b"SCRAM-SHA-256\0\0"))
    initial = frontend.data_to_send()
    server.set_client_first(initial[23:].decode())
    events(frontend, auth(11, server.get_server_first().encode()))
    frontend.data_to_send()
    forged = b"v=" + b"A" * 44
    with pytest.raises(PgAuthError, match="failed SCRAM's proof"):
        events(frontend, auth(12, forged))


def test_md5_login_answers_with_the_salted_hash() -> None:
    frontend = Frontend("alice", "pw", {})
    frontend.start()
    assert events(frontend, auth(5, b"salt")) == [AuthenticationMD5Password(b"salt")]
    assert frontend.data_to_send() == password_message(md5_password("alice", "pw", b"salt"))
    events(frontend, auth(0) + ready())
    assert (frontend.state, frontend.auth_method) == (State.IDLE, "md5")


def test_a_refused_login_closes_the_session() -> None:
    frontend = Frontend("alice", "wrong", {})
    frontend.start()
    events(frontend, auth(3))  # cleartext
    assert frontend.data_to_send() == password_message("wrong")
    (refusal,) = events(frontend, error("FATAL", "28P01", "password authentication failed"))
    assert isinstance(refusal, ErrorResponse)
    assert refusal.fields["C"] == "28P01"
    assert frontend.state is State.CLOSED


def test_startup_refuses_a_query_result() -> None:
    frontend = Frontend("alice", None, {})
    frontend.start()
    with pytest.raises(PgProtocolError, match="unexpected DataRow while starting up"):
        events(frontend, DATA_ROW)
    assert frontend.state is State.CLOSED


# -- queries -------------------------------------------------------------------------------


def test_a_query_runs_until_ready_for_query() -> None:
    frontend = ready_frontend()
    assert frontend.query("BEGIN; SELECT 1") == query_message("BEGIN; SELECT 1")
    assert frontend.state is State.QUERY
    with pytest.raises(PgStateError, match="cannot send a query while the connection is running"):
        frontend.query("SELECT 2")
    answer = events(frontend, complete("BEGIN") + ROW_DESCRIPTION + DATA_ROW + complete("SELECT 1"))
    assert [type(e) for e in answer] == [CommandComplete, RowDescription, DataRow, CommandComplete]
    assert frontend.state is State.QUERY
    assert events(frontend, ready(b"T")) == [ReadyForQuery(TransactionStatus.IN_TRANSACTION)]
    assert (frontend.state, frontend.transaction_status) == (
        State.IDLE,
        TransactionStatus.IN_TRANSACTION,
    )


def test_an_error_ends_the_statement_and_a_fatal_one_the_session() -> None:
    frontend = ready_frontend()
    frontend.query("SELEC 1")
    events(frontend, error("ERROR", "42601", "syntax error") + ready(b"I"))
    assert frontend.state is State.IDLE
    frontend.query("SELECT pg_sleep(10)")
    events(frontend, error("FATAL", "57P01", "terminating connection"))
    assert frontend.state is State.CLOSED
    with pytest.raises(PgProtocolError, match="unexpected ReadyForQuery while closed"):
        events(frontend, ready())


def test_a_fatal_error_while_idle_ends_the_session() -> None:
    frontend = ready_frontend()
    (fatal,) = events(frontend, error("FATAL", "57P01", "terminating connection"))
    assert isinstance(fatal, ErrorResponse)
    assert frontend.state is State.CLOSED


def test_messages_that_come_at_any_time_keep_the_state() -> None:
    frontend = ready_frontend()
    for state in (State.IDLE, State.QUERY, State.COPY_BOTH):
        if state is State.QUERY:
            frontend.query("START_REPLICATION SLOT s LOGICAL 0/0")
        elif state is State.COPY_BOTH:
            events(frontend, copy_response(b"W"))
        got = events(frontend, PARAMETER + NOTICE + NOTIFICATION)
        assert [type(e) for e in got] == [ParameterStatus, NoticeResponse, NotificationResponse]
        assert got[2] == NotificationResponse(7, "chan", "payload")
        assert frontend.state is state
    assert [n.message for n in frontend.notices] == ["just so you know"] * 3


def test_an_idle_connection_refuses_results() -> None:
    frontend = ready_frontend()
    with pytest.raises(PgProtocolError, match="unexpected CommandComplete while idle"):
        events(frontend, complete("SELECT 1"))
    assert frontend.state is State.CLOSED


def test_copy_out_and_a_refused_copy_in() -> None:
    frontend = ready_frontend()
    frontend.query("COPY t TO STDOUT")
    got = events(frontend, copy_response(b"H") + message(b"d", b"1\n"))
    assert got == [CopyOutResponse(0, ()), CopyData(b"1\n")]
    assert frontend.state is State.COPY_OUT
    with pytest.raises(PgStateError, match="cannot send CopyData while the connection is in COPY"):
        frontend.copy_data(b"x")
    assert [type(e) for e in events(frontend, message(b"c") + complete("COPY 1"))] == [
        CopyDone,
        CommandComplete,
    ]
    assert frontend.state is State.QUERY
    events(frontend, ready())

    frontend.query("COPY t FROM STDIN")
    assert events(frontend, copy_response(b"G")) == [CopyInResponse(0, ())]
    assert frontend.state is State.COPY_IN
    frontend.copy_fail("no data here")
    assert frontend.state is State.QUERY
    events(frontend, error("ERROR", "57014", "COPY from stdin failed") + ready())
    assert frontend.state is State.IDLE


# -- replication streaming -----------------------------------------------------------------


def test_streaming_ends_with_copy_done_both_ways() -> None:
    frontend = streaming_frontend()
    assert events(frontend, message(b"d", b"k...")) == [CopyData(b"k...")]
    assert frontend.copy_data(b"r...") == copy_data(b"r...")
    assert frontend.copy_done() == copy_done()
    with pytest.raises(PgStateError, match="after CopyDone"):
        frontend.copy_data(b"r...")
    with pytest.raises(PgStateError, match="twice"):
        frontend.copy_done()
    assert events(frontend, message(b"d", b"w...")) == [CopyData(b"w...")]  # still in flight
    assert not frontend.server_copy_done
    events(frontend, message(b"c"))
    assert frontend.server_copy_done
    assert frontend.state is State.COPY_BOTH
    events(frontend, complete("COPY 0") + complete("START_REPLICATION"))
    assert frontend.state is State.QUERY
    events(frontend, ready())
    assert frontend.state is State.IDLE
    frontend.query("IDENTIFY_SYSTEM")  # the connection is usable again


def test_a_server_shutting_down_ends_streaming_with_command_complete_alone() -> None:
    # What a walsender sends when the server stops (WalSndDone): CommandComplete "COPY 0",
    # no CopyDone, and then it closes the connection.
    frontend = streaming_frontend()
    got = events(frontend, message(b"d", b"w...") + complete("COPY 0"))
    assert got == [CopyData(b"w..."), CommandComplete("COPY 0")]
    assert frontend.state is State.QUERY  # out of COPY: waits for ReadyForQuery or the end
    assert not frontend.server_copy_done
    with pytest.raises(PgStateError, match="cannot send CopyData while the connection is running"):
        frontend.copy_data(b"r...")


def test_an_error_while_streaming_leaves_copy_mode() -> None:
    frontend = streaming_frontend()
    events(frontend, error("ERROR", "55000", "requested WAL segment has already been removed"))
    assert frontend.state is State.QUERY
    events(frontend, ready())
    assert frontend.state is State.IDLE


def test_terminate_closes_in_any_state() -> None:
    frontend = streaming_frontend()
    assert frontend.terminate() == terminate()
    assert frontend.state is State.CLOSED
    with pytest.raises(PgStateError, match="closed"):
        frontend.query("SELECT 1")


SESSION = [
    auth(5, b"salt"),
    auth(0),
    PARAMETER,
    KEY_DATA,
    ready(),
    # the query
    ROW_DESCRIPTION,
    NOTICE,
    DATA_ROW,
    complete("SELECT 1"),
    ready(),
    # START_REPLICATION
    copy_response(b"W"),
    message(b"d", b"w" + bytes(24) + b"B"),
    NOTIFICATION,
    message(b"d", b"k" + bytes(17)),
    complete("COPY 0"),
]


def run_session(chunks: list[bytes]) -> tuple[list[Any], Frontend]:
    frontend = Frontend("alice", "pw", {})
    frontend.start()
    got = []
    queried = streaming = False
    for chunk in chunks:
        frontend.receive_data(chunk)
        while (event := frontend.next_event()) is not NEED_DATA:
            got.append(event)
            if frontend.state is State.IDLE and not queried:
                frontend.query("SELECT 1")
                queried = True
            elif frontend.state is State.IDLE and not streaming:
                frontend.query("START_REPLICATION SLOT s LOGICAL 0/0")
                streaming = True
    return got, frontend


@given(st.data())
def test_any_chunking_gives_the_same_session(data: st.DataObject) -> None:
    stream = b"".join(SESSION)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    got, frontend = run_session(chunks)
    whole, _ = run_session(SESSION)
    assert got == whole
    assert len(got) == len(SESSION)
    assert frontend.state is State.QUERY
    assert frontend.buffered == 0


def test_the_protocol_module_does_no_io() -> None:
    tree = ast.parse(Path(pyrt.postgres.protocol.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert imported & {"trio", "socket", "ssl", "time", "asyncio", "selectors"} == set()
    assert "scramp" in imported  # SCRAM is the library's, not hand-written
