"""Commit-to-client latency of row changes: PostgreSQL -> WAL source -> hub -> WebSocket.

    python benches/wal_latency.py                                # 1,000 and 5,000 rows/s
    python benches/wal_latency.py --rates 1000 --seconds 5 --filters shared
    python benches/wal_latency.py --client python                # subscribers in this process

Starts a PostgreSQL server (tests/pgserver.py: wal_level=logical, fsync off), then for each
filter kind and rate: `pyrt serve` in a subprocess with the WAL source, `--subscribers`
WebSocket connections each joined with one row subscription that matches a tenth of the rows,
and a writer subprocess that inserts `rate` rows per second into the published table, in one
transaction every 10 ms (rate/100 rows each; below 100 rows/s, one row per transaction),
every row carrying its `clock_timestamp()`. Each subscriber records, for every row event it
gets, arrival time minus that timestamp (one machine, one clock): commit, WAL decoding,
history, matching, fan-out, the socket and the client's frame reading, all included.

Subscribers (`--client`): `rust` (the default) runs them in the Rust load generator
(benches/loadgen, built as benches/suite.py builds it; `pyrt-loadgen --joins FILE`, one join
frame per subscriber in FILE, `--threads` runtime threads), which takes a fraction of the CPU
the Python subscribers do; `python` runs them in this process on trio, as before. Python
subscribers cost most of a core at 1,000 connections, which on a small machine competes with
the hub and PostgreSQL. The client CPU column is the subscribers' CPU time over the case's
wall time (for `rust`, the load generator's own; for `python`, this process's). Writes per
row: the hub's socket writes (`pyrt_direct_writes_total` on /metrics) over the rows written;
with 1,000 subscribers each taking a tenth, 100 means one write per delivery, and corking
(one write per connection per replication batch) brings it down.

Filters: `shared`: `bucket=eq.<i % 10>` (10 distinct subscriptions, each held by a tenth of the
connections); `distinct`: `bucket=eq.<i % 10>,x=neq.<i + 1>` (as many distinct subscriptions as
connections; `x` is always 0), so every event names ~N/10 subscription ids.

PostgreSQL, the hub, the writer and the subscribers share the machine's cores: the numbers say
where this machine saturates, not what a deployment would see.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from fanout import OPEN_AUTH, client_frame, command, open_ws, start_server  # noqa: E402 (benches/ is a folder of programs)
from matcher import machine  # noqa: E402
from suite import build_loadgen  # noqa: E402

TICK = 0.01
TABLE = """
CREATE TABLE bench (id bigserial PRIMARY KEY, bucket int NOT NULL, x int NOT NULL DEFAULT 0,
                    sent float8 NOT NULL, body text);
CREATE PUBLICATION pyrt FOR TABLE bench;
"""


# -- the writer (its own process) ------------------------------------------------------------


async def write(port: int, database: str, rate: int, seconds: float) -> None:
    from pyrt.postgres import PgConnection

    per_tick = max(1, round(rate * TICK))
    tick_seconds = per_tick / rate  # TICK, or longer for rates under 100 rows/s
    conn = await PgConnection.connect(
        "127.0.0.1", port, "pyrt_scram", "secret", database, application_name="bench-writer"
    )
    async with conn:
        start = trio.current_time()
        ticks = int(seconds / tick_seconds)
        for tick in range(ticks):
            await trio.sleep_until(start + tick * tick_seconds)
            first = tick * per_tick
            await conn.simple_query(
                "INSERT INTO bench (bucket, sent, body)"
                " SELECT g % 10, extract(epoch FROM clock_timestamp()), 'row ' || g"
                f" FROM generate_series({first}, {first + per_tick - 1}) g"
            )
        print(ticks * per_tick, flush=True)


# -- the subscribers -----------------------------------------------------------------------


def subscription(i: int, kind: str) -> dict[str, Any]:
    condition = f"bucket=eq.{i % 10}"
    if kind == "distinct":
        condition += f",x=neq.{i + 1}"
    return {"event": "INSERT", "table": "bench", "filter": condition}


async def measure(
    port: int, pg_port: int, database: str, subscribers: int, kind: str, rate: int, args: Any
) -> dict[str, Any]:
    latencies: list[float] = []
    measure_from = [float("inf")]
    delivered = [0]
    all_in = trio.Event()
    expected = [-1]

    def deliver(frame: bytes, now: float) -> None:
        if not frame.startswith(b'{"push":"pub"'):
            return
        at = frame.index(b'"sent":') + 7
        end = at
        while frame[end] not in b",}":
            end += 1
        sent = float(frame[at:end])
        delivered[0] += 1
        if sent >= measure_from[0]:
            latencies.append((now - sent) * 1000)
        if delivered[0] == expected[0]:
            all_in.set()

    async def subscriber(i: int, task_status: Any) -> None:
        stream, reader = await open_ws(port)
        async with stream:
            reply = await command(stream, reader, cmd="join", id=1, changes=[subscription(i, kind)])
            if "ok" not in reply:
                raise RuntimeError(f"join refused: {reply}")
            task_status.started()

            async def ping() -> None:  # the hub closes connections silent for 60 s
                while True:
                    await trio.sleep(20)
                    await stream.send_all(client_frame(b'{"cmd":"ping"}'))

            async with trio.open_nursery() as pinging:
                pinging.start_soon(ping)
                while True:
                    frame = await reader.frame()
                    deliver(frame, time.time())

    async with trio.open_nursery() as nursery:
        for i in range(subscribers):
            await nursery.start(subscriber, i)
        seconds = args.warmup + args.seconds
        writer = await trio.lowlevel.open_process(
            [sys.executable, __file__, "--writer", str(pg_port), database, str(rate), str(seconds)],
            stdout=subprocess.PIPE,
        )
        started = time.time()
        measure_from[0] = started + args.warmup
        assert writer.stdout is not None
        out = b""
        while chunk := await writer.stdout.receive_some():
            out += chunk
        await writer.wait()
        rows = int(out.strip())
        expected[0] = rows * subscribers // 10
        written = time.time()
        with trio.move_on_after(args.drain):
            if delivered[0] < expected[0]:
                await all_in.wait()
        drained = time.time() - written
        nursery.cancel_scope.cancel()
    samples = sorted(latencies)
    return {
        "rows": rows,
        "delivered": delivered[0],
        "expected": expected[0],
        "drain_s": drained,
        "p50": statistics.median(samples) if samples else float("nan"),
        "p99": samples[max(0, int(len(samples) * 0.99) - 1)] if samples else float("nan"),
        "max": samples[-1] if samples else float("nan"),
        "samples": len(samples),
    }


def measure_rust(
    loadgen: Path,
    port: int,
    pg_port: int,
    database: str,
    subscribers: int,
    kind: str,
    rate: int,
    args: Any,
) -> dict[str, Any]:
    """The subscribers in the Rust load generator (`--joins`); the writer as in `measure`."""
    seconds = args.warmup + args.seconds
    # Latency from every K-th subscriber, at most ~5M samples (as benches/suite.py does).
    every = max(1, int(rate * seconds) * subscribers // 10 // 5_000_000)
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as joins:
        for i in range(subscribers):
            join = {"cmd": "join", "id": 1, "changes": [subscription(i, kind)]}
            joins.write(json.dumps(join, separators=(",", ":")) + "\n")
    command = [str(loadgen), "--target", "pyrt", "--port", str(port)]
    command += ["--subscribers", str(subscribers), "--joins", joins.name]
    command += ["--threads", str(args.threads), "--latency-every", str(every)]
    wall = time.time()
    gen = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert gen.stdin is not None
        assert gen.stdout is not None
        line = gen.stdout.readline()
        connected = json.loads(line) if line.startswith("{") else {}
        if connected.get("connected") != subscribers:
            gen.stdin.close()  # with some joins refused it would wait for the request line
            rest = gen.stdout.read()
            raise RuntimeError(f"load generator: {line.strip()!r} {rest.strip()[:2000]}")
        writer = subprocess.Popen(
            [sys.executable, __file__, "--writer", str(pg_port), database, str(rate), str(seconds)],
            stdout=subprocess.PIPE,
        )
        started = time.time()
        out, _ = writer.communicate()
        if writer.returncode != 0:
            raise RuntimeError(f"the writer exited {writer.returncode}")
        rows = int(out.strip())
        expected = rows * subscribers // 10
        request = {"from": started + args.warmup, "expected": expected, "drain": args.drain}
        gen.stdin.write(json.dumps(request) + "\n")
        gen.stdin.flush()
        line = gen.stdout.readline()
        wall = time.time() - wall
        try:
            report = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"load generator said: {line[:500]!r}") from None
        gen.wait(timeout=30)
    finally:
        if gen.poll() is None:
            gen.kill()
            gen.wait()
        os.unlink(joins.name)
    latency = report.get("latency_ms") or {}
    nan = float("nan")
    return {
        "rows": rows,
        "delivered": report["delivered"],
        "expected": report["expected"],
        "drain_s": report["seconds"],
        "p50": latency.get("p50", nan),
        "p99": latency.get("p99", nan),
        "p99.9": latency.get("p99.9", nan),
        "max": latency.get("max", nan),
        "samples": report["samples"],
        "latency_every": every,
        "errors": report["errors"],
        "error_samples": report["error_samples"],
        "client_cpu": report["loadgen_cpu_s"] / wall,
        "client_rss_kib": report["loadgen_rss_kib"],
    }


def direct_writes(port: int) -> int:
    """The hub's socket writes so far (`pyrt_direct_writes_total` on /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^pyrt_direct_writes_total (\S+)$", text, re.MULTILINE)
    if found is None:
        raise RuntimeError("no pyrt_direct_writes_total on /metrics")
    return int(float(found.group(1)))


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(pg: Any, kind: str, rate: int, args: Any) -> dict[str, Any]:
    database = pg.new_database("walbench")
    pg.sql(TABLE, database)
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
        config.write(
            "[hub]\noutbox_messages = 1000000\noutbox_bytes = 1073741824\n"
            "outbox_total_bytes = 1099511627776\n"
            f"history_size = 1024\nwrite_threads = {args.write_threads}\n"
            # Every subscriber comes from 127.0.0.1: the per-address cap is off.
            "\n[server]\nmax_connections_per_ip = 0\n\n"
            f"[sources.wal]\nport = {pg.port}\nuser = 'pyrt_scram'\n"
            f"password = 'secret'\ndatabase = '{database}'\nslot = '{database}'\n"
            # Anonymous subscribers, every table's rows open, as in the runs before auth.
            f"{OPEN_AUTH}"
        )
    server, port = start_server(config.name)
    try:
        writes_before = direct_writes(port)
        cpu_before = cpu_seconds(server.pid)
        ours_before = time.process_time()
        wall = time.time()
        if args.client == "rust":
            result = measure_rust(
                args.loadgen, port, pg.port, database, args.subscribers, kind, rate, args
            )
        else:
            result = trio.run(measure, port, pg.port, database, args.subscribers, kind, rate, args)
        wall = time.time() - wall
        result["hub_cpu"] = (cpu_seconds(server.pid) - cpu_before) / wall
        result["writes"] = direct_writes(port) - writes_before
        if args.client == "python":
            result["client_cpu"] = (time.process_time() - ours_before) / wall
    finally:
        server.terminate()
        server.wait(timeout=30)
        os.unlink(config.name)
        pg.sql(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots"
            f" WHERE database = '{database}' AND NOT active"
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1000,5000", help="rows/s, comma-separated")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--filters", default="shared,distinct", help="shared and/or distinct")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds not measured")
    parser.add_argument("--drain", type=float, default=30.0, help="max wait for the rest")
    parser.add_argument(
        "--client",
        choices=("rust", "python"),
        default="rust",
        help="subscribers in the Rust load generator, or in this process",
    )
    parser.add_argument("--threads", type=int, default=1, help="load generator threads (rust)")
    parser.add_argument("--loadgen", type=Path, help="a built pyrt-loadgen (default: build it)")
    parser.add_argument(
        "--write-threads", type=int, default=1, help="the hub's [hub] write_threads"
    )
    args = parser.parse_args(argv)
    if args.client == "rust" and args.loadgen is None:
        args.loadgen = build_loadgen()
    from pgserver import start_server  # type: ignore[import-not-found]  # tests/

    pg = start_server()
    try:
        rows = []
        for kind in args.filters.split(","):
            for rate in (int(r) for r in args.rates.split(",")):
                result = run_case(pg, kind, rate, args)
                rows.append((kind, rate, result))
                print(f"# {kind} {rate} rows/s: {result}", file=sys.stderr, flush=True)
    finally:
        pg.cleanup()
    n = args.subscribers
    print(f"## wal_latency_{n}subs_tenth ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print(f"Subscribers: {args.client} client\n")
    print(
        "| filters | rows/s | deliveries/s | p50 | p99 | max | delivered | hub CPU | client CPU"
        " | writes per row |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for kind, rate, r in rows:
        print(
            f"| {kind} | {rate:,} | {rate * n // 10:,} | {r['p50']:.1f} ms | {r['p99']:.1f} ms |"
            f" {r['max']:.1f} ms | {r['delivered']:,} / {r['expected']:,}"
            f" (+{r['drain_s']:.1f} s) | {r['hub_cpu']:.0%} | {r['client_cpu']:.0%} |"
            f" {r['writes'] / r['rows']:.1f} |"
        )
    print(f"\nMachine: {machine()}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        port, database, rate, seconds = sys.argv[2:6]
        trio.run(write, int(port), database, int(rate), float(seconds))
        sys.exit(0)
    sys.exit(main())
