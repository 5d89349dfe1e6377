"""Abuse limits: token buckets, per-address connection counts, and the pause after wrong API
keys (docs/http.md, docs/protocol.md).

Sans-IO, like the hub: every call takes the current time as `now` (seconds, any monotonic
clock) and nothing here reads a clock, a socket or trio. The node, the hub and the transports
decide what a refusal looks like on their wire (an error code, a close, an HTTP status); this
module only keeps the counts.
"""

from __future__ import annotations

import enum
import ipaddress
import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import attrs

__all__ = [
    "IPV6_PREFIX",
    "Admission",
    "ChannelRates",
    "CommandRate",
    "ConnectionsPerAddress",
    "KeyFailures",
    "TokenBucket",
    "address_key",
]

IPV6_PREFIX = 64
"""IPv6 peers are counted per /64 network: one host usually has a whole /64 to pick from."""


@attrs.define(slots=True)
class TokenBucket:
    """`burst` tokens at most, refilled at `rate` per second; an action takes one (or `cost`).

    Starts full: a client that just arrived may do `burst` things at once, then `rate` per
    second on average."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate, burst, burst, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Takes `cost` tokens if there are that many; False (and takes none) if not."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def wait(self, now: float, cost: float = 1.0) -> float:
        """Seconds until `cost` tokens are there (0: now); `inf` when `cost` exceeds `burst`."""
        self._refill(now)
        if self.tokens >= cost:
            return 0.0
        if cost > self.burst:
            return math.inf
        return (cost - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """Whether the bucket is full, so forgetting it changes nothing."""
        self._refill(now)
        return self.tokens >= self.burst


class Admission(enum.Enum):
    """What to do with one command under a connection's `CommandRate`."""

    ACCEPT = "accept"
    REFUSE = "refuse"
    """Over the rate: answer with an error, do not carry the command out."""
    CLOSE = "close"
    """Far over the rate, for long: close the connection."""


@attrs.define(slots=True)
class CommandRate:
    """One connection's command rate: `rate` commands per second, `burst` at once.

    Commands over the rate are refused. The refusals have a bucket of their own, of the same
    size: a client that backs off when refused is never closed, one that keeps sending more
    than twice the rate runs out of refusals within `burst / rate` seconds and is closed."""

    commands: TokenBucket
    refusals: TokenBucket

    @classmethod
    def new(cls, rate: float, burst: float, now: float) -> CommandRate:
        return cls(TokenBucket.full(rate, burst, now), TokenBucket.full(rate, burst, now))

    def admit(self, now: float) -> Admission:
        if self.commands.take(now):
            return Admission.ACCEPT
        if self.refusals.take(now):
            return Admission.REFUSE
        return Admission.CLOSE

    def retry_after(self, now: float) -> float:
        """Seconds until the next command would be accepted."""
        return self.commands.wait(now)


@attrs.define(slots=True)
class ChannelRates:
    """A token bucket per channel, made on first use and forgotten once full again (`prune`),
    so only channels published to lately take memory."""

    rate: float
    burst: float
    buckets: dict[str, TokenBucket] = attrs.field(factory=dict)

    def wait(self, channels: Iterable[str], now: float) -> float:
        """Seconds until every one of `channels` can take a publication (0: now)."""
        longest = 0.0
        for channel in channels:
            bucket = self.buckets.get(channel)
            if bucket is not None:
                longest = max(longest, bucket.wait(now))
        return longest

    def take(self, channels: Iterable[str], now: float) -> float:
        """Takes a token from each of `channels` if each has one, and returns 0; otherwise
        takes none and returns the seconds until each would have one."""
        channels = list(channels)
        wait = self.wait(channels, now)
        if wait > 0:
            return wait
        for channel in channels:
            bucket = self.buckets.get(channel)
            if bucket is None:
                bucket = self.buckets[channel] = TokenBucket.full(self.rate, self.burst, now)
            bucket.take(now)
        return 0.0

    def prune(self, now: float) -> None:
        """Forgets the buckets that are full again."""
        full = [channel for channel, bucket in self.buckets.items() if bucket.is_full(now)]
        for channel in full:
            del self.buckets[channel]


def address_key(sockaddr: Any) -> str | None:
    """The key a peer's limits are counted under: its IPv4 address, or its IPv6 /64 network
    (an IPv4-mapped IPv6 address counts as the IPv4 address). None for a peer without an IP
    address (a Unix socket), which no per-address limit applies to."""
    if not isinstance(sockaddr, tuple) or not sockaddr or not isinstance(sockaddr[0], str):
        return None
    host = sockaddr[0].partition("%")[0]  # a link-local address's scope
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, IPV6_PREFIX), strict=False))
    return str(address)


@attrs.define(slots=True)
class ConnectionsPerAddress:
    """Open connections per peer address (`address_key`), at most `limit` each (0: no limit)."""

    limit: int
    open: dict[str, int] = attrs.field(factory=dict)
    refused: int = 0
    """Connections refused because their address had `limit` open."""

    def acquire(self, key: str | None) -> bool:
        """Counts a new connection from `key`; False (and counts it as refused) if `key`
        has `limit` open already."""
        if key is None or not self.limit:
            return True
        count = self.open.get(key, 0)
        if count >= self.limit:
            self.refused += 1
            return False
        self.open[key] = count + 1
        return True

    def release(self, key: str | None) -> None:
        """A connection `acquire` let in has ended."""
        if key is None or not self.limit:
            return
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


@attrs.define(slots=True)
class KeyFailures:
    """Wrong API keys per peer address: `max_failures` within `window` seconds pause the
    address for `pause` seconds, during which it is refused whatever key it sends
    (`max_failures` 0: never).

    Addresses are forgotten once their failures are older than `window` and their pause is
    over; at most `max_addresses` are kept (the oldest go first), so a flood of addresses
    cannot grow memory without bound."""

    max_failures: int
    window: float
    pause: float
    max_addresses: int = 65536
    failures: dict[str, deque[float]] = attrs.field(factory=dict)
    paused_until: dict[str, float] = attrs.field(factory=dict)
    failed: int = 0
    """Wrong keys counted."""
    pauses: int = 0
    """Pauses begun."""
    refused: int = 0
    """Requests refused because their address was paused."""
    _pruned: float = -math.inf

    def paused(self, key: str | None, now: float) -> float:
        """Seconds left of `key`'s pause (0: not paused). Counts a refusal when paused: call
        it once per request, before checking the request's key."""
        if key is None:
            return 0.0
        until = self.paused_until.get(key)
        if until is None:
            return 0.0
        if now >= until:
            del self.paused_until[key]
            return 0.0
        self.refused += 1
        return until - now

    def fail(self, key: str | None, now: float) -> bool:
        """A wrong key from `key`; True when this failure began a pause."""
        self.failed += 1
        if key is None or not self.max_failures:
            return False
        self._prune(now)
        times = self.failures.get(key)
        if times is None:
            times = self.failures[key] = deque(maxlen=self.max_failures)
        times.append(now)
        if len(times) < self.max_failures or now - times[0] > self.window:
            return False
        del self.failures[key]
        self.paused_until[key] = now + self.pause
        self.pauses += 1
        return True

    def _prune(self, now: float) -> None:
        if now - self._pruned >= 1.0 or len(self.failures) >= self.max_addresses:
            self._pruned = now
            stale = [k for k, times in self.failures.items() if now - times[-1] > self.window]
            for key in stale:
                del self.failures[key]
            over = [k for k, until in self.paused_until.items() if now >= until]
            for key in over:
                del self.paused_until[key]
        while len(self.failures) >= self.max_addresses:
            del self.failures[next(iter(self.failures))]
        while len(self.paused_until) >= self.max_addresses:
            del self.paused_until[next(iter(self.paused_until))]
