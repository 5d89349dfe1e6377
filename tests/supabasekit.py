"""The official Supabase client (`realtime` from PyPI) driven from trio tests: its asyncio
loop on a thread of its own, a connected client, and a channel that records what its
callbacks saw. Used by tests/plugins/test_supabase*.py."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import orjson
import trio
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from trio_websocket import WebSocketConnection

from pyrt.node.node import Node

T = TypeVar("T")


class AsyncioThread:
    """An asyncio event loop on its own thread: the client's home."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T], timeout: float = 15) -> T:
        """Runs `coro` on the loop; waits for it in a trio worker thread."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return await trio.to_thread.run_sync(future.result, timeout)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel_all(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def v1(topic: str, event: str, payload: Any, ref: str | None = "1") -> dict[str, Any]:
    """A vsn 1.0.0 frame (a join names itself: join_ref is its ref)."""
    return {"topic": topic, "event": event, "payload": payload, "ref": ref, "join_ref": ref}


async def receive(ws: WebSocketConnection) -> Any:
    """The next frame, parsed (a kind 4 binary frame as it is)."""
    with trio.fail_after(5):
        message = await ws.get_message()
    return (
        message if isinstance(message, bytes) and message[:1] == b"\x04" else orjson.loads(message)
    )


async def send(ws: WebSocketConnection, value: Any) -> None:
    await ws.send_message(orjson.dumps(value).decode())


def base_url(node: Node, scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{node.port}/realtime/v1"


@asynccontextmanager
async def realtime(
    aio: AsyncioThread, node: Node, key: str, **options: Any
) -> AsyncIterator[AsyncRealtimeClient]:
    """A connected official client with `key` as its apikey; closed at the end."""

    async def make() -> AsyncRealtimeClient:
        client = AsyncRealtimeClient(base_url(node), token=key, **options)
        await client.connect()
        return client

    client = await aio.run(make())
    try:
        yield client
    finally:
        await aio.run(client.close())


def config(
    *,
    ack: bool = False,
    echo: bool = False,
    key: str = "",
    presence: bool = False,
    private: bool = False,
) -> dict[str, Any]:
    return {
        "config": {
            "broadcast": {"ack": ack, "self": echo},
            "presence": {"key": key, "enabled": presence},
            "private": private,
        }
    }


class Subscription:
    """A channel of the client and what its callbacks saw (appended on the asyncio thread)."""

    def __init__(self, client: AsyncRealtimeClient, topic: str, params: Any = None) -> None:
        self.channel = client.channel(topic, params)
        self.states: list[RealtimeSubscribeStates] = []
        self.errors: list[Exception | None] = []
        self.broadcasts: list[dict[str, Any]] = []
        self.system: list[Any] = []
        self.changes: list[dict[str, Any]] = []
        self.syncs = 0
        self.joins: list[tuple[str, list[Any]]] = []
        self.leaves: list[tuple[str, list[Any]]] = []
        self.channel.on_broadcast("*", lambda p: self.broadcasts.append(dict(p)))
        self.channel.on_system(lambda p: self.system.append(p))

    def watch_presence(self) -> Subscription:
        def on_sync() -> None:
            self.syncs += 1

        self.channel.on_presence_sync(on_sync)
        self.channel.on_presence_join(lambda key, _cur, new: self.joins.append((key, new)))
        self.channel.on_presence_leave(lambda key, _cur, left: self.leaves.append((key, left)))
        return self

    def watch_changes(self, event: str, **binding: Any) -> Subscription:
        self.channel.on_postgres_changes(
            event,  # type: ignore[arg-type]
            lambda p: self.changes.append({"event": event, **p}),
            **binding,
        )
        return self

    async def subscribe(self, aio: AsyncioThread) -> Subscription:
        await self.attempt(aio)
        assert self.states[-1] == RealtimeSubscribeStates.SUBSCRIBED, self.errors
        return self

    async def attempt(self, aio: AsyncioThread) -> Subscription:
        """Subscribes, whatever comes of it (`states`, `errors`)."""

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            self.states.append(state)
            self.errors.append(error)

        await aio.run(self.channel.subscribe(on_state))
        return self
