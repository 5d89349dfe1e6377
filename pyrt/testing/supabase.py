"""The Supabase dialect of the transport kit: `SupabaseKitClient` (see `pyrt.testing`)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import orjson

from ._checks import _check
from .transports import Capability

# -- the Supabase dialect of the transport kit ----------------------------------------------

SUPABASE_CAPABILITIES = frozenset[Capability]()
"""What Supabase Realtime's protocol can say of `Capability`: none of it. Broadcasts do not
name their sender; any topic is a channel (pyrt percent-encodes what a name cannot hold);
every Phoenix message has a topic, so no command goes without a channel; and a shutdown is
told by the close frame alone."""

_TOPIC_PREFIX = "realtime:"
_PHOENIX_TOPIC = "phoenix"
_KIT_EVENT = "kit"
"""The broadcast event the dialect publishes under."""
_NATIVE_COMMANDS = ("ping", "publish", "mutate", "join", "leave", "track", "untrack", "presence")
_REASON_CODES = {
    "InvalidMessage": 400,
    "InvalidJoinPayload": 400,
    "InvalidFilter": 400,
    "InvalidJWTToken": 401,
    "Forbidden": 403,
    "Unauthorized": 403,
    "UnknownEvent": 404,
    "NotAllowed": 405,
    "AlreadyJoined": 409,
    "NotJoined": 410,
    "Conflict": 412,
    "PayloadTooLarge": 413,
    "InvalidChannel": 422,
    "ReadOnlyChannel": 423,
    "TooManyChannels": 429,
    "ClientJoinRateLimitReached": 430,
    "MessagePerSecondRateLimitReached": 430,
}
"""A refusal's reason prefix (docs/supabase.md, "Errors") as the native error code."""


class PhoenixSocket(Protocol):
    """A WebSocket to the Supabase transport, as `SupabaseKitClient` uses it: any client
    library fits behind these two calls."""

    async def send(self, frame: str) -> None:
        """Sends one text frame."""
        ...

    async def receive(self) -> str | bytes:
        """The next frame (bytes: a binary one); raises `Closed` once the server closed."""
        ...


@attrs.frozen
class _Sent:
    """What a ref's reply answers, in native terms."""

    rid: Any
    has_id: bool
    """Whether the native command had an `id` (an error without one is a push)."""
    answers_ok: bool = True
    """Whether a success is answered natively (a publish is only when it asked for an ack;
    the dialect joins every channel with `ack`, so the other successes are dropped)."""
    join: str | None = None
    """The channel, for a join's reply."""
    quiet: bool = False
    """A join the dialect made itself (to change the presence key): no native reply."""


@attrs.define
class _Topic:
    """A channel the dialect joined: what a rejoin repeats."""

    join_ref: str
    presence: bool = False
    presence_key: str | None = None


class _NoTranslation(AssertionError):
    """A native command Supabase's protocol has no words for (a test, not a transport, is
    at fault: declare the capability instead)."""


class SupabaseKitClient:
    """The conformance kit's client for the Supabase transport: a `TransportClient` that
    speaks Phoenix (vsn 1.0.0 or 2.0.0) over a `PhoenixSocket`, translating each native
    command into the message a Supabase client would send and each frame back:

    - `join` is `phx_join` on `realtime:<channel>` with `config.pyrt` (pyrt's offsets; `since`
      there), `config.broadcast.ack` and, for `presence`, `config.presence`; its reply is
      the native one (`response.pyrt`).
    - `publish` is a `broadcast` of event `kit` with payload `{"value": data}`; a broadcast
      back (`meta` has its offset and epoch) is a `pub` whose data is `payload["value"]`
      when that is the payload's only key, else the payload (a server publication that is
      an object arrives as it is).
    - `track` is a presence `track`. Supabase fixes a channel's presence key when it joins,
      so tracking under another key first joins the topic again with that key (as a
      Supabase client makes a new channel); `untrack` and `leave` map one to one.
    - `ping` is a heartbeat on topic `phoenix`; any other command name is an event there,
      which Supabase refuses as `UnknownEvent` (the native 404).
    - A refusal's reason (`TooManyChannels: ...`) is the native error with that code;
      `unmatched topic` (a push to a topic not joined) is 403.
    - `send_raw` sends a frame that is no JSON object as it is; one that is a native
      command is translated and, when it carries a `pad` string (the frame-size checks),
      padded back to the native frame's length, so the size limit is met at the same size.

    A native command with no Phoenix counterpart (`mutate`, `presence`, a per-message
    `self`, patterns, a join without a channel) raises AssertionError: declare the
    capability instead (`SUPABASE_CAPABILITIES`). Frames with no native counterpart
    (`system`, `phx_error`, `postgres_changes`) come as pushes named `phoenix:<event>`.
    """

    def __init__(self, socket: PhoenixSocket, vsn: str = "1.0.0") -> None:
        if vsn not in ("1.0.0", "2.0.0"):
            raise ValueError(f"vsn must be 1.0.0 or 2.0.0, not {vsn!r}")
        self.socket = socket
        self.vsn = vsn
        self._refs = itertools.count(1)
        self._sent: dict[str, _Sent] = {}
        self._topics: dict[str, _Topic] = {}
        self._last_ref = ""

    # -- TransportClient ---------------------------------------------------------------------

    async def send(self, command: Mapping[str, Any]) -> None:
        for frame in self._translate(dict(command)):
            await self.socket.send(frame)

    async def send_raw(self, frame: bytes) -> None:
        try:
            command = orjson.loads(frame)
        except orjson.JSONDecodeError:
            command = None
        if not isinstance(command, dict) or not isinstance(command.get("cmd"), str):
            await self.socket.send(frame.decode())  # bad input stays bad input
            return
        frames = self._translate(command)
        pad = command.get("pad")
        if isinstance(pad, str):
            over = len(frames[-1].encode()) - len(frame)
            if over > 0:
                command["pad"] = pad[: max(0, len(pad) - over)]
                self._sent.pop(self._last_ref, None)
                frames[-1:] = self._translate(command)
        for text in frames:
            await self.socket.send(text)

    async def receive(self) -> dict[str, Any]:
        while True:
            frame = self._native(await self.socket.receive())
            if frame is not None:
                return frame

    # -- native to Phoenix -------------------------------------------------------------------

    def _message(self, topic: str, event: str, payload: Any, sent: _Sent) -> str:
        ref = str(next(self._refs))
        self._sent[ref] = sent
        self._last_ref = ref
        joined = self._topics.get(topic)
        join_ref = ref if event == "phx_join" else (joined.join_ref if joined else None)
        if event == "phx_join":
            self._topics[topic].join_ref = ref
        if self.vsn == "2.0.0":
            return orjson.dumps([join_ref, ref, topic, event, payload]).decode()
        message = {"topic": topic, "event": event, "payload": payload, "ref": ref}
        message["join_ref"] = join_ref
        return orjson.dumps(message).decode()

    def _join(self, topic: str, sent: _Sent, since: Any = None) -> str:
        joined = self._topics[topic]
        config: dict[str, Any] = {"broadcast": {"ack": True}, "pyrt": {}}
        if since is not None:
            config["pyrt"]["since"] = since
        presence: dict[str, Any] = {}
        if joined.presence:
            presence["enabled"] = True
        if joined.presence_key is not None:
            presence["key"] = joined.presence_key
        if presence:
            config["presence"] = presence
        return self._message(topic, "phx_join", {"config": config}, sent)

    def _translate(self, command: dict[str, Any]) -> list[str]:
        cmd = command.get("cmd")
        has_id = "id" in command
        rid = command.get("id")
        rest = {k: v for k, v in command.items() if k not in ("cmd", "id")}
        if cmd == "ping":
            return [self._message(_PHOENIX_TOPIC, "heartbeat", rest, _Sent(rid, has_id))]
        if not isinstance(cmd, str) or cmd not in _NATIVE_COMMANDS:
            if not isinstance(cmd, str):
                raise _NoTranslation(f"no Phoenix message for a command without 'cmd': {command}")
            return [self._message(_PHOENIX_TOPIC, cmd, rest, _Sent(rid, has_id))]
        channel = command.get("channel")
        if not isinstance(channel, str):
            raise _NoTranslation(f"a Phoenix message needs a topic: {command}")
        if any(segment in ("*", ">") for segment in channel.split(":")):
            raise _NoTranslation(f"Supabase topics are no patterns: {command}")
        topic = _TOPIC_PREFIX + channel
        if cmd == "join":
            self._topics[topic] = _Topic("", presence=command.get("presence") is True)
            return [self._join(topic, _Sent(rid, has_id, join=channel), command.get("since"))]
        if cmd == "publish":
            if "self" in command:
                raise _NoTranslation(
                    f"Supabase's 'self' is per channel, not per message: {command}"
                )
            payload = {
                "type": "broadcast",
                "event": _KIT_EVENT,
                "payload": {"value": command.get("data")},
            }
            answers_ok = has_id and command.get("ack") is True
            return [self._message(topic, "broadcast", payload, _Sent(rid, has_id, answers_ok))]
        if cmd == "track":
            frames = []
            joined = self._topics.get(topic)
            key = command.get("key")
            if joined is not None and key is not None and key != joined.presence_key:
                joined.presence_key = str(key)
                frames.append(self._join(topic, _Sent(None, False, join=channel, quiet=True)))
            meta = command.get("meta", {})
            payload = {"type": "presence", "event": "track", "payload": meta}
            frames.append(self._message(topic, "presence", payload, _Sent(rid, has_id)))
            return frames
        if cmd == "untrack":
            payload = {"type": "presence", "event": "untrack"}
            return [self._message(topic, "presence", payload, _Sent(rid, has_id))]
        if cmd == "leave":
            frame = self._message(topic, "phx_leave", {}, _Sent(rid, has_id))
            self._topics.pop(topic, None)
            return [frame]
        raise _NoTranslation(f"Supabase's protocol has no '{cmd}' command: {command}")

    # -- Phoenix to native -------------------------------------------------------------------

    def _native(self, raw: str | bytes) -> dict[str, Any] | None:
        if isinstance(raw, bytes):
            topic, payload = _user_broadcast(raw)
            return _publication(topic, payload)
        value = orjson.loads(raw)
        if self.vsn == "2.0.0":
            _join_ref, ref, topic, event, payload = value
        else:
            topic, event, payload, ref = (value[k] for k in ("topic", "event", "payload", "ref"))
        channel = topic.removeprefix(_TOPIC_PREFIX)
        if event == "phx_reply":
            return self._reply(ref, payload)
        if event == "broadcast":
            return _publication(topic, payload)
        if event == "presence_state":
            return {"push": "presence_state", "channel": channel, "state": _presences(payload)}
        if event == "presence_diff":
            return {
                "push": "presence_diff",
                "channel": channel,
                "joins": _presences(payload["joins"]),
                "leaves": _presences(payload["leaves"]),
            }
        if event == "phx_close":
            return None  # after a leave's reply: nothing to tell natively
        return {"push": f"phoenix:{event}", "channel": channel, "payload": payload}

    def _reply(self, ref: Any, payload: Mapping[str, Any]) -> dict[str, Any] | None:
        sent = self._sent.pop(ref, None)
        _check(sent is not None, f"a reply to ref {ref!r}, which the client never sent")
        assert sent is not None
        response = payload.get("response", {})
        if payload.get("status") != "ok":
            if sent.join is not None:
                self._topics.pop(_TOPIC_PREFIX + sent.join, None)
            reason = str(response.get("reason", ""))
            name, _, message = reason.partition(": ")
            if reason == "unmatched topic":
                code: int | None = 403
                message = reason
            else:
                code = _REASON_CODES.get(name)
            error = {"code": code, "message": message or reason}
            if sent.has_id:
                return {"reply": sent.rid, "error": error}
            return {"push": "error", **error}
        if sent.quiet or not (sent.has_id and sent.answers_ok):
            return None
        if sent.join is not None:
            return {"reply": sent.rid, "ok": response["pyrt"]}
        return {"reply": sent.rid, "ok": response}


def _publication(topic: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    body = payload.get("payload", {})
    data = body["value"] if isinstance(body, dict) and set(body) == {"value"} else body
    meta = payload.get("meta") or {}
    return {
        "push": "pub",
        "channel": topic.removeprefix(_TOPIC_PREFIX),
        "offset": meta.get("offset"),
        "epoch": meta.get("epoch"),
        "data": data,
    }


def _user_broadcast(frame: bytes) -> tuple[str, dict[str, Any]]:
    """A vsn 2.0.0 binary broadcast (kind 4: `[4, topic_len, event_len, meta_len,
    encoding]`, the strings, the payload) as (topic, broadcast payload)."""
    _check(len(frame) >= 5 and frame[0] == 4, f"a binary frame of kind {frame[:1]!r}")
    sizes, encoding = frame[1:4], frame[4]
    _check(encoding == 1, f"a binary broadcast with encoding {encoding} (JSON is 1)")
    parts, offset = [], 5
    for size in sizes:
        parts.append(frame[offset : offset + size].decode())
        offset += size
    topic, event, meta = parts
    payload: dict[str, Any] = {"event": event, "payload": orjson.loads(frame[offset:])}
    if meta:
        payload["meta"] = orjson.loads(meta)
    return topic, payload


def _presences(state: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Supabase's `{key: {metas: [{phx_ref, phx_ref_prev?, ...fields}]}}` as the native
    `{key: [{ref, prev_ref?, meta}]}` (Supabase does not say which client tracked it)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, entry in state.items():
        metas = []
        for meta in entry["metas"]:
            fields = dict(meta)
            native = {"ref": fields.pop("phx_ref", None)}
            if "phx_ref_prev" in fields:
                native["prev_ref"] = fields.pop("phx_ref_prev")
            native["meta"] = fields
            metas.append(native)
        out[key] = metas
    return out
