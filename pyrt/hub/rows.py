"""Row-change subscriptions of the hub: who wants which changes of which tables.

A subscription is `(event, schema, table, filter)` (docs/matcher.md). Identical ones are one
entry, with one id, however many connections hold them: the Rust matcher stores each once,
and a row event names the ids it matched hub-wide, so one encoded frame serves every
recipient (a client keeps the ids it was given, as Supabase's clients do). Who holds which
id is kept in the hub's deliverer (`Deliverer.subscribe_rows`); the Rust fan-out delivers row
events without a Python step per recipient. Sans-IO.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from .._core import Matcher, PgChange, RowEvent
from .._errors import FilterError
from .deliverer import Deliverer
from .protocol import RowSubscription

TRUNCATE = "TRUNCATE"
"""The `change` kept in history for a truncate (the matcher has no TRUNCATE events)."""


class InvalidRowSubscription(ValueError):
    """Entry `index` of a join's `changes` was refused by the matcher."""

    def __init__(self, index: int, error: FilterError) -> None:
        super().__init__(f"changes[{index}].filter: {error}")
        self.index = index
        self.reason = error.reason
        self.position = error.position


def _key(spec: RowSubscription) -> tuple[str, str, str, str]:
    return (spec.event, spec.schema, spec.table, spec.filter or "")


class RowSubscriptions:
    """The row subscriptions of every connection (the hub's Connections: `id`, `handle`),
    with their holders registered in `deliverer`."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.matcher = Matcher()
        self._deliverer = deliverer
        self._ids = itertools.count(1)
        self._by_key: dict[tuple[str, str, str, str], int] = {}
        self._specs: dict[int, RowSubscription] = {}
        self._members: dict[int, dict[str, Any]] = {}
        """Subscription id -> connection id -> (connection, how many times it holds it)."""

    def __len__(self) -> int:
        return len(self._specs)

    def add(self, conn_id: str, conn: Any, specs: Sequence[RowSubscription]) -> tuple[int, ...]:
        """Registers `specs` for a connection and returns their ids, in order. Raises
        InvalidRowSubscription (registering nothing) when the matcher refuses one."""
        scratch = Matcher()
        for index, spec in enumerate(specs):
            if _key(spec) not in self._by_key:
                try:
                    scratch.add_rows(index, spec.event, spec.schema, spec.table, spec.filter)
                except FilterError as e:
                    raise InvalidRowSubscription(index, e) from None
        ids = []
        for spec in specs:
            key = _key(spec)
            sub_id = self._by_key.get(key)
            if sub_id is None:
                sub_id = self._by_key[key] = next(self._ids)
                self.matcher.add_rows(sub_id, spec.event, spec.schema, spec.table, spec.filter)
                self._specs[sub_id] = spec
                self._members[sub_id] = {}
            members = self._members[sub_id]
            held = members.get(conn_id)
            if held is None:
                self._deliverer.subscribe_rows(sub_id, conn.handle)
            members[conn_id] = (conn, 1 if held is None else held[1] + 1)
            ids.append(sub_id)
        return tuple(ids)

    def remove(self, conn_id: str, ids: Iterable[int]) -> None:
        """Releases what `add` returned for the connection; unused entries are dropped."""
        for sub_id in ids:
            members = self._members.get(sub_id)
            if members is None or conn_id not in members:
                continue
            conn, count = members[conn_id]
            if count > 1:
                members[conn_id] = (conn, count - 1)
                continue
            del members[conn_id]
            self._deliverer.unsubscribe_rows(sub_id, conn.handle)
            if not members:
                del self._members[sub_id]
                del self._by_key[_key(self._specs.pop(sub_id))]
                self.matcher.remove(sub_id)

    def truncate_ids(
        self, schema: str, table: str, among: Iterable[int] | None = None
    ) -> list[int]:
        """Subscriptions a TRUNCATE of `schema.table` goes to: those for every event (`*`) on
        the table, whatever their filter (every row is gone). Truncates are rare: a scan."""
        ids = self._specs if among is None else among
        found = []
        for sub_id in ids:
            spec = self._specs[sub_id]
            if spec.event == "*" and spec.schema in ("*", schema) and spec.table in ("*", table):
                found.append(sub_id)
        return sorted(set(found))

    def replay(self, ids: Sequence[int], changes: Sequence[Any]) -> list[list[int]]:
        """For each change kept in history (a `PgChange`, or `TRUNCATE` with its table), the
        ids among `ids` that it matches: a recovering subscriber's replay, filtered."""
        wanted = sorted(set(ids))
        matcher = Matcher()
        for sub_id in wanted:
            spec = self._specs[sub_id]
            matcher.add_rows(sub_id, spec.event, spec.schema, spec.table, spec.filter)
        rows = [c for c in changes if isinstance(c, PgChange)]
        matched = iter(matcher.match_changes(rows))
        # Row events reloaded from a durable history log are RowEvents (pyrt.hub.historylog).
        events = [c for c in changes if isinstance(c, RowEvent)]
        matched_events = iter(matcher.match_rows(events) if events else ())
        out = []
        for change in changes:
            if isinstance(change, tuple):  # (TRUNCATE, schema, table)
                out.append(self.truncate_ids(change[1], change[2], wanted))
            elif isinstance(change, RowEvent):
                out.append(sorted(next(matched_events)))
            else:
                out.append(sorted(next(matched)))
        return out
