"""A PostgreSQL client for trio: the frontend/backend protocol (version 3.0) as sans-IO code,
and a trio connection around it.

Why hand-written: no Python driver speaks PostgreSQL's replication protocol under trio.
psycopg 3 has neither replication (psycopg#71) nor trio support (psycopg#29), asyncpg is
asyncio-only, pg-purepy has no COPY or LISTEN, and psycopg2's replication connection needs
libpq. What pyrt needs is small: startup and authentication (cleartext, md5, SCRAM-SHA-256
through `scramp`), optional TLS, the simple query protocol, LISTEN/NOTIFY and the CopyBoth
stream replication runs on (`pyrt.postgres.replication`). There is no extended query
protocol here: no bound parameters, so quote values with `quote_literal` and names with
`quote_ident`.

The sans-IO half (message builders, `BackendParser`, `Authenticator`) reads no clock and
touches no socket, like h11: `receive_data(bytes)`, then `next_event()` until `NEED_DATA`.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import ssl
import struct
from collections.abc import Iterator, Mapping
from typing import Final, TypeAlias

import attrs
import scramp  # type: ignore[import-untyped]  # (no stubs or py.typed)
import trio

__all__ = [
    "NEED_DATA",
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
    "NoticeResponse",
    "NotificationResponse",
    "ParameterStatus",
    "PgAuthError",
    "PgConnection",
    "PgConnectionError",
    "PgError",
    "PgProtocolError",
    "ReadyForQuery",
    "ResultSet",
    "RowDescription",
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


# -- errors --------------------------------------------------------------------------------


class PgError(Exception):
    """An ErrorResponse from the server: `code` is the SQLSTATE (`28P01` bad password,
    `42601` syntax error, ...), the other attributes the fields the server filled in.

    `context` says what the client was doing (the address and user when connecting)."""

    def __init__(self, fields: Mapping[str, str], context: str | None = None) -> None:
        self.fields = dict(fields)
        self.context = context
        super().__init__(str(self))

    @property
    def code(self) -> str:
        return self.fields.get("C", "")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")

    @property
    def severity(self) -> str:
        """Not localized: ERROR, FATAL or PANIC."""
        return self.fields.get("V", self.fields.get("S", ""))

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    @property
    def position(self) -> int | None:
        """1-based character position in the query the error refers to."""
        value = self.fields.get("P")
        return int(value) if value is not None and value.isdigit() else None

    def __str__(self) -> str:
        text = f"{self.message} (SQLSTATE {self.code})"
        if self.detail:
            text += f"\nDETAIL: {self.detail}"
        if self.hint:
            text += f"\nHINT: {self.hint}"
        if self.context:
            text += f"\n({self.context})"
        return text

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.fields, self.context))


class PgConnectionError(Exception):
    """No usable connection: refused, unreachable, timed out, closed, or broken by a
    cancelled call. The message names the server's address."""


class PgAuthError(PgConnectionError):
    """Authentication failed on the client's side (no password given, a method pyrt does not
    speak, a server that failed SCRAM's proof). A wrong password is a `PgError` with SQLSTATE
    28P01: the server decides that."""


class PgProtocolError(PgConnectionError):
    """The server sent something that is not the protocol; the connection is unusable."""


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


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
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


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


# -- the trio connection -------------------------------------------------------------------


class PgConnection:
    """One connection to PostgreSQL; make one with `await PgConnection.connect(...)`.

    One task at a time: a second concurrent call raises `trio.BusyResourceError`. A call
    cancelled halfway through a query leaves the protocol out of step, so the connection is
    then broken (every call raises `PgConnectionError`); waiting for a notification can be
    cancelled safely.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        address: str,
        user: str,
        database: str,
        replication: bool,
    ) -> None:
        self._stream = stream
        self._parser = BackendParser()
        self.address = address
        """`host:port` of the server."""
        self.user = user
        self.database = database
        self.replication = replication
        self.parameters: dict[str, str] = {}
        """What the server reported with ParameterStatus (server_version, TimeZone, ...)."""
        self.backend_pid: int | None = None
        self.transaction_status = TransactionStatus.IDLE
        self.notices: collections.deque[NoticeResponse] = collections.deque(maxlen=100)
        """The latest notices (warnings) the server sent."""
        self.auth_method: str | None = None
        self._notifications: collections.deque[NotificationResponse] = collections.deque()
        self._busy = False
        self._broken: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgConnection {self.user}@{self.address}/{self.database}>"

    @property
    def tls(self) -> bool:
        return isinstance(self._stream, trio.SSLStream)

    @classmethod
    async def connect(
        cls,
        host: str = "127.0.0.1",
        port: int = 5432,
        user: str = "postgres",
        password: str | None = None,
        database: str | None = None,
        *,
        replication: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 10.0,
        application_name: str = "pyrt",
        settings: Mapping[str, str] | None = None,
    ) -> PgConnection:
        """Connects and authenticates. `replication=True` opens a logical replication
        connection (`replication=database`): simple queries and replication commands only.
        With `ssl_context` the connection must be TLS (the server's refusal is an error).
        `settings` are run-time parameters for the session (`statement_timeout`, ...).

        Raises `PgConnectionError` (refused, unreachable, timed out: the message names
        the address and user), `PgError` (the server refused: `28P01` wrong password,
        `3D000` no such database, ...) or `PgAuthError`.
        """
        database = database or user
        address = f"{host}:{port}" if ":" not in host else f"[{host}]:{port}"
        context = f"PostgreSQL at {address}, user {user!r}, database {database!r}"
        params = {
            "user": user,
            "database": database,
            "application_name": application_name,
            "client_encoding": "UTF8",
            **(settings or {}),
        }
        if replication:
            params["replication"] = "database"
        with trio.move_on_after(timeout):
            try:
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
            except OSError as e:
                raise PgConnectionError(f"cannot connect to {context}: {_reason(e)}") from e
            try:
                if ssl_context is not None:
                    stream = await _start_tls(stream, ssl_context, host, context)
                conn = cls(
                    stream, address=address, user=user, database=database, replication=replication
                )
                await conn._startup(params, password, context)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return conn
        raise PgConnectionError(f"timed out after {timeout:g} s connecting to {context}")

    async def _startup(self, params: Mapping[str, str], password: str | None, context: str) -> None:
        auth = Authenticator(self.user, password)
        try:
            await self._stream.send_all(startup_message(params))
            while True:
                event = await self._read_event()
                match event:
                    case ErrorResponse(fields):
                        raise PgError(fields, context=context)
                    case ReadyForQuery(status):
                        self.transaction_status = status
                        self.auth_method = auth.method
                        return
                    case BackendKeyData(pid, _):
                        self.backend_pid = pid
                    case NoticeResponse() | ParameterStatus():
                        self._note(event)
                    case _:
                        reply = auth.respond(event)
                        if reply is not None:
                            await self._stream.send_all(reply)
        except PgProtocolError as e:
            raise PgProtocolError(f"{context} does not speak PostgreSQL's protocol: {e}") from e
        except PgConnectionError as e:
            if context not in str(e):
                raise type(e)(f"{e} ({context})") from e
            raise

    # -- low level (the replication stream builds on these) ----------------------------

    async def _read_event(self) -> BackendEvent:
        """The next message from the server, reading the socket as needed."""
        while True:
            event = self._parser.next_event()
            if not isinstance(event, _NeedData):
                return event
            try:
                data = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, OSError) as e:
                self._broken = f"connection to {self.address} lost: {e}"
                raise PgConnectionError(self._broken) from e
            except trio.ClosedResourceError:
                raise PgConnectionError(f"the connection to {self.address} is closed") from None
            if not data:
                self._broken = f"PostgreSQL at {self.address} closed the connection"
                raise PgConnectionError(self._broken)
            self._parser.receive_data(data)

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as e:
            self._broken = f"connection to {self.address} lost: {e}"
            raise PgConnectionError(self._broken) from e
        except trio.ClosedResourceError:
            raise PgConnectionError(f"the connection to {self.address} is closed") from None

    def _note(self, event: BackendEvent) -> bool:
        """Handles a message that may come at any time; False if `event` is not one."""
        match event:
            case ParameterStatus(name, value):
                self.parameters[name] = value
            case NoticeResponse():
                self.notices.append(event)
            case NotificationResponse():
                self._notifications.append(event)
            case _:
                return False
        return True

    async def receive_message(self) -> BackendEvent:
        """The next message that is part of the conversation (parameter changes, notices
        and notifications are taken care of). For protocol extensions like replication."""
        while True:
            event = await self._read_event()
            if not self._note(event):
                return event

    async def send_message(self, data: bytes) -> None:
        """Sends one or more frontend messages as built by this module's functions."""
        await self._send(data)

    @contextlib.contextmanager
    def exclusive(self, *, desync_on_error: bool = True) -> Iterator[None]:
        """Claims the connection for one task's exchange with the server; if the exchange
        ends with an exception (a cancellation too) and `desync_on_error`, the connection is
        marked broken, as the server's answer may be left half read."""
        if self._closed:
            raise PgConnectionError(f"the connection to {self.address} is closed")
        if self._broken is not None:
            raise PgConnectionError(f"{self._broken}; open a new connection")
        if self._busy:
            raise trio.BusyResourceError("another task is using this PostgreSQL connection")
        self._busy = True
        try:
            yield
        except BaseException as e:
            if desync_on_error and self._broken is None:
                self._broken = f"connection to {self.address} left mid-exchange ({e!r})"
            raise
        finally:
            self._busy = False

    def mark_broken(self, reason: str) -> None:
        if self._broken is None:
            self._broken = reason

    @property
    def broken(self) -> bool:
        return self._broken is not None or self._closed

    # -- queries -------------------------------------------------------------------------

    async def simple_query(self, sql: str) -> list[ResultSet]:
        """Runs `sql` (one or more statements) and returns one ResultSet per statement.
        Raises `PgError` if a statement failed; the connection stays usable."""
        with self.exclusive():
            await self._send(query_message(sql))
            results, error = await self._results()
        if error is not None:
            raise PgError(error.fields)
        return results

    async def _results(self) -> tuple[list[ResultSet], ErrorResponse | None]:
        results: list[ResultSet] = []
        error: ErrorResponse | None = None
        columns: tuple[Column, ...] = ()
        rows: list[tuple[str | None, ...]] = []
        while True:
            event = await self.receive_message()
            match event:
                case RowDescription(cols):
                    columns, rows = cols, []
                case DataRow(values):
                    rows.append(tuple(_text(v) for v in values))
                case CommandComplete(tag):
                    results.append(ResultSet(columns, tuple(rows), tag))
                    columns, rows = (), []
                case EmptyQueryResponse():
                    results.append(ResultSet((), (), ""))
                case ErrorResponse():
                    error = event
                case ReadyForQuery(status):
                    self.transaction_status = status
                    return results, error
                case CopyInResponse():
                    await self._send(copy_fail("pyrt's simple_query does not send COPY data"))
                case CopyOutResponse() | CopyData() | CopyDone():
                    pass  # COPY TO STDOUT: the rows are not kept
                case _:
                    raise PgProtocolError(f"unexpected {type(event).__name__} during a query")

    # -- LISTEN / NOTIFY ---------------------------------------------------------------------

    async def listen(self, *channels: str) -> None:
        """LISTEN on each channel, by exact name (quoted, so case matters)."""
        if channels:
            await self.simple_query("; ".join(f"LISTEN {quote_ident(c)}" for c in channels))

    async def unlisten(self, *channels: str) -> None:
        """UNLISTEN each channel; none: every channel."""
        names = [quote_ident(c) for c in channels] or ["*"]
        await self.simple_query("; ".join(f"UNLISTEN {n}" for n in names))

    async def notify(self, channel: str, payload: str = "") -> None:
        await self.simple_query(
            f"SELECT pg_notify({quote_literal(channel)}, {quote_literal(payload)})"
        )

    async def next_notification(self) -> NotificationResponse:
        """Waits for the next notification on a channel this connection listens on
        (notifications that came during a query first). Safe to cancel."""
        if self._notifications:
            return self._notifications.popleft()
        with self.exclusive(desync_on_error=False):
            while True:
                event = await self._read_event()
                if isinstance(event, NotificationResponse):
                    return event
                if self._note(event):
                    continue
                if isinstance(event, ErrorResponse):  # FATAL: the server is going away
                    self._broken = f"PostgreSQL at {self.address} ended the session"
                    raise PgError(event.fields, context=f"PostgreSQL at {self.address}")
                self._broken = f"unexpected {type(event).__name__} from {self.address}"
                raise PgProtocolError(self._broken)

    def notifications(self) -> _Notifications:
        """`async for n in conn.notifications()`: `next_notification()` forever."""
        return _Notifications(self)

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Says goodbye (Terminate) if the connection is healthy, and closes it."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None and not self._busy:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._stream.send_all(terminate())
        await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> PgConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _reason(error: OSError) -> str:
    """Why a connection failed: trio wraps the errors of each address it tried."""
    reasons = []
    cause = error.__cause__
    if isinstance(cause, BaseExceptionGroup):
        for leaf in cause.exceptions:
            if isinstance(leaf, OSError) and leaf.strerror:
                reasons.append(leaf.strerror)
    return ", ".join(dict.fromkeys(reasons)) or error.strerror or str(error)


class _Notifications:
    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Notifications:
        return self

    async def __anext__(self) -> NotificationResponse:
        return await self._conn.next_notification()


async def _start_tls(
    stream: trio.abc.Stream, context: ssl.SSLContext, host: str, what: str
) -> trio.SSLStream[trio.abc.Stream]:
    await stream.send_all(ssl_request())
    # One byte only: bytes after it would be unencrypted data injected before the handshake
    # (CVE-2021-23222); read one, and any more go to (and fail) the TLS handshake.
    answer = await stream.receive_some(1)
    if answer == b"N":
        raise PgConnectionError(f"{what} does not accept TLS (ssl = off), and TLS was required")
    if answer != b"S":
        raise PgProtocolError(f"{what} answered the TLS request with {answer!r}")
    tls = trio.SSLStream(stream, context, server_hostname=host)
    try:
        await tls.do_handshake()
    except (trio.BrokenResourceError, ssl.SSLError) as e:
        cause = e.__cause__ or e
        raise PgConnectionError(f"TLS with {what} failed: {cause}") from e
    return tls
