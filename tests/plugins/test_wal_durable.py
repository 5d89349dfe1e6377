"""Durable history with the WAL source, end to end: a real `pyrt serve` process streaming a real
PostgreSQL 15, killed with SIGKILL in the middle of a 10,000-row load and started again. A
subscriber that reconnects with its offsets gets every row, once."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from nodekit import until
from pgserver import PostgresServer, free_port

from pyrt.client import Message, connect
from pyrt.hub.history import History
from pyrt.hub.historylog import HistoryLog
from pyrt.testing import TEST_SECRET, TestTokens

ROWS = 10_000
BATCH = 500  # rows per transaction: the kill lands inside one (after 2,750 rows)
FENCE = ROWS + 1
FENCE_SQL = f"INSERT INTO items VALUES ({FENCE}, 'fence')"


@pytest.fixture
def kill_db(postgres: PostgresServer) -> Iterator[str]:
    db = postgres.new_database("kill")
    postgres.sql(
        "CREATE TABLE items (id int PRIMARY KEY, body text);"
        " CREATE PUBLICATION pyrt FOR TABLE items;",
        db,
    )
    yield db
    postgres.drop_replication_slots(db)


class Hub:
    """`pyrt serve` in a subprocess."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config = config
        self.port = port
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    async def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pyrt._cli", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1
        deadline = trio.current_time() + 20
        async with httpx.AsyncClient() as http:
            while True:
                if self.process.poll() is not None:
                    raise AssertionError(f"pyrt serve exited:\n{self.log.read_text()}")
                try:
                    response = await http.get(f"http://127.0.0.1:{self.port}/healthz")
                    if response.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if trio.current_time() > deadline:
                    raise AssertionError(f"pyrt serve did not start:\n{self.log.read_text()}")
                await trio.sleep(0.05)  # another process: its readiness is only seen by asking

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(20)


def write_config(tmp_path: Path, postgres: PostgresServer, db: str, port: int) -> Path:
    config = tmp_path / "pyrt.toml"
    config.write_text(
        f"""
[server]
port = {port}
transports = ["websocket"]
api_keys = ["test"]
drain_timeout = 1.0

[auth]
jwt_secret = "{TEST_SECRET}"

[[auth.rules]]
channel = "pg:public:items"
subscribe = "authenticated"

[hub]
history_size = 20000
history_age = 3600.0

[history]
dir = "{tmp_path / "history"}"

[sources.wal]
host = "{postgres.host}"
port = {postgres.port}
user = "pyrt_scram"
password = "secret"
database = "{db}"
slot = "{db}"
reconnect_min = 0.1
reconnect_max = 0.5
status_interval = 1.0
"""
    )
    return config


@pytest.mark.slow
async def test_hub_killed_mid_load_delivers_every_row_once(
    postgres: PostgresServer, kill_db: str, tmp_path: Path
) -> None:
    port = free_port()
    hub = Hub(write_config(tmp_path, postgres, kill_db, port), port, tmp_path / "serve.log")
    await hub.start()
    got: list[Message] = []
    seen: set[int] = set()
    loaded = 0
    killed_at: dict[str, int] = {}

    def load() -> None:
        nonlocal loaded
        for first in range(1, ROWS + 1, BATCH):
            last = first + BATCH - 1
            postgres.sql(
                f"INSERT INTO items SELECT n, 'row ' || n FROM generate_series({first}, {last}) n",
                kill_db,
            )
            loaded = last

    try:
        async with connect(
            f"http://127.0.0.1:{port}",
            token=TestTokens().token("loader"),
            transports=["websocket"],
            min_backoff=0.05,
            max_backoff=0.3,
        ) as client:
            channel = await client.changes([{"table": "items"}], iterate=False)
            channel.on_message.append(got.append)
            channel.on_message.append(lambda m: seen.add(m.data["record"]["id"]))
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, load)
                await until(lambda: len(got) >= ROWS // 4 + BATCH // 2, "a quarter", timeout=30)
                hub.kill()
                killed_at.update(delivered=len(got), loaded=loaded)
                # Rows keep committing while the hub is down.
                await until(lambda: loaded > killed_at["loaded"], "a commit while it is down")
                await hub.start()
                await until(lambda: len(seen) == ROWS, "every row", timeout=45)
            # A fence, committed after the load: a row delivered twice would come before it.
            await trio.to_thread.run_sync(postgres.sql, FENCE_SQL, kill_db)
            await until(lambda: FENCE in seen, "the fence")
            elapsed = time.monotonic() - started
    finally:
        hub.stop()

    assert got[-1].data["record"]["id"] == FENCE
    del got[-1]
    assert killed_at["delivered"] < ROWS
    assert killed_at["loaded"] < ROWS, "the load was over before the kill"
    ids = collections.Counter(m.data["record"]["id"] for m in got)
    assert sorted(ids) == list(range(1, ROWS + 1))
    assert max(ids.values()) == 1, "some rows were delivered twice"
    # One epoch across the restart, offsets 1..10000 without a gap: the hub's history holds
    # each row once, and the subscriber's resume was recovered.
    assert {m.epoch for m in got} == {got[0].epoch}
    assert [m.offset for m in got] == list(range(1, ROWS + 1))
    assert channel.recovered is True
    assert hub.starts == 2
    print(
        f"\n{ROWS} rows, killed after {killed_at['delivered']} delivered"
        f" ({killed_at['loaded']} committed); all delivered in {elapsed:.1f} s"
    )

    # The log on disk agrees: every row once, in offset order.
    history = History(20000, 3600.0, lambda: "new", 3600.0)
    history.attach(HistoryLog(tmp_path / "history"), 0.0, time.time())
    publications: list[Any] = list(history.stream("pg:public:items", 0.0))
    assert [p.offset for p in publications] == list(range(1, FENCE + 1))
    assert sorted(_row_id(p.data) for p in publications) == list(range(1, FENCE + 1))
    assert os.path.isdir(tmp_path / "history")


def _row_id(data: Any) -> int:
    import orjson

    row: int = orjson.loads(orjson.dumps(data))["record"]["id"]
    return row
