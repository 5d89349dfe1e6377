"""The source conformance kit: `check_source` (see `pyrt.testing`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
import trio

from ..hub.history import Publication
from ..hub.hub import Hub
from ..node.config import NodeConfig
from ..node.node import Node
from ..plugin import Session, Source
from ._checks import _check, _nursery
from .auth import open_auth

# -- sources -------------------------------------------------------------------------------


class SourceKitFailure(Exception):
    """The error `check_source` makes publishing one event raise: the source must log,
    count (`Node.metrics.source_events_skipped`) and skip that event, and go on."""


class _FailingHub(Hub):
    armed = 0
    """How many of the next publications fail."""

    def _fail(self, what: str) -> None:
        if self.armed:
            self.armed -= 1
            raise SourceKitFailure(f"check_source: publishing {what} failed (on purpose)")

    def publish(
        self, channel: str, data: Any, now: float, *args: Any, **kwargs: Any
    ) -> Publication:
        self._fail(f"on {channel!r}")
        return super().publish(channel, data, now, *args, **kwargs)

    def publish_change(self, change: Any, now: float, *args: Any, **kwargs: Any) -> Publication:
        self._fail("a row change")
        return super().publish_change(change, now, *args, **kwargs)


SOURCE_KIT_VALUES = [*(f"kit-{n}" for n in range(20)), "kit ünïcödé € 𝄞 🎉", "kit 'quoted' \\"]
"""What `check_source` asks the source to produce, in this order."""


async def check_source(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    *,
    channel: str,
    value: Callable[[Any], Any] = lambda data: data,
    timeout: float = 20.0,
) -> None:
    """Runs the conformance checks for a source plugin; raises AssertionError naming the
    first that fails.

    `factory()` makes a fresh source (it is called twice); `produce(values)` makes it emit
    one event per string in `values`, in order, and returns once they are sent; `value`
    gets the string back out of a publication's data; `channel` is where they must appear.
    `timeout` bounds each wait.
    """
    config = NodeConfig(port=0, transports=(), drain_timeout=2.0, auth=open_auth())
    await _source_publishes_in_order(factory, produce, config, channel, value, timeout)
    await _bad_event_is_skipped(factory, produce, config, channel, value, timeout)


async def _source_publishes_in_order(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    config: NodeConfig,
    channel: str,
    value: Callable[[Any], Any],
    timeout: float,
) -> None:
    node = Node(config, transports=[], sources=[factory()])
    stopped = trio.Event()

    async def run_node(*, task_status: trio.TaskStatus[Node]) -> None:
        try:
            await node.run(task_status=task_status)
        finally:
            stopped.set()

    async with _nursery() as nursery:
        with trio.fail_after(timeout):
            await nursery.start(run_node)
        session = node.open_session(transport="check_source", pings=False)
        await session.receive(orjson.dumps({"id": 1, "cmd": "join", "channel": channel}))
        reply = await _next_frame(session, timeout)
        _check(reply.get("reply") == 1 and "ok" in reply, f"joining {channel!r}: {reply}")
        with trio.fail_after(timeout):
            await produce(SOURCE_KIT_VALUES)
        got = []
        for _ in SOURCE_KIT_VALUES:
            frame = await _next_push(session, timeout)
            _check(frame.get("channel") == channel, f"published elsewhere: {frame}")
            got.append(value(frame["data"]))
        _check(got == SOURCE_KIT_VALUES, f"events out of order or changed: {got!r}")
        # A node stops with its source running (the source must not hold on past cancel).
        session.end()
        node.stop()
        with trio.move_on_after(config.drain_timeout + 5):
            await stopped.wait()
        hung = not stopped.is_set()
        if hung:
            nursery.cancel_scope.cancel()
    _check(not hung, "the node did not stop with the source running")


async def _bad_event_is_skipped(
    factory: Callable[[], Source],
    produce: Callable[[Sequence[str]], Awaitable[None]],
    config: NodeConfig,
    channel: str,
    value: Callable[[Any], Any],
    timeout: float,
) -> None:
    hub = _FailingHub(config.hub)
    source = factory()
    node = Node(config, hub=hub, transports=[], sources=[source])
    async with _nursery() as nursery:
        with trio.fail_after(timeout):
            await nursery.start(node.run)
        session = node.open_session(transport="check_source", pings=False)
        await session.receive(orjson.dumps({"id": 1, "cmd": "join", "channel": channel}))
        await _next_frame(session, timeout)
        hub.armed = 1
        with trio.fail_after(timeout):
            await produce(["kit-fail", "kit-after"])
        frame = await _next_push(session, timeout)
        _check(
            value(frame["data"]) == "kit-after",
            f"after an event it could not publish, the source must go on: got {frame}",
        )
        skipped = node.metrics.source_events_skipped[source.name]
        _check(skipped == 1, f"the skipped event must be counted once, not {skipped} times")
        session.end()
        node.stop()


async def _next_frame(session: Session, timeout: float) -> dict[str, Any]:
    with trio.fail_after(timeout):
        while True:
            if session.queued:
                result: dict[str, Any] = orjson.loads(session.take(max_frames=1)[0])
                return result
            await session.wait_changed()


async def _next_push(session: Session, timeout: float) -> dict[str, Any]:
    while True:
        frame = await _next_frame(session, timeout)
        if frame.get("push") == "pub":
            return frame
