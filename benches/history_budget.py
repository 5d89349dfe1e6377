"""History memory under a flood of big publications: the server's RSS with a history budget.

    python benches/history_budget.py                          # the default budget (64 MiB)
    python benches/history_budget.py --history-max-bytes 1099511627776   # no bound in effect

Replays a memory attack on history: starts `pyrt serve` in a subprocess with a config file,
opens one WebSocket connection, joins 30 channels and publishes 256 messages of 60 KB to each
(`history_size` is 256 per channel, so without a total bound history keeps all 7,680 of them,
about 440 MiB), every publish acknowledged. Prints the server's RSS (VmRSS, /proc/<pid>/status)
before and after, and what `/metrics` says history holds (`pyrt_history_bytes`,
`pyrt_history_publications`) and forgot (`pyrt_history_evictions_total`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.request
from typing import Any

import orjson
import trio

sys.path.insert(0, os.path.dirname(__file__))
from fanout import (  # benches/ is a folder of programs
    OPEN_AUTH,
    client_frame,
    open_ws,
    server_rss_kib,
    start_server,
)
from matcher import machine

from pyrt import HubConfig

WINDOW = 64
"""Publishes in flight (unacknowledged) at once."""


async def attack(port: int, channels: int, messages: int, size: int) -> float:
    """Publishes `messages` x `size` bytes to each of `channels` channels over one
    connection; returns the seconds it took."""
    stream, reader = await open_ws(port)
    async with stream:
        names = [f"flood:{n}" for n in range(channels)]
        for n, name in enumerate(names):
            await stream.send_all(
                client_frame(orjson.dumps({"cmd": "join", "id": n, "channel": name}))
            )
        for _ in names:
            reply = orjson.loads(await reader.frame())
            if "ok" not in reply:
                raise RuntimeError(f"join refused: {reply}")
        data = "x" * (size - 2)  # `size` bytes as JSON, with the quotes
        started = time.perf_counter()
        total = channels * messages
        sent = acked = 0
        while acked < total:
            while sent < total and sent - acked < WINDOW:
                command: dict[str, Any] = {
                    "cmd": "publish",
                    "id": sent,
                    "channel": names[sent % channels],
                    "data": data,
                    "ack": True,
                }
                await stream.send_all(client_frame(orjson.dumps(command)))
                sent += 1
            reply = orjson.loads(await reader.frame())
            if "reply" in reply:
                if "ok" not in reply:
                    raise RuntimeError(f"publish refused: {reply}")
                acked += 1
        return time.perf_counter() - started


def human(size: float) -> str:
    """`size` bytes in the largest binary unit that keeps it at 1 or more."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:,.0f} B" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{size:,.1f} TiB"


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--history-max-bytes",
        type=int,
        default=None,
        help="[hub] history_max_bytes (default: the hub's)",
    )
    parser.add_argument("--channels", type=int, default=30)
    parser.add_argument("--messages", type=int, default=256, help="publications per channel")
    parser.add_argument("--size", type=int, default=60_000, help="bytes of data per publication")
    args = parser.parse_args(argv)
    config = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"pyrt-bench-{os.getpid()}.toml")
    budget = (
        "" if args.history_max_bytes is None else f"history_max_bytes = {args.history_max_bytes}\n"
    )
    with open(config, "w") as f:
        # The rate limits would slow the flood down (that is their job, and what an attacker
        # meets by default): they are off, so that the history budget alone is measured.
        f.write(
            f'[server]\ntransports = ["websocket"]\n[hub]\nhistory_size = {args.messages}\n{budget}'
            "command_rate = 0\nchannel_publish_rate = 0\n"
        )
        f.write(OPEN_AUTH)  # anonymous, every channel open
    server, port = start_server(config)
    try:
        before_rss = server_rss_kib(server.pid)
        seconds = trio.run(attack, port, args.channels, args.messages, args.size)
        after_rss = server_rss_kib(server.pid)
        found = metrics(port)
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config)
    limit = args.history_max_bytes
    name = f"history_{args.channels}ch_{args.messages}msgs_{args.size // 1000}KB"
    print(f"## {name} ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print(
        "| history_max_bytes | published | history bytes | publications held | evicted |"
        " RSS before | RSS after | RSS growth |"
    )
    print("|---|---|---|---|---|---|---|---|")
    budget = f"{human(HubConfig().history_max_bytes)} (default)" if limit is None else human(limit)
    print(
        f"| {budget} "
        f"| {human(args.channels * args.messages * args.size)} in {seconds:.1f} s "
        f"| {human(found['pyrt_history_bytes'])} "
        f"| {found['pyrt_history_publications']:,.0f} "
        f"| {found['pyrt_history_evictions_total']:,.0f} "
        f"| {before_rss / 1024:,.0f} MiB | {after_rss / 1024:,.0f} MiB "
        f"| {(after_rss - before_rss) / 1024:,.0f} MiB |"
    )
    print(f"\nMachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
