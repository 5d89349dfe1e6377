"""Authentication and authorization end to end, on every native transport (issue 17): real
nodes on loopback, real sockets, real clients (trio-websocket, h11, httpx).

- The JWT attack matrix (token kinds x ways in): each bad token is refused with its
  documented code (401 before the upgrade or the stream, with `www-authenticate`; 4401 for
  a WebSocket's `connect`), nothing is joined, the refusal is counted, and the node serves
  a valid client afterwards.
- Channel rules (user-limited channels, roles, publish, presence, history, patterns, the
  `channels` claim), expiry (the `refresh` push, `refresh`, 4419) and revocation (the REST
  API: 4403, a revoked `jti`, `unsubscribe`) on live WebSocket, SSE and long-poll sessions.
- The WebSocket Origin check, the `authorize` hook, subscription tokens, development mode.

Times: tokens expire in seconds of wall-clock time (JWT `exp` is whole seconds), so the
expiry tests wait for the server's pushes and closes with generous timeouts, never assert
how fast something happened.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import itertools
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import httpx
import jwt
import orjson
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from httpkit import (
    LongPollKitClient,
    SseKitClient,
    base_url,
    scrape,
    sse_target,
    stream_get,
    value,
)
from nodekit import StartNode, until
from trio_websocket import ConnectionClosed, open_websocket_url
from wskit import WebSocketKitClient, ws_url

from pyrt.node.auth import AuthConfig
from pyrt.node.node import Node
from pyrt.testing import TEST_SECRET, Closed, TestTokens

TRANSPORTS = ("websocket", "sse", "longpoll")
"""The native transports a node of these tests serves."""
API_KEY = "k"
AUD = "pyrt-tests"
ISS = "https://issuer.test"
WAIT = 20.0
"""Seconds to wait for something the server will do (generous: it only delays a failure)."""

UNAUTHORIZED, FORBIDDEN = 401, 403
CLOSE_UNAUTHORIZED, CLOSE_REVOKED, CLOSE_EXPIRED = 4401, 4403, 4419

RULES: tuple[Mapping[str, Any], ...] = (
    {"channel": "home:>", "subscribe": "authenticated"},
    {"channel": "room:>", "subscribe": "authenticated"},
    {"channel": "user:{sub}", "subscribe": "authenticated", "publish": "authenticated"},
    {"channel": "staff:>", "subscribe": "role:staff"},
    {"channel": "news:>", "subscribe": "authenticated"},
    {
        "channel": "quiet:>",
        "subscribe": "authenticated",
        "publish": "authenticated",
        "presence": "nobody",
        "history": "nobody",
    },
    {"channel": "chat:admin", "subscribe": "role:admin"},
    {"channel": "chat:>", "subscribe": "authenticated", "publish": "authenticated"},
    {"channel": "hooked:closed"},
    {"channel": "hooked:>", "subscribe": "authenticated", "publish": "authenticated"},
    {"channel": "open:>", "subscribe": "authenticated", "publish": "authenticated"},
)
"""The channel rules of these tests' nodes (docs/auth.md): `private:>` has no rule, so only
subscription tokens open it."""

_homes = itertools.count(1)


def auth(**options: Any) -> AuthConfig:
    """The `[auth]` of these tests: TEST_SECRET, an audience and issuer, no anonymous
    access, RULES; `options` override."""
    values: dict[str, Any] = {
        "jwt_secret": TEST_SECRET,
        "audience": AUD,
        "issuer": ISS,
        "rules": RULES,
    }
    values.update(options)
    return AuthConfig(**values)


_tokens = TestTokens()


def token(sub: str = "alice", *, expires_in: float | None = 3600.0, **claims: Any) -> str:
    """A good token for `auth()`'s nodes."""
    return _tokens.token(sub, expires_in=expires_in, aud=AUD, iss=ISS, **claims)


async def start(start_node: StartNode, **config: Any) -> Node:
    config.setdefault("auth", auth())
    config.setdefault("api_keys", (API_KEY,))
    return await start_node(transports=list(TRANSPORTS), **config)


# -- hand-made tokens ----------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _segment(value: Mapping[str, Any]) -> str:
    return _b64(json.dumps(value).encode())


def hs256(header: Mapping[str, Any], payload: Mapping[str, Any], secret: bytes) -> str:
    """An HS256 JWT signed with `secret`, by hand (pyjwt refuses a PEM key as an HMAC secret,
    which is the point of the key-confusion attack)."""
    signing = f"{_segment(header)}.{_segment(payload)}"
    signature = hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{_b64(signature)}"


CLAIMED = {"channels": ["room:claimed"]}
"""In every token of the attack matrix: a token let in would join `room:claimed`."""


def claims(sub: str = "alice", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    body = {"sub": sub, "aud": AUD, "iss": ISS, "iat": now, "exp": now + 3600, **CLAIMED}
    return body | extra


@dataclass(frozen=True)
class Keys:
    """An RSA key pair (the node's public key, PEM), and another, unknown to the node."""

    private: rsa.RSAPrivateKey
    public_pem: str
    other: rsa.RSAPrivateKey

    def rs256(
        self, payload: Mapping[str, Any], *, kid: str | None = None, other: bool = False
    ) -> str:
        key = self.other if other else self.private
        return jwt.encode(
            dict(payload), key, algorithm="RS256", headers=None if kid is None else {"kid": kid}
        )


@pytest.fixture(scope="module")
def keys() -> Keys:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return Keys(private, pem, other)


# -- the attack matrix -----------------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """A node's `[auth]`, a bad token (None: the way in carries none), a good one, and
    where the bad one goes: `param` (the way in's own place: `?token=`, the Bearer header,
    the `connect` command), or `x-token`: the wrong place (a header no transport reads; for
    `connect`, inside the first `join` instead)."""

    auth: AuthConfig
    bad: str | None
    good: str
    why: tuple[str, ...]
    """The refusal's message or close reason holds one of these."""
    place: str = "param"
    door_status: int = UNAUTHORIZED
    """The HTTP status before an upgrade or a stream (431: the head limit refuses it first,
    before the token is looked at, and it is not an `auth_refused`)."""


NO_TOKEN = ("a token is required", "send 'connect' with a token first")
"""The reasons for no token: at an HTTP door, and on a WebSocket that sent no `connect`."""


def _attack(kind: str, keys: Keys, tmp_path: Path) -> Attack:
    secret_node = auth()
    good = token("alice", **CLAIMED)
    rsa_node = auth(jwt_secret=None, public_key=keys.public_pem)
    match kind:
        case "alg-none":
            bad = f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(claims())}."
            return Attack(secret_node, bad, good, ("alg none",))
        case "alg-none-signed":  # alg none, and a signature anyway
            bad = hs256({"alg": "none", "typ": "JWT"}, claims(), TEST_SECRET.encode())
            return Attack(secret_node, bad, good, ("alg none",))
        case "hs-rs-confusion":  # HS256 with the node's public key (PEM) as the secret
            bad = hs256({"alg": "HS256", "typ": "JWT"}, claims(), keys.public_pem.encode())
            return Attack(rsa_node, bad, keys.rs256(claims()), ("algorithm not accepted",))
        case "wrong-key":
            bad = hs256({"alg": "HS256", "typ": "JWT"}, claims(), b"another-secret-" * 4)
            return Attack(secret_node, bad, good, ("bad signature",))
        case "wrong-rsa-key":
            bad = keys.rs256(claims(), other=True)
            return Attack(rsa_node, bad, keys.rs256(claims()), ("bad signature",))
        case "expired":
            bad = token(expires_in=-60, **CLAIMED)
            return Attack(secret_node, bad, good, ("token expired",))
        case "nbf-future":
            bad = token(nbf=int(time.time()) + 3600, **CLAIMED)
            return Attack(secret_node, bad, good, ("not yet valid",))
        case "wrong-aud":
            bad = _tokens.token("alice", aud="someone-else", iss=ISS, **CLAIMED)
            return Attack(secret_node, bad, good, ("wrong audience",))
        case "wrong-iss":
            bad = _tokens.token("alice", aud=AUD, iss="https://evil.example", **CLAIMED)
            return Attack(secret_node, bad, good, ("wrong issuer",))
        case "unknown-kid":
            jwks = tmp_path / "jwks.json"
            jwk = jwt.algorithms.RSAAlgorithm.to_jwk(keys.private.public_key(), as_dict=True)
            jwks.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig"}]}))
            jwks_node = auth(jwt_secret=None, jwks_file=str(jwks))
            bad = keys.rs256(claims(), kid="k2", other=True)
            return Attack(jwks_node, bad, keys.rs256(claims(), kid="k1"), ("unknown kid",))
        case "tampered":  # bob's signature over alice's claims
            header, _payload, signature = token("bob", channels=["room:other"]).split(".")
            bad = f"{header}.{_segment(claims('alice'))}.{signature}"
            return Attack(secret_node, bad, good, ("bad signature",))
        case "over-max-token-bytes":  # signed right, longer than max_token_bytes (8 KiB)
            bad = token(pad="x" * 8_000, **CLAIMED)
            return Attack(secret_node, bad, good, ("token too large",))
        case "oversized-64k":  # signed right; over HTTP its head is over max_head_bytes
            bad = token(pad="x" * 65_536, **CLAIMED)
            why = ("request head larger than", "'token' must be 1 to")
            return Attack(secret_node, bad, good, why, door_status=431)
        case "garbage":
            return Attack(secret_node, "garbage.!!.@@", good, ("malformed token",))
        case "wrong-place":  # a good token in a header nobody reads
            return Attack(secret_node, good, good, NO_TOKEN, place="x-token")
        case "missing":
            return Attack(secret_node, None, good, NO_TOKEN)
    raise AssertionError(kind)


KINDS = (
    "alg-none",
    "alg-none-signed",
    "hs-rs-confusion",
    "wrong-key",
    "wrong-rsa-key",
    "expired",
    "nbf-future",
    "wrong-aud",
    "wrong-iss",
    "unknown-kid",
    "tampered",
    "over-max-token-bytes",
    "oversized-64k",
    "garbage",
    "wrong-place",
    "missing",
)
WAYS_IN = ("ws-query", "ws-connect", "sse-query", "sse-bearer", "longpoll-query")


@dataclass
class Refusal:
    """How an attempt was refused: an HTTP status (with body and headers), or a close."""

    status: int | None = None
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    close: int | None = None
    message: str = ""
    """The error's message, or the close's reason."""


def _query(token_: str | None, place: str) -> dict[str, str]:
    return {"token": token_} if token_ is not None and place == "param" else {}


def _headers(token_: str | None, place: str, *, bearer: bool = False) -> dict[str, str]:
    if token_ is None:
        return {}
    if place == "x-token":
        return {"x-token": token_}
    return {"authorization": f"Bearer {token_}"} if bearer else {}


async def _http_attempt(node: Node, target: str, headers: Mapping[str, str]) -> Refusal:
    async with stream_get(node, target, headers) as response:
        body = await response.body()
    message = orjson.loads(body)["error"]["message"]
    return Refusal(status=response.status, body=body, headers=response.headers, message=message)


async def ws_handshake(
    node: Node, query: str = "", headers: Mapping[str, str] | None = None
) -> Refusal | None:
    """A WebSocket upgrade request, by hand (h11): its refusal, or None once the server
    switched protocols (the socket is then closed). trio-websocket leaves the socket of a
    refused handshake open (a ResourceWarning), hence this."""
    stream = await trio.open_tcp_stream("127.0.0.1", node.port or 0)
    async with stream:
        http = h11.Connection(h11.CLIENT)
        head = {
            "host": f"127.0.0.1:{node.port}",
            "connection": "Upgrade",
            "upgrade": "websocket",
            "sec-websocket-version": "13",
            "sec-websocket-key": base64.b64encode(secrets.token_bytes(16)).decode(),
            **(headers or {}),
        }
        request = h11.Request(
            method="GET", target="/connection/websocket" + query, headers=list(head.items())
        )
        await stream.send_all(http.send(request) or b"")
        body = b""
        response: h11.Response | None = None
        with trio.fail_after(WAIT):
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.InformationalResponse):
                    assert event.status_code == 101, event
                    return None
                elif isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
                else:
                    assert isinstance(event, h11.EndOfMessage), event
                    break
    assert response is not None
    fields = {k.decode().lower(): v.decode() for k, v in response.headers}
    message = orjson.loads(body)["error"]["message"]
    return Refusal(status=response.status_code, body=body, headers=fields, message=message)


async def _ws_attempt(node: Node, way: str, bad: str | None, place: str) -> Refusal:
    """A WebSocket attempt: refused before the upgrade (`status`), or closed (`close`)
    after the first command (a `connect` carrying the token, or a `join`)."""
    query = "" if way == "ws-connect" else _url_query(_query(bad, place))
    headers = _headers(bad, place)
    if query:  # a token where the upgrade looks: refused before it
        refusal = await ws_handshake(node, query, headers)
        assert refusal is not None, "the upgrade was accepted"
        return refusal
    extra = [(k.encode(), v.encode()) for k, v in headers.items()]
    async with open_websocket_url(ws_url(node), extra_headers=extra) as ws:
        if way == "ws-connect" and bad is not None and place == "param":
            command = {"cmd": "connect", "id": 1, "token": bad}
        elif way == "ws-connect" and bad is not None:  # the wrong place: in the join
            command = {"cmd": "join", "id": 1, "channel": "room:1", "token": bad}
        else:
            command = {"cmd": "join", "id": 1, "channel": "room:1"}
        await ws.send_message(orjson.dumps(command).decode())
        with trio.fail_after(WAIT):
            try:
                while True:  # only pings (the hub's) may come before the close
                    frame = orjson.loads(await ws.get_message())
                    assert frame.get("push") == "ping", frame
            except ConnectionClosed as e:
                close = e.reason
    await ws._stream.aclose()  # see wskit.closed
    return Refusal(close=close.code, message=close.reason or "")


def _url_query(params: Mapping[str, str]) -> str:
    return "?" + str(httpx.QueryParams(params)) if params else ""


async def attempt(node: Node, way: str, bad: str | None, place: str) -> Refusal:
    if way.startswith("ws-"):
        return await _ws_attempt(node, way, bad, place)
    params = {"channel": "room:1", **_query(bad if way != "sse-bearer" else None, place)}
    headers = _headers(bad, place, bearer=way == "sse-bearer")
    if way == "longpoll-query":
        return await _http_attempt(
            node, "/connection/poll?" + str(httpx.QueryParams(params)), headers
        )
    return await _http_attempt(node, sse_target(params), headers)


@pytest.mark.parametrize("way", WAYS_IN)
@pytest.mark.parametrize("kind", KINDS)
async def test_attack_matrix(
    start_node: StartNode, keys: Keys, tmp_path: Path, kind: str, way: str
) -> None:
    attack = _attack(kind, keys, tmp_path)
    node = await start(start_node, auth=attack.auth)
    assert await metric(node, "pyrt_auth_refused_total") == 0

    refusal = await attempt(node, way, attack.bad, attack.place)

    upgrade_refused = way != "ws-connect"
    if way.startswith("ws-") and (attack.bad is None or attack.place != "param"):
        upgrade_refused = False  # no token where the upgrade looks: `connect` may follow
    head_limit = upgrade_refused and attack.door_status == 431
    if upgrade_refused:
        assert refusal.status == attack.door_status, refusal
        error = orjson.loads(refusal.body)["error"]
        assert error["code"] == attack.door_status, error
        assert error["message"], error
        if not head_limit:
            challenge = 'Bearer realm="pyrt"'
            if attack.bad is not None and attack.place == "param":
                challenge += ', error="invalid_token"'  # RFC 6750 3.1: none without a token
            assert refusal.headers["www-authenticate"] == challenge, refusal.headers
    else:
        assert refusal.close == CLOSE_UNAUTHORIZED, refusal
    assert any(why in refusal.message for why in attack.why), refusal.message
    # Nothing joined, nobody left connected, the refusal counted.
    await until(lambda: len(node.hub) == 0, "the refused connection to be forgotten")
    assert node.hub.channels() == {}
    refused = 0 if head_limit else 1
    assert await metric(node, "pyrt_auth_refused_total") == refused
    assert await metric(node, "pyrt_http_refused_total", status="431") == 1 - refused

    # And the node serves a good client on the same way in afterwards.
    async with open_way(node, way, attack.good) as client:
        reply = await client.request(cmd="join", channel="room:2")
        assert reply["ok"]["channel"] == "room:2", reply
        assert "room:claimed" in node.hub.channels()  # what the bad token's claim would do
    assert await metric(node, "pyrt_auth_refused_total") == refused


# -- live clients on each transport ------------------------------------------------------------


class Live:
    """One live session on any transport: commands with ids, the frames between replies
    kept for `push`, and the end (`closed`)."""

    def __init__(self, kit: Any, transport: str) -> None:
        self.kit = kit
        self.transport = transport
        self.frames: list[dict[str, Any]] = []
        self._ids = itertools.count(1)

    async def _receive(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            frame: dict[str, Any] = await self.kit.receive()
        return frame

    async def request(self, **command: Any) -> dict[str, Any]:
        rid = next(self._ids)
        await self.kit.send({"id": rid, **command})
        while True:
            frame = await self._receive()
            if frame.get("reply") == rid:
                return frame
            self.frames.append(frame)

    async def push(self, kind: str) -> dict[str, Any]:
        """The next `kind` push (pings are skipped)."""
        while True:
            while self.frames:
                frame = self.frames.pop(0)
                if frame.get("push") == kind:
                    return frame
                assert frame.get("push") == "ping", (kind, frame)
            self.frames.append(await self._receive())

    async def closed(self) -> int | None:
        """Reads until the server ends the session; its close code. Frames before it are
        kept in `frames`."""
        with trio.fail_after(WAIT):
            while True:
                try:
                    frame = await self.kit.receive()
                except Closed as e:
                    return e.code
                self.frames.append(frame)

    def pubs(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("push") == "pub"]


@asynccontextmanager
async def open_live(
    node: Node,
    transport: str,
    token_: str | None,
    *,
    connect: bool = False,
    headers: Mapping[str, str] | None = None,
) -> AsyncIterator[Live]:
    """A session on `transport` with `token_` (`?token=`; a WebSocket's `connect` command
    when `connect`). SSE and long-poll open on a channel of their own (`home:N`), whose join
    reply is read before this yields."""
    if transport == "websocket":
        query = _url_query({"token": token_}) if token_ is not None and not connect else ""
        extra = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        async with open_websocket_url(ws_url(node) + query, extra_headers=extra) as ws:
            live = Live(WebSocketKitClient(ws), transport)
            if connect:
                reply = await live.request(cmd="connect", token=token_)
                assert "ok" in reply, reply
            yield live
        await ws._stream.aclose()  # see wskit.closed
        return
    home = f"home:{next(_homes)}"
    params = {"channel": home, **({"token": token_} if token_ is not None else {})}
    async with httpx.AsyncClient(base_url=base_url(node), timeout=None) as http:
        if transport == "sse":
            async with stream_get(node, sse_target(params), headers) as response:
                assert response.status == 200, (await response.body()).decode()
                sse = SseKitClient(http, response)
                await sse.start()
                live = Live(sse, transport)
                await _home_joined(live, home)
                yield live
            return
        response = await http.get("/connection/poll", params=params, headers=headers)
        assert response.status_code == 200, response.text
        poll = LongPollKitClient(http, response.json())
        live = Live(poll, transport)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll.poll_forever)
            await _home_joined(live, home)
            yield live
            nursery.cancel_scope.cancel()
        if not poll.ended:
            await poll.end()


async def _home_joined(live: Live, home: str) -> None:
    frame = await live._receive()
    assert frame.get("ok", {}).get("channel") == home, frame


def open_way(node: Node, way: str, token_: str) -> Any:
    """`open_live` for a way in of the attack matrix."""
    if way == "ws-query":
        return open_live(node, "websocket", token_)
    if way == "ws-connect":
        return open_live(node, "websocket", token_, connect=True)
    if way == "sse-bearer":
        return open_live(node, "sse", None, headers={"authorization": f"Bearer {token_}"})
    return open_live(node, "sse" if way == "sse-query" else "longpoll", token_)


async def metric(node: Node, name: str, **labels: str) -> float:
    """One sample of the node's `/metrics`."""
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        return value(await scrape(http), name, **labels)


def error_code(reply: Mapping[str, Any]) -> int | None:
    return reply.get("error", {}).get("code")


async def rest(node: Node, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        response = await http.post(
            path, json=dict(body), headers={"authorization": f"Bearer {API_KEY}"}
        )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


transports = pytest.mark.parametrize("transport", TRANSPORTS)


# -- channel rules --------------------------------------------------------------------------


@transports
async def test_user_limited_channel(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with (
        open_live(node, transport, token("alice")) as alice,
        open_live(node, transport, token("bob")) as bob,
    ):
        assert "ok" in await alice.request(cmd="join", channel="user:alice")
        refused = await bob.request(cmd="join", channel="user:alice")
        assert error_code(refused) == FORBIDDEN, refused
        assert "ok" in await bob.request(cmd="join", channel="user:bob")
        # bob may not publish into alice's channel either (not joined, and not his).
        refused = await bob.request(cmd="publish", channel="user:alice", data=1)
        assert error_code(refused) == FORBIDDEN, refused
    assert node.hub.stats.auth_refused == 2


@transports
async def test_role_rule(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with (
        open_live(node, transport, token("carol", role="staff")) as staff,
        open_live(node, transport, token("alice", role="customer")) as customer,
    ):
        assert "ok" in await staff.request(cmd="join", channel="staff:board")
        refused = await customer.request(cmd="join", channel="staff:board")
        assert error_code(refused) == FORBIDDEN, refused


@transports
async def test_publish_refused(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with open_live(node, transport, token()) as alice:
        assert "ok" in await alice.request(cmd="join", channel="news:1")
        refused = await alice.request(cmd="publish", channel="news:1", data={"x": 1})
        assert error_code(refused) == FORBIDDEN, refused
        # Nothing went out: the next publication is the server's, at offset 1.
        node.publish("news:1", "server")
        pub = await alice.push("pub")
        assert (pub["data"], pub["offset"]) == ("server", 1), pub


@transports
async def test_presence_refused(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with open_live(node, transport, token()) as alice:
        assert "ok" in await alice.request(cmd="join", channel="quiet:1")
        for command in (
            {"cmd": "track", "channel": "quiet:1", "meta": {"at": 1}},
            {"cmd": "presence", "channel": "quiet:1"},
            {"cmd": "join", "channel": "quiet:2", "presence": True},
        ):
            refused = await alice.request(**command)
            assert error_code(refused) == FORBIDDEN, (command, refused)
        # Allowed where the rules allow it (the same commands on chat:).
        assert "ok" in await alice.request(cmd="join", channel="chat:1", presence=True)
        assert "ok" in await alice.request(cmd="track", channel="chat:1", meta={"at": 1})
    assert "quiet:2" not in node.hub.channels()


@transports
async def test_history_refused(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    for channel in ("quiet:1", "news:1"):
        for n in range(3):
            node.publish(channel, n)
    async with open_live(node, transport, token()) as alice:
        since = {"offset": 0, "epoch": node.hub.history_position("quiet:1", node.now).epoch}
        reply = await alice.request(cmd="join", channel="quiet:1", since=since)
        assert reply["ok"]["recovered"] is False, reply
        node.publish("quiet:1", "live")
        pub = await alice.push("pub")
        assert pub["data"] == "live", pub  # nothing replayed before it
        # Where history is allowed (news: as subscribe), the same join replays the three.
        since = {"offset": 0, "epoch": node.hub.history_position("news:1", node.now).epoch}
        reply = await alice.request(cmd="join", channel="news:1", since=since)
        assert reply["ok"]["recovered"] is True, reply
        replayed = [(await alice.push("pub"))["data"] for _ in range(3)]
        assert replayed == [0, 1, 2]


@transports
async def test_pattern_covering_another_rule(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with (
        open_live(node, transport, token("alice")) as alice,
        open_live(node, transport, token("root", role="admin")) as admin,
    ):
        refused = await alice.request(cmd="join", channel="chat:*")  # would hold chat:admin
        assert error_code(refused) == FORBIDDEN, refused
        refused = await alice.request(cmd="join", channel="chat:>")
        assert error_code(refused) == FORBIDDEN, refused
        assert "ok" in await alice.request(cmd="join", channel="chat:lobby:*")
        assert "ok" in await admin.request(cmd="join", channel="chat:*")
        node.publish("chat:admin", "for admins")
        node.publish("chat:lobby:1", "for all")
        assert (await admin.push("pub"))["data"] == "for admins"
        assert (await alice.push("pub"))["data"] == "for all"


@transports
async def test_channels_claim_joins_server_side(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    # staff:board is refused to alice by the rules; the claim, signed by the application,
    # needs none.
    async with open_live(node, transport, token(channels=["news:claimed", "staff:board"])) as a:
        node.publish("news:claimed", "one")
        node.publish("staff:board", "two")
        assert (await a.push("pub"))["data"] == "one"
        assert (await a.push("pub"))["data"] == "two"
        already = await a.request(cmd="join", channel="news:claimed")
        assert error_code(already) is not None, already  # joined already


# -- expiry --------------------------------------------------------------------------------


def short_token(sub: str = "alice", *, seconds: int = 4, **extra: Any) -> tuple[str, int]:
    """A token expiring `seconds` (whole) from now, and its `exp`."""
    exp = int(time.time()) + seconds
    return _tokens.token(sub, expires_in=None, aud=AUD, iss=ISS, exp=exp, **extra), exp


async def wall_clock_past(moment: float) -> None:
    """Waits until the wall clock is past `moment` (what `exp` is compared with)."""
    while time.time() <= moment:
        await trio.sleep(max(0.01, moment - time.time() + 0.05))


@pytest.mark.parametrize(
    ("transport", "connect"),
    [("websocket", False), ("websocket", True), ("sse", False), ("longpoll", False)],
    ids=["websocket-query", "websocket-connect", "sse", "longpoll"],
)
async def test_refresh_keeps_the_session(
    start_node: StartNode, transport: str, connect: bool
) -> None:
    node = await start(start_node, auth=auth(refresh_before=2.0))
    first, exp = short_token()
    async with open_live(node, transport, first, connect=connect) as alice:
        assert "ok" in await alice.request(cmd="join", channel="room:1")
        asked = await alice.push("refresh")
        assert 0 < asked["expires_in"] <= 2.0, asked
        # A token of another user is refused (401), and the session stays.
        other = await alice.request(cmd="refresh", token=token("bob"))
        assert error_code(other) == UNAUTHORIZED, other
        reply = await alice.request(cmd="refresh", token=token("alice"))
        assert reply["ok"]["user"] == "alice", reply
        assert reply["ok"]["expires_in"] > 3000, reply
        await wall_clock_past(exp + 1.5)
        assert "ok" in await alice.request(cmd="ping")
        node.publish("room:1", "still here")
        assert (await alice.push("pub"))["data"] == "still here"
    assert node.hub.stats.tokens_expired == 0


@transports
async def test_expired_session_ends_with_4419(start_node: StartNode, transport: str) -> None:
    node = await start(start_node, auth=auth(refresh_before=2.0))
    short, exp = short_token()
    async with open_live(node, transport, short) as alice:
        assert "ok" in await alice.request(cmd="join", channel="room:1")
        await alice.push("refresh")
        assert await alice.closed() == CLOSE_EXPIRED
        assert time.time() >= exp
    assert node.hub.stats.tokens_expired == 1
    await until(lambda: len(node.hub) == 0, "the expired session to be forgotten")


# -- revocation ----------------------------------------------------------------------------


@transports
async def test_disconnect_user(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with (
        open_live(node, transport, token("alice")) as alice,
        open_live(node, transport, token("bob")) as bob,
    ):
        assert await rest(node, "/api/disconnect", {"user": "alice"}) == {"disconnected": 1}
        assert await alice.closed() == CLOSE_REVOKED
        assert "ok" in await bob.request(cmd="ping")
        # Disconnected, not banned: the same token connects again.
        async with open_live(node, transport, token("alice")) as again:
            assert "ok" in await again.request(cmd="ping")


@transports
async def test_revoke_jti(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    revoked = token("alice", jti="t-1")
    async with (
        open_live(node, transport, revoked) as alice,
        open_live(node, transport, token("alice", jti="t-2")) as alice2,
    ):
        reply = await rest(node, "/api/revoke", {"jti": "t-1", "until": time.time() + 3600})
        assert reply == {"disconnected": 1}
        assert await alice.closed() == CLOSE_REVOKED
        assert "ok" in await alice2.request(cmd="ping")  # another token of the same user
    way = {"websocket": "ws-query", "sse": "sse-query", "longpoll": "longpoll-query"}[transport]
    refusal = await attempt(node, way, revoked, "param")
    assert refusal.status == UNAUTHORIZED, refusal
    assert b"revoked" in refusal.body
    # And by `connect` on a WebSocket, and as a refresh.
    if transport == "websocket":
        assert (await attempt(node, "ws-connect", revoked, "param")).close == CLOSE_UNAUTHORIZED
    async with open_live(node, transport, token("alice")) as alice3:
        refused = await alice3.request(cmd="refresh", token=revoked)
        assert error_code(refused) == UNAUTHORIZED, refused


@transports
async def test_unsubscribe_user(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with (
        open_live(node, transport, token("alice")) as alice,
        open_live(node, transport, token("bob")) as bob,
    ):
        for client in (alice, bob):
            assert "ok" in await client.request(cmd="join", channel="open:1")
            assert "ok" in await client.request(cmd="join", channel="open:2")
        body = {"user": "alice", "channel": "open:1"}
        assert await rest(node, "/api/unsubscribe", body) == {"unsubscribed": 1}
        push = await alice.push("unsubscribe")
        assert push["channel"] == "open:1", push
        assert push["reason"], push
        node.publish("open:1", "gone")
        node.publish("open:2", "marker")
        pub = await alice.push("pub")
        assert (pub["channel"], pub["data"]) == ("open:2", "marker"), pub
        assert [p["data"] for p in (await bob.push("pub"), await bob.push("pub"))] == [
            "gone",
            "marker",
        ]
        # The join is gone: leaving it is an error, joining again is the rules' say (allowed).
        refused = await alice.request(cmd="leave", channel="open:1")
        assert error_code(refused) is not None, refused
        assert "ok" in await alice.request(cmd="join", channel="open:1")


# -- the Origin check ------------------------------------------------------------------------


async def _upgrade(node: Node, origin: str | None) -> int:
    """The status of a WebSocket upgrade with a good token and `origin` (101: accepted)."""
    headers = {} if origin is None else {"origin": origin}
    refusal = await ws_handshake(node, _url_query({"token": token()}), headers)
    if refusal is None:
        return 101
    error = orjson.loads(refusal.body)["error"]
    assert error["code"] == refusal.status, error
    assert refusal.status is not None
    return refusal.status


async def test_origin_own_host_by_default(start_node: StartNode) -> None:
    node = await start(start_node)
    assert await _upgrade(node, "https://evil.example") == FORBIDDEN
    assert await _upgrade(node, f"http://127.0.0.1:{node.port}") == 101  # the Host it was sent
    assert await _upgrade(node, f"http://127.0.0.1:{node.port + 1}") == FORBIDDEN
    assert await _upgrade(node, None) == 101  # not a browser
    assert await metric(node, "pyrt_auth_refused_total") == 2


async def test_origin_allowed_list(start_node: StartNode) -> None:
    allowed = ("https://app.example", "http://localhost:3000")
    node = await start(start_node, auth=auth(allowed_origins=allowed))
    assert await _upgrade(node, "https://app.example") == 101
    assert await _upgrade(node, "http://localhost:3000") == 101
    assert await _upgrade(node, "https://evil.example") == FORBIDDEN
    assert await _upgrade(node, "https://app.example.evil.example") == FORBIDDEN
    assert await _upgrade(node, f"http://127.0.0.1:{node.port}") == FORBIDDEN  # the list only
    assert await _upgrade(node, None) == 101
    wildcard = await start(start_node, auth=auth(allowed_origins=("*",)))
    assert await _upgrade(wildcard, "https://evil.example") == 101


# -- the authorize hook ----------------------------------------------------------------------


class Hook:
    """An `authorize` hook with set answers per channel, counting its calls."""

    def __init__(self, answers: Mapping[tuple[str, str], bool] | None = None) -> None:
        self.answers: Mapping[tuple[str, str] | str, bool] = {
            "hooked:closed": True,
            "hooked:deny": False,
            **(answers or {}),
        }
        self.calls: list[tuple[str | None, str, str]] = []

    def decide(self, claims_: Mapping[str, Any], action: str, channel: str) -> bool | None:
        self.calls.append((claims_.get("sub"), action, channel))
        if channel == "hooked:boom":
            raise RuntimeError("the hook's own bug")
        return self.answers.get((action, channel), self.answers.get(channel))

    def sync(self, claims_: Mapping[str, Any], action: str, channel: str) -> bool | None:
        return self.decide(claims_, action, channel)

    async def async_(self, claims_: Mapping[str, Any], action: str, channel: str) -> bool | None:
        await trio.sleep(0)
        return self.decide(claims_, action, channel)


def _hook_fn(hook: Hook, kind: str) -> Callable[..., bool | Awaitable[bool | None] | None]:
    return hook.sync if kind == "sync" else hook.async_


@pytest.mark.parametrize("kind", ["sync", "async"])
@transports
async def test_authorize_hook_decides(
    start_node: StartNode, transport: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    hook = Hook()
    node = await start(start_node, authorize=_hook_fn(hook, kind))
    async with open_live(node, transport, token()) as alice:
        # True overrides the rules' refusal (hooked:closed has a rule refusing everyone).
        assert "ok" in await alice.request(cmd="join", channel="hooked:closed")
        # False refuses what the rules allow; None leaves it to them.
        refused = await alice.request(cmd="join", channel="hooked:deny")
        assert error_code(refused) == FORBIDDEN, refused
        assert "ok" in await alice.request(cmd="join", channel="hooked:open")
        refused = await alice.request(cmd="join", channel="private:1")  # no rule, hook None
        assert error_code(refused) == FORBIDDEN, refused
        # A hook that raises refuses, and the error is logged.
        with caplog.at_level(logging.ERROR, logger="pyrt.auth"):
            refused = await alice.request(cmd="join", channel="hooked:boom")
        assert error_code(refused) == FORBIDDEN, refused
        failures = [r for r in caplog.records if r.name == "pyrt.auth" and r.exc_info]
        assert len(failures) == 1
        assert "hooked:boom" in failures[0].getMessage()
        # Publish: asked too (the hook's False wins over the rules' allow).
        assert "ok" in await alice.request(cmd="publish", channel="hooked:open", data=1, ack=True)
        assert "ok" in await alice.request(cmd="publish", channel="hooked:closed", data=2, ack=True)
    sub = "alice"
    expected = [
        (sub, "subscribe", "hooked:closed"),
        (sub, "subscribe", "hooked:deny"),
        (sub, "subscribe", "hooked:open"),
        (sub, "subscribe", "private:1"),
        (sub, "subscribe", "hooked:boom"),
        (sub, "publish", "hooked:open"),
        (sub, "publish", "hooked:closed"),
    ]
    assert [c for c in hook.calls if not c[2].startswith("home:")] == expected


@transports
async def test_authorize_hook_refuses_publish(start_node: StartNode, transport: str) -> None:
    hook = Hook({("publish", "open:1"): False})
    node = await start(start_node, authorize=hook.sync)
    async with open_live(node, transport, token()) as alice:
        assert "ok" in await alice.request(cmd="join", channel="open:1")  # the rules allow
        refused = await alice.request(cmd="publish", channel="open:1", data=1)
        assert error_code(refused) == FORBIDDEN, refused
        assert "ok" in await alice.request(cmd="join", channel="open:2")
        assert "ok" in await alice.request(cmd="publish", channel="open:2", data=2, ack=True)
    assert node.hub.history_position("open:1", node.now).offset == 0
    assert node.hub.history_position("open:2", node.now).offset == 1


@transports
async def test_authorize_hook_not_asked_per_delivery(start_node: StartNode, transport: str) -> None:
    hook = Hook()
    node = await start(start_node, authorize=hook.async_)
    async with (
        open_live(node, transport, token("alice")) as alice,
        open_live(node, transport, token("bob")) as bob,
    ):
        for client in (alice, bob):
            assert "ok" in await client.request(cmd="join", channel="hooked:open")
        asked = len(hook.calls)
        for n in range(20):
            node.publish("hooked:open", n)
        mine = {"cmd": "publish", "channel": "hooked:open", "data": "mine", "ack": True}
        assert "ok" in await alice.request(**mine)
        assert [(await alice.push("pub"))["data"] for _ in range(20)] == [*range(20)]
        assert [(await bob.push("pub"))["data"] for _ in range(21)] == [*range(20), "mine"]
        # 41 deliveries, one publish: one more call (the publish), none per delivery.
        assert hook.calls[asked:] == [("alice", "publish", "hooked:open")]


async def test_authorize_hook_not_asked_before_connect(start_node: StartNode) -> None:
    """A WebSocket without a token is nobody yet: its join closes it (4401), even with a
    subscription token, and the application's hook is not asked on its behalf."""
    hook = Hook()
    node = await start(start_node, authorize=hook.sync)
    subscription = token("alice", channel="hooked:open")
    for bad in (None, subscription, token("", channel="hooked:open")):
        refusal = await attempt(node, "ws-connect", bad, "x-token")
        assert refusal.close == CLOSE_UNAUTHORIZED, refusal
    assert hook.calls == []
    async with open_live(node, "websocket", token(), connect=True) as alice:
        assert "ok" in await alice.request(cmd="join", channel="hooked:open")
    assert hook.calls == [("alice", "subscribe", "hooked:open")]


# -- subscription tokens -----------------------------------------------------------------------


@transports
async def test_subscription_tokens(start_node: StartNode, transport: str) -> None:
    node = await start(start_node)
    async with open_live(node, transport, token("alice")) as alice:
        refused = await alice.request(cmd="join", channel="private:docs")  # no rule
        assert error_code(refused) == FORBIDDEN, refused
        for bad in (
            token("alice", channel="private:other"),  # another channel
            token("bob", channel="private:docs"),  # another user
            token("alice", channel="private:docs", expires_in=-60),  # expired
            _tokens.token("alice", channel="private:docs"),  # no aud/iss
            token("alice"),  # no channel claim
        ):
            refused = await alice.request(cmd="join", channel="private:docs", token=bad)
            assert error_code(refused) == UNAUTHORIZED, refused
        good = token("alice", channel="private:docs")
        assert "ok" in await alice.request(cmd="join", channel="private:docs", token=good)
        node.publish("private:docs", "hello")
        assert (await alice.push("pub"))["data"] == "hello"
        assert node.hub.channels()["private:docs"] == 1
    await until(lambda: "private:docs" not in node.hub.channels(), "the session to end")


# -- development mode ----------------------------------------------------------------------


async def test_development_mode(start_node: StartNode) -> None:
    node = await start_node(transports=list(TRANSPORTS), auth=None)
    assert node.config.host == "127.0.0.1"
    # No token: a WebSocket may send `connect`, anything else closes with 4401.
    assert (await attempt(node, "ws-query", None, "param")).close == CLOSE_UNAUTHORIZED
    assert (await attempt(node, "sse-query", None, "param")).status == UNAUTHORIZED
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        response = await http.get("/dev/token")
    assert response.status_code == 200, response.text
    dev = response.json()["token"]
    for transport in TRANSPORTS:
        async with open_live(node, transport, dev) as client:
            reply = await client.request(cmd="join", channel="chat:1")
            assert reply["ok"]["channel"] == "chat:1", reply
    async with open_live(node, "websocket", dev, connect=True) as client:
        assert "ok" in await client.request(cmd="join", channel="chat:1")
    # A node with an [auth] table hands out no token.
    configured = await start(start_node)
    async with httpx.AsyncClient(base_url=base_url(configured)) as http:
        assert (await http.get("/dev/token")).status_code == 404
