"""Conflict resolution for records edited concurrently: hybrid logical clocks, versioned
records, per-channel policies, and the client's optimistic store.

A *records channel* holds keyed records (JSON objects). Clients change them with mutations
(`set`, `patch`, `delete`), each carrying the version it was based on and, optionally, the
client's own timestamp; the channel's policy decides what a mutation does to the record:

- `RejectOnConflict` ("reject"): optimistic concurrency. A mutation applies only if the record
  is still at the version it was based on; otherwise it is refused with the current record.
- `LastWriterWins` ("lww"): the write with the latest timestamp wins the whole record.
- `FieldMerge` ("merge"): last writer wins per field, so edits of different fields all survive.
- `CustomResolver`: your function decides (from the current record and the mutation).

Timestamps are hybrid logical clock readings (`HybridClock`, `Timestamp`): close to wall time,
monotonic per node, ordered consistently with causality, and comparable across nodes.

The server side is `RecordStore` (one per channel, driven by the hub); the client side is
`OptimisticStore`: confirmed records plus a queue of pending writes applied on top with the same
policy code the server runs, so a view is always "confirmed + pending", never a patched copy.

Everything here is sans-IO: time comes in as arguments, nothing reads a clock or a socket.
docs/conflicts.md explains the model with a worked example.
"""

from __future__ import annotations

import abc
import enum
import functools
import hashlib
import itertools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeAlias

import attrs
import orjson

__all__ = [
    "ClockDriftError",
    "ConflictPolicy",
    "CustomResolver",
    "FieldMerge",
    "HybridClock",
    "LastWriterWins",
    "Mutation",
    "Op",
    "OptimisticStore",
    "Outcome",
    "PendingWrite",
    "Record",
    "RecordStats",
    "RecordStore",
    "RejectOnConflict",
    "Rejection",
    "Resolver",
    "Result",
    "StoreUpdate",
    "Timestamp",
    "origin_tag",
    "policy_named",
]

# -- hybrid logical clocks ----------------------------------------------------------------------

_WALL_DIGITS = 13  # milliseconds since 1970 fit in 13 digits until the year 2286
_LOGICAL_DIGITS = 5
_LOGICAL_LIMIT = 10**_LOGICAL_DIGITS
_NODE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_WALL_LIMIT = 10**_WALL_DIGITS


@functools.lru_cache(maxsize=4096)
def _check_node(node: str) -> None:
    # Cached: a hub stamps every publication with its own name, again and again.
    if not isinstance(node, str) or not _NODE.fullmatch(node):
        raise ValueError(f"node name must be 1-64 of [A-Za-z0-9._:-], not {node!r}")


# ASCII digits only: `\d` alone also matches other scripts' digits ("١٧١٨..."), which int()
# reads, so two texts would decode to one timestamp.
_ENCODED = re.compile(
    rf"(\d{{{_WALL_DIGITS}}})\.(\d{{{_LOGICAL_DIGITS}}})\.([A-Za-z0-9._:-]{{1,64}})", re.ASCII
)


@attrs.frozen(slots=True, order=True)
class Timestamp:
    """A hybrid logical clock reading: wall time in ms, a logical counter, the node's name.

    Ordered by (wall, logical, node), a total order in which two readings of different nodes
    never tie. `encode()` gives a fixed-width string that sorts the same way (so a browser can
    compare timestamps as strings): `"1718000000000.00003.n1"`.
    """

    wall: int
    logical: int
    node: str

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.wall < _WALL_LIMIT:
            raise ValueError(f"wall time out of range: {self.wall}")
        if not 0 <= self.logical < _LOGICAL_LIMIT:
            raise ValueError(f"logical counter out of range: {self.logical}")
        _check_node(self.node)

    def encode(self) -> str:
        # Every publication's stamp is encoded: %-formatting is the fastest way here.
        return "%013d.%05d.%s" % (self.wall, self.logical, self.node)  # noqa: UP031

    @classmethod
    def decode(cls, text: str) -> Timestamp:
        """The inverse of `encode`; ValueError for anything else."""
        match = _ENCODED.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a timestamp: {str(text)[:80]!r}")
        return cls(int(match[1]), int(match[2]), match[3])

    def __str__(self) -> str:
        return self.encode()


class ClockDriftError(ValueError):
    """A remote timestamp is further ahead of this node's wall clock than `max_drift` allows."""

    def __init__(self, remote: Timestamp, physical: int, max_drift: int) -> None:
        super().__init__(
            f"timestamp {remote} is {remote.wall - physical} ms ahead of the local clock "
            f"(at most {max_drift} ms allowed)"
        )
        self.remote = remote


class HybridClock:
    """A hybrid logical clock (Kulkarni et al., 2014) for one node.

    `now(physical)` stamps a local event or a message to send; `update(remote, physical)`
    stamps the receipt of a message stamped `remote`. Every reading is greater than the
    previous one (even when the wall clock goes back) and greater than every remote reading
    it has seen, so timestamps respect causality; the wall part stays within the largest
    physical time seen (local or remote). `physical` is wall time in ms, passed in.

    With `max_drift` (ms), `update` refuses remote readings further ahead than that of the
    local wall clock (`ClockDriftError`), so one node with a wrong clock cannot drag
    everybody's clocks into the future.
    """

    def __init__(self, node: str, *, max_drift: int | None = None) -> None:
        Timestamp(0, 0, node)  # checks the name
        self.node = node
        self.max_drift = max_drift
        self._wall = 0
        self._logical = 0
        self._last: Timestamp | None = None

    @property
    def last(self) -> Timestamp | None:
        """The latest reading, None before the first."""
        return self._last

    def now(self, physical: int) -> Timestamp:
        wall = max(self._wall, physical)
        logical = self._logical + 1 if wall == self._wall else 0
        return self._set(wall, logical)

    def update(self, remote: Timestamp, physical: int) -> Timestamp:
        if self.max_drift is not None and remote.wall - physical > self.max_drift:
            raise ClockDriftError(remote, physical, self.max_drift)
        return self._merge(remote, physical)

    def observe(self, remote: Timestamp) -> Timestamp:
        """`update` without a wall clock reading (and so without the drift check): moves the
        clock past `remote` so later readings are causally after it."""
        return self._merge(remote, 0)

    def _merge(self, remote: Timestamp, physical: int) -> Timestamp:
        old = self._wall
        wall = max(old, remote.wall, physical)
        if wall == old == remote.wall:
            logical = max(self._logical, remote.logical) + 1
        elif wall == old:
            logical = self._logical + 1
        elif wall == remote.wall:
            logical = remote.logical + 1
        else:
            logical = 0
        return self._set(wall, logical)

    def _set(self, wall: int, logical: int) -> Timestamp:
        if logical >= _LOGICAL_LIMIT:
            # The counter is full (a wall clock stuck for 100k events in one millisecond):
            # borrow the next millisecond, which keeps every promise but closeness to wall time.
            wall, logical = wall + 1, 0
        if wall >= _WALL_LIMIT:
            raise ValueError(f"wall time out of range: {wall}")
        self._wall, self._logical = wall, logical
        self._last = _trusted(wall, logical, self.node)
        return self._last


_new = object.__new__
_set_attribute = object.__setattr__


def _trusted(wall: int, logical: int, node: str) -> Timestamp:
    """A Timestamp without the checks, for a clock's own readings (in range by construction,
    its node checked once): the hub takes one for every publication, and the checks would
    double the cost."""
    stamp: Timestamp = _new(Timestamp)
    _set_attribute(stamp, "wall", wall)
    _set_attribute(stamp, "logical", logical)
    _set_attribute(stamp, "node", node)
    return stamp


def _after(a: Timestamp | None, b: Timestamp | None) -> bool:
    """a > b, where None is before everything."""
    return a is not None and (b is None or a > b)


def _newest(a: Timestamp | None, b: Timestamp | None) -> Timestamp | None:
    return a if _after(a, b) or b is None else b


# -- records and mutations ----------------------------------------------------------------------


class Op(enum.Enum):
    """What a mutation does to a record's value."""

    SET = "set"
    """Replace the whole value (creating the record if it does not exist)."""
    PATCH = "patch"
    """Set the given fields, keep the others (creating the record if it does not exist)."""
    DELETE = "delete"
    """Delete the record (it stays as a tombstone: `value` None, with a version)."""


def _canonical(value: Any) -> bytes:
    """A total order between JSON values, for breaking ties between equal timestamps."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@attrs.frozen(slots=True)
class Record:
    """One record of a records channel, as the server holds it and clients receive it.

    `value` is the record's JSON object, None when it does not exist (never written, or
    deleted: a tombstone). `version` is the server's timestamp of its last change (its
    `updated_at`): it changes on every change and only grows, and a mutation names the version
    it was based on. The other fields are the policy's bookkeeping: `written` is the timestamp
    of the write that won (last-writer-wins) or of the record's existence (field merge);
    `fields` the timestamp of each field of `value` and `cleared` the last `set` or `delete`
    (field merge).
    """

    key: str
    value: Mapping[str, Any] | None = None
    version: Timestamp | None = None
    written: Timestamp | None = None
    fields: Mapping[str, Timestamp] = attrs.field(factory=dict)
    cleared: Timestamp | None = None

    @property
    def exists(self) -> bool:
        return self.value is not None

    def same_state(self, other: Record) -> bool:
        """Equal in everything but `version`: a write that leaves this is no change."""
        return (
            self.value == other.value
            and self.written == other.written
            and self.fields == other.fields
            and self.cleared == other.cleared
        )


@attrs.frozen(slots=True)
class Mutation:
    """A client's change to one record.

    `base` is the version of the record the client saw when it made the change (None: it saw
    no record). `hlc` is the client's timestamp for the write (None: the server stamps it).
    `origin` and `seq` together are the idempotency key: a mutation with a key the server has
    processed is never applied again, however often it is sent. Keep `origin` secret: the
    server publishes only its `origin_tag`.
    """

    key: str
    op: Op
    value: Mapping[str, Any] | None = None
    base: Timestamp | None = None
    hlc: Timestamp | None = None
    origin: str | None = None
    seq: int | None = None

    def __attrs_post_init__(self) -> None:
        if (self.value is None) != (self.op is Op.DELETE):
            raise ValueError("set and patch need a value; delete takes none")

    def written_value(self, current: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The value this mutation writes over `current`, if nothing else is in the way."""
        if self.op is Op.DELETE:
            return None
        assert self.value is not None
        if self.op is Op.PATCH:
            return {**(current or {}), **self.value}
        return dict(self.value)


@attrs.frozen(slots=True)
class Rejection:
    """A policy's (or resolver's) refusal of a mutation; `reason` goes back to the client."""

    reason: str


class Outcome(enum.Enum):
    """What became of a mutation."""

    APPLIED = "applied"
    """It changed the record."""
    UNCHANGED = "unchanged"
    """It was processed and changed nothing (it lost a last-writer-wins race, say)."""
    REJECTED = "rejected"
    """The policy refused it (conflict): it left no trace."""
    FAILED = "failed"
    """The server refused the command itself (a bad request, a channel not joined...)."""
    UNKNOWN = "unknown"
    """The client gave up re-sending it before hearing back: it may or may not have applied."""


@attrs.frozen(slots=True)
class Result:
    """A mutation's outcome, with the record as it was right after it was processed."""

    outcome: Outcome
    record: Record | None = None
    message: str = ""
    code: int | None = None
    """The protocol's error code for REJECTED (412) and FAILED outcomes."""


# -- policies -----------------------------------------------------------------------------------


class ConflictPolicy(abc.ABC):
    """How a records channel decides what a mutation does. Subclass it for your own, or give
    a function to `CustomResolver`.

    `apply` returns the record after the mutation (the caller sets its `version`) or a
    `Rejection`. `stamp` is the write's timestamp: the client's `hlc` when the server accepted
    it, else a fresh server timestamp. Returning a record in the same state (`same_state`) as
    `current` means "processed, no change".
    """

    name: str = ""
    cascades: bool = False
    """Whether a client's later writes of a record, made on top of a write that was refused,
    are refused with it (True) or rebased onto the record as it is (False)."""

    @abc.abstractmethod
    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        """The record after `mutation`, or a rejection."""

    def write(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record:
        """The record after an authoritative write (a row changed in the database), which
        no policy check stands in the way of; `stamp` is newer than anything in `current`."""
        return Record(current.key, mutation.written_value(current.value))


class RejectOnConflict(ConflictPolicy):
    """Optimistic concurrency: a mutation applies only to the version it was based on.

    `base` must be the record's current version, or None when the record does not exist (to
    create it). Anything else is refused; the refusal carries the current record, so the
    client can show it and let the user try again.
    """

    name = "reject"
    cascades = True

    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        if mutation.base != current.version and not (mutation.base is None and not current.exists):
            based = "no record" if mutation.base is None else f"version {mutation.base}"
            now = f"version {current.version}" if current.exists else "deleted"
            return Rejection(f"conflict: based on {based}, the record is at {now}")
        return self.write(current, mutation, stamp)


class LastWriterWins(ConflictPolicy):
    """The write with the latest timestamp decides the whole record.

    A patch writes the current value with its fields changed, stamped with its timestamp: if
    a later write already happened, the patch loses as a whole. Ties (impossible between
    timestamps of real clocks) go to the larger value, so `merge` is a semilattice join.
    """

    name = "lww"

    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        return self.merge(current, self.write(current, mutation, stamp))

    def write(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record:
        return Record(current.key, mutation.written_value(current.value), written=stamp)

    @staticmethod
    def merge(a: Record, b: Record) -> Record:
        """The record both replicas agree on: commutative, associative and idempotent."""
        winner = a if _lww_rank(a) >= _lww_rank(b) else b
        version = _newest(a.version, b.version)
        return winner if winner.version == version else attrs.evolve(winner, version=version)


def _lww_rank(record: Record) -> tuple[bool, Timestamp | None, bool, bytes]:
    written = record.written
    return (written is not None, written, record.exists, _canonical(record.value))


class FieldMerge(ConflictPolicy):
    """Last writer wins per field: concurrent edits of different fields all survive.

    A record's state is an existence flag with its timestamp (`written`), a timestamp per
    field (`fields`) and the time of the last `set` or `delete` (`cleared`), before which
    fields are gone. A `set` stamps every field it writes and clears the rest; a `patch`
    stamps only its fields; a `delete` clears everything. Two states merge field by field,
    so applying the same writes in any order gives the same record.
    """

    name = "merge"

    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        return self.merge(current, self.write(current, mutation, stamp))

    def write(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record:
        key, value = current.key, mutation.value
        if mutation.op is Op.DELETE:
            state = Record(key, None, written=stamp, cleared=stamp)
        else:
            assert value is not None
            fields = dict.fromkeys(value, stamp)
            cleared = stamp if mutation.op is Op.SET else None
            state = Record(key, dict(value), written=stamp, fields=fields, cleared=cleared)
        return self.merge(current, state)

    @staticmethod
    def merge(a: Record, b: Record) -> Record:
        """The record both replicas agree on: commutative, associative and idempotent."""
        alive_a = (a.written is not None, a.written, a.exists)
        alive_b = (b.written is not None, b.written, b.exists)
        existence = a if alive_a >= alive_b else b
        cleared = _newest(a.cleared, b.cleared)
        version = _newest(a.version, b.version)
        if not existence.exists:
            return Record(a.key, None, version, existence.written, {}, cleared)
        value: dict[str, Any] = {}
        stamps: dict[str, Timestamp] = {}
        for name in sorted({*a.fields, *b.fields}):
            candidates = [
                (r.fields[name], _canonical(r.value[name]), r.value[name])
                for r in (a, b)
                if name in r.fields and r.value is not None and name in r.value
            ]
            stamp, _, field_value = max(candidates, key=lambda c: (c[0], c[1]))
            if cleared is None or stamp >= cleared:
                stamps[name] = stamp
                value[name] = field_value
        return Record(a.key, value, version, existence.written, stamps, cleared)


Resolver: TypeAlias = Callable[[Record, Mutation], Mapping[str, Any] | Rejection | None]
"""A user function deciding a mutation: given the current record (`value` None if it does not
exist) and the mutation, return the record's new value (None deletes it) or a `Rejection`."""


class CustomResolver(ConflictPolicy):
    """A policy that asks your function (a `Resolver`)."""

    def __init__(self, resolve: Resolver, name: str = "custom") -> None:
        self.resolve = resolve
        self.name = name

    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        decided = self.resolve(current, mutation)
        if isinstance(decided, Rejection):
            return decided
        if decided is not None and not isinstance(decided, Mapping):
            raise TypeError(f"a resolver returns a mapping, None or a Rejection, not {decided!r}")
        return Record(current.key, None if decided is None else dict(decided))


class _Optimistic(ConflictPolicy):
    """What a client predicts for a server policy it cannot run (a resolver on the server):
    the write as written. The server's answer corrects the view."""

    name = "optimistic"

    def apply(self, current: Record, mutation: Mutation, stamp: Timestamp) -> Record | Rejection:
        return self.write(current, mutation, stamp)


_BUILTIN: dict[str, Callable[[], ConflictPolicy]] = {
    "reject": RejectOnConflict,
    "lww": LastWriterWins,
    "merge": FieldMerge,
}


def policy_named(
    name: str, resolvers: Mapping[str, Resolver | ConflictPolicy] | None = None
) -> ConflictPolicy:
    """The built-in policy `name` ("reject", "lww", "merge") or the resolver of that name."""
    if name in _BUILTIN:
        return _BUILTIN[name]()
    found = (resolvers or {}).get(name)
    if found is None:
        known = ", ".join([*_BUILTIN, *(resolvers or {})])
        raise ValueError(f"no conflict policy or resolver named {name!r} (known: {known})")
    if isinstance(found, ConflictPolicy):
        return found
    return CustomResolver(found, name)


def origin_tag(origin: str) -> str:
    """What publications show of an origin: its SHA-256, 32 hex digits. The origin itself
    stays between a client and the hub, so nobody who sees publications can send mutations
    under it (and have the client's own writes refused as duplicates)."""
    return hashlib.sha256(origin.encode()).hexdigest()[:32]


# -- the server's records -----------------------------------------------------------------------


_OUTCOMES_PER_ORIGIN = 256
"""Replies remembered per origin, to answer a re-sent mutation as the first time. A client
keeps at most half as many mutations in flight, so a re-sent one's reply is always here."""
_SPARSE_LIMIT = 4096


@attrs.define(slots=True)
class _OriginLog:
    """The sequence numbers of one origin the store has processed, and recent replies."""

    last_used: float
    upto: int = 0
    """Every seq up to this one was processed."""
    above: set[int] = attrs.field(factory=set)
    replies: OrderedDict[int, Any] = attrs.field(factory=OrderedDict)

    def processed(self, seq: int) -> bool:
        return seq <= self.upto or seq in self.above

    def mark(self, seq: int, reply: Any) -> None:
        self.above.add(seq)
        while self.upto + 1 in self.above:
            self.upto += 1
            self.above.discard(self.upto)
        if len(self.above) > _SPARSE_LIMIT:
            # A client skipping sequence numbers: count the skipped ones as processed. Wrong
            # only in the safe direction (refusing a mutation, never applying one twice).
            self.upto = max(self.above)
            self.above.clear()
        self.replies[seq] = reply
        while len(self.replies) > _OUTCOMES_PER_ORIGIN:
            self.replies.popitem(last=False)


@attrs.define(slots=True)
class RecordStats:
    """What a `RecordStore` did, for metrics; the counters only grow."""

    applied: int = 0
    """Mutations that changed a record."""
    unchanged: int = 0
    """Mutations processed without effect (a lost last-writer-wins race, say)."""
    rejected: int = 0
    """Mutations the policy refused (conflicts)."""
    duplicates: int = 0
    """Mutations received again with an idempotency key already processed (not applied)."""
    compacted: int = 0
    """Tombstones forgotten by `compact`."""


class RecordStore:
    """The records of one channel on the server, under one policy, with idempotency.

    The hub owns one per records channel: it stamps versions, publishes changes and remembers
    replies; this class decides and keeps state.

    Deleted records stay as tombstones until `compact` forgets them. The store then remembers
    one timestamp, `forgotten`: the newest version of a tombstone it forgot. A record it holds
    nothing for reads as a tombstone at that version (the policy's own tombstone, stamped
    `forgotten`): at least as new as any tombstone forgotten for that key, so whatever a
    forgotten tombstone refused is still refused (a mutation based on a version the store
    forgot is a conflict; a write stamped before a forgotten delete loses), and never less.
    """

    def __init__(self, policy: ConflictPolicy) -> None:
        self.policy = policy
        self._records: dict[str, Record] = {}
        self._tombstones: dict[str, Timestamp] = {}
        """Key -> version of every record held that does not exist (deleted)."""
        self._origins: dict[str, _OriginLog] = {}
        self._source_versions: dict[str, int] = {}
        self.forgotten: Timestamp | None = None
        """The newest version of a tombstone `compact` forgot (None: none forgotten)."""
        self.stats = RecordStats()

    def __len__(self) -> int:
        return len(self._records)

    @property
    def tombstones(self) -> int:
        """How many of the records held are tombstones."""
        return len(self._tombstones)

    def get(self, key: str) -> Record:
        """The record `key` (with `value` None if it does not exist)."""
        record = self._records.get(key)
        if record is not None:
            return record
        if self.forgotten is None:
            return Record(key)
        # Nothing held: it never existed, or its tombstone was forgotten. Read it as the
        # newest tombstone forgotten, which refuses at least what the forgotten one would.
        deleted = self.policy.write(Record(key), Mutation(key, Op.DELETE), self.forgotten)
        return attrs.evolve(deleted, key=key, version=self.forgotten)

    def records(self) -> list[Record]:
        """Every record, tombstones included, by key."""
        return [self._records[key] for key in sorted(self._records)]

    def apply(self, mutation: Mutation, version: Timestamp) -> Result:
        """Applies a client's mutation under the policy; a change gets `version`."""
        current = self.get(mutation.key)
        stamp = mutation.hlc or version
        decided = self.policy.apply(current, mutation, stamp)
        if isinstance(decided, Rejection):
            self.stats.rejected += 1
            return Result(Outcome.REJECTED, current, decided.reason, 412)
        if decided.same_state(current):
            self.stats.unchanged += 1
            return Result(Outcome.UNCHANGED, current)
        record = attrs.evolve(decided, key=mutation.key, version=version)
        self._put(record)
        self.stats.applied += 1
        return Result(Outcome.APPLIED, record)

    def write(
        self,
        key: str,
        value: Mapping[str, Any] | None,
        version: Timestamp,
        *,
        source_version: int | None = None,
    ) -> Record | None:
        """An authoritative change (from the database): it replaces the record whatever the
        policy. Returns the new record, or None when nothing changed: the value is the same,
        or `source_version` is not newer than the last one written for `key` (a replay)."""
        if source_version is not None:
            last = self._source_versions.get(key)
            if last is not None and source_version <= last:
                return None
            self._source_versions[key] = source_version
        current = self.get(key)
        if current.value == value:
            return None
        op = Op.DELETE if value is None else Op.SET
        decided = self.policy.write(current, Mutation(key, op, value), version)
        record = attrs.evolve(decided, key=key, version=version)
        self._put(record)
        return record

    def _put(self, record: Record) -> None:
        key = record.key
        self._records[key] = record
        self._tombstones.pop(key, None)
        if record.value is None:
            assert record.version is not None
            self._tombstones[key] = record.version

    def compact(self, before: float) -> int:
        """Forgets the tombstones whose version is older than `before` (wall time in ms);
        returns how many. What the store answers for them afterwards is in the class doc.
        The source versions of `write` are kept (a few bytes a key), so a source replaying
        an old change cannot bring a forgotten row back."""
        old = [(key, v) for key, v in self._tombstones.items() if v.wall < before]
        for key, version in old:
            del self._records[key]
            del self._tombstones[key]
            self.forgotten = _newest(self.forgotten, version)
        self.stats.compacted += len(old)
        return len(old)

    def recall(self, origin: str, seq: int, now: float) -> tuple[bool, Any]:
        """Whether (origin, seq) was processed, and the reply remembered for it (or None)."""
        log = self._origins.get(origin)
        if log is None or not log.processed(seq):
            return False, None
        log.last_used = now
        self.stats.duplicates += 1
        return True, log.replies.get(seq)

    def remember(self, origin: str, seq: int, reply: Any, now: float) -> None:
        log = self._origins.get(origin)
        if log is None:
            log = self._origins[origin] = _OriginLog(now)
        log.last_used = now
        log.mark(seq, reply)

    def expire(self, now: float, ttl: float) -> None:
        """Forgets origins that sent nothing for `ttl` seconds."""
        for origin, log in list(self._origins.items()):
            if now - log.last_used >= ttl:
                del self._origins[origin]

    @property
    def origins(self) -> int:
        return len(self._origins)


# -- the client's optimistic store --------------------------------------------------------------


@attrs.define(eq=False)
class PendingWrite:
    """A mutation made locally and not yet resolved by the server."""

    number: int
    key: str
    op: Op
    value: Mapping[str, Any] | None
    stamp: Timestamp
    base: Timestamp | None
    chained: bool
    """Made on top of an earlier pending write of the same record: held back until that one
    resolves, then based on the version it produced."""
    seq: int | None = None
    """Its sequence number, given when first sent (so sequence numbers follow sending order)."""
    first_sent: float | None = None
    on_link: bool = False
    """Sent on the current connection (else it is re-sent when the store is next online)."""
    result: Result | None = None

    @property
    def done(self) -> bool:
        return self.result is not None

    def mutation(self, origin: str | None = None) -> Mutation:
        return Mutation(self.key, self.op, self.value, self.base, self.stamp, origin, self.seq)


@attrs.frozen(slots=True)
class StoreUpdate:
    """What an input changed: keys whose view changed, and writes that got their result."""

    keys: frozenset[str] = frozenset()
    resolved: tuple[PendingWrite, ...] = ()

    def __or__(self, other: StoreUpdate) -> StoreUpdate:
        return StoreUpdate(self.keys | other.keys, self.resolved + other.resolved)


class OptimisticStore:
    """A client's records of one channel: confirmed state plus pending writes on top.

    `mutate` records a write and updates the view at once. `take_outgoing` hands out the
    mutations to send (re-sends first, in sequence order); the server's record changes come
    in through `receive` (a change that is one of ours confirms it), its replies through
    `replied`, and a snapshot through `reset`. The view of a record is always its confirmed
    state with the pending writes applied in order by the channel's policy; a rejected write
    simply leaves the queue, and the writes after it are applied again on what is there
    ("rebased"). Under a cascading policy (reject on conflict) a write made on top of a
    refused one is refused with it: the state it was based on never existed.

    Writes of one record go one at a time (the next is sent when the previous is resolved),
    so each is based on a version that exists; writes of different records overlap, up to
    `max_in_flight`. A write sent and not answered is sent again, with the same idempotency
    key, each time the store is back online, for up to `resend_window` seconds after it was
    first sent; then it is given up (UNKNOWN). Keep `resend_window` under the server's
    `mutation_ttl` (the server remembers processed keys that long).
    """

    def __init__(
        self,
        origin: str,
        policy: ConflictPolicy | None = None,
        *,
        clock: HybridClock | None = None,
        max_in_flight: int = _OUTCOMES_PER_ORIGIN // 2,
        resend_window: float = 1800.0,
    ) -> None:
        if not 1 <= max_in_flight <= _OUTCOMES_PER_ORIGIN // 2:
            raise ValueError(f"max_in_flight must be 1..{_OUTCOMES_PER_ORIGIN // 2}")
        self.origin = origin
        self.tag = origin_tag(origin)
        """How the hub's publications name this store's writes."""
        self.policy = policy or _Optimistic()
        # Not the origin as the clock's name: timestamps are public, the origin is not.
        self.clock = clock or HybridClock(self.tag[:16])
        self.max_in_flight = max_in_flight
        self.resend_window = resend_window
        self.online = False
        self._confirmed: dict[str, Record] = {}
        self._floor: Timestamp | None = None
        """The snapshot's `forgotten`: a record it did not list is absent at least up to this
        version (its tombstone was forgotten, or it never existed)."""
        self._pending: list[PendingWrite] = []
        self._by_seq: dict[int, PendingWrite] = {}
        self._view: dict[str, Record] = {}
        self._numbers = itertools.count(1)
        self._seqs = itertools.count(1)

    # -- reading --------------------------------------------------------------------------------

    @property
    def view(self) -> dict[str, Mapping[str, Any]]:
        """Key -> value of every record that exists in the view (confirmed + pending)."""
        return {
            key: record.value
            for key, record in sorted(self._view.items())
            if record.value is not None
        }

    def record(self, key: str) -> Record:
        """The record as the view shows it (`value` None if it does not exist)."""
        return self._view.get(key) or Record(key)

    @property
    def confirmed(self) -> Mapping[str, Record]:
        return self._confirmed

    @property
    def pending(self) -> tuple[PendingWrite, ...]:
        return tuple(self._pending)

    # -- local writes ---------------------------------------------------------------------------

    def mutate(
        self, key: str, op: Op, value: Mapping[str, Any] | None, physical: int
    ) -> tuple[PendingWrite, StoreUpdate]:
        """A local write: queued, applied to the view at once. `physical`: wall time in ms."""
        Mutation(key, op, value)  # checks op and value agree
        chained = any(w.key == key for w in self._pending)
        base = None if chained else self._confirmed_record(key).version
        write = PendingWrite(
            next(self._numbers),
            key,
            op,
            None if value is None else dict(value),
            self.clock.now(physical),
            base,
            chained,
        )
        self._pending.append(write)
        return write, self._refresh({key})

    def take_outgoing(self, now: float) -> list[Mutation]:
        """Mutations to send now, in order: first those sent before and not answered (with
        their old sequence numbers), then new ones. Nothing while offline."""
        if not self.online:
            return []
        out = []
        unsent = sorted(
            (w for w in self._pending if w.seq is not None and not w.on_link),
            key=lambda w: w.seq or 0,
        )
        for write in unsent:
            write.on_link = True
            out.append(write.mutation(self.origin))
        in_flight = sum(1 for w in self._pending if w.seq is not None)
        for write in self._pending:
            if in_flight >= self.max_in_flight:
                break
            if write.seq is not None or write.chained:
                continue
            write.seq = next(self._seqs)
            write.first_sent = now
            write.on_link = True
            self._by_seq[write.seq] = write
            out.append(write.mutation(self.origin))
            in_flight += 1
        return out

    # -- connection -----------------------------------------------------------------------------

    def go_online(self) -> None:
        """The channel is joined on a new connection (after its join reply was applied)."""
        self.online = True

    def go_offline(self) -> None:
        """The connection is gone: whatever was sent on it and not answered is sent again."""
        self.online = False
        for write in self._pending:
            write.on_link = False

    def expire(self, now: float) -> StoreUpdate:
        """Gives up writes sent more than `resend_window` ago and still waiting to be re-sent:
        the server may have forgotten their idempotency keys, so sending them again could
        apply them twice. They resolve as UNKNOWN."""
        update = StoreUpdate()
        for write in list(self._pending):
            if (
                not write.done
                and write.first_sent is not None
                and not write.on_link
                and now - write.first_sent > self.resend_window
            ):
                message = "no answer within the re-send window: it may or may not have applied"
                update |= self._resolve(write, Result(Outcome.UNKNOWN, None, message))
        return update

    def abandon(self, message: str) -> StoreUpdate:
        """Resolves every pending write without the server (the channel was left): those sent
        as UNKNOWN (they may have applied), the others as FAILED."""
        update = StoreUpdate()
        for write in list(self._pending):
            if not write.done:
                outcome = Outcome.UNKNOWN if write.seq is not None else Outcome.FAILED
                update |= self._resolve(write, Result(outcome, None, message))
        self.online = False
        return update

    # -- from the server ------------------------------------------------------------------------

    def reset(
        self,
        records: Iterable[Record],
        policy: ConflictPolicy | None = None,
        forgotten: Timestamp | None = None,
    ) -> StoreUpdate:
        """A snapshot of the channel (a join that did not resume): the new confirmed state.
        Pending writes stay and are applied again on top of it. `forgotten` is the server's
        newest forgotten tombstone (`RecordStore.forgotten`): a record the snapshot does not
        list that comes later with a version not after it is from before the snapshot (a
        re-sent mutation's first reply, say), and stays out."""
        if policy is not None:
            self.policy = policy
        old = set(self._confirmed)
        self._confirmed = {}
        self._floor = forgotten
        if forgotten is not None:
            self.clock.observe(forgotten)
        for record in records:
            self._confirmed[record.key] = record
            if record.version is not None:
                self.clock.observe(record.version)
        return self._refresh(old | set(self._confirmed) | {w.key for w in self._pending})

    def receive(
        self, record: Record, writer: str | None = None, seq: int | None = None
    ) -> StoreUpdate:
        """A record change published on the channel (`writer`, the tag of an origin, and
        `seq` name the mutation that made it, if any: one of ours is then confirmed)."""
        self._confirm(record)
        update = StoreUpdate()
        if writer == self.tag and seq is not None:
            write = self._by_seq.get(seq)
            if write is not None and not write.done:
                update |= self._resolve(write, Result(Outcome.APPLIED, record), refresh=False)
        return update | self._refresh({record.key})

    def replied(self, seq: int, result: Result) -> StoreUpdate:
        """The server's reply to the mutation sent with `seq` (duplicates are ignored)."""
        write = self._by_seq.get(seq)
        if write is None or write.done:
            return StoreUpdate()
        if result.record is not None:
            self._confirm(result.record)
        return self._resolve(write, result)

    # -- internals ------------------------------------------------------------------------------

    def _confirm(self, record: Record) -> None:
        """Takes `record` as confirmed if it is newer than what is confirmed."""
        if record.version is None:
            return  # no such record
        self.clock.observe(record.version)
        current = self._confirmed.get(record.key)
        floor = current.version if current is not None else self._floor
        if _after(record.version, floor):
            self._confirmed[record.key] = record

    def _confirmed_record(self, key: str) -> Record:
        return self._confirmed.get(key) or Record(key)

    def _resolve(self, write: PendingWrite, result: Result, *, refresh: bool = True) -> StoreUpdate:
        write.result = result
        self._pending.remove(write)
        if write.seq is not None:
            self._by_seq.pop(write.seq, None)
        resolved = [write]
        # The next write of the same record was made on top of this one.
        successor = next((w for w in self._pending if w.key == write.key), None)
        while successor is not None and successor.chained:
            if result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED) or not self.policy.cascades:
                successor.chained = False
                # Made on top of the record as this write left it (as it was, if unchanged;
                # rebased onto the current record when this one was refused).
                done = result.outcome in (Outcome.APPLIED, Outcome.UNCHANGED)
                after = result.record if done else None
                successor.base = (after or self._confirmed_record(write.key)).version
                break
            # Based on a state that never existed: refused with its predecessor.
            message = f"made on top of a write that was not applied ({result.outcome.value})"
            successor.result = Result(Outcome.REJECTED, result.record, message, result.code)
            self._pending.remove(successor)
            resolved.append(successor)
            successor = next((w for w in self._pending if w.key == write.key), None)
        update = StoreUpdate(frozenset(), tuple(resolved))
        return update | self._refresh({write.key}) if refresh else update

    def _refresh(self, keys: Iterable[str]) -> StoreUpdate:
        changed = set()
        for key in keys:
            before = self._view.get(key)
            after = self._predict(key)
            if after.exists or after.version is not None or key in self._confirmed:
                self._view[key] = after
            else:
                self._view.pop(key, None)
            if (before.value if before else None) != after.value:
                changed.add(key)
        return StoreUpdate(frozenset(changed))

    def _predict(self, key: str) -> Record:
        """The confirmed record with this record's pending writes applied in order."""
        record = self._confirmed_record(key)
        broken = False
        for write in self._pending:
            if write.key != key:
                continue
            if write.chained and broken:
                continue  # on top of a write predicted to fail: it would fail too
            base = record.version if write.chained else write.base
            mutation = Mutation(key, write.op, write.value, base, write.stamp)
            decided = self.policy.apply(record, mutation, write.stamp)
            if isinstance(decided, Rejection):
                broken = self.policy.cascades
                continue
            broken = False
            if not decided.same_state(record):
                # The server gives it a version later; the write's stamp stands in for it.
                record = attrs.evolve(decided, key=key, version=write.stamp)
        return record
