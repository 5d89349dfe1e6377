"""Parser fuzzing: whatever a client (or a config file) says, each parser returns a value of the
shape the rest of the code assumes, or raises its documented error, and nothing else.

The parsers: the native codec (`JsonCodec.decode`, and the client's `decode_record` and
`decode_mutate_reply`), the Phoenix codec (`decode` for vsn 1.0.0, 2.0.0 and binary frames,
then `parse_join`), cursor tokens (`decode_cursor`) and the config loader (`node_config`,
`hub_config`). Inputs are arbitrary bytes and text, arbitrary JSON (deep, huge, odd numbers,
duplicate keys, escapes), and valid messages with fields mutated. The checks are in parsekit.py,
shared with the atheris harnesses in fuzz/ (docs/fuzzing.md).

Each test runs PYRT_FUZZ_EXAMPLES examples (default 100: about 20 s for the file). A long run:
`PYRT_FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz/test_fuzz_parsers.py -q`.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import tomli_w
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from parsekit import (
    parse_config,
    parse_cursor,
    parse_hub_config,
    parse_mutate_reply,
    parse_native,
    parse_phoenix,
    parse_phoenix_join,
    parse_record,
)

from pyrt.conflict import Mutation, Op, Record, Timestamp
from pyrt.hub.history import Publication, StreamPosition
from pyrt.hub.hub import HubConfig
from pyrt.hub.protocol import (
    Connect,
    Join,
    JsonCodec,
    Leave,
    Mutate,
    Ping,
    PresenceQuery,
    Publish,
    Refresh,
    RowSubscription,
    Track,
    Untrack,
    encode_mutate,
    encode_record,
)
from pyrt.node.config import ConfigError, node_config
from pyrt.plugins.cursor import Cursor, PositionTracker, decode_cursor
from pyrt.plugins.supabase.phoenix import VERSIONS, VSN_1, VSN_2, Message, encode
from pyrt.postgres import PgAuthError, PgProtocolError
from pyrt.postgres.protocol import NEED_DATA, Frontend

EXAMPLES = int(os.environ.get("PYRT_FUZZ_EXAMPLES", "100"))
fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies: text and JSON --------------------------------------------------------------

# Characters parsers trip on: controls, NUL, Unicode whitespace that str.isspace and Rust
# disagree on, a BOM, a combining mark, case mappings that change length, non-BMP, and the
# separators of channel names.
EDGE_CHARS = (
    "\x00\x1c\x1f\x7f\x85\xa0\u180e\u2028\u2029\ufeff\u200b\u0301"
    'ßﬃİı\U0001f600\U0010ffff%:*>~ \t\n"\\'
)
texts = st.text(st.characters(codec="utf-8") | st.sampled_from(EDGE_CHARS), max_size=24)
short_texts = st.text(st.characters(codec="utf-8") | st.sampled_from(EDGE_CHARS), max_size=8)


def lit(value: Any) -> str:
    """JSON text of a Python value (stdlib json: it writes NaN, Infinity and big integers)."""
    return json.dumps(value)


string_literals = st.builds(json.dumps, texts, ensure_ascii=st.booleans()) | st.sampled_from(
    [
        '"\\ud800"',  # lone surrogates, as escapes
        '"\\udfff x"',
        '"\\ud83d\\ude00"',  # a valid pair
        '"\\u0000"',
        '"\\/"',
        '"\\x41"',  # not a JSON escape
        '"\t"',  # a raw control character
        '"\\uD834\\uDD1E"',
        '"\xff"',  # (as text: U+00FF, valid)
    ]
)
numbers = (
    st.integers(-(2**70), 2**70).map(str)
    | st.floats().map(json.dumps)  # NaN, Infinity, -Infinity: not JSON
    | st.sampled_from(
        [
            "1e400",
            "-1e400",
            "1E-400",
            "-0",
            "0.0",
            "-0.0",
            "1.0e+2",
            "01",
            "1.",
            "-",
            "+1",
            "9" * 400,
        ]
    )
)
scalars = st.sampled_from(["null", "true", "false"]) | numbers | string_literals
keys = (
    st.sampled_from(
        ["cmd", "id", "channel", "data", "since", "offset", "epoch", "changes", "key", "value"]
    ).map(lit)
    | string_literals
)


def _containers(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    arrays = st.lists(children, max_size=5).map(lambda xs: "[" + ",".join(xs) + "]")
    objects = st.lists(st.tuples(keys, children), max_size=5).map(
        lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"  # keys may repeat
    )
    return arrays | objects


json_trees = st.recursive(scalars, _containers, max_leaves=16)


def _deep(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"a":': "}", '[{"b":': "}]"}[opener]
    return opener * depth + "0" + closer * depth


# Around orjson's limits: it writes 254 levels and reads 1024.
deep_values = st.builds(
    _deep,
    st.sampled_from([200, 253, 254, 255, 256, 500, 1023, 1024, 1025, 2000]) | st.integers(1, 1100),
    st.sampled_from(["[", '{"a":', '[{"b":']),
)
huge_values = st.builds(
    lambda n, unit: '"' + unit * n + '"',
    st.integers(1_000, 200_000),
    st.sampled_from(["x", "é", "\U0001f600", "\\n", "\\u00e9", "\\ud83d\\ude00"]),
) | st.builds(lambda n: "[" + ",".join(["0"] * n) + "]", st.integers(1_000, 100_000))
json_values = json_trees | deep_values | huge_values
json_objects = st.lists(st.tuples(keys, json_trees), max_size=5).map(
    lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"
)


def obj(fields: list[tuple[str, str]]) -> str:
    """A JSON object's text from (name, value text) pairs, in order, repeats kept."""
    return "{" + ",".join(f"{lit(name)}:{value}" for name, value in fields) + "}"


# -- strategies: native commands ------------------------------------------------------------

channels = st.sampled_from(["room", "a:b", "pg:public:orders", "a:*", "a:>", "", " "]) | texts
request_ids = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=70) | st.none()
timestamps = st.builds(
    Timestamp,
    st.integers(0, 10**13 - 1),
    st.integers(0, 10**5 - 1),
    st.from_regex(r"[a-z0-9._:-]{1,8}", fullmatch=True),
)
json_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
)
"""JSON-ready Python values (what a client's encoder is given)."""
json_plain_objects = st.dictionaries(texts, json_plain, max_size=5)

row_subscriptions = st.builds(
    RowSubscription,
    event=st.sampled_from(["*", "INSERT", "UPDATE", "DELETE"]),
    schema=st.sampled_from(["public", "s"]) | texts.filter(bool),
    table=st.sampled_from(["orders", "*"]) | texts.filter(bool),
    filter=st.none() | st.sampled_from(["id=eq.1", "name=in.(a,b)"]),
)
positions = st.builds(StreamPosition, st.integers(0, 2**64 - 1), texts)


@st.composite
def native_frames(draw: st.DrawFn) -> str:
    """A native command's frame, valid or with some fields mutated: replaced by any JSON
    (wrong types, huge numbers, NaN, deep or huge values), dropped, repeated, or new ones."""
    cmd = draw(
        st.sampled_from(
            [
                "ping", "publish", "join", "leave", "track", "untrack", "presence", "mutate",
                "connect", "refresh",
            ]
        )
    )  # fmt: skip
    fields: list[tuple[str, str]] = [("cmd", lit(cmd))]
    if draw(st.booleans()):
        fields.append(("id", lit(draw(request_ids))))
    if cmd in ("connect", "refresh") or (cmd == "join" and draw(st.booleans())):
        fields.append(("token", lit(draw(texts))))
    if cmd not in ("ping", "connect", "refresh"):
        fields.append(("channel", lit(draw(channels))))
    if cmd == "publish":
        fields.append(("data", draw(json_values)))
        for flag in ("ack", "self"):
            if draw(st.booleans()):
                fields.append((flag, lit(draw(st.booleans()))))
    elif cmd == "join":
        if draw(st.booleans()):
            p = draw(positions)
            fields.append(("since", obj([("offset", lit(p.offset)), ("epoch", lit(p.epoch))])))
        if draw(st.booleans()):
            subs = draw(st.lists(row_subscriptions, max_size=3))
            fields.append(("changes", lit([attrs.asdict(s) for s in subs])))
        if draw(st.booleans()):
            fields.append(("presence", lit(draw(st.booleans()))))
    elif cmd in ("track", "untrack"):
        for name in ("key", "ref"):
            if draw(st.booleans()):
                fields.append((name, lit(draw(texts))))
        if cmd == "track" and draw(st.booleans()):
            fields.append(("meta", draw(json_objects)))
    elif cmd == "mutate":
        op = draw(st.sampled_from(["set", "patch", "delete"]))
        fields += [("key", lit(draw(texts))), ("op", lit(op))]
        if op != "delete":
            fields.append(("value", draw(json_objects)))
        for name in ("base", "hlc"):
            if draw(st.booleans()):
                fields.append((name, lit(draw(timestamps).encode())))
        if draw(st.booleans()):
            fields += [("origin", lit(draw(texts))), ("seq", lit(draw(st.integers(-2, 2**64))))]
    for _ in range(draw(st.integers(0, 3))):
        names = [name for name, _ in fields] + [
            "extra",
            "data",
            "value",
            "meta",
            "changes",
            "since",
        ]
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["replace", "drop", "repeat"]))
        value = draw(json_values)
        if how == "replace":
            fields = [(n, value if n == name else v) for n, v in fields]
        elif how == "drop":
            fields = [(n, v) for n, v in fields if n != name]
        else:
            fields.append((name, value))
    return obj(draw(st.permutations(fields)))


# -- the native codec -----------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=512))
def test_native_decode_of_arbitrary_bytes(frame: bytes) -> None:
    parse_native(frame)


@fuzz
@given(st.text(max_size=256))
def test_native_decode_of_arbitrary_text(frame: str) -> None:
    parse_native(frame)


@fuzz
@given(json_values)
@example("[" * 1025 + "]" * 1025)  # past orjson's read limit
@example('{"cmd":"publish","channel":"a","data":' + "[" * 300 + "]" * 300 + "}")
def test_native_decode_of_arbitrary_json(frame: str) -> None:
    parse_native(frame)
    parse_native(frame.encode("utf-8", "surrogatepass"))


@fuzz
@given(native_frames())
@example('{"cmd":"join","changes":[{"event":"ß"}]}')  # upper() changes its length
@example('{"cmd":"publish","channel":"a","data":1,"id":18446744073709551616}')  # a float id
@example('{"cmd":"mutate","channel":"a","key":"k","op":"delete","base":"١٧١٨٠٠٠٠٠٠٠٠٠.00000.n"}')
def test_native_decode_of_near_valid_frames(frame: str) -> None:
    parse_native(frame)
    parse_native(frame.encode("utf-8", "surrogatepass"))


def _command_frames() -> st.SearchStrategy[tuple[Any, dict[str, Any]]]:
    """A command and a frame that says it, as a client writes one (pyrt.client)."""
    tokens = st.text(min_size=1, max_size=64)
    rid = st.integers(-(2**63), 2**64 - 1) | st.text(max_size=64) | st.none()
    key = st.none() | texts
    return st.one_of(
        st.builds(lambda r: (Ping(r), {"cmd": "ping", "id": r}), rid),
        st.builds(
            lambda r, c, d, a, e, k: (
                Publish(r, c, d, a, e, k),
                {"cmd": "publish", "id": r, "channel": c, "data": d, "ack": a, "self": e, "key": k},
            ),
            rid,
            channels,
            json_plain,
            st.booleans(),
            st.booleans(),
            key,
        ),
        st.builds(
            lambda r, c, s, p, t: (
                Join(r, c, s, p, token=t),
                {"cmd": "join", "id": r, "channel": c, "presence": p}
                | ({} if s is None else {"since": {"offset": s.offset, "epoch": s.epoch}})
                | ({} if t is None else {"token": t}),
            ),
            rid,
            channels,
            st.none() | positions,
            st.booleans(),
            st.none() | tokens,
        ),
        st.builds(
            lambda r, t: (Connect(r, t), {"cmd": "connect", "id": r, "token": t}), rid, tokens
        ),
        st.builds(
            lambda r, t: (Refresh(r, t), {"cmd": "refresh", "id": r, "token": t}), rid, tokens
        ),
        st.builds(
            lambda r, c: (Leave(r, c), {"cmd": "leave", "id": r, "channel": c}), rid, channels
        ),
        st.builds(
            lambda r, c: (PresenceQuery(r, c), {"cmd": "presence", "id": r, "channel": c}),
            rid,
            channels,
        ),
        st.builds(
            lambda r, c, k, m, f: (
                Track(r, c, k, m, f),
                {"cmd": "track", "id": r, "channel": c, "key": k, "meta": m, "ref": f},
            ),
            rid,
            channels,
            key,
            json_plain_objects,
            key,
        ),
        st.builds(
            lambda r, c, k, f: (
                Untrack(r, c, k, f),
                {"cmd": "untrack", "id": r, "channel": c, "key": k, "ref": f},
            ),
            rid,
            channels,
            key,
            key,
        ),
    )


@fuzz
@given(_command_frames())
def test_native_frames_a_client_writes_decode_to_their_command(
    case: tuple[Any, dict[str, Any]],
) -> None:
    command, frame = case
    raw = orjson.dumps(frame)
    decoded = parse_native(raw)
    if isinstance(decoded, Publish):
        decoded = attrs.evolve(decoded, size=0)
    assert decoded == command


mutations = st.builds(
    lambda key, op, value, base, hlc, origin, seq: Mutation(
        key,
        op,
        None if op is Op.DELETE else value,
        base,
        hlc,
        origin,
        None if origin is None else seq,
    ),
    st.text(min_size=1, max_size=256),
    st.sampled_from(Op),
    json_plain_objects,
    st.none() | timestamps,
    st.none() | timestamps,
    st.none() | st.text(min_size=1, max_size=64),
    st.integers(1, 2**64 - 1),
)


@fuzz
@given(channels, mutations, st.integers(-(2**63), 2**64 - 1) | st.text(max_size=64) | st.none())
def test_mutate_commands_round_trip(channel: str, mutation: Mutation, rid: Any) -> None:
    frame = orjson.dumps(encode_mutate(channel, mutation, rid))
    assert parse_native(frame) == Mutate(rid, channel, mutation, len(frame))


records = st.builds(
    Record,
    st.text(max_size=40),
    st.none() | json_plain_objects,
    st.none() | timestamps,
    st.none() | timestamps,
    st.dictionaries(texts, timestamps, max_size=3),
    st.none() | timestamps,
)


@fuzz
@given(records)
def test_records_round_trip(record: Record) -> None:
    assert parse_record(orjson.loads(orjson.dumps(encode_record(record)))) == record


@fuzz
@given(json_trees | json_objects | deep_values)
@example('{"key":"k","fields":{"f":["not a stamp"]}}')
@example('{"error":{"code":412,"message":' + "[" * 1000 + "]" * 1000 + "}}")
def test_what_clients_read_off_the_server_decodes_or_fails_cleanly(text: str) -> None:
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return
    parse_record(value)
    for frame in (value, {"ok": {"record": value, "applied": True}}, {"error": value}):
        if isinstance(frame, dict):
            parse_mutate_reply(frame)


publications = st.builds(
    Publication,
    channels,
    st.integers(0, 2**64 - 1),
    texts,
    json_plain,
    st.just(0.0),
)


@fuzz
@given(publications, st.integers(0, 2**64 - 1), texts)
def test_the_tracker_reads_the_positions_the_codec_writes(
    publication: Publication, joined_at: int, epoch: str
) -> None:
    codec = JsonCodec()
    channel = publication.channel
    tracker = PositionTracker()
    tracker.observe(
        codec.reply(f"join:{channel}", {"channel": channel, "offset": joined_at, "epoch": epoch})
    )
    assert tracker.positions == {channel: StreamPosition(joined_at, epoch)}
    tracker.observe(codec.publication(publication))
    assert tracker.positions == {channel: StreamPosition(publication.offset, publication.epoch)}
    assert parse_cursor(tracker.cursor(7).encode()) == Cursor(dict(tracker.positions), 7)


# -- the Phoenix codec ----------------------------------------------------------------------

refs = st.none() | st.text(max_size=12) | st.integers(-(2**63), 2**64 - 1)
topics = st.sampled_from(
    ["realtime:room", "phoenix", "realtime:", "realtime:pg:x", "room"]
) | texts.map(lambda t: "realtime:" + t)
events = (
    st.sampled_from(["phx_join", "phx_leave", "heartbeat", "broadcast", "presence", "access_token"])
    | texts
)


@st.composite
def join_payloads(draw: st.DrawFn) -> str:
    """A `phx_join` payload's text, valid or mutated."""
    config: list[tuple[str, str]] = []
    if draw(st.booleans()):
        config.append(
            (
                "broadcast",
                lit(
                    {
                        "ack": draw(st.booleans()),
                        "self": draw(st.sampled_from([True, "false", "TRUE", "yes"])),
                    }
                ),
            )
        )
    if draw(st.booleans()):
        config.append(("presence", lit({"key": draw(texts), "enabled": draw(st.booleans())})))
    if draw(st.booleans()):
        subs = draw(st.lists(row_subscriptions, max_size=3))
        config.append(
            (
                "postgres_changes",
                lit([{k: v for k, v in attrs.asdict(s).items() if v is not None} for s in subs]),
            )
        )
    if draw(st.booleans()):
        p = draw(positions)
        config.append(("pyrt", lit({"since": {"offset": p.offset, "epoch": p.epoch}})))
    if draw(st.booleans()):
        config.append(("private", lit(draw(st.booleans()))))
    fields = [("config", obj(config))]
    if draw(st.booleans()):
        fields.append(("access_token", lit(draw(texts))))
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from(["payload", "config"]))
        name = draw(
            st.sampled_from(
                [
                    "config",
                    "access_token",
                    "broadcast",
                    "presence",
                    "postgres_changes",
                    "pyrt",
                    "private",
                ]
            )
        )
        value = draw(json_values)
        target = fields if where == "payload" else config
        target.append((name, value))
        if where == "config":
            fields = [("config", obj(config)), *fields[1:]]
    return obj(fields)


@st.composite
def phoenix_frames(draw: st.DrawFn) -> tuple[str, str]:
    """(vsn, frame text): a client's Phoenix frame, valid or with fields mutated."""
    vsn = draw(st.sampled_from(VERSIONS))
    event = draw(events)
    payload = (
        draw(join_payloads()) if event == "phx_join" and draw(st.booleans()) else draw(json_values)
    )
    values = {
        "join_ref": lit(draw(refs)),
        "ref": lit(draw(refs)),
        "topic": lit(draw(topics)),
        "event": lit(event),
        "payload": payload,
    }
    for _ in range(draw(st.integers(0, 2))):
        values[draw(st.sampled_from(sorted(values)))] = draw(json_values)
    if vsn == VSN_2:
        parts = [values[n] for n in ("join_ref", "ref", "topic", "event", "payload")]
        if draw(st.integers(0, 4)) == 0:
            parts = draw(st.lists(json_trees, max_size=7))
        return vsn, "[" + ",".join(parts) + "]"
    pairs = list(values.items())
    if draw(st.integers(0, 4)) == 0:
        pairs = [p for p in pairs if draw(st.booleans())]
    return vsn, "{" + ",".join(f"{lit(k)}:{v}" for k, v in pairs) + "}"


@st.composite
def user_broadcast_pushes(draw: st.DrawFn) -> bytes:
    """A binary kind 3 frame (a client's broadcast, vsn 2.0.0), valid or mutated."""
    strings = [draw(short_texts).encode() for _ in range(4)]
    meta = draw(st.sampled_from([b"", b"{}", b'{"a":1}', b"[", b"\xff"]))
    encoding = draw(st.sampled_from([0, 1, 1, 2, 255]))
    body = (
        draw(st.binary(max_size=64))
        if encoding != 1
        else draw(json_trees).encode("utf-8", "surrogatepass")
    )
    parts = [*strings, meta]
    sizes = [len(p) for p in parts]
    for _ in range(draw(st.integers(0, 2))):
        sizes[draw(st.integers(0, 4))] = draw(st.integers(0, 255))
    frame = bytearray([draw(st.sampled_from([3, 3, 3, 4, 0])), *sizes, encoding])
    frame += b"".join(parts) + body
    if draw(st.integers(0, 3)) == 0:
        frame = frame[: draw(st.integers(0, len(frame)))]
    if frame and draw(st.integers(0, 3)) == 0:
        frame[draw(st.integers(0, len(frame) - 1))] = draw(st.integers(0, 255))
    return bytes(frame)


@fuzz
@given(st.binary(max_size=512), st.sampled_from(VERSIONS), st.booleans())
def test_phoenix_decode_of_arbitrary_bytes(frame: bytes, vsn: str, binary: bool) -> None:
    parse_phoenix(frame, vsn, binary=binary)


@fuzz
@given(json_values, st.sampled_from(VERSIONS))
def test_phoenix_decode_of_arbitrary_json(frame: str, vsn: str) -> None:
    parse_phoenix(frame.encode("utf-8", "surrogatepass"), vsn, binary=False)


@fuzz
@given(phoenix_frames())
@example(
    (
        VSN_1,
        '{"topic":"realtime:a","event":"phx_join","payload":{"config":{"postgres_changes":[{"event":"ß"}]}}}',
    )
)
@example((VSN_2, '[null,true,"realtime:a","x",{}]'))  # a boolean ref
def test_phoenix_decode_of_near_valid_frames(case: tuple[str, str]) -> None:
    vsn, frame = case
    parse_phoenix(frame.encode("utf-8", "surrogatepass"), vsn, binary=False)


@fuzz
@given(user_broadcast_pushes())
def test_phoenix_decode_of_near_valid_binary_frames(frame: bytes) -> None:
    parse_phoenix(frame, VSN_2, binary=True)


@fuzz
@given(join_payloads() | json_values)
def test_phoenix_join_payloads(text: str) -> None:
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        return
    parse_phoenix_join(payload)


@fuzz
@given(
    st.sampled_from(VERSIONS),
    topics,
    events,
    json_plain.filter(lambda v: v is not None),
    refs.filter(lambda r: not isinstance(r, int) or r < 2**63),
    refs.filter(lambda r: not isinstance(r, int) or r < 2**63),
)
def test_phoenix_messages_round_trip(
    vsn: str, topic: str, event: str, payload: Any, ref: Any, join_ref: Any
) -> None:
    message = Message(topic, event, payload, ref, join_ref)
    decoded = parse_phoenix(encode(message, vsn), vsn, binary=False)
    # Version 1.0.0 frames from the server carry no join_ref.
    assert decoded == (message if vsn == VSN_2 else attrs.evolve(message, join_ref=None))


# -- cursor tokens --------------------------------------------------------------------------

cursors = st.builds(
    Cursor,
    st.dictionaries(texts, positions, max_size=4),
    st.none() | st.integers(0, 2**64 - 1),
)


@st.composite
def cursor_bodies(draw: st.DrawFn) -> str:
    """A cursor's JSON body, valid or with parts replaced by any JSON."""
    entries = [
        (
            lit(draw(texts)),
            lit([p.offset, p.epoch]) if draw(st.integers(0, 3)) else draw(json_values),
        )
        for p in draw(st.lists(positions, max_size=3))
    ]
    body = [("p", "{" + ",".join(f"{k}:{v}" for k, v in entries) + "}")]
    if draw(st.booleans()):
        body.append(("s", draw(numbers | json_trees)))
    if draw(st.integers(0, 3)) == 0:
        body.append((draw(st.sampled_from(["p", "s", "x"])), draw(json_values)))
    return obj(body)


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode("utf-8", "surrogatepass")).rstrip(b"=").decode()


@st.composite
def mutated_tokens(draw: st.DrawFn) -> str:
    token = draw(cursors).encode()
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(token)))
        how = draw(st.sampled_from(["replace", "insert", "delete", "cut"]))
        char = draw(st.sampled_from("A_-=+/ \n.é\x00") | st.characters())
        if how == "replace":
            token = token[:i] + char + token[i + 1 :]
        elif how == "insert":
            token = token[:i] + char + token[i:]
        elif how == "delete":
            token = token[:i] + token[i + 1 :]
        else:
            token = token[:i]
    return token


@fuzz
@given(
    st.text(max_size=200)
    | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=", max_size=200)
)
def test_cursor_decode_of_arbitrary_text(token: str) -> None:
    parse_cursor(token)


@fuzz
@given(mutated_tokens())
def test_cursor_decode_of_mutated_tokens(token: str) -> None:
    parse_cursor(token)


@fuzz
@given(cursor_bodies() | json_values)
def test_cursor_decode_of_any_json_body(body: str) -> None:
    parse_cursor(_token(body))


@fuzz
@given(cursors)
def test_cursors_round_trip(cursor: Cursor) -> None:
    assert parse_cursor(cursor.encode()) == cursor


def test_cursors_near_the_length_limit() -> None:
    near = Cursor({"c" * 12000: StreamPosition(1, "e")}).encode()
    assert len(near) < 16 * 1024
    assert decode_cursor(near).positions["c" * 12000] == StreamPosition(1, "e")
    assert parse_cursor(near + "A" * (16 * 1024 - len(near) + 1)) is None


# -- the config loader ----------------------------------------------------------------------

toml_scalars = (
    st.text(max_size=12)
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.booleans()
    | st.datetimes()
    | st.dates()
    | st.times()
)
toml_values = st.recursive(
    toml_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
SERVER_KEYS = [
    "host",
    "port",
    "transports",
    "drain_timeout",
    "request_timeout",
    "cors_origins",
    "api_keys",
    "max_body_bytes",
]
HUB_KEYS = [f.name for f in attrs.fields(HubConfig)]
HISTORY_KEYS = ["dir", "fsync_interval", "segment_bytes"]
PLAUSIBLE = {
    "host": st.sampled_from(["127.0.0.1", "::1", ""]),
    "port": st.integers(-1, 70000),
    "transports": st.lists(st.sampled_from(["websocket", "sse", "longpoll"])),
    "cors_origins": st.lists(st.sampled_from(["*", "https://a.example", ""]), max_size=2),
    "api_keys": st.lists(st.sampled_from(["k", ""]), max_size=2),
    "slow_consumer_policy": st.sampled_from(["disconnect", "conflate", "drop_oldest", "x"]),
    "channel_policies": st.dictionaries(
        st.sampled_from(["a:*", "a b", "t:>", ""]),
        st.sampled_from(["disconnect", "conflate", "x"]),
        max_size=2,
    ),
    "record_policies": st.dictionaries(
        st.sampled_from(["r:*", "bad pattern"]), st.sampled_from(["lww", "merge", ""]), max_size=2
    ),
    "dir": st.sampled_from(["/tmp/pyrt-history", ""]),
    "segment_bytes": st.integers(0, 2**40),
}
"""Values of the right type (sometimes out of range) for some keys; the rest get plausible
numbers, and any key may get any TOML value."""
numbers_for_settings = (
    st.integers(-5, 10**6)
    | st.floats(-5, 1e6)
    | st.sampled_from([float("nan"), float("inf"), float("-inf"), 0, 0.0])
)


@st.composite
def config_tables(draw: st.DrawFn, names: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)):
        strategy = PLAUSIBLE.get(name, numbers_for_settings | st.booleans())
        table[name] = draw(strategy if draw(st.integers(0, 4)) else toml_values)
    if draw(st.integers(0, 5)) == 0:
        table[draw(st.text(min_size=1, max_size=8))] = draw(toml_values)
    return table


@st.composite
def config_documents(draw: st.DrawFn) -> dict[str, Any]:
    """A pyrt.toml as a dict: plausible sections and keys with random values."""
    sections: dict[str, Callable[[], Any]] = {
        "server": lambda: draw(config_tables(SERVER_KEYS)),
        "hub": lambda: draw(config_tables(HUB_KEYS)),
        "history": lambda: draw(config_tables(HISTORY_KEYS)),
        "transports": lambda: draw(
            st.dictionaries(
                st.sampled_from(["longpoll", "sse"]),
                st.dictionaries(st.text(max_size=6), toml_values, max_size=2) | toml_values,
                max_size=2,
            )
        ),
        "sources": lambda: draw(
            st.dictionaries(
                st.sampled_from(["notify", "wal"]),
                st.dictionaries(st.text(max_size=6), toml_values, max_size=2) | toml_values,
                max_size=2,
            )
        ),
    }
    doc: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(sections)), max_size=5, unique=True)):
        doc[name] = sections[name]() if draw(st.integers(0, 5)) else draw(toml_values)
    if draw(st.integers(0, 8)) == 0:
        doc[draw(st.text(min_size=1, max_size=8))] = draw(toml_values)
    return doc


@fuzz
@given(config_documents())
@example({"server": 1})
@example({"server": [["port", 1]]})
@example({"hub": "x"})
@example({"transports": 1})
@example({"server": {"request_timeout": "soon"}})
@example({"server": {"drain_timeout": -1}})
@example({"server": {"host": [1]}})
@example({"hub": {"mutation_ttl": float("nan")}})
def test_config_documents(document: dict[str, Any]) -> None:
    parse_config(tomli_w.dumps(document))


@fuzz
@given(st.binary(max_size=256) | st.text(max_size=256).map(str.encode))
@example(b'[server]\nhost = "\xff"\n')  # not UTF-8
@example(b"a = " + b"[" * 5000 + b"]" * 5000)  # deeper than Python's stack
@example(b"a = " + b"{b=" * 5000 + b"1" + b"}" * 5000)
def test_config_of_arbitrary_bytes(text: bytes) -> None:
    parse_config(text)


@fuzz
@given(
    config_tables(HUB_KEYS)
    | st.dictionaries(st.sampled_from(HUB_KEYS), toml_values | json_plain, max_size=4)
)
def test_hub_config_tables(table: dict[str, Any]) -> None:
    parse_hub_config(table)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # Each of these raised something other than ConfigError (or was accepted) before.
        (b'[server]\nhost = "\xff"\n', "not UTF-8 (byte 17)"),
        (b"a = " + b"[" * 5000 + b"]" * 5000, "not valid TOML: nested too deeply"),
        (b"server = 1", "server: expected a table, [server]"),
        (b'server = [["port", 1]]', "server: expected a table, [server]"),
        (b'hub = "x"', "hub: expected a table, [hub]"),
        (b"transports = 1", "transports: expected a table, [transports]"),
        (b"sources = []", "sources: expected a table, [sources]"),
        (b"[server]\nhost = [1]", "server.host: expected a string, got [1]"),
        (b"[server]\nrequest_timeout = 'soon'", "server.request_timeout: expected a positive"),
        (b"[server]\nrequest_timeout = [1]", "server.request_timeout: expected a positive"),
        (b"[server]\ndrain_timeout = -1", "server.drain_timeout: expected a positive"),
        (b"[server]\ndrain_timeout = nan", "server.drain_timeout: expected a positive"),
        (b"[server]\ndrain_timeout = true", "server.drain_timeout: expected a positive"),
        (b"[hub]\nmutation_ttl = nan", "hub.mutation_ttl: expected a number, got nan"),
        (b"[hub]\nhistory_age = nan", "hub.history_age: expected a number, got nan"),
    ],
)
def test_config_errors_found_by_fuzzing(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_bytes(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        node_config(path)


def test_config_seconds_take_integers_and_infinity(tmp_path: Path) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text("[server]\ndrain_timeout = 2\nrequest_timeout = inf")
    config = node_config(path)
    assert (config.drain_timeout, config.request_timeout) == (2.0, math.inf)


@fuzz
@given(
    timestamps.map(Timestamp.encode)
    | st.from_regex(r"\d{13}\.\d{5}\.[a-z:]{1,3}", fullmatch=True)
    | texts
)
@example("١٧١٨٠٠٠٠٠٠٠٠٠.00003.n1")  # Arabic-Indic digits were read as 1718000000000
@example("1718000000000.０００03.n1")  # fullwidth digits
def test_timestamps_decode_only_from_their_own_text(text: str) -> None:
    try:
        stamp = Timestamp.decode(text)
    except ValueError:
        return
    assert stamp.encode() == text


# -- the Postgres frontend (bytes from a server) ---------------------------------------------

# Message types a server sends (and some it never does), with bodies of any bytes or of the
# shapes the frontend reads: an authentication code, counts and lengths that lie.
_PG_KINDS = list(b"RSKZTDCIENAGHWcdsnt123v")
_AUTH_CODES = [0, 2, 3, 5, 7, 10, 11, 12, -1, 99]


@st.composite
def _backend_message(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(_PG_KINDS))
    if kind == ord("R") and draw(st.booleans()):
        body = draw(st.sampled_from(_AUTH_CODES)).to_bytes(4, "big", signed=True)
        body += draw(st.binary(max_size=40))
    elif kind in b"TD" and draw(st.booleans()):
        body = draw(st.integers(-(2**15), 2**15 - 1)).to_bytes(2, "big", signed=True)
        body += draw(st.binary(max_size=60))
    else:
        body = draw(st.binary(max_size=60))
    length = len(body) + 4
    if draw(st.integers(0, 20)) == 0:
        length = draw(st.integers(-(2**31), 2**31 - 1))  # a length that lies
    return bytes([kind]) + length.to_bytes(4, "big", signed=True) + body


@fuzz
@given(
    messages=st.lists(_backend_message(), max_size=12),
    cuts=st.lists(st.integers(1, 64), max_size=12),
    password=st.sampled_from([None, "pw"]),
)
def test_the_postgres_frontend_takes_any_server_bytes(
    messages: list[bytes], cuts: list[int], password: str | None
) -> None:
    """Whatever a server (or whatever answers on its port) sends, in whatever pieces, the
    sans-IO frontend either reads it or refuses it with one of its documented errors
    (`PgProtocolError`, `PgAuthError`), never another exception, and its buffer stays
    bounded by the message size limit."""
    frontend = Frontend("user", password, {"database": "db"}, max_message_bytes=4096)
    frontend.start()
    data = b"".join(messages)
    chunks, at = [], 0
    for cut in cuts:
        chunks.append(data[at : at + cut])
        at += cut
    chunks.append(data[at:])
    try:
        for chunk in chunks:
            frontend.receive_data(chunk)
            while frontend.next_event() is not NEED_DATA:
                frontend.data_to_send()
    except (PgProtocolError, PgAuthError):
        return
    assert frontend.buffered <= 4096 + 5
