"""A Redis source for pyrt: Redis pub/sub channels and patterns, and Redis streams, each
published on a pyrt channel. See `RedisSource` and this distribution's README.md."""

from __future__ import annotations

from .source import RedisSource

__all__ = ["RedisSource"]
