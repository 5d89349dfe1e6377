"""Authorization end to end: a hypothesis state machine of users, tenants and roles on a real
node (WebSocket clients on loopback) whose WAL source streams a real PostgreSQL.

Users alice and bob are in tenant t1, carol in t2, erin's token has no tenant; each connection
takes a role (member, admin or none), or is anonymous. The channel rules are fixed (RULES).
Steps: connect and disconnect, joins of names, patterns and the orders table (with and
without `changes` and client filters, with and without `since`), leaves, publishes, presence
(track, untrack, queries, joins with presence) and INSERT/UPDATE/DELETE/TRUNCATE in Postgres
for any tenant and owner.

After each step every connection is fenced (a ping round trip, after the source has
published every change made so far) and what it received is compared with a model computed
from the rules in plain Python (`may`, `may_pattern`, `visible`; never pyrt.hub.rules, which
is under test): nothing the rules exclude ever arrives (no other tenant's row, no `secret`
column for members, no publication or presence of a refused channel), and everything they
allow arrives, per channel in order and exactly once, with the replies the model expects.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import orjson
import pytest
import trio
from hypothesis import event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from nodekit import StartNode, until
from pgserver import PostgresServer
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url
from walkit import wal_source
from wskit import ws_url

from pyrt.hub.config import HubConfig
from pyrt.node.node import Node
from pyrt.plugins.wal import WalSource
from pyrt.postgres.connection import PgConnection
from pyrt.postgres.options import PgOptions
from pyrt.testing import TestTokens, open_auth

# -- the world: tables, rules, users -----------------------------------------------------------

SCHEMA = """
CREATE TABLE orders (id int PRIMARY KEY, tenant_id text NOT NULL, owner_id text NOT NULL,
                     n int NOT NULL, body text NOT NULL, secret text NOT NULL);
ALTER TABLE orders REPLICA IDENTITY FULL;
CREATE TABLE notes (LIKE orders INCLUDING ALL);
ALTER TABLE notes REPLICA IDENTITY FULL;
CREATE TABLE secrets (id int PRIMARY KEY, tenant_id text NOT NULL, body text NOT NULL);
CREATE PUBLICATION pyrt FOR TABLE orders, notes, secrets;
GRANT ALL ON orders, notes, secrets TO pyrt_scram;
"""
ORDERS = "pg:public:orders"
NOTES = "pg:public:notes"
SECRETS = "pg:public:secrets"
TABLES = {"orders": ORDERS, "notes": NOTES}
"""The tables whose rows the machine changes (secrets gets inserts only)."""
ORDER_COLUMNS = ("id", "tenant_id", "owner_id", "n", "body", "secret")
MEMBER_COLUMNS = ("id", "tenant_id", "owner_id", "n", "body")

RULES: tuple[dict[str, Any], ...] = (
    {
        "channel": "room:{claims.tenant}:>",
        "subscribe": "authenticated",
        "publish": "authenticated",
        "presence": ["role:member", "role:admin"],
        "history": "role:admin",
    },
    {"channel": "user:{sub}", "subscribe": "authenticated", "publish": "authenticated"},
    {
        "channel": "lobby",
        "subscribe": "anyone",
        "publish": "authenticated",
        "presence": "authenticated",
    },
    {
        "channel": ORDERS,
        "subscribe": ["role:member", "role:admin"],
        "filter": "tenant_id=eq.{claims.tenant}",
        "columns": {"member": list(MEMBER_COLUMNS)},
    },
    # Notes: every authenticated connection sees every row, whole (plain joins too).
    {"channel": NOTES, "subscribe": "authenticated"},
    # No rule for pg:public:secrets (nor for `other`): nobody gets them.
)

TENANTS = {"alice": "t1", "bob": "t1", "carol": "t2", "erin": None}
"""Each user's `tenant` claim (erin's token has none)."""
ROLES = ("member", "admin", None)
START_JOINS = ("room", "user", "lobby", "notes", "orders", "orders", "pattern")
USERS = st.sampled_from(["alice", "bob", "carol", "alice", "carol", "erin", None])
STAFF = ("member", "admin")

NAMES = (
    "room:t1:a",
    "room:t1:b",
    "room:t2:a",
    "room:t2:b",
    "user:alice",
    "user:bob",
    "user:carol",
    "user:erin",
    "lobby",
    "other",
)
TARGETS = (
    "room",
    "user",
    "lobby",
    "notes",
    "joined",
    "room",
    "room b",
    "foreign room",
    "user",
    "foreign user",
    "lobby",
    "other",
    "orders",
    "notes",
    "secrets",
)
"""What a step aims at, resolved per client by `AuthMachine.target` (so that most steps aim
at something the client may do, and the rest at what it may not)."""
AIMS = st.sampled_from(TARGETS)
JOINED = st.sampled_from(("joined",) * 6 + TARGETS)
"""For steps on a joined channel (publish, presence, leave): mostly one the client joined."""
PATTERNS = (
    "room:t1:*",
    "room:t1:>",
    "room:t2:*",
    "room:t2:>",
    "room:*:a",
    "room:>",
    "user:*",
    "lobby:>",
    "*",
    ">",
    "pg:>",
    "pg:public:*",
    "pg:*:orders",
)
FILTERS: dict[str | None, Callable[[dict[str, Any]], bool]] = {
    None: lambda row: True,
    "owner_id=eq.alice": lambda row: row["owner_id"] == "alice",
    "owner_id=eq.carol": lambda row: row["owner_id"] == "carol",
    "n=gt.5": lambda row: row["n"] > 5,
    "tenant_id=eq.t2": lambda row: row["tenant_id"] == "t2",
    "tenant_id=in.(t1,t2)": lambda row: row["tenant_id"] in ("t1", "t2"),
    "secret=like.s1%": lambda row: row["secret"].startswith("s1"),
}
"""The client filters the machine uses, with what they mean (a plain Python oracle)."""
EVENTS = ("*", "INSERT", "UPDATE", "DELETE")


@attrs.frozen
class Ident:
    """Who a connection is: anonymous (user None), or a user with a role claim (or none)."""

    user: str | None
    role: str | None = None

    @property
    def tenant(self) -> str | None:
        return None if self.user is None else TENANTS[self.user]

    def __str__(self) -> str:
        return "anonymous" if self.user is None else f"{self.user}/{self.role}/{self.tenant}"


# -- the model: the rules, in plain Python -----------------------------------------------------


def may(who: Ident, action: str, channel: str) -> bool:
    """Whether RULES let `who` do `action` (subscribe, publish, presence, history) on a
    channel name."""
    segments = channel.split(":")
    authenticated = who.user is not None
    if segments[0] == "room":
        if not authenticated or who.tenant is None or segments[1] != who.tenant:
            return False
        return {
            "subscribe": True,
            "publish": True,
            "presence": who.role in STAFF,
            "history": who.role == "admin",
        }[action]
    if segments[0] == "user":
        return authenticated and segments[1] == who.user
    if channel == "lobby":
        return action in ("subscribe", "history") or authenticated
    if channel == ORDERS:
        staff = who.role in STAFF and who.tenant is not None
        return staff and action in ("subscribe", "history", "presence")
    if channel == NOTES:
        return authenticated and action in ("subscribe", "history", "presence")
    return False


def may_pattern(who: Ident, pattern: str) -> bool:
    """Whether `who` may join a pattern: only its own tenant's rooms are covered by a rule
    with nothing refused before it."""
    return who.tenant is not None and pattern in (f"room:{who.tenant}:*", f"room:{who.tenant}:>")


def matches(pattern: str, channel: str) -> bool:
    """Whether a pattern (or name) matches a channel name (docs/matcher.md)."""
    p, c = pattern.split(":"), channel.split(":")
    for i, segment in enumerate(p):
        if segment == ">":
            return len(c) > i
        if i >= len(c) or (segment != "*" and segment != c[i]):
            return False
    return len(p) == len(c)


def visible(who: Ident, table: str, row: dict[str, Any]) -> bool:
    """Whether the forced filter lets `who` see a row of a table: only its tenant's orders."""
    if table == NOTES:
        return True
    return who.tenant is not None and row.get("tenant_id") == who.tenant


def column_names(who: Ident, table: str) -> list[str]:
    """The columns of a table `who` sees: members never see the orders' `secret`."""
    return list(MEMBER_COLUMNS if who.role == "member" and table == ORDERS else ORDER_COLUMNS)


def shown(who: Ident, table: str, row: dict[str, Any]) -> dict[str, Any]:
    names = column_names(who, table)
    return {k: v for k, v in row.items() if k in names}


# -- a client: one WebSocket connection, read by a task of its own ----------------------------


class Wire:
    """One WebSocket connection: every frame it receives, in order."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.closed: int | None = None
        self._changed = trio.Event()
        self._ids = itertools.count(1)

    async def read(self) -> None:
        try:
            while True:
                self.frames.append(orjson.loads(await self.ws.get_message()))
                self._wake()
        except ConnectionClosed as e:
            self.closed = e.reason.code
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        with trio.move_on_after(timeout):
            while not condition():
                if self.closed is not None:
                    return condition()
                await self._changed.wait()
            return True
        return False

    async def request(self, command: dict[str, Any]) -> dict[str, Any]:
        rid = next(self._ids)
        await self.ws.send_message(orjson.dumps({**command, "id": rid}).decode())

        def reply() -> dict[str, Any] | None:
            return next((f for f in self.frames if f.get("reply") == rid), None)

        assert await self.wait(lambda: reply() is not None), f"no reply to {command}"
        found = reply()
        assert found is not None
        return found

    def pushes(self) -> list[dict[str, Any]]:
        """The pushes that matter here (no pings)."""
        return [f for f in self.frames if "push" in f and f["push"] != "ping"]


# -- the model of one connection ---------------------------------------------------------------


@attrs.define(eq=False)
class RowSub:
    id: int
    event: str
    filter: str | None


@attrs.define(eq=False)
class Client:
    name: str
    who: Ident
    wire: Wire
    names: dict[str, bool] = attrs.field(factory=dict)
    """Channels joined by name -> joined with presence."""
    patterns: set[str] = attrs.field(factory=set)
    rows: dict[str, list[RowSub]] = attrs.field(factory=dict)
    """Table channel -> the row subscriptions of its join with `changes` (a table channel
    joined without is in `names` only: it gets every row)."""
    expected: list[dict[str, Any]] = attrs.field(factory=list)
    """Every push it should have received, in order, as `normalize` writes them."""
    commands: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    """The join command of each channel it joined by name (to join again, with `since`)."""

    def __str__(self) -> str:
        return f"{self.name}({self.who})"


@attrs.define
class Entry:
    """A presence entry of the model."""

    key: str
    client: Client
    meta: dict[str, Any]
    ref: str


# -- what stays for the whole test ------------------------------------------------------------


@attrs.define
class World:
    node: Node
    source: WalSource
    db: PgConnection
    nursery: trio.Nursery
    tokens: TestTokens = attrs.field(factory=TestTokens)
    events: int = 0
    """Row events (one per changed row, one per truncate) the source should have published."""
    next_id: Iterator[int] = attrs.field(factory=lambda: itertools.count(1))
    counts: dict[str, int] = attrs.field(factory=dict)
    """How often each outcome happened, over all examples (non-vacuity)."""

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        event(what)


WORLD: list[World] = []


def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs an async function of the test on its trio loop (the machine runs in a thread)."""
    return trio.from_thread.run(fn, *args)


# -- the machine -------------------------------------------------------------------------------


class AuthMachine(RuleBasedStateMachine):
    """Users join, publish, track presence and read history while rows change in Postgres;
    each connection gets exactly what the rules allow it."""

    def __init__(self) -> None:
        super().__init__()
        self.world = WORLD[0]
        self.clients: list[Client] = []
        self.labels = (f"c{i}" for i in itertools.count())
        self.ids: dict[str, Client] = {}
        """Connection ids learned from frames (`from`, presence `client`) -> their client."""
        self.rows: dict[str, dict[int, dict[str, Any]]] = {t: {} for t in TABLES}
        """The tables, as the model has them."""
        self.offsets: dict[str, int] = {}
        self.epochs: dict[str, str] = {}
        self.log: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        """Per channel, its publications of this example: (offset, what a subscriber gets)."""
        self.presence: dict[str, list[Entry]] = {}
        self.counter = itertools.count()
        self.db_step = False
        call(self._begin)

    async def _begin(self) -> None:
        world = self.world
        await world.db.simple_query("TRUNCATE orders, notes, secrets")
        world.events += 3
        await until(lambda: world.source.events >= world.events, "the truncates")
        now = trio.current_time()
        for channel in (*NAMES, ORDERS, NOTES, SECRETS):
            position = world.node.hub.history_position(channel, now)
            self.offsets[channel] = position.offset
            self.epochs[channel] = position.epoch
            self.log[channel] = []

    def teardown(self) -> None:
        call(self._end)

    async def _end(self) -> None:
        for client in self.clients:
            await client.wire.ws.aclose()
        await until(lambda: len(self.world.node.hub) == 0, "the hub to forget every client")

    # -- helpers -------------------------------------------------------------------------

    def pick(self, index: int) -> Client:
        return self.clients[index % len(self.clients)]

    def target(self, client: Client, aim: str, k: int) -> str:
        """The channel a step aims at, for this client."""
        user, tenant = client.who.user or "alice", client.who.tenant or "t1"
        # Its joins, channels of publications and presence first.
        joined = sorted(c for c in client.names if not c.startswith("pg:")) or sorted(client.names)
        if aim == "joined" and joined:
            return joined[k % len(joined)]
        other = "t2" if tenant == "t1" else "t1"
        others = [u for u in ("alice", "bob", "carol", "erin") if u != user]
        return {
            "joined": "lobby",
            "room": f"room:{tenant}:a",
            "room b": f"room:{tenant}:b",
            "foreign room": f"room:{other}:{'ab'[k % 2]}",
            "user": f"user:{user}",
            "foreign user": f"user:{others[k % len(others)]}",
            "lobby": "lobby",
            "other": "other",
            "orders": ORDERS,
            "notes": NOTES,
            "secrets": SECRETS,
        }[aim]

    def has_clients(self) -> bool:
        return bool(self.clients)

    def send(self, client: Client, command: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = call(lambda: client.wire.request(command))
        return reply

    def expect_refused(self, reply: dict[str, Any], code: int, what: str) -> None:
        assert "error" in reply, f"{what}: expected {code}, got {reply}"
        assert reply["error"]["code"] == code, f"{what}: expected {code}, got {reply}"
        self.world.count(f"refused {code}")

    def deliver(self, channel: str, item: dict[str, Any], to: Callable[[Client], bool]) -> None:
        for client in self.clients:
            if to(client):
                client.expected.append(item)

    def watchers(self, channel: str) -> Callable[[Client], bool]:
        return lambda c: c.names.get(channel) is True

    # -- connections ---------------------------------------------------------------------

    @initialize(
        people=st.lists(
            st.tuples(
                USERS,
                st.sampled_from(ROLES),
                st.lists(st.sampled_from(START_JOINS), max_size=4, unique=True),
            ),
            min_size=2,
            max_size=3,
        ),
        presence=st.booleans(),
    )
    def start(self, people: list[tuple[str | None, str | None, list[str]]], presence: bool) -> None:
        """A few connections, each joined to some channels, to start from."""
        for index, (user, role, joins) in enumerate(people):
            self.connect(user, role)
            for aim in joins:
                if aim in ("orders", "notes"):
                    self.join_changes(index, aim, [("*", None)], None)
                elif aim == "pattern":
                    self.join_pattern(index, f"room:{TENANTS.get(user or '') or 't1'}:*")
                else:
                    self.join(index, aim, 0, presence, None, False)

    @precondition(lambda self: len(self.clients) < 5)
    @rule(user=USERS, role=st.sampled_from(ROLES))
    def connect(self, user: str | None, role: str | None) -> None:
        who = Ident(user, role if user is not None else None)
        url = ws_url(self.world.node)
        if user is not None:
            claims: dict[str, Any] = {}
            if role is not None:
                claims["role"] = role
            if TENANTS[user] is not None:
                claims["tenant"] = TENANTS[user]
            url += "?token=" + self.world.tokens.token(user, **claims)

        async def open_wire() -> Wire:
            ws = await connect_websocket_url(self.world.nursery, url)
            wire = Wire(ws)
            self.world.nursery.start_soon(wire.read)
            return wire

        client = Client(next(self.labels), who, call(open_wire))
        note(f"{client}: connected")
        self.clients.append(client)

    @precondition(lambda self: len(self.clients) >= 2)
    @rule(index=st.integers(0, 4))
    def disconnect(self, index: int) -> None:
        client = self.pick(index)
        note(f"{client}: disconnects")
        self.clients.remove(client)
        self.check(client)  # what it got before it went
        hub = self.world.node.hub

        async def close() -> None:
            before = len(hub)
            await client.wire.ws.aclose()
            await until(lambda: len(hub) < before, "the hub to forget the client")

        call(close)
        for channel in list(self.presence):
            self.untrack_all(client, channel)

    # -- joins ---------------------------------------------------------------------------

    @precondition(has_clients)
    @rule(
        index=st.integers(0, 4),
        aim=AIMS,
        k=st.integers(0, 3),
        presence=st.booleans(),
        since=st.none() | st.integers(0, 6),
        wrong_epoch=st.booleans(),
    )
    def join(
        self,
        index: int,
        aim: str,
        k: int,
        presence: bool,
        since: int | None,
        wrong_epoch: bool,
    ) -> None:
        client = self.pick(index)
        channel = self.target(client, aim, k)
        command: dict[str, Any] = {"cmd": "join", "channel": channel, "presence": presence}
        since_offset = self.since(client, channel, since)
        if since_offset is not None:
            epoch = "not-the-epoch" if wrong_epoch else self.epochs[channel]
            command["since"] = {"offset": since_offset, "epoch": epoch}
        note(f"{client}: {command}")
        reply = self.send(client, command)
        who = client.who
        if channel in client.names:
            return self.expect_refused(reply, 409, "join again")
        if since is not None and wrong_epoch and may(who, "subscribe", channel):
            self.world.count("since with another epoch")
        # A plain join of the orders table is refused even to those who may read it: they
        # get their rows through `changes` only.
        allowed = may(who, "subscribe", channel) and channel != ORDERS
        if presence:
            allowed = allowed and may(who, "presence", channel)
        if not allowed:
            return self.expect_refused(reply, 403, f"{who} join {channel}")
        assert "ok" in reply, reply
        self.world.count("joined a name")
        client.commands[channel] = command
        self.joined(client, channel, reply["ok"], command.get("since"), presence)

    def since(self, client: Client, channel: str, back: int | None) -> int | None:
        """A position to resume from, `back` publications before the channel's latest: one
        of this example's (history from other examples is not in the model)."""
        if back is None:
            return None
        start = self.offsets[channel] - len(self.log[channel])
        return max(start, self.offsets[channel] - back)

    def joined(
        self,
        client: Client,
        channel: str,
        ok: dict[str, Any],
        since: dict[str, Any] | None,
        presence: bool,
    ) -> None:
        """Checks a join's reply and expects what follows it: the replay, then presence."""
        client.names[channel] = presence
        assert ok["channel"] == channel
        assert ok["offset"] == self.offsets[channel], (ok, self.offsets[channel])
        assert ok["epoch"] == self.epochs[channel]
        if since is not None:
            recover = since["epoch"] == self.epochs[channel] and may(client.who, "history", channel)
            assert ok["recovered"] is recover, (client.who, channel, since, ok)
            self.world.count("recovered" if recover else "not recovered")
            if recover:
                for offset, item in self.log[channel]:
                    if offset > since["offset"]:
                        # Its own publications too (one made without `self` comes back).
                        shown_item = item if "pub" in item else self.for_client(client, item)
                        if shown_item is not None:
                            client.expected.append(shown_item)
                            self.world.count(f"replayed on {channel.split(':')[0]}")
                            if "old_record" in shown_item and shown_item["old_record"] == {}:
                                self.world.count("old row withheld in a replay")
        else:
            assert "recovered" not in ok
        if presence:
            client.expected.append(self.state(channel))

    @precondition(has_clients)
    @rule(index=st.integers(0, 4), pattern=st.sampled_from(PATTERNS))
    def join_pattern(self, index: int, pattern: str) -> None:
        client = self.pick(index)
        note(f"{client}: join {pattern}")
        reply = self.send(client, {"cmd": "join", "channel": pattern})
        if pattern in client.patterns:
            return self.expect_refused(reply, 409, "join again")
        if not may_pattern(client.who, pattern):
            return self.expect_refused(reply, 403, f"{client.who} join {pattern}")
        assert reply.get("ok") == {"channel": pattern}, reply
        self.world.count("joined a pattern")
        client.patterns.add(pattern)

    @precondition(has_clients)
    @rule(
        index=st.integers(0, 4),
        table=st.sampled_from(["orders", "orders", "orders", "notes", "secrets", "*"]),
        entries=st.lists(
            st.tuples(st.sampled_from(EVENTS), st.sampled_from(list(FILTERS))),
            min_size=1,
            max_size=2,
        ),
        since=st.none() | st.integers(0, 6),
    )
    def join_changes(
        self,
        index: int,
        table: str,
        entries: list[tuple[str, str | None]],
        since: int | None,
    ) -> None:
        client = self.pick(index)
        who = client.who
        channel = f"pg:public:{table}"
        changes = [{"event": e, "table": table, "filter": f} for e, f in entries]
        command: dict[str, Any] = {"cmd": "join", "changes": changes}
        since_offset = self.since(client, channel, since) if table != "*" else None
        if since_offset is not None:
            command["since"] = {"offset": since_offset, "epoch": self.epochs[channel]}
        note(f"{client}: {command}")
        reply = self.send(client, command)
        if channel in client.names or channel in client.patterns:
            return self.expect_refused(reply, 409, "join again")
        allowed = channel in (ORDERS, NOTES) and may(who, "subscribe", channel)
        if allowed and channel == ORDERS and who.role == "member":
            # A filter on a column the role may not see would tell it about that column.
            allowed = not any(f is not None and f.startswith("secret") for _, f in entries)
        if not allowed:
            return self.expect_refused(reply, 403, f"{who} join {changes}")
        assert "ok" in reply, reply
        ok = reply["ok"]
        client.rows[channel] = [
            RowSub(given["id"], event, filter)
            for given, (event, filter) in zip(ok["changes"], entries, strict=True)
        ]
        self.world.count(f"joined {table} with changes")
        client.commands[channel] = command
        self.joined(client, channel, ok, command.get("since"), False)

    @precondition(has_clients)
    @rule(
        index=st.integers(0, 4),
        aim=JOINED,
        k=st.integers(0, 3),
        pattern=st.none() | st.sampled_from(PATTERNS),
    )
    def leave(self, index: int, aim: str, k: int, pattern: str | None) -> None:
        client = self.pick(index)
        channel = pattern or self.target(client, aim, k)
        note(f"{client}: leave {channel}")
        reply = self.send(client, {"cmd": "leave", "channel": channel})
        if channel not in client.names and channel not in client.patterns:
            return self.expect_refused(reply, 410, "leave")
        assert reply.get("ok") == {}, reply
        self.left(client, channel)

    def left(self, client: Client, channel: str) -> None:
        client.names.pop(channel, None)
        client.patterns.discard(channel)
        client.rows.pop(channel, None)
        self.untrack_all(client, channel)

    @precondition(lambda self: any(c.names for c in self.clients))
    @rule(index=st.integers(0, 4), k=st.integers(0, 3), back=st.integers(0, 6))
    def resume(self, index: int, k: int, back: int) -> None:
        """A client leaves a channel it joined by name and joins it again as it did, from
        `back` publications ago (as after a reconnect): what it may read of them again."""
        client = next(
            c for c in self.clients[index % len(self.clients) :] + self.clients if c.names
        )
        joined = sorted(client.names)
        channel = joined[k % len(joined)]
        note(f"{client}: leave {channel} and join it again from {back} back")
        assert self.send(client, {"cmd": "leave", "channel": channel}).get("ok") == {}
        presence = client.names[channel]
        self.left(client, channel)
        command = dict(client.commands[channel])
        offset = self.since(client, channel, back)
        command["since"] = {"offset": offset, "epoch": self.epochs[channel]}
        reply = self.send(client, command)
        assert "ok" in reply, reply
        ok = reply["ok"]
        if "changes" in command:
            entries = [(c["event"], c["filter"]) for c in command["changes"]]
            client.rows[channel] = [
                RowSub(given["id"], event, filter)
                for given, (event, filter) in zip(ok["changes"], entries, strict=True)
            ]
        self.joined(client, channel, ok, command["since"], presence)

    # -- publications --------------------------------------------------------------------

    @precondition(has_clients)
    @rule(index=st.integers(0, 4), aim=JOINED, k=st.integers(0, 3), echo=st.booleans())
    def publish(self, index: int, aim: str, k: int, echo: bool) -> None:
        client = self.pick(index)
        channel = self.target(client, aim, k)
        data = {"n": next(self.counter), "by": client.name}
        note(f"{client}: publish {data} to {channel} (self: {echo})")
        command = {"cmd": "publish", "channel": channel, "data": data, "ack": True, "self": echo}
        reply = self.send(client, command)
        if not may(client.who, "publish", channel) or channel not in client.names:
            return self.expect_refused(reply, 403, f"{client.who} publish to {channel}")
        assert "ok" in reply, reply
        self.offsets[channel] += 1
        offset = self.offsets[channel]
        assert reply["ok"] == {"offset": offset, "epoch": self.epochs[channel]}
        item = {"pub": channel, "offset": offset, "data": data, "from": client}
        self.log[channel].append((offset, item))
        self.world.count("published")
        if any(c is not client and self.subscribed(c, channel) for c in self.clients):
            self.world.count("published to others")
        self.deliver(
            channel,
            item,
            lambda c: (c is not client or echo) and self.subscribed(c, channel),
        )

    def subscribed(self, client: Client, channel: str) -> bool:
        return channel in client.names or any(matches(p, channel) for p in client.patterns)

    # -- presence ------------------------------------------------------------------------

    @precondition(has_clients)
    @rule(
        index=st.integers(0, 4),
        aim=JOINED,
        k=st.integers(0, 3),
        key=st.sampled_from(["k1", "k2", "alice"]),
    )
    def track(self, index: int, aim: str, k: int, key: str) -> None:
        client = self.pick(index)
        channel = self.target(client, aim, k)
        meta = {"n": next(self.counter)}
        note(f"{client}: track {key} {meta} in {channel}")
        reply = self.send(client, {"cmd": "track", "channel": channel, "key": key, "meta": meta})
        if not may(client.who, "presence", channel):
            return self.expect_refused(reply, 403, f"{client.who} track in {channel}")
        if channel not in client.names:
            return self.expect_refused(reply, 410, "track unjoined")
        assert "ok" in reply, reply
        entry = Entry(key, client, meta, reply["ok"]["ref"])
        self.presence.setdefault(channel, []).append(entry)
        self.world.count("tracked")
        self.deliver(channel, self.diff(channel, joins=[entry], leaves=[]), self.watchers(channel))

    @precondition(has_clients)
    @rule(
        index=st.integers(0, 4),
        aim=JOINED,
        k=st.integers(0, 3),
        key=st.sampled_from(["k1", "k2", "alice"]),
    )
    def untrack(self, index: int, aim: str, k: int, key: str) -> None:
        client = self.pick(index)
        channel = self.target(client, aim, k)
        note(f"{client}: untrack {key} in {channel}")
        reply = self.send(client, {"cmd": "untrack", "channel": channel, "key": key})
        if channel not in client.names:
            return self.expect_refused(reply, 410, "untrack unjoined")
        assert reply.get("ok") == {}, reply
        self.untrack_all(client, channel, key)

    def untrack_all(self, client: Client, channel: str, key: str | None = None) -> None:
        entries = self.presence.get(channel, [])
        gone = [e for e in entries if e.client is client and key in (None, e.key)]
        if not gone:
            return
        self.presence[channel] = [e for e in entries if e not in gone]
        self.deliver(channel, self.diff(channel, joins=[], leaves=gone), self.watchers(channel))

    @precondition(has_clients)
    @rule(index=st.integers(0, 4), aim=JOINED, k=st.integers(0, 3))
    def presence_query(self, index: int, aim: str, k: int) -> None:
        client = self.pick(index)
        channel = self.target(client, aim, k)
        note(f"{client}: presence of {channel}")
        reply = self.send(client, {"cmd": "presence", "channel": channel})
        if not may(client.who, "presence", channel):
            return self.expect_refused(reply, 403, f"{client.who} presence of {channel}")
        if channel not in client.names:
            return self.expect_refused(reply, 410, "presence unjoined")
        assert "ok" in reply, reply
        ok = reply["ok"]
        assert ok["channel"] == channel
        self.same_state(self.state(channel)["state"], ok["state"])
        self.world.count("presence read")

    def state(self, channel: str) -> dict[str, Any]:
        state = list(self.presence.get(channel, ()))  # as it is now
        return {"push": "presence_state", "channel": channel, "state": state}

    def diff(self, channel: str, joins: list[Entry], leaves: list[Entry]) -> dict[str, Any]:
        return {"push": "presence_diff", "channel": channel, "joins": joins, "leaves": leaves}

    # -- rows in Postgres ----------------------------------------------------------------

    def watched(self) -> bool:
        """Whether some connection joined a table (changes with none are of little use)."""
        return any(t in c.names for c in self.clients for t in TABLES.values())

    @precondition(watched)
    @rule(
        table=st.sampled_from(["orders", "orders", "notes"]),
        tenant=st.sampled_from(["t1", "t2"]),
        owner=st.sampled_from(["alice", "bob", "carol"]),
        n=st.integers(0, 9),
        secret=st.sampled_from(["s1-x", "s2-y"]),
    )
    def insert(self, table: str, tenant: str, owner: str, n: int, secret: str) -> None:
        row = {
            "id": next(self.world.next_id),
            "tenant_id": tenant,
            "owner_id": owner,
            "n": n,
            "body": f"body {n}",
            "secret": secret,
        }
        note(f"INSERT INTO {table} {row}")
        self.sql(
            f"INSERT INTO {table} VALUES ({{id}}, '{{tenant_id}}', '{{owner_id}}', {{n}},"
            " '{body}', '{secret}')".format(**row)
        )
        self.rows[table][row["id"]] = row
        self.row_event(table, "INSERT", row, None)

    @precondition(lambda self: self.watched() and any(self.rows.values()))
    @rule(
        table=st.sampled_from(["orders", "orders", "notes"]),
        pick=st.integers(0, 100),
        tenant=st.none() | st.sampled_from(["t1", "t2"]),
        owner=st.none() | st.sampled_from(["alice", "bob", "carol"]),
        n=st.none() | st.integers(0, 9),
        secret=st.none() | st.sampled_from(["s1-z", "s2-w"]),
    )
    def update(
        self,
        table: str,
        pick: int,
        tenant: str | None,
        owner: str | None,
        n: int | None,
        secret: str | None,
    ) -> None:
        rows = self.rows[table] or self.rows[table := "notes" if table == "orders" else "orders"]
        old = rows[sorted(rows)[pick % len(rows)]]
        new = dict(old)
        changes = (("tenant_id", tenant), ("owner_id", owner), ("n", n), ("secret", secret))
        for column, value in changes:
            if value is not None:
                new[column] = value
        note(f"UPDATE {table} {old} -> {new}")
        self.sql(
            f"UPDATE {table} SET tenant_id = '{{tenant_id}}', owner_id = '{{owner_id}}',"
            " n = {n}, secret = '{secret}' WHERE id = {id}".format(**new)
        )
        rows[new["id"]] = new
        self.row_event(table, "UPDATE", new, old)

    @precondition(lambda self: self.watched() and any(self.rows.values()))
    @rule(table=st.sampled_from(["orders", "orders", "notes"]), pick=st.integers(0, 100))
    def delete(self, table: str, pick: int) -> None:
        rows = self.rows[table] or self.rows[table := "notes" if table == "orders" else "orders"]
        old = rows.pop(sorted(rows)[pick % len(rows)])
        note(f"DELETE FROM {table} {old}")
        self.sql(f"DELETE FROM {table} WHERE id = {old['id']}")
        self.row_event(table, "DELETE", None, old)

    @precondition(watched)
    @rule(tenant=st.sampled_from(["t1", "t2"]))
    def insert_secret(self, tenant: str) -> None:
        """A row of a table no rule opens: nobody may get it."""
        self.sql(f"INSERT INTO secrets VALUES ({next(self.world.next_id)}, '{tenant}', 'x')")
        self.offsets[SECRETS] += 1

    @precondition(lambda self: self.watched() and sum(map(len, self.rows.values())) >= 3)
    @rule(table=st.sampled_from(["orders", "notes"]))
    def truncate(self, table: str) -> None:
        note(f"TRUNCATE {table}")
        self.sql(f"TRUNCATE {table}")
        self.rows[table].clear()
        self.row_event(table, "TRUNCATE", None, None)

    def sql(self, query: str) -> None:
        self.world.events += 1
        self.db_step = True
        call(self.world.db.simple_query, query)

    def row_event(
        self, table: str, kind: str, record: dict[str, Any] | None, old: dict[str, Any] | None
    ) -> None:
        channel = TABLES[table]
        self.offsets[channel] += 1
        offset = self.offsets[channel]
        item = {
            "row": kind,
            "table": channel,
            "offset": offset,
            "record": record,
            "old_record": old,
        }
        self.log[channel].append((offset, item))
        for client in self.clients:
            shown_item = self.for_client(client, item)
            if shown_item is not None:
                client.expected.append(shown_item)
                how = "with changes" if channel in client.rows else "plainly"
                self.world.count(f"{kind} of {table} to a {client.who.role} {how}")
            elif channel in client.rows:
                self.world.count(f"{kind} of {table} withheld")

    def for_client(self, client: Client, item: dict[str, Any]) -> dict[str, Any] | None:
        """What `client`'s joins of a table show of one of its row events; None: nothing."""
        channel, kind, who = item["table"], item["row"], client.who
        if channel not in client.names:
            return None
        subs = client.rows.get(channel)
        out: dict[str, Any] = {"row": kind, "table": channel, "offset": item["offset"]}
        out["columns"] = column_names(who, channel)
        # The ids of its subscriptions: the frame's `ids` name those that matched.
        out["mine"] = {s.id for s in subs or ()}
        if kind == "TRUNCATE":
            # Every subscription for every event gets it, whatever its filter: no row is in
            # it. A plain join gets every event.
            out["ids"] = set() if subs is None else {s.id for s in subs if s.event == "*"}
            return out if subs is None or out["ids"] else None
        row = item["old_record"] if kind == "DELETE" else item["record"]
        if not visible(who, channel, row):
            return None
        if subs is None:
            out["ids"] = set()
        else:
            out["ids"] = {s.id for s in subs if s.event in ("*", kind) and FILTERS[s.filter](row)}
            if not out["ids"]:
                return None
        if item["record"] is not None:
            out["record"] = shown(who, channel, item["record"])
        if item["old_record"] is not None:
            old = item["old_record"]
            # The row as it was, only if it was this client's to see.
            if visible(who, channel, old):
                out["old_record"] = shown(who, channel, old)
            else:
                out["old_record"] = {}
                self.world.count("old row withheld")
        return out

    # -- the invariant -------------------------------------------------------------------

    @invariant()
    def everyone_got_what_the_rules_allow(self) -> None:
        call(self._fence)
        for client in self.clients:
            self.check(client)

    async def _fence(self) -> None:
        world = self.world
        if self.db_step:
            self.db_step = False
            await until(lambda: world.source.events >= world.events, "the source's events")
        for client in self.clients:
            # Until what it should have arrived (or 20 s: `check` then says what is
            # missing), then a ping round trip: anything sent before it has arrived too.
            wire, expected = client.wire, len(client.expected)
            await wire.wait(lambda w=wire, n=expected: len(w.pushes()) >= n)
            await wire.request({"cmd": "ping"})

    def check(self, client: Client) -> None:
        """What `client` received is exactly what it should have, per channel in order."""
        got = client.wire.pushes()
        assert client.wire.closed is None, f"{client} closed with {client.wire.closed}"
        by_channel: dict[str, list[Any]] = {}
        for frame in got:
            channel = frame.get("channel", "")
            by_channel.setdefault(channel, []).append(("got", frame))
        expected: dict[str, list[Any]] = {}
        for item in client.expected:
            channel = item.get("pub") or item.get("channel") or item["table"]
            expected.setdefault(channel, []).append(item)
        assert set(by_channel) <= set(expected), (
            f"{client} got pushes on {sorted(set(by_channel) - set(expected))}: "
            f"{[f for _, f in by_channel.get(next(iter(set(by_channel) - set(expected))), [])][:3]}"
        )
        for channel, items in expected.items():
            frames = [f for _, f in by_channel.get(channel, [])]
            assert len(frames) == len(items), (
                f"{client} on {channel}: expected {len(items)} pushes, got {len(frames)}:"
                f"\nexpected {items}\ngot {frames}"
            )
            for item, frame in zip(items, frames, strict=True):
                self.same(client, item, frame)

    def same(self, client: Client, item: dict[str, Any], frame: dict[str, Any]) -> None:
        where = f"{client}: expected {item}, got {frame}"
        if "pub" in item:
            assert frame["push"] == "pub", where
            assert frame["channel"] == item["pub"], where
            assert frame["offset"] == item["offset"], where
            assert frame["epoch"] == self.epochs[item["pub"]], where
            assert frame["data"] == item["data"], where
            self.same_client(item["from"], frame.get("from"), where)
        elif "row" in item:
            assert frame["push"] == "pub", where
            assert frame["channel"] == item["table"], where
            assert frame["offset"] == item["offset"], where
            assert frame["epoch"] == self.epochs[item["table"]], where
            data = frame["data"]
            assert data["type"] == item["row"], where
            # (A replay to a plain join is the publication as history has it: no ids.)
            assert set(frame.get("ids", ())) & item["mine"] == item["ids"], where
            assert [c["name"] for c in data["columns"]] == item["columns"], where
            for name in ("record", "old_record"):
                assert data.get(name) == item.get(name), f"{name}: {where}"
            if client.who.role == "member" and item["table"] == ORDERS:
                assert "secret" not in orjson.dumps(data).decode(), where
        elif item["push"] == "presence_state":
            assert frame["push"] == "presence_state", where
            assert frame["channel"] == item["channel"], where
            self.same_state(item["state"], frame["state"])
        else:
            assert frame["push"] == "presence_diff", where
            assert frame["channel"] == item["channel"], where
            self.same_state(item["joins"], frame["joins"])
            self.same_state(item["leaves"], frame["leaves"])

    def same_state(self, entries: list[Entry], state: dict[str, list[dict[str, Any]]]) -> None:
        got = sorted(
            ((key, e["ref"], e["client"], e["meta"]) for key, es in state.items() for e in es),
            key=lambda e: e[1],
        )
        want = sorted(entries, key=lambda e: e.ref)
        where = (
            f"presence: expected {[(e.key, e.ref, e.client.name, e.meta) for e in want]}, got {got}"
        )
        assert len(got) == len(want), where
        for entry, (key, ref, client_id, meta) in zip(want, got, strict=True):
            assert (key, ref, meta) == (entry.key, entry.ref, entry.meta), where
            self.same_client(entry.client, client_id, where)

    def same_client(self, client: Client, client_id: Any, where: str) -> None:
        """The connection id `client_id` is `client`'s (learned the first time it shows)."""
        assert isinstance(client_id, str), where
        known = self.ids.setdefault(client_id, client)
        assert known is client, f"{where}: {client_id} is {known}'s id, not {client}'s"


# -- the test ----------------------------------------------------------------------------------


@pytest.fixture
def auth_db(postgres: PostgresServer) -> Iterator[str]:
    db = postgres.new_database("auth")
    postgres.sql(SCHEMA, db)
    yield db
    postgres.drop_replication_slots(db)


async def test_each_connection_gets_what_the_rules_allow(
    postgres: PostgresServer, auth_db: str, start_node: StartNode, nursery: trio.Nursery
) -> None:
    source = wal_source(postgres, auth_db)
    node = await start_node(
        auth=open_auth(RULES),
        transports=["websocket"],
        sources=[source],
        hub=HubConfig(command_rate=0.0),
    )
    options = PgOptions(
        host=postgres.host,
        port=postgres.port,
        user="pyrt_scram",
        password="secret",
        database=auth_db,
    )
    async with await options.connect() as db:
        world = World(node, source, db, nursery)
        WORLD[:] = [world]
        try:
            await trio.to_thread.run_sync(
                lambda: run_state_machine_as_test(
                    AuthMachine,
                    settings=settings(
                        max_examples=150, stateful_step_count=40, derandomize=True, deadline=None
                    ),
                )
            )
        finally:
            WORLD.clear()
    counts = world.counts
    print(sorted(counts.items()))
    # The machine reached the cases it is for: rows shown and withheld, refusals, replays.
    for outcome in (
        "INSERT of orders withheld",
        "INSERT of orders to a member with changes",
        "UPDATE of orders withheld",
        "DELETE of orders to a member with changes",
        "joined a pattern",
        "recovered",
        "not recovered",
        "refused 403",
        "refused 410",
        "replayed on pg",
        "published to others",
        "tracked",
        "presence read",
    ):
        assert counts.get(outcome, 0) >= 3, (outcome, sorted(counts.items()))
