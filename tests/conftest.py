"""Shared test configuration and fixtures, for every folder of tests/: hypothesis profiles,
`postgres` (a real server), `autojump_io_clock`, `start_node` (a Node on a free loopback port,
in the test's nursery; its type and `until` are in nodekit.py) and `wal_db`.

Tests import helpers from the kit modules next to this file, never from conftest: pytest
imports every conftest.py of the run as the module `conftest`, so `from conftest import`
finds whichever was loaded last (plugins/*/tests have their own)."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
import trio
from hypothesis import settings
from nodekit import StartNode
from pgserver import PostgresServer, start_server
from trio.testing import MockClock
from walkit import TABLES

from pyrt.hub.hub import Hub, HubConfig
from pyrt.node.node import Node, NodeConfig
from pyrt.plugin import Authorize, Source, Transport
from pyrt.testing import open_auth

# "ci" is the default so a plain `pytest` runs the differential tests as CI does: a few
# thousand examples, no deadline (the first call into the compiled module, shrinking and
# a busy CI machine all make timings useless as a failure signal). Tests that need other
# example counts say so in their own settings; those inherit the rest from here.
settings.register_profile("ci", max_examples=2000, deadline=None, print_blob=True)
# For a quick local loop: HYPOTHESIS_PROFILE=dev pytest
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# When a hypothesis test fails, its pytest plugin imports libcst to suggest an explicit
# @example. Some libcst releases use the deprecated mypy_extensions.TypedDict, and under
# `filterwarnings = error` that import turns every such failure into a pytest INTERNALERROR
# that hides the falsifying example. Importing it here, once, with that warning ignored,
# keeps failures readable.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import hypothesis.extra._patching  # noqa: F401


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server (wal_level=logical) for the whole session; see pgserver.py."""
    server = start_server()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def wal_db(postgres: PostgresServer) -> Iterator[str]:
    """A new database with the tables of walkit.TABLES and a publication of them; its
    replication slots are dropped at the end."""
    db = postgres.new_database("wal")
    postgres.sql(TABLES, db)
    yield db
    postgres.drop_replication_slots(db)


@pytest.fixture
def autojump_io_clock() -> MockClock:
    """Virtual time for a test whose subject is a timer (a deadline, a ttl, a poll timeout)
    but which talks over loopback sockets: trio's MockClock, standing still while anything
    runs and jumping to the next deadline once every task has been blocked for 50 ms of real
    time. The test's waits take no real time, and its timings are exact, so it asserts
    "closed at the deadline" rather than a range of wall-clock seconds.

    pytest-trio's `autojump_clock` jumps as soon as every task is blocked, which is right
    without I/O; here the 50 ms let bytes already sent on loopback land before a jump.
    """
    return MockClock(autojump_threshold=0.05)


# -- a node per test ---------------------------------------------------------------------------


@pytest.fixture
async def start_node(nursery: trio.Nursery) -> StartNode:
    """Starts a Node on a free loopback port (`port=0`) in the test's nursery (or the one
    given), and returns it once it listens; the test's end cancels it.

    `config` are `NodeConfig` fields. `hub` is a `HubConfig`, or a `Hub` to run (its config
    becomes the node's). `transports` and `sources` are either what the config names
    (transport names; source name -> options), loaded as entry points the way `pyrt serve`
    loads them, or plugin objects handed to the Node as they are. `authorize`: the
    application's hook (`Node(authorize=...)`, docs/auth.md).

    A test module whose nodes share options overrides the fixture with them, e.g.
    `functools.partial(start_node, api_keys=(KEY,))`; a call's own arguments still win.
    """
    test_nursery = nursery

    async def start(
        *,
        hub: HubConfig | Hub | None = None,
        transports: Sequence[str] | Sequence[Transport] | None = None,
        sources: Mapping[str, Mapping[str, Any]] | Sequence[Source] | None = None,
        nursery: trio.Nursery | None = None,
        authorize: Authorize | None = None,
        **config: Any,
    ) -> Node:
        config.setdefault("port", 0)
        # Tests not about authorization run open (pyrt.testing.open_auth); those that are
        # pass their own `auth`.
        config.setdefault("auth", open_auth())
        plugins: dict[str, Any] = {"authorize": authorize}
        if isinstance(hub, Hub):
            plugins["hub"] = hub
            config["hub"] = hub.config
        elif hub is not None:
            config["hub"] = hub
        if transports is not None:
            if all(isinstance(t, str) for t in transports):
                config["transports"] = tuple(transports)
            else:
                plugins["transports"] = list(transports)
        if isinstance(sources, Mapping):
            config["sources"] = sources
        elif sources is not None:
            plugins["sources"] = list(sources)
        node = Node(NodeConfig(**config), **plugins)
        started: Node = await (nursery or test_nursery).start(node.run)
        return started

    return start
