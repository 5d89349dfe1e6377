"""Row events and row-change subscriptions of the hub: who wants which changes of which
tables, and publishing the changes a database source reads (`RowEvents`).

A subscription is `(event, schema, table, filter)` (docs/matcher.md). Identical ones are one
entry, with one id, however many connections hold them: the Rust matcher stores each once,
and a row event names the ids it matched hub-wide, so one encoded frame serves every
recipient (a client keeps the ids it was given, as Supabase's clients do). Who holds which
id is kept in the hub's deliverer (`Deliverer.subscribe_rows`); the Rust fan-out delivers row
events without a Python step per recipient. Sans-IO.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
import orjson

from .._core import Matcher, PgChange, RowEvent, parse_filter
from .._errors import FilterError
from ..conflict import Timestamp
from .broker import Broker
from .config import HubStats
from .connection import Connection
from .deliverer import Deliverer
from .history import Publication
from .outbox import SlowConsumerPolicy
from .output import Output
from .protocol import RowSubscription, table_channel

TRUNCATE = "TRUNCATE"
"""The `change` kept in history for a truncate (the matcher has no TRUNCATE events)."""


class InvalidRowSubscription(ValueError):
    """Entry `index` of a join's `changes` was refused by the matcher."""

    def __init__(self, index: int, error: FilterError) -> None:
        super().__init__(f"changes[{index}].filter: {error}")
        self.index = index
        self.reason = error.reason
        self.position = error.position


Columns = frozenset[str] | None
"""The columns a row subscription may see (channel rules' per-role `columns`); None: all."""

_Key = tuple[str, str, str, str, Columns, str]

Shown = tuple[Columns, bool]
"""What a group of subscriptions sees of a row event: its columns (None: all), and whether
its `old_record` is withheld (the old row did not pass their forced filter)."""


def _key(spec: RowSubscription, columns: Columns, forced: str | None) -> _Key:
    return (spec.event, spec.schema, spec.table, spec.filter or "", columns, forced or "")


def project(payload: bytes, columns: Columns, hide_old: bool = False) -> bytes:
    """A row event's JSON with only `columns` kept in `record`, `old_record` and `columns`
    (a role that may not see the others; None: all), and `old_record` emptied when
    `hide_old`. Encoded once per group, not per subscriber."""
    data = orjson.loads(payload)
    if columns is not None:
        for name in ("record", "old_record"):
            row = data.get(name)
            if isinstance(row, dict):
                data[name] = {k: v for k, v in row.items() if k in columns}
        described = data.get("columns")
        if isinstance(described, list):
            data["columns"] = [
                c for c in described if isinstance(c, dict) and c.get("name") in columns
            ]
    if hide_old and "old_record" in data:
        data["old_record"] = {}
    return orjson.dumps(data)


def hidden_column(specs: Sequence[RowSubscription], columns: Columns) -> str | None:
    """The first column a filter of `specs` names that is not among `columns` (None: all
    are, or `columns` is None). A role may not filter on a column it may not see: which rows
    arrive would tell it the column's values. A filter the matcher refuses is left to it."""
    if columns is None:
        return None
    for spec in specs:
        if not spec.filter:
            continue
        try:
            conditions = parse_filter(spec.filter)
        except FilterError:
            continue
        for column, _operator, _negated, _value in conditions:
            if column not in columns:
                return column
    return None


class RowSubscriptions:
    """The row subscriptions of every connection (the hub's Connections: `id`, `handle`),
    with their holders registered in `deliverer`."""

    def __init__(self, deliverer: Deliverer) -> None:
        self.matcher = Matcher()
        self._deliverer = deliverer
        self._ids = itertools.count(1)
        self._by_key: dict[_Key, int] = {}
        self._specs: dict[int, RowSubscription] = {}
        self.columns: dict[int, frozenset[str]] = {}
        """The subscriptions limited to some columns (per-role column rules), by id."""
        self.forced: dict[int, str] = {}
        """The subscriptions with a forced filter (channel rules), by id: the filter."""
        self._forced = Matcher()
        """Their forced filters alone, to tell whether an update's old row passed them."""
        self._members: dict[int, dict[str, Any]] = {}
        """Subscription id -> connection id -> (connection, how many times it holds it)."""

    def __len__(self) -> int:
        return len(self._specs)

    def add(
        self,
        conn_id: str,
        conn: Any,
        specs: Sequence[RowSubscription],
        columns: Columns = None,
        forced: str | None = None,
    ) -> tuple[int, ...]:
        """Registers `specs` for a connection and returns their ids, in order. Raises
        InvalidRowSubscription (registering nothing) when the matcher refuses one. `columns`:
        the only columns these subscriptions' events show (None: all); `forced`: the channel
        rules' filter, already ANDed into each spec's (an update shows the old row only to
        those whose forced filter it passed)."""
        scratch = Matcher()
        for index, spec in enumerate(specs):
            if _key(spec, columns, forced) not in self._by_key:
                try:
                    scratch.add_rows(index, spec.event, spec.schema, spec.table, spec.filter)
                except FilterError as e:
                    raise InvalidRowSubscription(index, e) from None
        ids = []
        for spec in specs:
            key = _key(spec, columns, forced)
            sub_id = self._by_key.get(key)
            if sub_id is None:
                sub_id = self._by_key[key] = next(self._ids)
                self.matcher.add_rows(sub_id, spec.event, spec.schema, spec.table, spec.filter)
                self._specs[sub_id] = spec
                self._members[sub_id] = {}
                if columns is not None:
                    self.columns[sub_id] = columns
                if forced:
                    self.forced[sub_id] = forced
                    self._forced.add_rows(sub_id, "*", spec.schema, spec.table, forced)
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
                spec, columns = self._specs.pop(sub_id), self.columns.pop(sub_id, None)
                forced = self.forced.pop(sub_id, None)
                del self._by_key[_key(spec, columns, forced)]
                self.matcher.remove(sub_id)
                if forced is not None:
                    self._forced.remove(sub_id)

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

    def hidden_old(self, ids: list[int], change: Any) -> frozenset[int]:
        """Those of `ids` that must not see the old row of `change` (a PgChange or RowEvent):
        for an UPDATE that logged the old row (REPLICA IDENTITY FULL, or a changed key), the
        subscriptions with a forced filter the old row did not pass (a row moved into a
        tenant from another shows its new values only). Usually none: no work."""
        forced = self.forced
        if not forced or not isinstance(change, PgChange | RowEvent) or change.type != "UPDATE":
            return frozenset()
        if not any(i in forced for i in ids):
            return frozenset()
        old = change.old_record
        if not old:
            return frozenset()
        event = RowEvent("INSERT", change.schema, change.table, record=old)
        passed = set(self._forced.match_rows([event])[0])
        return frozenset(i for i in ids if i in forced and i not in passed)

    def groups(
        self, ids: list[int], hidden: frozenset[int] = frozenset()
    ) -> list[tuple[Shown, list[int]]]:
        """`ids` (sorted) grouped by what they see (`Shown`): the ones that see everything
        first (one frame each group, encoded once). Empty when `ids` is."""
        limited = self.columns
        if not limited and not hidden:
            return [((None, False), ids)] if ids else []
        groups: dict[Shown, list[int]] = {}
        for sub_id in ids:
            groups.setdefault((limited.get(sub_id), sub_id in hidden), []).append(sub_id)
        return sorted(
            groups.items(), key=lambda g: (g[0] != (None, False), g[0][1], sorted(g[0][0] or ()))
        )


class RowEvents:
    """Row events from database sources, published to their table's channel (history and
    plain joins) and to the row subscriptions they match, as one frame per codec.

    `channels` is the hub's channel matcher, `stamp` its clock, `policy` its slow-consumer
    policy of a channel; `timer` measures what matching costs (a cost, not a clock)."""

    def __init__(
        self,
        subscriptions: RowSubscriptions,
        broker: Broker,
        output: Output,
        channels: Matcher,
        stats: HubStats,
        timer: Callable[[], float],
        stamp: Callable[[], Timestamp],
        policy: Callable[[str], SlowConsumerPolicy],
    ) -> None:
        self.subscriptions = subscriptions
        self.broker = broker
        self._out = output
        self._channels = channels
        self.stats = stats
        self._timer = timer
        self._stamp = stamp
        self._policy = policy

    def publish_change(self, change: PgChange, now: float, max_bytes: int | None) -> Publication:
        """See `Hub.publish_change`."""
        subscriptions = self.subscriptions
        started = self._timer()
        ids = subscriptions.matcher.match_change(change) if len(subscriptions) else []
        self.stats.match_seconds += self._timer() - started
        self.stats.matches += 1
        channel = table_channel(change.schema, change.table)
        return self._publish(channel, change.to_json(max_bytes), change, ids, now)

    def publish_truncate(
        self,
        schema: str,
        table: str,
        now: float,
        commit_timestamp: str | None,
        columns: list[tuple[str, str]] | None,
    ) -> Publication:
        """See `Hub.publish_truncate`."""
        data = {
            "schema": schema,
            "table": table,
            "commit_timestamp": commit_timestamp,
            "type": "TRUNCATE",
            "columns": [{"name": n, "type": t} for n, t in columns or ()],
            "errors": None,
        }
        ids = self.subscriptions.truncate_ids(schema, table)
        channel = table_channel(schema, table)
        return self._publish(channel, orjson.dumps(data), (TRUNCATE, schema, table), ids, now)

    def _publish(
        self, channel: str, payload: bytes, change: Any, ids: list[int], now: float
    ) -> Publication:
        broker, out = self.broker, self._out
        publication = broker.publish(
            channel, orjson.Fragment(payload), now, hlc=self._stamp(), change=change, size=0
        )
        self.stats.publications += 1
        ids.sort()
        subscriptions = self.subscriptions
        groups = subscriptions.groups(ids, subscriptions.hidden_old(ids, change))
        # No group at all when no subscription matched: plain joins still get the row.
        full = groups[0][1] if groups and groups[0][0] == (None, False) else []
        native = out.native.change(publication, full)
        # History counts its `pub` frame, which is this one without `"ids":[...],`.
        broker.charge(publication, len(native) - len(orjson.dumps(full)) - 7)
        # The Rust fan-out finds who holds the ids (and who joined the table's channel: plain
        # joins get every row) and writes the frame to every one it can; the rest come back.
        self._deliver(publication, full, native, channel)
        for (columns, hide_old), group in groups:
            if columns is not None or hide_old:
                # A role limited to some columns, or subscriptions that may not see the old
                # row: a frame of their own, encoded once for the group (plain joins of the
                # channel are refused to such roles).
                data = orjson.Fragment(project(payload, columns, hide_old))
                limited = attrs.evolve(publication, data=data)
                self._deliver(limited, group, out.native.change(limited, group), None)
        return publication

    def _deliver(
        self, publication: Publication, ids: list[int], native: bytes, channel: str | None
    ) -> None:
        out = self._out
        slow, woken, direct, seconds = out.deliverer.publish_rows(
            ids, native, self._channels if channel is not None else None, channel
        )
        self.stats.match_seconds += seconds
        out.count_direct(direct, len(native), woken)
        if slow:
            policy = self._policy(publication.channel)
            out.queue_slow(slow, native, lambda codec: codec.change(publication, ids), policy)

    def replay(
        self,
        conn: Connection,
        row_ids: tuple[int, ...],
        missed: tuple[Publication, ...],
        policy: SlowConsumerPolicy,
    ) -> None:
        """Sends a recovering row subscriber the missed row events its filters match."""
        rows = [p for p in missed if p.change is not None]
        subscriptions = self.subscriptions
        matched = subscriptions.replay(row_ids, [p.change for p in rows])
        for publication, ids in zip(rows, matched, strict=True):
            hidden = subscriptions.hidden_old(ids, publication.change) if ids else frozenset()
            for (columns, hide_old), group in subscriptions.groups(ids, hidden):
                shown = publication
                if columns is not None or hide_old:
                    data = project(orjson.dumps(publication.data), columns, hide_old)
                    shown = attrs.evolve(publication, data=orjson.Fragment(data))
                self._out.send(conn, conn.codec.change(shown, group), policy=policy)
