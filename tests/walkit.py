"""The WAL source's test helpers, shared by the tests of the WAL source, of read-only
channels and of the Supabase dialect: the tables of the `wal_db` fixture (conftest.py), a
`WalSource` on the test server, SQL from trio, and a Node running a source."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import trio
from pgserver import PostgresServer

from pyrt.hub.hub import Hub
from pyrt.node.node import Node, NodeConfig
from pyrt.plugins.wal import WalSource
from pyrt.testing import open_auth

TABLES = """
CREATE TABLE items (id int PRIMARY KEY, body text, n int);
CREATE TABLE other (id int PRIMARY KEY, body text);
CREATE TABLE ops (id int PRIMARY KEY, n int, t text, b bool, nul text);
CREATE TABLE rd (id int PRIMARY KEY, status text);
CREATE TABLE rf (id int PRIMARY KEY, status text);
ALTER TABLE rf REPLICA IDENTITY FULL;
CREATE TABLE kit (id serial PRIMARY KEY, body text);
CREATE TABLE unpublished (body text);
CREATE PUBLICATION pyrt FOR TABLE items, other, ops, rd, rf, kit;
"""


def wal_source(postgres: PostgresServer, db: str, **extra: Any) -> WalSource:
    options: dict[str, Any] = {
        "host": postgres.host,
        "port": postgres.port,
        "user": "pyrt_scram",
        "password": "secret",
        "database": db,
        "slot": db,  # slot names are per cluster
        "reconnect_min": 0.1,
        "reconnect_max": 0.5,
        "startup_timeout": 20.0,
        "status_interval": 1.0,
    }
    options.update(extra)
    return WalSource(**options)


async def run_sql(postgres: PostgresServer, db: str, query: str) -> str:
    return await trio.to_thread.run_sync(postgres.sql, query, db)


@asynccontextmanager
async def running(
    source: WalSource, hub: Hub | None = None, transports: Sequence[str] = ()
) -> AsyncIterator[Node]:
    config = NodeConfig(auth=open_auth(), port=0, transports=tuple(transports), drain_timeout=1.0)
    node = Node(config, hub=hub, transports=None if transports else [], sources=[source])
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        yield node
        node.stop()
