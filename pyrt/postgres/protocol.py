"""PostgreSQL's frontend/backend protocol (version 3.0) as sans-IO code, like h11: bytes in,
events out, bytes to send back. No socket, no clock, no trio: `pyrt.postgres.connection`
does the I/O around it.

- Message builders (`startup_message`, `query_message`, `copy_data`, ...) encode what the
  client sends; `quote_ident` and `quote_literal` quote names and values.
- `BackendParser` splits the server's bytes into frozen events (`receive_data(bytes)`, then
  `next_event()` until `NEED_DATA`).
- `Authenticator` answers the server's authentication requests: cleartext, md5 and
  SCRAM-SHA-256 through `scramp`.
- `Frontend` is the state machine of one connection: it parses, authenticates, keeps what
  the server reported (parameters, backend pid, transaction status) and refuses what the
  state does not allow, in both directions. Its transitions are one table, `TRANSITIONS`.

Why hand-written: no Python driver speaks PostgreSQL's replication protocol under trio.
psycopg 3 has neither replication (psycopg#71) nor trio support (psycopg#29), asyncpg is
asyncio-only, pg-purepy has no COPY or LISTEN, and psycopg2's replication connection needs
libpq. What pyrt needs is small: startup and authentication, the simple query protocol,
LISTEN/NOTIFY and the CopyBoth stream replication runs on (`pyrt.postgres.replication`).
There is no extended query protocol here: no bound parameters, so quote values with
`quote_literal` and names with `quote_ident`.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import struct
from collections.abc import Mapping
from typing import Final, TypeAlias

import attrs
import scramp  # type: ignore[import-untyped]  # (no stubs or py.typed)

from .errors import PgAuthError, PgProtocolError, PgStateError

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "AuthenticationCleartextPassword",
    "AuthenticationMD5Password",
    "AuthenticationOk",
    "AuthenticationSASL",
    "AuthenticationSASLContinue",
    "AuthenticationSASLFinal",
    "AuthenticationUnsupported",
    "Authenticator",
    "BackendEvent",
    "BackendKeyData",
    "BackendParser",
    "Column",
    "CommandComplete",
    "CopyBothResponse",
    "CopyData",
    "CopyDone",
    "CopyInResponse",
    "CopyOutResponse",
    "DataRow",
    "EmptyQueryResponse",
    "ErrorResponse",
    "Frontend",
    "NoticeResponse",
    "NotificationResponse",
    "ParameterStatus",
    "ReadyForQuery",
    "ResultSet",
    "RowDescription",
    "State",
    "TransactionStatus",
    "copy_data",
    "copy_done",
    "copy_fail",
    "md5_password",
    "password_message",
    "query_message",
    "quote_ident",
    "quote_literal",
    "sasl_initial_response",
    "sasl_response",
    "ssl_request",
    "startup_message",
    "terminate",
]

PROTOCOL_VERSION: Final = 3 << 16
SSL_REQUEST_CODE: Final = 80877103
MAX_MESSAGE_BYTES: Final = 1 << 30
"""The server never sends a message over 1 GiB (its MaxAllocSize); a longer length is garbage."""


# -- frontend messages ---------------------------------------------------------------------


def _cstring(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError(f"PostgreSQL strings cannot contain NUL: {text[:60]!r}")
    return data + b"\0"


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def startup_message(params: Mapping[str, str]) -> bytes:
    """StartupMessage: protocol 3.0 and `params` (user, database, replication, ...)."""
    body = struct.pack("!i", PROTOCOL_VERSION)
    body += b"".join(_cstring(k) + _cstring(v) for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def ssl_request() -> bytes:
    """SSLRequest: the server answers one byte, `S` (go on with TLS) or `N`."""
    return struct.pack("!ii", 8, SSL_REQUEST_CODE)


def password_message(password: str) -> bytes:
    return _message(b"p", _cstring(password))


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _message(b"p", _cstring(mechanism) + struct.pack("!i", len(data)) + data)


def sasl_response(data: bytes) -> bytes:
    return _message(b"p", data)


def query_message(sql: str) -> bytes:
    """Query (the simple query protocol): one or more `;`-separated statements."""
    return _message(b"Q", _cstring(sql))


def copy_data(data: bytes) -> bytes:
    return _message(b"d", data)


def copy_done() -> bytes:
    return _message(b"c")


def copy_fail(reason: str) -> bytes:
    return _message(b"f", _cstring(reason))


def terminate() -> bytes:
    return _message(b"X")


def md5_password(user: str, password: str, salt: bytes) -> str:
    """What `md5` authentication sends: md5(md5(password + user) + salt), hex, with a prefix."""
    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
    return "md5" + hashlib.md5(inner + salt).hexdigest()


def quote_ident(name: str) -> str:
    """`name` as a quoted SQL identifier (exact case, any characters but NUL)."""
    _cstring(name)
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """`value` as an SQL string literal, right whatever standard_conforming_strings says."""
    _cstring(value)
    quoted = value.replace("'", "''")
    if "\\" in quoted:
        return "E'" + quoted.replace("\\", "\\\\") + "'"
    return "'" + quoted + "'"


# -- backend events ------------------------------------------------------------------------


@attrs.frozen(slots=True)
class AuthenticationOk:
    pass


@attrs.frozen(slots=True)
class AuthenticationCleartextPassword:
    pass


@attrs.frozen(slots=True)
class AuthenticationMD5Password:
    salt: bytes


@attrs.frozen(slots=True)
class AuthenticationSASL:
    mechanisms: tuple[str, ...]


@attrs.frozen(slots=True)
class AuthenticationSASLContinue:
    data: bytes


@attrs.frozen(slots=True)
class AuthenticationSASLFinal:
    data: bytes


@attrs.frozen(slots=True)
class AuthenticationUnsupported:
    """Kerberos, GSSAPI, SSPI: methods pyrt does not speak."""

    code: int


@attrs.frozen(slots=True)
class ParameterStatus:
    name: str
    value: str


@attrs.frozen(slots=True)
class BackendKeyData:
    pid: int
    secret_key: int


class TransactionStatus(enum.Enum):
    IDLE = "I"
    IN_TRANSACTION = "T"
    FAILED = "E"


@attrs.frozen(slots=True)
class ReadyForQuery:
    status: TransactionStatus


@attrs.frozen(slots=True)
class Column:
    name: str
    table_oid: int
    column_number: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@attrs.frozen(slots=True)
class RowDescription:
    columns: tuple[Column, ...]


@attrs.frozen(slots=True)
class DataRow:
    values: tuple[bytes | None, ...]


@attrs.frozen(slots=True)
class CommandComplete:
    tag: str


@attrs.frozen(slots=True)
class EmptyQueryResponse:
    pass


@attrs.frozen(slots=True)
class ErrorResponse:
    """`fields` by their one-letter code: C SQLSTATE, M message, D detail, H hint, V
    severity, P position, W where, s schema, t table, c column, n constraint, ..."""

    fields: Mapping[str, str] = attrs.field(hash=False)


@attrs.frozen(slots=True)
class NoticeResponse:
    fields: Mapping[str, str] = attrs.field(hash=False)

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


@attrs.frozen(slots=True)
class NotificationResponse:
    """A NOTIFY: the notifying backend's pid, the channel and the payload ('' if none)."""

    pid: int
    channel: str
    payload: str


@attrs.frozen(slots=True)
class CopyInResponse:
    format: int
    column_formats: tuple[int, ...]


@attrs.frozen(slots=True)
class CopyOutResponse:
    format: int
    column_formats: tuple[int, ...]


@attrs.frozen(slots=True)
class CopyBothResponse:
    """START_REPLICATION succeeded: CopyData flows both ways from here."""

    format: int
    column_formats: tuple[int, ...]


@attrs.frozen(slots=True)
class CopyData:
    data: bytes


@attrs.frozen(slots=True)
class CopyDone:
    pass


BackendEvent: TypeAlias = (
    AuthenticationOk
    | AuthenticationCleartextPassword
    | AuthenticationMD5Password
    | AuthenticationSASL
    | AuthenticationSASLContinue
    | AuthenticationSASLFinal
    | AuthenticationUnsupported
    | ParameterStatus
    | BackendKeyData
    | ReadyForQuery
    | RowDescription
    | DataRow
    | CommandComplete
    | EmptyQueryResponse
    | ErrorResponse
    | NoticeResponse
    | NotificationResponse
    | CopyInResponse
    | CopyOutResponse
    | CopyBothResponse
    | CopyData
    | CopyDone
)


class _NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData.NEED_DATA
"""`next_event()`'s answer when the buffer holds no whole message."""


class _Body:
    """Reads fields off one message body; a short body is a protocol error."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise PgProtocolError("a message from the server is shorter than its fields")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int8(self) -> int:
        value: int = self._take(1)[0]
        return value

    def int16(self) -> int:
        value: int = struct.unpack("!h", self._take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack("!i", self._take(4))[0]
        return value

    def cstring(self) -> str:
        end = self.data.find(b"\0", self.pos)
        if end < 0:
            raise PgProtocolError("a string from the server lacks its terminating NUL")
        text = self.data[self.pos : end].decode("utf-8", errors="replace")
        self.pos = end + 1
        return text

    def rest(self) -> bytes:
        return self._take(len(self.data) - self.pos)


def _fields(body: _Body) -> dict[str, str]:
    fields: dict[str, str] = {}
    while True:
        code = body.int8()
        if code == 0:
            return fields
        fields[chr(code)] = body.cstring()


def _copy_response(body: _Body) -> tuple[int, tuple[int, ...]]:
    overall = body.int8()
    return overall, tuple(body.int16() for _ in range(body.int16()))


def _authentication(body: _Body) -> BackendEvent:
    code = body.int32()
    if code == 0:
        return AuthenticationOk()
    if code == 3:
        return AuthenticationCleartextPassword()
    if code == 5:
        return AuthenticationMD5Password(body._take(4))
    if code == 10:
        mechanisms = []
        while (name := body.cstring()) != "":
            mechanisms.append(name)
        return AuthenticationSASL(tuple(mechanisms))
    if code == 11:
        return AuthenticationSASLContinue(body.rest())
    if code == 12:
        return AuthenticationSASLFinal(body.rest())
    return AuthenticationUnsupported(code)


def _row_description(body: _Body) -> RowDescription:
    columns = []
    for _ in range(body.int16()):
        name = body.cstring()
        table_oid, attnum = body.int32(), body.int16()
        type_oid, size, modifier, fmt = body.int32(), body.int16(), body.int32(), body.int16()
        columns.append(Column(name, table_oid, attnum, type_oid, size, modifier, fmt))
    return RowDescription(tuple(columns))


def _data_row(body: _Body) -> DataRow:
    values: list[bytes | None] = []
    for _ in range(body.int16()):
        length = body.int32()
        values.append(None if length == -1 else body._take(length))
    return DataRow(tuple(values))


def _parse(kind: int, data: bytes) -> BackendEvent:
    body = _Body(data)
    event: BackendEvent
    match kind:
        case 0x64:  # d
            return CopyData(data)
        case 0x44:  # D
            event = _data_row(body)
        case 0x52:  # R
            event = _authentication(body)
        case 0x53:  # S
            event = ParameterStatus(body.cstring(), body.cstring())
        case 0x4B:  # K
            event = BackendKeyData(body.int32(), body.int32())
        case 0x5A:  # Z
            status = chr(body.int8())
            try:
                event = ReadyForQuery(TransactionStatus(status))
            except ValueError:
                raise PgProtocolError(f"unknown transaction status {status!r}") from None
        case 0x54:  # T
            event = _row_description(body)
        case 0x43:  # C
            event = CommandComplete(body.cstring())
        case 0x49:  # I
            event = EmptyQueryResponse()
        case 0x45:  # E
            event = ErrorResponse(_fields(body))
        case 0x4E:  # N
            event = NoticeResponse(_fields(body))
        case 0x41:  # A
            event = NotificationResponse(body.int32(), body.cstring(), body.cstring())
        case 0x47:  # G
            event = CopyInResponse(*_copy_response(body))
        case 0x48:  # H
            event = CopyOutResponse(*_copy_response(body))
        case 0x57:  # W
            event = CopyBothResponse(*_copy_response(body))
        case 0x63:  # c
            event = CopyDone()
        case _:
            raise PgProtocolError(f"unexpected message type {chr(kind)!r} from the server")
    if body.pos != len(data):
        raise PgProtocolError(f"a {chr(kind)!r} message from the server has trailing bytes")
    return event


class BackendParser:
    """Splits the server's byte stream into events (everything after the startup reply)."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self._buffer = bytearray()
        self._pos = 0
        self._max = max_message_bytes

    def receive_data(self, data: bytes | bytearray) -> None:
        if self._pos > 65536 and self._pos * 2 > len(self._buffer):
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events."""
        return len(self._buffer) - self._pos

    def next_event(self) -> BackendEvent | _NeedData:
        buf, pos = self._buffer, self._pos
        if len(buf) - pos < 5:
            return NEED_DATA
        kind = buf[pos]
        (length,) = struct.unpack_from("!i", buf, pos + 1)
        if length < 4 or length > self._max:
            raise PgProtocolError(f"a message of type {chr(kind)!r} claims {length} bytes")
        end = pos + 1 + length
        if len(buf) < end:
            return NEED_DATA
        self._pos = end
        return _parse(kind, bytes(buf[pos + 5 : end]))


# -- authentication ------------------------------------------------------------------------


class Authenticator:
    """Answers the server's authentication requests for one user (sans-IO): `respond(event)`
    gives the bytes to send, or None when there is nothing to say."""

    def __init__(self, user: str, password: str | None) -> None:
        self.user = user
        self.password = password
        self._scram: scramp.ScramClient | None = None
        self._scram_done = False
        self.method: str | None = None
        """What the server asked for: cleartext, md5 or SCRAM-SHA-256."""

    def _password(self) -> str:
        if self.password is None:
            raise PgAuthError(f"the server asks for a password for user {self.user!r}; none given")
        return self.password

    def respond(self, event: BackendEvent) -> bytes | None:
        match event:
            case AuthenticationCleartextPassword():
                self.method = "cleartext"
                return password_message(self._password())
            case AuthenticationMD5Password(salt):
                self.method = "md5"
                return password_message(md5_password(self.user, self._password(), salt))
            case AuthenticationSASL(mechanisms):
                if "SCRAM-SHA-256" not in mechanisms:
                    offered = ", ".join(mechanisms)
                    raise PgAuthError(f"the server offers SASL {offered}, not SCRAM-SHA-256")
                self.method = "SCRAM-SHA-256"
                # No channel binding (-PLUS): pyrt does not pin the TLS certificate that way.
                self._scram = scramp.ScramClient(["SCRAM-SHA-256"], self.user, self._password())
                first = self._scram.get_client_first().encode()
                return sasl_initial_response("SCRAM-SHA-256", first)
            case AuthenticationSASLContinue(data):
                scram = self._scram_step()
                try:
                    scram.set_server_first(data.decode())
                    return sasl_response(scram.get_client_final().encode())
                except (scramp.ScramException, UnicodeDecodeError) as e:
                    raise PgAuthError(f"SCRAM with the server failed: {e}") from None
            case AuthenticationSASLFinal(data):
                scram = self._scram_step()
                try:
                    scram.set_server_final(data.decode())
                except (scramp.ScramException, UnicodeDecodeError) as e:
                    raise PgAuthError(f"the server failed SCRAM's proof: {e}") from None
                self._scram_done = True
                return None
            case AuthenticationOk():
                if self._scram is not None and not self._scram_done:
                    raise PgAuthError("the server ended SCRAM without proof it knows the password")
                return None
            case AuthenticationUnsupported(code):
                names = {2: "Kerberos V5", 7: "GSSAPI", 8: "GSSAPI", 9: "SSPI"}
                method = names.get(code, f"method {code}")
                raise PgAuthError(f"the server asks for {method} authentication; pyrt cannot")
        return None

    def _scram_step(self) -> scramp.ScramClient:
        if self._scram is None:
            raise PgProtocolError("a SASL message came before SASL began")
        return self._scram


# -- results -------------------------------------------------------------------------------


@attrs.frozen(slots=True)
class ResultSet:
    """One statement's result: its columns and rows (text, None for NULL) and its command
    tag (`SELECT 3`, `CREATE TABLE`; empty for an empty query)."""

    columns: tuple[Column, ...]
    rows: tuple[tuple[str | None, ...], ...]
    command: str

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def dicts(self) -> list[dict[str, str | None]]:
        names = self.column_names
        return [dict(zip(names, row, strict=True)) for row in self.rows]


# -- the connection's state machine --------------------------------------------------------


class State(enum.Enum):
    """Where one connection stands, seen from the client (the protocol's "message flow")."""

    STARTUP = "starting up"
    """StartupMessage sent: authentication and the server's parameters, until ReadyForQuery."""
    IDLE = "idle"
    """The server is ready for a query."""
    QUERY = "running a query"
    """A query runs: its results come, then ReadyForQuery."""
    COPY_IN = "in COPY FROM STDIN"
    """The server waits for COPY data (pyrt only answers CopyFail)."""
    COPY_OUT = "in COPY TO STDOUT"
    """CopyData until CopyDone."""
    COPY_BOTH = "streaming"
    """Streaming replication: CopyData both ways until either side's CopyDone."""
    CLOSED = "closed"
    """Terminate sent, or the server ended the session (a FATAL error)."""


_AUTHENTICATION = (
    AuthenticationOk,
    AuthenticationCleartextPassword,
    AuthenticationMD5Password,
    AuthenticationSASL,
    AuthenticationSASLContinue,
    AuthenticationSASLFinal,
    AuthenticationUnsupported,
)
_ANY_TIME = (ParameterStatus, NoticeResponse, NotificationResponse)

TRANSITIONS: Final[Mapping[State, Mapping[type, State]]] = {
    State.STARTUP: {
        **dict.fromkeys(_AUTHENTICATION, State.STARTUP),
        BackendKeyData: State.STARTUP,
        ReadyForQuery: State.IDLE,
    },
    State.IDLE: {},
    State.QUERY: {
        RowDescription: State.QUERY,
        DataRow: State.QUERY,
        CommandComplete: State.QUERY,
        EmptyQueryResponse: State.QUERY,
        ErrorResponse: State.QUERY,
        CopyInResponse: State.COPY_IN,
        CopyOutResponse: State.COPY_OUT,
        CopyBothResponse: State.COPY_BOTH,
        ReadyForQuery: State.IDLE,
    },
    State.COPY_IN: {ErrorResponse: State.QUERY},
    State.COPY_OUT: {CopyData: State.COPY_OUT, CopyDone: State.QUERY, ErrorResponse: State.QUERY},
    State.COPY_BOTH: {
        CopyData: State.COPY_BOTH,
        CopyDone: State.COPY_BOTH,
        # The end of the COPY: after CopyDone both ways, or without the server's CopyDone
        # when a walsender stops (a server shutting down sends CommandComplete "COPY 0",
        # then closes the connection instead of sending ReadyForQuery).
        CommandComplete: State.QUERY,
        ErrorResponse: State.QUERY,
    },
    State.CLOSED: {},
}
"""What each message from the server moves the connection to; a message its state does not
list is a protocol error. Besides these, ParameterStatus, NoticeResponse and
NotificationResponse may come in any state but CLOSED, and an ErrorResponse whose severity
is FATAL or PANIC (or any ErrorResponse at startup or while idle) ends the session: CLOSED."""


def _ends_session(state: State, error: ErrorResponse) -> bool:
    severity = error.fields.get("V", error.fields.get("S"))
    return state in (State.STARTUP, State.IDLE) or severity in ("FATAL", "PANIC")


class Frontend:
    """The client's side of one connection, sans-IO.

    Feed it the server's bytes with `receive_data` and take events with `next_event`
    (`NEED_DATA` when it needs more); send what `data_to_send` holds (answers to
    authentication requests) and what `start`, `query`, `copy_data`, `copy_done`,
    `copy_fail` and `terminate` return. It raises `PgProtocolError` for a message from the
    server that the state does not allow (the connection is then CLOSED), and `PgStateError`
    for one from the client (nothing changes then)."""

    def __init__(
        self,
        user: str,
        password: str | None,
        params: Mapping[str, str],
        *,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
    ) -> None:
        self.user = user
        self._params = {"user": user, **params}
        self._parser = BackendParser(max_message_bytes)
        self._auth = Authenticator(user, password)
        self._outgoing = bytearray()
        self._started = False
        self._client_copy_done = False
        self._server_copy_done = False
        self.state = State.STARTUP
        self.parameters: dict[str, str] = {}
        """What the server reported with ParameterStatus (server_version, TimeZone, ...)."""
        self.backend_pid: int | None = None
        self.secret_key: int | None = None
        self.transaction_status = TransactionStatus.IDLE
        self.notices: collections.deque[NoticeResponse] = collections.deque(maxlen=100)
        """The latest notices (warnings) the server sent."""

    def __repr__(self) -> str:
        return f"<Frontend {self.user} {self.state.value}>"

    @property
    def auth_method(self) -> str | None:
        """What the server asked for: cleartext, md5 or SCRAM-SHA-256 (None: trust)."""
        return self._auth.method

    @property
    def server_copy_done(self) -> bool:
        """In COPY_BOTH: the server sent CopyDone (no more CopyData comes)."""
        return self._server_copy_done

    # -- what the client sends ---------------------------------------------------------------

    def start(self) -> bytes:
        """The StartupMessage, to send first."""
        if self._started:
            raise PgStateError("the connection has already started")
        self._started = True
        return startup_message(self._params)

    def data_to_send(self) -> bytes:
        """What the frontend has to send (answers to authentication requests), once."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def query(self, sql: str) -> bytes:
        """Query (the simple query protocol): IDLE to QUERY."""
        self._expect("a query", State.IDLE)
        message = query_message(sql)
        self.state = State.QUERY
        return message

    def copy_data(self, data: bytes) -> bytes:
        self._expect("CopyData", State.COPY_IN, State.COPY_BOTH)
        if self._client_copy_done:
            raise PgStateError("cannot send CopyData after CopyDone")
        return copy_data(data)

    def copy_done(self) -> bytes:
        """The client's end of a COPY: COPY_IN to QUERY; in COPY_BOTH the server goes on
        until its own CopyDone."""
        self._expect("CopyDone", State.COPY_IN, State.COPY_BOTH)
        if self._client_copy_done:
            raise PgStateError("cannot send CopyDone twice")
        if self.state is State.COPY_IN:
            self.state = State.QUERY
        else:
            self._client_copy_done = True
        return copy_done()

    def copy_fail(self, reason: str) -> bytes:
        """Refuses COPY FROM STDIN: the server answers with an error."""
        self._expect("CopyFail", State.COPY_IN)
        message = copy_fail(reason)
        self.state = State.QUERY
        return message

    def terminate(self) -> bytes:
        """Terminate: goodbye, in any state."""
        self.state = State.CLOSED
        return terminate()

    def _expect(self, what: str, *states: State) -> None:
        if self.state not in states:
            raise PgStateError(f"cannot send {what} while the connection is {self.state.value}")

    # -- what the server sends -----------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        self._parser.receive_data(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events."""
        return self._parser.buffered

    def next_event(self) -> BackendEvent | _NeedData:
        """The next message from the server, the connection's state moved past it."""
        event = self._parser.next_event()
        if event is NEED_DATA:
            return event
        state = self.state
        if type(event) is CopyData and (state is State.COPY_BOTH or state is State.COPY_OUT):
            return event  # the replication stream's common case: no transition
        if isinstance(event, _ANY_TIME) and state is not State.CLOSED:
            if isinstance(event, ParameterStatus):
                self.parameters[event.name] = event.value
            elif isinstance(event, NoticeResponse):
                self.notices.append(event)
            return event
        if isinstance(event, ErrorResponse) and _ends_session(state, event):
            self.state = State.CLOSED
            return event
        after = TRANSITIONS[state].get(type(event))
        if after is None:
            self.state = State.CLOSED
            raise PgProtocolError(f"unexpected {type(event).__name__} while {state.value}")
        match event:
            case ReadyForQuery(status):
                self.transaction_status = status
            case BackendKeyData(pid, secret):
                self.backend_pid, self.secret_key = pid, secret
            case CopyBothResponse():
                self._client_copy_done = self._server_copy_done = False
            case CopyDone() if state is State.COPY_BOTH:
                self._server_copy_done = True
            case _ if state is State.STARTUP:
                reply = self._auth.respond(event)
                if reply is not None:
                    self._outgoing += reply
        if after is not State.COPY_BOTH:
            self._client_copy_done = False
        self.state = after
        return event
