"""The `pyrt` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import FilterError, Matcher, RowEvent, __version__

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pyrt", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pyrt {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="match a few row events against a few subscriptions")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return _demo()
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
