"""The hub's configuration (`HubConfig`: limits and policies) and its counters (`HubStats`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from .._core import check_channel
from .outbox import SlowConsumerPolicy


@attrs.frozen(slots=True, kw_only=True)
class HubConfig:
    """Limits and policies. Every field has a default that suits a small deployment."""

    max_channels_per_connection: int = 128
    max_payload_bytes: int = 64 * 1024
    """Largest `data` a client may publish, as JSON bytes."""
    max_frame_bytes: int = 256 * 1024
    """Largest frame a client may send; larger ones close the connection (1009)."""
    history_size: int = 256
    """Publications kept per channel for recovery (0: no history, recovery only at the top)."""
    history_age: float = 300.0
    """Seconds a publication stays recoverable."""
    history_idle_ttl: float = 3600.0
    """Seconds an unused channel's stream (and epoch) is kept after its last use."""
    history_max_bytes: int = 64 * 1024 * 1024
    """The most bytes the history of every channel holds together. A retained publication
    counts the size of its `pub` frame (its data as JSON, channel, offset, epoch, clock)
    plus 400 bytes for the objects that hold it. When a publication would take history
    past this, the oldest publications across all channels are forgotten until it fits (a
    client resuming from before them gets `recovered: false`). The default holds some 40,000
    publications of 1 KB (the whole `history_size` of 160 busy channels) while keeping what
    one client can make history hold (`max_payload_bytes` to each of
    `max_channels_per_connection` channels, `history_size` deep: 2 GiB with the other
    defaults) to a small share of a developer machine's memory; size it to yours."""
    ping_interval: float = 25.0
    idle_timeout: float = 60.0
    """A connection that sends nothing for this long is closed (4009)."""
    outbox_messages: int = 4096
    outbox_bytes: int = 4 * 1024 * 1024
    """The most bytes one connection's outbox holds, and as much again its fan-out backlog
    (docs/protocol.md, Slow consumers)."""
    outbox_total_bytes: int = 256 * 1024 * 1024
    """The most bytes all connections' outboxes and fan-out backlogs hold together, frames
    their writers are writing included (a frame queued for many connections counts once for
    each). A connection whose next frame does not fit is a slow consumer under its
    channel's policy, as if its own outbox were full; one closed for it (4008) has what was
    queued for it discarded at once. The default is 64 connections' worth of full outboxes
    (`outbox_bytes`), or 26 KiB behind for each of 10,000 subscribers."""
    slow_consumer_policy: SlowConsumerPolicy = SlowConsumerPolicy.DISCONNECT
    channel_policies: Mapping[str, SlowConsumerPolicy] = attrs.field(factory=dict)
    """Channel pattern -> policy; the first matching pattern (in order) wins."""
    publish_requires_join: bool = True
    """Also for `mutate`: a connection changes records only of channels it joined."""
    record_policies: Mapping[str, str] = attrs.field(factory=dict)
    """Channel pattern -> conflict policy ("reject", "lww", "merge" or the name of a resolver
    given to the Hub): channels matching one hold records; the first matching pattern wins."""
    max_clock_drift: float = 1.0
    """Seconds a client's timestamp may be ahead of the hub's clock; a mutation stamped
    further ahead is stamped by the hub instead."""
    mutation_ttl: float = 3600.0
    """Seconds the hub remembers the idempotency keys of a client (origin) after its last
    mutation; clients stop re-sending an unanswered mutation well before."""
    tombstone_ttl: float = 86400.0
    """Seconds a deleted record's tombstone is kept (by the hub's clock) before it may be
    forgotten; a mutation based on a forgotten version is then refused as a conflict
    (docs/conflicts.md). `math.inf` keeps tombstones for good."""
    direct_writes: bool = True
    """Let the Rust fan-out write publications straight to WebSocket sockets that can take
    them now (`attach_socket`); False sends every frame through the outbox and the
    connection's writer task (slower; for comparison)."""
    write_timeout: float = 10.0
    """Seconds a write to a client may make no progress (the client reads nothing) before
    the connection is closed; a connection being closed (slow, idle, shutting down) is
    gone within this plus 2 s however its peer behaves."""
    write_threads: int = 1
    """Threads the Rust fan-out spreads a corked batch's socket writes over (each takes at
    least 256 connections; the calling thread is one of them). Socket writes are most of the
    work of a big fan-out, and the kernel does them: more threads use more cores for them."""
    command_rate: float = 100.0
    """Commands (frames) a connection may send per second on average, on every transport
    (0: no limit). Over it, a command is refused with error 430 `rate_limited`; a connection
    that keeps sending at more than twice the rate is closed with 4029."""
    command_burst: int = 200
    """Commands a connection may send at once before `command_rate` applies."""
    channel_publish_rate: float = 500.0
    """Publications a channel takes per second on average from clients and the REST API
    together (0: no limit); sources and server-side code are not limited. Over it, a publish
    (or `mutate`) is refused: error 432 `channel_rate_limited`, HTTP 429 on the REST API."""
    channel_publish_burst: int = 1000
    """Publications a channel takes at once before `channel_publish_rate` applies."""
    client_writable: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    """Channel patterns clients may publish to (and mutate records of) even though a source
    feeds them; every other channel a source declares as its own is read-only to clients
    (error 423 `read_only`)."""

    def __attrs_post_init__(self) -> None:
        positive = ("max_channels_per_connection", "max_payload_bytes", "max_frame_bytes")
        limits = ("outbox_messages", "outbox_bytes", "outbox_total_bytes", "history_max_bytes")
        for name in (*positive, *limits):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("history_size", "history_age", "history_idle_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if not 0 < self.ping_interval < self.idle_timeout:
            raise ValueError("need 0 < ping_interval < idle_timeout")
        for pattern in self.channel_policies:
            check_channel(pattern, pattern=True)
        for pattern, name in self.record_policies.items():
            check_channel(pattern, pattern=True)
            if not isinstance(name, str) or not name:
                raise ValueError(f"record policy for {pattern!r} must be a name, not {name!r}")
        if self.max_clock_drift < 0:
            raise ValueError("max_clock_drift must not be negative")
        if self.mutation_ttl <= 0:
            raise ValueError("mutation_ttl must be positive")
        if not self.tombstone_ttl > 0:
            raise ValueError("tombstone_ttl must be positive")
        if not 0 < self.write_timeout < math.inf:
            raise ValueError("write_timeout must be positive and finite")
        if not 1 <= self.write_threads <= 64:
            raise ValueError("write_threads must be 1..64")
        for rate, burst in (
            ("command_rate", "command_burst"),
            ("channel_publish_rate", "channel_publish_burst"),
        ):
            if not 0 <= getattr(self, rate) < math.inf:
                raise ValueError(f"{rate} must be a number of at least 0 (0: no limit)")
            if getattr(self, burst) < 1:
                raise ValueError(f"{burst} must be at least 1")
        for pattern in self.client_writable:
            check_channel(pattern, pattern=True)


@attrs.define(slots=True)
class HubStats:
    """Counters for metrics; they only grow."""

    connections_opened: int = 0
    frames_in: int = 0
    publications: int = 0
    frames_out: int = 0
    bytes_out: int = 0
    direct_frames: int = 0
    """Of `frames_out`, those the Rust fan-out wrote straight to a socket."""
    evicted: int = 0
    slow_disconnects: int = 0
    """Connections closed as slow (4008), `budget_disconnects` included."""
    budget_disconnects: int = 0
    """Connections closed as slow because `outbox_total_bytes` was full."""
    recoveries: int = 0
    recovery_misses: int = 0
    mutations: int = 0
    """Mutations processed (applied, unchanged or rejected; not duplicates)."""
    conflicts: int = 0
    """Mutations the conflict policy rejected."""
    duplicate_mutations: int = 0
    """Mutations received again (re-sent) and answered without applying them."""
    errors: int = 0
    rate_limited: int = 0
    """Commands refused because their connection was over `command_rate` (430)."""
    rate_limit_closes: int = 0
    """Connections closed for going on far over `command_rate` (4029)."""
    auth_refused: int = 0
    """Commands and connections the channel rules, the `authorize` hook or a missing
    `connect` refused (403, 4401), and recoveries refused for want of `history`."""
    tokens_expired: int = 0
    """Connections closed because their token expired without a refresh (4419)."""
    channel_rate_limited: int = 0
    """Publications and mutations refused because their channel was over
    `channel_publish_rate` (432, or 429 on the REST API)."""
    read_only_refused: int = 0
    """Publications and mutations refused because a source owns the channel (423)."""
    matches: int = 0
    match_seconds: float = 0.0
    """Time spent asking the matcher who receives a publication (a cost, not a clock)."""
