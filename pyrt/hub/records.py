"""Records channels: channels matching a pattern of `record_policies` hold keyed records,
changed by `mutate` commands under the channel's conflict policy and by a database source
(`apply_change`). Each change is a publication like any other, so history and recovery carry
it; a join that does not resume gets the records as a snapshot (pyrt.conflict,
docs/conflicts.md). The records themselves are kept by the storage engine's `RecordStorage`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import attrs

from .._core import Matcher
from ..conflict import (
    ConflictPolicy,
    HybridClock,
    Mutation,
    Outcome,
    Resolver,
    Timestamp,
    origin_tag,
    policy_named,
)
from .broker import RecordStorage, RecordTable
from .config import HubConfig, HubStats
from .connection import Connection
from .history import Publication
from .protocol import ErrorCode, encode_record, is_pattern


@attrs.frozen(slots=True)
class MutationReply:
    """The hub's answer to a mutation, as the `mutate` command's reply carries it: `ok`, the
    reply (`applied`, `record`...), or an error `code` and `message` with the current
    `record` (a conflict)."""

    outcome: Outcome
    ok: Mapping[str, Any] | None = None
    code: ErrorCode | None = None
    message: str = ""
    record: Mapping[str, Any] | None = None


class PublishRecord(Protocol):
    """How a record change is published (the hub's `publish`, never dropped for a slow
    consumer): its publication, with its offset and epoch."""

    def __call__(
        self,
        channel: str,
        data: Any,
        now: float,
        publisher: Connection | None,
        key: str,
        hlc: Timestamp,
    ) -> Publication: ...


class RecordChannels:
    """The records channels of one hub: which channels hold records (and under which
    policy), their mutations (at most once per idempotency key) and source changes.

    `resolvers` names the user-supplied conflict resolvers `record_policies` may refer to;
    `clock` stamps every version, given wall time in ms by `physical`.
    """

    def __init__(
        self,
        config: HubConfig,
        stats: HubStats,
        storage: RecordStorage,
        clock: HybridClock,
        physical: Callable[[], int],
        publish: PublishRecord,
        resolvers: Mapping[str, Resolver | ConflictPolicy] | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.storage = storage
        self.clock = clock
        self._physical = physical
        self._publish = publish
        self._policies = [policy_named(name, resolvers) for name in config.record_policies.values()]
        self._matcher = Matcher()
        for index, pattern in enumerate(config.record_policies):
            self._matcher.add_channel(index, pattern)

    def policy(self, channel: str) -> ConflictPolicy | None:
        """The conflict policy of `channel` (a name), or None if it holds no records."""
        if not self._policies:
            return None
        matches = self._matcher.match_channel(channel)
        return self._policies[min(matches)] if matches else None

    def table(self, channel: str) -> RecordTable | None:
        """The records of `channel` (made on first use), or None if it holds none."""
        table = self.storage.record_table(channel)
        if table is None:
            policy = self.policy(channel)
            if policy is None or is_pattern(channel):
                return None
            table = self.storage.new_record_table(channel, policy)
        return table

    def existing(self, channel: str) -> RecordTable:
        """The records of `channel`; ValueError if it is not a records channel."""
        table = self.table(channel)
        if table is None:
            raise ValueError(f"'{channel}' is not a records channel (see record_policies)")
        return table

    def describe(self, channel: str, result: dict[str, Any]) -> None:
        """Adds what a join of a records channel is told to its reply `result`: the policy,
        and unless it recovered, the records as of its offset (a snapshot)."""
        table = self.table(channel)
        if table is None:
            return
        result["policy"] = table.policy.name
        result["mutation_ttl"] = self.config.mutation_ttl
        if not result.get("recovered"):
            # The records as of `offset`: changes after it follow as publications.
            result["records"] = [encode_record(r) for r in table.records()]
            if table.forgotten is not None:
                # Records not listed are absent at least up to this version.
                result["forgotten"] = table.forgotten.encode()

    def apply_change(
        self,
        channel: str,
        key: str,
        value: Mapping[str, Any] | None,
        now: float,
        source_version: int | None,
    ) -> Publication | None:
        """A change at the source of truth (see `Hub.apply_record_change`)."""
        table = self.existing(channel)
        if value is not None and not isinstance(value, Mapping):
            raise TypeError(f"a record's value is a mapping or None, not {type(value).__name__}")
        version = self.clock.now(self._physical())
        record = table.write(key, value, version, source_version=source_version)
        if record is None:
            return None
        return self._publish(channel, encode_record(record), now, None, key, version)

    def mutate(
        self,
        table: RecordTable,
        channel: str,
        mutation: Mutation,
        now: float,
        publisher: Connection | None,
    ) -> MutationReply:
        """Applies `mutation` to `table` (of `channel`) under its policy, unless its
        idempotency key was processed (then: the first answer again), and publishes it if it
        applied."""
        origin, seq = mutation.origin, mutation.seq
        if origin is not None and seq is not None:
            processed, reply = table.recall(origin, seq, now)
            if processed:
                # Sent again (the client did not hear back): answer as the first time, and
                # apply nothing. Its publication, if any, went out already.
                self.stats.duplicate_mutations += 1
                if reply is None:
                    current = encode_record(table.get(mutation.key))
                    ok = {"applied": None, "duplicate": True, "record": current}
                    reply = MutationReply(Outcome.UNKNOWN, ok)
                assert isinstance(reply, MutationReply)
                return reply
        physical = self._physical()
        stamp = mutation.hlc
        if stamp is not None:
            if stamp.wall - physical > self.config.max_clock_drift * 1000:
                # Too far ahead to trust (it would win every race for that long): the hub
                # stamps the write itself.
                mutation = attrs.evolve(mutation, hlc=None)
            else:
                self.clock.update(stamp, physical)
        version = self.clock.now(physical)
        result = table.apply(mutation, version)
        self.stats.mutations += 1
        assert result.record is not None
        record = encode_record(result.record)
        if result.outcome is Outcome.APPLIED:
            data = dict(record)
            if origin is not None:
                data.update(writer=origin_tag(origin), seq=seq)
            publication = self._publish(channel, data, now, publisher, mutation.key, version)
            position = {"offset": publication.offset, "epoch": publication.epoch}
            reply = MutationReply(result.outcome, {"applied": True, "record": record, **position})
        elif result.outcome is Outcome.UNCHANGED:
            reply = MutationReply(result.outcome, {"applied": False, "record": record})
        else:
            self.stats.conflicts += 1
            reply = MutationReply(result.outcome, None, ErrorCode.CONFLICT, result.message, record)
        if origin is not None and seq is not None:
            table.remember(origin, seq, reply, now)
        return reply

    def tick(self, now: float) -> None:
        """Forgets idempotency keys past `mutation_ttl` and tombstones past
        `tombstone_ttl` (by the hub's clock)."""
        config = self.config
        horizon = self._physical() - config.tombstone_ttl * 1000
        for table in self.storage.record_tables().values():
            table.expire(now, config.mutation_ttl)
            if table.tombstones:
                table.compact(horizon)
