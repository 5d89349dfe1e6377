"""The REST API under `/api/`: server-side publishing, records, and reads of hub state
(docs/http.md).

For backends, not browsers' end users: every request needs one of `NodeConfig.api_keys`.
Requests are validated whole before anything happens, so a rejected publish published nothing.
"""

from __future__ import annotations

import hmac
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import trio

from .._core import check_channel
from .._errors import ChannelNameError
from ..conflict import Mutation, Op, Timestamp
from ..hub.history import StreamPosition
from ..hub.hub import Hub
from ..hub.limits import KeyFailures
from ..hub.protocol import ErrorCode, _presence_map, encode_record
from .config import NodeConfig
from .http import HttpError, HttpExchange, HttpRequest, bearer_token


class RestHost(Protocol):
    """What the REST API needs of the node (`pyrt.node.node.Node` is one)."""

    hub: Hub
    key_failures: KeyFailures

    @property
    def config(self) -> NodeConfig: ...

    @property
    def now(self) -> float: ...

    def address_of(self, stream: trio.abc.Stream) -> str | None: ...

    def count_api_messages(self, count: int) -> None: ...

    def pump(self) -> None: ...

    def revoke(self, jti: str, until: float) -> None: ...


API_PREFIX = "/api/"
MAX_PUBLISH_CHANNELS = 100
"""Most channels one `POST /api/publish` may name."""
HISTORY_LIMIT = 100
"""Publications `GET /api/history/<channel>` returns when no `limit` is given."""
MAX_HISTORY_LIMIT = 1000

_PUBLISH_FIELDS = frozenset({"channel", "channels", "data", "key"})
_MUTATE_FIELDS = frozenset({"op", "value", "base", "origin", "seq"})
RECORDS_PREFIX = API_PREFIX + "records/"
MAX_KEY_LENGTH = 256

_Handler = Callable[[RestHost, HttpExchange, str], Awaitable[None]]


_ROUTES = (
    "there are POST /api/publish, GET /api/history/<channel>, GET /api/presence/<channel>,"
    " GET /api/channels, GET /api/records/<channel>, GET or POST"
    " /api/records/<channel>/<key>, POST /api/disconnect, POST /api/revoke and"
    " POST /api/unsubscribe"
)


class _MethodNotAllowed(HttpError):
    def __init__(self, allow: str, path: str) -> None:
        super().__init__(405, f"use {allow} for {path}")
        self.allow = allow


class _WrongKey(HttpError):
    """A key was given, and it is none of the configured ones (counted per address)."""


async def retry_later(exchange: HttpExchange, seconds: float, message: str) -> None:
    """A 429 with `retry-after` (whole seconds, rounded up)."""
    error = HttpError(429, message)
    headers = [("retry-after", str(max(1, math.ceil(seconds))))]
    await exchange.respond(429, error.body(), headers=headers)


async def paused(node: RestHost, exchange: HttpExchange) -> bool:
    """Answers 429 if the client's address is paused for wrong API keys (and returns True):
    call it before checking the request's key."""
    wait = node.key_failures.paused(node.address_of(exchange.stream), node.now)
    if not wait:
        return False
    message = "too many wrong API keys from your address: try again later"
    await retry_later(exchange, wait, message)
    return True


async def api_route(node: RestHost, exchange: HttpExchange) -> bool:
    """Serves every path under `/api/`; passes on everything else."""
    path = exchange.request.path
    if not path.startswith(API_PREFIX):
        return False
    if await paused(node, exchange):
        return True
    try:
        _authorize(node.config.api_keys, exchange)
    except HttpError as e:
        if isinstance(e, _WrongKey):
            node.key_failures.fail(node.address_of(exchange.stream), node.now)
        # A 401 says how to authenticate (RFC 9110).
        headers = [("www-authenticate", 'Bearer realm="pyrt"')]
        await exchange.respond(e.status, e.body(), headers=headers)
        return True
    try:
        if path.startswith(RECORDS_PREFIX):
            handler, argument = _resolve_records(exchange.request)
        else:
            handler, argument = _resolve(path, exchange.request.method)
    except _MethodNotAllowed as e:
        await exchange.respond(405, e.body(), headers=[("allow", e.allow)])
        return True
    await handler(node, exchange, argument)
    return True


def _resolve(path: str, method: str) -> tuple[_Handler, str]:
    """The handler for `path` and its path argument (a channel), or HttpError 404/405."""
    name = path.removeprefix(API_PREFIX)
    route: tuple[str, _Handler] | None = None
    argument = ""
    if name == "publish":
        route = ("POST", _publish)
    elif name in _REVOCATIONS:
        route = ("POST", _REVOCATIONS[name])
    elif name == "channels":
        route = ("GET", _channels)
    else:
        prefix, slash, argument = name.partition("/")
        if slash and prefix == "history":
            route = ("GET", _history)
        elif slash and prefix == "presence":
            route = ("GET", _presence)
    if route is None:
        raise HttpError(404, f"no API route {path}: {_ROUTES}")
    allow, handler = route
    if method != allow:
        raise _MethodNotAllowed(allow, path)
    return handler, argument


def _resolve_records(request: HttpRequest) -> tuple[_Handler, str]:
    """`/api/records/<channel>[/<key>]`. The raw path is split at the first `/` before
    percent-decoding, so channels and keys may hold any character (`/` as `%2F`)."""
    raw = request.target.split("?", 1)[0].removeprefix(RECORDS_PREFIX)
    channel, slash, key = raw.partition("/")
    argument = urllib.parse.unquote(channel)
    if not slash:
        if request.method != "GET":
            raise _MethodNotAllowed("GET", request.path)
        return _records, argument
    if request.method not in ("GET", "POST"):
        raise _MethodNotAllowed("GET, POST", request.path)
    # Channel names hold no NUL: it separates the two parts for the handler.
    argument += "\0" + urllib.parse.unquote(key)
    return (_record if request.method == "GET" else _mutate), argument


def _authorize(keys: Sequence[str], exchange: HttpExchange) -> None:
    if not keys:
        raise HttpError(
            401, "the REST API is disabled: no API keys configured (set server.api_keys)"
        )
    request = exchange.request
    given = bearer_token(request.header("authorization"))
    if given is None:
        given = request.header("x-api-key") or request.header("apikey")
    if not given:
        raise HttpError(
            401, "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
        )
    # Compare with every key, without stopping at a match, so timing tells nothing about which
    # key matched or how much of one did (beyond lengths).
    candidate = given.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, key.encode())
    if not matched:
        raise _WrongKey(401, "wrong API key")


# -- POST /api/disconnect, /api/revoke, /api/unsubscribe ------------------------------------

MAX_REVOKED_SECONDS = 366 * 86400.0
"""Longest a revocation without the token's `exp` (`until`) is kept: a year."""


def _string(body: Mapping[str, Any], name: str, limit: int = 1024) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 1 <= len(value) <= limit:
        raise HttpError(400, f"'{name}' must be a string of 1 to {limit} characters")
    return value


async def _fields(
    node: RestHost, exchange: HttpExchange, allowed: frozenset[str]
) -> Mapping[str, Any]:
    body = await exchange.json_body(node.config.max_body_bytes)
    if not isinstance(body, dict):
        raise HttpError(400, f"body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise HttpError(400, f"unknown field '{unknown[0][:64]}': use {', '.join(sorted(allowed))}")
    return body


async def _disconnect(node: RestHost, exchange: HttpExchange, _argument: str) -> None:
    """`{"user"}`: closes every live connection of the user (4403)."""
    body = await _fields(node, exchange, frozenset({"user"}))
    closed = node.hub.disconnect_user(_string(body, "user"))
    node.pump()
    await exchange.respond_json(200, {"disconnected": closed})


async def _revoke(node: RestHost, exchange: HttpExchange, _argument: str) -> None:
    """`{"jti", "until"?}`: the token is refused from now on, until `until` (Unix seconds,
    its `exp`; default: a year), and its live connections are closed (4403)."""
    body = await _fields(node, exchange, frozenset({"jti", "until"}))
    jti = _string(body, "jti")
    until = body.get("until")
    if until is None:
        until = time.time() + MAX_REVOKED_SECONDS
    elif isinstance(until, bool) or not isinstance(until, (int, float)) or not math.isfinite(until):
        raise HttpError(400, "'until' must be a number (Unix seconds: the token's exp)")
    node.revoke(jti, float(until))
    closed = node.hub.revoke_token(jti)
    node.pump()
    await exchange.respond_json(200, {"disconnected": closed})


async def _unsubscribe(node: RestHost, exchange: HttpExchange, _argument: str) -> None:
    """`{"user", "channel"}`: ends the user's joins of `channel` (as joined: a name or a
    pattern) on every live connection, each told with an `unsubscribe` push. (The rules
    still decide whether it may join again: change them, or revoke its token, for good.)"""
    body = await _fields(node, exchange, frozenset({"user", "channel"}))
    channel = _string(body, "channel", 255)
    try:
        check_channel(channel, pattern=True)
    except ChannelNameError as e:
        raise HttpError(422, f"channel: {e}") from None
    removed = node.hub.unsubscribe_user(_string(body, "user"), channel, node.now)
    node.pump()
    await exchange.respond_json(200, {"unsubscribed": removed})


_REVOCATIONS: dict[str, _Handler] = {
    "disconnect": _disconnect,
    "revoke": _revoke,
    "unsubscribe": _unsubscribe,
}


# -- POST /api/publish ---------------------------------------------------------------------


async def _publish(node: RestHost, exchange: HttpExchange, _argument: str) -> None:
    body = await exchange.json_body(node.config.max_body_bytes)
    channels, data, key = _publish_request(body, node.hub.config.max_payload_bytes)
    hub, now = node.hub, node.now
    for channel in channels:
        _check_publish(node, channel)
    wait = hub.take_publish_rate(channels, now)
    if wait:
        await _channel_busy(node, exchange, wait)
        return
    publications = [hub.publish(channel, data, now, key=key) for channel in channels]
    node.count_api_messages(1)
    node.pump()
    await exchange.respond_json(
        200,
        {
            "publications": [
                {"channel": p.channel, "offset": p.offset, "epoch": p.epoch} for p in publications
            ]
        },
    )


def _check_publish(node: RestHost, channel: str) -> None:
    """HttpError 403 when clients may not publish to `channel`: a source feeds it (code 423),
    or it holds records (code 405: change them with POST /api/records/...)."""
    refusal = node.hub.client_write_refusal(channel)
    if refusal is not None:
        raise HttpError(403, refusal, code=ErrorCode.READ_ONLY)
    if node.hub.is_records_channel(channel):
        message = f"'{channel}' holds records: change them with POST /api/records/<channel>/<key>"
        raise HttpError(403, message, code=ErrorCode.NOT_ALLOWED)


async def _channel_busy(node: RestHost, exchange: HttpExchange, wait: float) -> None:
    rate = node.hub.config.channel_publish_rate
    await retry_later(exchange, wait, f"a channel takes at most {rate:g} publications per second")


def _publish_request(body: Any, max_payload: int) -> tuple[list[str], Any, str | None]:
    """The channels, data and key of a publish body; HttpError 400, 413 or 422."""
    if not isinstance(body, dict):
        raise HttpError(400, f"body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - _PUBLISH_FIELDS)
    if unknown:
        raise HttpError(
            400, f"unknown field '{unknown[0][:64]}': use channel or channels, data, key"
        )
    if "data" not in body:
        raise HttpError(400, "'data' is missing (it may be null)")
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise HttpError(400, f"'key' must be a string, got {_json_type(key)}")
    channels = _publish_channels(body)
    size = len(orjson.dumps(body["data"]))
    if size > max_payload:
        raise HttpError(413, f"data larger than {max_payload} bytes ({size} as JSON)")
    for index, channel in enumerate(channels):
        try:
            check_channel(channel)
        except ChannelNameError as e:
            where = "channel" if "channel" in body else f"channels[{index}]"
            raise HttpError(422, f"{where}: {e}") from None
    return channels, body["data"], key


def _publish_channels(body: Mapping[str, Any]) -> list[str]:
    if ("channel" in body) == ("channels" in body):
        raise HttpError(400, "give either 'channel' (a string) or 'channels' (a list of strings)")
    if "channel" in body:
        channel = body["channel"]
        if not isinstance(channel, str):
            raise HttpError(400, f"'channel' must be a string, got {_json_type(channel)}")
        return [channel]
    channels = body["channels"]
    if not isinstance(channels, list):
        raise HttpError(400, f"'channels' must be a list of strings, got {_json_type(channels)}")
    if not 1 <= len(channels) <= MAX_PUBLISH_CHANNELS:
        raise HttpError(400, f"'channels' must name 1 to {MAX_PUBLISH_CHANNELS} channels")
    for index, channel in enumerate(channels):
        if not isinstance(channel, str):
            raise HttpError(400, f"'channels[{index}]' must be a string, got {_json_type(channel)}")
    if len(set(channels)) != len(channels):
        duplicate = next(c for i, c in enumerate(channels) if c in channels[:i])
        raise HttpError(400, f"'channels' names '{duplicate[:64]}' more than once")
    return list(channels)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# -- GET /api/history/<channel>, /api/presence/<channel>, /api/channels --------------------


def _channel_name(channel: str) -> str:
    try:
        check_channel(channel)
    except ChannelNameError as e:
        raise HttpError(422, str(e)) from None
    return channel


def _int_param(exchange: HttpExchange, name: str, low: int, high: int | None) -> int | None:
    raw = exchange.request.param(name)
    if raw is None:
        return None
    value = int(raw) if raw.isascii() and raw.isdigit() else None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise HttpError(400, f"'{name}' must be an integer {bounds}, got '{raw[:32]}'")
    return value


async def _history(node: RestHost, exchange: HttpExchange, channel: str) -> None:
    channel = _channel_name(channel)
    since = _int_param(exchange, "since", 0, None)
    epoch = exchange.request.param("epoch")
    if (since is None) != (epoch is None):
        raise HttpError(400, "give 'since' and 'epoch' together (a position), or neither")
    limit = _int_param(exchange, "limit", 1, MAX_HISTORY_LIMIT) or HISTORY_LIMIT
    position = None if since is None or epoch is None else StreamPosition(since, epoch)
    recovery = node.hub.history(channel, node.now, since=position)
    publications = []
    for p in recovery.publications[:limit]:
        item: dict[str, Any] = {"offset": p.offset, "epoch": p.epoch, "data": p.data}
        if p.publisher is not None:
            item["from"] = p.publisher
        publications.append(item)
    await exchange.respond_json(
        200,
        {
            "channel": channel,
            "offset": recovery.position.offset,
            "epoch": recovery.position.epoch,
            "recovered": recovery.recovered,
            "publications": publications,
            "more": len(recovery.publications) > limit,
        },
    )


async def _presence(node: RestHost, exchange: HttpExchange, channel: str) -> None:
    channel = _channel_name(channel)
    state = _presence_map(node.hub.presence(channel))
    await exchange.respond_json(200, {"channel": channel, "state": state})


async def _channels(node: RestHost, exchange: HttpExchange, _argument: str) -> None:
    channels = sorted(node.hub.channels().items())
    await exchange.respond_json(
        200, {"channels": [{"channel": c, "subscribers": n} for c, n in channels]}
    )


# -- /api/records/<channel>[/<key>] ----------------------------------------------------------


def _records_channel(node: RestHost, channel: str) -> str:
    """A records channel's name; HttpError 422 (not a channel name) or 404 (no records)."""
    channel = _channel_name(channel)
    if not _holds_records(node, channel):
        raise HttpError(
            404, f"'{channel[:64]}' holds no records: no pattern of hub.record_policies matches it"
        )
    return channel


def _holds_records(node: RestHost, channel: str) -> bool:
    try:
        node.hub.record(channel, "")
    except ValueError:
        return False
    return True


def _channel_and_key(node: RestHost, argument: str) -> tuple[str, str]:
    channel, _, key = argument.partition("\0")
    channel = _records_channel(node, channel)
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise HttpError(422, f"a record key is 1 to {MAX_KEY_LENGTH} characters, got {len(key)}")
    return channel, key


async def _records(node: RestHost, exchange: HttpExchange, argument: str) -> None:
    channel = _records_channel(node, argument)
    hub = node.hub
    records = hub.records(channel)
    position = hub.history_position(channel, node.now)
    body: dict[str, Any] = {
        "channel": channel,
        "policy": hub.record_stores[channel].policy.name,
        "offset": position.offset,
        "epoch": position.epoch,
        "records": [encode_record(r) for r in records],
    }
    forgotten = hub.record_stores[channel].forgotten
    if forgotten is not None:
        body["forgotten"] = forgotten.encode()
    await exchange.respond_json(200, body)


async def _record(node: RestHost, exchange: HttpExchange, argument: str) -> None:
    channel, key = _channel_and_key(node, argument)
    record = node.hub.record(channel, key)
    await exchange.respond_json(200, {"channel": channel, "record": encode_record(record)})


async def _mutate(node: RestHost, exchange: HttpExchange, argument: str) -> None:
    channel, key = _channel_and_key(node, argument)
    body = await exchange.json_body(node.config.max_body_bytes)
    mutation = _mutation_request(key, body, node.hub.config.max_payload_bytes)
    refusal = node.hub.client_write_refusal(channel)
    if refusal is not None:
        raise HttpError(403, refusal, code=ErrorCode.READ_ONLY)
    wait = node.hub.take_publish_rate((channel,), node.now)
    if wait:
        await _channel_busy(node, exchange, wait)
        return
    reply = node.hub.mutate(channel, mutation, node.now)
    node.pump()
    if reply.ok is not None:
        await exchange.respond_json(200, reply.ok)
        return
    assert reply.code is not None
    error = {"code": int(reply.code), "message": reply.message, "record": reply.record}
    await exchange.respond_json(int(reply.code), {"error": error})


def _mutation_request(key: str, body: Any, max_payload: int) -> Mutation:
    """The mutation a `POST /api/records/<channel>/<key>` body asks for; HttpError 400/413."""
    if not isinstance(body, dict):
        raise HttpError(400, f"body must be a JSON object, got {_json_type(body)}")
    unknown = sorted(set(body) - _MUTATE_FIELDS)
    if unknown:
        raise HttpError(400, f"unknown field '{unknown[0][:64]}': use op, value, base, origin, seq")
    raw_op = body.get("op")
    if raw_op not in ("set", "patch", "delete"):
        got = "missing" if "op" not in body else f"got {_json_type(raw_op)} {str(raw_op)[:32]!r}"
        raise HttpError(400, f"'op' must be one of set, patch, delete ({got})")
    op = Op(raw_op)
    value = body.get("value")
    if op is Op.DELETE:
        if value is not None:
            raise HttpError(400, "delete takes no 'value'")
    elif not isinstance(value, dict):
        raise HttpError(400, f"'value' must be an object for {op.value}, got {_json_type(value)}")
    base = body.get("base")
    if base is not None:
        if not isinstance(base, str):
            raise HttpError(
                400, f"'base' must be a record's version (a string) or null, got {_json_type(base)}"
            )
        try:
            base = Timestamp.decode(base)
        except ValueError as e:
            raise HttpError(400, f"'base': {e}") from None
    origin, seq = body.get("origin"), body.get("seq")
    if (origin is None) != (seq is None):
        raise HttpError(400, "'origin' and 'seq' go together (an idempotency key), or neither")
    if origin is not None and (not isinstance(origin, str) or not 1 <= len(origin) <= 64):
        raise HttpError(400, "'origin' must be a string of 1 to 64 characters")
    if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
        raise HttpError(400, "'seq' must be an integer of at least 1")
    if value is not None:
        size = len(orjson.dumps(value))
        if size > max_payload:
            raise HttpError(413, f"value larger than {max_payload} bytes ({size} as JSON)")
    return Mutation(key, op, value, base, None, origin, seq)
