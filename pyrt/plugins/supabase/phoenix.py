"""Supabase Realtime's wire protocol: Phoenix channel frames (vsn 1.0.0 and 2.0.0), join
configs, and the per-channel codec through which the hub writes to Supabase clients.

Sans-IO, like pyrt.hub.protocol: frames in, values out; values in, frame bytes out. The transport
(pyrt.plugins.supabase) maps each Phoenix channel of a socket to one hub connection whose codec
is a `ChannelCodec`; docs/supabase.md describes the mapping and every error.

- vsn 1.0.0: JSON objects `{topic, event, payload, ref, join_ref?}` both ways.
- vsn 2.0.0: JSON arrays `[join_ref, ref, topic, event, payload]`, plus binary user
  broadcasts: kind 3 from clients (`[3, join_ref_len, ref_len, topic_len, event_len,
  meta_len, encoding]`, the strings, the payload), kind 4 to clients (`[4, topic_len,
  event_len, meta_len, encoding]`, the strings, the payload). All lengths are one byte.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from typing import Any, TypeAlias

import attrs
import orjson

from ...plugin import (
    JSON_MAX_DEPTH,
    MAX_ROW_SUBSCRIPTIONS,
    TABLE_CHANNEL_PREFIX,
    CloseCode,
    FilterError,
    JsonCodec,
    Matcher,
    PresenceDiff,
    PresenceMeta,
    Publication,
    RequestId,
    RowSubscription,
    StreamPosition,
    json_depth_exceeds,
    json_too_deep_message,
    table_channel,
)

VSN_1 = "1.0.0"
VSN_2 = "2.0.0"
VERSIONS = (VSN_1, VSN_2)
TOPIC_PREFIX = "realtime:"
PHOENIX_TOPIC = "phoenix"
"""The socket's own topic: heartbeats."""

USER_BROADCAST_PUSH = 3
USER_BROADCAST = 4
BINARY_ENCODING = 0
JSON_ENCODING = 1

Ref: TypeAlias = str | int | None
"""A message ref as the client sent it (strings from the official clients), echoed as is."""


@attrs.frozen(slots=True)
class Message:
    """One Phoenix message, either way."""

    topic: str
    event: str
    payload: Any
    ref: Ref = None
    join_ref: Ref = None


class BadFrame(Exception):
    """A frame that is no Phoenix message: the socket closes with `code` and the message."""

    def __init__(self, message: str, code: CloseCode = CloseCode.BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TooDeep(Exception):
    """A message whose JSON nests deeper than `pyrt.JSON_MAX_DEPTH`: refused with a reply
    to `message` (its payload left out), and the socket stays."""

    def __init__(self, message: Message) -> None:
        super().__init__(json_too_deep_message())
        self.message = message
        self.reason = f"InvalidMessage: {json_too_deep_message()}"


class JoinError(Exception):
    """A `phx_join` refused: the reply's `reason` is `"<code>: <message>"`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.reason = f"{code}: {message}"


# -- frames --------------------------------------------------------------------------------


def _ref(value: Any, name: str) -> Ref:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BadFrame(f"'{name}' must be a string or null")


def decode(frame: bytes, vsn: str, *, binary: bool = False) -> Message:
    """One client frame (text, or binary for vsn 2.0.0) to a message; raises BadFrame."""
    if binary:
        if vsn != VSN_2:
            raise BadFrame("binary frames need vsn 2.0.0")
        return _decode_user_broadcast_push(frame)
    try:
        value = orjson.loads(frame)
    except orjson.JSONDecodeError as e:
        raise BadFrame(f"frame is not JSON: {e}") from None
    if vsn == VSN_2:
        if not isinstance(value, list) or len(value) != 5:
            raise BadFrame("frame must be a JSON array [join_ref, ref, topic, event, payload]")
        join_ref, ref, topic, event, payload = value
    else:
        if not isinstance(value, dict):
            raise BadFrame("frame must be a JSON object {topic, event, payload, ref}")
        topic, event, payload = value.get("topic"), value.get("event"), value.get("payload")
        ref, join_ref = value.get("ref"), value.get("join_ref")
    if not isinstance(topic, str) or not isinstance(event, str):
        raise BadFrame("'topic' and 'event' must be strings")
    if payload is None:
        payload = {}
    message = Message(topic, event, payload, _ref(ref, "ref"), _ref(join_ref, "join_ref"))
    if json_depth_exceeds(value, JSON_MAX_DEPTH, frame):
        raise TooDeep(attrs.evolve(message, payload={}))
    return message


def _decode_user_broadcast_push(frame: bytes) -> Message:
    if len(frame) < 7 or frame[0] != USER_BROADCAST_PUSH:
        kind = frame[0] if frame else None
        raise BadFrame(f"binary frame of unknown kind {kind} (only kind 3 is read)")
    sizes = frame[1:6]
    encoding = frame[6]
    offset = 7
    parts: list[str] = []
    for size in sizes:
        chunk = frame[offset : offset + size]
        if len(chunk) != size:
            raise BadFrame("binary frame shorter than its header says")
        try:
            parts.append(chunk.decode())
        except UnicodeDecodeError:
            raise BadFrame("binary frame header strings must be UTF-8") from None
        offset += size
    join_ref, ref, topic, event, meta_text = parts
    body = frame[offset:]
    payload: dict[str, Any] = {"type": "broadcast", "event": event}
    deep = TooDeep(Message(topic, "broadcast", {}, ref or None, join_ref or None))
    if encoding == JSON_ENCODING:
        try:
            payload["payload"] = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError as e:
            if "depth limit" in str(e):
                raise deep from None
            raise BadFrame(f"binary broadcast payload is not JSON: {e}") from None
    elif encoding == BINARY_ENCODING:
        payload["payload"] = bytes(body)
    else:
        raise BadFrame(f"binary broadcast encoding {encoding} is neither 0 nor 1")
    if meta_text:
        try:
            payload["meta"] = orjson.loads(meta_text)
        except orjson.JSONDecodeError as e:
            if "depth limit" in str(e):
                raise deep from None
            raise BadFrame("binary broadcast metadata is not JSON") from None
    if json_depth_exceeds(payload, JSON_MAX_DEPTH):
        raise deep
    return Message(topic, "broadcast", payload, ref or None, join_ref or None)


def encode(message: Message, vsn: str) -> bytes:
    """One server message as the client's version frames it (text)."""
    if vsn == VSN_2:
        value: Any = [message.join_ref, message.ref, message.topic, message.event, message.payload]
    else:
        value = {
            "topic": message.topic,
            "event": message.event,
            "payload": message.payload,
            "ref": message.ref,
        }
    return orjson.dumps(value, default=_json_default)


def encode_user_broadcast(topic: str, event: str, payload: Any, meta: Any = None) -> bytes | None:
    """A kind 4 binary frame, or None when a string does not fit its one-byte length."""
    parts = [topic.encode(), event.encode(), b"" if meta is None else orjson.dumps(meta)]
    if any(len(p) > 255 for p in parts):
        return None
    body = orjson.dumps(payload, default=_json_default)
    header = bytes((USER_BROADCAST, len(parts[0]), len(parts[1]), len(parts[2]), JSON_ENCODING))
    return header + b"".join(parts) + body


def is_binary(frame: bytes) -> bool:
    """Whether a frame the codec made goes out as a binary WebSocket frame (kind 4); text
    frames begin with `{` or `[`."""
    return bool(frame) and frame[0] == USER_BROADCAST


def _json_default(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


# -- topics and channels -------------------------------------------------------------------

_MAX_CHANNEL_BYTES = 255


def topic_channel(topic: str) -> str:
    """The hub channel of a Supabase topic `realtime:<name>`: `<name>` itself when it is a
    valid channel name, so native clients and the REST API share it. Characters a channel
    cannot hold (`*`, `>`, whitespace, controls) and `%` and `~` are percent-encoded within
    each `:`-separated segment, an empty segment becomes `%`, a first segment `pg` (the
    table channels' prefix) becomes `%70g`, and a name still over 255 bytes becomes `~` and
    32 hex digits of its BLAKE2b."""
    name = topic.removeprefix(TOPIC_PREFIX)
    segments = []
    for index, segment in enumerate(name.split(":")):
        out: list[str] = []
        for char in segment:
            if char in "*>%~" or char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F:
                out.extend(f"%{byte:02X}" for byte in char.encode())
            else:
                out.append(char)
        encoded = "".join(out) or "%"
        if index == 0 and encoded == TABLE_CHANNEL_PREFIX:
            encoded = "%70g"
        segments.append(encoded)
    channel = ":".join(segments)
    if len(channel.encode()) > _MAX_CHANNEL_BYTES:
        return "~" + hashlib.blake2b(name.encode(), digest_size=16).hexdigest()
    return channel


# -- joining -------------------------------------------------------------------------------


def _boolean(value: Any, where: str, default: bool = False) -> bool:
    """A flag; the clients may send booleans as the strings "true" and "false"."""
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise JoinError("InvalidJoinPayload", f"'{where}' must be a boolean")


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise JoinError("InvalidJoinPayload", f"'{where}' must be an object")
    return value


@attrs.frozen(slots=True)
class ChangeBinding:
    """One entry of `config.postgres_changes`: `raw` as the client sent it (the join reply
    echoes it), `subscription` as the hub matches it."""

    raw: Mapping[str, Any]
    subscription: RowSubscription

    @property
    def channel(self) -> str:
        return table_channel(self.subscription.schema, self.subscription.table)


@attrs.frozen(slots=True)
class JoinRequest:
    """A `phx_join` payload, checked."""

    ack: bool = False
    echo: bool = False
    """`config.broadcast.self`: the sender receives its own broadcasts."""
    presence_key: str = ""
    presence_enabled: bool = False
    private: bool = False
    changes: tuple[ChangeBinding, ...] = ()
    access_token: str | None = None
    extras: bool = False
    """`config.pyrt` was given: the client wants pyrt's offsets (docs/supabase.md)."""
    since: StreamPosition | None = None
    """`config.pyrt.since`: resume the channel's broadcasts after this position."""

    def groups(self) -> dict[str, list[int]]:
        """Hub channel -> indexes of the bindings on it, in order of first appearance (the
        hub joins one table channel per group)."""
        out: dict[str, list[int]] = {}
        for index, binding in enumerate(self.changes):
            out.setdefault(binding.channel, []).append(index)
        return out


def parse_join(payload: Any) -> JoinRequest:
    """Checks a `phx_join` payload; raises JoinError. Unknown keys are ignored."""
    payload = _object(payload, "payload")
    config = _object(payload.get("config"), "config")
    broadcast = _object(config.get("broadcast"), "config.broadcast")
    presence = _object(config.get("presence"), "config.presence")
    key = presence.get("key", "")
    if key is None:
        key = ""
    if not isinstance(key, str):
        raise JoinError("InvalidJoinPayload", "'config.presence.key' must be a string")
    token = payload.get("access_token")
    if token is not None and not isinstance(token, str):
        raise JoinError("InvalidJoinPayload", "'access_token' must be a string")
    items = config.get("postgres_changes")
    if items is None:
        items = []
    if not isinstance(items, list):
        raise JoinError("InvalidJoinPayload", "'config.postgres_changes' must be a list")
    if len(items) > MAX_ROW_SUBSCRIPTIONS:
        limit = MAX_ROW_SUBSCRIPTIONS
        text = f"'config.postgres_changes' may hold at most {limit} entries, got {len(items)}"
        raise JoinError("InvalidJoinPayload", text)
    changes = tuple(_binding(item, i) for i, item in enumerate(items))
    extras = config.get("pyrt")
    since = None
    if extras is not None:
        extras = _object(extras, "config.pyrt")
        since = _since(extras.get("since"))
    return JoinRequest(
        ack=_boolean(broadcast.get("ack"), "config.broadcast.ack"),
        echo=_boolean(broadcast.get("self"), "config.broadcast.self"),
        presence_key=key,
        presence_enabled=_boolean(presence.get("enabled"), "config.presence.enabled"),
        private=_boolean(config.get("private"), "config.private"),
        changes=changes,
        access_token=token,
        extras=extras is not None,
        since=since,
    )


def _since(value: Any) -> StreamPosition | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or not isinstance(value.get("offset"), int)
        or isinstance(value.get("offset"), bool)
        or value["offset"] < 0
        or not isinstance(value.get("epoch"), str)
    ):
        message = "'config.pyrt.since' must be {offset: integer >= 0, epoch: string}"
        raise JoinError("InvalidJoinPayload", message)
    return StreamPosition(value["offset"], value["epoch"])


_EVENTS = ("*", "INSERT", "UPDATE", "DELETE")


def _binding(item: Any, index: int) -> ChangeBinding:
    where = f"config.postgres_changes[{index}]"
    if not isinstance(item, dict):
        raise JoinError("InvalidJoinPayload", f"'{where}' must be an object")
    fields: dict[str, str] = {}
    for name in ("event", "schema", "table", "filter"):
        value = item.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise JoinError("InvalidJoinPayload", f"'{where}.{name}' must be a string")
        fields[name] = value
    event = fields.get("event", "").upper()
    if event not in _EVENTS:
        message = f"'{where}.event' must be INSERT, UPDATE, DELETE or *"
        raise JoinError("InvalidJoinPayload", message)
    subscription = RowSubscription(
        event=event,
        schema=fields.get("schema", "public"),
        table=fields.get("table", "*"),
        filter=fields.get("filter"),
    )
    try:
        Matcher().add_rows(0, event, subscription.schema, subscription.table, subscription.filter)
    except FilterError as e:
        raise JoinError("InvalidFilter", f"{where}.filter: {e}") from None
    return ChangeBinding(raw=item, subscription=subscription)


def new_presence_key() -> str:
    """The key of a presence whose join named none (Supabase picks a UUID too)."""
    return str(uuid.uuid4())


# -- the hub's codec for one Phoenix channel -----------------------------------------------


def broadcast_parts(data: Any) -> tuple[str, Any]:
    """A publication's data as a Supabase broadcast's (event, payload): data shaped
    `{"event": str, "payload": ...}` (what Supabase clients and `POST /api/broadcast` publish)
    as is; anything else (native clients, `POST /api/publish`) as event `message` with the
    data as payload, wrapped as `{"value": data}` when not an object."""
    if isinstance(data, Mapping) and isinstance(data.get("event"), str) and "payload" in data:
        return data["event"], data["payload"]
    return "message", data if isinstance(data, Mapping) else {"value": data}


class ChannelCodec(JsonCodec):
    """What the hub writes to one Phoenix channel (one hub connection), framed for the
    client's version. Frames name the topic, so `name` includes it: the hub encodes a
    publication once per topic and version and shares the bytes among those recipients.

    Replies answer the client's refs (the transport passes them as request ids). Frames with
    nothing for a Supabase client (pings, a TRUNCATE) are empty: the transport skips them."""

    def __init__(self, topic: str, join_ref: Ref, vsn: str, *, extras: bool = False) -> None:
        self.topic = topic
        self.join_ref = join_ref
        self.vsn = vsn
        self.extras = extras
        self.name = f"supabase/{vsn}/{int(extras)}/{topic}"

    def message(self, event: str, payload: Any, ref: Ref = None, *, reply: bool = False) -> bytes:
        """A frame on this channel's topic. Replies carry the join's ref (vsn 2.0.0)."""
        join_ref = self.join_ref if reply or event in ("phx_close", "phx_error") else None
        return encode(Message(self.topic, event, payload, ref, join_ref), self.vsn)

    def ok(self, ref: Ref, response: Mapping[str, Any] | None = None) -> bytes:
        return self.message(
            "phx_reply", {"status": "ok", "response": response or {}}, ref, reply=True
        )

    def refusal(self, ref: Ref, reason: str) -> bytes:
        payload = {"status": "error", "response": {"reason": reason}}
        return self.message("phx_reply", payload, ref, reply=True)

    def system(self, status: str, message: str, extension: str = "system") -> bytes:
        payload = {
            "extension": extension,
            "status": status,
            "message": message,
            "channel": self.channel_name,
        }
        return self.message("system", payload)

    @property
    def channel_name(self) -> str:
        return self.topic.removeprefix(TOPIC_PREFIX)

    # -- JsonCodec's interface, as the hub calls it --------------------------------------

    def reply(self, rid: RequestId, result: Mapping[str, Any]) -> bytes:
        return self.ok(rid, result if self.extras else None)

    def error(
        self, rid: RequestId, code: int, message: str, details: Mapping[str, Any] | None = None
    ) -> bytes:
        return self.refusal(rid, f"{_ERROR_NAMES.get(int(code), 'Error')}: {message}")

    def publication(self, publication: Publication) -> bytes:
        event, payload = broadcast_parts(publication.data)
        meta = None
        if self.extras:
            meta = {"offset": publication.offset, "epoch": publication.epoch}
        if self.vsn == VSN_2:
            frame = encode_user_broadcast(self.topic, event, payload, meta)
            if frame is not None:
                return frame
        body: dict[str, Any] = {"type": "broadcast", "event": event, "payload": payload}
        if meta is not None:
            body["meta"] = meta
        return self.message("broadcast", body)

    def change(self, publication: Publication, ids: list[int]) -> bytes:
        if isinstance(publication.change, tuple):
            return b""  # a TRUNCATE: Supabase sends none, and its clients cannot parse one
        return self.message("postgres_changes", {"ids": ids, "data": publication.data})

    def reset(self, channel: str, position: StreamPosition) -> bytes:
        if not self.extras:
            return b""
        message = f"history of {channel} was lost; resume from offset {position.offset}"
        payload = {
            "extension": "pyrt",
            "status": "ok",
            "message": message,
            "channel": self.channel_name,
            "recovered": False,
            "offset": position.offset,
            "epoch": position.epoch,
        }
        return self.message("system", payload)

    def presence_state(self, channel: str, state: Mapping[str, tuple[PresenceMeta, ...]]) -> bytes:
        return self.message("presence_state", _presences(state))

    def presence_reply(
        self, rid: RequestId, channel: str, state: Mapping[str, tuple[PresenceMeta, ...]]
    ) -> bytes:
        return self.ok(rid, {"state": _presences(state)})

    def presence_diff(self, channel: str, diff: PresenceDiff) -> bytes:
        payload = {"joins": _presences(diff.joins), "leaves": _presences(diff.leaves)}
        return self.message("presence_diff", payload)

    def ping(self) -> bytes:
        return b""

    def disconnect(self, code: CloseCode, reason: str) -> bytes:
        return b""  # the socket's close frame says it

    def refresh(self, expires_in: float) -> bytes:
        # Supabase asks for no new token: its clients send `access_token` when their auth
        # session refreshes. At expiry the channel gets a `system` error (the transport).
        return b""

    def unsubscribe(self, channel: str, reason: str) -> bytes:
        # The join of `channel` ended (the server removed the user, or a new access_token
        # may not keep it): a `system` error, which the clients show as CHANNEL_ERROR and
        # answer by joining again (under the rules as they now stand).
        return self.system("error", f"Unauthorized: no longer subscribed to {channel}: {reason}")


_ERROR_NAMES = {
    400: "InvalidMessage",
    401: "InvalidJWTToken",
    403: "Forbidden",
    404: "UnknownEvent",
    405: "NotAllowed",
    409: "AlreadyJoined",
    410: "NotJoined",
    412: "Conflict",
    413: "PayloadTooLarge",
    422: "InvalidChannel",
    423: "ReadOnlyChannel",
    429: "TooManyChannels",
    430: "MessagePerSecondRateLimitReached",
    432: "MessagePerSecondRateLimitReached",
}
"""The hub's error codes as the `reason` prefixes Supabase clients see."""


def _presences(state: Mapping[str, tuple[PresenceMeta, ...]]) -> dict[str, Any]:
    def meta(m: PresenceMeta) -> dict[str, Any]:
        out = dict(m.meta)  # the tracked fields, then the refs (which win over fields so named)
        out["phx_ref"] = m.ref
        if m.prev_ref is not None:
            out["phx_ref_prev"] = m.prev_ref
        return out

    return {key: {"metas": [meta(m) for m in metas]} for key, metas in state.items()}
