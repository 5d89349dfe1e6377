"""The front-door fuzzer: hypothesis writes what any client could send to `pyrt serve` over
real sockets on 127.0.0.1, and after every example the node must still be alive, must not
have written a traceback, and must carry a well-behaved client's publication to a
subscriber (`ServedNode.check`).

What it sends: HTTP requests (methods, targets, headers, Content-Length and
Transfer-Encoding together, oversized and malformed heads, bodies plain and chunked with
good and bad chunk-size lines, pipelined, cut off anywhere); WebSocket sessions on the
native endpoint and the Supabase one (vsn 1.0.0 and 2.0.0) of frames valid or not (control
frames, fragments, unmasked, bad opcodes, RSV bits), ended by a close, a FIN or a TCP reset
at any point; native commands and Phoenix messages with JSON up to 300 levels deep, over
WebSocket, over `POST /connection/send` of SSE and long-poll sessions, and the REST API.

A bounded run is part of the test suite. The long run is one command (docs/fuzzing.md):

    PYRT_FUZZ_EXAMPLES=10000 python3 -m pytest tests/fuzz/test_fuzz_front_door.py -q
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import struct
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import jwt
import pytest
from frontdoor import (
    API_KEY,
    JWT_SECRET,
    RawJson,
    ServedNode,
    SseStream,
    connect,
    drain,
    dumps,
    http_request,
    read_head,
    reset,
    send_quietly,
    upgrade_request,
    ws_frame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

T = TypeVar("T")

EXAMPLES = int(os.environ.get("PYRT_FUZZ_EXAMPLES", "0"))
"""Examples per test for a long run; 0: each test's own bounded count (the normal run)."""

pytestmark = [
    # A long run takes as long as it takes: no per-test timeout then.
    pytest.mark.timeout(0 if EXAMPLES else 900),
    # Inputs are up to 80 KB; hypothesis warns when it prints one (a failure's shrunk
    # input is small: the warning would only hide it).
    pytest.mark.filterwarnings("ignore:Generating overly large repr"),
]


def fuzz_settings(bounded: int) -> settings:
    """`bounded` examples in the normal run, chosen so that the module takes about a minute
    on a 2-core machine; new inputs every run (not derandomized), no deadline (a round trip
    through a subprocess is not a unit of work to time)."""
    return settings(
        max_examples=EXAMPLES or bounded,
        deadline=None,
        derandomize=False,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
        ],
    )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedNode]:
    served = ServedNode(tmp_path_factory.mktemp("front-door"))
    served.start()
    try:
        yield served
    finally:
        running = served.returncode is None
        code = served.stop()
        if running:
            # It survived the fuzzing: it must also stop as it should on Ctrl-C.
            assert code == 0, served.stderr()


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`good` five times out of six, else `bad` (shrinks towards `good`)."""
    return st.integers(0, 5).flatmap(lambda roll: bad if roll == 5 else good)


# -- JSON of random depth, size and types ------------------------------------------------------

ODD_ATOMS = (
    "-0",
    "1.5e-400",
    "18446744073709551616",
    "-9223372036854775809",
    "123456789012345678901234567890.5",
    '"\\u0000"',
    '"\\ufeff"',
)
"""JSON a serializer would not write: out-of-range numbers, escapes of odd characters."""
BAD_ATOMS = ("1e400", "-1e400", '"\\ud800"', '"\\udc00x"')
"""Not JSON to orjson (the frame is refused): infinite numbers and lone surrogates."""

atoms = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=16),
    mostly(st.sampled_from(ODD_ATOMS), st.sampled_from(BAD_ATOMS)).map(RawJson),
)
big_strings = st.integers(0, 80 * 1024).map(lambda n: "x" * n)
"""Up to past `max_payload_bytes` (64 KiB), below `max_frame_bytes` (256 KiB)."""
shallow_json = st.recursive(
    st.one_of(atoms, big_strings),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=8,
)


@st.composite
def nested_json(draw: st.DrawFn) -> Any:
    """A shallow value wrapped in up to 300 arrays and objects (orjson's encoder gives up at
    255 levels, its parser at 1024): any depth, and often one near or past 255."""
    value = draw(shallow_json)
    depth = draw(st.one_of(st.integers(0, 300), st.integers(240, 300)))
    shape = draw(st.sampled_from(["array", "object", "both"]))
    key = draw(st.text(max_size=3))
    for level in range(depth):
        wrap_in_array = shape == "array" or (shape == "both" and level % 2 == 0)
        value = [value] if wrap_in_array else {key: value}
    return value


json_values = st.one_of(shallow_json, nested_json())
json_objects = st.one_of(
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
    st.builds(lambda key, value: {key: value}, st.text(max_size=8), nested_json()),
)

# -- native commands -------------------------------------------------------------------------

CHANNELS = ("room:1", "room:2", "rec:1")
"""The channels sessions join and most commands name, so that joins, publications, presence
and records meet (`rec:>` holds records)."""
channels = mostly(
    st.sampled_from(CHANNELS),
    st.one_of(
        st.sampled_from(["pg:public:orders", "room:*", "room:>"]),
        st.text(max_size=12),
        json_values,
    ),
)
request_ids = mostly(st.integers(0, 1000), st.one_of(st.text(max_size=70), json_values))
flags = mostly(st.booleans(), json_values)
short_strings = mostly(st.text(max_size=12), json_values)
CLAIMED = ["room:1", "rec:1", ">", "pg:public:orders", "bad channel"]
"""Channels a fuzzed token's `channels` claim names (joined server-side if it gets in)."""
claim_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.text(max_size=8),
    st.lists(st.text(max_size=8), max_size=3),
    st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2),
)
"""What a signed token's claims hold (plain JSON: pyjwt encodes them, not `dumps`)."""
tokens = mostly(
    # Signed with the node's secret, so they pass the signature: what their claims say
    # (a past `exp`, odd `channels` to join server-side, odd roles) is what is fuzzed.
    st.builds(
        lambda sub, claims: jwt.encode({"sub": sub, **claims}, JWT_SECRET, algorithm="HS256"),
        st.text(min_size=1, max_size=12),
        st.fixed_dictionaries(
            {},
            optional={
                "exp": st.integers(0, 2**40),
                "nbf": st.integers(0, 2**40),
                "channels": mostly(st.lists(st.sampled_from(CLAIMED)), claim_values),
                "role": claim_values,
                "jti": claim_values,
                "tenant": claim_values,
            },
        ),
    ),
    st.one_of(st.text(max_size=40), json_values),
)
names = mostly(st.text(min_size=1, max_size=12), json_values)


def command(
    name: Any,
    required: dict[str, st.SearchStrategy[Any]] | None = None,
    **optional: st.SearchStrategy[Any],
) -> st.SearchStrategy[dict[str, Any]]:
    """`{"cmd": name, **required}`, plus `id` and each of `optional` or not."""
    cmd = name if isinstance(name, st.SearchStrategy) else st.just(name)
    return st.fixed_dictionaries(
        {"cmd": cmd, **(required or {})}, optional={"id": request_ids, **optional}
    )


row_changes = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "event": mostly(st.sampled_from(["INSERT", "UPDATE", "DELETE", "*"]), json_values),
            "schema": mostly(st.sampled_from(["public", "*"]), json_values),
            "table": mostly(st.sampled_from(["orders", "*"]), json_values),
            "filter": mostly(st.sampled_from(["status=eq.paid", "total=gt.1", ""]), json_values),
            "extra": json_values,
        },
    ),
    max_size=3,
)
positions = mostly(
    st.fixed_dictionaries({"offset": st.integers(-1, 2**64), "epoch": st.text(max_size=16)}),
    json_values,
)
native_commands = st.one_of(
    command(
        "join",
        {"channel": channels},
        since=positions,
        presence=flags,
        changes=mostly(row_changes, json_values),
        token=tokens,
    ),
    command("connect", {"token": tokens}),
    command("refresh", {"token": tokens}),
    command("leave", {"channel": channels}),
    command("publish", {"channel": channels, "data": json_values}, ack=flags, key=short_strings),
    command("publish", {"channel": channels, "data": json_values, "self": flags}, ack=flags),
    command(
        "mutate",
        {
            "channel": mostly(st.sampled_from(["rec:1", "rec:2"]), channels),
            "key": mostly(st.text(min_size=1, max_size=8), json_values),
            "op": mostly(st.sampled_from(["set", "patch", "delete"]), json_values),
            "value": mostly(json_objects, json_values),
        },
        base=st.one_of(st.none(), short_strings),
        hlc=st.one_of(st.none(), st.just("1718000000120.00000.c9f1"), short_strings),
        origin=short_strings,
        seq=mostly(st.integers(1, 10), json_values),
    ),
    command(
        "track",
        {"channel": channels, "meta": mostly(json_objects, json_values)},
        key=short_strings,
        ref=short_strings,
    ),
    command("untrack", {"channel": channels}, key=short_strings, ref=short_strings),
    command("presence", {"channel": channels}),
    command("ping"),
    command(json_values, channel=channels, data=json_values),
)
not_commands = st.one_of(json_values.map(dumps), st.binary(max_size=64))
"""Frames that are no command: the hub closes the connection (4000), and what the client
sends after that meets a connection that is closing."""


def joins(names: st.SearchStrategy[str]) -> st.SearchStrategy[list[bytes]]:
    """The frames a session starts with: joins of a few channels, some with presence (so
    that what follows has somewhere to go, and someone to hear it)."""
    join = st.builds(
        lambda name, presence: dumps(
            {"cmd": "join", "id": f"join:{name}", "channel": name, "presence": presence}
        ),
        names,
        st.booleans(),
    )
    return st.lists(join, min_size=1, max_size=3)


# -- Phoenix messages (Supabase) ---------------------------------------------------------------

TOPICS = ("realtime:room:1", "realtime:room:2", "realtime:pg:x")
"""The topics sessions join and most messages name (`realtime:room:1` is the hub's `room:1`,
which native clients share)."""
topics = mostly(
    st.sampled_from(TOPICS),
    st.one_of(
        st.sampled_from(["realtime:", "phoenix"]),
        st.text(max_size=12).map("realtime:".__add__),
        st.text(max_size=12),
        json_values,
    ),
)
refs = mostly(st.integers(0, 99).map(str), st.one_of(st.integers(), json_values))

phoenix_join_payloads = st.fixed_dictionaries(
    {},
    optional={
        "config": mostly(
            st.fixed_dictionaries(
                {},
                optional={
                    "broadcast": st.fixed_dictionaries(
                        {}, optional={"ack": flags, "self": flags, "replay": json_values}
                    ),
                    "presence": st.fixed_dictionaries(
                        {}, optional={"key": short_strings, "enabled": flags}
                    ),
                    "postgres_changes": mostly(row_changes, json_values),
                    "pyrt": mostly(
                        st.fixed_dictionaries({}, optional={"since": positions}), json_values
                    ),
                    "private": flags,
                },
            ),
            json_values,
        ),
        "access_token": short_strings,
    },
)
phoenix_payloads = {
    # The messages that carry data first: hypothesis draws earlier choices more often.
    "broadcast": st.fixed_dictionaries(
        {"type": st.just("broadcast"), "event": names, "payload": json_values}
    ),
    "presence": st.fixed_dictionaries(
        {
            "type": st.just("presence"),
            "event": mostly(st.sampled_from(["track", "untrack"]), json_values),
            "payload": mostly(json_objects, json_values),
        }
    ),
    "phx_join": phoenix_join_payloads,
    "heartbeat": st.just({}),
    "access_token": st.fixed_dictionaries({}, optional={"access_token": short_strings}),
    "phx_leave": st.just({}),
}


@st.composite
def phoenix_messages(draw: st.DrawFn, vsn: str, topic: st.SearchStrategy[Any] = topics) -> bytes:
    event = draw(
        mostly(
            st.sampled_from(list(phoenix_payloads)), st.one_of(st.text(max_size=12), json_values)
        )
    )
    good = phoenix_payloads.get(event) if isinstance(event, str) else None
    payload = draw(json_values if good is None else mostly(good, json_values))
    the_topic = "phoenix" if event == "heartbeat" and draw(st.booleans()) else draw(topic)
    ref, join_ref = draw(refs), draw(st.one_of(st.none(), refs))
    if vsn == "2.0.0":
        return dumps([join_ref, ref, the_topic, event, payload])
    message = {"topic": the_topic, "event": event, "payload": payload, "ref": ref}
    if join_ref is not None:
        message["join_ref"] = join_ref
    return dumps(message)


@st.composite
def user_broadcast_pushes(draw: st.DrawFn) -> bytes:
    """vsn 2.0.0 binary frames: kind 3 (a user broadcast), its one-byte lengths true or not."""
    strings = [
        draw(st.sampled_from(["1", ""])).encode(),
        draw(st.sampled_from(["2", ""])).encode(),
        draw(st.sampled_from(["realtime:room:1", "realtime:room:2"])).encode(),
        draw(st.text(max_size=8)).encode(),
        draw(st.one_of(st.just(b""), json_values.map(dumps))),
    ]
    sizes = [min(len(s), 255) for s in strings]
    sizes = draw(mostly(st.just(sizes), st.lists(st.integers(0, 255), min_size=5, max_size=5)))
    kind = draw(mostly(st.just(3), st.integers(0, 255)))
    encoding = draw(mostly(st.just(1), st.integers(0, 255)))
    body = draw(st.one_of(json_values.map(dumps), st.binary(max_size=32)))
    return bytes([kind, *sizes, encoding]) + b"".join(s[:255] for s in strings) + body


def phoenix_join(vsn: str, topic: str) -> st.SearchStrategy[bytes]:
    """A join such as the clients send, with presence or not, acks or not."""

    def join(key: str, presence: bool, ack: bool) -> bytes:
        config = {
            "broadcast": {"ack": ack, "self": True},
            "presence": {"key": key, "enabled": presence},
        }
        return dumps(_phoenix(vsn, topic, "phx_join", {"config": config}, ref="1", join_ref="1"))

    return st.builds(join, st.sampled_from(["", "ann"]), st.booleans(), st.booleans())


def _phoenix(vsn: str, topic: Any, event: Any, payload: Any, ref: Any, join_ref: Any) -> Any:
    if vsn == "2.0.0":
        return [join_ref, ref, topic, event, payload]
    return {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": join_ref}


# -- WebSocket sessions ------------------------------------------------------------------------

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


@attrs.frozen(slots=True)
class Frame:
    """One WebSocket frame as the client sends it, valid or not (`frontdoor.ws_frame`)."""

    opcode: int
    payload: bytes
    fin: bool = True
    rsv: int = 0
    mask: bytes | None = b"\x37\xfa\x21\x3d"
    wide: int = 0

    def wire(self) -> bytes:
        return ws_frame(
            self.opcode, self.payload, fin=self.fin, rsv=self.rsv, mask=self.mask, wide=self.wide
        )


@attrs.frozen(slots=True)
class Read:
    """Read what the server sent within `seconds` (a pause, and the socket drained)."""

    seconds: float


Action = Frame | Read

masks = mostly(st.binary(min_size=4, max_size=4), st.none())
close_payloads = st.one_of(
    st.just(b""),
    st.builds(
        lambda code, reason: struct.pack("!H", code) + reason,
        st.one_of(
            st.sampled_from([1000, 1001, 1002, 1005, 1006, 1011, 3000, 4000]), st.integers(0, 65535)
        ),
        st.one_of(st.text(max_size=20).map(str.encode), st.binary(max_size=20)),
    ),
    st.binary(max_size=130),
)
control_frames = st.builds(
    Frame,
    opcode=st.sampled_from([PING, CLOSE, PONG]),  # pings first: what clients send most
    payload=st.binary(max_size=130),
    fin=mostly(st.just(True), st.just(False)),
    mask=masks,
) | st.builds(Frame, opcode=st.just(CLOSE), payload=close_payloads, mask=masks)
odd_frames = st.builds(
    Frame,
    opcode=st.integers(0, 15),
    payload=st.binary(max_size=64),
    fin=st.booleans(),
    rsv=st.integers(0, 7),
    mask=masks,
    wide=st.integers(0, 2),
)


@st.composite
def messages(
    draw: st.DrawFn, payloads: st.SearchStrategy[bytes], rude: bool, opcode: int = TEXT
) -> list[Action]:
    """One data message in one frame or several fragments, masked as RFC 6455 says. When
    `rude`: maybe unmasked, and maybe with a control frame between two fragments."""
    payload = draw(payloads)
    cuts = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
    pieces = [payload[a:b] for a, b in zip([0, *cuts], [*cuts, len(payload)], strict=True)]
    mask = draw(masks if rude else st.binary(min_size=4, max_size=4))
    frames: list[Action] = []
    for index, piece in enumerate(pieces):
        if rude and index and draw(st.integers(0, 4)) == 0:
            frames.append(draw(control_frames))
        last = index == len(pieces) - 1
        frames.append(Frame(opcode if index == 0 else CONTINUATION, piece, fin=last, mask=mask))
    return frames


ENDINGS = ("reset", "reset", "close", "close_handshake", "read_then_reset")
"""How a session ends; resets (SO_LINGER 0) weigh double: after a control frame, a reset is
what ended the node (the server's reply to a peer that is gone)."""


@attrs.frozen(slots=True)
class WsSession:
    target: str
    pipelined: bool
    """The first frames go with the upgrade request, before its answer (`exchange.trailing`)."""
    actions: tuple[Action, ...]
    ending: str


def ws_sessions(
    targets: st.SearchStrategy[str],
    actions: Callable[[str, bool], st.SearchStrategy[list[Action]]],
    *,
    rude: bool,
) -> st.SearchStrategy[WsSession]:
    """Sessions of `actions(target, rude)`. Rude ones may pipeline frames with the upgrade and
    end in any way; polite ones wait for the upgrade and end with the closing handshake, so
    that what they find is about their messages."""

    @st.composite
    def session(draw: st.DrawFn) -> WsSession:
        target = draw(targets)
        steps = tuple(draw(actions(target, rude)))
        if not rude:
            return WsSession(target, False, steps, "close_handshake")
        if draw(st.booleans()):
            # Paced, as a client that waits a moment after each frame: the server acts on
            # each (answers, closes) before the next arrives.
            steps = tuple(a for step in steps for a in (step, Read(0.01)))
        return WsSession(target, draw(st.booleans()), steps, draw(st.sampled_from(ENDINGS)))

    return session()


def rude_steps(message: st.SearchStrategy[list[Action]]) -> list[st.SearchStrategy[list[Action]]]:
    """Besides messages: control frames, frames of any kind, and a message followed by a
    pause, so that what the server does about it (answer, close) happens before what
    follows, such as a ping (a client's keepalive crossing the server's close)."""
    return [
        st.lists(control_frames, min_size=1, max_size=2),
        st.lists(odd_frames, min_size=1, max_size=2),
        st.builds(
            lambda m, s, after: [*m, Read(s), *after],
            message,
            st.sampled_from([0.01, 0.03, 0.0]),
            st.lists(control_frames, max_size=1),
        ),
    ]


def native_actions(_target: str, rude: bool) -> st.SearchStrategy[list[Action]]:
    """Joins of a few channels, then commands (and, when rude, any other frames)."""
    commands = native_commands.map(dumps)
    message = messages(st.one_of(commands, not_commands) if rude else commands, rude)
    steps = st.one_of(message, *(rude_steps(message) if rude else []))
    return st.builds(
        lambda setup, rest: (
            [Frame(TEXT, frame) for frame in setup] + [a for step in rest for a in step]
        ),
        joins(st.sampled_from(CHANNELS)),
        st.lists(steps, max_size=6),
    )


def supabase_actions(target: str, rude: bool) -> st.SearchStrategy[list[Action]]:
    """Joins of a few topics, then Phoenix messages, mostly on those topics (and, when rude,
    any other frames)."""
    vsn = "2.0.0" if "vsn=2.0.0" in target else "1.0.0"

    @st.composite
    def actions(draw: st.DrawFn) -> list[Action]:
        joined = draw(st.lists(st.sampled_from(TOPICS), min_size=1, max_size=3, unique=True))
        setup = [Frame(TEXT, draw(phoenix_join(vsn, topic))) for topic in joined]
        frames = phoenix_messages(vsn, mostly(st.sampled_from(joined), topics))
        if rude:
            frames = st.one_of(frames, not_commands)
        message = messages(frames, rude)
        polite = [message, message]
        if vsn == "2.0.0":
            polite.append(messages(user_broadcast_pushes(), rude, BINARY))
        steps = st.one_of(*polite, *(rude_steps(message) if rude else []))
        return setup + [a for step in draw(st.lists(steps, max_size=6)) for a in step]

    return actions()


supabase_targets = st.builds(
    lambda path, vsn: f"{path}?vsn={vsn}&apikey={API_KEY}",
    st.sampled_from(["/realtime/v1/websocket", "/socket/websocket"]),
    st.sampled_from(["1.0.0", "2.0.0"]),
)


def run_ws_session(port: int, session: WsSession) -> int:
    """Runs the session; returns the upgrade's status (101, unless the node refused it)."""
    sock = connect(port)
    try:
        frames = [a for a in session.actions if isinstance(a, Frame)]
        head = upgrade_request(session.target)
        if session.pipelined and frames:
            # The upgrade and the first frames in one write: the server finds them after
            # the request head.
            send_quietly(sock, head + frames[0].wire())
            actions = list(session.actions)
            actions.remove(frames[0])
        else:
            send_quietly(sock, head)
            actions = list(session.actions)
        status, _ = read_head(sock)
        if status != 101:
            return status
        for action in actions:
            if isinstance(action, Read):
                drain(sock, action.seconds)
            elif not send_quietly(sock, action.wire()):
                break
        if session.ending == "close":
            sock.close()
        elif session.ending == "close_handshake":
            send_quietly(sock, ws_frame(CLOSE, struct.pack("!H", 1000)))
            drain(sock, 0.5)
            sock.close()
        elif session.ending == "read_then_reset":
            drain(sock, 0.02)
            reset(sock)
        else:
            reset(sock)
    finally:
        sock.close()
    return status


NATIVE_TARGET = st.just("/connection/websocket")


@fuzz_settings(bounded=200)
@given(session=ws_sessions(NATIVE_TARGET, native_actions, rude=False))
def test_native_websocket_commands(node: ServedNode, session: WsSession) -> None:
    node.ensure_running()
    status = run_ws_session(node.port, session)
    node.check()
    assert status == 101, f"upgrade to {session.target} answered {status}"


@fuzz_settings(bounded=200)
@given(session=ws_sessions(NATIVE_TARGET, native_actions, rude=True))
def test_native_websocket_frames(node: ServedNode, session: WsSession) -> None:
    node.ensure_running()
    status = run_ws_session(node.port, session)
    node.check()
    assert status == 101, f"upgrade to {session.target} answered {status}"


@fuzz_settings(bounded=200)
@given(session=ws_sessions(supabase_targets, supabase_actions, rude=False))
def test_supabase_websocket_messages(node: ServedNode, session: WsSession) -> None:
    node.ensure_running()
    status = run_ws_session(node.port, session)
    node.check()
    assert status == 101, f"upgrade to {session.target} answered {status}"


@fuzz_settings(bounded=200)
@given(session=ws_sessions(supabase_targets, supabase_actions, rude=True))
def test_supabase_websocket_frames(node: ServedNode, session: WsSession) -> None:
    node.ensure_running()
    status = run_ws_session(node.port, session)
    node.check()
    assert status == 101, f"upgrade to {session.target} answered {status}"


# -- HTTP requests ---------------------------------------------------------------------------

METHODS = (
    "GET",
    "POST",
    "PUT",
    "DELETE",
    "OPTIONS",
    "HEAD",
    "PATCH",
    "CONNECT",
    "get",
    "G\x00T",
    "",
)
TARGETS = (
    "/",
    "/healthz",
    "/status.json",
    "/metrics",
    "/api/publish",
    "/api/broadcast",
    "/realtime/v1/api/broadcast/room/events/chat",
    "/api/history/room:1?limit=5",
    "/api/presence/room:1",
    "/api/channels",
    "/api/records/rec:1",
    "/api/records/rec:1/k",
    "/connection/send?session=x&token=y",
    "/connection/poll?channel=room:1",
    "/connection/poll/end?session=x&token=y",
    "/connection/sse?channel=room:1",
    "/connection/websocket",
    f"/realtime/v1/websocket?vsn=2.0.0&apikey={API_KEY}",
    "/nope",
    "*",
    "http://127.0.0.1/healthz",
    "/%ff%00/..%2f",
)
VERSIONS = ("HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1x", "")
latin1 = st.text(st.characters(max_codepoint=255), max_size=24)
header_values = {
    "host": st.sampled_from(["127.0.0.1", "", "a b"]),
    "content-length": st.one_of(
        st.integers(0, 300).map(str),
        st.sampled_from(
            ["-1", "abc", "1, 2", " 5", "5 ", "0x10", "99999999999999999999", "+5", ""]
        ),
    ),
    "transfer-encoding": st.sampled_from(
        ["chunked", "gzip, chunked", "chunked, gzip", "identity", "Chunked", "chunked\x0b", "x"]
    ),
    "authorization": st.sampled_from([f"Bearer {API_KEY}", "Bearer wrong", "Basic Zm9v", ""]),
    "x-api-key": st.sampled_from([API_KEY, "wrong"]),
    "content-type": st.sampled_from(["application/json", "application/octet-stream", "text/plain"]),
    "origin": st.sampled_from(["https://app.example.com", "null"]),
    "connection": st.sampled_from(["close", "keep-alive", "upgrade", "Upgrade, close"]),
    "upgrade": st.sampled_from(["websocket", "h2c", "WebSocket"]),
    "sec-websocket-key": st.sampled_from(["dGhlIHNhbXBsZSBub25jZQ==", "short", ""]),
    "sec-websocket-version": st.sampled_from(["13", "8", "x"]),
    "last-event-id": st.sampled_from(["", "garbage", "eyJwIjp7fX0"]),
    "expect": st.just("100-continue"),
}
headers = st.one_of(
    st.sampled_from(sorted(header_values)).flatmap(
        lambda name: st.tuples(st.just(name), header_values[name])
    ),
    st.tuples(latin1, latin1),
    st.tuples(st.just("x-big"), st.integers(0, 70_000).map(lambda n: "a" * n)),
    st.tuples(st.just(" folded"), latin1),
)
BAD_CHUNK_SIZES = (
    "zz",
    "-1",
    "0x5",
    "fffffffffffffffffff",
    " 5",
    "5 ",
    "",
    "+5",
    "1_0",
    "５",
    "5;",
)
body_contents = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    native_commands.map(dumps),
    st.fixed_dictionaries({"channel": st.sampled_from(CHANNELS), "data": json_values}).map(dumps),
)


@st.composite
def chunked_bodies(draw: st.DrawFn, content: bytes) -> bytes:
    """`content` in chunks whose size lines and terminators are right, or not."""
    cuts = sorted(draw(st.lists(st.integers(0, len(content)), max_size=3)))
    pieces = [content[a:b] for a, b in zip([0, *cuts], [*cuts, len(content)], strict=True)]
    out = b""
    for piece in pieces:
        size: str = draw(
            mostly(
                st.sampled_from([f"{len(piece):x}", f"{len(piece):X}", f"{len(piece):x};ext=1"]),
                st.one_of(st.sampled_from(BAD_CHUNK_SIZES), latin1),
            )
        )
        end: str = draw(mostly(st.just("\r\n"), st.sampled_from(["", "\n", "xx\r\n"])))
        out += size.encode("utf-8") + b"\r\n" + piece + end.encode()
    last: str = draw(
        mostly(st.just("0\r\n\r\n"), st.sampled_from(["", "0\r\n", "0\r\nx-trailer: 1\r\n\r\n"]))
    )
    return out + last.encode()


@st.composite
def http_requests(draw: st.DrawFn) -> bytes:
    """One request's bytes: a head (well-formed or not) and a body framed by Content-Length,
    by chunks, by both, or by neither."""
    method = draw(mostly(st.sampled_from(METHODS[:3]), st.sampled_from(METHODS)))
    target = draw(
        mostly(
            st.sampled_from(TARGETS),
            latin1.map(lambda t: "/" + urllib.parse.quote(t, safe="/?=&:%")),
        )
    )
    version = draw(mostly(st.just("HTTP/1.1"), st.sampled_from(VERSIONS)))
    newline: str = draw(mostly(st.just("\r\n"), st.just("\n")))
    head = [f"{method} {target} {version}", "host: 127.0.0.1"]
    head += [f"{name}: {value}" for name, value in draw(st.lists(headers, max_size=5))]
    content: bytes = draw(body_contents)
    framing = draw(st.sampled_from(["length", "length", "chunked", "both", "none"]))
    body = content
    if framing in ("length", "both"):
        head.append(f"content-length: {len(content)}")
    if framing in ("chunked", "both"):
        head.append("transfer-encoding: chunked")
        body = draw(chunked_bodies(content))
    text = newline.join(head) + newline + newline
    return text.encode("latin-1", errors="replace") + body


HTTP_ENDINGS = ("reset", "close", "half_close", "read_then_close")


@fuzz_settings(bounded=400)
@given(
    requests=st.lists(http_requests(), min_size=1, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 2**16)),
    ending=st.sampled_from(HTTP_ENDINGS),
)
def test_http_requests(
    node: ServedNode, requests: list[bytes], cut: int | None, ending: str
) -> None:
    node.ensure_running()
    data = b"".join(requests)
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    sock = connect(node.port)
    try:
        send_quietly(sock, data)
        if ending == "reset":
            reset(sock)
        elif ending == "half_close":
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            drain(sock, 0.1)
        elif ending == "read_then_close":
            drain(sock, 0.1)
    finally:
        sock.close()
    node.check()


# -- commands over SSE and long-poll sessions --------------------------------------------------


@fuzz_settings(bounded=200)
@given(
    transport=st.sampled_from(["sse", "longpoll"]),
    opening=st.lists(
        st.tuples(st.sampled_from(["channel", "presence"]), st.sampled_from(CHANNELS)),
        min_size=1,
        max_size=3,
    ),
    bodies=st.lists(mostly(native_commands.map(dumps), not_commands), min_size=1, max_size=4),
    credentials=mostly(st.just("query"), st.sampled_from(["bearer", "wrong", "none"])),
)
def test_http_session_commands(
    node: ServedNode,
    transport: str,
    opening: list[tuple[str, str]],
    bodies: list[bytes],
    credentials: str,
) -> None:
    """Commands over `POST /connection/send` of a session opened on a few channels, some
    with presence (so that publications and presence changes have somebody to reach)."""
    node.ensure_running()
    query = urllib.parse.urlencode(opening)
    stream: SseStream | None = None
    if transport == "sse":
        stream = SseStream(node.port, f"/connection/sse?{query}")
        session, token = stream.session, stream.token
    else:
        status, raw = http_request(node.port, "GET", f"/connection/poll?{query}")
        assert status == 200, raw
        opened = json.loads(raw)
        session, token = opened["session"], opened["token"]
    try:
        params: dict[str, str] = {"session": session}
        extra: dict[str, str] = {}
        if credentials == "query":
            params["token"] = token
        elif credentials == "bearer":
            extra["authorization"] = f"Bearer {token}"
        elif credentials == "wrong":
            params["token"] = token[::-1]
        target = "/connection/send?" + urllib.parse.urlencode(params)
        for body in bodies:
            with contextlib.suppress(OSError, http.client.HTTPException):
                http_request(node.port, "POST", target, body, extra)
        if transport == "longpoll":
            end = "/connection/poll/end?" + urllib.parse.urlencode(
                {"session": session, "token": token}
            )
            with contextlib.suppress(OSError, http.client.HTTPException):
                http_request(node.port, "POST", end)
    finally:
        if stream is not None:
            stream.close()
    node.check()


# -- the REST API ----------------------------------------------------------------------------


@st.composite
def rest_requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    kind = draw(st.sampled_from(["publish", "broadcast", "broadcast_event", "record", "read"]))
    if kind == "publish":
        where = st.one_of(
            st.fixed_dictionaries({"channel": channels}),
            st.fixed_dictionaries(
                {"channels": mostly(st.lists(channels, max_size=3), json_values)}
            ),
        )
        parts = [
            draw(st.fixed_dictionaries({"data": json_values}, optional={"key": short_strings})),
            draw(mostly(where, st.fixed_dictionaries({}, optional={"channel": channels}))),
            draw(mostly(st.just({}), st.fixed_dictionaries({"extra": json_values}))),
        ]
        return "POST", "/api/publish", dumps({k: v for part in parts for k, v in part.items()})
    if kind == "broadcast":
        message = st.fixed_dictionaries(
            {
                "topic": mostly(st.sampled_from(["room:1", "room:2"]), json_values),
                "event": short_strings,
            },
            optional={"payload": json_values, "private": flags},
        )
        path = draw(st.sampled_from(["/api/broadcast", "/realtime/v1/api/broadcast"]))
        body = draw(
            mostly(st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}), json_values)
        )
        return "POST", path, dumps(body)
    if kind == "broadcast_event":
        topic = urllib.parse.quote(
            draw(st.sampled_from(["room:1", "room:2"]) | st.text(max_size=8)), safe=""
        )
        event = urllib.parse.quote(draw(st.text(min_size=1, max_size=8)), safe="")
        return "POST", f"/api/broadcast/{topic}/events/{event}", dumps(draw(json_values))
    if kind == "record":
        key = urllib.parse.quote(draw(st.text(min_size=1, max_size=8)), safe="")
        body = draw(
            st.fixed_dictionaries(
                {"op": mostly(st.sampled_from(["set", "patch", "delete"]), json_values)},
                optional={
                    "value": mostly(json_objects, json_values),
                    "base": st.one_of(st.none(), short_strings),
                    "origin": short_strings,
                    "seq": mostly(st.integers(1, 5), json_values),
                },
            )
        )
        return "POST", f"/api/records/rec:1/{key}", dumps(body)
    path = draw(
        st.sampled_from(
            ["/api/history/room:1", "/api/presence/room:1", "/api/channels", "/api/records/rec:1"]
        )
    )
    query = draw(st.sampled_from(["", "?limit=3", "?since=1&epoch=x", "?limit=-1", "?since=a"]))
    return "GET", path + query, b""


@fuzz_settings(bounded=250)
@given(requests=st.lists(rest_requests(), min_size=1, max_size=3))
def test_rest_api(node: ServedNode, requests: list[tuple[str, str, bytes]]) -> None:
    node.ensure_running()
    for method, target, body in requests:
        with contextlib.suppress(OSError, http.client.HTTPException):
            http_request(
                node.port, method, target, body or None, {"authorization": f"Bearer {API_KEY}"}
            )
    node.check()
