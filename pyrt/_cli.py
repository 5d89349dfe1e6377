"""The `pyrt` command."""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from collections.abc import Sequence

import attrs
import trio

from . import FilterError, Matcher, RowEvent, __version__
from ._config import ConfigError, node_config
from ._node import Node

DEMO_SUBSCRIPTIONS: list[tuple[int, str, str, str, str | None]] = [
    (1, "INSERT", "public", "messages", "room_id=eq.42"),
    (2, "*", "public", "orders", "status=in.(paid,shipped),total=gte.100"),
    (3, "UPDATE", "public", "*", None),
    (4, "DELETE", "public", "orders", "status=not.eq.shipped"),
]


def _demo() -> int:
    """Shows the matcher at work on a few subscriptions and events."""
    matcher = Matcher()
    for sub_id, kind, schema, table, row_filter in DEMO_SUBSCRIPTIONS:
        matcher.add_rows(sub_id, kind, schema, table, row_filter)
        print(f"subscription {sub_id}: {kind} {schema}.{table} {row_filter or '(all rows)'}")
    matcher.add_channel(5, "room:*")
    print("subscription 5: channel pattern room:*")
    events = [
        RowEvent("INSERT", "public", "messages", {"id": 1, "room_id": 42, "body": "hi"}),
        RowEvent("INSERT", "public", "messages", {"id": 2, "room_id": 7, "body": "yo"}),
        RowEvent("UPDATE", "public", "orders", {"id": 9, "status": "paid", "total": 120.5}),
        RowEvent("DELETE", "public", "orders", old_record={"id": 9, "status": "paid"}),
    ]
    print()
    for event, ids in zip(events, matcher.match_rows(events), strict=True):
        row = event.old_record if event.type == "DELETE" else event.record
        print(f"{event.type} {event.schema}.{event.table} {row} -> {sorted(ids)}")
    print(f"publish room:lobby -> {sorted(matcher.match_channel('room:lobby'))}")
    try:
        matcher.add_rows(6, "*", "public", "orders", "total=between.1")
    except FilterError as e:
        print(f"\nrejected filter 'total=between.1': {e}")
    return 0


async def _serve(node: Node) -> None:
    config = node.config
    async with trio.open_nursery() as nursery:
        await nursery.start(node.run)
        print(f"pyrt {__version__} serving on http://{config.host}:{node.port}/", flush=True)
        ws = f"ws://{config.host}:{node.port}/connection/websocket"
        print(f"WebSocket: {ws} (Ctrl-C to stop)", flush=True)
        if node.generated_api_key:
            key = node.config.api_keys[0]
            print(f"REST API key (made up for this run; set server.api_keys): {key}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: draining and stopping", flush=True)
                node.stop()
                break


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyrt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyrt {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="match a few row events against a few subscriptions")
    serve = commands.add_parser("serve", help="run a hub (in memory, no other setup)")
    serve.add_argument("--config", help="a TOML file (see docs/configuration.md)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000, 0 = any)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo()
    if args.command == "serve":
        try:
            config = node_config(args.config, {"host": args.host, "port": args.port})
            generated = not config.api_keys
            if generated:
                config = attrs.evolve(config, api_keys=(secrets.token_urlsafe(24),))
            node = Node(config)
            node.generated_api_key = generated
        except (ConfigError, LookupError, ValueError) as e:
            print(f"pyrt serve: {e}", file=sys.stderr)
            return 2
        try:
            trio.run(_serve, node)
        except OSError as e:
            print(f"pyrt serve: cannot listen on {config.host}:{config.port}: {e}", file=sys.stderr)
            return 1
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
