"""The sans-IO hub, driven with real protocol frames: commands, errors, history, presence,
liveness, slow consumers; and a state machine for loss-free resume."""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    rule,
)

from pyrt.hub.deliverer import MemoryDeliverer
from pyrt.hub.history import StreamPosition
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.hub.protocol import CloseCode, ErrorCode


def make_hub(**config: Any) -> Hub:
    """A hub on the pure-Python deliverer: no socket, every frame through an outbox (as with
    the Rust fan-out when no socket is attached: tests/hub/test_delivery.py)."""
    epochs = itertools.count(1)
    return Hub(
        HubConfig(**config),
        replica="n1",
        new_epoch=lambda: f"e{next(epochs)}",
        deliverer=MemoryDeliverer,
    )


class Peer:
    """A client at the frame level: sends JSON commands, reads what its outbox holds."""

    def __init__(self, hub: Hub, now: float = 0.0) -> None:
        self.hub = hub
        self.id = hub.open(now).id
        self.ids = itertools.count(1)

    def send(self, now: float = 0.0, /, **command: Any) -> int:
        rid = next(self.ids)
        self.hub.receive(self.id, orjson.dumps({"id": rid, **command}), now)
        return rid

    def raw(self, frame: bytes | str, now: float = 0.0) -> None:
        self.hub.receive(self.id, frame, now)

    def frames(self) -> list[dict[str, Any]]:
        outbox = self.hub.connection(self.id).outbox
        return [orjson.loads(f) for f in outbox.pop()] if len(outbox) else []

    def request(self, now: float = 0.0, /, **command: Any) -> dict[str, Any]:
        """Sends a command and returns its reply; other frames stay unread."""
        rid = self.send(now, **command)
        frames = self.frames()
        replies = [f for f in frames if f.get("reply") == rid]
        assert len(replies) == 1, frames
        self.pending = [f for f in frames if f.get("reply") != rid]
        return replies[0]


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert "ok" in reply, reply
    result: dict[str, Any] = reply["ok"]
    return result


def error(reply: dict[str, Any]) -> tuple[int, str]:
    assert "error" in reply, reply
    return reply["error"]["code"], reply["error"]["message"]


def pubs(frames: list[dict[str, Any]]) -> list[tuple[str, int, Any]]:
    return [(f["channel"], f["offset"], f["data"]) for f in frames if f.get("push") == "pub"]


# -- channels and broadcast ----------------------------------------------------------------


def test_join_publish_receive_with_self_and_ack() -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    assert ok(a.request(cmd="join", channel="room:1")) == {
        "channel": "room:1",
        "offset": 0,
        "epoch": "e1",
    }
    ok(b.request(cmd="join", channel="room:1"))
    assert ok(a.request(cmd="publish", channel="room:1", data={"t": "hi"}, ack=True)) == {
        "offset": 1,
        "epoch": "e1",
    }
    assert a.pending == []  # self=false by default: no echo
    assert pubs(b.frames()) == [("room:1", 1, {"t": "hi"})]
    a.send(cmd="publish", channel="room:1", data=2, self=True)
    assert pubs(a.frames()) == [("room:1", 2, 2)]  # no ack asked: no reply, just the echo
    frame = b.frames()[0]
    assert frame["from"] == a.id


def test_patterns_receive_once_and_server_publications_have_no_sender() -> None:
    hub = make_hub()
    a = Peer(hub)
    ok(a.request(cmd="join", channel="room:*"))
    ok(a.request(cmd="join", channel="room:>"))
    ok(a.request(cmd="join", channel="room:7"))
    hub.publish("room:7", "x", now=0.0)
    hub.publish("room:8:chat", "y", now=0.0)
    frames = a.frames()
    assert pubs(frames) == [("room:7", 1, "x"), ("room:8:chat", 1, "y")]
    assert all("from" not in f for f in frames)
    assert hub.channels() == {"room:*": 1, "room:>": 1, "room:7": 1}


def test_leave_stops_delivery() -> None:
    hub = make_hub()
    a = Peer(hub)
    ok(a.request(cmd="join", channel="c"))
    ok(a.request(cmd="leave", channel="c"))
    hub.publish("c", 1, now=0.0)
    assert a.frames() == []
    assert hub.channels() == {}


@pytest.mark.parametrize(
    ("command", "code", "message"),
    [
        ({"cmd": "nope"}, ErrorCode.UNKNOWN_COMMAND, "unknown command 'nope'"),
        ({"cmd": 5}, ErrorCode.BAD_REQUEST, "'cmd' must be a string"),
        ({"cmd": "join"}, ErrorCode.BAD_REQUEST, "'channel' must be str, got missing"),
        ({"cmd": "join", "channel": 1}, ErrorCode.BAD_REQUEST, "'channel' must be str, got int"),
        ({"cmd": "join", "channel": "a b"}, ErrorCode.INVALID_CHANNEL, "invalid character U+0020"),
        ({"cmd": "join", "channel": "a:*", "since": {"offset": 1, "epoch": "e"}},
         ErrorCode.BAD_REQUEST, "'since' and 'presence' need a channel name"),
        ({"cmd": "join", "channel": "a", "since": {"offset": -1, "epoch": "e"}},
         ErrorCode.BAD_REQUEST, "'offset' must not be negative"),
        ({"cmd": "join", "channel": "a", "since": {"offset": "1", "epoch": "e"}},
         ErrorCode.BAD_REQUEST, "'offset' must be int, got str"),
        ({"cmd": "join", "channel": "a", "presence": "yes"},
         ErrorCode.BAD_REQUEST, "'presence' must be bool, got str"),
        ({"cmd": "leave", "channel": "a"}, ErrorCode.NOT_JOINED, "not joined to 'a'"),
        ({"cmd": "publish", "channel": "a"}, ErrorCode.BAD_REQUEST, "'data' is missing"),
        ({"cmd": "publish", "channel": "a", "data": 1}, ErrorCode.FORBIDDEN, "join 'a' before"),
        ({"cmd": "publish", "channel": "a:*", "data": 1},
         ErrorCode.INVALID_CHANNEL, "wildcards are only allowed in patterns"),
        ({"cmd": "track", "channel": "a"}, ErrorCode.NOT_JOINED, "not joined to 'a'"),
        ({"cmd": "presence", "channel": "a"}, ErrorCode.NOT_JOINED, "not joined to 'a'"),
    ],
)  # fmt: skip
def test_bad_commands_get_an_error_and_the_connection_stays(
    command: dict[str, Any], code: int, message: str
) -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    ok(b.request(cmd="join", channel="ok"))
    got_code, got_message = error(a.request(**command))
    assert got_code == code
    assert message in got_message
    # Nothing closed, and both connections still work.
    assert hub.take_closing() == []
    ok(a.request(cmd="join", channel="ok"))
    a.send(cmd="publish", channel="ok", data="still here")
    assert pubs(b.frames()) == [("ok", 1, "still here")]


def test_errors_without_an_id_are_pushed() -> None:
    hub = make_hub()
    a = Peer(hub)
    a.raw(b'{"cmd":"leave","channel":"x"}')
    assert a.frames() == [
        {"push": "error", "code": ErrorCode.NOT_JOINED, "message": "not joined to 'x'"}
    ]
    a.raw(b'{"cmd":"ping","id":true}')
    assert a.frames()[0]["code"] == ErrorCode.BAD_REQUEST


def test_channel_limit_and_double_join() -> None:
    hub = make_hub(max_channels_per_connection=2)
    a = Peer(hub)
    ok(a.request(cmd="join", channel="a"))
    assert error(a.request(cmd="join", channel="a"))[0] == ErrorCode.ALREADY_JOINED
    ok(a.request(cmd="join", channel="b"))
    assert error(a.request(cmd="join", channel="c")) == (
        ErrorCode.TOO_MANY_CHANNELS,
        "at most 2 channels",
    )


def test_oversized_payload_is_refused_but_small_ones_pass() -> None:
    hub = make_hub(max_payload_bytes=100)
    a = Peer(hub)
    ok(a.request(cmd="join", channel="c"))
    assert error(a.request(cmd="publish", channel="c", data="x" * 200, ack=True)) == (
        ErrorCode.PAYLOAD_TOO_LARGE,
        "data larger than 100 bytes",
    )
    # A frame over the limit whose data is under it (long channel name) is accepted.
    ok(a.request(cmd="join", channel="c" * 90))
    assert ok(a.request(cmd="publish", channel="c" * 90, data="x" * 80, ack=True))["offset"] == 1


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"not json", CloseCode.BAD_FRAME),
        (b"[1, 2]", CloseCode.BAD_FRAME),
        (b"\xff\xfe", CloseCode.BAD_FRAME),
        (b'{"cmd":"ping","pad":"' + b"x" * 300 + b'"}', CloseCode.MESSAGE_TOO_BIG),
    ],
)
def test_unreadable_frames_close_only_that_connection(frame: bytes, code: CloseCode) -> None:
    hub = make_hub(max_frame_bytes=256)
    a, b = Peer(hub), Peer(hub)
    ok(b.request(cmd="join", channel="c"))
    a.raw(frame)
    [(conn_id, got, reason)] = hub.take_closing()
    assert (conn_id, got) == (a.id, code)
    assert reason
    a.raw(b'{"cmd":"ping","id":1}')  # ignored: the connection is closing
    assert a.frames() == []
    hub.disconnect(a.id, now=0.0)
    hub.publish("c", 1, now=0.0)
    assert pubs(b.frames()) == [("c", 1, 1)]


# -- history and recovery ------------------------------------------------------------------


def test_resume_in_window_gets_every_missed_publication_then_live_ones() -> None:
    hub = make_hub(history_size=10)
    a = Peer(hub)
    position = ok(a.request(cmd="join", channel="c"))
    for i in range(3):
        hub.publish("c", i, now=1.0)
    assert pubs(a.frames()) == [("c", 1, 0), ("c", 2, 1), ("c", 3, 2)]
    hub.disconnect(a.id, now=2.0)
    for i in range(3, 6):
        hub.publish("c", i, now=3.0)
    again = Peer(hub)
    since = {"offset": 3, "epoch": position["epoch"]}
    reply = again.request(cmd="join", channel="c", since=since)
    assert ok(reply) == {"channel": "c", "offset": 6, "epoch": "e1", "recovered": True}
    hub.publish("c", 6, now=4.0)
    assert pubs(again.pending + again.frames()) == [
        ("c", 4, 3),
        ("c", 5, 4),
        ("c", 6, 5),
        ("c", 7, 6),
    ]
    assert hub.stats.recoveries == 1


def test_resume_out_of_window_says_recovered_false() -> None:
    hub = make_hub(history_size=2)
    a = Peer(hub)
    ok(a.request(cmd="join", channel="c"))
    for i in range(5):
        hub.publish("c", i, now=0.0)
    b = Peer(hub)
    result = ok(b.request(cmd="join", channel="c", since={"offset": 1, "epoch": "e1"}))
    assert result["recovered"] is False
    assert result["offset"] == 5
    assert b.pending == []  # nothing partial
    stale = ok(Peer(hub).request(cmd="join", channel="c", since={"offset": 5, "epoch": "e0"}))
    assert stale["recovered"] is False
    assert hub.stats.recovery_misses == 2


# -- presence ------------------------------------------------------------------------------


def test_presence_state_diffs_and_leave() -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    ok(a.request(cmd="join", channel="doc", presence=True))
    assert a.pending == [{"push": "presence_state", "channel": "doc", "state": {}}]
    ref = ok(a.request(cmd="track", channel="doc", key="ann", meta={"cursor": 1}))["ref"]
    [diff] = a.pending
    assert diff["push"] == "presence_diff"
    assert diff["joins"] == {"ann": [{"ref": ref, "client": a.id, "meta": {"cursor": 1}}]}
    assert diff["leaves"] == {}
    ok(b.request(cmd="join", channel="doc", presence=True))
    [state] = b.pending
    assert state["state"] == {"ann": [{"ref": ref, "client": a.id, "meta": {"cursor": 1}}]}
    # An update is one diff: the old meta leaves, the new one joins.
    new_ref = ok(a.request(cmd="track", channel="doc", key="ann", meta={"cursor": 2}, ref=ref))[
        "ref"
    ]
    [update] = b.frames()
    assert update["leaves"]["ann"][0]["ref"] == ref
    assert update["joins"]["ann"][0]["meta"] == {"cursor": 2}
    query = ok(b.request(cmd="presence", channel="doc"))
    assert query["state"]["ann"][0]["ref"] == new_ref
    # Leaving the channel untracks what the connection tracked there.
    ok(a.request(cmd="leave", channel="doc"))
    [gone] = b.frames()
    assert gone["leaves"]["ann"][0]["ref"] == new_ref
    assert hub.presence("doc") == {}


def test_presence_leaves_when_the_connection_drops_and_bad_refs_error() -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    ok(a.request(cmd="join", channel="doc"))
    ok(b.request(cmd="join", channel="doc", presence=True))
    assert error(a.request(cmd="track", channel="doc", ref="n1:999"))[0] == ErrorCode.BAD_REQUEST
    ok(a.request(cmd="track", channel="doc", meta={"n": 1}))
    ok(a.request(cmd="track", channel="doc", meta={"n": 2}))  # two metas under one key
    assert [m["meta"] for m in ok(b.request(cmd="presence", channel="doc"))["state"][a.id]] == [
        {"n": 1},
        {"n": 2},
    ]
    b.frames()
    hub.disconnect(a.id, now=0.0)
    leaves = [f["leaves"] for f in b.frames()]
    assert sum(len(x.get(a.id, [])) for x in leaves) == 2
    assert hub.presence("doc") == {}


# -- liveness and slow consumers -----------------------------------------------------------


def test_pings_and_idle_timeout() -> None:
    hub = make_hub(ping_interval=10.0, idle_timeout=30.0)
    a, b = Peer(hub), Peer(hub)
    assert hub.tick(now=5.0) == 10.0
    hub.tick(now=10.0)
    assert a.frames() == [{"push": "ping"}]
    b.raw(b'{"cmd":"ping"}', now=25.0)  # b is alive, a is silent
    hub.tick(now=30.0)
    assert hub.take_closing() == [(a.id, CloseCode.IDLE_TIMEOUT, "nothing received for 30 s")]
    assert ok(b.request(31.0, cmd="ping")) == {}


def test_slow_consumer_is_disconnected_and_can_resume() -> None:
    hub = make_hub(outbox_messages=4)
    slow, fast = Peer(hub), Peer(hub)
    ok(slow.request(cmd="join", channel="c"))
    ok(fast.request(cmd="join", channel="c"))
    for i in range(4):
        hub.publish("c", i, now=0.0)
        fast.frames()
    assert hub.take_closing() == []
    hub.publish("c", 4, now=0.0)
    [(conn_id, code, _)] = hub.take_closing()
    assert (conn_id, code) == (slow.id, CloseCode.SLOW)
    assert [p[1] for p in pubs(slow.frames())] == [1, 2, 3, 4]  # what fit is still written
    hub.disconnect(slow.id, now=0.0)
    again = Peer(hub)
    assert ok(again.request(cmd="join", channel="c", since={"offset": 4, "epoch": "e1"}))[
        "recovered"
    ]
    assert pubs(again.pending) == [("c", 5, 4)]
    assert hub.stats.slow_disconnects == 1


def test_drop_oldest_and_conflate_policies_keep_the_connection() -> None:
    hub = make_hub(
        outbox_messages=3,
        channel_policies={
            "ticker:>": SlowConsumerPolicy.CONFLATE,
            "feed": SlowConsumerPolicy.DROP_OLDEST,
        },
    )
    a = Peer(hub)
    ok(a.request(cmd="join", channel="feed"))
    for i in range(5):
        hub.publish("feed", i, now=0.0)
    assert [p[2] for p in pubs(a.frames())] == [2, 3, 4]
    ok(a.request(cmd="join", channel="ticker:x"))
    for i in range(6):
        hub.publish("ticker:x", {"price": i}, now=0.0, key=f"sym{i % 2}")
    got = pubs(a.frames())
    assert [p[2]["price"] for p in got] == [4, 5] or len(got) <= 3
    assert got[-1][2] == {"price": 5}
    assert hub.take_closing() == []
    assert hub.stats.evicted > 0


def test_shutdown_tells_everyone_to_go_elsewhere() -> None:
    hub = make_hub()
    a, b = Peer(hub), Peer(hub)
    hub.shutdown(now=0.0)
    assert a.frames() == [
        {"push": "disconnect", "code": 1001, "reason": "server shutting down, reconnect"}
    ]
    assert {c[0] for c in hub.take_closing()} == {a.id, b.id}


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="ping_interval"):
        HubConfig(ping_interval=60, idle_timeout=30)
    with pytest.raises(ValueError, match="outbox_messages"):
        HubConfig(outbox_messages=0)
    with pytest.raises(ValueError, match="empty segment"):
        HubConfig(channel_policies={"a::b": SlowConsumerPolicy.CONFLATE})


# -- the state machine ---------------------------------------------------------------------

CHANNELS = ("a", "b", "c")


class Client:
    """What a real client remembers across connections: its last position per channel."""

    def __init__(self, name: int) -> None:
        self.name = name
        self.peer: Peer | None = None
        self.positions: dict[str, StreamPosition] = {}
        self.joined: set[str] = set()
        self.seen: dict[str, list[int]] = {}


class ResumeMachine(RuleBasedStateMachine):
    """Clients join, leave, publish, drop and resume; each sees every channel's publications
    in offset order with no gap and no duplicate, and ends up with all of them."""

    clients = Bundle("clients")

    def __init__(self) -> None:
        super().__init__()
        # Small history and outboxes, so that both recovery outcomes and slow-consumer
        # disconnects happen.
        self.hub = make_hub(history_size=6, outbox_messages=12, history_age=1e9)
        self.now = 0.0
        self.log: dict[str, list[Any]] = {c: [] for c in CHANNELS}
        self.counter = itertools.count()
        self.outcomes = {"recovered": 0, "reset": 0, "slow": 0}

    # -- the client's side ---------------------------------------------------------------

    def connect(self, client: Client) -> None:
        client.peer = Peer(self.hub, self.now)
        for channel in sorted(client.joined):
            self.join_now(client, channel)

    def join_now(self, client: Client, channel: str) -> None:
        assert client.peer is not None
        since = client.positions.get(channel)
        command: dict[str, Any] = {"cmd": "join", "channel": channel}
        if since is not None:
            command["since"] = {"offset": since.offset, "epoch": since.epoch}
        client.peer.send(self.now, **command)
        self.drain(client)

    def drain(self, client: Client) -> None:
        """Reads the client's frames, checking every publication against the log."""
        if client.peer is None:
            return
        for frame in client.peer.frames():
            result = frame.get("ok", {})
            if "channel" in result and "epoch" in result:  # a join reply
                recovered = result.get("recovered")
                if recovered:
                    self.outcomes["recovered"] += 1
                    continue  # keep the old position: the missed publications follow
                if recovered is False:
                    self.outcomes["reset"] += 1
                channel = result["channel"]
                client.positions[channel] = StreamPosition(result["offset"], result["epoch"])
            elif frame.get("push") == "pub":
                channel, offset = frame["channel"], frame["offset"]
                last = client.positions[channel]
                assert frame["epoch"] == last.epoch
                assert offset == last.offset + 1, (client.name, channel, last, offset)
                assert frame["data"] == self.log[channel][offset - 1]
                client.positions[channel] = StreamPosition(offset, last.epoch)

    def alive(self, client: Client) -> bool:
        """Whether the client has a working connection; one the hub closed is wound up:
        what it queued before closing is read (the transport writes it), then it is gone."""
        if client.peer is None:
            return False
        if self.hub.connection(client.peer.id).closing is None:
            return True
        self.drain(client)
        self.hub.disconnect(client.peer.id, self.now)
        client.peer = None
        self.outcomes["slow"] += 1
        return False

    # -- rules ---------------------------------------------------------------------------

    @rule(
        target=clients,
        name=st.integers(0, 10**6),
        channels=st.sets(st.sampled_from(CHANNELS), min_size=1),
    )
    def new_client(self, name: int, channels: set[str]) -> Client:
        client = Client(name)
        self.connect(client)
        for channel in sorted(channels):
            self.join(client, channel)
        return client

    @rule(client=clients, channel=st.sampled_from(CHANNELS))
    def join(self, client: Client, channel: str) -> None:
        if self.alive(client) and channel not in client.joined:
            client.joined.add(channel)
            self.join_now(client, channel)

    @rule(client=clients, channel=st.sampled_from(CHANNELS))
    def leave(self, client: Client, channel: str) -> None:
        if not self.alive(client) or channel not in client.joined:
            return
        assert client.peer is not None
        self.drain(client)
        client.peer.send(self.now, cmd="leave", channel=channel)
        self.drain(client)
        client.joined.discard(channel)
        client.positions.pop(channel, None)

    @rule(client=clients, channel=st.sampled_from(CHANNELS), echo=st.booleans())
    def publish(self, client: Client, channel: str, echo: bool) -> None:
        if not self.alive(client) or channel not in client.joined:
            return
        assert client.peer is not None
        data = next(self.counter)
        self.log[channel].append(data)
        if echo:
            client.peer.send(self.now, cmd="publish", channel=channel, data=data, self=True)
            return
        # Without the echo, the ack tells the client the offset it would otherwise skip.
        self.drain(client)
        rid = client.peer.send(self.now, cmd="publish", channel=channel, data=data, ack=True)
        [reply] = client.peer.frames()
        assert reply["reply"] == rid
        last = client.positions[channel]
        assert reply["ok"]["offset"] == last.offset + 1
        client.positions[channel] = StreamPosition(reply["ok"]["offset"], last.epoch)

    @rule(channel=st.sampled_from(CHANNELS), count=st.integers(1, 8))
    def server_publish(self, channel: str, count: int) -> None:
        """A source publishes a burst: enough to outrun history or an unread outbox."""
        for _ in range(count):
            data = next(self.counter)
            self.log[channel].append(data)
            self.hub.publish(channel, data, self.now)

    @rule(client=clients)
    def deliver(self, client: Client) -> None:
        if self.alive(client):
            self.drain(client)

    @rule(client=clients)
    def drop(self, client: Client) -> None:
        """The connection dies: whatever was queued and not read is lost."""
        if client.peer is not None:
            self.hub.disconnect(client.peer.id, self.now)
            client.peer = None

    @rule(client=clients)
    def reconnect(self, client: Client) -> None:
        if client.peer is None:
            self.connect(client)

    @invariant()
    def hub_closes_only_slow_consumers(self) -> None:
        for _conn_id, code, _reason in self.hub.take_closing():
            assert code == CloseCode.SLOW

    def teardown(self) -> None:
        """Everyone reconnects and catches up: each ends at the top of every joined channel."""
        clients = [c for c in self.bundle("clients") if isinstance(c, Client)]
        for client in clients:
            self.alive(client)
            if client.peer is None:
                self.connect(client)
            self.drain(client)
            if self.alive(client):
                for channel in client.joined:
                    assert client.positions[channel].offset == len(self.log[channel])
        for outcome, count in self.outcomes.items():
            event(f"{outcome} {'happened' if count else 'did not happen'}")
        note(str(self.outcomes))


ResumeMachine.TestCase.settings = settings(max_examples=250, stateful_step_count=80)
TestResumeIsLossFree = ResumeMachine.TestCase
