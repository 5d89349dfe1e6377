"""The kits' assert and wait, shared."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import trio


def _check(condition: bool, message: object) -> None:
    """The kit's assert: unlike `assert`, it also checks under `python -O`."""
    if not condition:
        raise AssertionError(message)


async def _until(condition: Callable[[], bool], message: str, timeout: float = 5.0) -> None:
    """Waits for something the server does after the client saw the end (no event to await)."""
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.01)
        return
    raise AssertionError(message)


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose body's lone error (a failed check) comes out as itself."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
