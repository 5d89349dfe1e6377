"""The NOTIFY source and the source plugin system, against a real PostgreSQL server:
the conformance kit, NOTIFY to a WebSocket client end to end, JSON and text payloads,
reconnection (server restart, a killed session, a frozen link) with the catch-up hook,
and configuration errors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from pgserver import PASSWORD, PostgresServer
from trio_websocket import WebSocketConnection, open_websocket_url

from pyrt.node.config import ConfigError, node_config
from pyrt.node.node import Node, NodeConfig
from pyrt.node.sources import SourceError, load_sources
from pyrt.plugin import SourceContext
from pyrt.plugins.notify import CatchUp, NotifySource
from pyrt.plugins.websocket import WebSocketTransport
from pyrt.postgres import PgConnection
from pyrt.testing import check_source, open_auth


def options(postgres: PostgresServer, **extra: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": postgres.port,
        "user": "pyrt_scram",
        "password": PASSWORD,
        "database": "postgres",
        "channels": {"orders": "db:orders"},
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        **extra,
    }


async def notify(postgres: PostgresServer, *messages: tuple[str, str]) -> None:
    async with await PgConnection.connect(
        "127.0.0.1", postgres.port, "pyrt_md5", PASSWORD, "postgres"
    ) as conn:
        for channel, payload in messages:
            await conn.notify(channel, payload)


# -- the conformance kit -------------------------------------------------------------------


async def test_notify_source_passes_the_kit(postgres: PostgresServer) -> None:
    async def produce(values: Sequence[str]) -> None:
        await notify(postgres, *(("kit", v) for v in values))

    await check_source(
        lambda: NotifySource(**options(postgres, channels={"kit": "kit:notify"})),
        produce,
        channel="kit:notify",
        value=lambda data: data["payload"],
    )


class Swallower:
    """A source that swallows errors while publishing, uncounted: the kit must fail it."""

    name = "swallower"

    def __init__(self, port: int) -> None:
        self.port = port

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        conn = await PgConnection.connect(
            "127.0.0.1", self.port, "pyrt_scram", PASSWORD, "postgres"
        )
        async with conn:
            await conn.listen("kit")
            task_status.started()
            async for n in conn.notifications():
                with contextlib.suppress(Exception):  # uncounted: the mistake the kit must catch
                    await ctx.publish("kit:notify", {"payload": n.payload})


class Stubborn(Swallower):
    """A source that holds on past cancellation: the kit must notice the node hanging."""

    async def run(self, ctx: SourceContext, *, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(super().run, ctx)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(9)  # the fault under test: holding on past cancellation


@pytest.mark.slow
async def test_the_kit_catches_a_swallowing_or_stubborn_source(postgres: PostgresServer) -> None:
    async def produce(values: Sequence[str]) -> None:
        await notify(postgres, *(("kit", v) for v in values))

    def payload(data: Any) -> Any:
        return data["payload"]

    with pytest.raises(AssertionError, match="must be counted once, not 0 times"):
        await check_source(
            lambda: Swallower(postgres.port),
            produce,
            channel="kit:notify",
            value=payload,
            timeout=3,
        )
    with pytest.raises(AssertionError, match="did not stop with the source running"):
        await check_source(
            lambda: Stubborn(postgres.port), produce, channel="kit:notify", value=payload, timeout=3
        )


# -- end to end ----------------------------------------------------------------------------


@asynccontextmanager
async def node_with(source: NotifySource) -> AsyncIterator[Node]:
    async with trio.open_nursery() as nursery:
        node = Node(
            NodeConfig(auth=open_auth(), port=0),
            transports=[WebSocketTransport()],
            sources=[source],
        )
        await nursery.start(node.run)
        yield node
        node.stop()


@asynccontextmanager
async def client(node: Node, *channels: str) -> AsyncIterator[WebSocketConnection]:
    """A WebSocket client of `node` that joined `channels`."""
    async with open_websocket_url(f"ws://127.0.0.1:{node.port}/connection/websocket") as ws:
        for n, channel in enumerate(channels):
            await ws.send_message(
                orjson.dumps({"id": n, "cmd": "join", "channel": channel}).decode()
            )
            assert "ok" in await frame(ws)
        yield ws


async def frame(ws: WebSocketConnection, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            data: dict[str, Any] = orjson.loads(await ws.get_message())
            if data.get("push") != "ping":
                return data


async def test_notify_reaches_a_websocket_client(postgres: PostgresServer) -> None:
    source = NotifySource(
        **options(
            postgres,
            channels={
                "orders": "db:orders",
                "Audit Log": {"channel": "audit:all", "event": "audit"},
            },
        )
    )
    async with node_with(source) as node, client(node, "db:orders", "audit:all") as ws:
        await notify(
            postgres,
            ("orders", '{"id": 42, "total": 9.5}'),
            ("orders", "plain text"),
            ("orders", "17"),
            ("orders", ""),
            ("Audit Log", '["a", null]'),
            ("not mapped", "ignored"),
            ("orders", "x" * 7999),
        )
        got = [await frame(ws) for _ in range(6)]
    assert [(g["push"], g["channel"]) for g in got] == [("pub", "db:orders")] * 4 + [
        ("pub", "audit:all"),
        ("pub", "db:orders"),
    ]
    assert [g["data"] for g in got[:5]] == [
        {"event": "orders", "payload": {"id": 42, "total": 9.5}},
        {"event": "orders", "payload": "plain text"},
        {"event": "orders", "payload": 17},
        {"event": "orders", "payload": ""},
        {"event": "audit", "payload": ["a", None]},
    ]
    assert got[5]["data"]["payload"] == "x" * 7999
    assert source.connects == 1


def test_payload_json_or_text() -> None:
    source = NotifySource(channels={"c": "c"})
    assert source.payload('{"a": [1, 2]}') == {"a": [1, 2]}
    assert source.payload("true") is True
    assert source.payload("{not json") == "{not json"
    text_only = NotifySource(channels={"c": "c"}, json=False)
    assert text_only.payload('{"a": 1}') == '{"a": 1}'


# -- reconnecting --------------------------------------------------------------------------


class Recorder:
    """A catch-up hook that records its calls and publishes a marker each time."""

    def __init__(self) -> None:
        self.calls: list[bool] = []
        self.changed = trio.Event()

    async def __call__(self, ctx: CatchUp) -> None:
        (result,) = await ctx.connection.simple_query("SELECT 'caught up'")
        await ctx.publish("orders", {"catch_up": len(self.calls), "query": result.rows[0][0]})
        self.calls.append(ctx.reconnect)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_calls(self, n: int, timeout: float = 30) -> None:
        with trio.fail_after(timeout):
            while len(self.calls) < n:
                await self.changed.wait()


async def test_server_restart_reconnects_and_catches_up(postgres: PostgresServer) -> None:
    hook = Recorder()
    source = NotifySource(**options(postgres, catch_up=hook))
    async with node_with(source) as node, client(node, "db:orders") as ws:
        assert hook.calls == [False]
        await notify(postgres, ("orders", "before"))
        assert (await frame(ws))["data"]["payload"] == "before"
        await trio.to_thread.run_sync(postgres.restart)
        await hook.wait_calls(2)
        assert hook.calls == [False, True]
        marker = await frame(ws)
        assert marker["data"] == {
            "event": "orders",
            "payload": {"catch_up": 1, "query": "caught up"},
        }
        await notify(postgres, ("orders", "after"))
        assert (await frame(ws))["data"]["payload"] == "after"
    assert source.connects == 2
    assert source.last_error is not None  # why the first connection ended


async def test_a_killed_session_reconnects(postgres: PostgresServer) -> None:
    hook = Recorder()
    source = NotifySource(**options(postgres, catch_up=hook, application_name="pyrt-kill-me"))
    async with node_with(source) as node:
        assert source.connected
        killed = postgres.sql(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'pyrt-kill-me'"
        )
        assert killed == "1"
        await hook.wait_calls(2, timeout=10)
        async with client(node, "db:orders") as ws:
            await notify(postgres, ("orders", "still here"))
            assert (await frame(ws))["data"]["payload"] == "still here"
    assert hook.calls == [False, True]


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


async def test_a_frozen_link_is_noticed_by_the_ping(postgres: PostgresServer) -> None:
    proxy = Proxy(postgres.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        hook = Recorder()
        source = NotifySource(
            **options(postgres, port=proxy.port, catch_up=hook, ping_interval=0.2, ping_timeout=0.5)
        )
        async with node_with(source) as node, client(node, "db:orders") as ws:
            proxy.freeze()
            await hook.wait_calls(2, timeout=10)
            assert isinstance(source.last_error, trio.TooSlowError)
            await notify(postgres, ("orders", "through the new link"))
            payloads = [(await frame(ws))["data"]["payload"] for _ in range(2)]
            assert payloads[-1] == "through the new link"
        nursery.cancel_scope.cancel()


# -- configuration -------------------------------------------------------------------------


def test_sources_are_entry_point_plugins_configured_by_table(postgres: PostgresServer) -> None:
    [source] = load_sources({"notify": options(postgres)})
    assert isinstance(source, NotifySource)
    assert source.name == "notify"
    [audit] = load_sources({"audit": {"plugin": "notify", **options(postgres)}})
    assert isinstance(audit, NotifySource)
    assert audit.name == "audit"
    assert load_sources({}) == []
    assert Node(NodeConfig()).sources == []  # `pyrt serve` without config: no sources
    with pytest.raises(LookupError, match=r"sources\.pigeon: no source plugin named 'pigeon'"):
        load_sources({"pigeon": {}})
    with pytest.raises(ValueError, match=r"sources\.notify: .*unexpected keyword argument 'hots'"):
        load_sources({"notify": {**options(postgres), "hots": "x"}})


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        ({"channels": {}}, TypeError, "channels must be a non-empty table"),
        ({"channels": {"a": "bad channel"}}, ValueError, "channels.a: 'bad channel' is not a pyrt"),
        ({"channels": {"x" * 64: "c"}}, ValueError, "longer than 63 bytes"),
        ({"channels": {"a": {"chan": "c"}}}, TypeError, "channels.a: expected"),
        ({"port": 0}, ValueError, "port must be at least 1"),
        ({"port": "5432"}, TypeError, "port must be an integer"),
        ({"reconnect_min": -1}, ValueError, "reconnect_min must be a positive number"),
        ({"password_env": "X"}, ValueError, "password or password_env, not both"),
        ({"catch_up": "no.such.module:hook"}, ValueError, "catch_up: cannot import"),
        ({"catch_up": "os:sep"}, TypeError, "catch_up: 'os:sep' is not callable"),
        ({"json": "yes"}, TypeError, "json must be true or false"),
    ],
)
def test_option_errors(
    postgres: PostgresServer, changes: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        NotifySource(**options(postgres, **changes))
    with pytest.raises(ValueError, match=f"sources.notify: .*{message[:20]}"):
        load_sources({"notify": options(postgres, **changes)})


async def recording_hook(ctx: CatchUp) -> None:
    """Named by dotted path in the config test below."""
    await ctx.publish("orders", "from the dotted-path hook")


def test_config_file_sources(tmp_path: Path, postgres: PostgresServer) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text(
        f"""
[sources.notify]
port = {postgres.port}
user = "pyrt_scram"
password_env = "PYRT_TEST_PASSWORD"
channels = {{ orders = "db:orders", "Audit" = {{ channel = "audit:all", event = "audit" }} }}
catch_up = "test_notify:recording_hook"
"""
    )
    config = node_config(path)
    assert config.sources["notify"]["channels"]["Audit"] == {
        "channel": "audit:all",
        "event": "audit",
    }
    [source] = load_sources(config.sources)
    assert isinstance(source, NotifySource)
    assert source.catch_up is recording_hook
    assert source.routes["Audit"].event == "audit"
    path.write_text("sources = 3\n")
    with pytest.raises(ConfigError, match=r"sources: expected a table"):
        node_config(path)
    path.write_text("[sources]\nnotify = 3\n")
    with pytest.raises(ConfigError, match=r"sources: expected a table"):
        node_config(path)


async def start_failure(source: NotifySource) -> SourceError:
    """How a node with `source` fails to start."""
    with pytest.raises(ExceptionGroup) as caught:  # noqa: PT012 (the nursery raises)
        async with trio.open_nursery() as nursery:
            with trio.fail_after(20):
                await nursery.start(
                    Node(NodeConfig(auth=open_auth(), port=0), transports=[], sources=[source]).run
                )
    failed, rest = caught.value.split(SourceError)
    assert rest is None, rest
    assert failed is not None
    error = failed.exceptions[0]
    while isinstance(error, ExceptionGroup):
        error = error.exceptions[0]
    assert isinstance(error, SourceError)
    return error


async def test_startup_errors_are_clear(postgres: PostgresServer) -> None:
    error = await start_failure(NotifySource(**options(postgres, password="wrong")))
    text = str(error)
    assert text.startswith("sources.notify: password authentication failed")
    assert "28P01" in text
    assert f"127.0.0.1:{postgres.port}" in text
    assert "'pyrt_scram'" in text

    error = await start_failure(NotifySource(**options(postgres, database="nope")))
    assert "3D000" in str(error)

    error = await start_failure(
        NotifySource(**options(postgres, password=None, password_env="PYRT_UNSET_VAR"))
    )
    assert "PYRT_UNSET_VAR is not set" in str(error)

    with trio.socket.socket() as s:
        await s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    source = NotifySource(**options(postgres, port=closed_port, startup_timeout=0.5))
    error = await start_failure(source)
    assert "within startup_timeout (0.5 s)" in str(error)
    assert f"127.0.0.1:{closed_port}" in str(error)
    assert "refused" in str(error).lower()


def test_pyrt_serve_reports_a_source_that_cannot_start(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text(
        f"""
[server]
port = 0
[sources.notify]
port = {postgres.port}
user = "pyrt_scram"
password = "wrong"
channels = {{ orders = "db:orders" }}
"""
    )
    command = [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "pyrt serve: sources.notify: password authentication failed" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(autouse=True)
def _password_env() -> Any:
    os.environ["PYRT_TEST_PASSWORD"] = PASSWORD
    yield
    os.environ.pop("PYRT_TEST_PASSWORD", None)
