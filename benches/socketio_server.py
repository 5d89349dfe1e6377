"""The python-socketio peer for benches/suite.py: rooms as channels, served by aiohttp.

    python benches/socketio_server.py --port 8001

Clients emit `join` (a channel name) and `publish` ({"channel", "data"}), both with an ack;
the server emits `pub` (the data) to the channel's room, the way a python-socketio app
broadcasts. `socketio.AsyncServer` is attached to an aiohttp application, the asyncio server
python-socketio documents first; mounted as an ASGI app under uvicorn (with uvloop, httptools
and websockets) it delivered about a third less in the same fan-out (see docs/benchmarks.md),
so aiohttp is the stronger peer.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import socketio  # type: ignore[import-untyped]
from aiohttp import web


def make_app() -> web.Application:
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins=[], logger=False)

    @sio.on("join")  # type: ignore[untyped-decorator]
    async def join(sid: str, channel: str) -> bool:
        await sio.enter_room(sid, channel)
        return True

    @sio.on("publish")  # type: ignore[untyped-decorator]
    async def publish(sid: str, message: dict[str, Any]) -> bool:
        await sio.emit("pub", message["data"], room=message["channel"])
        return True

    app = web.Application()
    sio.attach(app)
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    print(f"socketio serving on 127.0.0.1:{args.port}", flush=True)
    web.run_app(
        make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None, backlog=4096
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
