"""The long-poll transport over real sockets: the conformance kit, batches and their cursors,
lost and superseded polls, session expiry, batch bounds, errors and options."""

from __future__ import annotations

import functools
from typing import Any

import httpx
import orjson
import pytest
import trio
from httpkit import base_url, longpoll_kit_client, open_sse
from nodekit import StartNode, until
from trio.testing import MockClock, wait_all_tasks_blocked
from trio_websocket import open_websocket_url

from pyrt.hub.history import StreamPosition
from pyrt.hub.hub import HubConfig
from pyrt.node.node import load_transports
from pyrt.plugins.cursor import Cursor, decode_cursor
from pyrt.plugins.longpoll import CLOSE_GRACE, LongPollTransport
from pyrt.testing import check_transport

POLL = "/connection/poll"


@pytest.fixture
def start_node(start_node: StartNode) -> StartNode:
    """Nodes with the long-poll transport loaded as a plugin (by name), and two others."""
    return functools.partial(start_node, transports=("longpoll", "sse", "websocket"))


def longpoll(**options: Any) -> dict[str, dict[str, Any]]:
    """`transport_options` for the long-poll transport."""
    return {"longpoll": options}


class Poller:
    """One long-poll session driven by hand."""

    def __init__(self, http: httpx.AsyncClient, opened: dict[str, Any]) -> None:
        self.http = http
        self.opened = opened
        self.session: str = opened["session"]
        self.token: str = opened["token"]
        self.cursor: str = opened["cursor"]

    @classmethod
    async def open(cls, http: httpx.AsyncClient, **params: Any) -> Poller:
        response = await http.get(POLL, params=params)
        assert response.status_code == 200, response.text
        return cls(http, response.json())

    async def get(self, cursor: str | None = None, **params: str) -> httpx.Response:
        query = {"session": self.session, "token": self.token, "cursor": cursor or self.cursor}
        return await self.http.get(POLL, params={**query, **params})

    async def poll(self) -> dict[str, Any]:
        """The next batch, moving on to its cursor."""
        with trio.fail_after(5):
            response = await self.get()
        assert response.status_code == 200, response.text
        batch: dict[str, Any] = response.json()
        self.cursor = batch["cursor"]
        return batch

    async def send(self, **command: Any) -> None:
        response = await self.http.post(
            "/connection/send",
            params={"session": self.session, "token": self.token},
            content=orjson.dumps(command),
        )
        assert response.status_code == 202, response.text


def seq(cursor: str) -> int | None:
    return decode_cursor(cursor).seq


async def test_longpoll_transport_passes_the_conformance_kit() -> None:
    await check_transport(LongPollTransport, longpoll_kit_client, joins_on_open=1)


def test_longpoll_is_an_entry_point_plugin_with_checked_options() -> None:
    options = {"poll_timeout": 5, "session_ttl": 6, "max_batch_messages": 7, "max_batch_bytes": 8}
    [transport] = load_transports(["longpoll"], {"longpoll": options})
    assert isinstance(transport, LongPollTransport)
    assert transport.name == "longpoll"
    assert (transport.poll_timeout, transport.session_ttl) == (5.0, 6.0)
    assert (transport.max_batch_messages, transport.max_batch_bytes) == (7, 8)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"poll_timeout": 0}, "poll_timeout must be a positive number of seconds, not 0"),
        ({"session_ttl": float("nan")}, "session_ttl must be a positive number"),
        ({"poll_timeout": "25"}, "poll_timeout must be a number of seconds, not '25'"),
        ({"poll_timeout": 60}, r"session_ttl \(60.0\) must exceed poll_timeout \(60\)"),
        ({"max_batch_messages": 0}, "max_batch_messages must be at least 1, not 0"),
        ({"max_batch_bytes": 1.5}, "max_batch_bytes must be an integer, not 1.5"),
        ({"max_batch_bytes": False}, "max_batch_bytes must be an integer"),
        ({"timeout": 1}, "unexpected keyword argument 'timeout'"),
    ]
    for given, message in bad:
        with pytest.raises(ValueError, match=r"^transports\.longpoll: .*" + message):
            load_transports(["longpoll"], {"longpoll": given})


async def test_open_answers_at_once_then_polls_carry_batches(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        with trio.fail_after(1):  # far below the poll timeout: the open does not wait
            p = await Poller.open(http, channel=["a", "b:*"], presence="c")
        opened = p.opened
        assert set(opened) == {"session", "token", "messages", "cursor"}
        replies = [m.get("reply") or m["push"] for m in opened["messages"]]
        assert replies == ["join:a", "join:b:*", "join:c", "presence_state"]
        epoch_a = opened["messages"][0]["ok"]["epoch"]
        epoch_c = opened["messages"][2]["ok"]["epoch"]
        assert decode_cursor(p.cursor) == Cursor(
            {"a": StreamPosition(0, epoch_a), "c": StreamPosition(0, epoch_c)}, seq=0
        )
        node.publish("a", 1)
        node.publish("b:x", 2)
        batch = await p.poll()
        assert [m["data"] for m in batch["messages"]] == [1, 2]
        assert set(batch) == {"messages", "cursor"}
        assert decode_cursor(p.cursor) == Cursor(
            {"a": StreamPosition(1, epoch_a), "c": StreamPosition(0, epoch_c)}, seq=1
        )
        # A poll with nothing queued waits for the next frame.
        async with trio.open_nursery() as inner:
            got: list[dict[str, Any]] = []

            async def wait() -> None:
                got.append(await p.poll())

            inner.start_soon(wait)
            await wait_all_tasks_blocked(0.05)  # the poll reached the server, which waits
            assert got == []
            await p.send(id=5, cmd="ping")
        assert got[0]["messages"] == [{"reply": 5, "ok": {}}]
        assert seq(p.cursor) == 2


async def test_a_lost_response_is_sent_again_identically(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        node.publish("a", "one")
        node.publish("a", "two")
        acked = p.cursor
        first = await p.get()
        # Say its response was lost: the client polls again with the cursor it had.
        again = await p.get(acked)
        assert again.status_code == 200
        assert again.content == first.content
        assert [m["data"] for m in again.json()["messages"]] == ["one", "two"]
        # Then it goes on from the batch's cursor and nothing is lost or repeated.
        p.cursor = again.json()["cursor"]
        node.publish("a", "three")
        assert [m["data"] for m in (await p.poll())["messages"]] == ["three"]
        # Two batches behind, or a batch never sent: out of step.
        for cursor in (acked, Cursor(decode_cursor(p.cursor).positions, seq=9).encode()):
            stale = await p.get(cursor)
            assert stale.status_code == 409
            assert stale.json()["error"] == {
                "code": 409,
                "message": "cursor out of step: open a new session with your cursor",
            }


async def test_a_newer_poll_answers_the_waiting_one(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        cursor = p.cursor
        older: list[httpx.Response] = []
        async with trio.open_nursery() as inner:

            async def wait() -> None:
                older.append(await p.get(cursor))

            inner.start_soon(wait)
            await wait_all_tasks_blocked(0.05)  # the older one is waiting
            newer = trio.Event()

            async def newer_poll() -> None:
                response = await p.get(cursor)
                assert [m["data"] for m in response.json()["messages"]] == ["for the newer"]
                newer.set()

            inner.start_soon(newer_poll)
            await until(lambda: older, "the newer poll to answer the older one", timeout=2)
            assert older[0].json() == {"messages": [], "cursor": cursor}
            node.publish("a", "for the newer")
            with trio.fail_after(2):
                await newer.wait()


async def test_an_idle_poll_times_out_empty_with_the_same_cursor(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node(transport_options=longpoll(poll_timeout=0.2, session_ttl=5))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        before = p.cursor
        started = trio.current_time()
        batch = await p.poll()
        assert trio.current_time() - started == pytest.approx(0.2)  # the poll_timeout
        assert batch == {"messages": [], "cursor": before}
        node.publish("a", "after")  # the session still works
        assert [m["data"] for m in (await p.poll())["messages"]] == ["after"]


async def test_a_session_that_stops_polling_expires_and_leaves(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    node = await start_node(transport_options=longpoll(poll_timeout=0.1, session_ttl=0.5))
    url = f"ws://127.0.0.1:{node.port}/connection/websocket"
    async with httpx.AsyncClient(base_url=base_url(node)) as http, open_websocket_url(url) as ws:
        await ws.send_message('{"id":1,"cmd":"join","channel":"room","presence":true}')
        p = await Poller.open(http, presence="room")
        await p.send(id=1, cmd="track", channel="room", key="ann")
        frames = [orjson.loads(await ws.get_message()) for _ in range(3)]
        assert frames[-1]["push"] == "presence_diff"
        assert list(frames[-1]["joins"]) == ["ann"]
        # Polling keeps it alive past the ttl...
        for _ in range(8):
            await p.poll()
        assert len(node.hub) == 2
        # ...and then it stops.
        stopped = trio.current_time()
        with trio.fail_after(3):
            diff = orjson.loads(await ws.get_message())
        assert list(diff["leaves"]) == ["ann"]
        # One ttl after the last poll was answered (its last sign of life); no grace after.
        assert trio.current_time() - stopped == pytest.approx(0.5)
        assert len(node.hub) == 1
        gone = await p.get()
        assert gone.status_code == 404
        assert "open a new one" in gone.json()["error"]["message"]


async def test_a_waiting_poll_keeps_its_session_alive(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    # The gap before the poll plus its wait exceed the ttl (0.5 + 0.9 > 1.0): only the poll's
    # own sign of life, at its start, keeps the session from expiring while it waits.
    node = await start_node(transport_options=longpoll(poll_timeout=0.9, session_ttl=1.0))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        await trio.sleep(0.5)  # the client's gap between polls (virtual time): the behaviour here
        batch = await p.poll()
        assert batch["messages"] == []
        assert "close" not in batch
        assert len(node.hub) == 1


async def test_batches_are_bounded(start_node: StartNode) -> None:
    node = await start_node(transport_options=longpoll(max_batch_messages=3, max_batch_bytes=1000))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        for n in range(7):
            node.publish("a", n)
        batches = [(await p.poll())["messages"] for _ in range(3)]
        assert [len(b) for b in batches] == [3, 3, 1]
        # Small frames (under 200 bytes each, with the envelope): the message count bound.
        assert all(len(orjson.dumps(m)) < 200 for b in batches for m in b)
        # 300 bytes of data plus the envelope: two frames fit in 1000 bytes, three do not.
        for n in range(4):
            node.publish("a", "x" * 300 + str(n))
        batches = [(await p.poll())["messages"] for _ in range(2)]
        assert [len(b) for b in batches] == [2, 2]
        assert all(334 < len(orjson.dumps(m)) < 500 for b in batches for m in b)
        assert all(sum(len(orjson.dumps(m)) for m in b) <= 1000 for b in batches)
        # A frame larger than the bound still goes, alone.
        node.publish("a", "big" * 400)
        node.publish("a", "small")
        assert [m["data"] for m in (await p.poll())["messages"]] == ["big" * 400]
        assert [m["data"] for m in (await p.poll())["messages"]] == ["small"]
        assert seq(p.cursor) == 7


async def test_the_close_comes_in_a_batch_and_the_session_ends(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        node.publish("a", "before")
        bad = await http.post(
            "/connection/send", params={"session": p.session, "token": p.token}, content=b"[1]"
        )
        assert bad.status_code == 400
        batch = await p.poll()
        assert [m["data"] for m in batch["messages"]] == ["before"]
        assert batch["close"] == {"code": 4000, "reason": "frame must be a JSON object"}
        assert len(node.hub) == 0
        assert (await p.get()).status_code == 404


async def test_resuming_in_a_new_session_with_the_cursor(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        p = await Poller.open(http, channel="a")
        node.publish("a", 1)
        await p.poll()
        cursor = p.cursor
        await p.http.post("/connection/poll/end", params={"session": p.session, "token": p.token})
        node.publish("a", 2)
        node.publish("a", 3)
        again = await Poller.open(http, channel="a", cursor=cursor)
        messages = again.opened["messages"]
        assert messages[0]["ok"]["recovered"] is True
        assert [m["data"] for m in messages[1:]] == [2, 3]
        assert decode_cursor(again.cursor).positions["a"].offset == 3
        assert seq(again.cursor) == 0  # a new session counts its own batches


async def test_ending_a_session_answers_its_waiting_poll(start_node: StartNode) -> None:
    node = await start_node()
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        watcher = await Poller.open(http, presence="room")
        p = await Poller.open(http, presence="room")
        await p.send(id=1, cmd="track", channel="room", key="bob")
        await watcher.poll()  # bob joined
        await p.poll()  # the track reply, and bob's own join
        answered: list[dict[str, Any]] = []
        async with trio.open_nursery() as inner:

            async def wait() -> None:
                answered.append(await p.poll())

            inner.start_soon(wait)
            await wait_all_tasks_blocked(0.05)  # the poll reached the server, which waits
            assert answered == []
            end = await http.post(POLL + "/end", params={"session": p.session, "token": p.token})
            assert (end.status_code, end.json()) == (200, {})
        assert answered[0]["close"] == {"code": 1000, "reason": "session ended"}
        diff = (await watcher.poll())["messages"][0]
        assert list(diff["leaves"]) == ["bob"]
        assert (await p.get()).status_code == 404


async def test_errors(start_node: StartNode) -> None:
    node = await start_node(hub=HubConfig(max_channels_per_connection=1))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:

        async def error(response: httpx.Response) -> tuple[int, str]:
            assert response.headers["content-type"] == "application/json"
            body = response.json()["error"]
            assert body["code"] == response.status_code
            return response.status_code, body["message"]

        assert await error(await http.get(POLL)) == (
            400,
            "give at least one channel: ?channel=<name or pattern>",
        )
        assert (await error(await http.get(POLL, params={"channel": "a:>:b"})))[0] == 422
        assert (await error(await http.get(POLL, params={"channel": ["a", "b"]})))[0] == 429
        bad_cursor = await http.get(POLL, params={"channel": "a", "cursor": "!"})
        assert await error(bad_cursor) == (400, "cursor is not a token this server issued")
        assert len(node.hub) == 0

        p = await Poller.open(http, channel="a")
        assert await error(await p.get(cursor="bm9wZQ")) == (
            400,
            "cursor is not a token this server issued",
        )
        assert await error(await p.get(Cursor().encode())) == (
            400,
            "cursor has no batch number: send the cursor of the last poll",
        )
        no_cursor = await http.get(POLL, params={"session": p.session, "token": p.token})
        assert await error(no_cursor) == (
            400,
            "'cursor' is required: send the cursor of the last response",
        )
        no_token = await http.get(POLL, params={"session": p.session, "cursor": p.cursor})
        assert (await error(no_token))[0] == 400
        wrong = await http.get(POLL, params={"session": p.session, "token": "x", "cursor": "y"})
        assert await error(wrong) == (401, "wrong session token")
        unknown = await http.get(POLL, params={"session": "zz.9", "token": "x", "cursor": "y"})
        assert (await error(unknown))[0] == 404
        # A live session of another transport is not a long-poll session.
        async with open_sse(node, {"channel": "a"}) as sse:
            other = await http.get(
                POLL, params={"session": sse.session, "token": sse.token, "cursor": p.cursor}
            )
            assert await error(other) == (
                404,
                f"session '{sse.session}' is not a long-poll session",
            )
        assert (await http.post(POLL, params={"channel": "a"})).status_code == 405
        assert (await http.get(POLL + "/end")).status_code == 405
        # The session is untouched by all of that.
        node.publish("a", "fine")
        assert [m["data"] for m in (await p.poll())["messages"]] == ["fine"]


async def test_cors_headers_only_for_allowed_origins(start_node: StartNode) -> None:
    node = await start_node(cors_origins=("https://app.example",))
    async with httpx.AsyncClient(base_url=base_url(node)) as http:
        allowed = await http.get(
            POLL, params={"channel": "a"}, headers={"origin": "https://app.example"}
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        other = await http.get(
            POLL, params={"channel": "a"}, headers={"origin": "https://evil.example"}
        )
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers


async def test_shutdown_ends_sessions_nobody_polls_after_the_grace(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery=nursery, drain_timeout=10.0)
        async with httpx.AsyncClient(base_url=base_url(node)) as http:
            await Poller.open(http, channel="a")
        node.stop()
        stopped = trio.current_time()
    # run() returned once the session ended: after the grace, not the drain timeout.
    assert trio.current_time() - stopped == pytest.approx(CLOSE_GRACE)
    assert len(node.hub) == 0


async def test_a_poll_within_the_grace_collects_the_goodbye(
    start_node: StartNode, autojump_io_clock: MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        node = await start_node(nursery=nursery, drain_timeout=10.0)
        # One keep-alive connection: the node stops accepting new ones at shutdown.
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=base_url(node), limits=limits) as http:
            p = await Poller.open(http, channel="a")
            node.stop()
            stopped = trio.current_time()
            await trio.sleep(0.2)  # a client that polls late, within the grace (virtual time)
            batch = await p.poll()
            assert [m["push"] for m in batch["messages"]] == ["disconnect"]
            assert batch["close"] == {"code": 1001, "reason": "server shutting down, reconnect"}
    assert trio.current_time() - stopped == pytest.approx(0.2)  # collected: no grace to wait out
