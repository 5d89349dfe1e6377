"""Chromium's own EventSource against the SSE transport (Debian's chromium, driven headless
through playwright; scripts/bootstrap installs it).

The node runs on its own trio thread (playwright's sync API is not trio); the test talks to it
through `trio.from_thread`, and the page through `page.evaluate`.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import trio

from pyrt.hub.hub import HubConfig
from pyrt.node.http import HttpExchange
from pyrt.node.node import Node, NodeConfig
from pyrt.plugins.cursor import decode_cursor
from pyrt.plugins.sse import SseTransport
from pyrt.testing import open_auth

CHROMIUM = shutil.which("chromium")

T = TypeVar("T")


class RecordingSse(SseTransport):
    """The SSE transport, noting the `Last-Event-ID` each stream was opened with."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.last_event_ids: list[str | None] = []

    async def serve(self, node: Node, exchange: HttpExchange) -> None:
        self.last_event_ids.append(exchange.request.header("last-event-id"))
        await super().serve(node, exchange)


class NodeThread:
    """A node served by `trio.run` on a thread of its own."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="pyrt-node", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.node.run)
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()

        try:
            trio.run(serve)
        except BaseException as e:  # handed to the test thread in stop()
            self._error = e
        finally:
            self._ready.set()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` on the node's trio thread, between its tasks' steps."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    @contextmanager
    def running(self) -> Iterator[NodeThread]:
        self._thread.start()
        self._ready.wait(10)
        if self._token is None:
            raise RuntimeError(f"the node did not start: {self._error!r}")
        try:
            yield self
        finally:
            self.call(self.node.stop)
            self._thread.join(15)
            assert not self._thread.is_alive(), "the node did not stop"
            if self._error is not None:
                raise self._error


PAGE_SCRIPT = """(url) => {
  window.frames_seen = [];
  window.opens = 0;
  const source = new EventSource(url);
  source.onopen = () => { window.opens += 1; };
  source.onmessage = (e) => {
    window.frames_seen.push({frame: JSON.parse(e.data), id: e.lastEventId});
  };
}"""


def pubs(page: Any) -> list[Any]:
    frames = page.evaluate("window.frames_seen.map(e => e.frame)")
    return [f for f in frames if f.get("push") == "pub"]


def test_chromium_eventsource_receives_in_order_and_resumes_with_last_event_id() -> None:
    from playwright.sync_api import sync_playwright

    channel = "browser:feed"
    sse = RecordingSse(retry_ms=200, heartbeat=5.0)
    # A small outbox: a burst of 30 publications overflows it, and the hub cuts the stream
    # (4008, "slow consumer") after what fit, as it would for a browser that fell behind.
    # The rest (10) fit in it when they are replayed on the reconnect. (With a recovery
    # larger than the outbox, the rejoin overflows too and each reconnect gets one outbox
    # further: it converges, through one cut per outbox-full.)
    hub = HubConfig(outbox_messages=20)
    node = Node(NodeConfig(auth=open_auth(), port=0, hub=hub), transports=[sse])
    # No skip when the browser is missing: a test that did not run would read as passed.
    assert CHROMIUM is not None, "Debian's chromium is not installed (scripts/bootstrap does it)"
    with NodeThread(node).running() as served, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{node.port}/")  # the status page, served by the node
            page.evaluate(PAGE_SCRIPT, f"/connection/sse?channel={channel}")
            page.wait_for_function("window.frames_seen.length >= 2", timeout=10_000)
            session, joined = page.evaluate("window.frames_seen.map(e => e.frame)")[:2]
            assert session["push"] == "session"
            assert joined["reply"] == f"join:{channel}"

            for n in range(5):
                served.call(node.publish, channel, n)
            page.wait_for_function(
                "window.frames_seen.filter(e => e.frame.push === 'pub').length >= 5",
                timeout=10_000,
            )
            assert [p["data"] for p in pubs(page)] == [0, 1, 2, 3, 4]

            def burst() -> None:  # one step of the node's thread: nothing is written between
                for n in range(5, 35):
                    node.publish(channel, n)

            served.call(burst)
            page.wait_for_function(
                "window.frames_seen.filter(e => e.frame.push === 'pub').length >= 35",
                timeout=15_000,
            )
            seen = page.evaluate("window.frames_seen")
            opens = page.evaluate("window.opens")
        finally:
            browser.close()

    frames = [e["frame"] for e in seen]
    got = [f for f in frames if f.get("push") == "pub"]
    # Every publication once, in order, across the cut.
    assert [p["data"] for p in got] == list(range(35))
    assert [p["offset"] for p in got] == list(range(1, 36))
    # The cut: the hub closed the stream as slow, and EventSource reconnected by itself...
    closes = [f for f in frames if f.get("push") == "close"]
    assert [c["code"] for c in closes] == [4008]
    assert opens == 2
    # ...sending the id of the last event it got, which held the offset of the last
    # publication before the cut; the new stream recovered the rest from history.
    assert len(sse.last_event_ids) == 2
    first, resumed = sse.last_event_ids
    assert first is None
    assert resumed is not None
    cut_at = frames.index(closes[0])
    last_before = [f for f in frames[:cut_at] if f.get("push") == "pub"][-1]
    assert decode_cursor(resumed).positions[channel].offset == last_before["offset"]
    assert 5 < last_before["offset"] < 35  # the burst was really split by the cut
    rejoin = next(f for f in frames[cut_at:] if f.get("reply") == f"join:{channel}")
    assert rejoin["ok"]["recovered"] is True
