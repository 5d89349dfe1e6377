"""The client's tokens against a real Node over real sockets, on each transport: `token=`
and `token_provider=`, refreshes before expiry with no loss, refusals and revocation raised as
`AuthenticationError` (and not retried in a loop), `unsubscribe` ending a channel."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
from clientkit import take
from nodekit import StartNode, until

from pyrt.client import (
    TRANSPORTS,
    AuthenticationError,
    Client,
    Message,
    Unsubscribed,
    connect,
)
from pyrt.node.auth import AuthConfig
from pyrt.node.node import Node
from pyrt.testing import TEST_SECRET, TestTokens, open_auth

KEY = "test-api-key"
FAST: dict[str, Any] = {"min_backoff": 0.01, "max_backoff": 0.2, "probe_interval": None}
RULES = ({"channel": "room:>", "subscribe": "authenticated", "publish": "authenticated"},)
"""Rooms for users with a token, nothing else."""

tokens = TestTokens()
each_transport = pytest.mark.parametrize("transport", TRANSPORTS)


def closed_auth(**options: Any) -> AuthConfig:
    """Tokens required (no anonymous connections), rooms open to any verified user."""
    return AuthConfig(jwt_secret=TEST_SECRET, anonymous=False, rules=RULES, **options)


async def start(start_node: StartNode, **auth: Any) -> tuple[Node, str]:
    node = await start_node(auth=closed_auth(**auth), api_keys=(KEY,))
    return node, f"http://127.0.0.1:{node.port}"


def provider(*made: Callable[[], str]) -> tuple[Callable[[], Awaitable[str]], list[str]]:
    """A token provider handing out `made[i]()` on its i-th call (the last one from then
    on), and the list of tokens it handed out."""
    given: list[str] = []

    async def provide() -> str:
        given.append(made[min(len(given), len(made) - 1)]())
        return given[-1]

    return provide, given


async def rest(node: Node, path: str, body: dict[str, Any]) -> Any:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"http://127.0.0.1:{node.port}{path}",
            json=body,
            headers={"authorization": f"Bearer {KEY}"},
        )
    assert response.status_code == 200, response.text
    return response.json()


def refused(node: Node) -> int:
    """Tokens the node refused: at the door, or in a `connect` (pyrt_auth_refused_total)."""
    return node.gate.refused + node.hub.stats.auth_refused


def users(node: Node, user: str) -> list[str]:
    """The transports of `user`'s live connections."""
    return [conn.transport for conn in node.hub.connections_of(user)]


# -- token= ------------------------------------------------------------------------------------


@each_transport
async def test_a_token_opens_the_rooms_on_each_transport(
    start_node: StartNode, transport: str
) -> None:
    node, url = await start(start_node)
    async with connect(url, token=tokens.token("alice"), transports=[transport]) as client:
        room = await client.join("room:1")
        await room.publish({"text": "hi"}, echo=True)
        [message] = await take(room, 1)
        assert message.data == {"text": "hi"}
        assert users(node, "alice") == [transport]
        # On WebSocket the token went in the `connect` command, whose reply names the user.
        assert client.user == ("alice" if transport == "websocket" else None)


@each_transport
async def test_a_token_is_taken_where_anonymous_connections_are_let_in_too(
    start_node: StartNode, transport: str
) -> None:
    rules = ({"channel": "mine:{sub}", "subscribe": "authenticated"}, *RULES)
    node = await start_node(auth=open_auth(rules=rules))
    url = f"http://127.0.0.1:{node.port}"
    async with connect(url, token=tokens.token("alice"), transports=[transport]) as client:
        await client.join("mine:alice")  # refused (403) to an anonymous connection
        assert users(node, "alice") == [transport]


@each_transport
async def test_no_token_raises_authentication_error(start_node: StartNode, transport: str) -> None:
    node, url = await start(start_node)

    async def join() -> None:
        async with connect(url, transports=[transport], **FAST) as client:
            # A WebSocket opens without a token (one may come in `connect`); its first
            # command without one closes it.
            assert transport == "websocket"
            await client.join("room:1")

    with pytest.raises(AuthenticationError) as e:
        await join()
    assert e.value.code == (4401 if transport == "websocket" else 401)
    assert "give connect() token=" in str(e.value)
    assert node.hub.stats.connections_opened <= 1, "it tried again"


@each_transport
@pytest.mark.parametrize("bad", ["expired", "forged"])
async def test_a_refused_token_raises_and_is_not_retried(
    start_node: StartNode, transport: str, bad: str
) -> None:
    node, url = await start(start_node)
    token = (
        tokens.token("alice", expires_in=-10)
        if bad == "expired"
        else TestTokens("another-secret-of-at-least-32-bytes!!").token("alice")
    )
    with pytest.raises(AuthenticationError) as e:
        async with connect(url, token=token, transports=[transport], **FAST):
            raise AssertionError("connected with a refused token")
    assert e.value.code == (4401 if transport == "websocket" else 401)
    assert "refused the token" in str(e.value)
    assert ("expired" if bad == "expired" else "signature") in str(e.value).lower()
    assert refused(node) == 1, "the token was sent again"


@each_transport
async def test_an_expired_token_without_a_provider_raises(
    start_node: StartNode, transport: str
) -> None:
    node, url = await start(start_node, refresh_before=1.0)
    token = tokens.token("alice", expires_in=2)
    got: list[Message] = []
    clients: list[Client] = []

    async def outlive() -> None:
        async with connect(url, token=token, transports=[transport], **FAST) as client:
            clients.append(client)
            room = await client.join("room:1")
            node.publish("room:1", "before")
            got.extend(await take(room, 1))
            await trio.sleep(5)  # the token lives 1-2 s
            raise AssertionError("the connection outlived its token")

    with pytest.raises(AuthenticationError) as e:
        await outlive()
    assert e.value.code == 4419
    assert "expired" in str(e.value)
    assert [m.data for m in got] == ["before"]
    assert clients[0].connects == 1
    await until(lambda: not node.hub.connections_of("alice"), "the connection gone")


# -- token_provider= ---------------------------------------------------------------------------


@each_transport
async def test_the_provider_refreshes_the_token_before_it_expires_with_no_loss(
    start_node: StartNode, transport: str
) -> None:
    node, url = await start(start_node, refresh_before=1.0)
    provide, given = provider(lambda: tokens.token("alice", expires_in=3))
    async with connect(url, token_provider=provide, transports=[transport], **FAST) as client:
        room = await client.join("room:1")
        started = trio.current_time()
        sent = 0
        # Past the first token's expiry (2-3 s: `exp` is whole seconds) and then some.
        while trio.current_time() - started < 5:
            sent += 1
            node.publish("room:1", sent)
            await trio.sleep(0.02)
        got = await take(room, sent)
        assert [m.data for m in got] == list(range(1, sent + 1))
        assert [m.offset for m in got] == list(range(1, sent + 1))
        assert client.connects == 1, "it reconnected instead of refreshing"
        assert client.transport == transport
        # The first token, then refreshes (a token of 2-3 s, asked for 1 s before its end).
        assert len(given) >= 3
        assert [c.identity.user for c in node.hub.connections_of("alice")] == ["alice"]
        assert node.hub.stats.tokens_expired == 0


@each_transport
async def test_after_an_expiry_the_provider_s_token_reconnects_and_resumes(
    start_node: StartNode, transport: str
) -> None:
    """The refresh fails (the provider hands out a token of another user, refused with 401),
    so the connection ends at expiry (4419): the client reconnects with the provider's next
    token and resumes from where it was."""
    node, url = await start(start_node, refresh_before=1.0)
    provide, given = provider(
        lambda: tokens.token("alice", expires_in=2),
        lambda: tokens.token("mallory"),
        lambda: tokens.token("alice"),
    )
    async with connect(url, token_provider=provide, transports=[transport], **FAST) as client:
        room = await client.join("room:1")
        node.publish("room:1", "first")
        await take(room, 1)
        await until(lambda: node.hub.stats.tokens_expired == 1, "the expiry", timeout=5)
        node.publish("room:1", "while it reconnects")
        await until(lambda: client.connects == 2, "the reconnect")
        node.publish("room:1", "after")
        got = await take(room, 2)
    assert [m.data for m in got] == ["while it reconnects", "after"]
    assert room.recovered is True
    assert len(given) == 3


async def test_a_provider_whose_next_token_is_refused_too_raises(start_node: StartNode) -> None:
    node, url = await start(start_node)
    forged = TestTokens("another-secret-of-at-least-32-bytes!!")
    provide, given = provider(lambda: forged.token("alice"))
    with pytest.raises(AuthenticationError) as e:
        async with connect(url, token_provider=provide, **FAST):
            raise AssertionError("connected with a refused token")
    assert e.value.code == 4401
    assert len(given) == 2, "one more token after a refusal, not a loop"
    assert refused(node) == 2


async def test_a_token_or_a_provider_not_both() -> None:
    async def provide() -> str:
        return "t"

    with pytest.raises(ValueError, match="not both"):
        Client("http://127.0.0.1:1", token="t", token_provider=provide)


# -- revocation and unsubscribe -----------------------------------------------------------------


@each_transport
async def test_a_disconnected_user_raises_and_does_not_reconnect(
    start_node: StartNode, transport: str
) -> None:
    node, url = await start(start_node)
    provide, given = provider(lambda: tokens.token("alice"))
    clients: list[Client] = []

    async def disconnected() -> None:
        async with connect(url, token_provider=provide, transports=[transport], **FAST) as client:
            clients.append(client)
            await client.join("room:1")
            assert (await rest(node, "/api/disconnect", {"user": "alice"})) == {"disconnected": 1}
            await trio.sleep(5)
            raise AssertionError("still connected")

    with pytest.raises(AuthenticationError) as e:
        await disconnected()
    assert e.value.code == 4403
    assert "do not reconnect" in str(e.value)
    await trio.sleep(0.3)  # time for a reconnect it should not make
    assert users(node, "alice") == []
    assert len(given) == 1
    assert clients[0].connects == 1


async def test_a_revoked_token_raises(start_node: StartNode) -> None:
    node, url = await start(start_node)
    token = tokens.token("alice", jti="t-1")

    async def revoked() -> None:
        async with connect(url, token=token, **FAST) as client:
            room = await client.join("room:1")
            await rest(node, "/api/revoke", {"jti": "t-1"})
            await room.publish("never")  # raises the client's failure, as the block does

    with pytest.raises(AuthenticationError) as e:
        await revoked()
    assert e.value.code == 4403


@each_transport
async def test_unsubscribe_ends_the_channel_and_it_is_not_joined_again(
    start_node: StartNode, transport: str
) -> None:
    node, url = await start(start_node)
    async with connect(url, token=tokens.token("alice"), transports=[transport], **FAST) as client:
        one = await client.join("room:1")
        two = await client.join("room:2")
        node.publish("room:1", "queued")
        await until(lambda: one.offset == 1, "the publication delivered")
        result = await rest(node, "/api/unsubscribe", {"user": "alice", "channel": "room:1"})
        assert result == {"unsubscribed": 1}
        got: list[Any] = []

        async def iterate() -> None:
            async for message in one:
                got.append(message.data)

        with pytest.raises(Unsubscribed, match="room:1"), trio.fail_after(10):
            await iterate()
        assert got == ["queued"]  # what came before the push is still delivered
        assert one.joined is False
        assert one.unsubscribed == "removed by the server"
        # A reconnect rejoins room:2 only.
        client.drop_connection()
        await until(lambda: client.connects == 2 and client.connected, "the reconnect")
        node.publish("room:2", "still here")
        [message] = await take(two, 1)
        assert message.data == "still here"
        [conn] = node.hub.connections_of("alice")
        assert set(conn.joins) == {"room:2"}
