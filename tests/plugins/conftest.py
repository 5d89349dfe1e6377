"""Fixtures shared by the plugins' tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from supabasekit import AsyncioThread


@pytest.fixture
def aio() -> Iterator[AsyncioThread]:
    """An asyncio loop in a thread, for the official Supabase client."""
    thread = AsyncioThread()
    try:
        yield thread
    finally:
        thread.close()
