"""`Hub.replace_identity`: a dialect's new token (Supabase's `access_token` push) for a live
connection. Sans-IO: real frames in, the outbox read back."""

from __future__ import annotations

import itertools
from typing import Any

import attrs
import orjson
import pytest

from pyrt.hub.deliverer import MemoryDeliverer
from pyrt.hub.hub import Hub, HubConfig
from pyrt.hub.identity import ANONYMOUS, Action, Identity
from pyrt.hub.rules import Rules

RULES: list[dict[str, Any]] = [
    {"channel": "lobby", "subscribe": "anonymous"},
    {"channel": "news", "subscribe": "anyone"},
    {"channel": "staff", "subscribe": "anyone", "presence": "authenticated"},
    {"channel": "user:{sub}", "subscribe": "authenticated"},
    {"channel": "pg:public:items", "subscribe": "anyone", "filter": "tenant=eq.{claims.tenant}"},
]


def make_hub(rules: list[dict[str, Any]] | None = RULES) -> Hub:
    epochs = itertools.count(1)
    hub = Hub(
        HubConfig(), replica="n1", new_epoch=lambda: f"e{next(epochs)}", deliverer=MemoryDeliverer
    )
    if rules is not None:
        hub.set_rules(Rules.from_config(rules))
    return hub


def who(user: str = "", anonymous: bool = False, **claims: Any) -> Identity:
    return Identity(user=user, claims={"sub": user, **claims}, anonymous=anonymous)


def join(hub: Hub, conn_id: str, channel: str, **fields: Any) -> None:
    frame = {"id": 1, "cmd": "join", "channel": channel, **fields}
    hub.receive(conn_id, orjson.dumps(frame), 0.0)


def pushes(hub: Hub, conn_id: str) -> list[dict[str, Any]]:
    outbox = hub.connection(conn_id).outbox
    return [orjson.loads(f) for f in outbox.pop()] if len(outbox) else []


def test_a_connection_without_a_user_takes_a_users_identity_and_keeps_what_it_may() -> None:
    hub = make_hub()
    conn = hub.open(0.0, identity=ANONYMOUS)
    for channel in ("lobby", "news"):
        join(hub, conn.id, channel)
    pushes(hub, conn.id)
    assert hub.replace_identity(conn, who("alice")) is None
    assert conn.identity.user == "alice"
    assert hub.connections_of("alice") == [conn]
    assert sorted(conn.joins) == ["news"]  # lobby is for anonymous connections only
    (told,) = pushes(hub, conn.id)
    assert told["push"] == "unsubscribe"
    assert told["channel"] == "lobby"
    assert "subscribe" in told["reason"]
    # The new identity's grants are asked from now on.
    join(hub, conn.id, "user:alice")
    assert "user:alice" in conn.joins


def test_a_users_connection_takes_only_the_same_users_token() -> None:
    hub = make_hub()
    conn = hub.open(0.0, identity=who("alice"))
    join(hub, conn.id, "user:alice")
    refused = hub.stats.auth_refused
    assert hub.replace_identity(conn, who("bob")) == "a new token must be for the same user"
    assert hub.replace_identity(conn, ANONYMOUS) == "a new token must be for the same user"
    assert conn.identity.user == "alice"
    assert "user:alice" in conn.joins
    assert hub.stats.auth_refused == refused + 2
    fresh = attrs.evolve(who("alice"), expires=99.0)
    assert hub.replace_identity(conn, fresh) is None
    assert conn.identity.expires == 99.0
    assert "user:alice" in conn.joins


@pytest.mark.parametrize(("tenant", "kept"), [("a", True), ("b", False)])
def test_a_table_join_ends_when_its_forced_filter_would_change(tenant: str, kept: bool) -> None:
    hub = make_hub()
    conn = hub.open(0.0, identity=who(tenant="a"))  # an API key's role: no user
    join(hub, conn.id, "pg:public:items", changes=[{"event": "*", "table": "items"}])
    assert "pg:public:items" in conn.joins
    pushes(hub, conn.id)
    assert hub.replace_identity(conn, who("alice", tenant=tenant)) is None
    assert ("pg:public:items" in conn.joins) is kept
    told = pushes(hub, conn.id)
    if kept:
        assert told == []
    else:
        assert [t["push"] for t in told] == ["unsubscribe"]
        assert "join it again" in told[0]["reason"]


def test_presence_joins_are_checked_for_presence_too() -> None:
    hub = make_hub()
    conn = hub.open(0.0, identity=who("", role="service_role"))
    join(hub, conn.id, "staff", presence=True)
    assert conn.joins["staff"].presence
    assert hub.replace_identity(conn, who("", anonymous=True, role="anon")) is None
    assert "staff" not in conn.joins
    # The application's hook, asked by the node, wins over the rules.
    conn = hub.open(0.0, identity=who("", role="service_role"))
    join(hub, conn.id, "staff", presence=True)
    verdicts = {(Action.PRESENCE, "staff"): True}
    assert hub.replace_identity(conn, who("", anonymous=True), verdicts) is None
    assert "staff" in conn.joins


def test_without_rules_the_identity_is_just_replaced() -> None:
    hub = make_hub(rules=None)
    conn = hub.open(0.0, identity=ANONYMOUS)
    join(hub, conn.id, "lobby")
    assert hub.replace_identity(conn, who("alice")) is None
    assert conn.identity.user == "alice"
    assert "lobby" in conn.joins
