"""Presence as a delta-state CRDT: an add-wins observed-remove set with dots.

This is the model of Phoenix.Tracker.State. Each hub node is a *replica* with a counter; every
local ``track`` creates a new entry tagged with a *dot* ``(replica, counter)``. Only the replica
that created an entry removes it, so removal is a local act; other replicas learn of it by
merging a snapshot or delta whose *causal context* (the dots it has seen) covers the dot while
its entries lack it. Joins are therefore add-wins, and replicas that have exchanged their
states hold equal states whatever the order, delay or duplication of the exchanges.

The module is sans-IO: no clock, no randomness, no I/O. The hub decides when to ship
``delta()`` to other nodes, when to ship a full ``snapshot()``, and when a node is dead
(``remove_replica``).

Replica names must be unique per incarnation of a node (node name plus a boot id, say): a
restarted node that reused its old name would either have its new entries ignored (their dots
are covered by what the others saw of its previous life) or adopt its previous life's entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import attrs

__all__ = [
    "CausalContext",
    "Dot",
    "Presence",
    "PresenceDiff",
    "PresenceEntry",
    "PresenceMeta",
    "PresenceSnapshot",
    "ReplicaRetiredError",
    "join",
]


class ReplicaRetiredError(RuntimeError):
    """This replica was declared dead by another (``remove_replica``); it cannot track.

    The hub must start a new ``Presence`` under a fresh replica name and track its
    connections' presences again.
    """


class Dot(NamedTuple):
    """The identity of one entry: the replica that created it and that replica's counter."""

    # A NamedTuple rather than an attrs class: dots are dict keys and set members on every
    # merge, and tuples hash and compare in C.
    replica: str
    counter: int

    @property
    def ref(self) -> str:
        """The ref members see for the entry with this dot."""
        return f"{self.replica}:{self.counter}"


def _copy_json(value: Any) -> Any:
    # Deep enough for JSON-like values: the caller may keep mutating what it passed in.
    if isinstance(value, Mapping):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_json(v) for v in value)
    return value


def _frozen_meta(meta: Mapping[str, Any]) -> Mapping[str, Any]:
    # The top level is read-only; nested values stay plain dicts and lists so that the meta
    # can be spread into a JSON object (json.dumps rejects a mappingproxy).
    return MappingProxyType(_copy_json(meta))


@attrs.frozen(slots=True)
class PresenceMeta:
    """One meta as members see it, under its key."""

    ref: str
    """Stable id of the entry (``"replica:counter"``); an update gets a new ref."""
    conn: str
    """The connection that tracked it."""
    meta: Mapping[str, Any] = attrs.field(converter=_frozen_meta, hash=False)
    """The tracked payload (a read-only copy)."""
    prev_ref: str | None = None
    """For an update, the ref of the entry it replaced (Phoenix's ``phx_ref_prev``)."""


@attrs.frozen(slots=True)
class PresenceEntry:
    """One element of the set: a meta of *key* in *topic*, identified by its dot."""

    topic: str
    key: str
    dot: Dot
    presence: PresenceMeta

    def __attrs_post_init__(self) -> None:
        if self.dot.counter < 1:
            raise ValueError(f"dot counter must be positive: {self.dot!r}")
        if self.presence.ref != self.dot.ref:
            raise ValueError(f"ref {self.presence.ref!r} does not match dot {self.dot!r}")


def _vector(pairs: Iterable[tuple[str, int]]) -> tuple[tuple[str, int], ...]:
    return tuple(sorted(pairs))


@attrs.frozen(slots=True)
class CausalContext:
    """The dots a state has seen, in canonical (compacted) form.

    ``vector`` gives, per replica, the highest counter n such that dots 1..n were all seen;
    ``cloud`` holds the dots seen beyond that; ``retired`` names replicas declared dead, all
    of whose dots count as seen, past and future.
    """

    vector: tuple[tuple[str, int], ...] = attrs.field(default=(), converter=_vector)
    cloud: frozenset[Dot] = frozenset()
    retired: frozenset[str] = frozenset()

    def __attrs_post_init__(self) -> None:
        # Canonical form is what makes equality of contexts mean equality of the dot sets.
        vector, cloud = _Context.of(self).canonical()
        if (vector, cloud) != (self.vector, self.cloud):
            raise ValueError(f"causal context is not compacted: {self!r}")

    def covers(self, dot: Dot) -> bool:
        """Whether *dot* has been seen."""
        return _Context.of(self).covers(dot)


@attrs.frozen(slots=True)
class PresenceSnapshot:
    """An immutable state, full or delta: entries plus the context they were observed in."""

    entries: frozenset[PresenceEntry] = frozenset()
    context: CausalContext = attrs.field(factory=CausalContext)

    def __attrs_post_init__(self) -> None:
        context = _Context.of(self.context)
        dots: set[Dot] = set()
        for entry in self.entries:
            if entry.dot in dots:
                raise ValueError(f"two entries share the dot {entry.dot!r}")
            dots.add(entry.dot)
            if entry.dot.replica in context.retired:
                raise ValueError(f"entry of retired replica {entry.dot.replica!r}")
            if not context.covers(entry.dot):
                raise ValueError(f"entry dot {entry.dot!r} is not in the causal context")


@attrs.frozen(slots=True)
class PresenceDiff:
    """What members of one topic must apply: metas that appeared and metas that went away.

    A ref never appears in both ``joins`` and ``leaves`` of one diff, so the two can be
    applied in either order. Metas under a key are ordered as in ``Presence.state``.
    """

    joins: Mapping[str, tuple[PresenceMeta, ...]] = attrs.field(factory=dict)
    leaves: Mapping[str, tuple[PresenceMeta, ...]] = attrs.field(factory=dict)

    def is_empty(self) -> bool:
        """Whether nothing joined and nothing left."""
        return not self.joins and not self.leaves


class _Context:
    """A mutable causal context, kept compacted."""

    __slots__ = ("cloud", "retired", "vector")

    def __init__(self) -> None:
        self.vector: dict[str, int] = {}
        self.cloud: dict[str, set[int]] = {}
        self.retired: set[str] = set()

    @classmethod
    def of(cls, context: CausalContext) -> _Context:
        new = cls()
        new.join(context)
        return new

    def covers(self, dot: Dot) -> bool:
        replica, counter = dot
        if counter <= self.vector.get(replica, 0) or replica in self.retired:
            return True
        cloud = self.cloud.get(replica)
        return cloud is not None and counter in cloud

    def add_all(self, dots: Iterable[Dot]) -> None:
        touched: set[str] = set()
        for replica, counter in dots:
            if replica not in self.retired:
                self.cloud.setdefault(replica, set()).add(counter)
                touched.add(replica)
        for replica in touched:
            self._compact(replica)

    def join(self, other: CausalContext) -> None:
        for replica in other.retired:
            self.retire(replica)
        touched: set[str] = set()
        for replica, counter in other.vector:
            if replica not in self.retired and counter > self.vector.get(replica, 0):
                self.vector[replica] = counter
                touched.add(replica)
        for replica, counter in other.cloud:
            if replica not in self.retired:
                self.cloud.setdefault(replica, set()).add(counter)
                touched.add(replica)
        for replica in touched:
            self._compact(replica)

    def retire(self, replica: str) -> None:
        self.retired.add(replica)
        self.vector.pop(replica, None)
        self.cloud.pop(replica, None)

    def _compact(self, replica: str) -> None:
        cloud = self.cloud.get(replica)
        if cloud is None:
            return
        top = self.vector.get(replica, 0)
        while top + 1 in cloud:
            top += 1
            cloud.remove(top)
        if top:
            self.vector[replica] = top
        if cloud and min(cloud) <= top:
            cloud.difference_update([c for c in cloud if c <= top])
        if not cloud:
            del self.cloud[replica]

    def canonical(self) -> tuple[tuple[tuple[str, int], ...], frozenset[Dot]]:
        """The vector and cloud as CausalContext holds them."""
        cloud = frozenset(
            Dot(replica, counter)
            for replica, counters in self.cloud.items()
            for counter in counters
        )
        return _vector(self.vector.items()), cloud

    def freeze(self) -> CausalContext:
        vector, cloud = self.canonical()
        return CausalContext(vector=vector, cloud=cloud, retired=frozenset(self.retired))


class _DiffBuilder:
    """Collects joined and left entries per topic, then orders them into PresenceDiffs."""

    __slots__ = ("_changes",)

    def __init__(self) -> None:
        self._changes: dict[str, tuple[list[PresenceEntry], list[PresenceEntry]]] = {}

    def join(self, entry: PresenceEntry) -> None:
        self._changes.setdefault(entry.topic, ([], []))[0].append(entry)

    def leave(self, entry: PresenceEntry) -> None:
        self._changes.setdefault(entry.topic, ([], []))[1].append(entry)

    def build(self) -> dict[str, PresenceDiff]:
        return {
            topic: PresenceDiff(joins=_by_key(joins), leaves=_by_key(leaves))
            for topic, (joins, leaves) in self._changes.items()
        }

    def __bool__(self) -> bool:
        return bool(self._changes)

    def build_one(self, topic: str) -> PresenceDiff:
        return self.build().get(topic, PresenceDiff())


def _by_key(entries: Iterable[PresenceEntry]) -> dict[str, tuple[PresenceMeta, ...]]:
    grouped: dict[str, list[PresenceEntry]] = {}
    for entry in entries:
        grouped.setdefault(entry.key, []).append(entry)
    return {
        key: tuple(entry.presence for entry in sorted(group, key=_dot_of))
        for key, group in grouped.items()
    }


def _dot_of(entry: PresenceEntry) -> Dot:
    return entry.dot


class Presence:
    """The presence state of one replica (hub node), across all topics.

    Local changes (``track``, ``untrack``, ``untrack_conn``) and remote ones (``merge``,
    ``remove_replica``) return the diffs members must apply, in the order the calls were
    made, to stay in step with ``state``. Calls that return diffs by topic leave out the
    topics that did not change. Metas under a key are ordered by dot: by replica name, then
    by creation on that replica (so on a single hub, in the order they were tracked).
    """

    __slots__ = (
        "_by_conn",
        "_by_replica",
        "_context",
        "_counts",
        "_delta_from",
        "_delta_removed",
        "_delta_retired",
        "_replica",
        "_topics",
    )

    def __init__(self, replica: str) -> None:
        self._replica = replica
        self._context = _Context()
        # Every entry, by creator and counter: merges look entries up by dot.
        self._by_replica: dict[str, dict[int, PresenceEntry]] = {}
        self._topics: dict[str, dict[str, dict[Dot, PresenceEntry]]] = {}
        self._counts: dict[str, int] = {}
        # This replica's own entries by connection: only they can be untracked here.
        self._by_conn: dict[str, dict[Dot, PresenceEntry]] = {}
        # The pending delta. Own dots above _delta_from are all new since the last delta(),
        # so the delta needs no record of them; only removals of older own entries and
        # retirements are remembered. A hub that never calls delta() keeps nothing.
        self._delta_from = 0
        self._delta_removed: set[int] = set()
        self._delta_retired: set[str] = set()

    @property
    def replica(self) -> str:
        """The name of this replica."""
        return self._replica

    @property
    def retired(self) -> bool:
        """Whether another replica declared this one dead and this one has merged the news."""
        return self._replica in self._context.retired

    # ---------------------------------------------------------------------------------------
    # Local changes
    # ---------------------------------------------------------------------------------------

    def track(
        self,
        topic: str,
        conn: str,
        key: str,
        meta: Mapping[str, Any],
        ref: str | None = None,
    ) -> tuple[str, PresenceDiff]:
        """Add *meta* under *key* in *topic* for *conn*; return its ref and the diff.

        With *ref*, the ref of an entry of *conn* under *key* in *topic* created by this
        replica, the call is an update: that entry leaves and a new one (new ref, ``prev_ref``
        set) joins, in one diff. A *ref* naming no such entry raises KeyError.
        """
        if self.retired:
            raise ReplicaRetiredError(f"replica {self._replica!r} was removed by another replica")
        old: PresenceEntry | None = None
        if ref is not None:
            old = self._own_entry(ref)
            if old is None or (old.topic, old.key, old.presence.conn) != (topic, key, conn):
                raise KeyError(ref)
        dot = self._spend_dot()
        presence = PresenceMeta(
            ref=dot.ref, conn=conn, meta=meta, prev_ref=None if old is None else old.presence.ref
        )
        entry = PresenceEntry(topic=topic, key=key, dot=dot, presence=presence)
        diff = _DiffBuilder()
        if old is not None:
            self._discard(old)
            diff.leave(old)
        self._insert(entry)
        diff.join(entry)
        return presence.ref, diff.build_one(topic)

    def untrack(self, topic: str, conn: str, key: str, ref: str | None = None) -> PresenceDiff:
        """Remove *conn*'s entry *ref* under *key* in *topic*, or all of them if *ref* is None.

        Only entries this replica created are considered; if none match the diff is empty.
        """
        diff = _DiffBuilder()
        for entry in list(self._by_conn.get(conn, {}).values()):
            if entry.topic == topic and entry.key == key and ref in (None, entry.presence.ref):
                self._discard(entry)
                diff.leave(entry)
        if diff:
            self._spend_dot()
        return diff.build_one(topic)

    def untrack_conn(self, conn: str) -> dict[str, PresenceDiff]:
        """Remove every entry of *conn* (it disconnected); return the diffs by topic."""
        diff = _DiffBuilder()
        for entry in list(self._by_conn.get(conn, {}).values()):
            self._discard(entry)
            diff.leave(entry)
        if diff:
            self._spend_dot()
        return diff.build()

    # ---------------------------------------------------------------------------------------
    # Queries
    # ---------------------------------------------------------------------------------------

    def state(self, topic: str) -> dict[str, tuple[PresenceMeta, ...]]:
        """The metas of every key present in *topic*, ordered by dot."""
        return {
            key: tuple(entries[dot].presence for dot in sorted(entries))
            for key, entries in self._topics.get(topic, {}).items()
        }

    def topics(self) -> set[str]:
        """The topics in which someone is present."""
        return set(self._topics)

    def count(self, topic: str) -> int:
        """The number of metas present in *topic*."""
        return self._counts.get(topic, 0)

    def clock(self, replica: str) -> int:
        """The highest n such that this state has seen all changes 1..n of *replica*.

        A replica's own clock counts its changes. When another replica advertises a higher
        clock of its own than this state has for it, a delta was lost (or is still on its
        way): merging a snapshot of it catches up. Unknown and retired replicas give 0.
        """
        return self._context.vector.get(replica, 0)

    # ---------------------------------------------------------------------------------------
    # Replication
    # ---------------------------------------------------------------------------------------

    def snapshot(self) -> PresenceSnapshot:
        """The full state: every entry and the causal context."""
        return PresenceSnapshot(
            entries=frozenset(
                entry for entries in self._by_replica.values() for entry in entries.values()
            ),
            context=self._context.freeze(),
        )

    def delta(self) -> PresenceSnapshot:
        """The changes made here since the last call, as a state to merge elsewhere.

        It holds the entries this replica added since and are still here, and a context that
        covers every dot it spent since (on adds and removals), the dots of its older entries
        it removed since, and the replicas it retired since. Merging it elsewhere does what
        merging a snapshot would do about those changes. Deltas may arrive in any order or
        twice; a lost one shows as a ``clock`` that lags, and a snapshot makes up for it.
        """
        counter = self._context.vector.get(self._replica, 0)
        context = _Context()
        for replica in self._delta_retired:
            context.retire(replica)
        # Retired replicas keep no counter; if this one is retired, so is its delta.
        if not self.retired:
            counters = (*self._delta_removed, *range(self._delta_from + 1, counter + 1))
            context.add_all(Dot(self._replica, c) for c in counters)
        own = self._by_replica.get(self._replica, {})
        entries = frozenset(own[c] for c in range(self._delta_from + 1, counter + 1) if c in own)
        self._delta_from = counter
        self._delta_removed = set()
        self._delta_retired = set()
        return PresenceSnapshot(entries=entries, context=context.freeze())

    def merge(self, other: PresenceSnapshot) -> dict[str, PresenceDiff]:
        """Join *other* (a snapshot or delta of any replica) into this state; return the diffs.

        Merging a state whose changes are all here already (the same one again, say) changes
        nothing.
        """
        # Entries to add are those *other* has and this state has not seen, judged by this
        # state's context before the join.
        added = [entry for entry in other.entries if not self._context.covers(entry.dot)]
        # Entries to remove are those *other* has seen but no longer has: their creator
        # removed them, or *other* retired their creator.
        other_dots = {entry.dot for entry in other.entries}
        removed = [
            entry for entry in self._covered_entries(other.context) if entry.dot not in other_dots
        ]
        diff = _DiffBuilder()
        for entry in removed:
            self._discard(entry)
            diff.leave(entry)
        for entry in added:
            self._insert(entry)
            diff.join(entry)
        self._context.join(other.context)
        return diff.build()

    def remove_replica(self, replica: str) -> dict[str, PresenceDiff]:
        """Drop every entry of the dead *replica*, now and whenever they arrive later.

        The replica is retired for good: its dots count as seen, so stale snapshots cannot
        bring its entries back, and merging this state elsewhere removes them there too.
        """
        if replica == self._replica:
            raise ValueError("a replica cannot remove itself")
        diff = _DiffBuilder()
        for entry in list(self._by_replica.get(replica, {}).values()):
            self._discard(entry)
            diff.leave(entry)
        if replica not in self._context.retired:
            self._context.retire(replica)
            self._delta_retired.add(replica)
            self._spend_dot()
        return diff.build()

    # ---------------------------------------------------------------------------------------
    # Indexes
    # ---------------------------------------------------------------------------------------

    def _spend_dot(self) -> Dot:
        # Every local change spends a dot, removals included: then each delta that changes
        # anything advances this replica's clock, and a replica that missed one can tell
        # (``clock``), as Phoenix.Tracker does. A retired replica has no clock to advance.
        counter = self._context.vector.get(self._replica, 0) + 1
        if not self.retired:
            self._context.vector[self._replica] = counter
        return Dot(self._replica, counter)

    def _own_entry(self, ref: str) -> PresenceEntry | None:
        replica, _, counter = ref.rpartition(":")
        if replica != self._replica or not counter.isdecimal():
            return None
        entry = self._by_replica.get(replica, {}).get(int(counter))
        # "r:007" parses to the entry "r:7".
        return entry if entry is not None and entry.presence.ref == ref else None

    def _covered_entries(self, context: CausalContext) -> list[PresenceEntry]:
        """The entries of this state whose dots *context* covers."""
        covered: list[PresenceEntry] = []
        for replica in context.retired:
            covered.extend(self._by_replica.get(replica, {}).values())
        for replica, top in context.vector:
            if replica not in context.retired:
                entries = self._by_replica.get(replica, {})
                covered.extend(entry for c, entry in entries.items() if c <= top)
        for replica, counter in context.cloud:
            entry = self._by_replica.get(replica, {}).get(counter)
            if entry is not None:
                covered.append(entry)
        return covered

    def _insert(self, entry: PresenceEntry) -> None:
        replica, counter = entry.dot
        self._by_replica.setdefault(replica, {})[counter] = entry
        self._topics.setdefault(entry.topic, {}).setdefault(entry.key, {})[entry.dot] = entry
        self._counts[entry.topic] = self._counts.get(entry.topic, 0) + 1
        if replica == self._replica:
            self._by_conn.setdefault(entry.presence.conn, {})[entry.dot] = entry

    def _discard(self, entry: PresenceEntry) -> None:
        replica, counter = entry.dot
        _pop_nested(self._by_replica, replica, counter)
        keys = self._topics[entry.topic]
        _pop_nested(keys, entry.key, entry.dot)
        if keys:
            self._counts[entry.topic] -= 1
        else:
            del self._topics[entry.topic]
            del self._counts[entry.topic]
        if replica == self._replica:
            _pop_nested(self._by_conn, entry.presence.conn, entry.dot)
            if counter <= self._delta_from:
                self._delta_removed.add(counter)


def _pop_nested(outer: dict[Any, dict[Any, Any]], key: Any, inner_key: Any) -> None:
    # Empty inner dicts are dropped so that departed topics, keys and conns leave nothing.
    inner = outer[key]
    del inner[inner_key]
    if not inner:
        del outer[key]


def join(a: PresenceSnapshot, b: PresenceSnapshot) -> PresenceSnapshot:
    """The lattice join of two states: what either has added that the other has not removed."""
    a_context, b_context = _Context.of(a.context), _Context.of(b.context)
    a_dots = {entry.dot for entry in a.entries}
    b_dots = {entry.dot for entry in b.entries}
    entries = {
        entry for entry in a.entries if entry.dot in b_dots or not b_context.covers(entry.dot)
    }
    entries.update(
        entry for entry in b.entries if entry.dot not in a_dots and not a_context.covers(entry.dot)
    )
    a_context.join(b.context)
    return PresenceSnapshot(entries=frozenset(entries), context=a_context.freeze())
