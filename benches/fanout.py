"""Fan-out over WebSocket: one channel, many subscribers, small messages.

    python benches/fanout.py                         # fanout_1ch_1000subs_100B
    python benches/fanout.py --subscribers 200 --messages 100

Starts `pyrt serve` in a subprocess (so the server has its own interpreter), opens N
subscriber connections to one channel, then measures:

- throughput: one publisher sends M 100-byte messages as fast as the server acks them
  (a window of 64 in flight); deliveries/s = N * M / time until every subscriber has all M;
- latency: the publisher paces messages (--rate per second); each carries its send time
  (CLOCK_MONOTONIC, shared by the processes), each subscriber records arrival - send.

The load generator is Python too (raw sockets, a minimal frame reader, one trio task per
subscriber) and shares the machine's 2 cores with the server: it is a first measurement, not a
verdict; the Rust load generator of the fan-out suite replaces it.
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


async def run(port: int, subscribers: int, messages: int, rate: float, size: int) -> dict[str, Any]:
    channel = "bench"
    received = [0] * subscribers
    latencies: list[float] = []
    phase = {"name": "throughput", "expect": messages}
    all_done = trio.Event()
    remaining = [subscribers]
    streams: list[trio.SocketStream] = []

    async def subscriber(i: int, task_status: Any) -> None:
        stream, reader = await open_ws(port)
        streams.append(stream)
        await command(stream, reader, cmd="join", id=1, channel=channel)
        task_status.started()
        while True:
            frame = await reader.frame()
            now = time.monotonic_ns()
            if b'"push":"pub"' not in frame[:20]:
                continue
            received[i] += 1
            if phase["name"] == "latency" and i % 10 == 0:
                sent = int(
                    frame[frame.index(b'"t":') + 4 : frame.index(b",", frame.index(b'"t":'))]
                )
                latencies.append((now - sent) / 1e6)
            if received[i] == phase["expect"]:
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

    async with trio.open_nursery() as nursery:
        start = time.perf_counter()
        for i in range(subscribers):
            await nursery.start(subscriber, i)
        connect_rate = subscribers / (time.perf_counter() - start)
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
        with trio.fail_after(120):
            await all_done.wait()
        elapsed = time.perf_counter() - start
        throughput = subscribers * messages / elapsed

        # Latency: paced publishes.
        latency_messages = max(20, int(rate * 2))
        all_done = trio.Event()
        remaining[0] = subscribers
        phase.update(name="latency", expect=messages + latency_messages)
        async with trio.open_nursery() as acking:
            window = trio.Semaphore(64)
            acking.start_soon(acks, latency_messages, window)
            for n in range(latency_messages):
                await window.acquire()
                await publish(messages + n)
                await trio.sleep(1 / rate)
        with trio.fail_after(120):
            await all_done.wait()
        nursery.cancel_scope.cancel()
    for s in [*streams, pub]:
        await s.aclose()
    latencies.sort()
    return {
        "deliveries_per_s": throughput,
        "messages_per_s": messages / elapsed,
        "connect_per_s": connect_rate,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "latency_samples": len(latencies),
    }


def server_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="messages/s in the latency phase")
    parser.add_argument("--size", type=int, default=100, help="message data size in bytes")
    args = parser.parse_args(argv)
    config = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyrt-bench-{os.getpid()}.toml")
    with open(config, "w") as f:
        # Outboxes sized for a burst of the whole run, so the measurement is of fan-out, not
        # of the slow-consumer policy.
        f.write(f"[hub]\nhistory_size = {args.messages * 2 + 100}\noutbox_messages = 100000\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "pyrt._cli", "serve", "--port", "0", "--config", config],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        match = re.search(r":(\d+)/", line)
        if match is None:
            raise RuntimeError(f"pyrt serve said: {line!r}")
        port = int(match.group(1))
        idle_rss = server_rss_kib(server.pid)
        result = trio.run(run, port, args.subscribers, args.messages, args.rate, args.size)
        loaded_rss = server_rss_kib(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config)
    name = f"fanout_1ch_{args.subscribers}subs_{args.size}B"
    print(f"## {name} ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print("| workload | deliveries/s | publishes/s | p50 | p99 | connects/s | server RSS |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {name} | {result['deliveries_per_s']:,.0f} | {result['messages_per_s']:,.0f} | "
        f"{result['p50_ms']:.1f} ms | {result['p99_ms']:.1f} ms "
        f"(at {args.rate:g} msg/s, {result['latency_samples']} samples) | "
        f"{result['connect_per_s']:,.0f} | {idle_rss / 1024:.0f} -> {loaded_rss / 1024:.0f} MiB |"
    )
    print(f"\nMachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
