"""The client's WebSocket link on the wire: the request it sends, pings (answered, and a sign of
life), a close from the server, a message larger than 1 MiB, and TLS. Against a real Node,
or a small wsproto server where the test needs a server that behaves in one odd way."""

from __future__ import annotations

import functools
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trustme
from clientkit import take
from nodekit import until
from trio.testing import MockClock
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Ping, Pong, Request

from pyrt.client import connect
from pyrt.hub.hub import HubConfig
from pyrt.node.node import Node, NodeConfig
from pyrt.testing import open_auth

FAST = {"min_backoff": 0.01, "max_backoff": 0.2, "probe_interval": None}


async def start(nursery: trio.Nursery, **hub: Any) -> tuple[Node, int]:
    node: Node = await nursery.start(
        Node(NodeConfig(auth=open_auth(), port=0, hub=HubConfig(**hub))).run
    )
    assert node.port is not None
    return node, node.port


@attrs.define(eq=False)
class PingingServer:
    """Accepts WebSocket upgrades and, while `pinging`, sends a ping every `every` seconds; it
    never answers the client's commands, so pings are its only sign of life."""

    every: float
    pinging: bool = True
    port: int = 0
    requests: list[Request] = attrs.field(factory=list)
    pongs: list[bytes] = attrs.field(factory=list)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self.serve, listeners)

    async def serve(self, stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(self.ping, stream, ws)
            try:
                while data := await stream.receive_some(65536):
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Request):
                            self.requests.append(event)
                            await stream.send_all(ws.send(AcceptConnection()))
                        elif isinstance(event, Pong):
                            self.pongs.append(bytes(event.payload))
            except trio.BrokenResourceError:
                pass
            nursery.cancel_scope.cancel()

    async def ping(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        n = 0
        while True:
            await trio.sleep(self.every)  # the server's pace: its pings are the behaviour here
            if self.pinging and self.requests:
                n += 1
                await stream.send_all(ws.send(Ping(f"p{n}".encode())))


async def test_pings_are_answered_and_keep_a_quiet_link_up(
    nursery: trio.Nursery, autojump_io_clock: MockClock
) -> None:
    """In virtual time (only the timers matter here): exact, and no real seconds spent."""
    server: PingingServer = await nursery.start(PingingServer(every=0.1).run)
    url = f"http://127.0.0.1:{server.port}/prefix"
    options = {**FAST, "ping_interval": 0.2, "stall_timeout": 0.6}
    async with connect(url, transports=("websocket",), **options) as client:
        lost, back = trio.Event(), trio.Event()
        client.on_transport.append(
            lambda t: lost.set() if t is None else lost.is_set() and back.set()
        )
        [request] = server.requests
        assert (request.host, request.target) == (
            f"127.0.0.1:{server.port}",
            "/prefix/connection/websocket",
        )
        # Three stall timeouts without a frame, only pings: the link stays.
        await trio.sleep(1.8)  # virtual time: the span under test
        assert (client.connects, client.transport) == (1, "websocket")
        assert not lost.is_set()
        assert len(server.pongs) >= 17  # one a tenth of a second
        assert server.pongs == [f"p{n}".encode() for n in range(1, len(server.pongs) + 1)]
        # Silence: the client gives the link up as stalled and opens a new one.
        server.pinging = False
        silent_since = trio.current_time()
        await lost.wait()
        # Given up one stall timeout after the last ping it was sent (at most a ping period
        # before the silence began), neither sooner nor later.
        last_ping = trio.current_time() - options["stall_timeout"]
        assert silent_since - 0.1 - 1e-9 <= last_ping <= silent_since + 1e-9
        await back.wait()
        assert client.connects == 2
        assert len(server.requests) >= 2


async def test_a_close_from_the_server_reconnects_and_resumes(nursery: trio.Nursery) -> None:
    """The hub closes a connection that sent nothing for `idle_timeout` (4009): the client
    reconnects on the same transport and resumes where it was."""
    node, port = await start(nursery, idle_timeout=0.5, ping_interval=0.2)
    # The client's own pings would keep the connection from being idle.
    options = {**FAST, "ping_interval": 5.0, "stall_timeout": 10.0}
    async with connect(f"http://127.0.0.1:{port}", **options) as client:
        room = await client.join("c")
        node.publish("c", 1)
        assert [m.data for m in await take(room, 1)] == [1]
        await until(lambda: client.connects == 2, "the client to reconnect")
        node.publish("c", 2)
        got = await take(room, 1)
        assert [(m.offset, m.data) for m in got] == [(2, 2)]
        assert (client.transport, room.recovered, room.gaps) == ("websocket", True, 0)


async def test_a_message_over_one_mebibyte_arrives(nursery: trio.Nursery) -> None:
    """The client sets no message size limit of its own: the hub bounds what it sends."""
    node, port = await start(nursery, outbox_bytes=8 * 1024 * 1024)
    async with connect(f"http://127.0.0.1:{port}", transports=("websocket",)) as client:
        room = await client.join("big")
        big = "x" * (3 * 1024 * 1024)
        node.publish("big", big)
        node.publish("big", "after")
        got = await take(room, 2)
        assert [len(m.data) for m in got] == [len(big), 5]
        assert client.connects == 1


async def test_wss_with_the_default_tls_context(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """wss:// verifies the server with the default context (here trusting a test CA through
    SSL_CERT_FILE), in front of a node behind a TLS-terminating proxy."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    node, port = await start(nursery)

    async def pipe(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def terminate(tls: trio.SSLStream[trio.SocketStream]) -> None:
        plain = await trio.open_tcp_stream("127.0.0.1", port)
        async with tls, plain, trio.open_nursery() as pipes:
            pipes.start_soon(pipe, plain, tls)
            await pipe(tls, plain)
            pipes.cancel_scope.cancel()

    listeners = await nursery.start(
        functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"),
        terminate,
        0,
        server_context,
    )
    proxy = listeners[0].transport_listener.socket.getsockname()[1]
    url = f"wss://127.0.0.1:{proxy}/connection/websocket"
    async with connect(url, transports=("websocket",)) as client:
        room = await client.join("c")
        assert await room.publish("over tls", echo=True) == 1
        node.publish("c", "from the server")
        assert [m.data for m in await take(room, 2)] == ["over tls", "from the server"]
    # Without the CA the same server is refused: the default context verifies.
    monkeypatch.delenv("SSL_CERT_FILE")
    with pytest.raises(Exception, match="could not connect"):
        async with connect(url, transports=("websocket",), timeout=1.0):
            pass


def test_the_link_benchmark_prints_its_table() -> None:
    bench = Path(__file__).resolve().parents[2] / "benches" / "client_link.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--quick"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms |" in line]
    [row] = rows
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == 6
    assert int(cells[1].replace(",", "")) > 0  # messages/s was measured
    assert cells[2].endswith(" µs")
    assert all(c.endswith(" ms") for c in cells[3:])
    assert any(line.startswith("Machine: ") for line in out.splitlines())
