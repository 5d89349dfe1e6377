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

    def make(password: str | None = None, tls: bool = False) -> RedisServer:
        server = RedisServer(password=password, tls=tls)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.cleanup()
