"""The Python client's WebSocket link: receive throughput and publish round trips.

    python benches/client_link.py                    # 20,000 messages of 100 B, 2,000 round trips
    python benches/client_link.py --quick            # a smoke run
    PYTHONPATH=/path/to/other/checkout python benches/client_link.py   # another client

Starts `pyrt serve` in a subprocess, connects one `pyrt.client` over WebSocket only, and
measures:

- receive throughput: the client joins a channel and takes messages with `async for`; a raw
  WebSocket publisher (no client library: a few bytes per message, in batches) publishes
  without acks, keeping at most `--window` messages ahead of what the client has taken, so
  the client, not the server's buffers, sets the pace. messages/s = messages / time from the
  first publish to the last message taken; CPU per message = the client process's CPU time
  over the same span / messages (the steadier figure on a shared machine).
- publish round trip: the client publishes `--acks` times, one at a time, each waiting for
  the server's ack (`Channel.publish`); p50, p99 and mean of each call's time.

The publisher runs in the client's process (it costs a small, fixed share of the time), and
the server shares the machine's cores: compare links in runs on the same machine, alternated.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import orjson
import trio

sys.path.insert(0, os.path.dirname(__file__))
from fanout import OPEN_AUTH, client_frame, command, open_ws, start_server  # benches/: programs
from matcher import machine

from pyrt.client import connect


def link_library() -> str:
    """Which WebSocket library the imported client's link runs on."""
    return "trio-websocket" if "trio_websocket" in sys.modules else "wsproto (hand-rolled)"


async def receive_throughput(
    port: int, messages: int, size: int, window: int
) -> tuple[float, float]:
    """Messages/s, and this process's CPU seconds per message."""
    url = f"http://127.0.0.1:{port}"
    channel = "bench:throughput"
    pad = "x" * max(0, size - 20)
    taken = 0
    progress = trio.Event()
    async with connect(url, transports=("websocket",)) as client:
        room = await client.join(channel)
        publisher, reader = await open_ws(port)
        async with publisher:
            await command(publisher, reader, cmd="join", id=1, channel=channel)
            started = time.perf_counter()
            cpu = time.process_time()
            async with trio.open_nursery() as nursery:

                async def publish() -> None:
                    sent = 0
                    while sent < messages:
                        while sent - taken >= window:
                            await progress.wait()
                        batch = min(messages - sent, window - (sent - taken), 256)
                        await publisher.send_all(
                            b"".join(
                                client_frame(
                                    orjson.dumps(
                                        {
                                            "cmd": "publish",
                                            "channel": channel,
                                            "data": {"n": sent + i, "pad": pad},
                                        }
                                    )
                                )
                                for i in range(batch)
                            )
                        )
                        sent += batch

                nursery.start_soon(publish)
                async for message in room:
                    if message.data["n"] != taken:
                        raise RuntimeError(f"message {taken} arrived as {message.data['n']}")
                    taken += 1
                    if taken % 64 == 0 or taken == messages:
                        progress.set()
                        progress = trio.Event()
                    if taken == messages:
                        break
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu
        if client.connects != 1:
            raise RuntimeError(f"the client reconnected ({client.connects} links): not measured")
    return messages / elapsed, cpu / messages


async def round_trips(port: int, count: int, size: int) -> list[float]:
    url = f"http://127.0.0.1:{port}"
    data = {"pad": "x" * max(0, size - 10)}
    times: list[float] = []
    async with connect(url, transports=("websocket",)) as client:
        room = await client.join("bench:rtt", iterate=False)
        for _ in range(min(100, count)):  # warm-up
            await room.publish(data)
        for _ in range(count):
            started = time.perf_counter()
            await room.publish(data)
            times.append(time.perf_counter() - started)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--acks", type=int, default=2_000, help="publish round trips")
    parser.add_argument("--size", type=int, default=100, help="message data size in bytes")
    parser.add_argument("--window", type=int, default=1_000, help="messages ahead, at most")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages, args.acks = 2_000, 200
    config = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyrt-bench-{os.getpid()}.toml")
    with open(config, "w") as f:
        # The abuse limits are off: one publisher sends as fast as the client takes.
        f.write(f"[hub]\nhistory_size = {args.window * 2}\n")
        f.write("command_rate = 0\nchannel_publish_rate = 0\n")
        f.write("[server]\nmax_connections_per_ip = 0\n")
        f.write(OPEN_AUTH)  # anonymous, every channel open (fanout.py)
    server, port = start_server(config)
    try:
        rate, cpu = trio.run(receive_throughput, port, args.messages, args.size, args.window)
        times = sorted(trio.run(round_trips, port, args.acks, args.size))
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config)

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    results: dict[str, Any] = {
        "link": link_library(),
        "client": sys.modules["pyrt.client"].__file__,
        "messages_per_s": rate,
        "cpu_per_message": cpu,
        "rtt_p50": statistics.median(times),
        "rtt_p99": times[max(0, int(len(times) * 0.99) - 1)],
        "rtt_mean": statistics.fmean(times),
    }
    print(f"## client_link_{args.size}B ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print("| link | received msgs/s | CPU per message | publish RTT p50 | p99 | mean |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {results['link']} | {results['messages_per_s']:,.0f} | "
        f"{results['cpu_per_message'] * 1e6:.1f} µs | {ms(results['rtt_p50'])} | "
        f"{ms(results['rtt_p99'])} | {ms(results['rtt_mean'])} |"
    )
    print(f"\nClient: {results['client']} ({args.messages:,} messages, {args.acks:,} round trips)")
    print(f"Machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
