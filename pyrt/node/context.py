"""What plugins see of the node: a `TransportContext` per transport, a `SourceContext` per
source. They are the whole of a plugin's access to the hub: a transport never touches the hub
itself (it goes through its `Session`s), a source publishes through its context, and both
pump by themselves (the writers of connections with new frames are woken)."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..conflict import Record
from ..hub.history import Publication, Recovery, StreamPosition
from ..hub.historylog import HistoryLog
from ..hub.hub import DEFAULT, Hub, _Default
from ..hub.identity import ANONYMOUS, Action, Identity
from ..hub.limits import Admission, CommandRate, KeyFailures
from ..hub.protocol import ErrorCode
from .config import NodeConfig
from .gate import Gate
from .http import HttpRequest
from .io import send_all
from .session import Session

if TYPE_CHECKING:
    from .._core import PgChange

log = logging.getLogger("pyrt.node")


class NodeServices(Protocol):
    """What the contexts need of the node (`Node` is one): all that plugins reach, through
    them."""

    hub: Hub
    history_log: HistoryLog | None
    key_failures: KeyFailures

    @property
    def config(self) -> NodeConfig: ...

    @property
    def now(self) -> float: ...

    def address_of(self, stream: trio.abc.Stream) -> str | None: ...

    gate: Gate

    def open_session(
        self,
        *,
        transport: str,
        idle_timeout: float | _Default | None,
        pings: bool,
        identity: Identity | None = ...,
    ) -> Session: ...

    def session(self, session_id: str, token: str) -> Session: ...

    def connection_failed(
        self, plugin: str, error: BaseException, session: Session | None = None
    ) -> None: ...

    def count_write_timeout(self, transport: str, error: BaseException) -> None: ...

    def count_event_skipped(self, source: str) -> None: ...

    def count_api_messages(self, count: int) -> None: ...

    def pump(self) -> None: ...

    def corked(self) -> AbstractContextManager[None]: ...


class _Context:
    def __init__(self, node: NodeServices, name: str) -> None:
        self._node = node
        self.name = name
        """The plugin's name (its entry point, or its config table's name)."""

    @property
    def config(self) -> NodeConfig:
        """The node's configuration (read-only): limits such as `config.hub.max_frame_bytes`."""
        return self._node.config

    @property
    def now(self) -> float:
        """The node's clock (trio's), the time every hub call is made at."""
        return self._node.now

    def history(self, channel: str, since: StreamPosition | None = None) -> Recovery:
        """`channel`'s history after `since` (all of it kept, without), and its position."""
        return self._node.hub.history(channel, self._node.now, since=since)

    def history_position(self, channel: str) -> StreamPosition:
        """Where `channel`'s stream stands (its next publication's offset - 1, and epoch)."""
        return self._node.hub.history_position(channel, self._node.now)


class TransportContext(_Context):
    """What a transport's `serve` and `run` get: sessions, the write deadline, and the
    reporting of errors. One per transport."""

    def open_session(
        self,
        *,
        idle_timeout: float | _Default | None = DEFAULT,
        pings: bool = True,
        identity: Identity | None = ANONYMOUS,
    ) -> Session:
        """A new client connection to the hub (end it with `Session.end`). `idle_timeout`:
        the hub closes it after this long without a sign of life (default: the hub's); None
        when the transport watches liveness itself. `pings`: whether the hub sends `ping`
        pushes (transports with their own heartbeats say no). `identity`: who it is, from
        `authenticate` (default: anonymous, which the channel rules treat as such); None:
        nobody yet, it must send a `connect` command first."""
        return self._node.open_session(
            transport=self.name, idle_timeout=idle_timeout, pings=pings, identity=identity
        )

    async def authenticate(
        self, request: HttpRequest, *, pending_ok: bool = False
    ) -> Identity | None:
        """Who the request's token says it is: `?token=<JWT>` (EventSource and browsers'
        WebSocket cannot set headers), else `Authorization: Bearer <JWT>`. Without a
        token: `ANONYMOUS` where anonymous access is allowed, else None if `pending_ok`
        (the client will send `connect`), else HttpError 401. A bad token: HttpError 401
        with the reason (docs/auth.md)."""
        return await self._node.gate.identify(request, pending_ok=pending_ok)

    async def verify_token(self, token: str, *, audience_optional: bool = False) -> Identity:
        """The identity `token` proves, for a dialect that carries tokens its own way
        (Supabase's `access_token`); AuthError with a reason safe to show otherwise.
        `audience_optional`: a token without `aud` passes even when `[auth] audience` is set
        (Supabase's API keys are JWTs without one); a token with an `aud` is checked."""
        return await self._node.gate.verify(token, audience_optional=audience_optional)

    async def refusal(self, identity: Identity, action: Action, channel: str) -> str | None:
        """Why `identity` may not do `action` on `channel` (the channel rules, and the
        application's `authorize` hook, which wins when it answers), or None when it may:
        for requests that are no session's (a dialect's REST API)."""
        node = self._node
        verdict = await node.gate.ask_hook(identity, action, channel)
        if verdict is not None:
            return None if verdict else f"the application refuses {action.value} on '{channel}'"
        rules = node.hub.rules
        if rules is None:
            return None
        grant = rules.decide(identity, action, channel)
        return None if grant.allowed else grant.reason

    def check_origin(self, request: HttpRequest) -> None:
        """HttpError 403 for a browser's WebSocket upgrade from an origin `[auth]
        allowed_origins` does not allow (cross-site WebSocket hijacking). Call it before
        accepting an upgrade."""
        self._node.gate.check_origin(request)

    def api_key_valid(self, key: str | None) -> bool:
        """Whether `key` is one of `server.api_keys` (constant-time)."""
        keys = self._node.config.api_keys
        return key is not None and any(hmac.compare_digest(key.encode(), k.encode()) for k in keys)

    def session(self, session_id: str, token: str) -> Session:
        """The live session `session_id` if `token` is its token (`Session.token`), for
        commands that arrive over other requests; HttpError 404/401 otherwise."""
        return self._node.session(session_id, token)

    async def send_all(self, stream: trio.abc.SendStream, data: bytes) -> None:
        """Writes to a client with the node's write deadline (`[hub] write_timeout`): a
        `WriteTimeout`, which is a BrokenResourceError, once no progress is made for it."""
        await send_all(stream, data, self._node.hub.config.write_timeout)

    def connection_failed(self, error: BaseException, session: Session | None = None) -> None:
        """An exception while serving one connection (a bug): logged with its traceback,
        counted (`pyrt_connection_errors_total`), and `session`, if given, closed with 1011."""
        self._node.connection_failed(self.name, error, session)

    def count_write_timeout(self, error: BaseException) -> None:
        """Counts `error` in `pyrt_write_timeouts_total` if it is (or holds) a WriteTimeout;
        for transports that end a connection on BrokenResourceError themselves."""
        self._node.count_write_timeout(self.name, error)

    def socket_rate(self) -> SocketRate | None:
        """A command rate (`[hub] command_rate`) for a transport that carries several
        sessions on one socket and limits the socket as a whole; None when it is off."""
        rate = self._node.hub.new_command_rate(self._node.now)
        return None if rate is None else SocketRate(self._node, rate)

    # -- API keys ------------------------------------------------------------------------

    def api_key_pause(self, stream: trio.abc.Stream) -> float:
        """Seconds the client's address is still refused for wrong API keys (0: it is not)."""
        return self._node.key_failures.paused(self._node.address_of(stream), self._node.now)

    def api_key_failed(self, stream: trio.abc.Stream) -> None:
        """Counts a wrong API key against the client's address (`api_key_max_failures`)."""
        self._node.key_failures.fail(self._node.address_of(stream), self._node.now)

    # -- publishing on a client's behalf (a transport's own REST API) --------------------

    def write_refusal(self, channel: str) -> tuple[ErrorCode, str] | None:
        """Why a client may not publish to `channel` (a source owns it: READ_ONLY; it holds
        records: NOT_ALLOWED), or None."""
        hub = self._node.hub
        refusal = hub.client_write_refusal(channel)
        if refusal is not None:
            return ErrorCode.READ_ONLY, refusal
        if hub.is_records_channel(channel):
            return ErrorCode.NOT_ALLOWED, f"'{channel}' holds records"
        return None

    def take_publish_rate(self, channels: Iterable[str]) -> float:
        """Takes one publication from each channel's rate (`[hub] channel_publish_rate`); 0
        if all had room, else seconds to wait (and nothing is taken)."""
        return self._node.hub.take_publish_rate(channels, self._node.now)

    async def publish(self, channel: str, data: Any) -> Publication:
        """Publishes `data` on `channel` from the server side, counted as an API message.
        Check `write_refusal` and `take_publish_rate` first for a client's request."""
        publication = self._node.hub.publish(channel, data, self._node.now)
        self._node.count_api_messages(1)
        self._node.pump()
        return publication


class SocketRate:
    """The command rate of one socket that carries several sessions: `admit` says whether
    its next message is accepted, refused, or over the rate for so long that the socket is
    closed (refusals and closes are counted in `/metrics`)."""

    def __init__(self, node: NodeServices, rate: CommandRate) -> None:
        self._node = node
        self._rate = rate

    @property
    def per_second(self) -> float:
        """The configured rate (`[hub] command_rate`)."""
        return self._node.hub.config.command_rate

    def admit(self) -> Admission:
        """ACCEPT the message; REFUSE it (say so with `refused`, or let it through if the
        dialect must, as a heartbeat); or CLOSE the socket (counted)."""
        admission = self._rate.admit(self._node.now)
        if admission is Admission.CLOSE:
            self._node.hub.stats.rate_limit_closes += 1
        return admission

    def refused(self) -> None:
        """Counts a message refused for the rate (`pyrt_refusals_total{reason=command_rate}`)."""
        self._node.hub.stats.rate_limited += 1

    def retry_after(self) -> float:
        """Seconds until the next message would be accepted."""
        return self._rate.retry_after(self._node.now)


class SourceContext(_Context):
    """What a source's `run` gets: publishing (channels, row changes, records), corking, a
    checkpoint in durable history, and the reporting of bad events. One per source. Every
    call pumps (wakes the writers of connections with new frames) unless within `corked`,
    which pumps once at its end."""

    def __init__(self, node: NodeServices, name: str) -> None:
        super().__init__(node, name)
        self._corked = 0

    def _pump(self) -> None:
        if not self._corked:
            self._node.pump()

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Publications made within it reach each WebSocket in one write when it ends, and
        the writers are woken once (for a burst of events read at once)."""
        self._corked += 1
        try:
            with self._node.hub.corked():
                yield
        finally:
            self._corked -= 1
            self._pump()

    async def publish(self, channel: str, data: Any) -> Publication:
        """Publishes `data` (JSON-encodable) on `channel`, into its history."""
        publication = self._node.hub.publish(channel, data, self._node.now)
        self._pump()
        return publication

    async def publish_change(self, change: PgChange, *, max_bytes: int | None = None) -> None:
        """Publishes a row change (`pyrt.postgres` decodes them) on its table's channel, to
        the row subscriptions it matches. `max_bytes`: larger changes go out without their
        row values (a `too_big` marker), as Supabase does."""
        self._node.hub.publish_change(change, self._node.now, max_bytes=max_bytes)
        self._pump()

    async def publish_truncate(
        self,
        schema: str,
        table: str,
        *,
        commit_timestamp: str | None = None,
        columns: Sequence[tuple[str, str]] = (),
    ) -> None:
        """Publishes a TRUNCATE of `schema.table` to every row subscription of the table."""
        self._node.hub.publish_truncate(
            schema,
            table,
            self._node.now,
            commit_timestamp=commit_timestamp,
            columns=list(columns),
        )
        self._pump()

    async def reset_channels(self, pattern: str) -> list[str]:
        """Starts a new epoch on every channel matching `pattern` (the source lost events:
        clients resuming across it are told `recovered: false`); returns the channels."""
        channels = self._node.hub.reset_channels(pattern, self._node.now)
        self._pump()
        return channels

    # -- records ---------------------------------------------------------------------------

    def records(self, channel: str) -> list[Record]:
        """The records of a records channel (ValueError if `channel` holds none)."""
        return self._node.hub.records(channel)

    def record(self, channel: str, key: str) -> Record:
        """One record (a tombstone or never-written record has value None)."""
        return self._node.hub.record(channel, key)

    async def set_record(
        self, channel: str, key: str, value: Mapping[str, Any] | None, *, version: int | None = None
    ) -> None:
        """Sets (None: deletes) a record as the source of truth has it; `version` orders the
        source's changes (a change older than the record's is ignored)."""
        self._node.hub.apply_record_change(
            channel, key, value, self._node.now, source_version=version
        )
        self._pump()

    # -- checkpoints -----------------------------------------------------------------------

    @property
    def durable(self) -> bool:
        """Whether history is durable (`[history] dir`): then `checkpoint` is kept with it."""
        return self._node.history_log is not None

    def saved_checkpoint(self) -> Any:
        """The checkpoint last noted with `note_checkpoint` and kept in durable history (a
        JSON value), or None: where to resume upstream after a restart."""
        log_ = self._node.history_log
        return log_.position(self.name) if log_ is not None else None

    def note_checkpoint(self, checkpoint: Any) -> None:
        """Notes where the source stands upstream (a JSON value), kept with the next
        publication written to durable history; nothing without durable history."""
        log_ = self._node.history_log
        if log_ is not None:
            log_.note_position(self.name, checkpoint)

    async def flush(self) -> None:
        """Returns once what was published so far is safe (on disk, with durable history):
        then a source may acknowledge it upstream."""
        log_ = self._node.history_log
        if log_ is not None:
            await log_.sync_async()

    # -- bad events ------------------------------------------------------------------------

    def skip(self, what: str, error: BaseException) -> None:
        """An event the source cannot decode or publish: logged with the error, counted
        (`pyrt_source_events_skipped_total`), and left out; the source goes on."""
        logging.getLogger(f"pyrt.sources.{self.name}").error(
            "%s: %s; skipped", self.name, what, exc_info=error
        )
        self._node.count_event_skipped(self.name)
