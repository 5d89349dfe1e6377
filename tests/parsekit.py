"""What every parser of untrusted input promises, as checks the fuzzers share.

Each `parse_*` function feeds one input to one parser and returns what it made, or None when
the parser raised its documented error (the error is checked too: what the caller does with
it must work). Any other exception propagates: that is the bug a fuzzer looks for. The
`check_*` functions assert that a value has the shape the rest of the code assumes.

Used by tests/fuzz/test_fuzz_parsers.py (hypothesis) and by the atheris harnesses in fuzz/.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from typing import Any

import attrs
import orjson

from pyrt._core import check_channel
from pyrt.conflict import Op, Outcome, Record, Result, Timestamp
from pyrt.hub.history import StreamPosition
from pyrt.hub.hub import HubConfig
from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.hub.protocol import (
    MAX_TOKEN_CHARS,
    CloseCode,
    Command,
    Connect,
    ErrorCode,
    Join,
    JsonCodec,
    Leave,
    Mutate,
    Ping,
    PresenceQuery,
    ProtocolError,
    Publish,
    Refresh,
    Track,
    Untrack,
    decode_mutate_reply,
    decode_record,
    table_channel,
)
from pyrt.node.config import ConfigError, hub_config, node_config
from pyrt.node.node import NodeConfig
from pyrt.plugins.cursor import Cursor, decode_cursor
from pyrt.plugins.supabase import _channel_of
from pyrt.plugins.supabase.phoenix import (
    VSN_2,
    BadFrame,
    ChannelCodec,
    JoinError,
    JoinRequest,
    Message,
    TooDeep,
    decode,
    parse_join,
)

ORJSON_DUMP_DEPTH = 254
"""orjson refuses to encode deeper values ("Recursion limit reached"); it reads up to 1024."""

_codec = JsonCodec()


# -- shapes ---------------------------------------------------------------------------------


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (a scalar is 0, `[]` is 1), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, depth)
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def check_json(value: Any) -> None:
    """A value as orjson decodes it: JSON types only, finite floats, str keys; and, unless it is
    nested deeper than orjson can write, it encodes again."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            assert all(isinstance(k, str) for k in item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, float):
            assert math.isfinite(item)
        else:
            assert item is None or isinstance(item, (bool, int, str)), type(item)
    if json_depth(value) <= ORJSON_DUMP_DEPTH:
        assert orjson.loads(orjson.dumps(value)) == value


def check_request_id(rid: Any) -> None:
    assert rid is None or (type(rid) is int) or (isinstance(rid, str) and len(rid) <= 64), rid


def check_position(position: Any) -> None:
    assert isinstance(position, StreamPosition)
    assert type(position.offset) is int
    assert position.offset >= 0
    assert isinstance(position.epoch, str)


def check_timestamp(stamp: Any) -> None:
    assert stamp is None or isinstance(stamp, Timestamp)
    if stamp is not None:
        assert Timestamp.decode(stamp.encode()) == stamp


def check_token(token: object) -> None:
    """A token as a command carries it to the verifier: a bounded, non-empty string."""
    assert isinstance(token, str)
    assert 1 <= len(token) <= MAX_TOKEN_CHARS


def check_command(command: Command) -> None:
    """A command as `JsonCodec.decode` makes it, with the types the hub relies on."""
    kinds = (Join, Leave, Publish, Mutate, Track, Untrack, PresenceQuery, Ping, Connect, Refresh)
    assert isinstance(command, kinds)
    check_request_id(command.id)
    # The hub answers every command with an id: that reply must encode.
    orjson.loads(_codec.reply(command.id, {}))
    if isinstance(command, Ping):
        return
    if isinstance(command, (Connect, Refresh)):
        check_token(command.token)
        return
    assert isinstance(command.channel, str)
    match command:
        case Publish():
            assert isinstance(command.ack, bool)
            assert isinstance(command.echo, bool)
            assert command.key is None or isinstance(command.key, str)
            assert type(command.size) is int
            assert command.size >= 0
            check_json(command.data)
        case Join():
            if command.token is not None:
                check_token(command.token)
            if command.since is not None:
                check_position(command.since)
            assert isinstance(command.presence, bool)
            assert isinstance(command.changes, tuple)
            for sub in command.changes:
                assert sub.event in ("*", "INSERT", "UPDATE", "DELETE")
                assert isinstance(sub.schema, str)
                assert isinstance(sub.table, str)
                assert sub.schema
                assert sub.table
                assert sub.filter is None or (isinstance(sub.filter, str) and sub.filter)
                assert table_channel(sub.schema, sub.table) == command.channel
            if command.changes:
                check_channel(command.channel, pattern=True)  # a table's channel is valid
        case Track() | Untrack():
            assert command.key is None or isinstance(command.key, str)
            assert command.ref is None or isinstance(command.ref, str)
            if isinstance(command, Track):
                assert isinstance(command.meta, dict)
                check_json(command.meta)
        case Mutate():
            mutation = command.mutation
            assert isinstance(mutation.key, str)
            assert 1 <= len(mutation.key) <= 256
            assert isinstance(mutation.op, Op)
            assert (mutation.value is None) == (mutation.op is Op.DELETE)
            if mutation.value is not None:
                assert isinstance(mutation.value, dict)
                check_json(mutation.value)
            check_timestamp(mutation.base)
            check_timestamp(mutation.hlc)
            assert (mutation.origin is None) == (mutation.seq is None)
            if mutation.origin is not None:
                assert isinstance(mutation.origin, str)
                assert 1 <= len(mutation.origin) <= 64
                assert type(mutation.seq) is int
                assert mutation.seq >= 1
            assert type(command.size) is int
            assert command.size >= 0
        case Leave() | PresenceQuery():
            pass


def check_protocol_error(error: ProtocolError) -> None:
    """The error the hub catches, with what the hub does with it: close or reply."""
    check_request_id(error.id)
    assert isinstance(error.message, str)
    assert error.code in set(ErrorCode) | set(CloseCode), error.code
    if error.close is not None:
        assert isinstance(error.close, CloseCode)
    else:
        assert isinstance(error.code, ErrorCode)
        orjson.loads(_codec.error(error.id, error.code, error.message))


def check_record(record: Record) -> None:
    assert isinstance(record, Record)
    assert isinstance(record.key, str)
    assert record.value is None or isinstance(record.value, dict)
    for stamp in (record.version, record.written, record.cleared, *record.fields.values()):
        check_timestamp(stamp)
    assert all(isinstance(name, str) for name in record.fields)


def check_message(message: Message, vsn: str, *, binary: bool) -> None:
    """A Phoenix message as `decode` makes it, with what the Supabase transport does first."""
    assert isinstance(message, Message)
    assert isinstance(message.topic, str)
    assert isinstance(message.event, str)
    for ref in (message.ref, message.join_ref):
        assert ref is None or isinstance(ref, str) or type(ref) is int, ref
    if binary:
        payload = message.payload
        assert message.event == "broadcast"
        assert isinstance(payload, dict)
        assert payload["type"] == "broadcast"
        assert isinstance(payload["event"], str)
        if not isinstance(payload["payload"], bytes):
            check_json(payload["payload"])
        if "meta" in payload:
            check_json(payload["meta"])
    else:
        check_json(message.payload)
    # Every message is answered on its topic with its refs (a reply or a refusal).
    codec = ChannelCodec(message.topic, message.join_ref, vsn)
    assert codec.refusal(message.ref, "UnknownEvent: x")
    check_channel(_channel_of(message.topic))


def check_join_request(request: JoinRequest) -> None:
    assert isinstance(request, JoinRequest)
    for flag in (request.ack, request.echo, request.presence_enabled, request.private):
        assert isinstance(flag, bool)
    assert isinstance(request.extras, bool)
    assert isinstance(request.presence_key, str)
    assert request.access_token is None or isinstance(request.access_token, str)
    if request.since is not None:
        check_position(request.since)
    for binding in request.changes:
        assert isinstance(binding.raw, dict)
        sub = binding.subscription
        assert sub.event in ("*", "INSERT", "UPDATE", "DELETE")
        assert isinstance(sub.schema, str)
        assert isinstance(sub.table, str)
        assert sub.filter is None or isinstance(sub.filter, str)
        check_channel(binding.channel, pattern=True)
    groups = request.groups()
    assert sorted(i for indexes in groups.values() for i in indexes) == list(
        range(len(request.changes))
    )


def check_cursor(cursor: Cursor) -> None:
    assert isinstance(cursor, Cursor)
    for channel, position in cursor.positions.items():
        assert isinstance(channel, str)
        check_position(position)
    assert cursor.seq is None or (type(cursor.seq) is int and cursor.seq >= 0)
    # Trackers re-encode what they were given: the token must read back the same.
    assert decode_cursor(cursor.encode()) == cursor


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_hub_config(config: HubConfig) -> None:
    assert isinstance(config, HubConfig)
    for field in attrs.fields(HubConfig):
        value = getattr(config, field.name)
        default = field.default
        if isinstance(default, bool):
            assert isinstance(value, bool), field.name
        elif isinstance(default, int):
            assert type(value) is int, field.name
        elif isinstance(default, float):
            assert _number(value), field.name
            assert not math.isnan(value), field.name
    assert isinstance(config.slow_consumer_policy, SlowConsumerPolicy)
    for pattern, policy in config.channel_policies.items():
        check_channel(pattern, pattern=True)
        assert isinstance(policy, SlowConsumerPolicy)
    for pattern, name in config.record_policies.items():
        check_channel(pattern, pattern=True)
        assert isinstance(name, str)
        assert name


def check_node_config(config: NodeConfig) -> None:
    assert isinstance(config, NodeConfig)
    assert isinstance(config.host, str)
    assert type(config.port) is int
    assert 0 <= config.port <= 65535
    check_hub_config(config.hub)
    assert config.transports is None or all(isinstance(t, str) for t in config.transports)
    for seconds in (config.drain_timeout, config.request_timeout):
        assert _number(seconds)
        assert seconds > 0, seconds  # a deadline trio accepts
    for strings in (config.cors_origins, config.api_keys):
        assert isinstance(strings, tuple)
        assert all(isinstance(s, str) and s for s in strings)
    assert type(config.max_body_bytes) is int
    assert config.max_body_bytes >= 1
    for tables in (config.transport_options, config.sources):
        assert all(isinstance(k, str) and isinstance(v, Mapping) for k, v in tables.items())
    assert config.history_dir is None or (
        isinstance(config.history_dir, str) and config.history_dir
    )
    assert _number(config.history_fsync_interval)
    assert config.history_fsync_interval > 0
    assert type(config.history_segment_bytes) is int
    assert config.history_segment_bytes >= 4096


def check_reason(reason: str, contains: str = "") -> None:
    """An error's text, as the caller passes it on to a person."""
    assert isinstance(reason, str)
    assert reason
    assert contains in reason


def check_bad_frame(error: BadFrame) -> None:
    assert isinstance(error.code, CloseCode)
    check_reason(error.message)


# -- one input, one parser ------------------------------------------------------------------


def parse_hub_config(table: Mapping[str, Any]) -> HubConfig | None:
    """`hub_config`, for `[hub]` tables (ConfigError documented)."""
    try:
        config = hub_config(table)
    except ConfigError as e:
        check_reason(str(e))
        return None
    check_hub_config(config)
    return config


def parse_native(frame: str | bytes) -> Command | None:
    """`JsonCodec.decode`, as `Hub.receive` calls it (it catches ProtocolError)."""
    try:
        command = _codec.decode(frame)
    except ProtocolError as e:
        check_protocol_error(e)
        return None
    check_command(command)
    return command


def parse_record(data: Any) -> Record | None:
    """`decode_record` (the client reading a record off the server); ValueError documented."""
    try:
        record = decode_record(data)
    except ValueError:
        return None
    check_record(record)
    return record


def parse_mutate_reply(frame: Any) -> Result:
    """`decode_mutate_reply` never raises: anything it cannot read is a failure."""
    result = decode_mutate_reply(frame)
    assert isinstance(result.outcome, Outcome)
    if result.record is not None:
        check_record(result.record)
    assert isinstance(result.message, str)
    assert result.code is None or isinstance(result.code, int)
    return result


def parse_phoenix(frame: bytes, vsn: str, *, binary: bool) -> Message | None:
    """`decode` as the Supabase transport calls it (it catches BadFrame), then, for a
    `phx_join`, `parse_join` (it catches JoinError)."""
    try:
        message = decode(frame, vsn, binary=binary)
    except BadFrame as e:
        check_bad_frame(e)
        return None
    except TooDeep as e:  # refused with a reply to the message, whose payload is left out
        check_reason(e.reason, ": ")
        check_message(e.message, vsn, binary=binary and vsn == VSN_2)
        return None
    check_message(message, vsn, binary=binary and vsn == VSN_2)
    parse_phoenix_join(message.payload)
    return message


def parse_phoenix_join(payload: Any) -> JoinRequest | None:
    try:
        request = parse_join(payload)
    except JoinError as e:
        check_reason(e.reason, ": ")
        return None
    check_join_request(request)
    return request


def parse_cursor(token: str) -> Cursor | None:
    """`decode_cursor` as SSE and long-poll call it (they catch ValueError)."""
    try:
        cursor = decode_cursor(token)
    except ValueError as e:
        check_reason(str(e))
        return None
    check_cursor(cursor)
    return cursor


def parse_config(text: str | bytes) -> NodeConfig | None:
    """`node_config` as `pyrt serve` calls it, on a file holding `text` (ConfigError
    documented). The file is gone when this returns."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    with tempfile.NamedTemporaryFile(prefix="pyrt-fuzz-", suffix=".toml") as file:
        file.write(text)
        file.flush()
        try:
            config = node_config(file.name)
        except ConfigError as e:
            check_reason(str(e))
            return None
    check_node_config(config)
    return config
