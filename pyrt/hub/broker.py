"""Storage engines: where the hub keeps publication streams, presence and records.

Modelled on centrifuge, which splits a `Broker` (publications with offsets and epochs,
history, recovery) from a `PresenceManager`; records channels add a third part,
`RecordStorage`. A *storage engine* is one object with all three (`StorageEngine`); the hub
reaches history, presence and records only through these interfaces
(`Hub(config, broker=...)`). `MemoryBroker`, the default, keeps everything in this process
with the in-memory classes (`History`, `Presence`, `RecordStore`).

The interfaces are synchronous, as the hub is: an engine that keeps its state elsewhere
(Redis, a later issue) does its network I/O in the node, before and after it calls the hub,
and hands the hub what it learned: `Broker.accept` takes a publication whose offset and epoch
were assigned elsewhere (centrifuge's `HandlePublication`), so the local replica follows the
remote stream and a gap in it is never a silent one. docs/architecture.md ("Storage engines")
has the design. `pyrt.testing.check_broker` is the conformance suite every engine passes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..conflict import (
    ConflictPolicy,
    Mutation,
    Record,
    RecordStats,
    RecordStore,
    Result,
    Timestamp,
)
from .config import HubConfig
from .history import History, HistoryBudget, Publication, Recovery, StreamPosition
from .presence import Presence, PresenceDiff, PresenceMeta
from .protocol import JsonCodec

if TYPE_CHECKING:
    from .historylog import HistoryLog

__all__ = [
    "Broker",
    "DurableHistory",
    "MemoryBroker",
    "PresenceManager",
    "RecordStorage",
    "RecordTable",
    "StorageEngine",
]


class Broker(Protocol):
    """The publication stream of every channel: each publication gets the next offset of its
    channel in the channel's current epoch before anyone sees it; what a stream retains is
    bounded per channel (`history_size`, `history_age`) and in bytes across channels
    (`history_max_bytes`, forgetting the oldest of any channel first); recovery from a
    position is all or nothing, and says `recovered: false` whenever the stream does not
    reach back to it (another epoch, forgotten publications, a gap). `now` is the hub's
    monotonic time in seconds."""

    @property
    def budget(self) -> HistoryBudget:
        """What every stream retains, in bytes and publications, against `history_max_bytes`,
        and how many publications it forgot to stay within it (for metrics)."""
        ...

    def publish(
        self,
        channel: str,
        data: Any,
        now: float,
        *,
        publisher: str | None = None,
        key: str | None = None,
        hlc: Timestamp | None = None,
        change: Any = None,
        size: int | None = None,
    ) -> Publication:
        """Appends a publication to the channel's stream (made, with a new epoch, on first
        use) and returns it with its offset and epoch. It counts `size` bytes against the
        byte budget (None: the engine measures it; 0: the caller will `charge` it)."""
        ...

    def charge(self, publication: Publication, size: int) -> None:
        """`publication`, just published with `size=0`, counts `size` bytes more; the
        oldest publications of any channel are forgotten if the budget is over."""
        ...

    def accept(
        self, publication: Publication, now: float, *, size: int | None = None
    ) -> Publication | None:
        """Takes a publication whose offset and epoch were assigned elsewhere (another node)
        into the local stream, stamped with the local `now`; returns it, or None if the
        stream has it already (same epoch, offset not above the top). A publication of
        another epoch, or one past the top + 1, starts the stream afresh there: what came
        before is not recoverable here. `size` as for `publish`."""
        ...

    def position(self, channel: str, now: float) -> StreamPosition:
        """The channel's top: the offset of its latest publication (0: none yet) and its
        epoch (the stream is made on first use)."""
        ...

    def history(self, channel: str, now: float, since: StreamPosition | None = None) -> Recovery:
        """The retained publications after `since`, oldest first, and the current position.
        With `since`, `recovered` says whether every publication after it is there (if not,
        none is returned); without, whether the retained ones reach back to offset 1."""
        ...

    def reset(self, channel: str, now: float) -> StreamPosition:
        """History was lost upstream: the channel's stream gets a new epoch and forgets what
        it retained. Returns the new position."""
        ...

    def channels(self) -> list[str]:
        """The channels that have a stream."""
        ...

    def expire(self, now: float, in_use: Callable[[str], bool]) -> list[str]:
        """Forgets publications older than `history_age`, and the streams (epochs included)
        of channels unused for `history_idle_ttl` that are not `in_use`; returns those."""
        ...


class PresenceManager(Protocol):
    """Who is present in which channel: metas under keys, tracked by connections."""

    def track(
        self, channel: str, conn: str, key: str, meta: Mapping[str, Any], ref: str | None = None
    ) -> tuple[str, PresenceDiff]:
        """Adds `meta` under `key` in `channel` for connection `conn`; returns its ref and
        the diff members apply. With `ref` (one of `conn`'s entries under `key`), an update:
        that entry leaves as the new one joins. KeyError if `ref` names no such entry."""
        ...

    def untrack(self, channel: str, conn: str, key: str, ref: str | None = None) -> PresenceDiff:
        """Removes `conn`'s entry `ref` under `key` (all of them if None); the diff."""
        ...

    def untrack_conn(self, conn: str) -> dict[str, PresenceDiff]:
        """The connection is gone: every entry of it, in every channel, expires. The diffs,
        by channel."""
        ...

    def presence(self, channel: str) -> dict[str, tuple[PresenceMeta, ...]]:
        """The metas present in `channel` under each key, oldest first."""
        ...


class RecordTable(Protocol):
    """The records of one records channel, under its conflict policy, with the idempotency
    keys of recent mutations (`pyrt.conflict.RecordStore` is one)."""

    policy: ConflictPolicy
    forgotten: Timestamp | None
    """The newest version of a tombstone forgotten by `compact` (None: none)."""
    stats: RecordStats

    def __len__(self) -> int: ...

    @property
    def tombstones(self) -> int:
        """How many of the records held are deleted ones (tombstones)."""
        ...

    def get(self, key: str) -> Record:
        """The record `key` (`value` None if it does not exist)."""
        ...

    def records(self) -> list[Record]:
        """Every record, tombstones included, by key."""
        ...

    def apply(self, mutation: Mutation, version: Timestamp) -> Result:
        """Applies a mutation under the policy; a change gets `version`."""
        ...

    def write(
        self,
        key: str,
        value: Mapping[str, Any] | None,
        version: Timestamp,
        *,
        source_version: int | None = None,
    ) -> Record | None:
        """An authoritative change (a database row); None if nothing changed or it is a
        replay (`source_version` not newer than the last)."""
        ...

    def compact(self, before: float) -> int:
        """Forgets tombstones whose version is older than `before` (wall ms); how many."""
        ...

    def recall(self, origin: str, seq: int, now: float) -> tuple[bool, Any]:
        """Whether mutation (`origin`, `seq`) was processed, and the reply kept for it."""
        ...

    def remember(self, origin: str, seq: int, reply: Any, now: float) -> None:
        """Mutation (`origin`, `seq`) was processed; `reply` is what it was answered."""
        ...

    def expire(self, now: float, ttl: float) -> None:
        """Forgets the idempotency keys of origins silent for `ttl` seconds."""
        ...


class RecordStorage(Protocol):
    """The record tables of the records channels."""

    def record_table(self, channel: str) -> RecordTable | None:
        """The channel's table, or None if none was made."""
        ...

    def new_record_table(self, channel: str, policy: ConflictPolicy) -> RecordTable:
        """Makes the (empty) table of a records channel, under `policy`."""
        ...

    def record_tables(self) -> Mapping[str, RecordTable]:
        """Every table made so far, by channel."""
        ...


class StorageEngine(Broker, PresenceManager, RecordStorage, Protocol):
    """What `Hub(broker=...)` takes: all three parts, in one object."""


@runtime_checkable
class DurableHistory(Protocol):
    """An engine that can keep its streams in a local durable log (`[node] history_dir`)."""

    def attach_log(self, log: HistoryLog, now: float, wall: float) -> None:
        """Replays `log` into the streams, then writes every publication to it."""
        ...


_NATIVE = JsonCodec()


def _frame_size(publication: Publication) -> int:
    """What a publication read back from a log counts: its `pub` frame, as the hub's."""
    return len(_NATIVE.publication(publication))


class MemoryBroker:
    """The in-memory storage engine (the default): streams in a `History`, presence in a
    `Presence` replica named `replica`, records in a `RecordStore` per channel. Epochs come
    from `new_epoch` (random by default). With `attach_log`, streams survive a restart."""

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        replica: str | None = None,
        new_epoch: Callable[[], str] | None = None,
    ) -> None:
        config = config or HubConfig()
        self.streams = History(
            config.history_size,
            config.history_age,
            new_epoch or (lambda: secrets.token_hex(6)),
            config.history_idle_ttl,
            max_bytes=config.history_max_bytes,
            measure=_frame_size,
        )
        """The publication streams (`pyrt.hub.history.History`)."""
        self.members = Presence(replica or secrets.token_hex(4))
        """The presence replica (`pyrt.hub.presence.Presence`)."""
        self._tables: dict[str, RecordStore] = {}

    # -- Broker ----------------------------------------------------------------------------

    @property
    def budget(self) -> HistoryBudget:
        return self.streams.budget

    def publish(
        self,
        channel: str,
        data: Any,
        now: float,
        *,
        publisher: str | None = None,
        key: str | None = None,
        hlc: Timestamp | None = None,
        change: Any = None,
        size: int | None = None,
    ) -> Publication:
        return self.streams.append(channel, data, now, publisher, key, hlc, change, size=size)

    def charge(self, publication: Publication, size: int) -> None:
        self.streams.charge(publication, size)

    def accept(
        self, publication: Publication, now: float, *, size: int | None = None
    ) -> Publication | None:
        return self.streams.accept(publication, now, size=size)

    def position(self, channel: str, now: float) -> StreamPosition:
        return self.streams.stream(channel, now).position

    def history(self, channel: str, now: float, since: StreamPosition | None = None) -> Recovery:
        if since is not None:
            return self.streams.recover(channel, since, now)
        return self.streams.retained(channel, now)

    def reset(self, channel: str, now: float) -> StreamPosition:
        return self.streams.reset(channel, now)

    def channels(self) -> list[str]:
        return self.streams.channels()

    def expire(self, now: float, in_use: Callable[[str], bool]) -> list[str]:
        return self.streams.expire(now, in_use)

    def attach_log(self, log: HistoryLog, now: float, wall: float) -> None:
        self.streams.attach(log, now, wall)

    # -- PresenceManager -------------------------------------------------------------------

    def track(
        self, channel: str, conn: str, key: str, meta: Mapping[str, Any], ref: str | None = None
    ) -> tuple[str, PresenceDiff]:
        return self.members.track(channel, conn, key, meta, ref)

    def untrack(self, channel: str, conn: str, key: str, ref: str | None = None) -> PresenceDiff:
        return self.members.untrack(channel, conn, key, ref)

    def untrack_conn(self, conn: str) -> dict[str, PresenceDiff]:
        return self.members.untrack_conn(conn)

    def presence(self, channel: str) -> dict[str, tuple[PresenceMeta, ...]]:
        return self.members.state(channel)

    # -- RecordStorage ---------------------------------------------------------------------

    def record_table(self, channel: str) -> RecordStore | None:
        return self._tables.get(channel)

    def new_record_table(self, channel: str, policy: ConflictPolicy) -> RecordStore:
        if channel in self._tables:
            raise ValueError(f"'{channel}' has a record table already")
        table = self._tables[channel] = RecordStore(policy)
        return table

    def record_tables(self) -> Mapping[str, RecordStore]:
        return dict(self._tables)
