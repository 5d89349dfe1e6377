"""End to end: `pyrt serve` with a `[sources.redis]` table (the plugin found through its
entry point, as an installed third-party plugin is), a WebSocket client, and `redis-cli`
publishing and adding stream entries."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
import trio
from redisserver import RedisServer
from trio_websocket import WebSocketConnection, open_websocket_url


async def frame(ws: WebSocketConnection, timeout: float = 10) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            data: dict[str, Any] = orjson.loads(await ws.get_message())
            if data.get("push") != "ping":
                return data


@asynccontextmanager
async def serve(config: Path) -> AsyncIterator[tuple[trio.Process, str]]:
    """`pyrt serve --config config` in a subprocess, and its WebSocket URL (with the
    development token it printed) once it serves."""
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(30):
            # No [auth] table: the development token it prints lets the client in.
            while not re.search(rb"Client token \(user 'dev'\): (\S+)\n", output):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, output.decode(errors="replace")
                output += chunk
        match = re.search(rb"ws://127\.0\.0\.1:(\d+)/connection/websocket", output)
        token = re.search(rb"Client token \(user 'dev'\): (\S+)\n", output)
        assert match is not None, output
        assert token is not None, output
        yield proc, f"{match.group(0).decode()}?token={token.group(1).decode()}"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()


async def test_redis_cli_reaches_a_websocket_client_through_pyrt_serve(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    config = tmp_path / "pyrt.toml"
    config.write_text(
        f"""\
[server]
port = 0
transports = ["websocket"]

[sources.redis]
host = "127.0.0.1"
port = {redis_server.port}
channels = {{ "serve-orders" = "redis:orders" }}
patterns = {{ "serve-audit.*" = "redis:audit" }}
streams = {{ "serve-events" = "redis:events" }}
"""
    )
    async with serve(config) as (proc, url), open_websocket_url(url) as ws:
        for n, channel in enumerate(("redis:orders", "redis:audit", "redis:events")):
            await ws.send_message(orjson.dumps({"id": n, "cmd": "join", "channel": channel}))
            assert "ok" in await frame(ws)
        # Clients may not publish as the source (its channels are read-only to them).
        await ws.send_message(
            orjson.dumps({"id": 9, "cmd": "publish", "channel": "redis:orders", "data": 1})
        )
        refused = await frame(ws)
        assert refused["error"]["code"] == 423, refused

        await trio.to_thread.run_sync(redis_server.cli, "PUBLISH", "serve-orders", '{"id": 42}')
        await trio.to_thread.run_sync(
            redis_server.cli, "PUBLISH", "serve-audit.login", "user 7 logged in"
        )
        entry = await trio.to_thread.run_sync(
            redis_server.cli, "XADD", "serve-events", "*", "kind", "paid", "order", "42"
        )
        got = [await frame(ws) for _ in range(3)]
        assert [(p["push"], p["channel"], p["data"]) for p in got] == [
            ("pub", "redis:orders", {"event": "serve-orders", "payload": {"id": 42}}),
            (
                "pub",
                "redis:audit",
                {"event": "serve-audit.login", "payload": "user 7 logged in"},
            ),
            (
                "pub",
                "redis:events",
                {
                    "stream": "serve-events",
                    "id": entry.strip(),
                    "fields": {"kind": "paid", "order": 42},
                },
            ),
        ]
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(10):
            notice = await frame(ws)
        assert notice["push"] == "disconnect", notice
        # trio-websocket leaves its stream open when the server closes (see tests/node/test_node).
        await ws._stream.aclose()
        with trio.fail_after(15):
            assert await proc.wait() == 0


def test_pyrt_serve_reports_a_redis_source_that_cannot_start(
    new_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    server = new_redis_server(password="right")
    config = tmp_path / "pyrt.toml"
    config.write_text(
        f"""\
[server]
port = 0

[sources.redis]
port = {server.port}
password = "wrong"
channels = {{ c = "redis:c" }}
"""
    )
    done = subprocess.run(
        [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done
    assert "pyrt serve: sources.redis: " in done.stderr
    assert "WRONGPASS" in done.stderr or "invalid username-password" in done.stderr
    assert f"Redis at 127.0.0.1:{server.port}" in done.stderr


async def test_a_killed_pyrt_serve_resumes_its_streams_from_durable_history(
    new_redis_server: Callable[..., RedisServer], tmp_path: Path
) -> None:
    """SIGKILL, entries added while no node runs, a new `pyrt serve` on the same history: the
    stream goes on after the last entry in history, each entry once, in one epoch."""
    server = new_redis_server()
    config = tmp_path / "pyrt.toml"
    config.write_text(
        f"""\
[server]
port = 0
transports = ["websocket"]

[history]
dir = "{tmp_path / "history"}"

[sources.redis]
port = {server.port}
streams = {{ orders = "redis:orders" }}
"""
    )

    def xadd(n: int) -> None:
        server.cli("XADD", "orders", "*", "n", str(n))

    async with serve(config) as (proc, url):
        async with open_websocket_url(url) as ws:
            await ws.send_message(orjson.dumps({"id": 1, "cmd": "join", "channel": "redis:orders"}))
            assert "ok" in await frame(ws)
            for n in range(10):
                await trio.to_thread.run_sync(xadd, n)
            first = [await frame(ws) for _ in range(10)]
        proc.kill()
        await proc.wait()
    for n in range(10, 20):
        await trio.to_thread.run_sync(xadd, n)
    epoch = first[0]["epoch"]
    async with serve(config) as (proc, url), open_websocket_url(url) as ws:
        since = {"offset": 10, "epoch": epoch}
        join = {"id": 1, "cmd": "join", "channel": "redis:orders", "since": since}
        await ws.send_message(orjson.dumps(join))
        reply = await frame(ws)
        assert reply["ok"]["recovered"] is True, reply
        rest = [await frame(ws) for _ in range(10)]
        await trio.to_thread.run_sync(xadd, 20)
        rest.append(await frame(ws))
    got = first + rest
    assert [p["data"]["fields"]["n"] for p in got] == list(range(21))
    assert [(p["offset"], p["epoch"]) for p in got] == [(n, epoch) for n in range(1, 22)]
