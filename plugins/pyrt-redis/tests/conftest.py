"""Fixtures for the Redis source's tests: real redis-server processes on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from redisserver import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A server shared by the tests that neither restart it nor set a password (each test
    uses keys and channels of its own)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def new_redis_server() -> Iterator[Callable[..., RedisServer]]:
    """Makes servers of the test's own (to restart, kill or give a password), started."""
    made: list[RedisServer] = []

    def make(password: str | None = None) -> RedisServer:
        server = RedisServer(password=password)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()


def pytest_configure(config: pytest.Config) -> None:
    # coredis 6.9 leaves the anyio memory streams of a connection that never connected
    # (refused while a server is down, a wrong password) unclosed; anyio warns when they are
    # garbage-collected, which may be during any later test.
    config.addinivalue_line(
        "filterwarnings", "ignore:Unclosed <MemoryObject:ResourceWarning:anyio.streams.memory"
    )
