"""The Supabase endpoint under `[auth]`: apikeys verified as Supabase's keys, a join's
`access_token` verified at join and on refresh, private channels and postgres_changes under
the channel rules, expiry and revocation closing one channel; the official `realtime`
client from PyPI where it can say it, raw frames for the JWT attack matrix.

docs/supabase.md ("Keys, tokens and channel rules") is the contract these tests hold pyrt to.
"""

from __future__ import annotations

import base64
import functools
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import supabasekit
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nodekit import StartNode, until
from pgserver import PostgresServer
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from supabasekit import AsyncioThread, Subscription, config, receive, send, v1
from trio_websocket import WebSocketConnection, open_websocket_url
from walkit import run_sql, wal_source

from pyrt.node.auth import AuthConfig
from pyrt.node.node import Node

SECRET = "the-supabase-project-jwt-secret-at-least-32-bytes"
SERVER_KEY = "server-api-key"
BROWSER_KEY = "browser-anon-key"

pytestmark = [
    pytest.mark.filterwarnings("ignore:ConnectionClosed.code is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:ConnectionClosed.reason is deprecated:DeprecationWarning"),
]


def sign(
    claims: dict[str, Any],
    *,
    expires_in: float | None = 3600,
    key: Any = SECRET,
    alg: str = "HS256",
    headers: dict[str, Any] | None = None,
) -> str:
    body = {"iat": int(time.time()), **claims}
    if expires_in is not None:
        body["exp"] = int(time.time() + expires_in)
    return jwt.encode(body, key, algorithm=alg, headers=headers)


# Supabase's keys: JWTs of the project's secret, with a role and no `aud`.
ANON = sign({"iss": "supabase", "ref": "project", "role": "anon"}, expires_in=10 * 365 * 86400)
SERVICE = sign({"iss": "supabase", "ref": "project", "role": "service_role"})


def user(sub: str, **options: Any) -> str:
    """A user's access token, as Supabase Auth mints them."""
    claims = {"sub": sub, "role": "authenticated", "aud": "authenticated"}
    return sign({**claims, **options.pop("claims", {})}, **options)


RULES: tuple[dict[str, Any], ...] = (
    {"channel": "lobby", "subscribe": "anyone", "publish": "anyone", "presence": "authenticated"},
    {"channel": "user:{sub}", "subscribe": "authenticated", "publish": "authenticated"},
    {"channel": "audit", "subscribe": "role:service_role", "publish": "role:service_role"},
    {"channel": "db", "subscribe": "anyone"},
    {"channel": "fence", "subscribe": "anyone"},
    {"channel": "pg:public:items", "subscribe": "authenticated", "filter": "body=eq.{sub}"},
    {"channel": "pg:public:other", "subscribe": "anyone"},
)


def supabase_auth(**options: Any) -> AuthConfig:
    """The `[auth]` of a Supabase project: its JWT secret, audience `authenticated`."""
    options.setdefault("rules", RULES)
    return AuthConfig(jwt_secret=SECRET, audience="authenticated", **options)


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    return functools.partial(
        start_node,
        api_keys=(SERVER_KEY,),
        transports=("supabase",),
        transport_options={"supabase": {"apikeys": [BROWSER_KEY]}},
        auth=supabase_auth(),
    )


@asynccontextmanager
async def realtime(
    aio: AsyncioThread, node: Node, key: str = ANON, token: str | None = None
) -> AsyncIterator[AsyncRealtimeClient]:
    """The official client with `key` as its apikey and `token` as its access token."""
    async with supabasekit.realtime(aio, node, key) as client:
        if token is not None:
            await aio.run(client.set_auth(token))
        yield client


def private(**options: Any) -> dict[str, Any]:
    return config(private=True, **options)


def error_of(sub: Subscription) -> str:
    """What the client reported with its CHANNEL_ERROR."""
    assert RealtimeSubscribeStates.CHANNEL_ERROR in sub.states, sub.states
    error = sub.errors[sub.states.index(RealtimeSubscribeStates.CHANNEL_ERROR)]
    return str(error)


# -- private channels, with the official client --------------------------------------------------


async def test_a_private_channel_with_a_user_jwt_is_subscribed(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=user("alice")) as client:
        mine = await Subscription(client, "user:alice", private(echo=True)).subscribe(aio)
        await aio.run(mine.channel.send_broadcast("hi", {"n": 1}))
        await until(lambda: bool(mine.broadcasts), "alice's own broadcast (self)")
        assert mine.broadcasts == [{"event": "hi", "payload": {"n": 1}}]
        # The session is alice's: the hub knows it by her id.
        (conn,) = node.hub.connections_of("alice")
        assert conn.identity.role == "authenticated"
        # Another user's channel: refused at join, with Supabase's words and the rule's.
        theirs = await Subscription(client, "user:bob", private()).attempt(aio)
        assert theirs.states[0] == RealtimeSubscribeStates.CHANNEL_ERROR
        assert (
            "Unauthorized: You do not have permissions to read from this Channel topic: user:bob"
            in error_of(theirs)
        )
    await until(lambda: len(node.hub) == 0, "the client's channels gone with it")


async def test_a_public_channel_is_under_the_rules_too(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=user("alice")) as client:
        # `private: false` changes nothing: the rules decide.
        refused = await Subscription(client, "user:bob").attempt(aio)
        assert "Unauthorized" in error_of(refused)
        await Subscription(client, "user:alice").subscribe(aio)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (user("alice", expires_in=-30), "InvalidJWTToken: token expired"),
        (user("alice", key="another-secret-that-is-also-32-bytes-long"), "bad signature"),
        (user("alice", claims={"aud": "somebody-else"}), "wrong audience (aud)"),
        ("not-a-jwt", "InvalidJWTToken: malformed token"),
    ],
)
async def test_a_bad_access_token_is_refused_at_join(
    start_node: StartNode, aio: AsyncioThread, token: str, reason: str
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=token) as client:
        sub = await Subscription(client, "user:alice", private()).attempt(aio)
        assert sub.states[0] == RealtimeSubscribeStates.CHANNEL_ERROR
        assert "InvalidJWTToken: " in error_of(sub)
        assert reason in error_of(sub)
    assert node.hub.connections_of("alice") == []


async def test_the_anon_key_reads_only_what_anyone_may(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:  # no user: the anon key's role
        await Subscription(client, "lobby").subscribe(aio)
        refused = await Subscription(client, "user:alice", private()).attempt(aio)
        assert "Unauthorized" in error_of(refused)
        audit = await Subscription(client, "audit", private()).attempt(aio)
        assert "Unauthorized" in error_of(audit)
        # A table whose rule says authenticated.
        table = Subscription(client, "db").watch_changes("*", table="items")
        await table.attempt(aio)
        assert (
            "Unauthorized: You do not have permissions to read from this Channel topic: "
            "pg:public:items" in error_of(table)
        )
    await until(lambda: len(node.hub) == 0, "the client's channels gone with it")


async def test_a_service_role_key_is_its_role(start_node: StartNode, aio: AsyncioThread) -> None:
    node = await start_node()
    async with realtime(aio, node, key=SERVICE) as client:
        await Subscription(client, "audit", private()).subscribe(aio)
        refused = await Subscription(client, "user:alice", private()).attempt(aio)
        assert "Unauthorized" in error_of(refused)
    async with realtime(aio, node, key=SERVER_KEY) as client:
        await Subscription(client, "audit", private()).subscribe(aio)
    async with realtime(aio, node, key=BROWSER_KEY) as client:
        refused = await Subscription(client, "audit", private()).attempt(aio)
        assert "Unauthorized" in error_of(refused)


# -- refresh and expiry ----------------------------------------------------------------------


async def test_an_expired_token_ends_its_channel_not_the_socket(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:
        # A channel of the anon key on this socket, then one of alice's short-lived token
        # (set without `set_auth`, which would send it to the lobby too).
        lobby = await Subscription(client, "lobby", config(echo=True)).subscribe(aio)
        client.access_token = user("alice", expires_in=2)
        mine = await Subscription(client, "user:alice", private()).subscribe(aio)
        await until(lambda: len(mine.states) >= 3, "the expiry", timeout=10)
        assert mine.states[1:] == [
            RealtimeSubscribeStates.CHANNEL_ERROR,
            RealtimeSubscribeStates.CLOSED,
        ]
        error = json.loads(str(mine.errors[1]))
        assert error["extension"] == "system"
        assert error["status"] == "error"
        assert error["channel"] == "user:alice"
        assert error["message"].startswith("InvalidJWTToken: Token has expired ")
        await until(lambda: node.hub.connections_of("alice") == [], "the channel's session ended")
        assert client.is_connected
        await aio.run(lobby.channel.send_broadcast("still", {"here": True}))
        await until(lambda: bool(lobby.broadcasts), "the other channel's broadcast")
        assert lobby.states == [RealtimeSubscribeStates.SUBSCRIBED]


async def test_a_refreshed_token_keeps_the_channel(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=user("alice", expires_in=2)) as client:
        mine = await Subscription(client, "user:alice", private(echo=True)).subscribe(aio)
        await aio.run(client.set_auth(user("alice", expires_in=600)))
        await until(
            lambda: (node.hub.connections_of("alice")[0].identity.expires or 0) > time.time() + 60,
            "the new token taken",
        )
        await trio.sleep(3)  # past the first token's expiry
        assert mine.states == [RealtimeSubscribeStates.SUBSCRIBED]
        await aio.run(mine.channel.send_broadcast("after", {}))
        await until(lambda: bool(mine.broadcasts), "a broadcast after the first token's exp")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (user("alice", expires_in=-5), "InvalidJWTToken: token expired"),
        (user("alice", key="another-secret-that-is-also-32-bytes-long"), "bad signature"),
        (user("bob"), "Unauthorized: a new token must be for the same user"),
        (ANON, "Unauthorized: a new token must be for the same user"),
    ],
)
async def test_a_bad_refresh_ends_the_channel(
    start_node: StartNode, aio: AsyncioThread, token: str, reason: str
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=user("alice")) as client:
        mine = await Subscription(client, "user:alice", private()).subscribe(aio)
        await aio.run(client.set_auth(token))
        await until(lambda: len(mine.states) >= 3, "the channel's end")
        assert mine.states[1:] == [
            RealtimeSubscribeStates.CHANNEL_ERROR,
            RealtimeSubscribeStates.CLOSED,
        ]
        assert reason in json.loads(str(mine.errors[1]))["message"]
        await until(lambda: node.hub.connections_of("alice") == [], "the channel's session ended")


async def test_the_anon_key_channel_becomes_the_users_on_refresh(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node) as client:
        lobby = await Subscription(client, "lobby", config(key="alice")).subscribe(aio)
        refused = node.hub.stats.auth_refused
        await aio.run(lobby.channel.track({"name": "alice"}))  # presence: authenticated only
        await until(lambda: node.hub.stats.auth_refused > refused, "the refused track")
        assert node.hub.presence("lobby") == {}
        await aio.run(client.set_auth(user("alice")))
        await until(lambda: bool(node.hub.connections_of("alice")), "the channel is alice's")
        await aio.run(lobby.channel.track({"name": "alice"}))
        await until(lambda: bool(node.hub.presence("lobby")), "alice's presence")
        assert list(node.hub.presence("lobby")) == ["alice"]
        assert lobby.states == [RealtimeSubscribeStates.SUBSCRIBED]


async def test_a_join_the_new_identity_may_not_keep_ends_with_a_system_error(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    """An anon-key channel subscribed to a table open to anyone, then the user's token: the
    table's join stays (same grant). One that the new identity may not hold is ended."""
    rules = (
        {"channel": "lobby", "subscribe": ["anonymous", "role:anon"]},
        {"channel": "db", "subscribe": "anyone"},
        {"channel": "pg:public:other", "subscribe": "anyone"},
    )
    node = await start_node(auth=supabase_auth(rules=rules))
    async with realtime(aio, node) as client:
        lobby = await Subscription(client, "lobby").subscribe(aio)
        db = await Subscription(client, "db").watch_changes("*", table="other").subscribe(aio)
        await aio.run(client.set_auth(user("alice")))
        await until(lambda: len(lobby.states) >= 2, "the lobby's end")
        assert lobby.states[1] == RealtimeSubscribeStates.CHANNEL_ERROR
        message = json.loads(str(lobby.errors[1]))["message"]
        assert message.startswith("Unauthorized: no longer subscribed to lobby: ")
        assert db.states == [RealtimeSubscribeStates.SUBSCRIBED]


# -- postgres_changes under claims-bound filters -----------------------------------------------


async def test_postgres_changes_honour_the_claims_bound_filter(
    postgres: PostgresServer, wal_db: str, aio: AsyncioThread, start_node: StartNode
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery=nursery, sources=[wal_source(postgres, wal_db)])
        async with (
            realtime(aio, node, token=user("alice")) as a,
            realtime(aio, node, token=user("bob")) as b,
        ):
            alice = Subscription(a, "db").watch_changes("*", table="items")
            alice.watch_changes("INSERT", table="items", filter="n=gt.5")
            await alice.subscribe(aio)
            bob = await Subscription(b, "db").watch_changes("*", table="items").subscribe(aio)
            fence = await Subscription(b, "fence").watch_changes("*", table="other").subscribe(aio)
            # The reply echoes the bindings as sent (the forced filter is the server's).
            assert [c.filter for c in alice.channel.postgres_changes_callbacks] == [None, "n=gt.5"]
            await run_sql(
                postgres,
                wal_db,
                "INSERT INTO items VALUES (1, 'alice', 1), (2, 'bob', 2), (3, 'alice', 9),"
                " (4, 'carol', 9), (5, 'bob''; or 1=1', 9);"
                "UPDATE items SET n = 10 WHERE id = 2;"
                "INSERT INTO other VALUES (1, 'fence');",
            )
            await until(lambda: bool(fence.changes), "the fence", timeout=20)
            await until(lambda: len(bob.changes) >= 2 and len(alice.changes) >= 3, "the rows")
            await trio.sleep(0.2)
        node.stop()
    seen_by_alice = sorted((c["event"], c["data"]["record"]["id"]) for c in alice.changes)
    assert seen_by_alice == [("*", 1), ("*", 3), ("INSERT", 3)]
    assert [(c["data"]["type"], c["data"]["record"]["id"]) for c in bob.changes] == [
        ("INSERT", 2),
        ("UPDATE", 2),
    ]


# -- apikeys at the door -----------------------------------------------------------------------


async def upgrade(
    node: Node, query: str = "", headers: dict[str, str] | None = None
) -> httpx.Response:
    """A WebSocket upgrade request over plain HTTP (refusals come before the upgrade)."""
    async with httpx.AsyncClient() as client:
        return await client.get(
            f"http://127.0.0.1:{node.port}/realtime/v1/websocket{query}",
            headers={
                "connection": "upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
                **(headers or {}),
            },
        )


async def accepted(node: Node, query: str, headers: dict[str, str] | None = None) -> bool:
    """Whether a WebSocket opens (and answers a heartbeat) with `query` and `headers`."""
    url = f"ws://127.0.0.1:{node.port}/realtime/v1/websocket{query}"
    async with open_websocket_url(url, extra_headers=list((headers or {}).items())) as ws:
        await send(ws, v1("phoenix", "heartbeat", {}))
        return bool((await receive(ws))["payload"]["status"] == "ok")


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        (f"?apikey={ANON}", {}),
        (f"?apikey={SERVICE}", {}),
        (f"?apikey={SERVER_KEY}", {}),
        ("", {"x-api-key": BROWSER_KEY}),
        ("", {"x-api-key": ANON}),
    ],
)
async def test_supabase_keys_open_the_socket(
    start_node: StartNode, query: str, headers: dict[str, str]
) -> None:
    node = await start_node()
    assert await accepted(node, query, headers)


@pytest.mark.parametrize(
    ("query", "headers", "status", "error"),
    [
        (f"?apikey={user('alice')}", {}, 403, "an apikey's role must be anon or service_role"),
        (
            "?apikey=" + sign({"role": "anon"}, expires_in=-10),
            {},
            401,
            "invalid apikey: token expired",
        ),
        (
            "?apikey=" + sign({"role": "anon"}, key="another-secret-that-is-also-32-bytes-long"),
            {},
            401,
            "invalid apikey: bad signature",
        ),
        # The user's token in the wrong place: not an apikey.
        (f"?token={user('alice')}", {}, 401, "missing apikey"),
        ("", {"authorization": f"Bearer {user('alice')}"}, 401, "missing apikey"),
    ],
)
async def test_bad_apikeys_are_refused_at_the_door(
    start_node: StartNode,
    query: str,
    headers: dict[str, str],
    status: int,
    error: str,
) -> None:
    node = await start_node()
    response = await upgrade(node, query, headers)
    assert response.status_code == status, response.text
    assert response.json()["error"].startswith(error)


# -- REST --------------------------------------------------------------------------------------


async def test_rest_broadcasts_are_judged_by_the_rules(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    async with realtime(aio, node, token=user("alice")) as client:
        mine = await Subscription(client, "user:alice", private()).subscribe(aio)
        # The client's own http_send: apikey ANON, Authorization: Bearer alice's token.
        await aio.run(mine.channel.http_send("from-http", {"n": 1}))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as http:
            url = "/realtime/v1/api/broadcast"
            body = {
                "messages": [{"topic": "user:alice", "event": "e", "payload": {}, "private": True}]
            }
            for headers, status, error in [
                ({"apikey": ANON}, 403, "messages[0]: Unauthorized: "),
                ({"apikey": BROWSER_KEY}, 403, "messages[0]: Unauthorized: "),
                ({"apikey": ANON, "authorization": f"Bearer {user('bob')}"}, 403, "messages[0]"),
                (
                    {"apikey": ANON, "authorization": f"Bearer {user('alice', expires_in=-9)}"},
                    401,
                    "InvalidJWTToken: token expired",
                ),
                ({"apikey": ANON, "authorization": f"Bearer {user('alice')}"}, 202, None),
                ({"apikey": SERVER_KEY}, 202, None),  # a server key: trusted
            ]:
                response = await http.post(url, json=body, headers=headers)
                assert response.status_code == status, (headers, response.text)
                if error is not None:
                    assert response.json()["error"].startswith(error)
        await until(lambda: len(mine.broadcasts) == 3, "the three allowed broadcasts")


# -- the JWT attack matrix ---------------------------------------------------------------------

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
PUBLIC_PEM = (
    RSA_KEY.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)
ISSUER = "https://project.supabase.co/auth/v1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def rs(claims: dict[str, Any], *, key: Any = RSA_KEY, kid: str = "k1", **options: Any) -> str:
    return sign({"iss": ISSUER, **claims}, key=key, alg="RS256", headers={"kid": kid}, **options)


def hs_with_the_public_pem(claims: dict[str, Any]) -> str:
    """HS256 whose secret is the RSA public key's PEM (HS/RS key confusion), by hand: pyjwt
    refuses to make it."""
    import hashlib
    import hmac

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
    payload = b64(json.dumps({"iss": ISSUER, "exp": int(time.time()) + 60, **claims}).encode())
    signature = hmac.new(PUBLIC_PEM.encode(), f"{header}.{payload}".encode(), hashlib.sha256)
    return f"{header}.{payload}.{b64(signature.digest())}"


def tampered(token: str, **changes: Any) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return f"{header}.{b64(json.dumps({**claims, **changes}).encode())}.{signature}"


def attacks(role: str, sub: str | None) -> list[tuple[str, str, str]]:
    """(name, token, the reason it is refused for) for a token of `role` (and `sub`)."""
    claims: dict[str, Any] = {"role": role}
    if sub is not None:
        claims |= {"sub": sub, "aud": "authenticated"}
    none = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    unsigned = f"{none}.{b64(json.dumps({**claims, 'iss': ISSUER}).encode())}."
    return [
        ("alg none", unsigned, "alg none"),
        ("HS/RS confusion", hs_with_the_public_pem(claims), "algorithm not accepted"),
        ("wrong key", rs(claims, key=RSA_OTHER), "bad signature"),
        ("expired", rs(claims, expires_in=-60), "token expired"),
        ("not yet valid", rs({**claims, "nbf": int(time.time()) + 600}), "not yet valid"),
        ("wrong aud", rs({**claims, "aud": "other"}), "wrong audience"),
        ("wrong iss", rs({**claims, "iss": "https://evil.example"}), "wrong issuer"),
        ("unknown kid", rs(claims, kid="k9"), "unknown kid"),
        ("tampered", tampered(rs(claims), role="service_role", sub="admin"), "bad signature"),
        ("oversized", rs({**claims, "pad": "x" * 3000}), "token too large"),
    ]


@pytest.fixture
def jwks(tmp_path: Path) -> str:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "alg": "RS256", "use": "sig"}]}))
    return str(path)


def matrix_auth(jwks: str) -> AuthConfig:
    return AuthConfig(
        jwks_file=jwks,
        audience="authenticated",
        issuer=ISSUER,
        max_token_bytes=2048,
        rules=RULES,
    )


def socket_url(node: Node, key: str) -> str:
    return f"ws://127.0.0.1:{node.port}/realtime/v1/websocket?apikey={key}&vsn=1.0.0"


async def closed_channel(ws: WebSocketConnection, topic: str) -> list[dict[str, Any]]:
    """The frames on `topic` up to its `phx_close`."""
    frames = []
    while True:
        frame = await receive(ws)
        if frame["topic"] == topic:
            frames.append(frame)
            if frame["event"] == "phx_close":
                return frames


async def test_the_jwt_attack_matrix_at_the_supabase_endpoint(
    start_node: StartNode, jwks: str
) -> None:
    node = await start_node(auth=matrix_auth(jwks), api_key_max_failures=0)
    anon_key = rs({"role": "anon"})
    alice = rs({"role": "authenticated", "sub": "alice", "aud": "authenticated"})
    # The good tokens pass: a key without aud, a user token with it.
    assert await accepted(node, f"?apikey={anon_key}")
    async with open_websocket_url(socket_url(node, anon_key)) as ws:
        await send(ws, v1("realtime:user:alice", "phx_join", {"access_token": alice}))
        assert (await receive(ws))["payload"]["status"] == "ok"
    # As the apikey: refused before the upgrade.
    for name, token, reason in attacks("anon", None):
        response = await upgrade(node, f"?apikey={token}")
        assert response.status_code == 401, (name, response.text)
        assert response.json()["error"].startswith("invalid apikey: "), name
        assert reason in response.json()["error"], (name, response.json())
    async with open_websocket_url(socket_url(node, anon_key)) as ws:
        # As a join's access_token: the join is refused, the socket stays.
        for index, (name, token, reason) in enumerate(attacks("authenticated", "alice")):
            ref = str(index)
            await send(ws, v1("realtime:user:alice", "phx_join", {"access_token": token}, ref))
            reply = await receive(ws)
            assert reply["payload"]["status"] == "error", name
            refusal = reply["payload"]["response"]["reason"]
            assert refusal.startswith("InvalidJWTToken: "), (name, refusal)
            assert reason in refusal, (name, refusal)
        assert node.hub.connections_of("alice") == []
        # As an access_token push: the channel ends (system error, phx_close).
        for index, (name, token, reason) in enumerate(attacks("authenticated", "alice")):
            topic = "realtime:user:alice"
            await send(ws, v1(topic, "phx_join", {"access_token": alice}, f"j{index}"))
            assert (await receive(ws))["payload"]["status"] == "ok", name
            await send(ws, v1(topic, "access_token", {"access_token": token}, f"r{index}"))
            system, close = await closed_channel(ws, topic)
            assert system["event"] == "system", name
            assert system["payload"]["status"] == "error", name
            assert reason in system["payload"]["message"], (name, system)
            assert close["event"] == "phx_close", name
        # The token in the wrong place: under `config` it is no access_token (the anon
        # key's identity joins, and the rule wants alice).
        payload = {"config": {"private": True, "access_token": alice}}
        await send(ws, v1("realtime:user:alice", "phx_join", payload, "w"))
        reply = await receive(ws)
        assert reply["payload"]["response"]["reason"].startswith("Unauthorized: ")
        await send(ws, v1("phoenix", "heartbeat", {}, "h"))
        assert (await receive(ws))["payload"]["status"] == "ok"  # still open


async def test_revoking_a_token_ends_its_channels(
    start_node: StartNode, aio: AsyncioThread
) -> None:
    node = await start_node()
    token = user("alice", claims={"jti": "t-1"})
    async with realtime(aio, node, token=token) as client:
        mine = await Subscription(client, "user:alice", private()).subscribe(aio)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as http:
            response = await http.post(
                "/api/revoke",
                json={"jti": "t-1"},
                headers={"authorization": f"Bearer {SERVER_KEY}"},
            )
            assert response.status_code == 200, response.text
        await until(lambda: len(mine.states) >= 3, "the channel's end")
        assert mine.states[1:] == [
            RealtimeSubscribeStates.CHANNEL_ERROR,
            RealtimeSubscribeStates.CLOSED,
        ]
        assert json.loads(str(mine.errors[1]))["message"].startswith("Unauthorized: ")
        assert client.is_connected
        # And the token is refused from now on.
        again = await Subscription(client, "user:alice", private()).attempt(aio)
        assert "InvalidJWTToken: token revoked" in error_of(again)
