"""The Redis source against real redis-server processes: the conformance kit for pub/sub
(channels and patterns) and streams, reconnecting after the server restarts (streams resume
without loss or duplicates), resuming from durable history after the node restarts, a stream
trimmed past the source's position, bad entries skipped, startup errors, option errors, and
loading by entry point name."""

from __future__ import annotations

import ast
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import coredis
import httpx
import orjson
import pytest
import trio
from pyrt_redis import RedisSource
from pyrt_redis.source import stream_id
from redisserver import RedisServer, free_port
from trio_websocket import WebSocketConnection, open_websocket_url

import pyrt.plugin
from pyrt import Node, NodeConfig
from pyrt.node.sources import load_sources
from pyrt.plugin import OwnsChannels, ReportsLag, SourceError
from pyrt.testing import check_source, open_auth

PACKAGE = Path(__file__).resolve().parent.parent / "pyrt_redis"


def options(server: RedisServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": server.host,
        "port": server.port,
        "password": server.password,
        "reconnect_min": 0.05,
        "reconnect_max": 0.3,
        "startup_timeout": 10.0,
        **extra,
    }


@asynccontextmanager
async def producer(server: RedisServer) -> AsyncIterator[coredis.Redis[bytes]]:
    """A client of the server, for publishing and adding stream entries."""
    client: coredis.Redis[bytes] = coredis.Redis(
        host=server.host, port=server.port, password=server.password
    )
    async with client:
        yield client


@asynccontextmanager
async def node_with(source: RedisSource, **config: Any) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        node = Node(NodeConfig(auth=open_auth(), port=0, **config), sources=[source])
        await nursery.start(node.run)
        yield node
        node.stop()


@asynccontextmanager
async def client(node: Node, *joins: dict[str, Any]) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client of `node` that sent `joins` (join commands without id) and got
    their replies (kept in `ws.replies`)."""
    async with open_websocket_url(f"ws://127.0.0.1:{node.port}/connection/websocket") as ws:
        replies = []
        for n, join in enumerate(joins):
            await ws.send_message(orjson.dumps({"id": n, "cmd": "join", **join}).decode())
            reply = await frame(ws)
            assert "ok" in reply, reply
            replies.append(reply["ok"])
        ws.replies = replies  # type: ignore[attr-defined]
        yield ws


async def frame(ws: WebSocketConnection, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            data: dict[str, Any] = orjson.loads(await ws.get_message())
            if data.get("push") != "ping":
                return data


async def pubs(ws: WebSocketConnection, count: int) -> list[dict[str, Any]]:
    """The next `count` publications `ws` receives (other pushes fail the test)."""
    got = []
    for _ in range(count):
        push = await frame(ws)
        assert push.get("push") == "pub", push
        got.append(push)
    return got


async def xadd(redis: coredis.Redis[bytes], stream: str, fields: dict[str, Any]) -> str:
    """Adds an entry; returns its id."""
    entry = await redis.xadd(stream, fields)
    assert entry is not None
    return entry.decode()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    with trio.fail_after(timeout):
        while not condition():
            await trio.sleep(0.01)
    assert condition(), what


# -- the conformance kit -------------------------------------------------------------------


async def test_pubsub_channels_pass_the_kit(redis_server: RedisServer) -> None:
    async def produce(values: Sequence[str]) -> None:
        async with producer(redis_server) as redis:
            for value in values:
                assert await redis.publish("kit", value) == 1  # one subscriber: the source

    await check_source(
        lambda: RedisSource(**options(redis_server, channels={"kit": "redis:kit"})),
        produce,
        channel="redis:kit",
        value=lambda data: data["payload"],
    )


async def test_pubsub_patterns_pass_the_kit(redis_server: RedisServer) -> None:
    async def produce(values: Sequence[str]) -> None:
        async with producer(redis_server) as redis:
            for n, value in enumerate(values):
                assert await redis.publish(f"kitp.{n}", value) == 1

    def value(data: Any) -> Any:
        assert data["event"].startswith("kitp."), data
        return data["payload"]

    await check_source(
        lambda: RedisSource(**options(redis_server, patterns={"kitp.*": "redis:kitp"})),
        produce,
        channel="redis:kitp",
        value=value,
    )


async def test_streams_pass_the_kit(redis_server: RedisServer) -> None:
    async def produce(values: Sequence[str]) -> None:
        async with producer(redis_server) as redis:
            for value in values:
                await redis.xadd("kit-stream", {"v": value})

    def value(data: Any) -> Any:
        assert data["stream"] == "kit-stream"
        stream_id(data["id"])
        return data["fields"]["v"]

    # start = "new" (the default): each node of the kit reads only what is added after it
    # started, so the second one does not see the first one's entries again.
    await check_source(
        lambda: RedisSource(**options(redis_server, streams={"kit-stream": "redis:kit-stream"})),
        produce,
        channel="redis:kit-stream",
        value=value,
    )


# -- what is published -----------------------------------------------------------------------


async def test_payloads_json_or_text_and_the_shapes(redis_server: RedisServer) -> None:
    source = RedisSource(
        **options(
            redis_server,
            channels={"shape": "redis:shape"},
            patterns={"shape.*": "redis:shapes"},
            streams={"shape-stream": "redis:shape-stream"},
        )
    )
    deep = "[" * 100 + "]" * 100  # JSON, but deeper than pyrt publishes: text
    joins = [{"channel": c} for c in ("redis:shape", "redis:shapes", "redis:shape-stream")]
    async with node_with(source) as node, client(node, *joins) as ws, producer(redis_server) as r:
        assert set(source.owned_channels) == {"redis:shape", "redis:shapes", "redis:shape-stream"}
        for payload in ('{"id": 42}', "42", "plain text", "", deep):
            await r.publish("shape", payload)
        await r.publish("shape.eu", '{"n": 1}')
        entry = await xadd(r, "shape-stream", {"kind": "paid", "id": "42", "note": "x y"})
        got = await pubs(ws, 7)
        # The stream's lag, on /metrics (ReportsLag): an entry just added, nothing pending.
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{node.port}/metrics")).text
        lag = re.search(r'^pyrt_source_lag_seconds\{source="redis"\} (\S+)$', metrics, re.M)
        assert lag is not None, metrics
        assert 0 <= float(lag[1]) < 5
        assert 'pyrt_source_lag_bytes{source="redis"} 0.0' in metrics
    assert [(p["channel"], p["data"]) for p in got[:6]] == [
        ("redis:shape", {"event": "shape", "payload": {"id": 42}}),
        ("redis:shape", {"event": "shape", "payload": 42}),
        ("redis:shape", {"event": "shape", "payload": "plain text"}),
        ("redis:shape", {"event": "shape", "payload": ""}),
        ("redis:shape", {"event": "shape", "payload": deep}),
        ("redis:shapes", {"event": "shape.eu", "payload": {"n": 1}}),
    ]
    assert got[6]["channel"] == "redis:shape-stream"
    assert got[6]["data"] == {
        "stream": "shape-stream",
        "id": entry,
        "fields": {"kind": "paid", "id": 42, "note": "x y"},
    }


async def test_json_false_keeps_text(redis_server: RedisServer) -> None:
    source = RedisSource(
        **options(redis_server, channels={"text": "redis:text"}, streams={"ts": "redis:ts"}),
        json=False,
    )
    joins = [{"channel": "redis:text"}, {"channel": "redis:ts"}]
    async with node_with(source) as node, client(node, *joins) as ws, producer(redis_server) as r:
        await r.publish("text", '{"id": 42}')
        await r.xadd("ts", {"n": "7"})
        got = await pubs(ws, 2)
    assert got[0]["data"]["payload"] == '{"id": 42}'
    assert got[1]["data"]["fields"] == {"n": "7"}


async def test_bad_entries_and_messages_are_skipped_and_counted(redis_server: RedisServer) -> None:
    source = RedisSource(
        **options(redis_server, channels={"bad": "redis:bad"}, streams={"bad-s": "redis:bad-s"})
    )
    joins = [{"channel": "redis:bad"}, {"channel": "redis:bad-s"}]
    async with node_with(source) as node, client(node, *joins) as ws, producer(redis_server) as r:
        await r.publish("bad", b"\xff not UTF-8")
        await r.publish("bad", "after")
        await r.xadd("bad-s", {"v": b"\xfe\xff"})
        await r.xadd("bad-s", {b"\xff": "a bad field name"})
        good = await xadd(r, "bad-s", {"v": "after"})
        got = await pubs(ws, 2)
        assert [p["data"] for p in got] == [
            {"event": "bad", "payload": "after"},
            {"stream": "bad-s", "id": good, "fields": {"v": "after"}},
        ]
        assert node.metrics.source_events_skipped["redis"] == 3
        assert source.positions == {"bad-s": good}  # the skipped ones are behind it
        assert source.connects == 1


# -- reconnecting ----------------------------------------------------------------------------


async def test_server_restart_streams_resume_without_loss_or_duplicates(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    server = new_redis_server()
    source = RedisSource(
        **options(
            server,
            streams={"orders": "redis:orders"},
            channels={"live": "redis:live"},
            reconnect_min=0.3,  # long enough that entries are added before it reconnects
            reconnect_max=0.5,
            batch=7,  # several reads per burst
        )
    )
    joins = [{"channel": "redis:orders"}, {"channel": "redis:live"}]
    async with node_with(source) as node, client(node, *joins) as ws:
        async with producer(server) as redis:
            for n in range(20):
                await redis.xadd("orders", {"n": str(n)})
        first = await pubs(ws, 20)
        await trio.to_thread.run_sync(server.restart)  # SIGKILL; the data is in the AOF
        async with producer(server) as redis:
            for n in range(20, 40):  # added while the source waits to reconnect
                await redis.xadd("orders", {"n": str(n)})
            await until(lambda: source.connects == 2, "the source reconnects")
            for n in range(40, 50):
                await redis.xadd("orders", {"n": str(n)})
            assert await redis.publish("live", "resubscribed") == 1
        rest = await pubs(ws, 31)
        assert source.last_error is not None
        assert node.metrics.source_events_skipped.get("redis", 0) == 0
    got = first + rest
    assert [p["data"]["fields"]["n"] for p in got if p["channel"] == "redis:orders"] == list(
        range(50)
    )
    assert [p["offset"] for p in got if p["channel"] == "redis:orders"] == list(range(1, 51))
    assert got[-1]["data"] == {"event": "live", "payload": "resubscribed"}


async def test_pubsub_resubscribes_after_a_restart(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    server = new_redis_server()
    source = RedisSource(**options(server, patterns={"p.*": "redis:p"}, channels={"c": "redis:c"}))
    joins = [{"channel": "redis:p"}, {"channel": "redis:c"}]
    async with node_with(source) as node, client(node, *joins) as ws:
        await trio.to_thread.run_sync(server.restart)
        await until(lambda: source.connects == 2, "the source reconnects")
        async with producer(server) as redis:
            await until_subscribed(redis, "c", patterns=1)
            await redis.publish("p.1", "one")
            await redis.publish("c", "two")
        got = await pubs(ws, 2)
    assert [p["data"]["payload"] for p in got] == ["one", "two"]


async def until_subscribed(
    redis: coredis.Redis[bytes], channel: str, subscribers: int = 1, patterns: int = 0
) -> None:
    """Waits until the server counts `subscribers` of `channel`, and `patterns` patterns."""
    with trio.fail_after(10):
        while True:
            counts = await redis.pubsub_numsub(channel)
            if (
                counts.get(channel.encode()) == subscribers
                and await redis.pubsub_numpat() == patterns
            ):
                return
            await trio.sleep(0.01)


async def test_a_node_restart_resumes_from_durable_history(
    new_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """The stream ids are the source's checkpoint, kept in the history log with the
    publications: a new node on the same history resumes after the last one in it."""
    server = new_redis_server()
    history = {"history_dir": str(tmp_path / "history")}

    def source() -> RedisSource:
        return RedisSource(**options(server, streams={"orders": "redis:orders"}))

    async with (
        node_with(source(), **history) as node,
        client(node, {"channel": "redis:orders"}) as ws,
    ):
        async with producer(server) as redis:
            for n in range(5):
                await redis.xadd("orders", {"n": str(n)})
        first = await pubs(ws, 5)
    epoch = first[0]["epoch"]
    async with producer(server) as redis:
        for n in range(5, 10):  # while no node runs
            await redis.xadd("orders", {"n": str(n)})
    since = {"offset": 5, "epoch": epoch}
    async with node_with(source(), **history) as node:
        join = {"channel": "redis:orders", "since": since}
        async with client(node, join) as ws:
            assert ws.replies[0]["recovered"] is True  # type: ignore[attr-defined]
            rest = await pubs(ws, 5)
            async with producer(server) as redis:
                await redis.xadd("orders", {"n": "10"})
            rest += await pubs(ws, 1)
    got = first + rest
    assert [p["data"]["fields"]["n"] for p in got] == list(range(11))
    assert [(p["offset"], p["epoch"]) for p in got] == [(n, epoch) for n in range(1, 12)]


async def test_a_stream_trimmed_past_the_position_is_a_gap(
    new_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """Entries deleted before the source read them are lost: the channel starts a new epoch,
    so a client resuming across it is told `recovered: false`."""
    server = new_redis_server()
    history = {"history_dir": str(tmp_path / "history")}

    def source() -> RedisSource:
        return RedisSource(**options(server, streams={"trim": "redis:trim"}))

    async with (
        node_with(source(), **history) as node,
        client(node, {"channel": "redis:trim"}) as ws,
    ):
        async with producer(server) as redis:
            await redis.xadd("trim", {"n": "0"})
        (first,) = await pubs(ws, 1)
    async with producer(server) as redis:
        for n in range(1, 4):
            last = await xadd(redis, "trim", {"n": str(n)})
        await redis.xtrim("trim", threshold=1, trim_strategy=coredis.PureToken.MAXLEN)
    made = source()
    async with node_with(made, **history) as node:
        await until(lambda: made.positions == {"trim": last}, "n=3 is published")
        join = {"channel": "redis:trim", "since": {"offset": 1, "epoch": first["epoch"]}}
        async with client(node, join) as ws:
            reply = ws.replies[0]  # type: ignore[attr-defined]
            assert reply["recovered"] is False
            assert reply["epoch"] != first["epoch"]
            async with producer(server) as redis:
                await redis.xadd("trim", {"n": "4"})
            (after,) = await pubs(ws, 1)
        assert after["data"]["fields"] == {"n": 4}
        assert after["offset"] == 3  # n=3, the entry the trim kept, went before the join
        assert made.gaps == 1


class Proxy:
    """A TCP proxy to the server whose existing connections can be frozen (no bytes pass,
    nothing is closed), like a network path that died silently."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = trio.Event()
        self.port = 0

    async def run(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle, listeners)
            task_status.started()

    async def handle(self, client: trio.SocketStream) -> None:
        frozen = self.frozen
        async with client, await trio.open_tcp_stream("127.0.0.1", self.upstream_port) as up:

            async def pump(a: trio.SocketStream, b: trio.SocketStream) -> None:
                while data := await a.receive_some(65536):
                    if frozen.is_set():
                        await trio.sleep_forever()
                    await b.send_all(data)

            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(pump, client, up)
                    nursery.start_soon(pump, up, client)
                    await frozen.wait()
                    await trio.sleep(60)  # frozen: hold the sockets open, pass nothing
                    scope.cancel()

    def freeze(self) -> None:
        """Freezes the current connections; new ones work."""
        self.frozen.set()
        self.frozen = trio.Event()


async def test_a_frozen_link_is_noticed_and_left(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    """Nothing closes the connections, nothing passes: the PING and the bounded XREAD notice,
    and the source reconnects, reads the stream on and subscribes again."""
    server = new_redis_server()
    proxy = Proxy(server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        source = RedisSource(
            **options(
                server,
                port=proxy.port,
                streams={"frozen": "redis:frozen"},
                channels={"frozen-live": "redis:frozen-live"},
                ping_interval=0.2,
                ping_timeout=0.3,
            )
        )
        joins = [{"channel": "redis:frozen"}, {"channel": "redis:frozen-live"}]
        async with node_with(source) as node, client(node, *joins) as ws:
            async with producer(server) as redis:
                await redis.xadd("frozen", {"n": "0"})
                await pubs(ws, 1)
                proxy.freeze()
                await redis.xadd("frozen", {"n": "1"})  # behind the frozen link
                await until(lambda: source.connects == 2, "the source reconnects")
                assert isinstance(source.last_error, trio.TooSlowError)
                await redis.xadd("frozen", {"n": "2"})
                # The frozen connection is still subscribed as far as the server knows.
                await until_subscribed(redis, "frozen-live", subscribers=2)
                await redis.publish("frozen-live", "through the new link")
            got = await pubs(ws, 3)
        nursery.cancel_scope.cancel()
    assert [p["data"].get("fields") for p in got[:2]] == [{"n": 1}, {"n": 2}]
    assert got[2]["data"]["payload"] == "through the new link"


# -- starting --------------------------------------------------------------------------------


async def test_a_wrong_password_stops_the_node_at_once(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    server = new_redis_server(password="right")
    source = RedisSource(**options(server, channels={"c": "redis:c"}, password="wrong"))
    node = Node(NodeConfig(auth=open_auth(), port=0), sources=[source])
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(
            pytest.RaisesExc(SourceError, match=r"^sources\.redis: .*password"),
            flatten_subgroups=True,
        ),
    ):
        await node.run()


async def test_the_right_password_works(new_redis_server: Callable[..., RedisServer]) -> None:
    server = new_redis_server(password="right")
    source = RedisSource(**options(server, channels={"c": "redis:c"}))
    async with node_with(source) as node, client(node, {"channel": "redis:c"}) as ws:
        async with producer(server) as redis:
            await redis.publish("c", "authenticated")
        (got,) = await pubs(ws, 1)
    assert got["data"]["payload"] == "authenticated"


async def test_password_env(
    new_redis_server: Callable[..., RedisServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    server = new_redis_server(password="from-env")
    monkeypatch.setenv("PYRT_TEST_REDIS_PASSWORD", "from-env")
    settings = options(server, channels={"c": "redis:c"}, password_env="PYRT_TEST_REDIS_PASSWORD")
    del settings["password"]
    async with node_with(RedisSource(**settings)):
        pass
    monkeypatch.delenv("PYRT_TEST_REDIS_PASSWORD")
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(
            pytest.RaisesExc(SourceError, match="PYRT_TEST_REDIS_PASSWORD"), flatten_subgroups=True
        ),
    ):
        await Node(NodeConfig(auth=open_auth(), port=0), sources=[RedisSource(**settings)]).run()


async def test_no_server_within_startup_timeout() -> None:
    port = free_port()  # nothing listens there
    source = RedisSource(channels={"c": "redis:c"}, port=port, startup_timeout=0.5)
    source.reconnect_min = 0.05
    start = trio.current_time()
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(
            pytest.RaisesExc(
                SourceError,
                match=rf"^sources\.redis: no connection to Redis within startup_timeout \(0\.5 s\):"
                rf" .*Redis at 127\.0\.0\.1:{port}",
            ),
            flatten_subgroups=True,
        ),
    ):
        await Node(NodeConfig(auth=open_auth(), port=0), sources=[source]).run()
    assert trio.current_time() - start < 2


async def test_a_key_of_another_type_stops_the_node_at_start(redis_server: RedisServer) -> None:
    redis_server.cli("SET", "not-a-stream", "x")
    source = RedisSource(**options(redis_server, streams={"not-a-stream": "redis:x"}))
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(
            pytest.RaisesExc(SourceError, match=r"^sources\.redis: .*wrong kind of value"),
            flatten_subgroups=True,
        ),
    ):
        await Node(NodeConfig(auth=open_auth(), port=0), sources=[source]).run()


async def test_tls_verified_against_a_given_ca(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    server = new_redis_server(tls=True)
    source = RedisSource(
        **options(server, channels={"tls": "redis:tls"}, ssl_root_cert=str(server.ca_file))
    )
    assert source.ssl
    async with node_with(source) as node, client(node, {"channel": "redis:tls"}) as ws:
        await trio.to_thread.run_sync(server.cli, "PUBLISH", "tls", "over TLS")
        (got,) = await pubs(ws, 1)
    assert got["data"]["payload"] == "over TLS"


async def test_tls_refuses_a_server_it_cannot_verify(
    new_redis_server: Callable[..., RedisServer],
) -> None:
    server = new_redis_server(tls=True)
    source = RedisSource(**options(server, channels={"tls": "redis:tls"}, ssl=True))
    with (
        trio.fail_after(5),
        pytest.RaisesGroup(
            pytest.RaisesExc(SourceError, match=r"^sources\.redis: .*certificate verify failed"),
            flatten_subgroups=True,
        ),
    ):
        await Node(NodeConfig(auth=open_auth(), port=0), sources=[source]).run()


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "error", "message"),
    [
        ({}, ValueError, "give at least one of channels, patterns and streams"),
        ({"channels": ["a"]}, TypeError, 'channels must be a table of Redis channel = "pyrt'),
        ({"channels": {"": "x"}}, ValueError, "channels: '' is not a Redis channel"),
        ({"channels": {"a": 1}}, TypeError, 'channels.a: expected "pyrt channel", not 1'),
        ({"patterns": {"a.*": ""}}, ValueError, "patterns.a.*: '' is not a pyrt channel"),
        ({"streams": {"s": "bad channel\n"}}, ValueError, "streams.s: 'bad channel\\n' is not"),
        ({"start": "end"}, ValueError, 'start must be "new" or "all", not \'end\''),
        ({"json": "yes"}, TypeError, "json must be true or false"),
        ({"batch": 0}, ValueError, "batch must be at least 1, not 0"),
        ({"batch": 1.5}, TypeError, "batch must be an integer"),
        ({"port": 70000}, ValueError, "port must be at most 65535, not 70000"),
        ({"port": "6379"}, TypeError, "port must be an integer"),
        ({"db": -1}, ValueError, "db must not be negative"),
        ({"host": ""}, TypeError, "host must be a non-empty string"),
        ({"password": "a", "password_env": "B"}, ValueError, "password or password_env, not both"),
        ({"username": 5}, TypeError, "username must be a non-empty string"),
        ({"ssl": 1}, TypeError, "ssl must be true or false"),
        ({"client_name": "a b"}, ValueError, "client_name must be a non-empty string without"),
        ({"reconnect_min": 0}, ValueError, "reconnect_min must be a positive number of seconds"),
        ({"reconnect_min": 5, "reconnect_max": 1}, ValueError, "must not be less than"),
        ({"ping_interval": "30"}, TypeError, "ping_interval must be a number of seconds"),
        ({"startup_timeout": float("inf")}, ValueError, "startup_timeout must be a positive"),
    ],
)
def test_options_are_checked(given: dict[str, Any], error: type[Exception], message: str) -> None:
    routes = {"channels", "patterns", "streams"}
    table = given if routes & set(given) or not given else {"channels": {"c": "redis:c"}, **given}
    with pytest.raises(error, match=re.escape(message)):
        RedisSource(**table)
    # Through the loader (a config file's table), the message names the table.
    with pytest.raises(ValueError, match=r"^sources\.redis: .*" + re.escape(message)):
        load_sources({"redis": table})


def test_unknown_options_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"^sources\.redis: .*unexpected keyword argument 'chanels'"
    ):
        load_sources({"redis": {"chanels": {"c": "redis:c"}}})


# -- the plugin, as pyrt finds it --------------------------------------------------------------


def test_the_entry_point_loads_it_by_name() -> None:
    (source,) = load_sources({"redis": {"channels": {"orders": "redis:orders"}}})
    assert type(source) is RedisSource
    assert source.name == "redis"
    (other,) = load_sources({"cache": {"plugin": "redis", "streams": {"s": "redis:s"}}})
    assert type(other) is RedisSource
    assert other.name == "cache"
    assert isinstance(source, OwnsChannels)
    assert isinstance(source, ReportsLag)
    assert source.owned_channels == ("redis:orders",)


def test_the_plugin_imports_the_plugin_api_only() -> None:
    """What a third-party plugin may use (pyrt.plugin) is all this one uses."""
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 2
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                if name.split(".")[0] == "pyrt":
                    assert name == "pyrt.plugin", f"{path.name} imports {name}"
    assert pyrt.plugin.API_VERSION[0] == 1


def test_stream_ids() -> None:
    assert stream_id("1700000000000-3") == (1700000000000, 3)
    assert stream_id("b'0-0'") == (0, 0)  # how coredis shows max-deleted-entry-id
    assert stream_id("2-0") > stream_id("1-99")
    with pytest.raises(ValueError, match="is not a stream entry id"):
        stream_id("latest")
