"""The hub under channel rules, sans-IO: what each identity may join, publish, track and read;
claims-bound row filters and per-role columns on real decoded row changes; token expiry,
the `connect` deadline and the REST API's revocations (docs/auth.md)."""

from __future__ import annotations

from typing import Any

import pytest
from pgoutputkit import row_changes

from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.identity import Action, Identity
from pyrt.hub.protocol import CloseCode, ErrorCode, Join
from pyrt.hub.rules import Rules
from pyrt.testing import Peer

RULES = Rules.from_config(
    [
        {"channel": "user:{sub}:>", "subscribe": "authenticated", "publish": "authenticated"},
        {"channel": "room:>", "subscribe": "authenticated", "history": "role:admin"},
        {
            "channel": "pg:public:items",
            "subscribe": ["role:member", "role:admin"],
            "filter": "n=eq.{claims.tenant}",
            "columns": {"member": ["id", "n"]},
        },
        {"channel": "chat:>", "subscribe": "anyone", "publish": "authenticated"},
    ]
)


class Wall:
    """The hub's wall clock, set by the test."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def user(
    sub: str, *, expires: float | None = None, jti: str | None = None, **claims: Any
) -> Identity:
    return Identity(sub, {"sub": sub, **claims}, anonymous=False, expires=expires, jti=jti)


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def hub(wall: Wall) -> Hub:
    hub = Hub(HubConfig(idle_timeout=7200.0, ping_interval=3600.0), wall_clock=wall)
    hub.set_rules(RULES, refresh_before=30.0, connect_timeout=10.0)
    return hub


def error(reply: dict[str, Any]) -> int:
    assert "error" in reply, reply
    code: int = reply["error"]["code"]
    return code


def test_a_user_limited_channel_is_its_users_only(hub: Hub) -> None:
    alice, bob = Peer(hub, identity=user("alice")), Peer(hub, identity=user("bob"))
    assert alice.request(cmd="join", channel="user:alice:inbox")["ok"]
    assert error(bob.request(cmd="join", channel="user:alice:inbox")) == ErrorCode.FORBIDDEN
    assert alice.request(cmd="join", channel="user:alice:*")["ok"]
    assert error(bob.request(cmd="join", channel="user:*:inbox")) == ErrorCode.FORBIDDEN
    # Bob cannot write there either.
    bob.send(cmd="publish", channel="user:alice:inbox", data="x")
    assert [f["error"]["code"] for f in bob.frames()] == [ErrorCode.FORBIDDEN]
    assert [f for f in alice.frames() if f.get("push") == "pub"] == []
    assert hub.stats.auth_refused == 3


def test_anonymous_gets_only_what_anyone_may(hub: Hub) -> None:
    anon, alice = Peer(hub), Peer(hub, identity=user("alice"))
    assert anon.request(cmd="join", channel="chat:lobby")["ok"]
    assert error(anon.request(cmd="join", channel="room:1")) == ErrorCode.FORBIDDEN
    assert error(anon.request(cmd="publish", channel="chat:lobby", data=1, ack=True)) == 403
    assert alice.request(cmd="join", channel="chat:lobby")["ok"]
    assert alice.request(cmd="publish", channel="chat:lobby", data=2, ack=True)["ok"]
    assert [f["data"] for f in anon.frames() if f.get("push") == "pub"] == [2]
    # No rule: refused, whoever asks.
    assert error(alice.request(cmd="join", channel="news")) == ErrorCode.FORBIDDEN
    assert error(alice.request(cmd="join", channel=">")) == ErrorCode.FORBIDDEN


def test_history_refused_is_recovered_false_and_nothing_replayed(hub: Hub) -> None:
    member, admin = (
        Peer(hub, identity=user("m", role="member")),
        Peer(hub, identity=user("a", role="admin")),
    )
    ok = member.request(cmd="join", channel="room:1")["ok"]
    for n in range(3):
        hub.publish("room:1", n, 0.0)
    since = {"offset": 0, "epoch": ok["epoch"]}
    for peer, recovered, replayed in ((member, False, []), (admin, True, [0, 1, 2])):
        peer.frames()
        reply = peer.request(cmd="join", channel="room:2", since=since)
        assert reply["ok"]["recovered"] is False  # another channel's epoch: a miss for all
        reply = peer.request(cmd="leave", channel="room:2")
        peer.request(cmd="leave", channel="room:1") if peer is member else None
        reply = peer.request(cmd="join", channel="room:1", since=since)
        assert reply["ok"]["recovered"] is recovered, reply
        assert [f["data"] for f in peer.pending if f.get("push") == "pub"] == replayed


def test_claims_bound_rows_and_columns_per_role(hub: Hub) -> None:
    """Tenant 1's member sees tenant 1's rows without `body`; tenant 2's admin sees tenant
    2's rows whole; a member's own filter is ANDed after the rule's."""
    m1 = Peer(hub, identity=user("m1", role="member", tenant=1))
    m1b = Peer(hub, identity=user("m1b", role="member", tenant=1))
    a2 = Peer(hub, identity=user("a2", role="admin", tenant=2))
    m1f = Peer(hub, identity=user("m1f", role="member", tenant=1))
    other = Peer(hub, identity=user("x", role="guest", tenant=1))
    changes = [{"event": "*", "table": "items"}]
    ids = {}
    for name, peer in (("m1", m1), ("m1b", m1b), ("a2", a2)):
        reply = peer.request(cmd="join", changes=changes)
        # The reply shows the client's own filter, not the rule's (Supabase's clients
        # compare them with what they asked for).
        assert reply["ok"]["changes"][0]["filter"] is None
        ids[name] = reply["ok"]["changes"][0]["id"]
    assert ids["m1"] == ids["m1b"] != ids["a2"]  # one subscription per (filter, columns)
    assert m1f.request(cmd="join", changes=[{"table": "items", "filter": "id=gt.2"}])["ok"]
    assert error(other.request(cmd="join", changes=changes)) == ErrorCode.FORBIDDEN
    # A plain join would get every row whole: refused for a filtered table.
    plain = Peer(hub, identity=user("m1p", role="member", tenant=1))
    assert error(plain.request(cmd="join", channel="pg:public:items")) == ErrorCode.FORBIDDEN
    for change in row_changes((1, "a", 1), (2, "b", 2), (3, "c", 1), (4, "d", 2)):
        hub.publish_change(change, 0.0)

    def rows(peer: Peer) -> list[dict[str, Any]]:
        return [f["data"]["record"] for f in peer.frames() if f.get("push") == "pub"]

    assert rows(m1) == rows(m1b) == [{"id": 1, "n": 1}, {"id": 3, "n": 1}]
    assert rows(a2) == [{"id": 2, "body": "b", "n": 2}, {"id": 4, "body": "d", "n": 2}]
    assert rows(m1f) == [{"id": 3, "n": 1}]
    assert rows(other) == []


def test_a_restricted_replay_keeps_to_the_filter_and_columns(hub: Hub) -> None:
    admin = Peer(hub, identity=user("a", role="admin", tenant=1))
    reply = admin.request(cmd="join", changes=[{"table": "items"}])["ok"]
    since = {"offset": reply["offset"], "epoch": reply["epoch"]}
    admin.request(cmd="leave", channel="pg:public:items")
    for change in row_changes((1, "a", 1), (2, "b", 2)):
        hub.publish_change(change, 0.0)
    admin.request(cmd="join", changes=[{"table": "items"}], since=since)
    assert [f["data"]["record"] for f in admin.pending] == [{"id": 1, "body": "a", "n": 1}]


def test_refresh_is_asked_then_expiry_closes_with_4419(hub: Hub, wall: Wall) -> None:
    peer = Peer(hub, identity=user("alice", expires=wall.now + 100))
    hub.tick(0.0)
    assert peer.frames() == []
    wall.now += 71  # 29 s left: within refresh_before
    due = hub.tick(71.0)
    assert peer.frames() == [{"push": "refresh", "expires_in": 29.0}]
    assert due <= 71.0 + 29.0
    hub.tick(72.0)
    assert peer.frames() == []  # asked once
    wall.now += 30
    hub.tick(101.0)
    assert hub.take_closing() == [(peer.id, CloseCode.TOKEN_EXPIRED, "token expired")]
    assert hub.stats.tokens_expired == 1


def test_a_refresh_for_the_same_user_extends_another_is_refused(hub: Hub, wall: Wall) -> None:
    peer = Peer(hub, identity=user("alice", expires=wall.now + 10))
    conn = hub.connection(peer.id)
    assert not hub.refresh_identity(conn, user("bob", expires=wall.now + 100), "r1")
    assert peer.frames()[0]["error"]["code"] == ErrorCode.UNAUTHORIZED
    assert hub.refresh_identity(conn, user("alice", expires=wall.now + 100), "r2")
    assert peer.frames() == [
        {"reply": "r2", "ok": {"client": peer.id, "user": "alice", "expires_in": 100.0}}
    ]
    wall.now += 50
    hub.tick(50.0)
    assert hub.take_closing() == []


def test_a_pending_connection_takes_nothing_but_connect(hub: Hub) -> None:
    early = Peer(hub, pending=True)
    late = Peer(hub, pending=True)
    ok = Peer(hub, pending=True)
    early.send(cmd="join", channel="chat:lobby")
    hub.authenticate(hub.connection(ok.id), user("carol"), 1.0, "c1")
    assert ok.frames() == [{"reply": "c1", "ok": {"client": ok.id, "user": "carol"}}]
    hub.tick(10.0)
    closing = {conn_id: code for conn_id, code, _ in hub.take_closing()}
    assert closing == {early.id: CloseCode.UNAUTHORIZED, late.id: CloseCode.UNAUTHORIZED}
    assert ok.request(cmd="join", channel="chat:lobby")["ok"]


def test_the_channels_claim_joins_server_side(hub: Hub) -> None:
    identity = Identity("dan", {"sub": "dan"}, anonymous=False, channels=("news", "bad channel"))
    peer = Peer(hub, identity=identity)
    hub.publish("news", "hi", 0.0)
    assert [f["data"] for f in peer.frames() if f.get("push") == "pub"] == ["hi"]
    assert list(hub.connection(peer.id).joins) == ["news"]


def test_the_connect_reply_names_the_server_side_joins(hub: Hub) -> None:
    peer = Peer(hub, pending=True)
    identity = Identity("dan", {"sub": "dan"}, anonymous=False, channels=("news", "bad channel"))
    hub.authenticate(hub.connection(peer.id), identity, 0.0, rid=1)
    assert peer.frames() == [
        {"reply": 1, "ok": {"client": peer.id, "user": "dan", "channels": ["news"]}}
    ]


def test_revocations(hub: Hub) -> None:
    a1 = Peer(hub, identity=user("alice", jti="t1"))
    a2 = Peer(hub, identity=user("alice", jti="t2"))
    bob = Peer(hub, identity=user("bob", jti="t3"))
    for peer in (a1, a2, bob):
        peer.request(cmd="join", channel="chat:lobby")
    assert hub.unsubscribe_user("alice", "chat:lobby", 0.0) == 2
    assert a1.frames() == [
        {"push": "unsubscribe", "channel": "chat:lobby", "reason": "removed by the server"}
    ]
    hub.publish("chat:lobby", 1, 0.0)
    assert [f["push"] for f in a2.frames()] == ["unsubscribe"]
    assert [f["push"] for f in bob.frames()] == ["pub"]
    assert hub.revoke_token("t2") == 1
    assert hub.disconnect_user("bob") == 1
    closing = {conn_id: code for conn_id, code, _ in hub.take_closing()}
    assert closing == {a2.id: CloseCode.REVOKED, bob.id: CloseCode.REVOKED}
    assert [c.id for c in hub.connections_of("alice")] == sorted([a1.id, a2.id])
    hub.disconnect(a1.id, 0.0)
    assert [c.id for c in hub.connections_of("alice")] == [a2.id]


def test_a_verdict_wins_over_the_rules(hub: Hub) -> None:
    """The `authorize` hook's answer: True opens what no rule does, False closes what the
    rules open, None leaves it to them."""
    peer = Peer(hub, identity=user("alice"))
    conn = hub.connection(peer.id)
    assert not hub.grant(conn, Action.SUBSCRIBE, "news").allowed
    hub.handle(conn, Join("j1", "news"), 0.0, True)
    hub.handle(conn, Join("j2", "chat:lobby"), 0.0, False)
    hub.handle(conn, Join("j3", "chat:x"), 0.0, None)
    replies = {f["reply"]: "ok" in f for f in peer.frames()}
    assert replies == {"j1": True, "j2": False, "j3": True}
