"""The two helpers every end-to-end test uses: `StartNode`, the type of the `start_node`
fixture (conftest.py: a Node on a free loopback port, in the test's nursery), and `until`
(waiting for a condition that no event announces)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import trio

from pyrt.hub.hub import Hub, HubConfig
from pyrt.node.node import Node
from pyrt.plugin import Authorize, Source, Transport


class StartNode(Protocol):
    """The `start_node` fixture: starts a Node and returns it once it listens."""

    async def __call__(
        self,
        *,
        hub: HubConfig | Hub | None = None,
        transports: Sequence[str] | Sequence[Transport] | None = None,
        sources: Mapping[str, Mapping[str, Any]] | Sequence[Source] | None = None,
        nursery: trio.Nursery | None = None,
        authorize: Authorize | None = None,
        **config: Any,
    ) -> Node: ...


async def until(
    condition: Callable[[], object], what: str = "the condition", *, timeout: float = 20.0
) -> None:
    """Waits until `condition()` is true, polling it; fails naming `what` after `timeout`.

    Only for what no event announces: something a server does on its own after the test's
    last await (a connection forgotten after its socket closed, a counter bumped by another
    task). Where the code sets an event or sends a frame, wait for that instead. The default
    timeout is generous (a loaded machine, a Postgres round trip): it only delays a failure.
    """
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.005)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
