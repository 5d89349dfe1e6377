"""Row-change subscriptions in the sans-IO hub and the WAL source's pump, without a server:
pgoutput messages are encoded by the test (pgoutputkit.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pgoutputkit import (
    INT4_OID,
    ITEMS_RELATION,
    enc_begin,
    enc_commit,
    enc_insert,
    enc_relation,
    enc_truncate,
    enc_update,
    row_changes,
)

from pyrt._core import PgChange, PgOutputDecoder, check_channel
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.identity import Identity
from pyrt.hub.protocol import table_channel
from pyrt.hub.rules import Rules
from pyrt.node.context import SourceContext
from pyrt.node.node import Node, NodeConfig
from pyrt.plugins.wal import WalSource
from pyrt.postgres.replication import XLogData
from pyrt.testing import Peer, open_auth

# -- channel names ---------------------------------------------------------------------------


def test_table_channels_carry_any_postgres_name() -> None:
    assert table_channel("public", "orders") == "pg:public:orders"
    assert table_channel("public", "*") == "pg:public:*"
    assert table_channel("*", "*") == "pg:*:*"
    assert table_channel("my schema", "a:b*>%~") == "pg:my%20schema:a%3Ab%2A%3E%25%7E"
    assert table_channel("public", "*") != table_channel("public", "%2A")
    assert table_channel("s", "tab\tle\x7f") == "pg:s:tab%09le%7F"
    assert table_channel("s", "Ünïcödé") == "pg:s:Ünïcödé"
    assert table_channel("s", "é" * 31 + "\u3000") == "pg:s:" + "é" * 31 + "%E3%80%80"
    long = table_channel("s" * 63, "\u3000" * 21)  # 63 bytes of ideographic spaces
    schema, table = long.split(":")[1:]
    assert schema == "s" * 63
    assert table.startswith("~")
    assert len(table) == 33
    worst = table_channel("\u3000" * 21, " " * 63)
    check_channel(worst)
    assert len(worst.encode()) <= 255
    for name in ["a b", ":", "**", ">", "%", "\x00x", "tab\t"]:
        check_channel(table_channel(name, name))
    with pytest.raises(ValueError, match="empty"):
        table_channel("", "t")


# -- joining -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ({"changes": []}, "'changes' must not be empty"),
        ({"changes": [1]}, "'changes[0]' must be an object"),
        ({"changes": [{"event": "TRUNCATE"}]}, "must be INSERT, UPDATE, DELETE or *"),
        ({"changes": [{"table": 5}]}, "'changes[0].table' must be str, got int"),
        ({"changes": [{"table": ""}]}, "'changes[0].table' must not be empty"),
        ({"changes": [{"table": "a"}, {"table": "b"}]}, "must name the same schema and table"),
        ({"channel": "pg:public:b", "changes": [{"table": "a"}]}, "'channel' must be"),
        ({"changes": [{"table": "a"}, {"table": "a", "filter": "x=gt"}]}, "changes[1].filter"),
        ({"changes": [{"schema": "*", "table": "a"}], "since": {"offset": 0, "epoch": "e"}}, ""),
    ],
)
def test_bad_changes_are_refused_and_register_nothing(
    command: dict[str, Any], message: str
) -> None:
    hub = Hub()
    conn = Peer(hub, 0.0)
    reply = conn.request(cmd="join", **command)
    assert reply["error"]["code"] == 400
    assert message in reply["error"]["message"]
    assert hub.channels() == {}
    assert len(hub._rows) == 0


def test_identical_subscriptions_share_one_id_until_the_last_leaves() -> None:
    hub = Hub()
    a, b = Peer(hub, 0.0), Peer(hub, 0.0)
    spec = {"event": "insert", "table": "items", "filter": "n=gt.1"}
    first = a.request(cmd="join", changes=[spec, spec])["ok"]
    assert [c["id"] for c in first["changes"]] == [1, 1]
    assert first["changes"][0] == {
        "event": "INSERT",
        "schema": "public",
        "table": "items",
        "filter": "n=gt.1",
        "id": 1,
    }
    assert b.request(cmd="join", changes=[spec])["ok"]["changes"][0]["id"] == 1
    a.request(cmd="leave", channel="pg:public:items")
    assert len(hub._rows) == 1
    hub.disconnect(b.id, 0.0)
    assert len(hub._rows) == 0
    assert len(hub._rows.matcher) == 0


def test_one_frame_for_every_recipient_and_plain_joins_get_every_row() -> None:
    hub = Hub()
    conns = [Peer(hub, 0.0) for _ in range(4)]
    conns[0].request(cmd="join", changes=[{"table": "items", "filter": "n=gt.5"}])
    conns[1].request(cmd="join", changes=[{"table": "items", "filter": "n=lt.100"}])
    conns[2].request(cmd="join", channel="pg:public:items")  # no filter
    conns[3].request(cmd="join", changes=[{"table": "items", "filter": "n=lt.0"}])
    small, big = row_changes((1, "a", 1), (2, "b", 50))
    hub.publish_change(small, 1.0)
    hub.publish_change(big, 2.0)
    out = [hub.connection(c.id).outbox.pop() for c in conns]
    assert [len(frames_) for frames_ in out] == [1, 2, 2, 0]
    # The same bytes object was queued for every recipient of `big`.
    assert out[0][0] is out[1][1] is out[2][1]
    push = orjson.loads(out[0][0])
    assert (push["offset"], push["ids"]) == (2, [1, 2])
    assert push["data"]["record"] == {"id": 2, "body": "b", "n": 50}


def test_a_row_no_subscription_matches_reaches_plain_joins_beside_column_limited_ones() -> None:
    # Once some subscription was limited to some columns, a row that matched no
    # subscription raised in the hub (the source skipped it): plain joins never got it.
    hub = Hub()
    rules = [
        {"channel": "pg:public:items", "subscribe": "anyone", "columns": {"staff": ["id", "n"]}}
    ]
    hub.set_rules(Rules.from_config(rules))
    staff, plain = Peer(hub, 0.0), Peer(hub, 0.0)
    hub.connection(staff.id).identity = Identity("s", {"role": "staff"}, anonymous=False)
    assert "ok" in staff.request(cmd="join", changes=[{"table": "items", "filter": "n=gt.5"}])
    assert "ok" in plain.request(cmd="join", channel="pg:public:items")
    small, big = row_changes((1, "a", 1), (2, "b", 50))
    hub.publish_change(small, 1.0)
    hub.publish_change(big, 2.0)
    assert [f["data"]["record"] for f in plain.frames()] == [
        {"id": 1, "body": "a", "n": 1},
        {"id": 2, "body": "b", "n": 50},
    ]
    assert [f["data"]["record"] for f in staff.frames()] == [{"id": 2, "n": 50}]


def test_a_role_may_not_filter_on_a_column_it_may_not_see() -> None:
    # Which rows arrive would tell it the hidden column's values, one filter at a time.
    hub = Hub()
    rules = [{"channel": "pg:public:items", "subscribe": "anyone", "columns": {"*": ["id", "n"]}}]
    hub.set_rules(Rules.from_config(rules))
    conn = Peer(hub, 0.0)
    for changes in (
        [{"table": "items", "filter": "body=like.a%"}],
        [{"table": "items", "filter": "n=gt.1"}, {"table": "items", "filter": "n=gt.1,body=eq.x"}],
        [{"table": "items", "filter": "body=not.is.null"}],
    ):
        error = conn.request(cmd="join", changes=changes)["error"]
        assert error["code"] == 403
        assert error["message"] == "'pg:public:items': you may not filter on column 'body'"
    assert len(hub._rows) == 0
    assert "ok" in conn.request(cmd="join", changes=[{"table": "items", "filter": "n=gt.1"}])


def test_an_update_shows_the_old_row_only_to_those_whose_forced_filter_it_passed() -> None:
    # Under REPLICA IDENTITY FULL an update carries the whole old row: a row moved from
    # tenant t2 into t1 showed t1's subscribers what it was in t2.
    hub = Hub()
    rules = [{"channel": "pg:public:items", "subscribe": "anyone", "filter": "body=eq.{claims.t}"}]
    hub.set_rules(Rules.from_config(rules))
    t1, t2 = Peer(hub, 0.0), Peer(hub, 0.0)
    for peer, tenant in ((t1, "t1"), (t2, "t2")):
        hub.connection(peer.id).identity = Identity(tenant, {"t": tenant}, anonymous=False)
    joined = t1.request(cmd="join", changes=[{"table": "items"}])["ok"]
    assert "ok" in t2.request(cmd="join", changes=[{"table": "items"}])
    decoder = PgOutputDecoder()
    decoder.decode(ITEMS_RELATION)
    decoder.decode(enc_begin(100, 0, 7))
    moved = decoder.decode(enc_update(16384, ["1", "t1", "2"], ("O", ["1", "t2", "1"])))
    within = decoder.decode(enc_update(16384, ["1", "t1", "3"], ("O", ["1", "t1", "2"])))
    for change in (moved, within):
        assert isinstance(change, PgChange)
        hub.publish_change(change, 1.0)
    rows = [(f["data"]["record"], f["data"]["old_record"]) for f in t1.frames()]
    assert rows == [
        ({"id": 1, "body": "t1", "n": 2}, {}),
        ({"id": 1, "body": "t1", "n": 3}, {"id": 1, "body": "t1", "n": 2}),
    ]
    assert t2.frames() == []
    # A replay shows the same.
    since = {"offset": joined["offset"], "epoch": joined["epoch"]}
    back = Peer(hub, 1.0)
    hub.connection(back.id).identity = Identity("t1", {"t": "t1"}, anonymous=False)
    back.request(cmd="join", changes=[{"table": "items"}], since=since)
    assert [(f["data"]["record"], f["data"]["old_record"]) for f in back.pending] == rows


def test_since_replays_matching_rows_and_truncates() -> None:
    hub = Hub()
    conn = Peer(hub, 0.0)
    reply = conn.request(cmd="join", changes=[{"table": "items", "filter": "n=gt.5"}])["ok"]
    since = {"offset": reply["offset"], "epoch": reply["epoch"]}
    hub.disconnect(conn.id, 0.0)
    for change in row_changes((1, "a", 1), (2, "b", 10), (3, "c", 2)):
        hub.publish_change(change, 1.0)
    hub.publish_truncate("public", "items", 1.0)
    back = Peer(hub, 1.0)
    reply = back.request(cmd="join", changes=[{"table": "items", "filter": "n=gt.5"}], since=since)
    replay = back.pending
    assert reply["ok"]["recovered"] is True
    assert [(f["offset"], f["data"]["type"]) for f in replay] == [(2, "INSERT"), (4, "TRUNCATE")]
    # Only subscriptions for every event get truncates.
    only_inserts = Peer(hub, 1.0)
    only_inserts.request(cmd="join", changes=[{"event": "INSERT", "table": "items"}], since=since)
    replay = only_inserts.pending
    assert [f["offset"] for f in replay] == [1, 2, 3]


def test_reset_channels_gives_new_epochs_and_tells_joined_clients() -> None:
    hub = Hub()
    named, pattern, elsewhere = Peer(hub, 0.0), Peer(hub, 0.0), Peer(hub, 0.0)
    old = named.request(cmd="join", changes=[{"table": "items"}])["ok"]["epoch"]
    pattern.request(cmd="join", changes=[{"table": "*"}])
    elsewhere.request(cmd="join", channel="room:1")
    hub.publish_change(row_changes((1, "a", 1))[0], 1.0)
    named.frames(), pattern.frames()
    assert hub.reset_channels("pg:>", 2.0) == ["pg:public:items"]
    (reset,) = named.frames()
    assert reset["push"] == "reset"
    assert reset["recovered"] is False
    assert (reset["channel"], reset["offset"]) == ("pg:public:items", 1)
    assert reset["epoch"] != old
    assert pattern.frames() == []
    assert elsewhere.frames() == []
    again = Peer(hub, 2.0)
    reply = again.request(
        cmd="join", changes=[{"table": "items"}], since={"offset": 0, "epoch": old}
    )
    assert reply["ok"]["recovered"] is False


# -- the pump ----------------------------------------------------------------------------------


class FakeStream:
    """Recorded XLogData for `WalSource.pump`, with the acks it got."""

    def __init__(self, payloads: list[bytes]) -> None:
        self.payloads = payloads
        self.acks: list[int] = []

    def ack(self, lsn: int) -> None:
        self.acks.append(lsn)

    async def __aiter__(self) -> AsyncIterator[XLogData]:
        for lsn, payload in enumerate(self.payloads, start=1):
            yield XLogData(lsn, lsn, 0, payload)


def transaction(commit_lsn: int, *ids: int, commit: bool = True) -> list[bytes]:
    out = [enc_begin(commit_lsn, 0, commit_lsn)]
    out += [enc_insert(16384, [str(i), "x", str(i)]) for i in ids]
    if commit:
        out.append(enc_commit(0, commit_lsn, commit_lsn + 8, 0))
    return out


async def test_pump_skips_what_the_slot_sends_again() -> None:
    source = WalSource(slot="fake")
    node = Node(NodeConfig(auth=open_auth(), port=0, transports=()), transports=[], sources=[])
    conn = Peer(node.hub, 0.0)
    conn.request(cmd="join", channel="pg:public:items")
    # A session cut off in the middle of the second transaction...
    first = FakeStream(
        [ITEMS_RELATION, *transaction(100, 1, 2), *transaction(200, 3, 4, commit=False)]
    )
    await source.pump(SourceContext(node, source.name), first)
    assert first.acks == [108]
    # ...then the slot sends both again (the first's ack was lost), and a third.
    second = FakeStream(
        [ITEMS_RELATION, *transaction(100, 1, 2), *transaction(200, 3, 4, 5), *transaction(300, 6)]
    )
    await source.pump(SourceContext(node, source.name), second)
    assert second.acks == [108, 208, 308]
    ids = [f["data"]["record"]["id"] for f in conn.frames()]
    assert ids == [1, 2, 3, 4, 5, 6]
    assert source.skipped == 4
    assert source.committed_lsn == 308


async def test_pump_publishes_truncates_per_table() -> None:
    source = WalSource(slot="fake")
    node = Node(NodeConfig(auth=open_auth(), port=0, transports=()), transports=[], sources=[])
    conn = Peer(node.hub, 0.0)
    conn.request(cmd="join", changes=[{"table": "*"}])
    other = enc_relation(16385, "public", "other", "d", [(1, "id", INT4_OID, -1)])
    stream = FakeStream(
        [
            ITEMS_RELATION,
            other,
            enc_begin(100, 0, 1),
            enc_truncate(0, [16384, 16385]),
            enc_commit(0, 100, 108, 0),
        ]
    )
    await source.pump(SourceContext(node, source.name), stream)
    got = [(f["channel"], f["data"]["type"], f["data"]["columns"]) for f in conn.frames()]
    assert got == [
        (
            "pg:public:items",
            "TRUNCATE",
            [
                {"name": "id", "type": "int4"},
                {"name": "body", "type": "text"},
                {"name": "n", "type": "int4"},
            ],
        ),
        ("pg:public:other", "TRUNCATE", [{"name": "id", "type": "int4"}]),
    ]
    assert stream.acks == [108]


async def test_pump_skips_a_message_it_cannot_decode_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    source = WalSource(slot="fake")
    node = Node(
        NodeConfig(auth=open_auth(), port=0, transports=()), transports=[], sources=[source]
    )
    conn = Peer(node.hub, 0.0)
    conn.request(cmd="join", channel="pg:public:items")
    garbage = enc_insert(16384, ["1", "x"])  # a column short: the decoder refuses it
    stream = FakeStream(
        [
            ITEMS_RELATION,
            *transaction(100, 1),
            enc_begin(200, 0, 200),
            garbage,
            b"\xff\x00",  # no such message kind
            enc_insert(16384, ["2", "y", "2"]),
            enc_commit(0, 200, 208, 0),
            *transaction(300, 3),
        ]
    )
    await source.pump(SourceContext(node, source.name), stream)
    assert [f["data"]["record"]["id"] for f in conn.frames()] == [1, 2, 3]
    assert stream.acks == [108, 208, 308]  # the slot moves past the bad message
    assert node.metrics.source_events_skipped["wal"] == 1
    (record,) = [r for r in caplog.records if "skipped" in r.message]
    assert "cannot decode the message at" in record.message


async def test_a_row_too_deep_to_keep_as_a_record_is_skipped_as_a_record_only() -> None:
    jsonb = 3802
    relation = enc_relation(
        16390, "public", "docs", "d", [(1, "id", INT4_OID, -1), (0, "doc", jsonb, -1)]
    )
    source = WalSource(slot="fake", records={"public.docs": "docs"})
    config = NodeConfig(
        auth=open_auth(), port=0, transports=(), hub=HubConfig(record_policies={"docs": "lww"})
    )
    node = Node(config, transports=[], sources=[source])
    source._records_loaded = True  # (no database to load them from)
    conn = Peer(node.hub, 0.0)
    conn.request(cmd="join", channel="pg:public:docs")
    deep = "[" * 100 + "]" * 100
    stream = FakeStream(
        [
            relation,
            enc_begin(100, 0, 100),
            enc_insert(16390, ["1", deep]),
            enc_insert(16390, ["2", '{"ok": true}']),
            enc_commit(0, 100, 108, 0),
        ]
    )
    await source.pump(SourceContext(node, source.name), stream)
    # Both row events go out (as the database sent them); only the shallow row is a record.
    assert [f["data"]["record"]["id"] for f in conn.frames()] == [1, 2]
    assert [r.key for r in node.hub.records("docs")] == ["2"]
    assert node.metrics.source_events_skipped["wal"] == 1
    assert stream.acks == [108]
