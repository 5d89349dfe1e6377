"""pyrt's native protocol: commands, replies, pushes, error and close codes, and the JSON codec.

Sans-IO: frames in, commands out; values in, frame bytes out. Every message, field and code is
documented in docs/protocol.md; this module is its one implementation.

Client frames are JSON objects with a `cmd`; the server answers a command that carries an `id`
with a `reply` and sends everything else as a `push`. Frames are UTF-8 JSON sent as WebSocket
text frames; the codec returns bytes so one encoded frame can be written to many sockets.
"""

from __future__ import annotations

import enum
import functools
import hashlib
from collections.abc import Mapping
from typing import Any, TypeAlias

import attrs
import orjson

from .. import _json
from ..conflict import Mutation, Op, Outcome, Record, Result, Timestamp
from .history import Publication, StreamPosition
from .presence import PresenceDiff, PresenceMeta


class ErrorCode(enum.IntEnum):
    """Errors in replies (or `error` pushes): the command failed, the connection stays."""

    BAD_REQUEST = 400
    """A field is missing, of the wrong type or out of range."""
    UNAUTHORIZED = 401
    """A token (a `refresh`'s, a join's subscription token) was refused: the message says why
    (expired, bad signature, wrong audience...; docs/auth.md)."""
    FORBIDDEN = 403
    """Not allowed: the channel rules (or the application's `authorize` hook) refuse this
    identity the action on this channel, or the command needs the channel joined first."""
    UNKNOWN_COMMAND = 404
    """`cmd` names no command."""
    NOT_ALLOWED = 405
    """The command does not apply to this kind of channel: `mutate` on a channel without a
    record policy, `publish` on a records channel."""
    ALREADY_JOINED = 409
    """The connection already joined this channel or pattern."""
    NOT_JOINED = 410
    """The command needs the channel joined first."""
    CONFLICT = 412
    """The channel's conflict policy refused the mutation (the record changed since its
    `base`, or a resolver said no); the error carries the current `record`."""
    PAYLOAD_TOO_LARGE = 413
    """The published data, encoded, is larger than the configured limit."""
    INVALID_CHANNEL = 422
    """Not a valid channel name or pattern; the message says what and where."""
    READ_ONLY = 423
    """A source feeds the channel (the WAL source's `pg:` channels, a NOTIFY source's
    channels...): clients cannot publish to it or change its records."""
    TOO_MANY_CHANNELS = 429
    """The connection reached its channel limit."""
    RATE_LIMITED = 430
    """The connection sends commands faster than the hub's `command_rate`: this one was not
    carried out. The error's `retry_after` says in how many seconds the next one would be."""
    CHANNEL_RATE_LIMITED = 432
    """The channel takes publications faster than the hub's `channel_publish_rate` (from all
    publishers together): this one was refused. The error's `retry_after` says when the
    channel takes the next."""


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses. 4xxx are pyrt's own."""

    NORMAL = 1000
    GOING_AWAY = 1001
    """The server is shutting down: reconnect (to another node) and resume."""
    MESSAGE_TOO_BIG = 1009
    """A frame larger than the configured frame limit."""
    INTERNAL_ERROR = 1011
    """The server failed while handling this connection (a bug, logged there): reconnect
    and resume; other connections were not affected."""
    BAD_FRAME = 4000
    """Not a JSON object, or not valid UTF-8: the server cannot tell what was meant."""
    SLOW = 4008
    """The connection's outbox overflowed: reconnect and resume from your offsets."""
    IDLE_TIMEOUT = 4009
    """Nothing received for the idle timeout."""
    RATE_LIMITED = 4029
    """The connection kept sending commands far over the hub's `command_rate` after being
    refused (430): reconnect later, and send less."""
    UNAUTHORIZED = 4401
    """No valid token: the `connect` command's token was refused, or none came in time
    (`[auth] connect_timeout`), or another command came first. Get a new token, then
    reconnect."""
    REVOKED = 4403
    """The server ended the connection on purpose: its user was disconnected or its token
    revoked (the REST API, docs/auth.md). Do not reconnect with the same token."""
    TOKEN_EXPIRED = 4419
    """The token expired and no `refresh` came in time: reconnect with a new token (and
    resume from your offsets)."""


MAX_ROW_SUBSCRIPTIONS = 64
"""Most entries in one join's `changes` (a Supabase join's `postgres_changes`): each is a
filter to parse and index, so one frame must not carry tens of thousands."""

RequestId: TypeAlias = int | str | None


@attrs.frozen(slots=True)
class RowSubscription:
    """One entry of a join's `changes`: row changes of `schema`.`table` (`*`: any) of kind
    `event` (INSERT, UPDATE, DELETE or `*`) whose row passes `filter` (docs/matcher.md)."""

    event: str = "*"
    schema: str = "public"
    table: str = "*"
    filter: str | None = None

    def encode(self, sub_id: int) -> dict[str, Any]:
        """The entry as the join reply lists it, with its subscription id."""
        return {
            "event": self.event,
            "schema": self.schema,
            "table": self.table,
            "filter": self.filter,
            "id": sub_id,
        }


@attrs.frozen(slots=True)
class Join:
    id: RequestId
    channel: str
    since: StreamPosition | None = None
    presence: bool = False
    changes: tuple[RowSubscription, ...] = ()
    """Row-change subscriptions: the join receives only the row events they match."""
    token: str | None = None
    """A subscription token: a JWT the application's backend minted for this channel and
    this user (docs/auth.md)."""


@attrs.frozen(slots=True)
class Connect:
    """The first command of a WebSocket that did not bring its token in the URL."""

    id: RequestId
    token: str


@attrs.frozen(slots=True)
class Refresh:
    """A new token for the connection (same user), before the old one expires."""

    id: RequestId
    token: str


@attrs.frozen(slots=True)
class Leave:
    id: RequestId
    channel: str


@attrs.frozen(slots=True)
class Publish:
    id: RequestId
    channel: str
    data: Any
    ack: bool = False
    echo: bool = False
    """The wire's `self`: whether the publisher receives its own publication."""
    key: str | None = None
    size: int = 0
    """Size of `data` as received, in bytes of JSON (for the payload limit)."""


@attrs.frozen(slots=True)
class Track:
    id: RequestId
    channel: str
    key: str | None = None
    meta: Mapping[str, Any] = attrs.field(factory=dict)
    ref: str | None = None


@attrs.frozen(slots=True)
class Untrack:
    id: RequestId
    channel: str
    key: str | None = None
    ref: str | None = None


@attrs.frozen(slots=True)
class PresenceQuery:
    id: RequestId
    channel: str


@attrs.frozen(slots=True)
class Mutate:
    id: RequestId
    channel: str
    mutation: Mutation
    size: int = 0
    """Size of the frame as received, in bytes (for the payload limit)."""


@attrs.frozen(slots=True)
class Ping:
    id: RequestId


Command: TypeAlias = (
    Join | Leave | Publish | Mutate | Track | Untrack | PresenceQuery | Ping | Connect | Refresh
)

MAX_TOKEN_CHARS = 16 * 1024
"""Longest token a frame may carry (the verifier has its own, smaller, configured limit)."""


def _token(frame: Mapping[str, Any], rid: RequestId, *, required: bool) -> str | None:
    token: str | None = (
        _field(frame, "token", str, rid) if required else _optional(frame, "token", str, rid)
    )
    if token is not None and not 1 <= len(token) <= MAX_TOKEN_CHARS:
        text = f"'token' must be 1 to {MAX_TOKEN_CHARS} characters"
        raise ProtocolError(ErrorCode.BAD_REQUEST, text, rid)
    return token


@attrs.frozen(slots=True)
class ProtocolError(Exception):
    """A frame that does not make a valid command.

    `close` is set when the frame cannot be answered at all (not JSON, not an object): the
    connection is closed with that code. Otherwise the error goes back as a reply to `id`.
    """

    code: int
    message: str
    id: RequestId = None
    close: CloseCode | None = None


def _field(
    frame: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], rid: RequestId
) -> Any:
    value = frame.get(name)
    # bool is an int in Python; no field of this protocol takes both.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        expected = " or ".join(k.__name__ for k in _tuple(kinds))
        got = "missing" if name not in frame else type(value).__name__
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}' must be {expected}, got {got}", rid)
    return value


def _optional(
    frame: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], rid: RequestId
) -> Any:
    if frame.get(name) is None:
        return None
    return _field(frame, name, kinds, rid)


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _flag(frame: Mapping[str, Any], name: str, rid: RequestId) -> bool:
    value = _optional(frame, name, bool, rid)
    return bool(value)


def _request_id(frame: Mapping[str, Any]) -> RequestId:
    rid = frame.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, (int, str)):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'id' must be an integer or a string")
    if isinstance(rid, str) and len(rid) > 64:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'id' must be at most 64 characters")
    return rid


def _since(frame: Mapping[str, Any], rid: RequestId) -> StreamPosition | None:
    since = _optional(frame, "since", dict, rid)
    if since is None:
        return None
    offset = _field(since, "offset", int, rid)
    epoch = _field(since, "epoch", str, rid)
    if offset < 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'offset' must not be negative", rid)
    return StreamPosition(offset, epoch)


def _timestamp(frame: Mapping[str, Any], name: str, rid: RequestId) -> Timestamp | None:
    text = _optional(frame, name, str, rid)
    if text is None:
        return None
    try:
        return Timestamp.decode(text)
    except ValueError as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{name}': {e}", rid) from None


def _mutation(frame: Mapping[str, Any], rid: RequestId) -> Mutation:
    key = _field(frame, "key", str, rid)
    if not 1 <= len(key) <= 256:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'key' must be 1 to 256 characters", rid)
    try:
        op = Op(_field(frame, "op", str, rid))
    except ValueError:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'op' must be one of set, patch, delete", rid
        ) from None
    value = _optional(frame, "value", dict, rid)
    if (value is None) != (op is Op.DELETE):
        message = "'value' (an object) is required" if value is None else "delete takes no value"
        raise ProtocolError(ErrorCode.BAD_REQUEST, message, rid)
    origin = _optional(frame, "origin", str, rid)
    seq = _optional(frame, "seq", int, rid)
    if (origin is None) != (seq is None):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'origin' and 'seq' go together", rid)
    if origin is not None and not 1 <= len(origin) <= 64:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'origin' must be 1 to 64 characters", rid)
    if seq is not None and seq < 1:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'seq' must be at least 1", rid)
    return Mutation(
        key,
        op,
        value,
        base=_timestamp(frame, "base", rid),
        hlc=_timestamp(frame, "hlc", rid),
        origin=origin,
        seq=seq,
    )


TABLE_CHANNEL_PREFIX = "pg"
"""Row events of table `s.t` are published on the channel `pg:<s>:<t>` (`table_channel`)."""

_MAX_SEGMENT_BYTES = 125
"""Two segments this long and the prefix fit in a channel name (255 bytes)."""


def _channel_segment(name: str) -> str:
    """A schema or table name as one channel segment: characters a segment cannot hold
    (`:`, `*`, `>`, controls, whitespace) and `%` and `~` are percent-encoded (UTF-8, `%3A`);
    a name whose encoding is over 125 bytes becomes `~` and 32 hex digits of its BLAKE2b."""
    out: list[str] = []
    for char in name:
        if char in ":*>%~" or char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F:
            out.extend(f"%{byte:02X}" for byte in char.encode())
        else:
            out.append(char)
    segment = "".join(out)
    if len(segment.encode()) > _MAX_SEGMENT_BYTES:
        return "~" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
    return segment


def is_pattern(channel: str) -> bool:
    """Whether `channel` is a pattern (a `*` or `>` segment), not a channel name."""
    return any(segment in ("*", ">") for segment in channel.split(":"))


@functools.lru_cache(maxsize=4096)  # once per row event: a database source's hot path
def table_channel(schema: str, table: str) -> str:
    """The channel of a table's row events: `pg:<schema>:<table>`, each name encoded as
    `_channel_segment` says. `*` (any schema, any table) gives a wildcard segment, so the
    result is a pattern (`pg:public:*`); a table really named `*` is `%2A`."""
    if not schema or not table:
        raise ValueError("schema and table must not be empty")
    parts = [s if s == "*" else _channel_segment(s) for s in (schema, table)]
    return f"{TABLE_CHANNEL_PREFIX}:{parts[0]}:{parts[1]}"


def _row_subscription(item: Any, index: int, rid: RequestId) -> RowSubscription:
    where = f"changes[{index}]"
    if not isinstance(item, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{where}' must be an object", rid)
    values: dict[str, Any] = {}
    for name in ("event", "schema", "table", "filter"):
        value = item.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            got = type(value).__name__
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"'{where}.{name}' must be str, got {got}", rid
            )
        if name != "filter" and not value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{where}.{name}' must not be empty", rid)
        values[name] = value.upper() if name == "event" else value
    if values.get("event", "*") not in ("*", "INSERT", "UPDATE", "DELETE"):
        message = f"'{where}.event' must be INSERT, UPDATE, DELETE or *, not {item['event']!r}"
        raise ProtocolError(ErrorCode.BAD_REQUEST, message, rid)
    if values.get("filter") == "":
        values["filter"] = None
    return RowSubscription(**values)


def _changes(
    message: Mapping[str, Any], rid: RequestId
) -> tuple[str | None, tuple[RowSubscription, ...]]:
    """The join's `changes` and the channel they live on (None without `changes`)."""
    items = _optional(message, "changes", list, rid)
    if items is None:
        return None, ()
    if not items:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'changes' must not be empty", rid)
    if len(items) > MAX_ROW_SUBSCRIPTIONS:
        text = f"'changes' may hold at most {MAX_ROW_SUBSCRIPTIONS} entries, got {len(items)}"
        raise ProtocolError(ErrorCode.BAD_REQUEST, text, rid)
    changes = tuple(_row_subscription(item, i, rid) for i, item in enumerate(items))
    channels = {table_channel(c.schema, c.table) for c in changes}
    if len(channels) > 1:
        text = "every entry of 'changes' must name the same schema and table (one per join)"
        raise ProtocolError(ErrorCode.BAD_REQUEST, text, rid)
    (channel,) = channels
    return channel, changes


def encode_record(record: Record) -> dict[str, Any]:
    """A record as JSON: `key`, `value` (null: deleted), `version`, and the policy's stamps."""
    out: dict[str, Any] = {"key": record.key, "value": record.value}
    if record.version is not None:
        out["version"] = record.version.encode()
    if record.written is not None:
        out["written"] = record.written.encode()
    if record.fields:
        out["fields"] = {name: stamp.encode() for name, stamp in record.fields.items()}
    if record.cleared is not None:
        out["cleared"] = record.cleared.encode()
    return out


def decode_record(data: Any) -> Record:
    """The inverse of `encode_record`; ValueError when `data` is not a record."""
    if not isinstance(data, Mapping) or not isinstance(data.get("key"), str):
        raise ValueError("a record is an object with a string 'key'")
    value = data.get("value")
    if value is not None and not isinstance(value, dict):
        raise ValueError("a record's 'value' is an object or null")

    def stamp(name: str) -> Timestamp | None:
        text = data.get(name)
        return None if text is None else Timestamp.decode(text)

    fields = data.get("fields") or {}
    if not isinstance(fields, dict):
        raise ValueError("a record's 'fields' is an object")
    return Record(
        data["key"],
        value,
        version=stamp("version"),
        written=stamp("written"),
        fields={name: Timestamp.decode(text) for name, text in fields.items()},
        cleared=stamp("cleared"),
    )


def encode_mutate(channel: str, mutation: Mutation, rid: RequestId) -> dict[str, Any]:
    """The `mutate` command a client sends for `mutation` (JSON-ready)."""
    command: dict[str, Any] = {
        "cmd": "mutate",
        "id": rid,
        "channel": channel,
        "key": mutation.key,
        "op": mutation.op.value,
    }
    if mutation.value is not None:
        command["value"] = mutation.value
    for name in ("base", "hlc"):
        stamp = getattr(mutation, name)
        if stamp is not None:
            command[name] = stamp.encode()
    if mutation.origin is not None:
        command.update(origin=mutation.origin, seq=mutation.seq)
    return command


def decode_mutate_reply(frame: Mapping[str, Any]) -> Result:
    """A client's reading of the reply to its `mutate`: applied, unchanged, rejected (412,
    with the current record) or failed (any other error)."""
    ok = frame.get("ok")
    if isinstance(ok, Mapping):
        record = _maybe_record(ok.get("record"))
        applied = ok.get("applied")
        if applied is True:
            return Result(Outcome.APPLIED, record)
        if applied is False:
            return Result(Outcome.UNCHANGED, record)
        # A re-sent mutation whose first reply the hub no longer has: it was processed, with
        # what effect is unknown (the record is the current one either way).
        return Result(Outcome.UNKNOWN, record, "processed before; its outcome is forgotten")
    error = frame.get("error")
    error = error if isinstance(error, Mapping) else {}
    code, message = error.get("code"), str(error.get("message", ""))
    if code == ErrorCode.CONFLICT:
        return Result(Outcome.REJECTED, _maybe_record(error.get("record")), message, code)
    return Result(Outcome.FAILED, None, message, code if isinstance(code, int) else None)


def _maybe_record(data: Any) -> Record | None:
    try:
        return decode_record(data)
    except (ValueError, TypeError):
        return None


class JsonCodec:
    """The native protocol over JSON text frames."""

    name = "json"

    def decode(self, frame: str | bytes) -> Command:
        """One client frame to a command; raises ProtocolError."""
        try:
            message = orjson.loads(frame)
        except orjson.JSONDecodeError as e:
            if "depth limit" in str(e):  # too deep for orjson to parse: no id to answer
                raise ProtocolError(ErrorCode.BAD_REQUEST, _json.too_deep_message()) from None
            raise ProtocolError(
                CloseCode.BAD_FRAME, f"frame is not JSON: {e}", close=CloseCode.BAD_FRAME
            ) from None
        if not isinstance(message, dict):
            raise ProtocolError(
                CloseCode.BAD_FRAME, "frame must be a JSON object", close=CloseCode.BAD_FRAME
            )
        rid = _request_id(message)
        if _json.depth_exceeds(message, _json.MAX_DEPTH, frame):
            # Answered, and the connection stays: the frame was JSON, only too deep to keep.
            raise ProtocolError(ErrorCode.BAD_REQUEST, _json.too_deep_message(), rid)
        cmd = message.get("cmd")
        if cmd == "ping":
            return Ping(rid)
        if cmd == "publish":
            data = message.get("data")
            if "data" not in message:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'data' is missing", rid)
            return Publish(
                rid,
                _field(message, "channel", str, rid),
                data,
                ack=_flag(message, "ack", rid),
                echo=_flag(message, "self", rid),
                key=_optional(message, "key", str, rid),
                size=len(frame),  # an upper bound on the data's size, without re-encoding it
            )
        if cmd == "mutate":
            return Mutate(
                rid, _field(message, "channel", str, rid), _mutation(message, rid), len(frame)
            )
        if cmd == "join":
            table, changes = _changes(message, rid)
            if table is None or message.get("channel") is not None:
                channel = _field(message, "channel", str, rid)
                if table is not None and channel != table:
                    text = f"'channel' must be '{table}' for these changes (or left out)"
                    raise ProtocolError(ErrorCode.BAD_REQUEST, text, rid)
            return Join(
                rid,
                table if table is not None else channel,
                since=_since(message, rid),
                presence=_flag(message, "presence", rid),
                changes=changes,
                token=_token(message, rid, required=False),
            )
        if cmd == "leave":
            return Leave(rid, _field(message, "channel", str, rid))
        if cmd == "track":
            meta = _optional(message, "meta", dict, rid)
            return Track(
                rid,
                _field(message, "channel", str, rid),
                key=_optional(message, "key", str, rid),
                meta={} if meta is None else meta,
                ref=_optional(message, "ref", str, rid),
            )
        if cmd == "untrack":
            return Untrack(
                rid,
                _field(message, "channel", str, rid),
                key=_optional(message, "key", str, rid),
                ref=_optional(message, "ref", str, rid),
            )
        if cmd == "presence":
            return PresenceQuery(rid, _field(message, "channel", str, rid))
        if cmd == "connect":
            return Connect(rid, _token(message, rid, required=True) or "")
        if cmd == "refresh":
            return Refresh(rid, _token(message, rid, required=True) or "")
        if not isinstance(cmd, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'cmd' must be a string", rid)
        raise ProtocolError(ErrorCode.UNKNOWN_COMMAND, f"unknown command '{cmd[:64]}'", rid)

    # -- server to client ------------------------------------------------------------------

    def reply(self, rid: RequestId, result: Mapping[str, Any]) -> bytes:
        return orjson.dumps({"reply": rid, "ok": result}, default=_mapping)

    def error(
        self, rid: RequestId, code: int, message: str, details: Mapping[str, Any] | None = None
    ) -> bytes:
        """An error reply, or an `error` push when the command had no id. `details` are extra
        fields of the error (a conflict's current `record`)."""
        body = {"code": int(code), "message": message, **(details or {})}
        if rid is None:
            return orjson.dumps({"push": "error", **body})
        return orjson.dumps({"reply": rid, "error": body})

    def publication(self, publication: Publication) -> bytes:
        push: dict[str, Any] = {
            "push": "pub",
            "channel": publication.channel,
            "offset": publication.offset,
            "epoch": publication.epoch,
        }
        if publication.hlc is not None:
            push["hlc"] = publication.hlc.encode()
        push["data"] = publication.data
        if publication.publisher is not None:
            push["from"] = publication.publisher
        return orjson.dumps(push)

    def change(self, publication: Publication, ids: list[int]) -> bytes:
        """A row event (a `pub` push whose `data` is the encoded change) with the ids of
        the row subscriptions it matched."""
        push: dict[str, Any] = {
            "push": "pub",
            "channel": publication.channel,
            "offset": publication.offset,
            "epoch": publication.epoch,
        }
        if publication.hlc is not None:
            push["hlc"] = publication.hlc.encode()
        push["ids"] = ids
        push["data"] = publication.data
        return orjson.dumps(push)

    def reset(self, channel: str, position: StreamPosition) -> bytes:
        """The channel's history was lost while the client was joined (a source's gap):
        what came before `position` cannot be recovered."""
        return orjson.dumps(
            {
                "push": "reset",
                "channel": channel,
                "offset": position.offset,
                "epoch": position.epoch,
                "recovered": False,
            }
        )

    def presence_state(self, channel: str, state: Mapping[str, tuple[PresenceMeta, ...]]) -> bytes:
        return orjson.dumps(
            {"push": "presence_state", "channel": channel, "state": _presence_map(state)},
            default=_mapping,
        )

    def presence_reply(
        self, rid: RequestId, channel: str, state: Mapping[str, tuple[PresenceMeta, ...]]
    ) -> bytes:
        return self.reply(rid, {"channel": channel, "state": _presence_map(state)})

    def presence_diff(self, channel: str, diff: PresenceDiff) -> bytes:
        return orjson.dumps(
            {
                "push": "presence_diff",
                "channel": channel,
                "joins": _presence_map(diff.joins),
                "leaves": _presence_map(diff.leaves),
            },
            default=_mapping,
        )

    def ping(self) -> bytes:
        return b'{"push":"ping"}'

    def disconnect(self, code: CloseCode, reason: str) -> bytes:
        return orjson.dumps({"push": "disconnect", "code": int(code), "reason": reason})

    def refresh(self, expires_in: float) -> bytes:
        """The connection's token expires in `expires_in` seconds: send a `refresh` command
        with a new one before then, or the connection closes (4419)."""
        return orjson.dumps({"push": "refresh", "expires_in": expires_in})

    def unsubscribe(self, channel: str, reason: str) -> bytes:
        """The server ended the connection's join of `channel` (the REST API removed its
        user from it): nothing more of it arrives; do not join again on your own."""
        return orjson.dumps({"push": "unsubscribe", "channel": channel, "reason": reason})


def _presence_map(state: Mapping[str, tuple[PresenceMeta, ...]]) -> dict[str, list[Any]]:
    def entry(m: PresenceMeta) -> dict[str, Any]:
        out = {"ref": m.ref, "client": m.conn, "meta": m.meta}
        if m.prev_ref is not None:
            out["prev_ref"] = m.prev_ref
        return out

    return {key: [entry(m) for m in metas] for key, metas in state.items()}


def _mapping(value: Any) -> Any:
    """orjson's fallback: presence metas are read-only mappings (MappingProxyType)."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
