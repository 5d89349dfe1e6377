"""Fan-out on one channel to many subscribers over WebSocket, SSE and long-poll.

    python benches/fanout.py                         # fanout_1ch_1000subs_100B, WebSocket only
    python benches/fanout.py --subscribers 1000 --sse 200 --longpoll 100
    python benches/fanout.py --subscribers 200 --messages 100

Starts `pyrt serve` in a subprocess (so the server has its own interpreter), opens the
subscriber connections to one channel (`--subscribers` WebSocket ones, `--sse` SSE streams,
`--longpoll` long-poll sessions, all on the same channel and getting the same messages), then
measures, per transport:

- throughput: one publisher (WebSocket) sends M messages as fast as the server acks them
  (a window of 64 in flight); deliveries/s = subscribers * M / time until every subscriber of
  that transport has all M;
- latency: the publisher paces messages (--rate per second); each carries its send time
  (CLOCK_MONOTONIC, shared by the processes), each sampled subscriber records arrival - send.

The load generator is Python too (raw sockets, a minimal frame reader, h11 for the HTTP
transports, one trio task per subscriber) and shares the machine's 2 cores with the server: it
is a first measurement, not a verdict; the Rust load generator of the fan-out suite replaces it.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

import h11
import orjson
import trio

sys.path.insert(0, os.path.dirname(__file__))
from matcher import machine  # benches/ is a folder of programs, not a package


def client_frame(payload: bytes) -> bytes:
    """A masked text frame (clients must mask; a zero mask keeps the payload as is)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 1 << 16:
        header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return header + b"\0\0\0\0" + payload


class Reader:
    """Reads unmasked server frames from a stream."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes = b"") -> None:
        self.stream = stream
        self.buffer = bytearray(buffered)

    async def frame(self) -> bytes:
        while True:
            b = self.buffer
            if len(b) >= 2:
                n = b[1] & 0x7F
                start = 2
                if n == 126 and len(b) >= 4:
                    n, start = struct.unpack_from("!H", b, 2)[0], 4
                elif n == 127 and len(b) >= 10:
                    n, start = struct.unpack_from("!Q", b, 2)[0], 10
                if (n < 126 or start > 2) and len(b) >= start + n:
                    payload = bytes(b[start : start + n])
                    del b[: start + n]
                    return payload
            data = await self.stream.receive_some(1 << 16)
            if not data:
                raise EOFError
            b += data


async def open_ws(port: int) -> tuple[trio.SocketStream, Reader]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    await stream.send_all(
        (
            "GET /connection/websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(4096)
    head, _, rest = head.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"upgrade refused: {head[:100]!r}")
    return stream, Reader(stream, rest)


async def command(stream: trio.SocketStream, reader: Reader, **cmd: Any) -> dict[str, Any]:
    await stream.send_all(client_frame(orjson.dumps(cmd)))
    while True:
        frame = orjson.loads(await reader.frame())
        if frame.get("reply") == cmd.get("id"):
            result: dict[str, Any] = frame
            return result


Deliver = Any  # (frame bytes, arrival ns) -> None; Any keeps the callback signature simple


async def ws_subscriber(port: int, channel: str, deliver: Deliver, task_status: Any) -> None:
    stream, reader = await open_ws(port)
    async with stream:
        await command(stream, reader, cmd="join", id=1, channel=channel)
        task_status.started()
        while True:
            frame = await reader.frame()
            deliver(frame, time.monotonic_ns())


class HttpClient:
    """One keep-alive HTTP/1.1 connection, read with h11 (requests are GETs)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    async def next_event(self) -> Any:
        while True:
            event = self.http.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.http.receive_data(await self.stream.receive_some(1 << 16))

    async def start(self, target: str) -> None:
        if self.http.our_state is h11.DONE:
            self.http.start_next_cycle()
        request = h11.Request(method="GET", target=target, headers=[("host", "127.0.0.1")])
        await self.stream.send_all(self.http.send(request) + self.http.send(h11.EndOfMessage()))
        response = await self.next_event()
        if response.status_code != 200:
            raise RuntimeError(f"GET {target}: {response.status_code}")

    async def get_json(self, target: str) -> Any:
        await self.start(target)
        body = b""
        while not isinstance(event := await self.next_event(), h11.EndOfMessage):
            body += event.data
        return orjson.loads(body)


async def sse_subscriber(port: int, channel: str, deliver: Deliver, task_status: Any) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = HttpClient(stream)
        await client.start(f"/connection/sse?channel={channel}")
        buffer = b""
        started = False
        while True:
            event = await client.next_event()
            if not isinstance(event, h11.Data):
                raise RuntimeError(f"SSE stream ended: {event!r}")
            buffer += event.data
            now = time.monotonic_ns()
            *events, buffer = buffer.split(b"\n\n")
            for block in events:
                for line in block.split(b"\n"):
                    if line.startswith(b"data: "):
                        frame = line[6:]
                        if not started and frame.startswith(b'{"reply":"join:'):
                            started = True
                            task_status.started()
                        deliver(frame, now)


async def longpoll_subscriber(port: int, channel: str, deliver: Deliver, task_status: Any) -> None:
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        client = HttpClient(stream)
        opened = await client.get_json(f"/connection/poll?channel={channel}")
        session, token, cursor = opened["session"], opened["token"], opened["cursor"]
        task_status.started()
        while True:
            batch = await client.get_json(
                f"/connection/poll?session={session}&token={token}&cursor={cursor}"
            )
            now = time.monotonic_ns()
            cursor = batch["cursor"]
            for message in batch["messages"]:
                deliver(orjson.dumps(message), now)


SUBSCRIBERS = {"websocket": ws_subscriber, "sse": sse_subscriber, "longpoll": longpoll_subscriber}


async def run(
    port: int, counts: dict[str, int], messages: int, rate: float, size: int
) -> dict[str, dict[str, Any]]:
    channel = "bench"
    latencies: dict[str, list[float]] = {t: [] for t in counts}
    finished: dict[str, float] = {}
    phase = {"name": "throughput", "expect": messages}
    all_done = trio.Event()
    remaining = dict(counts)
    pending = [sum(counts.values())]

    def subscriber_state(transport: str, i: int) -> Deliver:
        received = [0]
        sample = i % 10 == 0

        def deliver(frame: bytes, now: int) -> None:
            if not frame.startswith(b'{"push":"pub"'):
                return
            received[0] += 1
            if phase["name"] == "latency" and sample:
                at = frame.index(b'"t":') + 4
                latencies[transport].append((now - int(frame[at : frame.index(b",", at)])) / 1e6)
            if received[0] == phase["expect"]:
                remaining[transport] -= 1
                if remaining[transport] == 0:
                    finished[transport] = time.perf_counter()
                pending[0] -= 1
                if pending[0] == 0:
                    all_done.set()

        return deliver

    connect_rates: dict[str, float] = {}
    async with trio.open_nursery() as nursery:
        for transport, count in counts.items():
            start = time.perf_counter()
            for i in range(count):
                deliver = subscriber_state(transport, i)
                await nursery.start(SUBSCRIBERS[transport], port, channel, deliver)
            connect_rates[transport] = count / (time.perf_counter() - start)
        pub, pub_reader = await open_ws(port)
        await command(pub, pub_reader, cmd="join", id=1, channel=channel)
        pad = "x" * max(0, size - 40)

        async def publish(n: int) -> None:
            body = {"t": time.monotonic_ns(), "pad": pad}
            frame = orjson.dumps(
                {"cmd": "publish", "id": n, "channel": channel, "data": body, "ack": True}
            )
            await pub.send_all(client_frame(frame))

        async def acks(count: int, window: trio.Semaphore) -> None:
            for _ in range(count):
                await pub_reader.frame()
                window.release()

        # Throughput: a window of 64 publishes in flight.
        window = trio.Semaphore(64)
        start = time.perf_counter()
        async with trio.open_nursery() as acking:
            acking.start_soon(acks, messages, window)
            for n in range(messages):
                await window.acquire()
                await publish(n)
        with trio.fail_after(300):
            await all_done.wait()
        elapsed = {t: finished[t] - start for t in counts}

        # Latency: paced publishes.
        latency_messages = max(20, int(rate * 2))
        all_done = trio.Event()
        remaining.update(counts)
        pending[0] = sum(counts.values())
        phase.update(name="latency", expect=messages + latency_messages)
        async with trio.open_nursery() as acking:
            window = trio.Semaphore(64)
            acking.start_soon(acks, latency_messages, window)
            for n in range(latency_messages):
                await window.acquire()
                await publish(messages + n)
                await trio.sleep(1 / rate)
        with trio.fail_after(300):
            await all_done.wait()
        nursery.cancel_scope.cancel()
    await pub.aclose()
    results = {}
    for transport, count in counts.items():
        samples = sorted(latencies[transport])
        results[transport] = {
            "subscribers": count,
            "deliveries_per_s": count * messages / elapsed[transport],
            "messages_per_s": messages / elapsed[transport],
            "connect_per_s": connect_rates[transport],
            "p50_ms": statistics.median(samples),
            "p99_ms": samples[max(0, int(len(samples) * 0.99) - 1)],
            "latency_samples": len(samples),
        }
    return results


OPEN_AUTH = (
    '[auth]\nanonymous = true\njwt_secret = "pyrt-bench-secret-at-least-32-bytes!!"\n'
    '[[auth.rules]]\nchannel = ">"\nsubscribe = "anyone"\npublish = "anyone"\n'
)
"""The `[auth]` of a benchmark server: anonymous clients, every channel open (no token is
verified, as with the peers, whose benchmark configs have no auth)."""


def start_server(config: str) -> tuple[subprocess.Popen[str], int]:
    """`pyrt serve --port 0 --config <config>` in a subprocess, and the port it listens on
    (read from the line it prints first)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "pyrt._cli", "serve", "--port", "0", "--config", config],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r":(\d+)/", line)
    if match is None:
        server.terminate()
        server.wait(timeout=30)
        raise RuntimeError(f"pyrt serve said: {line!r}")
    return server, int(match.group(1))


def server_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000, help="WebSocket subscribers")
    parser.add_argument("--sse", type=int, default=0, help="SSE subscribers")
    parser.add_argument("--longpoll", type=int, default=0, help="long-poll subscribers")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s in the latency phase")
    parser.add_argument("--size", type=int, default=100, help="message data size in bytes")
    args = parser.parse_args(argv)
    counts = {
        t: n
        for t, n in (
            ("websocket", args.subscribers),
            ("sse", args.sse),
            ("longpoll", args.longpoll),
        )
        if n > 0
    }
    config = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyrt-bench-{os.getpid()}.toml")
    with open(config, "w") as f:
        # Outboxes sized for a burst of the whole run, so the measurement is of fan-out, not
        # of the slow-consumer policy.
        f.write(
            f"[hub]\nhistory_size = {args.messages * 2 + 100}\noutbox_messages = 100000\n"
            "outbox_total_bytes = 1099511627776\n"
        )
        # Every client comes from 127.0.0.1 and publishers send as fast as they can: the
        # abuse limits are off.
        f.write("command_rate = 0\nchannel_publish_rate = 0\n")
        f.write("[server]\nmax_connections_per_ip = 0\n")
        # No tokens: clients connect anonymously to channels open to anyone, as the peers'
        # clients do (their benchmark configs have no auth either). Labelled in benchmarks.md.
        f.write(OPEN_AUTH)
    server, port = start_server(config)
    try:
        idle_rss = server_rss_kib(server.pid)
        results = trio.run(run, port, counts, args.messages, args.rate, args.size)
        loaded_rss = server_rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config)
    total = sum(counts.values())
    name = f"fanout_1ch_{total}subs_{args.size}B"
    print(f"## {name} ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print("| transport | subscribers | deliveries/s | publishes/s | p50 | p99 | connects/s |")
    print("|---|---|---|---|---|---|---|")
    for transport, result in results.items():
        print(
            f"| {transport} | {result['subscribers']:,} | {result['deliveries_per_s']:,.0f} | "
            f"{result['messages_per_s']:,.0f} | {result['p50_ms']:.1f} ms | "
            f"{result['p99_ms']:.1f} ms (at {args.rate:g} msg/s, "
            f"{result['latency_samples']} samples) | {result['connect_per_s']:,.0f} |"
        )
    print(f"\nServer RSS: {idle_rss / 1024:.0f} -> {loaded_rss / 1024:.0f} MiB")
    print(f"Machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
