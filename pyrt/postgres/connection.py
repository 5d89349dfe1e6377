"""`PgConnection`: one PostgreSQL connection over a trio stream. The protocol is the sans-IO
`Frontend` (`pyrt.postgres.protocol`); this module only connects (TCP, optional TLS), moves
bytes between the socket and the frontend, and keeps one task at a time on the connection.
"""

from __future__ import annotations

import collections
import contextlib
import ssl
from collections.abc import Iterator, Mapping

import trio

from .errors import PgConnectionError, PgError, PgProtocolError
from .protocol import (
    NEED_DATA,
    BackendEvent,
    Column,
    CommandComplete,
    CopyData,
    CopyDone,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    EmptyQueryResponse,
    ErrorResponse,
    Frontend,
    NoticeResponse,
    NotificationResponse,
    ParameterStatus,
    ReadyForQuery,
    ResultSet,
    RowDescription,
    State,
    TransactionStatus,
    quote_ident,
    quote_literal,
    ssl_request,
)

__all__ = ["PgConnection"]


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
        frontend: Frontend,
        *,
        address: str,
        database: str,
        replication: bool,
    ) -> None:
        self._stream = stream
        self.frontend = frontend
        """The protocol's state machine (sans-IO): state, parameters, notices, ..."""
        self.address = address
        """`host:port` of the server."""
        self.user = frontend.user
        self.database = database
        self.replication = replication
        self._notifications: collections.deque[NotificationResponse] = collections.deque()
        self._busy = False
        self._broken: str | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<PgConnection {self.user}@{self.address}/{self.database}>"

    @property
    def tls(self) -> bool:
        return isinstance(self._stream, trio.SSLStream)

    @property
    def parameters(self) -> dict[str, str]:
        """What the server reported with ParameterStatus (server_version, TimeZone, ...)."""
        return self.frontend.parameters

    @property
    def backend_pid(self) -> int | None:
        return self.frontend.backend_pid

    @property
    def transaction_status(self) -> TransactionStatus:
        return self.frontend.transaction_status

    @property
    def notices(self) -> collections.deque[NoticeResponse]:
        """The latest notices (warnings) the server sent."""
        return self.frontend.notices

    @property
    def auth_method(self) -> str | None:
        """What the server asked for: cleartext, md5 or SCRAM-SHA-256 (None: trust)."""
        return self.frontend.auth_method

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
                frontend = Frontend(user, password, params)
                conn = cls(
                    stream, frontend, address=address, database=database, replication=replication
                )
                await conn._startup(context)
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            return conn
        raise PgConnectionError(f"timed out after {timeout:g} s connecting to {context}")

    async def _startup(self, context: str) -> None:
        frontend = self.frontend
        try:
            await self._stream.send_all(frontend.start())
            while frontend.state is State.STARTUP:
                event = await self._read_event()
                if isinstance(event, ErrorResponse):
                    raise PgError(event.fields, context=context)
                if reply := frontend.data_to_send():
                    await self._stream.send_all(reply)
                if isinstance(event, NotificationResponse):
                    self._notifications.append(event)
        except PgProtocolError as e:
            raise PgProtocolError(f"{context} does not speak PostgreSQL's protocol: {e}") from e
        except PgConnectionError as e:
            if context not in str(e):
                raise type(e)(f"{e} ({context})") from e
            raise

    # -- low level (the replication stream builds on these) ----------------------------

    async def _read_event(self) -> BackendEvent:
        """The next message from the server, reading the socket as needed."""
        frontend = self.frontend
        while True:
            try:
                event = frontend.next_event()
            except PgProtocolError as e:
                self._broken = f"PostgreSQL at {self.address} broke the protocol: {e}"
                raise
            if event is not NEED_DATA:
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
            frontend.receive_data(data)

    async def _send(self, data: bytes) -> None:
        try:
            await self._stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as e:
            self._broken = f"connection to {self.address} lost: {e}"
            raise PgConnectionError(self._broken) from e
        except trio.ClosedResourceError:
            raise PgConnectionError(f"the connection to {self.address} is closed") from None

    async def receive_message(self) -> BackendEvent:
        """The next message that is part of the conversation (parameter changes, notices
        and notifications are taken care of). For protocol extensions like replication."""
        while True:
            event = await self._read_event()
            if isinstance(event, NotificationResponse):
                self._notifications.append(event)
            elif not isinstance(event, (ParameterStatus, NoticeResponse)):
                return event

    async def send_query(self, sql: str) -> None:
        """Sends a Query without waiting for its answer (`receive_message` reads it)."""
        await self._send(self.frontend.query(sql))

    async def send_copy_data(self, data: bytes) -> None:
        await self._send(self.frontend.copy_data(data))

    async def send_copy_done(self) -> None:
        await self._send(self.frontend.copy_done())

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
            await self.send_query(sql)
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
                case ReadyForQuery():
                    return results, error
                case CopyInResponse():
                    refusal = self.frontend.copy_fail("pyrt's simple_query does not send COPY data")
                    await self._send(refusal)
                case CopyOutResponse() | CopyData() | CopyDone():
                    pass  # COPY TO STDOUT: the rows are not kept
                case _:
                    # The frontend lets only the above through while a query runs.
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
                # While idle the frontend lets only these through (anything else is a
                # PgProtocolError, and the connection is broken).
                event = await self._read_event()
                if isinstance(event, NotificationResponse):
                    return event
                if isinstance(event, ErrorResponse):  # FATAL: the server is going away
                    self._broken = f"PostgreSQL at {self.address} ended the session"
                    raise PgError(event.fields, context=f"PostgreSQL at {self.address}")

    def notifications(self) -> _Notifications:
        """`async for n in conn.notifications()`: `next_notification()` forever."""
        return _Notifications(self)

    # -- closing -------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Says goodbye (Terminate) if the connection is healthy, and closes it."""
        if self._closed:
            return
        self._closed = True
        if self._broken is None and not self._busy and self.frontend.state is not State.CLOSED:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._stream.send_all(self.frontend.terminate())
        await trio.aclose_forcefully(self._stream)

    async def __aenter__(self) -> PgConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", errors="replace")


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
