"""The `pyrt` command."""

from __future__ import annotations

import argparse
import gc
import getpass
import os
import secrets
import signal
import sys
from collections.abc import Sequence

import attrs
import trio

from . import FilterError, Matcher, RowEvent, __version__
from .node.config import ConfigError, node_config
from .node.node import Node
from .node.sources import SourceError

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
        if node.gate.development:
            print("No [auth] table: a development secret was made up for this run.", flush=True)
            print(f"Client token (user 'dev'): {node.gate.development_token()}", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                print(f"{signal.Signals(signum).name}: draining and stopping", flush=True)
                node.stop()
                break


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves += _leaves(error) if isinstance(error, BaseExceptionGroup) else [error]
    return leaves


def _pg_setup(args: argparse.Namespace) -> int:
    """Creates the publication the WAL source reads and reports on replica identities."""
    from .postgres import PgConnection, PgConnectionError, PgError
    from .postgres.replication import setup_publication

    password = os.environ.get("PGPASSWORD")
    if password is None and sys.stdin.isatty():
        password = getpass.getpass(f"password for {args.user}: ")

    hint: str | None = None

    async def setup() -> list[str]:
        nonlocal hint
        async with await PgConnection.connect(
            args.host, args.port, args.user, password, args.database
        ) as conn:
            try:
                report = await setup_publication(conn, args.publication, args.table or None)
            except PgError as e:
                # 42501 insufficient_privilege: CREATE PUBLICATION ... FOR ALL TABLES is for
                # superusers only (the server's ParameterStatus says whether we are one).
                superuser = conn.parameters.get("is_superuser") == "on"
                if e.code == "42501" and not args.table and not superuser:
                    hint = (
                        "without --table, pg-setup creates the publication FOR ALL TABLES,"
                        f" which only a superuser may do, and {conn.user!r} is not one. Name the"
                        " tables to publish instead (tables you own; repeat the option):"
                        " pyrt pg-setup --table public.orders --table public.items ..."
                    )
                raise
            return report.lines()

    try:
        lines = trio.run(setup)
    except (PgError, PgConnectionError) as e:
        print(f"pyrt pg-setup: {e}", file=sys.stderr)
        if hint is not None:
            print(f"pyrt pg-setup: {hint}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


def _bench(args: Sequence[str]) -> int:
    """Runs the fan-out suite (benches/suite.py) of the source tree pyrt is running from."""
    import subprocess
    from pathlib import Path

    suite = Path(__file__).resolve().parent.parent / "benches" / "suite.py"
    if not suite.is_file():
        print(
            "pyrt bench: the benchmark suite is not installed with the package: it lives in"
            " pyrt's source tree (benches/suite.py, with a Rust load generator). Run it from"
            " a checkout: pip install -e '.[bench]' && pyrt bench --quick",
            file=sys.stderr,
        )
        return 2
    return subprocess.run([sys.executable, str(suite), *args]).returncode


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])  # every other argument is the suite's (pyrt bench --help)
    parser = argparse.ArgumentParser(prog="pyrt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyrt {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="match a few row events against a few subscriptions")
    serve = commands.add_parser("serve", help="run a hub (in memory, no other setup)")
    serve.add_argument("--config", help="a TOML file (see docs/configuration.md)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000, 0 = any)")
    commands.add_parser(
        "bench",
        help="fan-out throughput and latency of pyrt, Nchan and python-socketio side by side"
        " (benches/suite.py; pyrt bench --help for its options)",
    )
    pg = commands.add_parser(
        "pg-setup",
        help="create the publication for the WAL source; list tables needing a replica identity",
        description="Creates the publication (FOR ALL TABLES, which needs a superuser, or the"
        " --table ones) unless it exists, then lists published tables without a primary key"
        " (UPDATE/DELETE on them fail) and tables whose old rows carry the key only, with the"
        " SQL to fix them."
        " The password comes from PGPASSWORD (or a prompt).",
    )
    pg.add_argument("--host", default=os.environ.get("PGHOST", "127.0.0.1"))
    pg.add_argument("--port", type=int, default=int(os.environ.get("PGPORT", "5432")))
    pg.add_argument("--user", default=os.environ.get("PGUSER", "postgres"))
    pg.add_argument("--database", default=os.environ.get("PGDATABASE"))
    pg.add_argument("--publication", default="pyrt", help="publication name (default pyrt)")
    pg.add_argument(
        "--table",
        action="append",
        help="publish this table (schema.name; repeatable); without it: all tables, which"
        " needs a superuser",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo()
    if args.command == "pg-setup":
        return _pg_setup(args)
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
        # A hub holds many long-lived objects per connection; with the default threshold
        # (700) the collector walks them so often that it took a quarter of the CPU while
        # 10,000 clients connected (py-spy). The process is ours here; an embedding
        # application decides for itself (docs/benchmarks.md).
        gc.set_threshold(50_000, 50, 100)
        try:
            trio.run(_serve, node)
        except OSError as e:
            print(f"pyrt serve: cannot listen on {config.host}:{config.port}: {e}", file=sys.stderr)
            return 1
        except ExceptionGroup as group:
            failed, rest = group.split(SourceError)
            if failed is None or rest is not None:
                raise
            for error in _leaves(failed):
                print(f"pyrt serve: {error}", file=sys.stderr)
            return 1
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
