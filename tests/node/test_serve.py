"""`pyrt serve`: configuration, and the real command in a subprocess."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
from trio_websocket import open_websocket_url
from wskit import closed

from pyrt.hub.outbox import SlowConsumerPolicy
from pyrt.node.config import ConfigError, node_config


def test_defaults_need_no_file() -> None:
    config = node_config()
    assert (config.host, config.port, config.transports) == ("127.0.0.1", 8000, None)
    assert config.hub.history_size == 256


def test_file_and_flags(tmp_path: Path) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text(
        """
[server]
port = 9000
transports = ["websocket"]

[hub]
history_size = 10
history_age = 60
slow_consumer_policy = "drop_oldest"

[hub.channel_policies]
"ticker:>" = "conflate"
"""
    )
    config = node_config(path, {"port": 9100, "host": None})
    assert config.port == 9100  # the flag wins
    assert config.transports == ("websocket",)
    assert config.hub.history_size == 10
    assert config.hub.history_age == 60.0
    assert config.hub.slow_consumer_policy is SlowConsumerPolicy.DROP_OLDEST
    assert config.hub.channel_policies == {"ticker:>": SlowConsumerPolicy.CONFLATE}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[hub]\nhistory_sise = 1", "hub.history_sise: unknown setting"),
        ("[hub]\nhistory_size = 'big'", "hub.history_size: expected int, got 'big'"),
        ("[hub]\nhistory_size = true", "hub.history_size: expected int, got True"),
        ("[hub]\nslow_consumer_policy = 'panic'", "is not one of disconnect, drop_oldest"),
        ("[hub.channel_policies]\n'a::b' = 'conflate'", "hub: empty segment"),
        ("[hub]\nping_interval = 100", "hub: need 0 < ping_interval < idle_timeout"),
        ("[hub]\nwrite_threads = 0", "hub: write_threads must be 1..64"),
        ("[server]\nport = 70000", "server.port: expected an integer 0..65535"),
        ("[server]\nprot = 1", "server.prot: unknown setting"),
        ("[server]\ntransports = 'websocket'", "server.transports: expected a list"),
        ("[sever]\nport = 1", "unknown section(s) sever"),
        ("port = ", "not valid TOML"),
    ],
)
def test_bad_configuration_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        node_config(path)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="No such file"):
        node_config("/nonexistent/pyrt.toml")


def test_serve_rejects_a_bad_config_with_exit_code_2(tmp_path: Path) -> None:
    path = tmp_path / "pyrt.toml"
    path.write_text("[hub]\nnope = 1")
    result = subprocess.run(
        [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "hub.nope: unknown setting" in result.stderr


async def test_pyrt_serve_in_a_subprocess() -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "pyrt._cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        output = b""
        with trio.fail_after(30):
            while not re.search(rb"Client token \(user 'dev'\): (\S+)\n", output):
                chunk = await proc.stdout.receive_some(4096)
                assert chunk, output
                output += chunk
        match = re.search(rb"ws://127\.0\.0\.1:(\d+)/connection/websocket", output)
        assert match is not None, output
        url = match.group(0).decode()
        # Secure by default: no [auth] table, so a made-up secret, and no way in without
        # the token it printed.
        async with open_websocket_url(url) as stranger:
            await stranger.send_message('{"cmd":"join","id":1,"channel":"lobby"}')
            assert (await closed(stranger)).code == 4401
        token = re.search(rb"Client token \(user 'dev'\): (\S+)\n", output)
        assert token is not None
        url += f"?token={token.group(1).decode()}"
        async with open_websocket_url(url) as a, open_websocket_url(url) as b:
            for ws in (a, b):
                await ws.send_message('{"cmd":"join","id":1,"channel":"lobby"}')
                assert orjson.loads(await ws.get_message())["ok"]["channel"] == "lobby"
            await a.send_message('{"cmd":"publish","channel":"lobby","data":"hello"}')
            with trio.fail_after(5):
                pub = orjson.loads(await b.get_message())
            assert (pub["push"], pub["data"]) == ("pub", "hello")
            proc.send_signal(signal.SIGINT)
            with trio.fail_after(5):
                notice = orjson.loads(await b.get_message())
            assert notice["push"] == "disconnect"
            assert notice["code"] == 1001
            # trio-websocket leaves its stream open when the server closes (see test_node).
            for ws in (a, b):
                await ws._stream.aclose()
        with trio.fail_after(15):
            assert await proc.wait() == 0
        assert proc.stdout is not None
        rest = b""
        while chunk := await proc.stdout.receive_some(4096):
            rest += chunk
        assert b"SIGINT: draining and stopping" in output + rest
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                await pipe.aclose()
