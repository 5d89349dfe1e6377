"""Matcher throughput: the Rust matcher (through the Python binding) against the reference.

    python benches/matcher.py                      # 10k, 100k, 1M subscriptions
    python benches/matcher.py --sizes 10000 --seconds 0.5

For each size N it builds a matcher with N subscriptions, then times batch calls of
`Matcher.match_rows` over pre-built events (events are made once, outside the timed loop: in
the hub, WAL events reach the matcher already in Rust), cycling through --events distinct
events with random keys. It prints events/s for Rust and for the
pure-Python reference, their ratio, time per event, matches per event, subscribe/remove rates
and memory per subscription, then the machine it ran on.

Workload (fractions of N), over three tables of schema public:
  86%  user_id=eq.K                                   (equality index)
   5%  account_id=eq.K,amount=gt.X                    (equality index + range check)
   3%  org_id=in.(K1,K2,K3)                           (in-list, indexed per item)
   3%  user_id=eq.K,body=ilike.*word*                 (equality index + pattern check)
   3%  channel patterns room:K:* and room:K:>          (segment trie, matched separately
                                                       against channels room:K:x)
  plus a fixed 60 range-only subscriptions (amount=gte.X): no equality to index, so they are
  scanned for every event; their cost does not grow with N.
A second table shows what scanning costs: N range-only subscriptions on one table.

    python benches/matcher.py --claims-bound --sizes 100000 --no-reference --scan-sizes

runs each size three times: plain, then with every row subscription's filter claims-bound as
a channel rule makes it (docs/auth.md), filled by `pyrt.hub.rules` and ANDed in front of the
subscription's own filter:
  user     the rule `user_id=eq.{sub}`, with the subscriber's `sub` (the key its own filter
           uses: the condition is then there twice, and kept once)
  tenant   the rule `tenant_id=eq.{claims.tenant}`, TENANT_USERS users to a tenant (the
           matcher files each subscription under its less crowded eq: its own user's)
and prints the rates side by side.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import pyrt
from pyrt.reference.matcher import ReferenceMatcher
from pyrt.reference.matcher import RowEvent as ReferenceRowEvent

Value = bool | int | float | str | None

TABLES = ("orders", "messages", "profiles")
WORDS = ("hello", "world", "urgent", "report")


class AnyMatcher(Protocol):
    def add_rows(
        self, sub_id: int, event: str, schema: str, table: str, filter: str | None = None
    ) -> None: ...
    def add_channel(self, sub_id: int, pattern: str) -> None: ...
    def remove(self, sub_id: int) -> bool: ...
    def match_rows(self, events: Sequence[Any]) -> list[list[int]]: ...
    def match_channels(self, channels: Sequence[str]) -> list[list[int]]: ...
    def __len__(self) -> int: ...


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


TENANT_USERS = 1_000
"""Users to a tenant: user k is in tenant k // TENANT_USERS (events carry both)."""
BOUND_BY = {"user": "user_id=eq.{sub}", "tenant": "tenant_id=eq.{claims.tenant}"}
"""The forced filter of each claims-bound variant."""


def claims_bound(
    subs: list[tuple[str, int, str, str, str | None]], by: str = "user"
) -> list[tuple[str, int, str, str, str | None]]:
    """`subs` with each row subscription's filter bound to its subscriber (user k of
    `subscriptions`) by the channel rule BOUND_BY[by], as the hub does for a join under it."""
    from pyrt.hub.identity import Action, Identity
    from pyrt.hub.rules import Rules

    rules = Rules.from_config(
        [{"channel": "pg:public:*", "subscribe": "authenticated", "filter": BOUND_BY[by]}]
    )
    out = []
    for kind, sub_id, event, target, row_filter in subs:
        if kind == "rows" and sub_id < len(subs) - 60:
            k = sub_id // 3
            claims = {"sub": str(k), "tenant": str(k // TENANT_USERS)}
            grant = rules.decide(
                Identity(str(k), claims, anonymous=False),
                Action.SUBSCRIBE,
                f"pg:public:{target}",
            )
            if not grant.allowed or grant.row_filter is None:
                raise RuntimeError(f"the rule did not bind user {k}: {grant}")
            row_filter = Rules.and_filter(grant.row_filter, row_filter)
        out.append((kind, sub_id, event, target, row_filter))
    return out


def subscriptions(n: int) -> list[tuple[str, int, str, str, str | None]]:
    """(kind, id, table, filter-or-pattern) in a fixed, seeded mix."""
    rng = random.Random(n)
    keys = max(n // 3, 1)
    subs: list[tuple[str, int, str, str, str | None]] = []
    for i in range(n):
        table = TABLES[i % 3]
        k = i // 3
        r = i % 100
        if r < 86:
            subs.append(("rows", i, "*", table, f"user_id=eq.{k}"))
        elif r < 91:
            subs.append(
                ("rows", i, "*", table, f"account_id=eq.{k},amount=gt.{rng.randint(0, 999)}")
            )
        elif r < 94:
            ks = ",".join(str(rng.randrange(keys)) for _ in range(3))
            subs.append(("rows", i, "*", table, f"org_id=in.({ks})"))
        elif r < 97:
            subs.append(("rows", i, "*", table, f"user_id=eq.{k},body=ilike.*{WORDS[i % 4]}*"))
        else:
            tail = "*" if i % 2 else ">"
            subs.append(("channel", i, "", f"room:{k}:{tail}", None))
    for j in range(60):
        subs.append(("rows", n + j, "UPDATE", TABLES[j % 3], f"amount=gte.{999 - j}"))
    return subs


def add_all(m: AnyMatcher, subs: Sequence[tuple[str, int, str, str, str | None]]) -> None:
    for kind, sub_id, event, target, row_filter in subs:
        if kind == "rows":
            m.add_rows(sub_id, event, "public", target, row_filter)
        else:
            m.add_channel(sub_id, target)


def event_args(n: int, count: int) -> list[tuple[str, str, str, dict[str, Value]]]:
    rng = random.Random(-n)
    keys = max(n // 3, 1)
    out = []
    for _ in range(count):
        k = rng.randrange(keys)
        record: dict[str, Value] = {
            "id": rng.randrange(10**9),
            "user_id": k,
            "tenant_id": str(k // TENANT_USERS),
            "account_id": k,
            "org_id": rng.randrange(keys),
            "amount": rng.randint(0, 999),
            "body": f"{rng.choice(WORDS)} from {k}",
            "status": rng.choice(("paid", "shipped", "new")),
        }
        out.append((rng.choice(("INSERT", "UPDATE")), "public", rng.choice(TABLES), record))
    return out


def timed(call: Callable[[], list[list[int]]], batch: int, seconds: float) -> tuple[float, float]:
    """Runs `call` (one batch of `batch` events) until `seconds` pass: (events/s, matches/event)."""
    call()  # warm up caches and the allocator
    done = 0
    matches = 0
    start = time.perf_counter()
    while True:
        result = call()
        done += batch
        matches += sum(map(len, result))
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, matches / done


def measure_build(
    make: Callable[[], AnyMatcher], subs: Sequence[Any]
) -> tuple[AnyMatcher, float, float]:
    """Builds a matcher: (matcher, adds per second, bytes of RSS per subscription)."""
    gc.collect()
    before = rss_bytes()
    m = make()
    start = time.perf_counter()
    add_all(m, subs)
    rate = len(subs) / (time.perf_counter() - start)
    gc.collect()
    return m, rate, (rss_bytes() - before) / len(subs)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB; {platform.platform()}; "
        f"Python {platform.python_version()}; {rustc or 'rustc ?'}; pyrt {pyrt.__version__}"
    )


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.1f}"


def run_rust(
    subs: Sequence[tuple[str, int, str, str, str | None]],
    args: Sequence[tuple[str, str, str, dict[str, Value]]],
    seconds: float,
) -> dict[str, float]:
    m, add_rate, mem = measure_build(pyrt.Matcher, subs)
    events = [pyrt.RowEvent(*a) for a in args]
    rate, per_event = timed(lambda: m.match_rows(events), len(events), seconds)
    rng = random.Random(len(subs))
    keys = max(len(subs) // 3, 1)
    channels = [f"room:{rng.randrange(keys)}:{i}" for i in range(4096)]
    chan_rate, _ = timed(lambda: m.match_channels(channels), len(channels), seconds)
    start = time.perf_counter()
    for _, sub_id, *_rest in subs:
        m.remove(sub_id)
    remove_rate = len(subs) / (time.perf_counter() - start)
    if len(m) != 0:
        raise RuntimeError("subscriptions left after removing every one")
    return {
        "rate": rate,
        "per_event": per_event,
        "chan_rate": chan_rate,
        "add_rate": add_rate,
        "remove_rate": remove_rate,
        "mem": mem,
    }


def run_size(
    n: int, seconds: float, reference: bool, event_count: int, bound: str | None = None
) -> list[str]:
    subs = claims_bound(subscriptions(n), bound) if bound else subscriptions(n)
    args = event_args(n, event_count)
    rust = run_rust(subs, args, seconds)
    rust_rate, per_event = rust["rate"], rust["per_event"]
    ref_cell = ratio = "-"
    if reference:
        r, _, _ = measure_build(ReferenceMatcher, subs)
        ref_events = [ReferenceRowEvent(*a) for a in args[:64]]
        budget = max(seconds, 1.0)
        # Batches of a few events, so the slow reference still finishes within the budget.
        ref_rate, ref_per_event = timed(lambda: r.match_rows(ref_events[:4]), 4, budget)
        if abs(ref_per_event - per_event) > 0.5 + per_event:
            note = f"note: reference averaged {ref_per_event:.2f} matches/event over fewer events"
            print(note, file=sys.stderr)
        ref_cell, ratio = fmt_rate(ref_rate), f"{rust_rate / ref_rate:,.0f}x"
        del r
    return [
        f"{n:,}",
        fmt_rate(rust_rate),
        f"{1e9 / rust_rate:.0f} ns",
        f"{per_event:.2f}",
        ref_cell,
        ratio,
        fmt_rate(rust["chan_rate"]),
        fmt_rate(rust["add_rate"]),
        fmt_rate(rust["remove_rate"]),
        f"{rust['mem']:.0f} B",
    ]


def run_scan(n: int, seconds: float) -> list[str]:
    """N range-only subscriptions: each is evaluated for every event."""
    m = pyrt.Matcher()
    for i in range(n):
        m.add_rows(i, "*", "public", "orders", f"amount=gt.{i % 1000}")
    events = [pyrt.RowEvent("INSERT", "public", "orders", {"amount": 5_000}) for _ in range(64)]
    rate, per_event = timed(lambda: m.match_rows(events), len(events), seconds)
    misses = [pyrt.RowEvent("INSERT", "public", "orders", {"amount": -1}) for _ in range(64)]
    miss_rate, _ = timed(lambda: m.match_rows(misses), len(misses), seconds)
    return [
        f"{n:,}",
        fmt_rate(rate),
        f"{per_event:,.0f}",
        fmt_rate(miss_rate),
        f"{1e9 / miss_rate:,.0f} ns",
    ]


def _rate(cell: str) -> float:
    """The number of a `fmt_rate` cell ("1.23M/s", "456k/s", "789/s")."""
    text = cell.removesuffix("/s")
    scale = {"M": 1e6, "k": 1e3}.get(text[-1:], 1.0)
    return float(text.rstrip("Mk").replace(",", "")) * scale


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    parser.add_argument("--no-reference", action="store_true", help="skip the Python reference")
    parser.add_argument("--scan-sizes", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument(
        "--events",
        type=int,
        default=4096,
        help="distinct pre-built events cycled through (more events: colder caches)",
    )
    parser.add_argument(
        "--claims-bound",
        action="store_true",
        help="each size again with claims-bound filters (a channel rule's), side by side",
    )
    parser.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bound", choices=sorted(BOUND_BY), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one_size is not None:
        # Worker mode: one size, one row, as JSON on stdout.
        row = run_size(args.one_size, args.seconds, not args.no_reference, args.events, args.bound)
        print(json.dumps(row))
        return 0

    header = [
        "subscriptions", "Rust events/s", "per event", "matches/event", "reference events/s",
        "Rust/reference", "channel matches/s", "adds/s", "removes/s", "RSS per subscription",
    ]  # fmt: skip
    bound: list[str] = list(BOUND_BY) if args.claims_bound else []
    variants: list[str | None] = [None, *bound]
    rows: dict[str | None, list[list[str]]] = {v: [] for v in variants}
    for n in args.sizes:
        # Each size in a fresh process, so one size's heap (a freed million-subscription
        # reference matcher, say) does not slow the next one down.
        command = [sys.executable, __file__, "--one-size", str(n), "--seconds", str(args.seconds)]
        command += ["--events", str(args.events)] + (
            ["--no-reference"] if args.no_reference else []
        )
        for variant in variants:
            extra = ["--bound", variant] if variant else []
            out = subprocess.run(command + extra, capture_output=True, text=True, check=True)
            rows[variant].append(json.loads(out.stdout.splitlines()[-1]))
            print(variant or "plain", *rows[variant][-1], sep=" | ", file=sys.stderr, flush=True)
    print(f"## match_rows, mixed workload ({' '.join(sys.argv[1:]) or 'defaults'})\n")
    print(table(header, rows[None]))
    for name in bound:
        rule = BOUND_BY[name]
        print(f"\n## the same, every row subscription claims-bound ({rule} in front)\n")
        print(table(header, rows[name]))
    if bound:
        names = [f"{v} / plain" for v in bound]
        print("\n" + "| subscriptions | plain events/s | " + " | ".join(names) + " |")
        print("|---|---|" + "---|" * len(names))
        for i, plain in enumerate(rows[None]):
            ratios = [f"{_rate(rows[v][i][1]) / _rate(plain[1]):.2f}" for v in bound]
            print(f"| {plain[0]} | {plain[1]} | " + " | ".join(ratios) + " |")
    if args.scan_sizes:
        scan = [run_scan(n, args.seconds) for n in args.scan_sizes]
        print("\n## range-only subscriptions on one table (scanned, not indexed)\n")
        print(table(
            ["subscriptions", "events/s (all match)", "matches/event", "events/s (none match)",
             "per event (none match)"],
            scan,
        ))  # fmt: skip
    print(f"\nMachine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
