"""The abuse limits' counting (pyrt.hub.limits), sans-IO: time is what the test says it is."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyrt.hub.limits import (
    Admission,
    ChannelRates,
    CommandRate,
    ConnectionsPerAddress,
    KeyFailures,
    TokenBucket,
    address_key,
)


def test_a_bucket_gives_its_burst_then_its_rate() -> None:
    bucket = TokenBucket.full(rate=2.0, burst=3.0, now=10.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(10.0) == pytest.approx(0.5)
    assert not bucket.take(10.4)
    assert bucket.take(10.5)
    assert bucket.wait(10.5) == pytest.approx(0.5)
    assert bucket.take(100.0)
    assert bucket.is_full(100.0) is False
    assert bucket.is_full(101.0)  # refilled, never past the burst
    assert [bucket.take(101.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(101.0, cost=4) == float("inf")


def test_a_clock_going_back_refills_nothing() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=1.0, now=5.0)
    assert bucket.take(5.0)
    assert not bucket.take(4.0)
    assert not bucket.take(5.5)
    assert bucket.take(6.0)


@given(
    rate=st.floats(0.5, 50),
    burst=st.integers(1, 20),
    gaps=st.lists(st.floats(0, 0.5), min_size=1, max_size=200),
)
def test_a_bucket_never_allows_more_than_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    bucket = TokenBucket.full(rate, burst, 0.0)
    now, taken = 0.0, 0
    for gap in gaps:
        now += gap
        taken += bucket.take(now)
        assert taken <= burst + rate * now + 1e-9


def test_a_command_rate_refuses_then_closes_a_client_that_keeps_going() -> None:
    rate = CommandRate.new(rate=10.0, burst=5.0, now=0.0)
    verdicts = [rate.admit(0.0) for _ in range(12)]
    assert verdicts == [Admission.ACCEPT] * 5 + [Admission.REFUSE] * 5 + [Admission.CLOSE] * 2
    assert rate.retry_after(0.0) == pytest.approx(0.1)


def test_a_client_that_backs_off_when_refused_is_never_closed() -> None:
    rate = CommandRate.new(rate=10.0, burst=5.0, now=0.0)
    now = 0.0
    for _ in range(1000):  # 1.5 times the rate, for 67 seconds
        assert rate.admit(now) is not Admission.CLOSE
        now += 1 / 15
    # More than twice the rate: out of refusals within burst / rate seconds.
    verdicts = []
    for _ in range(40):
        verdicts.append(rate.admit(now))
        now += 1 / 30
    assert Admission.CLOSE in verdicts[:30]


def test_channel_rates_take_from_all_channels_or_none() -> None:
    rates = ChannelRates(rate=1.0, burst=2.0)
    assert rates.take(["a"], 0.0) == 0.0
    assert rates.take(["a", "b"], 0.0) == 0.0
    assert rates.take(["b", "a"], 0.0) == pytest.approx(1.0)  # `a` is empty: `b` keeps its token
    assert rates.take(["b"], 0.0) == 0.0
    assert rates.take(["b"], 0.0) == pytest.approx(1.0)
    assert rates.wait(["a", "b", "c"], 0.5) == pytest.approx(0.5)
    rates.prune(1.0)
    assert set(rates.buckets) == {"a", "b"}  # one token each: not full yet
    rates.prune(2.0)
    assert rates.buckets == {}  # full again: forgetting them changes nothing
    assert rates.take(["a", "a"], 2.0) == 0.0


def test_connections_per_address() -> None:
    counts = ConnectionsPerAddress(limit=2)
    assert counts.acquire("10.0.0.1")
    assert counts.acquire("10.0.0.1")
    assert not counts.acquire("10.0.0.1")
    assert counts.acquire("10.0.0.2")
    assert counts.acquire(None)  # no address (a Unix socket): not counted
    counts.release("10.0.0.1")
    assert counts.acquire("10.0.0.1")
    assert counts.refused == 1
    for _ in range(2):
        counts.release("10.0.0.1")
    counts.release("10.0.0.2")
    assert counts.open == {}
    unlimited = ConnectionsPerAddress(limit=0)
    assert all(unlimited.acquire("10.0.0.1") for _ in range(1000))
    assert unlimited.open == {}


@pytest.mark.parametrize(
    ("sockaddr", "key"),
    [
        (("127.0.0.1", 5000), "127.0.0.1"),
        (("::ffff:10.1.2.3", 5000, 0, 0), "10.1.2.3"),
        (("2001:db8:1:2:aaaa::1", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:3::1", 5000, 0, 0), "2001:db8:1:3::/64"),
        (("fe80::1%eth0", 5000, 0, 2), "fe80::/64"),
        (("::1", 5000, 0, 0), "::/64"),
        ("/run/pyrt.sock", None),
        (("not an address", 1), None),
        ((), None),
    ],
)
def test_address_keys(sockaddr: object, key: str | None) -> None:
    assert address_key(sockaddr) == key


def test_wrong_keys_pause_an_address() -> None:
    failures = KeyFailures(max_failures=3, window=10.0, pause=30.0)
    assert not failures.fail("a", 0.0)
    assert not failures.fail("a", 5.0)
    assert not failures.fail("b", 5.0)
    assert failures.paused("a", 6.0) == 0.0
    assert failures.fail("a", 9.0)  # the third within 10 s
    assert failures.paused("a", 9.0) == pytest.approx(30.0)
    assert failures.paused("a", 38.0) == pytest.approx(1.0)
    assert failures.paused("b", 10.0) == 0.0
    assert failures.paused("a", 39.0) == 0.0  # over
    assert (failures.failed, failures.pauses, failures.refused) == (4, 1, 2)


def test_failures_spread_wider_than_the_window_never_pause() -> None:
    failures = KeyFailures(max_failures=3, window=10.0, pause=30.0)
    assert not any(failures.fail("a", t * 6.0) for t in range(100))
    assert failures.paused("a", 600.0) == 0.0
    never = KeyFailures(max_failures=0, window=10.0, pause=30.0)
    assert not any(never.fail("a", 0.0) for _ in range(100))
    assert never.failed == 100


def test_failures_are_forgotten_and_bounded() -> None:
    failures = KeyFailures(max_failures=2, window=1.0, pause=5.0, max_addresses=100)
    for n in range(1000):
        failures.fail(f"10.0.{n // 256}.{n % 256}", n / 1000)
        assert len(failures.failures) <= 100
    failures.fail("x", 10.0)  # a second later: the stale ones are gone
    assert list(failures.failures) == ["x"]
    assert failures.fail("y", 10.0) is False
    assert failures.fail("y", 10.5) is True
    failures.fail("z", 20.0)
    assert failures.paused_until == {}
